"""Helpers shared by the benchmarks (scripts/bench_dimse.py, bench_transfer.py,
bench_dicomweb.py): the plain relays they compare the gateway with (haproxy in TCP mode for
DIMSE, nginx as a reverse proxy for DICOMweb), the project's fast origins
(examples/bench_origin_dimse.rs, examples/bench_origin_web.rs), process figures from /proc,
and the result tables.

Not run on its own: the benchmark scripts import it (they are run through scripts/bench-*.sh,
which install the relays and build the origins).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))
os.environ.setdefault("PACSGATE_BIN", str(ROOT / "target" / "release" / "pacsgate"))

from conftest import Gateway, free_port, wait_tcp  # noqa: E402
from nginx import Nginx  # noqa: E402,F401  (the benchmarks import it from here)

EXAMPLES = ROOT / "target" / "release" / "examples"


def cpu_seconds(pid):
    """User + system CPU time of a process so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vm(pid, field):
    """A memory figure of /proc/PID/status (VmRSS, VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def _start(cmd, log_path, port, what, timeout=60.0, env=None):
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    wait_tcp(port, proc, what, timeout=timeout)
    return proc


class Haproxy:
    """haproxy in TCP mode on loopback, in front of 127.0.0.1:upstream_port: a plain relay of
    bytes, no DICOM awareness. Its defaults are kept (threads as many as cores, no splicing)."""

    def __init__(self, tmp: Path, upstream_port: int, name="haproxy"):
        self.port = free_port()
        d = tmp / name
        d.mkdir()
        cfg = d / "haproxy.cfg"
        cfg.write_text(
            f"""global
    maxconn 4096

defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m

frontend dimse
    bind 127.0.0.1:{self.port}
    default_backend pacs

backend pacs
    server pacs 127.0.0.1:{upstream_port}
"""
        )
        self.proc = _start(["haproxy", "-db", "-f", str(cfg)], d / "haproxy.log", self.port, "haproxy")


class FastDimse:
    """examples/bench_origin_dimse: a DIMSE origin answering from memory. `dirs`: Part 10 files
    held for C-GET; `index`: files whose UIDs its look-ups know, data not kept. Has what
    conftest's Gateway reads of a PACS (aet, dicom_port)."""

    def __init__(self, tmp: Path, dirs=(), index=(), patient="BENCH", matches=100, name="origin-dimse"):
        self.aet = "FASTORIGIN"
        self.dicom_port = free_port()
        cmd = [str(EXAMPLES / "bench_origin_dimse"), "--listen", f"127.0.0.1:{self.dicom_port}",
               "--patient", patient, "--matches", str(matches)]
        for d in dirs:
            cmd += ["--dir", str(d)]
        for d in index:
            cmd += ["--index", str(d)]
        self.proc = _start(cmd, tmp / f"{name}.log", self.dicom_port, "bench_origin_dimse", timeout=300)


class FastWeb:
    """examples/bench_origin_web: a DICOMweb origin serving the Part 10 files of `dirs` from
    memory under {url}/dicom-web."""

    def __init__(self, tmp: Path, dirs, name="origin-web"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [str(EXAMPLES / "bench_origin_web"), "--listen", f"127.0.0.1:{self.port}"]
        for d in dirs:
            cmd += ["--dir", str(d)]
        self.proc = _start(cmd, tmp / f"{name}.log", self.port, "bench_origin_web", timeout=300)


def fast_gateway(tmp: Path, dimse: FastDimse, issuer, web: FastWeb = None, name="bench-gateway-fast"):
    """`pacsgate serve` in front of the fast origins (info logging, as in production)."""
    dicomweb = f"{web.url}/dicom-web" if web else f"http://127.0.0.1:{free_port()}/dicom-web"
    return Gateway(tmp, dimse, issuer, name=name, log_filter="info", dicomweb_url=dicomweb)


def write_big_study(directory: Path, patient: str, instances: int, mib_each: int) -> str:
    """Writes a study of `instances` Part 10 files of about `mib_each` MiB of random 16-bit
    pixels each into `directory`; returns its Study Instance UID."""
    import io

    import pydicom
    from pydicom.uid import generate_uid

    from dicomdata import make_instance

    study, series = generate_uid(), generate_uid()
    side = int((mib_each * 1024 * 1024 / 2) ** 0.5)
    for i in range(instances):
        ds = pydicom.dcmread(io.BytesIO(make_instance(patient, study, series, 1, 1, i + 1, "20250101")))
        ds.Rows = ds.Columns = side
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelData = os.urandom(side * side * 2)
        ds.save_as(directory / f"{i:05d}.dcm", enforce_file_format=True)
    return study


def ratio(value, base):
    """value / base, formatted; '-' when the base is zero."""
    return f"{value / base:.3f}" if base else "-"


def write_results(name: str, text: str, data=None):
    """Prints a table and writes it to bench-results/NAME.md (and NAME.json when data is given)."""
    print(text)
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / f"{name}.md").write_text(text + "\n")
    if data is not None:
        (out / f"{name}.json").write_text(json.dumps(data, indent=1))
