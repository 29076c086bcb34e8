"""Image operations on real images, checked on the output's pixels and size (no server)."""

from __future__ import annotations

from typing import Any

import pytest
from PIL import Image, ImageStat
from pydantic import ValidationError

from conveyor.errors import PayloadTooLarge, UnsupportedMediaType
from conveyor.jobs.images import (
    OUTPUT_FORMATS,
    ImageError,
    Pipeline,
    inspect_image,
    sniff_format,
    transform,
)

from .support.images import (
    BLUE,
    GREEN,
    RED,
    WHITE,
    animated_gif,
    close,
    encode,
    open_bytes,
    png_header_only,
    quadrants,
    with_orientation,
)


def run(
    data: bytes, *operations: dict[str, Any], **options: Any
) -> tuple[Image.Image, dict[str, Any]]:
    pipeline = Pipeline.model_validate({"operations": list(operations), **options})
    output, info = transform(data, pipeline)
    image = open_bytes(output)
    assert info["width"] == image.width and info["height"] == image.height
    assert info["bytes"] == len(output) and info["format"] == image.format
    return image, info


def corners(image: Image.Image) -> tuple[Any, ...]:
    rgb = image.convert("RGB")
    w, h = rgb.size
    return (
        rgb.getpixel((1, 1)),
        rgb.getpixel((w - 2, 1)),
        rgb.getpixel((1, h - 2)),
        rgb.getpixel((w - 2, h - 2)),
    )


PNG = encode(quadrants(), "PNG")


@pytest.mark.parametrize(
    ("operation", "size"),
    [
        pytest.param({"op": "resize", "width": 100, "height": 100}, (100, 50), id="contain"),
        pytest.param(
            {"op": "resize", "width": 100, "height": 100, "fit": "cover"}, (100, 100), id="cover"
        ),
        pytest.param(
            {"op": "resize", "width": 30, "height": 90, "fit": "fill"}, (30, 90), id="fill"
        ),
        pytest.param({"op": "resize", "width": 80}, (80, 40), id="width-only"),
        pytest.param({"op": "resize", "height": 10}, (20, 10), id="height-only"),
        pytest.param({"op": "thumbnail", "width": 16, "height": 16}, (16, 8), id="thumbnail"),
        pytest.param(
            {"op": "thumbnail", "width": 400, "height": 400},
            (40, 20),
            id="thumbnail-never-enlarges",
        ),
        pytest.param({"op": "crop", "box": [0, 0, 20, 10]}, (20, 10), id="crop-box"),
        pytest.param({"op": "crop", "aspect": "1:1"}, (20, 20), id="crop-aspect"),
        pytest.param({"op": "rotate", "degrees": 90}, (20, 40), id="rotate-expand"),
        pytest.param({"op": "rotate", "degrees": 90, "expand": False}, (40, 20), id="rotate-keep"),
    ],
)
def test_geometry(operation: dict[str, Any], size: tuple[int, int]) -> None:
    image, _ = run(PNG, operation)
    assert image.size == size


def colors(image: Image.Image) -> set[Any]:
    return {color for _, color in image.convert("RGB").getcolors(1 << 16) or []}


def test_crop_box_keeps_the_chosen_pixels() -> None:
    image, _ = run(PNG, {"op": "crop", "box": [20, 10, 40, 20]})
    assert colors(image) == {WHITE}


def test_cover_crops_the_centre() -> None:
    image, _ = run(PNG, {"op": "resize", "width": 20, "height": 20, "fit": "cover"})
    left, right = image.convert("RGB").getpixel((2, 5)), image.convert("RGB").getpixel((17, 5))
    assert close(left, RED) and close(right, GREEN)


@pytest.mark.parametrize(
    ("operation", "expected"),
    [
        pytest.param({"op": "flip"}, (BLUE, WHITE, RED, GREEN), id="flip"),
        pytest.param({"op": "mirror"}, (GREEN, RED, WHITE, BLUE), id="mirror"),
        pytest.param({"op": "rotate", "degrees": 90}, (GREEN, WHITE, RED, BLUE), id="rotate-90"),
        pytest.param({"op": "rotate", "degrees": 180}, (WHITE, BLUE, GREEN, RED), id="rotate-180"),
    ],
)
def test_orientation_changes_move_the_corners(
    operation: dict[str, Any], expected: tuple[tuple[int, int, int], ...]
) -> None:
    image, _ = run(PNG, operation)
    assert all(close(got, want) for got, want in zip(corners(image), expected, strict=True))


def test_grayscale() -> None:
    image, _ = run(PNG, {"op": "grayscale"})
    assert image.mode == "L"
    assert image.getpixel((1, 1)) == round(0.299 * 255)  # ITU-R 601-2 luma of red


def checkerboard() -> bytes:
    board = Image.new("L", (32, 32))
    for y in range(32):
        for x in range(32):
            board.putpixel((x, y), 255 if (x // 2 + y // 2) % 2 else 0)
    return encode(board.convert("RGB"), "PNG")


def spread(image: Image.Image) -> float:
    return float(ImageStat.Stat(image.convert("L")).stddev[0])


def test_blur_smooths_and_sharpen_restores_edges() -> None:
    board = checkerboard()
    original = spread(open_bytes(board))
    blurred, _ = run(board, {"op": "blur", "radius": 2})
    assert spread(blurred) < original / 3
    blurred_png = encode(blurred, "PNG")
    sharpened, _ = run(blurred_png, {"op": "sharpen", "radius": 2, "percent": 300})
    assert spread(sharpened) > spread(blurred) * 1.5


@pytest.mark.parametrize(
    ("operation", "check"),
    [
        pytest.param({"op": "brightness", "factor": 0}, lambda m, o: m == 0, id="black"),
        pytest.param({"op": "brightness", "factor": 1.5}, lambda m, o: m > o * 1.2, id="brighter"),
        pytest.param({"op": "brightness", "factor": 0.5}, lambda m, o: m < o * 0.7, id="darker"),
        pytest.param({"op": "contrast", "factor": 0}, lambda m, o: True, id="flat"),
    ],
)
def test_brightness_and_contrast(operation: dict[str, Any], check: Any) -> None:
    source = encode(Image.new("RGB", (10, 10), (100, 100, 100)), "PNG")
    original = ImageStat.Stat(open_bytes(source)).mean[0]
    image, _ = run(source, operation)
    assert check(ImageStat.Stat(image).mean[0], original)


def test_contrast_zero_flattens_to_one_grey() -> None:
    image, _ = run(PNG, {"op": "contrast", "factor": 0})
    assert len(colors(image)) == 1


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_by_default(orientation: int) -> None:
    upright = quadrants()
    data = with_orientation(upright, orientation)
    image, _ = run(data)
    assert image.size == upright.size
    assert all(
        close(got, want)
        for got, want in zip(corners(image), (RED, GREEN, BLUE, WHITE), strict=True)
    )
    assert image.getexif().get(0x0112, 1) == 1  # not turned twice by the next viewer


def test_auto_orient_can_be_turned_off_and_jpeg_is_oriented_too() -> None:
    data = with_orientation(quadrants(), 6)
    raw, _ = run(data, auto_orient=False)
    assert raw.size == (20, 40)
    jpeg = with_orientation(quadrants(400, 200), 6, "JPEG")
    oriented, _ = run(jpeg, {"op": "thumbnail", "width": 100, "height": 100})
    assert oriented.size == (100, 50)
    assert close(corners(oriented)[0], RED, 60)


def test_metadata_kept_unless_stripped() -> None:
    data = with_orientation(quadrants(), 1, "JPEG")
    kept, _ = run(data, format="JPEG")
    assert kept.getexif().get(0x010E) == "a test image"
    stripped, _ = run(data, {"op": "strip_metadata"}, format="JPEG")
    assert 0x010E not in stripped.getexif()


@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
def test_every_output_format(fmt: str) -> None:
    image, info = run(PNG, {"op": "resize", "width": 20}, format=fmt)
    assert image.format == fmt and image.size == (20, 10)
    assert info["content_type"] == f"image/{fmt.lower()}"
    red = image.convert("RGB").getpixel((2, 2))
    assert close(red, RED, 60)


def test_quality_changes_jpeg_size() -> None:
    photo = encode(checkerboard_photo(), "PNG")
    _, low = run(photo, format="JPEG", quality=10)
    _, high = run(photo, format="JPEG", quality=95)
    assert low["bytes"] < high["bytes"] / 2


def checkerboard_photo() -> Image.Image:
    return Image.effect_noise((256, 256), 80).convert("RGB")


@pytest.mark.parametrize(
    ("data", "expected_format", "kind"),
    [
        pytest.param(encode(quadrants(), "JPEG", quality=95), "JPEG", "jpeg"),
        pytest.param(encode(quadrants(), "WEBP", lossless=True), "WEBP", "webp"),
        pytest.param(encode(quadrants(), "GIF"), "GIF", "gif"),
        pytest.param(encode(quadrants(mode="CMYK"), "JPEG"), "JPEG", "cmyk"),
        pytest.param(encode(quadrants(mode="P"), "PNG"), "PNG", "palette"),
    ],
    ids=lambda value: value if isinstance(value, str) and value.islower() else "",
)
def test_input_kinds(data: bytes, expected_format: str, kind: str) -> None:
    image, info = run(data, {"op": "resize", "width": 20})
    assert info["format"] == expected_format and image.size == (20, 10)
    assert close(image.convert("RGB").getpixel((2, 2)), RED, 70)


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    deep = Image.new("I;16", (4, 4), 32768)
    image, _ = run(encode(deep, "PNG"), format="JPEG")
    assert image.mode == "L" and abs(image.getpixel((1, 1)) - 128) <= 2


def test_palette_transparency_survives_to_webp() -> None:
    base = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    base.paste((255, 0, 0, 255), (0, 0, 5, 10))
    image, _ = run(encode(base.convert("P"), "PNG"), format="WEBP")
    assert image.mode == "RGBA"
    assert image.getpixel((8, 5))[3] == 0 and image.getpixel((1, 5))[3] == 255


def test_animated_gif_keeps_every_frame() -> None:
    image, info = run(animated_gif(4), {"op": "resize", "width": 15})
    assert info["frames"] == 4 and getattr(image, "n_frames", 1) == 4
    assert image.size == (15, 10)
    first, _ = run(animated_gif(4), {"op": "resize", "width": 15}, format="PNG")
    assert getattr(first, "n_frames", 1) == 1


def test_one_by_ten_thousand() -> None:
    tall = encode(Image.new("RGB", (1, 10_000), RED), "PNG")
    image, _ = run(tall, {"op": "thumbnail", "width": 100, "height": 100})
    assert image.size == (1, 100)
    wide, _ = run(tall, {"op": "resize", "width": 5, "height": 5, "fit": "cover"})
    assert wide.size == (5, 5)


def test_progress_is_reported_per_operation() -> None:
    seen: list[tuple[float, str]] = []
    transform(
        PNG,
        Pipeline.model_validate({"operations": [{"op": "flip"}, {"op": "grayscale"}]}),
        on_progress=lambda percent, message: seen.append((percent, message)),
    )
    assert seen == [
        (pytest.approx(100 / 3), "flip done"),
        (pytest.approx(200 / 3), "grayscale done"),
    ]


@pytest.mark.parametrize(
    ("data", "error"),
    [
        pytest.param(b"", UnsupportedMediaType, id="zero-bytes"),
        pytest.param(b"%!PS-Adobe-3.0 EPSF-3.0\n", UnsupportedMediaType, id="eps"),
        pytest.param(b"%PDF-1.7\n", UnsupportedMediaType, id="pdf"),
        pytest.param(b'<svg xmlns="http://www.w3.org/2000/svg"/>', UnsupportedMediaType, id="svg"),
        pytest.param(encode(quadrants(), "BMP"), UnsupportedMediaType, id="bmp"),
        pytest.param(encode(quadrants(), "TIFF"), UnsupportedMediaType, id="tiff"),
        pytest.param(png_header_only(30_000, 30_000), PayloadTooLarge, id="30000x30000"),
        pytest.param(png_header_only(8_000, 8_000), PayloadTooLarge, id="past-our-limit-only"),
    ],
)
def test_refused_before_decoding(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        inspect_image(data, max_pixels=50_000_000)
    with pytest.raises(error):
        transform(data, Pipeline())


def test_pixel_limit_is_configurable() -> None:
    with pytest.raises(PayloadTooLarge, match="800 pixels, past the 799-pixel limit"):
        transform(PNG, Pipeline(), max_pixels=799)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(encode(checkerboard_photo(), "JPEG")[:2000], id="truncated-jpeg"),
        pytest.param(encode(checkerboard_photo(), "PNG")[:3000], id="truncated-png"),
        pytest.param(encode(checkerboard_photo(), "PNG")[:200] + b"\x00" * 5000, id="corrupt-png"),
    ],
)
def test_corrupt_past_the_header_fails_clearly(data: bytes) -> None:
    with pytest.raises(ImageError, match="truncated or corrupt"):
        transform(data, Pipeline())


def test_name_is_never_trusted() -> None:
    assert sniff_format(encode(quadrants(), "PNG")) == "PNG"
    assert sniff_format(b"GIF89a....") == "GIF"
    assert sniff_format(b"not an image") is None


@pytest.mark.parametrize(
    "operation",
    [
        pytest.param({"op": "resize"}, id="resize-nothing"),
        pytest.param({"op": "resize", "width": 0}, id="zero"),
        pytest.param({"op": "resize", "width": -5}, id="negative"),
        pytest.param({"op": "resize", "width": 10**9}, id="enormous"),
        pytest.param({"op": "thumbnail", "width": 10}, id="thumbnail-half"),
        pytest.param({"op": "crop"}, id="crop-nothing"),
        pytest.param({"op": "crop", "box": [10, 10, 5, 5]}, id="crop-inverted"),
        pytest.param({"op": "crop", "aspect": "0:1"}, id="crop-zero-aspect"),
        pytest.param({"op": "rotate", "degrees": 1e9}, id="rotate-huge"),
        pytest.param({"op": "blur", "radius": 0}, id="blur-zero"),
        pytest.param({"op": "blur", "radius": 1000}, id="blur-huge"),
        pytest.param({"op": "brightness", "factor": -1}, id="brightness-negative"),
        pytest.param({"op": "explode"}, id="unknown-op"),
        pytest.param({"op": "flip", "extra": 1}, id="extra-field"),
    ],
)
def test_bad_operation_parameters_are_refused(operation: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as caught:
        Pipeline.model_validate({"operations": [{"op": "flip"}, operation]})
    assert all(error["loc"][:2] == ("operations", 1) for error in caught.value.errors())


def test_crop_outside_the_image_fails_clearly() -> None:
    with pytest.raises(ImageError, match="outside"):
        transform(
            PNG, Pipeline.model_validate({"operations": [{"op": "crop", "box": [0, 0, 99, 99]}]})
        )


def test_resize_past_the_pixel_limit_fails_clearly() -> None:
    pipeline = Pipeline.model_validate(
        {"operations": [{"op": "resize", "width": 20_000, "height": 20_000, "fit": "fill"}]}
    )
    with pytest.raises(ImageError, match="limit"):
        transform(PNG, pipeline)
