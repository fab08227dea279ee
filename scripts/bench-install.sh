#!/usr/bin/env bash
# Installs the plain relays the benchmarks compare the gateway with (and the TLS tests use),
# and only those missing:
# each argument is a Debian package whose command has the same name (nginx, haproxy, socat).
# Debian's packages start their system service on install; the benchmarks run their own
# relays on loopback, so a policy-rc.d that refuses service starts is in place during the
# install (the one already there, or a temporary one removed afterwards).
# Usage: scripts/bench-install.sh nginx haproxy   (called by the scripts/bench-*.sh)
# Fails when apt-get fails.
set -euo pipefail

need=()
for p in "$@"; do
  command -v "$p" >/dev/null 2>&1 || [ -x "/usr/sbin/$p" ] || need+=("$p")
done
[ ${#need[@]} -eq 0 ] && exit 0

echo "bench: installing Debian packages: ${need[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
policy=/usr/sbin/policy-rc.d
made_policy=""
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
  $sudo chmod 755 "$policy"
  made_policy=1
fi
cleanup() { [ -z "$made_policy" ] || $sudo rm -f "$policy"; }
trap cleanup EXIT
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
