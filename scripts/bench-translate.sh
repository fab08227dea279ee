#!/usr/bin/env bash
# DICOMweb by translation benchmark: QIDO-RS, WADO-RS of a 500 MiB study, frames one per
# request, STOW-RS, against Orthanc's DICOMweb plugin directly, through the gateway relaying to
# it, and through the gateway answering by translation to Orthanc's DIMSE, in one run, with the
# gateways' peak memory. A measurement, not a test: it fails only if a gateway's peak memory
# reaches 100 MiB or a side returns other data. Needs about 1 GB of free disk.
# Results: bench-results/translate.md.
# Environment: BENCH_INSTANCES, BENCH_MIB, BENCH_ROUNDS, BENCH_QIDO, BENCH_FRAMES, BENCH_STOW
# (see scripts/bench_translate.py); PACSGATE_BIN to measure another gateway binary.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
if [ -z "${PACSGATE_BIN:-}" ]; then
  cargo build --release --locked --bin pacsgate
fi
.venv/bin/python scripts/bench_translate.py
