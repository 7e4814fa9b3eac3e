#!/usr/bin/env bash
# The fault-injection suite at a larger size than CI runs it (tests/tests/faults.rs):
#   scripts/faults.sh            # 5,000 impressions a scenario
#   scripts/faults.sh 20000      # or as many as given
# Every scenario drives both functions through the local event source mapping runner with
# AWS requests going through tools/fault_proxy.py, then checks the lake against a reference join.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/venv.sh
export ADPIPE_FAULT_IMPRESSIONS="${1:-5000}"
exec cargo test --workspace --test faults -- --test-threads 1 --nocapture
