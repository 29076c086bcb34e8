"""The ready service: Conveyor's API with the built-in task types and their routes."""

from .app import build_yard, create_app

__all__ = ["build_yard", "create_app"]
