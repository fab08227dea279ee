#!/usr/bin/env python3
"""DICOMweb benchmark: WADO-RS retrieval of a large study, QIDO-RS searches, and instance
metadata requests that each name UIDs the gateway has not seen (so every one needs ownership
look-ups at the PACS), through the gateway and straight to Orthanc's DICOMweb plugin, in one
run, with the gateway's peak memory.

WADO-RS is fetched with curl (multipart/related, body discarded) after a warm-up, alternating
sides; QIDO-RS latency is measured with one keep-alive HTTP session per side. Writes
bench-results/dicomweb.md. Run it through scripts/bench-dicomweb.sh.
"""

import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))
os.environ.setdefault("PACSGATE_BIN", str(ROOT / "target" / "release" / "pacsgate"))

import pydicom  # noqa: E402
import requests  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from conftest import Gateway, Issuer, Orthanc, stop  # noqa: E402
from dicomdata import generate, make_instance  # noqa: E402

INSTANCES = int(os.environ.get("BENCH_INSTANCES", "100"))
MIB_EACH = int(os.environ.get("BENCH_MIB", "5"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
QIDO_N = int(os.environ.get("BENCH_QIDO", "300"))


def vm(pid, field):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid):
    """User plus system CPU time of a process so far."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def curl(url, token=None):
    cmd = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_total}",
           "-H", 'Accept: multipart/related; type="application/dicom"; transfer-syntax=*']
    if token:
        cmd += ["-H", f"Authorization: Bearer {token}"]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=600).stdout.split()
    if out[0] != "200":
        raise RuntimeError(f"{url}: HTTP {out[0]}")
    return int(out[1]), float(out[2])


def instance_digests(url, token=None):
    """The SHA-256 of each DICOM part of a multipart/related answer, sorted."""
    import hashlib

    h = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    if token:
        h["Authorization"] = f"Bearer {token}"
    r = requests.get(url, headers=h, timeout=600)
    r.raise_for_status()
    boundary = r.headers["Content-Type"].split("boundary=")[1].split(";")[0].strip('"').encode()
    out = []
    for part in r.content.split(b"--" + boundary)[1:]:
        if part.startswith(b"--"):
            break
        body = part.split(b"\r\n\r\n", 1)[1]
        out.append(hashlib.sha256(body[:-2] if body.endswith(b"\r\n") else body).hexdigest())
    return sorted(out)


def qido_latencies(url, token=None):
    s = requests.Session()
    h = {"Accept": "application/dicom+json"}
    if token:
        h["Authorization"] = f"Bearer {token}"
    lat = []
    for _ in range(QIDO_N):
        t = time.perf_counter()
        r = s.get(url, headers=h, timeout=30)
        lat.append((time.perf_counter() - t) * 1000)
        assert r.status_code == 200 and len(r.json()) == 100, r.status_code
    lat.sort()
    return lat


def main():
    tmp = Path(tempfile.mkdtemp(prefix="pacsgate-bench-dicomweb-"))
    procs = []
    try:
        orthanc = Orthanc(tmp)
        procs.append(orthanc.proc)
        print(f"loading a study of {INSTANCES} x {MIB_EACH} MiB and 100 small studies ...", flush=True)
        study, series = generate_uid(), generate_uid()
        side = int((MIB_EACH * 1024 * 1024 / 2) ** 0.5)
        for i in range(INSTANCES):
            ds = pydicom.dcmread(io.BytesIO(make_instance("BIG", study, series, 1, 1, i + 1, "20250101")))
            ds.Rows = ds.Columns = side
            ds.BitsAllocated = ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelData = os.urandom(side * side * 2)
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            orthanc.upload(buf.getvalue())
        small = []  # (study, series, instance) of the 100 small studies
        for _, st, data in generate({"QIDO": {"studies": 100, "series": 1, "instances": 1}}, []):
            orthanc.upload(data)
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            small.append((st, ds.SeriesInstanceUID, ds.SOPInstanceUID))
        issuer = Issuer(tmp)
        procs.append(issuer.proc)
        gw = Gateway(tmp, orthanc, issuer, name="bench-gateway", log_filter="info")
        procs.append(gw.proc)
        big_token = issuer.mint(patient="BIG")
        qido_token = issuer.mint(patient="QIDO")
        direct = f"{orthanc.url}/dicom-web"
        via = f"{gw.public_url}/dicom-web"
        rss0 = vm(gw.proc.pid, "VmRSS")

        curl(f"{direct}/studies/{study}")  # warm the PACS's cache
        curl(f"{via}/studies/{study}", big_token)
        wado = {"direct": [], "gateway": []}
        gw_cpu = 0.0
        for _ in range(ROUNDS):
            wado["direct"].append(curl(f"{direct}/studies/{study}"))
            c0 = cpu_seconds(gw.proc.pid)
            wado["gateway"].append(curl(f"{via}/studies/{study}", big_token))
            gw_cpu += cpu_seconds(gw.proc.pid) - c0
        # The gateway re-frames the parts (its own boundary and part headers): the instances
        # must be the same, byte for byte; each side's size must not vary between rounds.
        assert instance_digests(f"{direct}/studies/{study}") == instance_digests(f"{via}/studies/{study}", big_token), \
            "both sides must return the same instances"
        for side in wado.values():
            assert len({b for b, _ in side}) == 1, f"sizes vary between rounds: {side}"
        hwm = vm(gw.proc.pid, "VmHWM")

        qido_latencies(f"{direct}/studies?PatientID=QIDO")  # warm-up
        qido_latencies(f"{via}/studies", qido_token)
        qd = qido_latencies(f"{direct}/studies?PatientID=QIDO")
        qg = qido_latencies(f"{via}/studies", qido_token)

        # Instance metadata, each instance once per side: through the gateway every request
        # names a study, series and instance it has not judged before.
        def meta_latencies(base, token=None):
            s = requests.Session()
            h = {"Accept": "application/dicom+json"}
            if token:
                h["Authorization"] = f"Bearer {token}"
            lat = []
            for st, se, i in small:
                t = time.perf_counter()
                r = s.get(f"{base}/studies/{st}/series/{se}/instances/{i}/metadata", headers=h, timeout=30)
                lat.append((time.perf_counter() - t) * 1000)
                assert r.status_code == 200, r.status_code
            lat.sort()
            return lat

        md = meta_latencies(direct)
        mg = meta_latencies(via, qido_token)

        def mbps(rs):
            return statistics.mean(b / t / 1e6 for b, t in rs)

        wd, wg = mbps(wado["direct"]), mbps(wado["gateway"])

        def pct(v, q):
            return v[int((len(v) - 1) * q)]

        size_mib = wado["direct"][0][0] / 1024 / 1024
        lines = [
            f"DICOMweb benchmark: release build, loopback, 2 cores; WADO-RS of a {size_mib:.0f} MiB study "
            f"({INSTANCES} instances, mean of {ROUNDS} after a warm-up); QIDO-RS /studies with 100 matches ({QIDO_N} requests)",
            "",
            "| measure | direct to Orthanc | through pacsgate | gateway/direct |",
            "|---|---|---|---|",
            f"| WADO-RS study retrieval | {wd:.1f} MB/s | {wg:.1f} MB/s | {wg / wd:.3f} |",
            f"| WADO-RS gateway CPU time per GB relayed | | {gw_cpu / (sum(b for b, _ in wado['gateway']) / 1e9):.3f} s | |",
            f"| QIDO-RS latency p50 | {pct(qd, .5):.2f} ms | {pct(qg, .5):.2f} ms | +{pct(qg, .5) - pct(qd, .5):.2f} ms |",
            f"| QIDO-RS latency p99 | {pct(qd, .99):.2f} ms | {pct(qg, .99):.2f} ms | +{pct(qg, .99) - pct(qd, .99):.2f} ms |",
            f"| QIDO-RS throughput | {1000 / statistics.mean(qd):.1f} req/s | {1000 / statistics.mean(qg):.1f} req/s | {statistics.mean(qd) / statistics.mean(qg):.3f} |",
            f"| instance metadata, UIDs not seen before, p50 | {pct(md, .5):.2f} ms | {pct(mg, .5):.2f} ms | +{pct(mg, .5) - pct(md, .5):.2f} ms |",
            f"| instance metadata, UIDs not seen before, p99 | {pct(md, .99):.2f} ms | {pct(mg, .99):.2f} ms | +{pct(mg, .99) - pct(md, .99):.2f} ms |",
            "",
            f"Gateway resident memory: {rss0:.1f} MiB at start, peak {hwm:.1f} MiB while streaming the study (limit: 100 MiB).",
        ]
        text = "\n".join(lines)
        print(text)
        out = ROOT / "bench-results"
        out.mkdir(exist_ok=True)
        (out / "dicomweb.md").write_text(text + "\n")
        if hwm >= 100:
            print("peak memory over 100 MiB", file=sys.stderr)
            sys.exit(1)
    finally:
        for p in reversed(procs):
            stop(p)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
