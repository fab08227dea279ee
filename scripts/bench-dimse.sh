#!/usr/bin/env bash
# DIMSE benchmark: association + C-ECHO + release, and a 100-match study C-FIND, through the
# gateway and straight to Orthanc in the same run. A measurement, not a test: it asserts only
# that both sides returned the same results. Results: bench-results/dimse.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
cargo build --release --locked --bin pacsgate --example dimse_bench
.venv/bin/python scripts/bench_dimse.py
