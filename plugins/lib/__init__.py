"""Helper libraries of the built-in stages (no stage lives here)."""
