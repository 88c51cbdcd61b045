"""Fuzzing: the HTTP API from its own OpenAPI schema (schemathesis), and image decoding
(hypothesis). Bad input gets a 4xx JSON error, never a 5xx, a stack trace or a path."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.bundle import read_manifest
from service.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from service.imaging import decode_image
from service.model import LoadedModel
from service.requests import images_from_body
from service.settings import Settings
from tests.support import ThreadServer, image_bytes

FUZZ = settings(
    max_examples=50,
    deadline=None,
    derandomize=True,  # the same examples every run: a failure reproduces
    database=None,
    suppress_health_check=list(HealthCheck),
)

POSITIVE, NEGATIVE = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
OPERATIONS = [
    ("POST", "/v1/classify", POSITIVE),
    ("POST", "/v1/classify", NEGATIVE),
    ("POST", "/v2/models/{name}/infer", POSITIVE),
    ("POST", "/v2/models/{name}/infer", NEGATIVE),
    ("GET", "/v2/models/{name}", POSITIVE),
    ("GET", "/v2/models/{name}/ready", POSITIVE),
]
"""Operations and modes to fuzz (a GET with only a path parameter has nothing to negate)."""


def check_answer(status: int, body: bytes, headers: dict[str, str], private: list[str]) -> None:
    """No 5xx but load shedding; an error is a JSON object with an "error" string; nothing
    private (stack trace, server paths) leaks."""
    text = body.decode("utf-8", "replace")
    assert "Traceback" not in text
    for secret in private:
        assert secret not in text, text[:300]
    if status < 400:
        return
    assert headers.get("content-type", "").startswith("application/json"), (status, text[:300])
    error = json.loads(body)
    assert isinstance(error, dict) and isinstance(error.get("error"), str), error
    if status >= 500:
        # A valid request whose deadline nothing can meet is shed: the contract's 503.
        assert status == 503 and error.get("reason") == "deadline", (status, error)
        assert "retry-after" in headers


@pytest.mark.parametrize(("method", "path", "mode"), OPERATIONS)
def test_api_fuzz(
    live: ThreadServer, bundle: Path, method: str, path: str, mode: schemathesis.GenerationMode
) -> None:
    schema = schemathesis.openapi.from_dict(live.app.openapi())
    operation = schema[path][method]
    # Valid requests must name the model to get past the 404.
    fixed = {"name": "tiny"} if method == "POST" and mode is POSITIVE else None
    private = [str(bundle.parent), str(Path(__file__).parent)]

    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=fixed))
    def run(case: Any) -> None:
        response = case.call(base_url=live.url, timeout=30)
        headers = {k.lower(): v[0] for k, v in response.headers.items()}
        check_answer(response.status_code, response.content, headers, private)

    run()


# -- image decoding --------------------------------------------------------------------------
ALLOWED = (BadRequest, PayloadTooLarge, UnsupportedMediaType)
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")
SIZE = 16
MAX_PIXELS = 1_000_000


def decodes_or_refuses(data: bytes, max_pixels: int = MAX_PIXELS) -> None:
    """`decode_image` returns the model's input, or raises one of the 4xx errors."""
    try:
        image = decode_image(data, SIZE, SIZE, max_pixels)
    except ALLOWED:
        return
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == "uint8"


def png_declaring(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose header declares `width` x `height` (8-bit RGB), with `idat` as its data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


@st.composite
def real_images(draw: st.DrawFn) -> bytes:
    fmt = draw(st.sampled_from(FORMATS))
    size = (draw(st.integers(1, 64)), draw(st.integers(1, 64)))
    return image_bytes(draw(st.integers(0, 1000)), size, fmt)


@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes(data: bytes) -> None:
    decodes_or_refuses(data)


@FUZZ
@given(image=real_images(), cut=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_images(image: bytes, cut: float) -> None:
    decodes_or_refuses(image[: int(len(image) * cut)])


@FUZZ
@given(
    image=real_images(),
    flips=st.lists(st.tuples(st.integers(0), st.integers(0, 255)), min_size=1, max_size=8),
)
def test_corrupted_images(image: bytes, flips: list[tuple[int, int]]) -> None:
    data = bytearray(image)
    for position, value in flips:
        data[position % len(data)] = value
    decodes_or_refuses(bytes(data))


@FUZZ
@given(
    width=st.integers(1, 2**31 - 1), height=st.integers(1, 2**31 - 1), idat=st.binary(max_size=64)
)
def test_huge_declared_dimensions(width: int, height: int, idat: bytes) -> None:
    data = png_declaring(width, height, zlib.compress(idat))
    if width * height > MAX_PIXELS:
        with pytest.raises(PayloadTooLarge):
            decode_image(data, SIZE, SIZE, MAX_PIXELS)
    else:
        decodes_or_refuses(data)


@pytest.fixture(scope="module")
def model(bundle: Path) -> LoadedModel:
    """The bundle's manifest without sessions: all that parsing a body needs."""
    return LoadedModel(bundle, read_manifest(bundle), {}, ())


CONTENT_TYPES = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "image/png",
            "image/jpeg",
            "application/json",
            "application/json; charset=utf-8",
            "application/octet-stream",
            "text/plain",
            "multipart/form-data",
        ]
    ),
    st.text(max_size=30),
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(["image", "images", "x"]), children, max_size=3)
    ),
    max_leaves=10,
)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["bytes", "image", "json", "json-images"]))
    if kind == "bytes":
        return draw(st.binary(max_size=1024))
    if kind == "image":
        return draw(real_images())
    if kind == "json":
        return json.dumps(draw(JSON_VALUES)).encode()
    import base64

    items = draw(st.lists(st.one_of(real_images(), st.binary(max_size=64)), max_size=40))
    texts = [base64.b64encode(item).decode() for item in items]
    key = draw(st.sampled_from(["image", "images"]))
    return json.dumps({key: texts[0] if key == "image" and texts else texts}).encode()


@FUZZ
@given(body=bodies(), content_type=CONTENT_TYPES)
def test_images_from_body(model: LoadedModel, body: bytes, content_type: str | None) -> None:
    settings = Settings(model_path=model.root, max_image_pixels=MAX_PIXELS)
    try:
        images = images_from_body(body, content_type, model, settings)
    except ALLOWED:
        return
    assert images.ndim == 4 and images.shape[1:] == (SIZE, SIZE, 3)
    assert 1 <= images.shape[0] <= settings.max_images_per_request
