"""Where and how a request's images are decoded: `decode_images` reads each header once and
stops before decoding when the request's images declare more pixels than the caller
allows; small JPEGs go to libjpeg-turbo through simplejpeg, pixel for pixel as Pillow."""

from __future__ import annotations

import io
from types import SimpleNamespace
from typing import cast

import numpy as np
import pytest
from PIL import Image

from loadtest.samples import load_samples
from service.errors import BadRequest, PayloadTooLarge
from service.imaging import decode_image, decode_jpeg, decode_with_pillow
from service.model import LoadedModel
from service.requests import DecodeElsewhere, decode_images
from service.settings import Settings
from tests.support import image_bytes

MODEL = cast(
    LoadedModel, SimpleNamespace(manifest=SimpleNamespace(input=SimpleNamespace(height=8, width=8)))
)
SETTINGS = cast(Settings, SimpleNamespace(max_image_pixels=10_000))


def test_images_within_the_allowance_are_decoded() -> None:
    small = [image_bytes(size=(20, 10)), image_bytes(seed=1, size=(10, 10))]
    images = decode_images(small, MODEL, SETTINGS, 300)
    assert images.shape == (2, 8, 8, 3) and images.dtype == np.uint8
    assert np.array_equal(images, decode_images(small, MODEL, SETTINGS))


def test_images_over_the_allowance_are_sent_elsewhere() -> None:
    with pytest.raises(DecodeElsewhere):
        decode_images([image_bytes(size=(20, 10))] * 2, MODEL, SETTINGS, 399)
    with pytest.raises(DecodeElsewhere):
        decode_images([image_bytes(size=(20, 20))], MODEL, SETTINGS, 399)


# -- JPEGs decoded by libjpeg-turbo through simplejpeg ---------------------------------------
def _jpeg(pixels: np.ndarray, **options: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", **options)
    return buf.getvalue()


def _pillow(data: bytes) -> np.ndarray:
    return decode_with_pillow(data, 32, 32, 10**6, lambda pixels: None)


RNG = np.random.default_rng(0)
RGB_32 = RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)
FAST_CASES = {
    "4:4:4": _jpeg(RGB_32, subsampling=0),
    "4:2:2": _jpeg(RGB_32, subsampling=1),
    "4:2:0": _jpeg(RGB_32, subsampling=2),
    "progressive": _jpeg(RGB_32, progressive=True),
    "quality 95": _jpeg(RGB_32, quality=95),
    "grey": _jpeg(RGB_32[..., 0]),
    "48x40, resized": _jpeg(RNG.integers(0, 256, (40, 48, 3), dtype=np.uint8)),
    "63x63, resized": _jpeg(RNG.integers(0, 256, (63, 63, 3), dtype=np.uint8)),
}


@pytest.mark.parametrize("case", sorted(FAST_CASES))
def test_a_small_jpeg_is_decoded_as_pillow_decodes_it(case: str) -> None:
    data = FAST_CASES[case]
    fast = decode_jpeg(data, 32, 32, 10**6)
    assert fast is not None and fast.shape == (32, 32, 3) and fast.dtype == np.uint8
    assert np.array_equal(fast, _pillow(data))


def test_the_shipped_sample_jpegs_decode_as_pillow_decodes_them() -> None:
    for sample in load_samples():
        fast = decode_jpeg(sample.data, 32, 32, 10**6)
        assert fast is not None and np.array_equal(fast, _pillow(sample.data))


def test_other_images_are_left_to_pillow() -> None:
    cmyk = io.BytesIO()
    Image.fromarray(RGB_32).convert("CMYK").save(cmyk, format="JPEG")
    large = _jpeg(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8))  # Pillow's draft scales it
    for data in (image_bytes(size=(32, 32)), cmyk.getvalue(), large, b"\xff\xd8\xff" + b"x" * 50):
        assert decode_jpeg(data, 32, 32, 10**6) is None
    assert decode_image(large, 32, 32, 10**6).shape == (32, 32, 3)


def test_a_truncated_jpeg_is_a_400_and_its_size_is_checked_first() -> None:
    data = FAST_CASES["4:2:0"]
    for cut in (len(data) - 10, len(data) // 2):
        corrupt: list[int] = []
        with pytest.raises(BadRequest):
            decode_image(data[:cut], 32, 32, 10**6, corrupt.append)
        assert corrupt == [32 * 32]  # counted once, by Pillow, not also by the fast path
    with pytest.raises(PayloadTooLarge):
        decode_image(data, 32, 32, 32 * 32 - 1)
    heard: list[int] = []
    decode_image(data, 32, 32, 10**6, heard.append)
    assert heard == [32 * 32]
