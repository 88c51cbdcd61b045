"""JSON responses encoded with orjson.

A column-1 answer spent about 0.05 ms in Starlette's `json.dumps` (its eleven floats
dominate: Python formats each with `repr`), against a few microseconds in orjson, on a
request whose whole server time is about 1.5 ms here. The output is the same compact
UTF-8 JSON, the same values (a number may be spelt differently: 0.00001 for 1e-05), but
for one thing: orjson writes NaN and infinities as null where
`json.dumps(allow_nan=False)` raises; the server never sends either on purpose.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse as StarletteJSONResponse


def dumps(content: Any) -> bytes:
    return orjson.dumps(content)


class JSONResponse(StarletteJSONResponse):
    def render(self, content: Any) -> bytes:
        return dumps(content)
