#!/usr/bin/env bash
# TLS cost: pacsgate's HTTPS against nginx terminating TLS, and its DICOM TLS against stunnel
# terminating TLS, in front of the same origins, with the plaintext origin as the reference, in
# one run. A measurement, not a test. Results: bench-results/tls.md.
# Environment: BENCH_ROUNDS, BENCH_INSTANCES, BENCH_MIB, BENCH_CONNECT (scripts/bench_tls.py);
# PACSGATE_BIN to measure another gateway binary.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
scripts/bench-install.sh nginx stunnel4
if [ -n "${PACSGATE_BIN:-}" ]; then
  cargo build --release --locked --example dimse_bench --example bench_origin_dimse --example bench_origin_web
else
  cargo build --release --locked --bin pacsgate --example dimse_bench --example bench_origin_dimse --example bench_origin_web
fi
.venv/bin/python scripts/bench_tls.py
