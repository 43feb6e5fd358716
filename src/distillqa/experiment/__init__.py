"""Experiments: paired statistics between runs (the grid runner and report build on it)."""
