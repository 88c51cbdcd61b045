"""JSON shapes of answers (docs/api.md): shared by the JSON response and the SSE events."""

from __future__ import annotations

from typing import Any

import numpy as np

from service.engine import Answer, ColumnAnswer
from service.model import LoadedModel


def prediction(probs: np.ndarray, classes: tuple[str, ...], top: int = 5) -> dict[str, Any]:
    values: list[float] = probs.tolist()  # Python floats: cheaper to sort and encode
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))[:top]
    best = order[0]
    return {
        "class_index": best,
        "class_name": classes[best],
        "confidence": values[best],
        "top5": [
            {"class_index": i, "class_name": classes[i], "probability": values[i]} for i in order
        ],
    }


def column_event(answer: ColumnAnswer, deadline_ms: float | None) -> dict[str, Any]:
    v = answer.variant
    preds = [prediction(p, v.classes) for p in answer.probabilities]
    return {
        "column": v.column,
        "precision": v.precision,
        "views": v.views,
        "depth": v.spec.depth,
        "accuracy": v.spec.accuracy,
        **preds[0],
        "predictions": preds,
        "elapsed_ms": round(answer.elapsed_ms, 3),
        "queue_ms": round(answer.queue_ms, 3),
        "inference_ms": round(answer.inference_ms, 3),
        "deadline_ms": deadline_ms,
    }


def answer_body(answer: Answer, cascade_threshold: float | None = None) -> dict[str, Any]:
    model: LoadedModel = answer.model
    final = answer.final
    body = {
        "model": model.name,
        "model_version": model.manifest.version,
        **column_event(final, answer.deadline_ms),
        "columns": model.columns,
        "elapsed_ms": round(answer.elapsed_ms, 3),
        "deadline_met": answer.deadline_met,
    }
    if cascade_threshold is not None:
        body["cascade"] = {
            "threshold": cascade_threshold,
            "columns_run": answer.columns_run,
            "reason": answer.reason,
        }
    return body


def done_event(answer: Answer) -> dict[str, Any]:
    return {
        "final": column_event(answer.final, answer.deadline_ms),
        "reason": answer.reason,
        "columns_run": answer.columns_run,
        "elapsed_ms": round(answer.elapsed_ms, 3),
        "deadline_ms": answer.deadline_ms,
        "deadline_met": answer.deadline_met,
    }


def model_card(model: LoadedModel, queue_depth: dict[str, int], ready: bool) -> dict[str, Any]:
    m = model.manifest
    return {
        "name": m.name,
        "version": m.version,
        "description": m.description,
        "dataset": m.dataset,
        "classes": list(m.classes),
        "input": m.input.model_dump(),
        "columns": m.columns,
        "providers": list(model.providers),
        "ready": ready,
        "variants": [
            {
                "key": v.key,
                "column": v.column,
                "precision": v.precision,
                "views": v.views,
                "depth": v.spec.depth,
                "parameters": v.spec.parameters,
                "macs": v.spec.macs,
                "accuracy": v.spec.accuracy,
                "latency_ms": {str(k): ms for k, ms in v.latency.snapshot().items()},
                "latency_after_idle_ms": v.latency.idle_snapshot(),
                "manifest_latency_ms": (
                    {str(k): ms for k, ms in v.spec.latency.ms_by_batch.items()}
                    if v.spec.latency
                    else None
                ),
                "queue_depth": queue_depth.get(v.key, 0),
            }
            for v in model.variants.values()
        ],
    }
