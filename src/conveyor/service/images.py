"""The image service: internal task types and ``POST /images`` (multipart upload).

An upload is streamed to disk under a size cap, its format sniffed from the bytes against an
allowlist and its pixel count read from the header before the task is even created; the decoding
and every operation run in the process pool.
"""

from __future__ import annotations

import asyncio
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

from .. import serialization
from ..api.auth import tenant_resolver
from ..api.errors import documented
from ..api.router import TaskOut, inline_refs, json_response, located_in_body
from ..api.routing import links_base, raw_endpoint, strict_route_class
from ..api.uploads import UploadedFile, read_multipart
from ..blobs import BlobResult, safe_filename
from ..context import TaskContext
from ..errors import ConveyorError, InvalidArguments, PayloadTooLarge, UnsupportedMediaType
from ..ids import uuid7
from ..jobs.images import EXTENSIONS, Pipeline, inspect_image, transform
from ..task import validated

if TYPE_CHECKING:
    from ..core import Conveyor

MAX_FILES = 100
SOURCE = "source"


def _own_blob(ctx: TaskContext, blob_id: str) -> Path:
    # a task reads only blobs in its own folder: no reaching another task's (or tenant's) files
    if not blob_id.startswith(f"{ctx.task_id}/"):
        raise InvalidArguments(f"blob {blob_id!r} does not belong to task {ctx.task_id}")
    return ctx.blob_path(blob_id)


def transform_image(
    ctx: TaskContext,
    source: str,
    pipeline: Pipeline,
    filename: Annotated[str, Field(max_length=200)] = "image",
    max_pixels: Annotated[int, Field(ge=1, le=89_478_485)] = 50_000_000,
) -> BlobResult:
    """Apply ``pipeline`` to the uploaded blob ``source``; the result is the output file."""
    output, info = transform(
        _own_blob(ctx, source), pipeline, max_pixels=max_pixels, on_progress=ctx.progress
    )
    extension = EXTENSIONS[info["format"]]
    blob_id, path = ctx.new_blob(f"result.{extension}")
    path.write_bytes(output)
    stem = safe_filename(filename, "image").rsplit(".", 1)[0]
    return BlobResult(blob_id, info["content_type"], f"{stem}.{extension}", info)


def transform_images_zip(
    ctx: TaskContext,
    sources: Annotated[list[str], Field(min_length=1, max_length=MAX_FILES)],
    filenames: list[str],
    pipeline: Pipeline,
    max_pixels: Annotated[int, Field(ge=1, le=89_478_485)] = 50_000_000,
) -> BlobResult:
    """Apply ``pipeline`` to every source; the result is one zip of the outputs."""
    files: list[dict[str, Any]] = []
    blob_id, path = ctx.new_blob("results.zip")
    used: set[str] = set()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for index, (source, filename) in enumerate(zip(sources, filenames, strict=True)):
            stem = safe_filename(filename, f"image-{index + 1}").rsplit(".", 1)[0]
            try:
                output, info = transform(_own_blob(ctx, source), pipeline, max_pixels=max_pixels)
            except ConveyorError as exc:
                files.append({"source": filename, "error": exc.message})
                continue
            name = f"{stem}.{EXTENSIONS[info['format']]}"
            while name in used:
                name = f"{stem}-{index + 1}.{EXTENSIONS[info['format']]}"
                stem = f"{stem}-{index + 1}"
            used.add(name)
            archive.writestr(name, output)
            files.append({"source": filename, "name": name, **info})
            ctx.progress(100 * (index + 1) / len(sources), f"{index + 1} of {len(sources)} images")
    if not used:
        raise InvalidArguments(f"no image could be processed: {files}")
    info = {"files": files, "bytes": path.stat().st_size}
    return BlobResult(blob_id, "application/zip", "images.zip", info)


def register_image_tasks(yard: Conveyor) -> None:
    """Register ``images.transform`` and ``images.transform_zip`` (internal: ``POST /images``)."""
    yard.task(name="images.transform", executor="process", timeout_s=300, public=False)(
        transform_image
    )
    yard.task(name="images.transform_zip", executor="process", timeout_s=1800, public=False)(
        transform_images_zip
    )


class ImagesOut(BaseModel):
    items: list[TaskOut]


def _pipeline(fields: dict[str, str]) -> Pipeline:
    raw: dict[str, Any] = {}
    text = fields.get("operations")
    if text is not None:
        try:
            raw["operations"] = serialization.loads(text)
        except serialization.JSONError as exc:
            raise InvalidArguments(
                "operations is not valid JSON",
                details=[{"loc": ["body", "operations"], "msg": str(exc), "type": "json_invalid"}],
            ) from exc
    for field in ("format", "quality"):
        value = fields.get(field)
        if value:
            raw[field] = value.upper() if field == "format" else value
    orient = fields.get("auto_orient")
    if orient:  # a form's boolean is the text "true" or "false", nothing looser
        if orient.lower() not in ("true", "false"):
            raise InvalidArguments(
                "auto_orient must be true or false",
                details=[
                    {"loc": ["body", "auto_orient"], "msg": "true or false", "type": "bool_type"}
                ],
            )
        raw["auto_orient"] = orient.lower() == "true"
    return validated(Pipeline, raw, location=("body",), message="invalid image options")


def build_image_router(yard: Conveyor) -> APIRouter:
    """``POST /images``: upload one or more images with operations; one task per file (or one
    zip task with ``bundle=zip``)."""
    settings = yard.settings
    router = APIRouter(route_class=strict_route_class(settings.max_body_bytes), tags=["images"])
    tenant = tenant_resolver(settings)
    operations_doc = (
        'A JSON list, e.g. [{"op": "thumbnail", "width": 256, "height": 256}, {"op": "grayscale"}]'
    )
    form_schema = {
        "type": "object",
        "required": ["file"],
        "properties": {
            "file": {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_FILES,
                "items": {"type": "string", "format": "binary"},
            },
            "operations": {
                **inline_refs(Pipeline.model_json_schema())["properties"]["operations"],
                "description": operations_doc,
            },
            "format": {"type": "string", "enum": ["JPEG", "PNG", "GIF", "WEBP", "AVIF"]},
            "quality": {"type": "integer", "minimum": 1, "maximum": 100},
            "auto_orient": {"type": "boolean"},
            "bundle": {"type": "string", "enum": ["zip"]},
        },
    }

    @router.post(
        "/images",
        status_code=202,
        summary="Process uploaded images",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": form_schema,
                        "encoding": {"operations": {"contentType": "application/json"}},
                    }
                },
            }
        },
        responses={
            202: {"model": TaskOut | ImagesOut, "description": "One task, or one per file"},
            **documented(413, 415, 422, 429, 507),
        },
        response_class=Response,
    )
    @raw_endpoint
    async def submit_images(request: Request) -> Response:
        owner = await tenant(request)
        form = await read_multipart(
            request,
            staging_root=yard.blobs.root / ".uploads",
            max_bytes=settings.max_upload_bytes,
            max_files=MAX_FILES,
        )
        try:
            uploads = form.require_files("file", what="image")
            pipeline = _pipeline(form.fields)
            bundle = form.fields.get("bundle")
            if bundle not in (None, "", "zip"):
                raise InvalidArguments(
                    "bundle must be zip",
                    details=[{"loc": ["body", "bundle"], "msg": "only 'zip'", "type": "enum"}],
                )
            zipped = bundle == "zip"
            ids = [uuid7()] if zipped else [uuid7() for _ in uploads]
            try:
                sources = await _store_uploads(yard, uploads, ids, zipped=zipped)
            except BaseException:
                await _forget_blobs(yard, ids)
                raise
            records = await _submit(yard, owner, uploads, pipeline, ids, sources, zipped=zipped)
        finally:
            form.discard()
        base = links_base(request)
        if len(records) == 1:
            record = records[0]
            return json_response(
                record.to_json(base), 202, {"Location": f"{base}/tasks/{record.id}"}
            )
        return json_response({"items": [record.to_json(base) for record in records]}, 202)

    return router


async def _forget_blobs(yard: Conveyor, ids: list[str]) -> None:
    for task_id in ids:
        await asyncio.to_thread(yard.blobs.delete_task, task_id)


async def _store_uploads(
    yard: Conveyor, uploads: list[UploadedFile], ids: list[str], *, zipped: bool
) -> list[str]:
    """Each upload as a blob of its task; 413/415 unless an allowed, small-enough image."""
    max_pixels = yard.settings.max_image_pixels
    sources: list[str] = []
    for index, upload in enumerate(uploads):
        task_id = ids[0] if zipped else ids[index]
        blob_name = f"{SOURCE}-{index}" if zipped else SOURCE
        blob_id, path = yard.blobs.adopt(task_id, blob_name, upload.path)
        try:
            await asyncio.to_thread(inspect_image, path, max_pixels=max_pixels)
        except (UnsupportedMediaType, PayloadTooLarge) as exc:
            name = safe_filename(upload.filename or "", f"file {index + 1}")
            exc.message = f"{name}: {exc.message}"
            exc.details = [{"loc": ["body", "file", index], "msg": exc.message, "type": "image"}]
            raise
        sources.append(blob_id)
    return sources


async def _submit(
    yard: Conveyor,
    owner: str,
    uploads: list[UploadedFile],
    pipeline: Pipeline,
    ids: list[str],
    sources: list[str],
    *,
    zipped: bool,
) -> list[Any]:
    names = [upload.filename or f"image-{i + 1}" for i, upload in enumerate(uploads)]
    common = {
        "pipeline": pipeline.model_dump(mode="json"),
        "max_pixels": yard.settings.max_image_pixels,
    }
    if zipped:
        name = "images.transform_zip"
        items = [{"sources": sources, "filenames": names, **common}]
    else:
        name = "images.transform"
        items = [
            {"source": source, "filename": filename, **common}
            for source, filename in zip(sources, names, strict=True)
        ]
    try:  # every file's task is committed, or none: a retrying client never runs one twice
        return await yard.submit_many(name, items, owner=owner, task_ids=ids)
    except BaseException as exc:
        await _forget_blobs(yard, ids)
        if isinstance(exc, ConveyorError):
            raise located_in_body(exc) from None
        raise


__all__ = ["build_image_router", "register_image_tasks"]
