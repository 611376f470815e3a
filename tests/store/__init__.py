"""The stores: one contract suite over SQLite and PostgreSQL, migrations, storage faults."""
