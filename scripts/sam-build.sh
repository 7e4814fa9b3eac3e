#!/usr/bin/env bash
# Builds the Lambda artifacts with `sam build` (cargo lambda, release, arm64 via zig), e.g.
#   scripts/sam-build.sh                  # every function
#   scripts/sam-build.sh JoinerFunction   # one function
# Extra arguments go to `sam build`. Installs what it needs, idempotently: the sam/cargo-lambda/
# zig venv (.venv-build) and the Rust std for aarch64-unknown-linux-gnu. Too slow for CI; the
# test command checks the template instead (scripts/check-template.sh). No Docker is needed:
# cargo lambda cross-compiles on the host.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/venv.sh tools/requirements-build.txt .venv-build

if ! rustup target list --installed | grep -qx aarch64-unknown-linux-gnu; then
  echo "sam-build: adding the aarch64-unknown-linux-gnu Rust target (once)" >&2
  rustup target add aarch64-unknown-linux-gnu
fi

# sam finds cargo-lambda on the PATH, and cargo lambda finds zig as `python3 -m ziglang`, so
# the venv's bin directory goes first.
export PATH="$PWD/.venv-build/bin:$PATH"
# One target directory for every function, the workspace's (absolute: a relative one is resolved
# against each function's CodeUri, and sam's Rust builder sets the relative `target` when the
# variable is unset, so each function would compile the whole dependency tree on its own).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
# sam reports usage to its maintainers unless told not to; this machine has no business doing so.
export SAM_CLI_TELEMETRY=0
exec sam build "$@"
