"""Whole processes: the console script, signals, the installed wheel, several bridges."""
