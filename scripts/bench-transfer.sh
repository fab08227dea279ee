#!/usr/bin/env bash
# Transfer benchmark: C-STORE and C-GET of a 500 MiB study straight to the PACS, through a
# plain TCP relay and through the gateway, in one run; against Orthanc and against the
# project's fast origin (examples/bench_origin_dimse.rs), with the gateways' peak memory. The
# relay is haproxy in TCP mode rather than socat: socat forks a process per connection and
# copies through small buffers by default; haproxy is event-driven, as the gateway is.
# A measurement, not a test: it fails only if a gateway's peak memory reaches 100 MiB or an
# instance is missing on a side. Needs about 3.5 GB of free disk (three studies, and Orthanc's
# copy of them). Results: bench-results/transfer.md (and transfer.json).
# Environment: BENCH_INSTANCES and BENCH_MIB change the study's size, BENCH_ROUNDS the C-GET
# rounds (see scripts/bench_transfer.py); PACSGATE_BIN to measure another gateway binary (then
# the gateway is not built here).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
scripts/bench-install.sh haproxy
if [ -n "${PACSGATE_BIN:-}" ]; then
  cargo build --release --locked --example dimse_bench --example bench_origin_dimse
else
  cargo build --release --locked --bin pacsgate --example dimse_bench --example bench_origin_dimse
fi
.venv/bin/python scripts/bench_transfer.py
