#!/usr/bin/env bash
# README command 1: the whole pipeline on this machine, without an AWS account or Docker.
# Installs the Python tools into .venv (moto_server, pyiceberg, DuckDB), builds the workspace,
# then runs `adpipe demo`: a local AWS endpoint, the streams, tables and buckets, seeded
# traffic, both functions driven by a Kinesis event source mapping runner until the streams
# are drained, the named queries, a CTR chart and a Parquet export of the lake.
# Idempotent: a second run reuses .venv and target/. Arguments go to `adpipe demo`
# (e.g. --impressions 100000; see `adpipe demo --help`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n== %s\n' "$*" >&2; }

step "Python tools (.venv)"
bash scripts/venv.sh

# The same targets and features as scripts/test.sh's `cargo test --workspace`, so a test run
# after this one (or this one after a test run) compiles nothing again.
step "cargo build (the first build compiles the whole workspace and takes a while)"
cargo build --workspace --all-targets --locked

target_dir=$(cargo metadata --format-version 1 --no-deps --locked |
  .venv/bin/python -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
exec "$target_dir/debug/adpipe" demo "$@"
