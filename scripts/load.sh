#!/usr/bin/env bash
# Load and abuse (issue: what the gateway holds): 500 associations and 1,000 HTTP requests at
# once with valid tokens, over plaintext and TLS, alone and with a flood of invalid tokens,
# byte-a-time handshakes and silent connections mixed in; /healthz latency and the gateway's
# peak memory throughout. A measurement, bounded in count and time (a few minutes), not a test.
# Results: bench-results/load.md. Environment: LOAD_ASSOC, LOAD_REQUESTS (see scripts/load.py);
# PACSGATE_BIN to measure another gateway binary.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
if [ -n "${PACSGATE_BIN:-}" ]; then
  cargo build --release --locked --example load --example bench_origin_dimse --example bench_origin_web
else
  cargo build --release --locked --bin pacsgate --example load --example bench_origin_dimse --example bench_origin_web
fi
# Each association holds two descriptors and each HTTP connection one: room for all of them.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
.venv/bin/python scripts/load.py
