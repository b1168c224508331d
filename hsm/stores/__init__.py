"""The two real stores behind one `Store` interface (base.py): SQLite and PostgreSQL."""
