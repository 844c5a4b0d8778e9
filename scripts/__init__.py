"""Scripts of the repository (run from its root); never in the wheel."""
