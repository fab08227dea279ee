#!/usr/bin/env bash
# DICOMweb benchmark: WADO-RS of a 500 MiB study, QIDO-RS and instance metadata, straight to
# the PACS's DICOMweb service, through nginx as a plain reverse proxy (no authentication,
# proxy_buffering off, HTTP/1.1 keep-alive upstream) and through the gateway, in one run;
# against Orthanc and against the project's fast origin (examples/bench_origin_web.rs, with
# examples/bench_origin_dimse.rs answering the gateway's look-ups), with the gateways' peak
# memory. A measurement, not a test: it fails only if a gateway's peak memory reaches 100 MiB
# or a side returns other instances or matches. Needs about 1.5 GB of free disk.
# Results: bench-results/dicomweb.md.
# Environment: BENCH_INSTANCES, BENCH_MIB, BENCH_ROUNDS, BENCH_QIDO (see
# scripts/bench_dicomweb.py); PACSGATE_BIN to measure another gateway binary (then the gateway
# is not built here).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
scripts/bench-install.sh nginx
if [ -n "${PACSGATE_BIN:-}" ]; then
  cargo build --release --locked --example bench_origin_dimse --example bench_origin_web
else
  cargo build --release --locked --bin pacsgate --example bench_origin_dimse --example bench_origin_web
fi
.venv/bin/python scripts/bench_dicomweb.py
