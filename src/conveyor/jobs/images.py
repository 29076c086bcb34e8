"""Image operations: a typed pipeline applied with Pillow (bytes or a file in, bytes out).

The library route: call :func:`transform` from your own task types.

    >>> output, info = transform(data, Pipeline(operations=[Thumbnail(width=256, height=256)]))

Safety: :func:`inspect_image` sniffs the format from the bytes against an allowlist and reads the
pixel count from the header, so a decompression bomb is refused before anything is decoded.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

from ..errors import ConveyorError, PayloadTooLarge, UnsupportedMediaType
from ..serialization import NumberOnly

try:
    from PIL import Image, ImageEnhance, ImageFilter, ImageOps, ImageSequence, features
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("image processing needs Pillow: pip install 'conveyor[images]'") from exc

INPUT_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", *(("AVIF",) if features.check("avif") else ()))
OUTPUT_FORMATS = INPUT_FORMATS
CONTENT_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "AVIF": "image/avif",
}
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "AVIF": "avif"}
MAX_SIDE = 20_000
MAX_FRAMES = 1_000


class ImageError(ConveyorError):
    """The image cannot be processed (corrupt, truncated, or an operation that cannot apply)."""

    status_code = 422


class _Op(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# An operation is JSON: `"factor": true` or `"width": "2"` is a mistake to name (NumberOnly)
Side = Annotated[int, Field(ge=1, le=MAX_SIDE), NumberOnly]
Factor = Annotated[float, Field(ge=0, le=10), NumberOnly]
Coordinate = Annotated[int, NumberOnly]


class Resize(_Op):
    """Scale to ``width`` and/or ``height``: ``contain`` fits inside, ``cover`` fills and crops
    the centre, ``fill`` stretches. With one side given, the other keeps the aspect ratio."""

    op: Literal["resize"] = "resize"
    width: Side | None = None
    height: Side | None = None
    fit: Literal["contain", "cover", "fill"] = "contain"

    @model_validator(mode="after")
    def _one_side(self) -> Resize:
        if self.width is None and self.height is None:
            raise ValueError("resize needs width, height or both")
        return self


class Thumbnail(_Op):
    """Shrink (never enlarge) to fit inside a ``width`` x ``height`` box."""

    op: Literal["thumbnail"] = "thumbnail"
    width: Side
    height: Side


class Crop(_Op):
    """Crop to ``box`` = [left, top, right, bottom], or to the centred ``aspect`` ("16:9")."""

    op: Literal["crop"] = "crop"
    box: tuple[Coordinate, Coordinate, Coordinate, Coordinate] | None = None
    aspect: Annotated[str, Field(pattern=r"^[1-9][0-9]{0,4}:[1-9][0-9]{0,4}$")] | None = None

    @model_validator(mode="after")
    def _box_or_aspect(self) -> Crop:
        if (self.box is None) == (self.aspect is None):
            raise ValueError("crop needs exactly one of box or aspect")
        if self.box is not None:
            left, top, right, bottom = self.box
            if left < 0 or top < 0 or right <= left or bottom <= top:
                raise ValueError(
                    "box is [left, top, right, bottom] with left < right, top < bottom"
                )
        return self


class Rotate(_Op):
    """Rotate counter-clockwise by ``degrees``; ``expand`` grows the canvas to fit."""

    op: Literal["rotate"] = "rotate"
    degrees: Annotated[float, Field(ge=-360, le=360, allow_inf_nan=False), NumberOnly]
    expand: StrictBool = True


class Flip(_Op):
    """Top to bottom."""

    op: Literal["flip"] = "flip"


class Mirror(_Op):
    """Left to right."""

    op: Literal["mirror"] = "mirror"


class Grayscale(_Op):
    op: Literal["grayscale"] = "grayscale"


class Blur(_Op):
    """Gaussian blur of ``radius`` pixels."""

    op: Literal["blur"] = "blur"
    radius: Annotated[float, Field(gt=0, le=100), NumberOnly]


class Sharpen(_Op):
    """Unsharp mask."""

    op: Literal["sharpen"] = "sharpen"
    radius: Annotated[float, Field(gt=0, le=50), NumberOnly] = 2.0
    percent: Annotated[int, Field(ge=1, le=500), NumberOnly] = 150
    threshold: Annotated[int, Field(ge=0, le=255), NumberOnly] = 3


class Brightness(_Op):
    """``factor`` 1 keeps the image, 0 is black, 2 twice as bright."""

    op: Literal["brightness"] = "brightness"
    factor: Factor


class Contrast(_Op):
    """``factor`` 1 keeps the image, 0 is flat grey."""

    op: Literal["contrast"] = "contrast"
    factor: Factor


class AutoOrient(_Op):
    """Apply the EXIF orientation (1 to 8) to the pixels."""

    op: Literal["auto_orient"] = "auto_orient"


class StripMetadata(_Op):
    """Write the output without EXIF, ICC profile or comments."""

    op: Literal["strip_metadata"] = "strip_metadata"


Operation = Annotated[
    Resize
    | Thumbnail
    | Crop
    | Rotate
    | Flip
    | Mirror
    | Grayscale
    | Blur
    | Sharpen
    | Brightness
    | Contrast
    | AutoOrient
    | StripMetadata,
    Field(discriminator="op"),
]


class Pipeline(BaseModel):
    """What to do to an image, and how to write the output."""

    model_config = ConfigDict(extra="forbid")

    operations: Annotated[list[Operation], Field(max_length=50)] = []
    format: Literal["JPEG", "PNG", "GIF", "WEBP", "AVIF"] | None = None
    quality: Annotated[int, Field(ge=1, le=100)] = 85
    auto_orient: bool = True

    @model_validator(mode="after")
    def _supported_format(self) -> Pipeline:
        if self.format is not None and self.format not in OUTPUT_FORMATS:
            raise ValueError(f"{self.format} output is not supported by this Pillow build")
        return self


@dataclass(frozen=True, slots=True)
class ImageHeader:
    format: str
    width: int
    height: int


def sniff_format(head: bytes) -> str | None:
    """The format named by an image's first bytes, or None (the file name is never trusted)."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"):
        return "AVIF"
    return None


def _open(source: Path | bytes | BinaryIO, formats: tuple[str, ...]) -> Image.Image:
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    with warnings.catch_warnings():
        # our own pixel limit (below Pillow's) is checked right after the header is read
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(stream, formats=list(formats))


def inspect_image(source: Path | bytes, *, max_pixels: int) -> ImageHeader:
    """Format and size from the header, refusing what Conveyor will not decode.

    Raises ``UnsupportedMediaType`` (not an allowed format) or ``PayloadTooLarge`` (more than
    ``max_pixels``), before any pixel is decoded.
    """
    with _checked_open(source, max_pixels) as image:
        assert image.format is not None
        return ImageHeader(image.format, image.width, image.height)


def _checked_open(source: Path | bytes, max_pixels: int) -> Image.Image:
    """The image opened (header only) once its format and pixel count are allowed."""
    head = source[:32] if isinstance(source, bytes) else _read_head(source)
    kind = sniff_format(head)
    if kind is None or kind not in INPUT_FORMATS:
        raise UnsupportedMediaType(
            f"not an accepted image: the bytes are not {', '.join(INPUT_FORMATS)}"
        )
    try:
        image = _open(source, (kind,))
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"image is past the {max_pixels:,}-pixel limit ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise UnsupportedMediaType(f"unreadable {kind} header: {exc}") from exc
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise PayloadTooLarge(
            f"image is {width}x{height} = {width * height:,} pixels, past the "
            f"{max_pixels:,}-pixel limit"
        )
    return image


def _read_head(path: Path) -> bytes:
    with path.open("rb") as file:
        return file.read(32)


Progress = Callable[[float, str], object]


def transform(
    source: Path | bytes,
    pipeline: Pipeline,
    *,
    max_pixels: int = 50_000_000,
    on_progress: Progress | None = None,
) -> tuple[bytes, dict[str, Any]]:
    """Apply ``pipeline`` to an image; ``(output bytes, {width, height, format, bytes, frames})``.

    Raises ``UnsupportedMediaType``/``PayloadTooLarge`` for refused input and ``ImageError`` for
    a corrupt or truncated image or an operation that cannot apply.
    """
    image = _checked_open(source, max_pixels)
    input_format = image.format or "PNG"
    output_format = pipeline.format or (input_format if input_format in OUTPUT_FORMATS else "PNG")
    steps = list(pipeline.operations)
    if pipeline.auto_orient and not any(isinstance(step, AutoOrient) for step in steps):
        steps.insert(0, AutoOrient())
    strip = any(isinstance(step, StripMetadata) for step in steps)
    try:
        with image:
            _draft(image, steps)
            frames = _frames(image, output_format, max_pixels)
            exif = image.getexif()
            icc = image.info.get("icc_profile")
            default_duration = image.info.get("duration", 100)
            durations = [frame.info.get("duration", default_duration) for frame in frames]
            loop = image.info.get("loop", 0)
            requested = len(pipeline.operations)
            done = 0
            for step in steps:
                frames = [_apply(step, frame, exif, max_pixels) for frame in frames]
                # one report per requested operation (not the implicit auto_orient): each report
                # is a message to the engine, which shares the cores with the decoding
                if on_progress is not None and step in pipeline.operations:
                    done += 1
                    on_progress(100 * done / (requested + 1), f"{step.op} done")
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if isinstance(exc, ConveyorError):
            raise
        raise ImageError(f"the {input_format} image is truncated or corrupt: {exc}") from exc
    output = _save(frames, output_format, pipeline.quality, exif, icc, strip, durations, loop)
    first = frames[0]
    info = {
        "width": first.width,
        "height": first.height,
        "format": output_format,
        "content_type": CONTENT_TYPES[output_format],
        "bytes": len(output),
        "frames": len(frames),
    }
    return output, info


def _draft(image: Image.Image, steps: list[Any]) -> None:
    """Let JPEG decode at a reduced scale when the first resizing step shrinks (DCT scaling)."""
    if image.format != "JPEG":
        return
    for step in steps:
        if isinstance(step, AutoOrient | StripMetadata):
            continue
        if isinstance(step, Thumbnail) or (isinstance(step, Resize) and step.fit == "contain"):
            # twice the target, as Image.thumbnail's reducing_gap does: same quality, less work
            width = 2 * (step.width or image.width)
            height = 2 * (step.height or image.height)
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # the pixels will turn 90°
                width, height = height, width
            image.draft("RGB", (width, height))
        return


def _frames(image: Image.Image, output_format: str, max_pixels: int) -> list[Image.Image]:
    count = getattr(image, "n_frames", 1)
    if count > 1 and output_format in ("GIF", "WEBP"):
        if count > MAX_FRAMES or count * image.width * image.height > max_pixels * 4:
            raise PayloadTooLarge(f"animation of {count} frames is past the limits")
        return [frame.copy() for frame in ImageSequence.Iterator(image)]
    image.load()
    return [image]


def _workable(image: Image.Image) -> Image.Image:
    """A mode every operation handles: L, LA, RGB or RGBA (16-bit scaled down, not clipped)."""
    mode = image.mode
    if mode in ("L", "LA", "RGB", "RGBA"):
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        return image.convert("I").point(lambda value: value * (1 / 256)).convert("L")
    if mode == "F":
        return image.convert("L")
    if mode in ("P", "PA"):
        return image.convert("RGBA" if "transparency" in image.info or mode == "PA" else "RGB")
    if mode == "1":
        return image.convert("L")
    return image.convert("RGBA" if "A" in mode else "RGB")


def _apply(step: Any, image: Image.Image, exif: Image.Exif, max_pixels: int) -> Image.Image:
    if isinstance(step, AutoOrient):
        if exif.get(0x0112, 1) == 1:
            return image  # nothing to turn: no copy
        oriented = ImageOps.exif_transpose(image)
        exif[0x0112] = 1
        return oriented if oriented is not None else image
    if isinstance(step, StripMetadata):
        return image
    image = _workable(image)
    if isinstance(step, Resize):
        return _resize(step, image, max_pixels)
    if isinstance(step, Thumbnail):
        scale = min(step.width / image.width, step.height / image.height)
        if scale >= 1:
            return image  # a thumbnail never enlarges
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        # BICUBIC with a reducing gap: what Image.thumbnail does, at a fraction of LANCZOS's cost
        return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)
    if isinstance(step, Crop):
        return image.crop(_crop_box(step, image))
    if isinstance(step, Rotate):
        fill = (0, 0, 0, 0) if image.mode in ("RGBA", "LA") else None
        radians = math.radians(step.degrees)
        if step.expand:
            cos, sin = abs(math.cos(radians)), abs(math.sin(radians))
            grown = (image.width * cos + image.height * sin) * (
                image.width * sin + image.height * cos
            )
            _check_pixels(int(grown), max_pixels, "rotate")
        return image.rotate(
            step.degrees, Image.Resampling.BICUBIC, expand=step.expand, fillcolor=fill
        )
    if isinstance(step, Flip):
        return ImageOps.flip(image)
    if isinstance(step, Mirror):
        return ImageOps.mirror(image)
    if isinstance(step, Grayscale):
        return image.convert("LA" if "A" in image.mode else "L")
    if isinstance(step, Blur):
        return image.filter(ImageFilter.GaussianBlur(step.radius))
    if isinstance(step, Sharpen):
        return image.filter(ImageFilter.UnsharpMask(step.radius, step.percent, step.threshold))
    if isinstance(step, Brightness):
        return _enhance(ImageEnhance.Brightness, image, step.factor)
    if isinstance(step, Contrast):
        return _enhance(ImageEnhance.Contrast, image, step.factor)
    raise ImageError(f"unknown operation {step!r}")  # pragma: no cover - the union is closed


def _enhance(kind: Any, image: Image.Image, factor: float) -> Image.Image:
    if image.mode in ("RGBA", "LA"):  # enhance the colour, keep the alpha channel as it was
        alpha = image.getchannel("A")
        base: Image.Image = kind(image.convert(image.mode[:-1])).enhance(factor)
        base.putalpha(alpha)
        return base
    enhanced: Image.Image = kind(image).enhance(factor)
    return enhanced


def _check_pixels(pixels: int, max_pixels: int, what: str) -> None:
    if pixels > max_pixels:
        raise ImageError(f"{what} would make {pixels:,} pixels; the limit is {max_pixels:,}")


def _resize(step: Resize, image: Image.Image, max_pixels: int) -> Image.Image:
    ratio = image.width / image.height
    width = step.width or max(1, round(step.height * ratio))  # type: ignore[operator]
    height = step.height or max(1, round(step.width / ratio))  # type: ignore[operator]
    _check_pixels(width * height, max_pixels, "resize")
    if step.width is None or step.height is None or step.fit == "fill":
        return image.resize((width, height), Image.Resampling.LANCZOS)
    if step.fit == "contain":
        return ImageOps.contain(image, (width, height), Image.Resampling.LANCZOS)
    return ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS)


def _crop_box(step: Crop, image: Image.Image) -> tuple[int, int, int, int]:
    if step.box is not None:
        left, top, right, bottom = step.box
        if right > image.width or bottom > image.height:
            raise ImageError(
                f"crop box {list(step.box)} is outside the {image.width}x{image.height} image"
            )
        return step.box
    assert step.aspect is not None
    aspect_w, aspect_h = (int(part) for part in step.aspect.split(":"))
    width, height = image.width, round(image.width * aspect_h / aspect_w)
    if height > image.height:
        width, height = round(image.height * aspect_w / aspect_h), image.height
    width, height = max(1, width), max(1, height)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return left, top, left + width, top + height


def _for_output(image: Image.Image, output_format: str) -> Image.Image:
    image = _workable(image)
    if output_format == "JPEG" and image.mode in ("RGBA", "LA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.getchannel("A"))
        return background
    if output_format in ("WEBP", "AVIF") and image.mode in ("L", "LA"):
        return image.convert("RGBA" if image.mode == "LA" else "RGB")
    return image


def _save(
    frames: list[Image.Image],
    output_format: str,
    quality: int,
    exif: Image.Exif,
    icc: bytes | None,
    strip: bool,
    durations: list[int],
    loop: int,
) -> bytes:
    prepared = [_for_output(frame, output_format) for frame in frames]
    options: dict[str, Any] = {}
    if output_format in ("JPEG", "WEBP", "AVIF"):
        options["quality"] = quality
    if output_format == "PNG":
        options["optimize"] = False
    if not strip:
        if len(exif) and output_format in ("JPEG", "PNG", "WEBP", "AVIF"):
            options["exif"] = exif.tobytes()
        if icc and output_format != "GIF":
            options["icc_profile"] = icc
    if len(prepared) > 1:
        options.update(save_all=True, append_images=prepared[1:], duration=durations, loop=loop)
    buffer = io.BytesIO()
    prepared[0].save(buffer, output_format, **options)
    return buffer.getvalue()
