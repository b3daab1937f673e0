"""Benchmarks of the engine against bare Temporal; `python -m bench` runs them."""
