"""Where a request's images are decoded: `decode_images` reads each header once and stops
before decoding when the request's images declare more pixels than the caller allows."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

import numpy as np
import pytest

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
