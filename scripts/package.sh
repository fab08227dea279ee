#!/usr/bin/env bash
# Builds the Debian package of pacsgate from this repository: the binary, a commented
# configuration as /etc/pacsgate/pacsgate.toml (a conffile: upgrades keep local changes), the
# system user (systemd-sysusers), a sandboxed systemd unit, and the README and conformance
# statement under /usr/share/doc/pacsgate. Needs only dpkg-deb and fakeroot (Debian's own).
# Usage: scripts/package.sh [--debug] [OUTDIR]
#   --debug   package the debug build (quicker; what the test command checks), not the release one
# Prints the path of the .deb it wrote (default OUTDIR: target/debian).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
profile=release
if [ "${1:-}" = "--debug" ]; then
  profile=debug
  shift
fi
out=${1:-target/debian}

if [ "$profile" = release ]; then
  cargo build --release --locked --bin pacsgate >&2
else
  cargo build --locked --bin pacsgate >&2
fi
bin=target/$profile/pacsgate
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/pacsgate_${version}_$arch
install -d "$root/DEBIAN" "$root/usr/bin" "$root/etc/pacsgate" "$root/lib/systemd/system" \
  "$root/usr/lib/sysusers.d" "$root/usr/share/doc/pacsgate" "$root/var/lib/pacsgate" "$root/var/log/pacsgate"
install -m 0755 "$bin" "$root/usr/bin/pacsgate"
# Debug information stays in target/; the package carries the code.
strip --strip-unneeded "$root/usr/bin/pacsgate"
install -m 0640 packaging/pacsgate.toml "$root/etc/pacsgate/pacsgate.toml"
install -m 0644 packaging/pacsgate.service "$root/lib/systemd/system/pacsgate.service"
install -m 0644 packaging/pacsgate.sysusers "$root/usr/lib/sysusers.d/pacsgate.conf"
install -m 0644 README.md "$root/usr/share/doc/pacsgate/README.md"
install -m 0644 conformance/dicom-conformance.md "$root/usr/share/doc/pacsgate/dicom-conformance.md"
install -m 0644 packaging/copyright "$root/usr/share/doc/pacsgate/copyright"
for s in postinst prerm postrm; do
  install -m 0755 "packaging/debian/$s" "$root/DEBIAN/$s"
done
echo /etc/pacsgate/pacsgate.toml > "$root/DEBIAN/conffiles"

# The libraries the binary links, as Debian's shlibs name them (dpkg-dev); without it, libc6.
depends=libc6
if command -v dpkg-shlibdeps >/dev/null 2>&1; then
  depends=$(cd "$stage" && mkdir -p debian && printf 'Source: pacsgate\n\nPackage: pacsgate\nArchitecture: any\n' > debian/control \
    && dpkg-shlibdeps -O -e"$root/usr/bin/pacsgate" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
fi
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<CONTROL
Package: pacsgate
Version: $version
Architecture: $arch
Maintainer: pacsgate project <maintainers@pacsgate.invalid>
Installed-Size: $size
Depends: ${depends:-libc6}
Recommends: systemd
Section: net
Priority: optional
Homepage: https://pacsgate.invalid/
Description: SMART-on-FHIR authorization gateway in front of a PACS
 pacsgate sits in front of a PACS and lets imaging viewers and workstations
 reach it only with a SMART-on-FHIR access token, over DIMSE (C-ECHO, C-FIND,
 C-MOVE, C-GET, C-STORE, token in the user identity negotiation) and DICOMweb
 (QIDO-RS, WADO-RS, WADO-URI, STOW-RS with a bearer token). A patient-scoped
 token sees and writes only that patient's data, on every path. Decisions go
 to an IHE ATNA audit trail.
CONTROL

mkdir -p "$out"
deb=$out/pacsgate_${version}_$arch.deb
fakeroot dpkg-deb --build -Zxz --root-owner-group "$root" "$deb" >&2
echo "$deb"
