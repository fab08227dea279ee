#!/usr/bin/env bash
# DICOMweb benchmark: WADO-RS of a 500 MiB study and QIDO-RS, through the gateway and straight to
# Orthanc in one run, with the gateway's peak memory (fails above 100 MiB). A measurement, not a
# test. Needs about 1.5 GB of free disk. Results: bench-results/dicomweb.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
cargo build --release --locked --bin pacsgate
.venv/bin/python scripts/bench_dicomweb.py
