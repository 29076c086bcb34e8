"""Blobs: bytes a task reads or writes, kept as files beside the store, referenced by id.

A blob id is ``<task id>/<name>``; every blob of a task lives in that task's folder, so deleting
the task deletes its blobs. Tasks return :class:`BlobResult` to make their result a file.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import serialization
from .errors import InvalidArguments, no_room

_BLOB_ID = re.compile(
    r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/[A-Za-z0-9._-]{1,100}$"
)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_filename(name: str, default: str = "file") -> str:
    """A file name reduced to ``[A-Za-z0-9._-]`` (no paths, no header injection)."""
    cleaned = _UNSAFE.sub("_", name.rsplit("/", 1)[-1].rsplit("\\", 1)[-1]).strip("._")
    return cleaned[:100] or default


@dataclass(frozen=True, slots=True)
class BlobResult:
    """Return this from a task: ``GET /tasks/{id}/result`` then serves the blob as a file, and
    ``info`` (JSON) is the task's ``result``."""

    blob_id: str
    content_type: str
    filename: str
    info: Any = None

    def reference(self) -> dict[str, str]:
        return {"id": self.blob_id, "content_type": self.content_type, "filename": self.filename}


class BlobStore:
    """Blob files under ``root`` (``<data_dir>/blobs``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def blob_id(self, task_id: str, name: str) -> str:
        blob_id = f"{task_id}/{safe_filename(name)}"
        self._check(blob_id)
        return blob_id

    def path(self, blob_id: str) -> Path:
        """The file of a blob (its folder is created on demand)."""
        self._check(blob_id)
        path = self.root / blob_id
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def adopt(self, task_id: str, name: str, staged: Path) -> tuple[str, Path]:
        """Move a staged upload in as the blob ``name`` of the task: ``(blob id, path)``. The
        staging folder is on the same file system, so this is a rename, not a copy;
        ``InsufficientStorage`` (507) when even the task's folder finds no room."""
        blob_id = self.blob_id(task_id, name)
        try:
            path = self.path(blob_id)
            os.replace(staged, path)
        except OSError as exc:
            if (full := no_room(exc)) is not None:
                raise full from exc
            raise
        return blob_id, path

    def delete_task(self, task_id: str) -> None:
        """Remove every blob of a task."""
        folder = self.root / task_id
        if re.fullmatch(r"[0-9a-f-]{36}", task_id) and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)

    @staticmethod
    def _check(blob_id: str) -> None:
        if not _BLOB_ID.fullmatch(blob_id):
            raise InvalidArguments(f"not a blob id: {blob_id!r}")


def encode_result(value: Any) -> tuple[str, str | None]:
    """A task's return value as ``(result JSON, blob reference JSON or None)``."""
    if isinstance(value, BlobResult):
        return serialization.dumps(value.info), serialization.dumps(value.reference())
    return serialization.dumps(value), None
