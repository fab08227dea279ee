#!/usr/bin/env bash
# The whole test suite: formatting and lints, Rust unit tests, the integration tests that run
# the real gateway against Orthanc with pynetdicom and dcmtk as clients (the attack suite
# among them), the core of them again through two replicas behind HAProxy, the DICOMweb ones
# again answered by translation to DIMSE and in front of dcmqrscp, a short run of every
# fuzz target, and the strict reader checked against DCMTK.
# Installs what is missing first (scripts/setup.sh). Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh

# Free disk space, printed per stage: a linker that runs out of it dies of a bus error, which
# names no cause.
disk() { echo "== disk: $(df -Ph . | awk 'NR==2 {print $4}') free on $(df -P . | awk 'NR==2 {print $6}')"; }
disk
echo "== cargo fmt --check"
cargo fmt --all -- --check
(cd fuzz && cargo fmt -- --check)
echo "== cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "== cargo test"
cargo test --locked
echo "== integration tests (Orthanc, pynetdicom, dcmtk)"
cargo build --locked --bin pacsgate
PACSGATE_BIN="$PWD/target/debug/pacsgate" .venv/bin/python -m pytest tests/integration -q -p no:cacheprovider
echo "== two replicas behind HAProxy: the core DIMSE and DICOMweb tests again"
# Deselected: tests that read one process's own state (its metrics, its receiver's port).
PACSGATE_REPLICAS=2 PACSGATE_BIN="$PWD/target/debug/pacsgate" .venv/bin/python -m pytest \
  tests/integration/test_dimse_find.py tests/integration/test_dicomweb.py \
  tests/integration/test_dimse_store_get.py tests/integration/test_dimse_move.py -q -p no:cacheprovider \
  -k "not test_receiver_accepts_only_the_pacs and not refusal_is_audited and not metrics"
echo "== DICOMweb by translation to DIMSE: the DICOMweb tests again, Orthanc's DICOMweb plugin off"
# One relay-path test skips there, saying why (its fake PACS answers come from Orthanc's DICOMweb).
PACSGATE_DICOMWEB=translate PACSGATE_BIN="$PWD/target/debug/pacsgate" .venv/bin/python -m pytest \
  tests/integration/test_dicomweb.py tests/integration/test_attack_dicomweb.py \
  tests/integration/test_study_restrictions.py tests/integration/test_patient_mapping.py \
  tests/integration/test_federation.py tests/integration/test_attack_retrieve.py \
  tests/integration/test_audit.py tests/integration/test_fhir.py tests/integration/test_exchange.py -q -p no:cacheprovider
echo "== in front of dcmqrscp: the DICOMweb tests (by translation) and the core DIMSE tests again"
PACSGATE_PACS=dcmqrscp PACSGATE_BIN="$PWD/target/debug/pacsgate" .venv/bin/python -m pytest \
  tests/integration/test_dicomweb.py tests/integration/test_dimse_find.py \
  tests/integration/test_dimse_store_get.py tests/integration/test_dimse_move.py \
  tests/integration/test_dimse_association.py tests/integration/test_fhir.py tests/integration/test_exchange.py -q -p no:cacheprovider
echo "== in front of dcmqrscp with its identifier checks on (the hierarchical query model): the DICOMweb tests;"
echo "== then without C-GET (served by C-MOVE to the gateway's receiver): the DICOMweb and C-GET tests"
PACSGATE_PACS=dcmqrscp-strict PACSGATE_BIN="$PWD/target/debug/pacsgate" .venv/bin/python -m pytest \
  tests/integration/test_dicomweb.py -q -p no:cacheprovider
PACSGATE_PACS=dcmqrscp-noget PACSGATE_BIN="$PWD/target/debug/pacsgate" .venv/bin/python -m pytest \
  tests/integration/test_dicomweb.py tests/integration/test_dimse_store_get.py -q -p no:cacheprovider
disk
# The fuzz targets build apart (fuzz/target, instrumented release). Where space is short the
# debug build's incremental caches, which nothing after this needs, make room.
if [ "$(df -Pk . | awk 'NR==2 {print $4}')" -lt $((6 * 1024 * 1024)) ] && [ -d target/debug/incremental ]; then
  echo "== less than 6 GiB free: removing target/debug/incremental"
  rm -rf target/debug/incremental
  disk
fi
echo "== fuzz targets, a short run each (scripts/fuzz.sh)"
scripts/fuzz.sh 5
echo "== the strict reader against DCMTK's reading (scripts/differential.py)"
.venv/bin/python scripts/differential.py
