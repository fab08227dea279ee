#!/usr/bin/env bash
# The whole test suite: formatting and lints, Rust unit tests, and the integration tests that
# run the real gateway against Orthanc with pynetdicom and dcmtk as clients. Installs what is
# missing first (scripts/setup.sh). Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "== cargo test"
cargo test --locked
echo "== integration tests (Orthanc, pynetdicom, dcmtk)"
cargo build --locked --bin pacsgate
PACSGATE_BIN="$PWD/target/debug/pacsgate" .venv/bin/python -m pytest tests/integration -q -p no:cacheprovider
