#!/usr/bin/env bash
# Installs cargo-lambda into the project venv (.venv/bin/cargo-lambda), from tools/requirements-lambda.txt.
# Idempotent: a stamp holding the requirements' hash makes a second run a no-op. After it,
# `PATH="$PWD/.venv/bin:$PATH" cargo lambda watch` works (see README, "cargo lambda").
# Kept apart from scripts/venv.sh: the tests do not need cargo-lambda, so CI does not pay for it.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/venv.sh"
venv="$root/.venv"
req="$root/tools/requirements-lambda.txt"
stamp="$venv/.requirements-lambda.sha256"
want=$(sha256sum "$req" | cut -d' ' -f1)
if [ -x "$venv/bin/cargo-lambda" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "lambda-tools: installing tools/requirements-lambda.txt into .venv (once; later runs reuse it)" >&2
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req" >&2
echo "$want" > "$stamp"
