#!/usr/bin/env bash
# Installs what pacsgate's demo, tests and benchmarks need on a Debian machine, and nothing
# that is already there: Debian packages (Orthanc with its DICOMweb plugin, dcmtk, python venv
# support, chromium), a Python virtual environment in .venv with the pinned test clients, OHIF's
# prebuilt viewer in .cache/ and the browser test driver in tests/browser/node_modules.
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
# The browser tests: Debian's chromium (with fonts for its pages) driven by puppeteer-core on
# the machine's Node.js; installed without recommends (a browser's pull in a desktop).
browser=()
[ -x /usr/bin/chromium ] || browser+=(chromium)
[ -d /usr/share/fonts/truetype/dejavu ] || browser+=(fonts-dejavu-core)
[ -d /usr/share/fonts/truetype/liberation ] || browser+=(fonts-liberation)
command -v npm >/dev/null 2>&1 || browser+=(npm)
if [ ${#need[@]} -gt 0 ] || [ ${#browser[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need[*]} ${browser[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  # The orthanc package may try to start a system service: that is refused or harmless; tests
  # run their own Orthanc on free ports.
  if [ ${#need[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  if [ ${#browser[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${browser[@]}" >/dev/null
  fi
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

# OHIF, the browser viewer of the browser tests and the demo: the prebuilt site its npm package
# ships (dist/), pinned, fetched once into .cache/ (npm checks the registry's integrity hash).
ohif_version=3.13.2
ohif=.cache/ohif-$ohif_version
if [ ! -f "$ohif/dist/index.html" ]; then
  echo "setup: fetching OHIF $ohif_version (npm @ohif/app, about 50 MB)"
  rm -rf "$ohif.part" && mkdir -p "$ohif.part"
  (cd "$ohif.part" && npm pack --silent "@ohif/app@$ohif_version" >/dev/null \
    && tar xzf "ohif-app-$ohif_version.tgz" && mv package/dist dist && rm -rf package ./*.tgz)
  rm -rf "$ohif" && mv "$ohif.part" "$ohif"
fi
# puppeteer-core as tests/browser/package-lock.json pins it (it downloads no browser).
if ! cmp -s tests/browser/package-lock.json tests/browser/node_modules/.pacsgate-lock; then
  echo "setup: installing the browser test driver (npm ci in tests/browser)"
  (cd tests/browser && npm ci --silent --no-audit --no-fund)
  cp tests/browser/package-lock.json tests/browser/node_modules/.pacsgate-lock
fi

# The TLS tests put nginx in front of Orthanc's DICOMweb (as a hospital's TLS terminator would
# be); its system service is kept from starting.
bash scripts/bench-install.sh nginx haproxy
