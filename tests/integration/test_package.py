"""The Debian package as an admin installs it: scripts/package.sh builds it (from the debug build,
to keep the suite quick; the release package is built the same way), its metadata and contents are
checked, the shipped configuration loads, systemd's own analyzer verifies the unit and rates its
sandboxing, and, as root, a real install and purge cycle creates the system user, gives the
configuration to it and leaves the audit trail behind."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import binary

REPO = Path(__file__).resolve().parents[2]
CONFIG = "/etc/pacsgate/pacsgate.toml"


def run(*cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def deb(tmp_root):
    out = tmp_root / "package"
    r = run("bash", str(REPO / "scripts/package.sh"), "--debug", str(out), cwd=REPO)
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip().splitlines()[-1])
    assert path.is_file(), r.stdout
    return path


@pytest.fixture(scope="module")
def root(deb, tmp_root):
    d = tmp_root / "package-root"
    r = run("dpkg-deb", "-x", str(deb), str(d))
    assert r.returncode == 0, r.stderr
    return d


def version():
    return re.search(r'^version = "(.*)"', (REPO / "Cargo.toml").read_text(), re.M).group(1)


def test_metadata_names_the_package_its_version_and_libraries(deb):
    field = lambda f: run("dpkg-deb", "-f", str(deb), f).stdout.strip()
    assert field("Package") == "pacsgate"
    assert field("Version") == version()
    assert field("Architecture") == run("dpkg", "--print-architecture").stdout.strip()
    assert "libc6" in field("Depends"), field("Depends")
    assert field("Description").startswith("SMART-on-FHIR authorization gateway")
    ctl = run("dpkg-deb", "--ctrl-tarfile", str(deb))
    assert ctl.returncode == 0
    listing = run("dpkg-deb", "-I", str(deb)).stdout
    for script in ("postinst", "prerm", "postrm", "conffiles"):
        assert script in listing, script


def test_contents_and_modes(deb, root):
    listing = run("dpkg-deb", "-c", str(deb)).stdout
    entries = {}
    for line in listing.splitlines():
        parts = line.split()
        entries[parts[-1].lstrip(".")] = (parts[0], parts[1])
    expected = {
        "/usr/bin/pacsgate": "-rwxr-xr-x",
        "/etc/pacsgate/pacsgate.toml": "-rw-r-----",
        "/lib/systemd/system/pacsgate.service": "-rw-r--r--",
        "/usr/lib/sysusers.d/pacsgate.conf": "-rw-r--r--",
        "/usr/share/doc/pacsgate/README.md": "-rw-r--r--",
        "/usr/share/doc/pacsgate/dicom-conformance.md": "-rw-r--r--",
        "/usr/share/doc/pacsgate/copyright": "-rw-r--r--",
    }
    for path, mode in expected.items():
        assert path in entries, f"{path} missing from the package"
        assert entries[path] == (mode, "root/root"), (path, entries[path])
    for d in ("/var/lib/pacsgate/", "/var/log/pacsgate/"):
        assert d in entries, d
    # conffiles: upgrades keep the admin's configuration.
    r = run("dpkg-deb", "--info", str(deb), "conffiles")
    assert r.stdout.split() == [CONFIG]
    assert (root / "usr/lib/sysusers.d/pacsgate.conf").read_text().splitlines()[-1].startswith("u pacsgate ")
    for script in ("postinst", "prerm", "postrm"):
        assert (REPO / "packaging/debian" / script).read_text().startswith("#!/bin/sh")
        assert run("sh", "-n", str(REPO / "packaging/debian" / script)).returncode == 0, script
    # The packaged binary is the gateway, stripped.
    assert run(str(root / "usr/bin/pacsgate"), "--version").stdout.startswith("pacsgate ")
    assert "not stripped" not in run("file", "-b", str(root / "usr/bin/pacsgate")).stdout


def test_the_shipped_configuration_loads_and_listens_on_loopback_only(root):
    text = (root / CONFIG.lstrip("/")).read_text()
    # As installed, relative to the package's root (the audit file's directory must exist).
    local = root / "etc/pacsgate/local.toml"
    local.write_text(text.replace("/var/log/pacsgate", str(root / "var/log/pacsgate")))
    r = run(str(binary()), "check-config", "--config", str(local))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "valid" in r.stdout
    # The one leg it warns about: the example PACS, reached in plaintext as most PACS are.
    warnings = [l for l in r.stderr.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1 and "pacs.address" in warnings[0], r.stderr
    for line in text.splitlines():
        m = re.match(r'^\s*(\w+_listen)\s*=\s*"([^"]+)"', line)
        if m:
            assert m.group(2).startswith("127.0.0.1:"), line
    # Every key it shows commented out is one the gateway knows: uncommented, it still loads
    # (but for the TLS files, which do not exist here).
    uncommented = re.sub(r"^# ([a-z_]+ = )", r"\1", text, flags=re.M)
    uncommented = re.sub(r"^# (\[\[?[a-z_.]+\]\]?)$", r"\1", uncommented, flags=re.M)
    local.write_text(uncommented.replace("/var/log/pacsgate", str(root / "var/log/pacsgate")))
    r = run(str(binary()), "check-config", "--config", str(local))
    problems = [l for l in r.stdout.splitlines() + r.stderr.splitlines() if l.strip().startswith("- ")]
    assert problems, "the TLS files named do not exist"
    unknown = [p for p in problems if "unknown" in p or "syntax" in p]
    assert not unknown, unknown


def test_systemd_verifies_the_unit_and_rates_its_sandbox(root, tmp_root):
    unit = root / "lib/systemd/system/pacsgate.service"
    # The unit's dependencies (targets) come from this machine's systemd.
    for t in Path("/lib/systemd/system").glob("*.target"):
        dest = unit.parent / t.name
        if not dest.exists():
            shutil.copy(t, dest)
    # ExecReload's /bin/kill is the host's (procps), not the package's.
    (root / "bin").mkdir(exist_ok=True)
    shutil.copy("/bin/kill", root / "bin/kill")
    r = run("systemd-analyze", "verify", f"--root={root}", "--man=no", "/lib/systemd/system/pacsgate.service")
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stdout + r.stderr
    r = run("systemd-analyze", "security", "--offline=true", "--no-pager", str(unit))
    m = re.search(r"Overall exposure level for pacsgate.service: ([0-9.]+) (\w+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.0, r.stdout
    text = unit.read_text()
    for directive in ("User=pacsgate", "NoNewPrivileges=yes", "ProtectSystem=strict", "ExecReload=/bin/kill -HUP $MAINPID",
                      f"ExecStart=/usr/bin/pacsgate serve --config {CONFIG}"):
        assert directive in text, directive


def test_install_and_purge_on_this_machine(deb):
    if os.geteuid() != 0:
        pytest.skip("installing a package needs root (CI runs as root)")
    if Path("/usr/bin/pacsgate").exists() or run("dpkg", "-s", "pacsgate").returncode == 0:
        pytest.fail("pacsgate is already installed on this machine; remove it to run this test")
    r = run("dpkg", "-i", str(deb))
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        assert run("getent", "passwd", "pacsgate").returncode == 0, "the system user exists"
        st = os.stat(CONFIG)
        import grp
        import pwd
        assert (pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name) == ("root", "pacsgate")
        assert st.st_mode & 0o777 == 0o640
        for d in ("/var/lib/pacsgate", "/var/log/pacsgate"):
            assert pwd.getpwuid(os.stat(d).st_uid).pw_name == "pacsgate", d
        # The service's user reads its configuration (as ExecStartPre does).
        r = run("runuser", "-u", "pacsgate", "--", "/usr/bin/pacsgate", "check-config", "--config", CONFIG)
        assert r.returncode == 0, r.stdout + r.stderr
        Path("/var/log/pacsgate/audit.jsonl").write_text("{}\n")
    finally:
        purge = run("dpkg", "--purge", "pacsgate")
    assert purge.returncode == 0, purge.stdout + purge.stderr
    assert not Path("/usr/bin/pacsgate").exists()
    assert not Path(CONFIG).exists() and not Path("/var/lib/pacsgate").exists()
    assert Path("/var/log/pacsgate/audit.jsonl").exists(), "the audit trail outlives the package"
    shutil.rmtree("/var/log/pacsgate")
