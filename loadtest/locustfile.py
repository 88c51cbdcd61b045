"""Locust users that send the same requests as `fractal loadtest`.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000

Settings come from the environment (Locust owns the command line):
- FRACTAL_LOADTEST_DEADLINE: deadline spec, as `--deadline` (default uniform:10:80);
- FRACTAL_LOADTEST_IMAGES: labelled images, as `--images` (default: the shipped sample);
- FRACTAL_LOADTEST_COLUMN: force a column (X-Column);
- FRACTAL_LOADTEST_STREAM: 1 for progressive answers (SSE);
- FRACTAL_LOADTEST_USER_RPS: requests per second per user (default 1);
- FRACTAL_LOADTEST_SEED: seed of the image and deadline draws (default 0).

Locust users are a closed loop (a user waits for its answer before its next request), so
under overload they slow down with the server; use `fractal loadtest` for open-loop
figures. A 503 or a missed deadline is reported as a failure; each answer is also
recorded as a pseudo-request "answer / column K: correct|wrong", so Locust's table shows
the columns served and their accuracy.
"""

from __future__ import annotations

import itertools
import math
import os
import time

import numpy as np
from locust import HttpUser, constant_throughput, task

from loadtest.deadlines import parse_deadline
from loadtest.samples import load_samples
from service.protocol import (
    CLASSIFY_PATH,
    answer_from_json,
    classify_headers,
    error_text,
    stream_answer,
)

DEADLINE = parse_deadline(os.environ.get("FRACTAL_LOADTEST_DEADLINE", "uniform:10:80"))
SAMPLES = load_samples(os.environ.get("FRACTAL_LOADTEST_IMAGES") or None)
COLUMN = int(os.environ.get("FRACTAL_LOADTEST_COLUMN") or 0) or None
STREAM = os.environ.get("FRACTAL_LOADTEST_STREAM", "0").lower() in ("1", "true", "yes")
USER_RPS = float(os.environ.get("FRACTAL_LOADTEST_USER_RPS", "1"))
SEED = int(os.environ.get("FRACTAL_LOADTEST_SEED", "0"))
_user_ids = itertools.count()


class ClassifyUser(HttpUser):
    wait_time = constant_throughput(USER_RPS)

    def on_start(self) -> None:
        self.rng = np.random.default_rng(SEED + next(_user_ids))

    @task
    def classify(self) -> None:
        sample = SAMPLES[int(self.rng.integers(len(SAMPLES)))]
        deadline = float(DEADLINE.sample(1, self.rng)[0])
        headers = classify_headers(
            sample.content_type, deadline, COLUMN, STREAM, request_start_s=time.time()
        )
        start = time.perf_counter()
        with self.client.post(
            CLASSIFY_PATH,
            data=sample.data,
            headers=headers,
            name=CLASSIFY_PATH,
            catch_response=True,
        ) as response:
            if not response.ok:
                response.failure(error_text(response.status_code, response.content))
                return
            # The whole body (every SSE event) is read before this line, so the time
            # below covers a stream up to its `done` event.
            if STREAM:
                answer = stream_answer(response.text.splitlines())
            else:
                answer = answer_from_json(response.json())
            elapsed_ms = (time.perf_counter() - start) * 1000.0
            if answer.error is not None:
                response.failure(answer.error)
                return
            if not math.isnan(deadline) and elapsed_ms > deadline:
                response.failure("deadline missed")
            else:
                response.success()
        verdict = "correct" if answer.class_name == sample.label else "wrong"
        self.environment.events.request.fire(
            request_type="answer",
            name=f"column {answer.column}: {verdict}",
            response_time=elapsed_ms,
            response_length=0,
            exception=None,
            context={},
        )
