#!/usr/bin/env bash
# DIMSE benchmark: association + C-ECHO + release, and a 100-match study C-FIND, straight to
# the PACS, through a plain TCP relay and through the gateway, in the same run; against Orthanc
# and against the project's fast origin (examples/bench_origin_dimse.rs), so the gateway's own
# cost shows without Orthanc's. The relay is haproxy in TCP mode rather than socat: socat forks
# a process per connection, which would weigh on the association figures for a reason no
# deployed relay has; haproxy is event-driven, as the gateway is.
# A measurement, not a test: it fails only if a side does not return the same matches (or a
# server does not start). Results: bench-results/dimse.md (and dimse.json).
# Environment: BENCH_ROUNDS, BENCH_ASSOC, BENCH_FIND (see scripts/bench_dimse.py); PACSGATE_BIN
# to measure another gateway binary (then the gateway is not built here).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
scripts/bench-install.sh haproxy
if [ -n "${PACSGATE_BIN:-}" ]; then
  cargo build --release --locked --example dimse_bench --example bench_origin_dimse
else
  cargo build --release --locked --bin pacsgate --example dimse_bench --example bench_origin_dimse
fi
.venv/bin/python scripts/bench_dimse.py
