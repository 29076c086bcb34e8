"""The HTTP API: a FastAPI router over a Conveyor instance."""
