"""deploy/compose.yaml: the server, Prometheus and Grafana wired to this repository's files.

No container engine runs it here (Docker Compose is not available); these checks catch
what `docker compose up` would trip on: missing files, mismatched paths, names and ports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return loaded


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path, for the service's bind mounts (relative to deploy/)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = (DEPLOY / source).resolve()
    return mounts


def published_ports(service: dict[str, Any]) -> dict[int, str]:
    """Container port -> host address, for `HOST:PORT:CONTAINER_PORT` entries."""
    ports = {}
    for entry in service["ports"]:
        host, _, container = str(entry).rpartition(":")
        ports[int(container)] = host
    return ports


def test_services() -> None:
    assert set(compose()["services"]) == {"fractal", "prometheus", "grafana"}


def test_server_builds_the_repository_image() -> None:
    server = compose()["services"]["fractal"]
    context = (DEPLOY / server["build"]["context"]).resolve()
    assert context == REPO
    assert (context / server["build"]["dockerfile"]).is_file()
    assert published_ports(server) == {8000: "127.0.0.1:8000"}
    test = server["healthcheck"]["test"]
    assert test[0] == "CMD" and any("/v2/health/ready" in part for part in test)
    assert server["healthcheck"]["start_period"], "start-up profiles every column first"
    assert server["read_only"] is True and "/tmp" in server["tmpfs"]


def test_every_bind_mount_exists_and_named_volumes_are_declared() -> None:
    declared = set(compose().get("volumes") or {})
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"


def test_prometheus_loads_the_project_config_and_rules() -> None:
    prometheus = compose()["services"]["prometheus"]
    mounts = bind_mounts(prometheus)
    flags = dict(arg.split("=", 1) for arg in prometheus["command"])
    config_path = flags["--config.file"]
    assert mounts[config_path] == DEPLOY / "prometheus" / "prometheus.yml"
    config = yaml.safe_load(mounts[config_path].read_text())
    for rule_file in config["rule_files"]:
        in_container = str(Path(config_path).parent / rule_file)
        assert mounts[in_container] == DEPLOY / "prometheus" / rule_file
    (target,) = config["scrape_configs"][0]["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in compose()["services"], "scrape target is a Compose service"
    assert int(port) in published_ports(compose()["services"][host])


def test_grafana_gets_the_provisioning_and_dashboard() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = bind_mounts(grafana)
    provisioning = DEPLOY / "grafana" / "provisioning"
    assert mounts["/etc/grafana/provisioning/datasources"] == provisioning / "datasources"
    assert mounts["/etc/grafana/provisioning/dashboards"] == provisioning / "dashboards"
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert (mounts[str(home.parent)] / home.name).is_file()
    assert grafana["depends_on"]["prometheus"]


def test_images_are_pinned() -> None:
    for name, service in compose()["services"].items():
        if "build" in service:
            continue
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: {image}"
