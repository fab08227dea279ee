#!/usr/bin/env bash
# Transfer benchmark: C-STORE and C-GET of a 500 MiB study through the gateway and straight to
# Orthanc in one run, with the gateway's peak memory. A measurement, not a test (it fails only
# if the peak memory exceeds 100 MiB or an instance is missing). Needs about 2.5 GB of free disk.
# Results: bench-results/transfer.md. BENCH_INSTANCES and BENCH_MIB change the study's size.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
cargo build --release --locked --bin pacsgate --example dimse_bench
.venv/bin/python scripts/bench_transfer.py
