"""The reference AI servers themselves."""
