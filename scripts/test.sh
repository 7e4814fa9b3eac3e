#!/usr/bin/env bash
# Runs every test: the SAM template checks, format and lint checks, unit and property tests,
# and the integration tests against the local AWS-compatible endpoint (moto_server, installed
# into .venv on first use and started by the tests themselves on a free loopback port).
# Idempotent; a second run reuses .venv and target/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n== %s\n' "$*" >&2; }

step "Python tools (.venv)"
bash scripts/venv.sh

step "SAM template (named queries, cfn-lint, SAM transform, template tests)"
bash scripts/check-template.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo test (unit, property, integration against the local endpoint)"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
# --no-fail-fast: every test binary runs even after one fails, so one red test hides no other;
# the exit status is still non-zero.
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run: cargo's own last line is that of its last test binary.
passed=$(grep -Eo 'test result: [A-Za-z]+\. [0-9]+ passed' "$log" | awk '{s += $4} END {print s + 0}')
failed=$(grep -Eo 'passed; [0-9]+ failed' "$log" | awk '{s += $2} END {print s + 0}')
echo "tests: ${passed} passed, ${failed} failed"
exit "$status"
