"""Durable state in SQLite: ``schema`` (tables, migrations and errors: the one place the
schema lives), ``batch`` (what one commit writes), ``writer`` (the group-commit writer)
and ``reader`` (read-only views for the CLI and tests)."""
