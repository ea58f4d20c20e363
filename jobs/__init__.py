"""Cluster entrypoints (``ray job submit … -- python -m jobs.score``); thin wrappers, no business logic."""
