#!/usr/bin/env bash
# Installs what pacsgate's demo, tests and benchmarks need on a Debian machine, and nothing
# that is already there: Debian packages (Orthanc with its DICOMweb plugin, dcmtk, python venv
# support) and a Python virtual environment in .venv with the pinned test clients.
# Usage: scripts/setup.sh   (sourced by scripts/test.sh and scripts/demo.sh)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

need=()
command -v Orthanc >/dev/null 2>&1 || need+=(orthanc)
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
[ -x /usr/bin/findscu ] && [ -x /usr/bin/storescu ] || need+=(dcmtk)
command -v curl >/dev/null 2>&1 || need+=(curl)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
# The package: built with dpkg-deb under fakeroot, its libraries named by dpkg-shlibdeps, its
# unit checked by systemd-analyze.
command -v fakeroot >/dev/null 2>&1 || need+=(fakeroot)
command -v dpkg-shlibdeps >/dev/null 2>&1 || need+=(dpkg-dev)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v file >/dev/null 2>&1 || need+=(file)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  # The orthanc package may try to start a system service: that is refused or harmless; tests
  # run their own Orthanc on free ports.
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is missing; install Rust (rustup) first" >&2
  exit 1
fi

stamp=.venv/.requirements
if [ ! -x .venv/bin/python ] || ! cmp -s tests/requirements.txt "$stamp"; then
  echo "setup: creating .venv with the test clients"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r tests/requirements.txt
  cp tests/requirements.txt "$stamp"
fi

# The TLS tests put nginx in front of Orthanc's DICOMweb (as a hospital's TLS terminator would
# be); its system service is kept from starting.
bash scripts/bench-install.sh nginx haproxy
