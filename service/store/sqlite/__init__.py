"""The embedded store: one SQLite file, written through one group-committed connection."""
