"""The message store: the database (SQLite or PostgreSQL) and the writer thread that group-commits to it."""
