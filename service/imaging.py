"""Image decoding and resizing to the model's input, with limits on what is accepted."""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from collections.abc import Callable

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from service.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

IMAGE_TYPES = frozenset(
    {
        "image/png",
        "image/jpeg",
        "image/jpg",
        "image/webp",
        "image/bmp",
        "image/gif",
        "application/octet-stream",
    }
)


DECODERS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
"""Pillow formats tried, whatever the Content-Type: no other decoder ever sees a body
but Pillow and, for the JPEGs `decode_jpeg` takes, libjpeg-turbo through simplejpeg."""

JPEG_START = b"\xff\xd8\xff"
FAST_JPEG_COLORSPACES = frozenset({"RGB", "YCbCr", "Gray"})
"""What `decode_jpeg` decodes itself; CMYK and YCCK (Adobe's inverted ink) go to Pillow."""


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def check_image_type(content_type: str | None) -> None:
    kind = media_type(content_type)
    if kind not in IMAGE_TYPES:
        accepted = ", ".join(sorted(IMAGE_TYPES | {"application/json"}))
        raise UnsupportedMediaType(
            f"unsupported Content-Type {kind or '(none)'!r}; send one of: {accepted}"
        )


def decode_image(
    data: bytes,
    height: int,
    width: int,
    max_pixels: int,
    admit: Callable[[int], None] = lambda pixels: None,
) -> np.ndarray:
    """uint8 [height, width, 3]: RGB, resized with Pillow's bilinear filter (antialiased
    when shrinking), aspect ratio not kept. Errors are 400 (undecodable) or 413 (too big).
    `admit` hears the pixel count from the header before anything is decoded, and may
    stop it by raising."""
    if not data:
        raise BadRequest("empty image")
    fast = decode_jpeg(data, height, width, max_pixels, admit)
    return fast if fast is not None else decode_with_pillow(data, height, width, max_pixels, admit)


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """413 for an image whose header declares more than `max_pixels`."""
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )


def decode_jpeg(
    data: bytes,
    height: int,
    width: int,
    max_pixels: int,
    admit: Callable[[int], None] = lambda pixels: None,
) -> np.ndarray | None:
    """A JPEG smaller than twice the model's input each way, decoded by libjpeg-turbo
    through simplejpeg (about 0.02 ms for 32x32 against Pillow's 0.17, most of that
    Pillow's Python), pixel for pixel what Pillow gives (tested); None for anything else,
    which Pillow decodes: another format, a header simplejpeg cannot read, CMYK, and
    larger images, which Pillow decodes at a reduced scale (`Image.draft`)."""
    if not data.startswith(JPEG_START):
        return None
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in FAST_JPEG_COLORSPACES or w >= 2 * width or h >= 2 * height:
        return None
    check_pixels(w, h, max_pixels)  # only with a limit below twice the model's input
    try:
        rgb = simplejpeg.decode_jpeg(data, colorspace="RGB")
    except ValueError:
        return None  # a corrupt body: Pillow says why (and admits it, once)
    admit(w * h)  # after the decode, so that a body Pillow takes over is not counted twice
    return rgb if (w, h) == (width, height) else to_input(Image.fromarray(rgb), height, width)


def to_input(rgb: Image.Image, height: int, width: int) -> np.ndarray:
    """uint8 [height, width, 3] of an RGB image, resized with Pillow's bilinear filter
    where its size differs."""
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def decode_with_pillow(
    data: bytes, height: int, width: int, max_pixels: int, admit: Callable[[int], None]
) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=DECODERS) as img:
                w, h = img.size
                check_pixels(w, h, max_pixels)
                admit(w * h)
                img.draft("RGB", (width, height))  # JPEG: decode at reduced scale if possible
                return to_input(img.convert("RGB"), height, width)
    except PayloadTooLarge:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(f"image rejected as a decompression bomb: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise BadRequest(f"cannot decode image: {exc.__class__.__name__}") from exc


def decode_base64(text: object, what: str = "image") -> bytes:
    if not isinstance(text, str):
        raise BadRequest(f"{what} must be a base64 string")
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"{what} is not valid base64") from exc
