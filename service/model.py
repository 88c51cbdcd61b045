"""A loaded bundle: one onnxruntime session per variant, checked, warmed up and profiled.

Loading is blocking work (run it in a thread); the result is immutable once built, so a
reload builds a new `LoadedModel` beside the old one and swaps the reference.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.bundle import BundleError, Manifest, Variant, load_bundle, variant_key
from service.latency import LatencyModel
from service.runtime import (
    SessionConfig,
    choose_providers,
    create_session,
    default_intra_op_threads,
    gpu_visible,
    measure_latency_ms,
    run_probabilities,
)
from service.scheduling import Candidate
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass(eq=False)
class VariantRuntime:
    spec: Variant
    session: object
    latency: LatencyModel
    classes: tuple[str, ...]
    key: str = field(init=False)
    labels: tuple[str, str, str] = field(init=False)
    """Its metrics labels: column, precision, views (built once: every run and every
    queue change is counted under them)."""

    def __post_init__(self) -> None:
        self.key = self.spec.key
        self.labels = str(self.spec.column), self.spec.precision, str(self.spec.views)

    @property
    def column(self) -> int:
        return self.spec.column

    @property
    def precision(self) -> str:
        return self.spec.precision

    @property
    def views(self) -> int:
        return self.spec.views

    @property
    def candidate(self) -> Candidate:
        s = self.spec
        return Candidate(self.key, s.column, s.precision, s.accuracy, s.views)

    def run(self, images: np.ndarray) -> np.ndarray:
        return run_probabilities(self.session, images)

    def predict_ms(self, n: int, idle_ms: float = 0.0) -> float:
        return self.latency.predict_ms(n, idle_ms)

    def observe(self, n: int, ms: float, idle_ms: float = 0.0) -> None:
        self.latency.observe(n, ms, idle_ms)


@dataclass(frozen=True, eq=False)
class LoadedModel:
    root: Path
    manifest: Manifest
    variants: dict[str, VariantRuntime]
    providers: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.manifest.name

    def fp32(self, column: int) -> VariantRuntime:
        """The column's single-view fp32 variant (every bundle has one)."""
        return self.variants[variant_key(column)]

    def find(self, column: int, precision: str = "fp32", views: int = 1) -> VariantRuntime | None:
        return self.variants.get(variant_key(column, precision, views))

    @property
    def columns(self) -> int:
        return self.manifest.columns


def read_fixed_profile(path: Path) -> dict[str, dict[int, float]]:
    """{variant key: {batch size: ms}} from a JSON file."""
    try:
        raw = json.loads(path.read_text())
        return {key: {int(n): float(ms) for n, ms in sizes.items()} for key, sizes in raw.items()}
    except (OSError, ValueError, AttributeError) as exc:
        raise BundleError(f"latency profile {path}: {exc}") from exc


def load_model(path: Path, settings: Settings) -> LoadedModel:
    """Load, verify (hashes, a test inference), warm up and profile every variant."""
    manifest = load_bundle(path)
    import onnxruntime as ort

    providers = tuple(
        choose_providers(settings.providers, ort.get_available_providers(), gpu_visible())
    )
    if settings.providers != "cpu" and providers == ("CPUExecutionProvider",):
        log.info("execution providers: CPU only (no CUDA provider or no GPU visible)")
    threads = settings.intra_op_threads or default_intra_op_threads()
    config = SessionConfig(intra_op_threads=threads, providers=providers)
    fixed = (
        read_fixed_profile(settings.latency_profile_path) if settings.latency_profile_path else None
    )
    h, w = manifest.input.height, manifest.input.width
    probe = np.random.default_rng(0).integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    variants: dict[str, VariantRuntime] = {}
    used: tuple[str, ...] = providers
    for spec in manifest.variants:
        if spec.views > 1 and not settings.two_views:
            continue  # twice the start-up profiling, for variants that would not serve
        try:
            session = create_session(path / spec.file, config)
            probs = run_probabilities(session, probe)
        except Exception as exc:  # onnxruntime raises its own types for broken graphs
            raise BundleError(f"{spec.file}: failed to load or run: {exc}") from exc
        if probs.shape != (2, len(manifest.classes)) or not np.all(np.isfinite(probs)):
            raise BundleError(f"{spec.file}: test inference gave shape {probs.shape}")
        used = tuple(session.get_providers())  # type: ignore[attr-defined]
        if fixed is not None:
            if spec.key not in fixed:
                raise BundleError(f"latency profile has no entry for {spec.key}")
            profile = fixed[spec.key]
        else:
            profile = measure_latency_ms(
                session, h, w, settings.profile_batch_sizes, repeats=settings.profile_repeats
            )
        variants[spec.key] = VariantRuntime(
            spec,
            session,
            LatencyModel(
                profile,
                learning=settings.latency_learning,
                idle_edges_ms=settings.latency_idle_edges_ms,
            ),
            manifest.classes,
        )
        log.info("loaded %s: %s ms by batch size", spec.key, profile)
    log.info(
        "model %s %s ready: %d variants, providers %s, %d threads",
        manifest.name,
        manifest.version,
        len(variants),
        used,
        threads,
    )
    return LoadedModel(path, manifest, variants, used)
