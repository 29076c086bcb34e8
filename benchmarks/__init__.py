"""Conveyor's benchmarks: run from the repository root, `python -m benchmarks.<name>`."""
