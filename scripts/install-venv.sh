#!/usr/bin/env bash
# Create or update .venv with the given extras: scripts/install-venv.sh cpu,train,dev
# torch is installed first, pinned (TORCH_SPEC, default torch==2.13.0): an unpinned
# torch resolves to a multi-GB CUDA build where a CPU wheel was meant. On a GPU host,
# PyPI's torch==2.13.0 is the CUDA build, which is what such a host wants.
set -euo pipefail

extras="${1:-cpu}"
venv="${VENV:-.venv}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3
stamp="$venv/.installed-$(echo "$extras" | tr ',' '-')"

if [[ ! -x "$venv/bin/python" ]]; then
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
fi
# Reinstall only when the project metadata changed since the last install of these extras.
if [[ -f "$stamp" && "$stamp" -nt pyproject.toml && "$stamp" -nt constraints.txt ]]; then
  exit 0
fi
pip=("$venv/bin/pip" install -q -c constraints.txt)
if [[ ",$extras," == *",train,"* ]]; then
  "${pip[@]}" "${TORCH_SPEC:-torch==2.13.0}"
fi
"${pip[@]}" -e ".[$extras]"
touch "$stamp"
