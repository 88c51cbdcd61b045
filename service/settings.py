"""Server settings, from the environment (prefix FRACTAL_) or `fractal serve` options."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.latency import check_idle_edges


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FRACTAL_", extra="ignore", frozen=True)

    model_path: Path = Path("models/cifar10")
    """Bundle folder served at start and re-read on SIGHUP."""
    models_root: Path | None = None
    """Folder of bundles that POST /admin/reload may switch to (by folder name)."""
    host: str = "127.0.0.1"
    """Interface to bind."""
    port: int = Field(default=8000, ge=0, le=65535)
    """TCP port to bind."""

    providers: Literal["auto", "cpu", "cuda"] = "auto"
    """onnxruntime execution providers: auto = CUDA where available, else CPU."""
    intra_op_threads: int | None = Field(default=None, ge=1)
    """Threads per onnxruntime run; None: the CPUs this process may use, less one."""
    inference_workers: int = Field(default=1, ge=1, le=16)
    """Batches run at once (each on its own thread)."""

    max_batch_size: int = Field(default=32, ge=1, le=1024)
    """Most images in one onnxruntime run."""
    max_batch_wait_ms: float = Field(default=0.0, ge=0)
    """Longest a batch waits for company (never past its most urgent member's slack)."""
    max_batch_ms: float = Field(default=math.inf, gt=0)
    """A batch takes only as many images as are predicted to run within this many ms (at
    least one request): work that arrives meanwhile waits at most that long for the
    thread. "inf": only `max_batch_size` bounds a batch."""
    inline_run_max_ms: float = Field(default=0.0, ge=0)
    """Opt-in: an idle server runs a batch predicted to take at most this long on the event
    loop instead of the inference thread (saves the hand-off at low load). 0, the default:
    onnxruntime always runs off the event loop."""
    loop_slice_us: float | None = Field(default=None, ge=100, le=100_000)
    """The CPU time slice the event loop's thread asks of the kernel (Linux 6.12 and later,
    no privilege needed; `service/cpuslice.py`): shorter than the default (1.4 ms on 2
    CPUs), the loop is picked sooner when a request wakes it while other threads hold the
    CPUs. None: the kernel's default."""
    gil_switch_interval_ms: float | None = Field(default=None, gt=0, le=100)
    """How long Python lets a thread hold the GIL while another waits for it
    (`sys.setswitchinterval`); None: Python's default, 5 ms. The inference thread needs
    the GIL to hand each finished batch back, and waits up to this long for it while the
    event loop is busy with other requests."""
    queue_limit_images: int = Field(default=512, ge=1)
    """Images that may wait across all variants before new work is refused (503)."""
    stream_refine_backlog_ms: float = Field(default=1.0, ge=0)
    """A stream goes deeper after an answer only while the inference backlog (running and
    queued work) is at most this many ms: refinement uses spare capacity, so that under load
    first answers and single answers are not delayed by other streams' deeper runs."""
    stream_refine_lag_ms: float = Field(default=math.inf, ge=0)
    """A stream goes deeper only while the event loop's lag (smoothed) is at most this many
    ms: a late loop means the CPU is taken even when no inference work is waiting
    ("inf": the lag does not matter)."""
    default_deadline_ms: float | None = Field(default=None, gt=0)
    """Deadline for requests without X-Deadline-Ms; None: no deadline (deepest column)."""
    honor_request_start: bool = True
    """Count a request's deadline from its X-Request-Start stamp (set by the client or a
    proxy in front) rather than from its arrival, so that time spent on the way counts;
    the stamp is Unix time, so the stamping host's clock must agree with this one's. Off:
    the header is ignored."""
    best_effort: bool = False
    """Answer late with column 1 (marked missed) instead of refusing with 503."""
    deadline_margin_ms: float = Field(default=4.0, ge=0)
    """Subtracted from every budget when predicting completion: the time a request spends
    outside the server's clock (network, kernel, a client sharing the CPUs). 4 ms: a 98.9%
    mean hit rate against 96.8% at 0.5 ms in the acceptance runs (docs/loadtest.md)."""
    refuse_margin_ms: float = Field(default=1.0, ge=0)
    """The margin when judging whether to refuse (503): a request is refused only when
    not even its quickest variant is predicted to finish this many ms before its deadline.
    A refusal is a sure miss, so it is judged with less margin than the choice of variant
    (`deadline_margin_ms`; never more): between the two, the quickest variant serves. 1 ms
    (about the 75th percentile of the time outside the server in the acceptance runs): a
    98.69% mean hit rate against 96.37% at 4 ms, four alternating runs each (docs/loadtest.md)."""
    adaptive_admission: bool = True
    """Refuse `/v1/classify` requests with a deadline at arrival when more are in than a
    limit learned from their outcomes, or when the event loop runs too late to meet the
    deadline (off: only the latency profile decides, after the body is read)."""
    two_views: bool = False
    """Load the bundle's two-view variants (`fractal export --flip`): they compete in the
    choice of variant while the arrivals leave room for them (`two_views_max_arrivals`),
    and `X-Views: 2` forces one. Off by default (docs/serving.md): not loaded, so start-up
    does not profile them."""
    two_views_max_arrivals: float = Field(default=0.1, ge=0)
    """A two-view variant competes only while at most this many requests are expected to
    arrive (at the recent mean gap between arrivals) during the time it takes beyond its
    single view: without the bound, at 70% of saturation they lowered the answers'
    accuracy, the requests behind a costlier answer getting shallower ones."""
    deeper_max_arrivals: float = Field(default=0.5, ge=0)
    """A column deeper than column 1 competes only while at most this many requests are
    expected to arrive (at the recent mean gap between arrivals) during the time it takes
    beyond column 1: the requests arriving meanwhile would wait for it ("inf": no bound).
    0.5: at 500 requests/s on the 2-CPU machine 96.9-97.5% of 7-13 ms deadlines met
    against 89.6-90.6% unbounded, accuracy 79.4-79.6% against 83.1% (docs/serving.md)."""
    tight_margin_ms: float = Field(default=5.0, ge=0)
    """The server gives up accuracy for time (the arrival bound on deeper columns,
    `deeper_max_arrivals`, and, where set, the quickest variant while busy,
    `thrifty_backlog_ms`) only while deadlines are tight: while at least `tight_share` of
    recent requests (a running mean over about 50) were refused, or answered with less
    than this left of their deadline. With room to spare, an answer's wait for a deeper
    one costs nothing."""
    tight_share: float = Field(default=0.01, ge=0, le=1)
    """See `tight_margin_ms` (0: always tight, the rules always apply)."""
    thrifty_backlog_ms: float = Field(default=math.inf, ge=0)
    """Opt-in (default "inf": off, always the most accurate that fits): with more
    inference work than this queued and running (predicted ms), a request with a deadline
    gets the variant predicted to finish first instead of the most accurate one that
    fits, while deadlines are tight (`tight_margin_ms`). Off since 2026-12-08: with the
    arrival bound (`deeper_max_arrivals`) in place, 0.5 ms met as many deadlines at 500
    and 850 requests/s and fewer at 1,100, with 0.7-3.3 points less accuracy
    (docs/serving.md)."""
    thrifty_within_ms: float = Field(default=0.0, ge=0)
    """When thrifty, a variant predicted to finish at most this much later than the quickest
    one still competes on accuracy (0: always the quickest)."""
    accuracy_tie: float = Field(default=0.001, ge=0, le=1)
    """Manifest accuracies (fractions) within this of the best variant that fits count as
    equal, and the deeper column, then fp32, then one view serves: a variant measured
    a few test images more accurate is not a better answer (0: exact ties only)."""
    admission_by_deadline: bool = False
    """Scale that limit by each request's deadline against the typical one: a request
    with a long deadline may find more requests in than one with a short deadline."""
    retry_after_s: int = Field(default=1, ge=0)
    """Retry-After seconds on 503 and 429 answers."""

    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    """Largest request body accepted (413 above)."""
    max_image_pixels: int = Field(default=16_000_000, ge=1)
    """Largest decoded image (width x height) accepted (413 above)."""
    max_images_per_request: int = Field(default=32, ge=1)
    """Most images in one JSON request (413 above)."""

    profile_repeats: int = Field(default=15, ge=1)
    """Timed runs per (variant, batch size) in the start-up latency profile."""
    profile_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    """Batch sizes profiled at start-up."""
    latency_profile_path: Path | None = None
    """JSON {variant_key: {batch_size: ms}} to use instead of measuring (deterministic tests)."""
    latency_learning: bool = True
    """Update latency estimates from observed runs (off: keep the profile as is)."""
    latency_idle_edges_ms: tuple[float, ...] = ()
    """Idle spans before a run (ms) whose runs the latency model learns apart (a run after
    idle is slower; tried: [1, 10, 100], docs/serving.md); empty: one correction for all."""

    _idle_edges = field_validator("latency_idle_edges_ms")(check_idle_edges)

    admin_token: SecretStr | None = None
    """Bearer token for POST /admin/reload; unset: the admin endpoint is off."""
    api_tokens: tuple[SecretStr, ...] = ()
    """Bearer tokens accepted on inference endpoints; empty: no authentication."""
    api_tokens_file: Path | None = None
    """File with one inference token per line (added to api_tokens)."""
    rate_limit_per_s: float | None = Field(default=None, gt=0)
    """Per-client request rate (token bucket, burst = 2 s worth); None: unlimited."""
    cors_origins: tuple[str, ...] = ()
    """Origins allowed by CORS; empty: CORS off."""
    shutdown_grace_s: float = Field(default=20.0, ge=0)
    """On SIGTERM, how long in-flight requests and streams may take to finish."""
    log_json: bool = True
    """Structured JSON access logs (off: uvicorn's plain lines)."""
    log_level: str = "info"
    """Logging level."""
