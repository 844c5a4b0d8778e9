"""Durable state in SQLite: ``schema`` (tables and migrations, the one place the schema
lives) and ``store`` (group-commit writer and readers)."""
