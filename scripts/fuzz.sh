#!/usr/bin/env bash
# Builds the fuzz targets in fuzz/ with libFuzzer (stable Rust, no cargo-fuzz) and runs them.
#
#   scripts/fuzz.sh SECONDS [TARGET...]     run each target (all when none named) for SECONDS
#   scripts/fuzz.sh build                   only build
#   scripts/fuzz.sh list                    list the targets
#
# Needs only the Rust toolchain and a C++ compiler (libfuzzer-sys compiles libFuzzer; g++ or
# clang++ from Debian's build-essential). Each target runs on a scratch copy of its committed
# corpus (fuzz/corpus/<target>/), so runs never grow what is committed; crashes land in
# fuzz/artifacts/<target>/ and the run fails (exit 1). Targets run one at a time.
#
# Environment: FUZZ_KEEP=DIR keeps the grown corpora in DIR/<target>/; FUZZ_RSS_MB (default
# 2048); FUZZ_NICE (default 10); FUZZ_EXTRA (more libFuzzer flags, e.g. -dict=...).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
fuzz="$root/fuzz"
targets_all=(strict_reader command_decode association_rq pdata_reassembly dicomweb_path
  multipart_delimiter multipart_parts smart_scope jwt_preflight)

max_len_of() {
  case "$1" in
    strict_reader | pdata_reassembly) echo 16384 ;;
    association_rq) echo 8192 ;;
    *) echo 4096 ;;
  esac
}

usage() {
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

[ $# -ge 1 ] || usage
mode=$1
shift
case "$mode" in
  list) printf '%s\n' "${targets_all[@]}"; exit 0 ;;
  build) ;;
  '' | *[!0-9]*) usage ;;
esac
if [ $# -gt 0 ]; then targets=("$@"); else targets=("${targets_all[@]}"); fi
for t in "${targets[@]}"; do
  [ -f "$fuzz/fuzz_targets/$t.rs" ] || { echo "unknown target: $t" >&2; exit 2; }
done

command -v cargo >/dev/null || { echo "fuzz.sh: cargo is needed (the Rust toolchain)" >&2; exit 1; }
if ! command -v c++ >/dev/null && ! command -v g++ >/dev/null && ! command -v clang++ >/dev/null; then
  echo "fuzz.sh: a C++ compiler is needed to build libFuzzer (Debian: apt-get install g++)" >&2
  exit 1
fi

host=$(rustc -vV | sed -n 's/^host: //p')
nice_n=${FUZZ_NICE:-10}
# The sanitizer-coverage instrumentation cargo-fuzz uses, as stable codegen options. The
# explicit --target keeps RUSTFLAGS off build scripts and proc macros (which would not link
# without libFuzzer).
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing"
export CARGO_TARGET_DIR="$fuzz/target"

bin_args=()
for t in "${targets[@]}"; do bin_args+=(--bin "$t"); done
t0=$(date +%s)
echo "== building ${#targets[@]} target(s) for $host (release, instrumented)"
# fuzz/Cargo.lock pins what the main crate's Cargo.lock pins, plus libfuzzer-sys. When the main
# crate has gained a dependency since, cargo adds it (and the lock file changes: commit it).
if ! cargo metadata --locked --format-version 1 --manifest-path "$fuzz/Cargo.toml" >/dev/null 2>&1; then
  echo "fuzz.sh: fuzz/Cargo.lock is stale against the main crate; cargo will update it" >&2
  locked=()
else
  locked=(--locked)
fi
nice -n "$nice_n" cargo build "${locked[@]}" --release --manifest-path "$fuzz/Cargo.toml" \
  --target "$host" "${bin_args[@]}"
echo "== build: $(( $(date +%s) - t0 )) s"
[ "$mode" = build ] && exit 0

secs=$mode
bindir="$fuzz/target/$host/release"
scratch=$(mktemp -d "${TMPDIR:-/tmp}/pacsgate-fuzz.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
failed=()
summary=()
for t in "${targets[@]}"; do
  work="$scratch/$t"
  mkdir -p "$work" "$fuzz/artifacts/$t"
  if [ -d "$fuzz/corpus/$t" ]; then cp -r "$fuzz/corpus/$t/." "$work/"; fi
  log="$scratch/$t.log"
  echo "== $t: ${secs}s"
  set +e
  # shellcheck disable=SC2086
  nice -n "$nice_n" "$bindir/$t" "$work" \
    -max_total_time="$secs" -max_len="$(max_len_of "$t")" -rss_limit_mb="${FUZZ_RSS_MB:-2048}" \
    -timeout=10 -print_final_stats=1 -artifact_prefix="$fuzz/artifacts/$t/" \
    ${FUZZ_EXTRA:-} >"$log" 2>&1
  rc=$?
  set -e
  last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  cov=$(echo "$last" | sed -n 's/.*cov: \([0-9]*\).*/\1/p')
  ft=$(echo "$last" | sed -n 's/.*ft: \([0-9]*\).*/\1/p')
  corp=$(echo "$last" | sed -n 's/.*corp: \([0-9]*\/[0-9A-Za-z]*\).*/\1/p')
  line=$(printf '%-20s runs %-10s cov %-6s ft %-7s corpus %-10s' "$t" "${runs:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}")
  if [ $rc -ne 0 ]; then
    failed+=("$t")
    line="$line CRASH (exit $rc)"
    echo "---- $t failed; the end of its log:"
    grep -v -E '^#[0-9]+' "$log" | tail -40
    ls -1 "$fuzz/artifacts/$t/" | sed 's/^/     artifact: fuzz\/artifacts\/'"$t"'\//'
  else
    line="$line ok"
  fi
  echo "$line"
  summary+=("$line")
  if [ -n "${FUZZ_KEEP:-}" ]; then mkdir -p "$FUZZ_KEEP/$t" && cp -r "$work/." "$FUZZ_KEEP/$t/"; fi
done
echo "== summary (${secs}s per target, total $(( $(date +%s) - t0 )) s)"
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]}" >&2
  exit 1
fi
