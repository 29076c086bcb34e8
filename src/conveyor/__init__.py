"""Conveyor: durable background and concurrent tasks for FastAPI applications."""

from .context import TaskContext
from .core import Conveyor
from .errors import ConveyorError, TaskCancelled, TaskFailed
from .handle import TaskHandle
from .record import TaskRecord
from .settings import Settings
from .status import TaskStatus
from .task import UNSET, TaskType

__version__ = "0.1.0"

__all__ = [
    "UNSET",
    "Conveyor",
    "ConveyorError",
    "Settings",
    "TaskCancelled",
    "TaskContext",
    "TaskFailed",
    "TaskHandle",
    "TaskRecord",
    "TaskStatus",
    "TaskType",
]
