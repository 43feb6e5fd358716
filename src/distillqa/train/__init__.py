"""Training: one loop (`loop.py`) into which objectives (`objectives.py`) plug."""
