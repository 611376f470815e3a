"""Units: settings, the JSON codec, the session locks, the import rule, adapter corners."""
