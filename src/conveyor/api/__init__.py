"""The HTTP API: a FastAPI router over a Conveyor instance."""

from .errors import conveyor_exception_handler, http_error_handler

__all__ = ["conveyor_exception_handler", "http_error_handler"]
