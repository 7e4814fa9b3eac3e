#!/usr/bin/env bash
# Creates or refreshes a project-local Python venv from a pinned requirements file.
#   scripts/venv.sh                                            .venv from tools/requirements.txt
#   scripts/venv.sh tools/requirements-build.txt .venv-build   the sam build tools (slow, big)
# Idempotent: a stamp holding the requirements' hash makes a second run a no-op.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
req="$root/${1:-tools/requirements.txt}"
venv="$root/${2:-.venv}"
stamp="$venv/.requirements.sha256"
want=$(sha256sum "$req" | cut -d' ' -f1)
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
python=${PYTHON:-python3}
command -v "$python" >/dev/null || { echo "venv: $python not found; install Python 3.10+ first" >&2; exit 1; }
echo "venv: installing ${req#"$root"/} into ${venv#"$root"/} (once; later runs reuse it)" >&2
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req" >&2
echo "$want" > "$stamp"
