#!/usr/bin/env python3
"""DICOMweb benchmark: WADO-RS retrieval of a large study, QIDO-RS searches, and instance
metadata requests that each name UIDs the gateway has not seen (so every one needs ownership
look-ups at the PACS), straight to the PACS's DICOMweb service, through a plain reverse proxy
(nginx: no authentication, proxy_buffering off, HTTP/1.1 keep-alive upstream) and through the
gateway, in one run; against Orthanc's DICOMweb plugin and against the project's fast origin
(examples/bench_origin_web.rs serving the same instances from memory, with
examples/bench_origin_dimse.rs answering the gateway's look-ups), so that the gateway's own cost
shows without Orthanc's. Reports the gateways' peak memory.

WADO-RS is fetched with curl (multipart/related, body discarded) after a warm-up, alternating
sides; QIDO-RS and metadata latency are measured with one keep-alive HTTP session per side.
A measurement: it asserts only that every side returned the same instances (byte for byte) and
the same number of matches, and fails if a gateway's peak memory reaches 100 MiB. Writes
bench-results/dicomweb.md.

Run it through scripts/bench-dicomweb.sh, which installs nginx and builds what it needs.
Environment: BENCH_INSTANCES (100), BENCH_MIB per instance (5), BENCH_ROUNDS of WADO-RS (3),
BENCH_QIDO requests per side (300), PACSGATE_BIN (the gateway binary).
"""

import hashlib
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import write_big_study, FastDimse, FastWeb, Nginx, cpu_seconds, fast_gateway, ratio, vm, write_results

import pydicom  # noqa: E402
import requests  # noqa: E402

from conftest import Gateway, Issuer, Orthanc, stop  # noqa: E402
from dicomdata import generate  # noqa: E402

INSTANCES = int(os.environ.get("BENCH_INSTANCES", "100"))
MIB_EACH = int(os.environ.get("BENCH_MIB", "5"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
QIDO_N = int(os.environ.get("BENCH_QIDO", "300"))
SIDES = ("direct", "relay", "gateway")
ACCEPT_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def curl(url, token=None):
    cmd = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_total}", "-H", f"Accept: {ACCEPT_DICOM}"]
    if token:
        cmd += ["-H", f"Authorization: Bearer {token}"]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=600).stdout.split()
    if out[0] != "200":
        raise RuntimeError(f"{url}: HTTP {out[0]}")
    return int(out[1]), float(out[2])


def instance_digests(url, token=None):
    """The SHA-256 of each DICOM part of a multipart/related answer, sorted."""
    h = {"Accept": ACCEPT_DICOM}
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


def session(token=None):
    s = requests.Session()
    s.headers["Accept"] = "application/dicom+json"
    if token:
        s.headers["Authorization"] = f"Bearer {token}"
    return s


def qido_latencies(url, token=None, n=QIDO_N):
    s = session(token)
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        r = s.get(url, timeout=30)
        lat.append((time.perf_counter() - t) * 1000)
        assert r.status_code == 200 and len(r.json()) == 100, (url, r.status_code)
    lat.sort()
    return lat


def meta_latencies(base, small, token=None):
    """Instance metadata, each instance once: through a gateway every request names a study,
    series and instance it has not judged before."""
    s = session(token)
    lat = []
    for st, se, i in small:
        t = time.perf_counter()
        r = s.get(f"{base}/studies/{st}/series/{se}/instances/{i}/metadata", timeout=30)
        lat.append((time.perf_counter() - t) * 1000)
        assert r.status_code == 200 and r.json()[0]["00080018"]["Value"] == [i], (base, r.status_code)
    lat.sort()
    return lat


def pct(v, q):
    return v[int((len(v) - 1) * q)]


def main():
    tmp = Path(tempfile.mkdtemp(prefix="pacsgate-bench-dicomweb-"))
    procs = []
    try:
        print(f"writing a study of {INSTANCES} x {MIB_EACH} MiB and 100 small studies ...", flush=True)
        big_dir, small_dir = tmp / "big", tmp / "small"
        big_dir.mkdir()
        small_dir.mkdir()
        study = write_big_study(big_dir, "BIG", INSTANCES, MIB_EACH)
        small = []  # (study, series, instance) of the 100 small studies
        for n, (_, st, data) in enumerate(generate({"QIDO": {"studies": 100, "series": 1, "instances": 1}}, [])):
            (small_dir / f"{n:05d}.dcm").write_bytes(data)
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            small.append((st, ds.SeriesInstanceUID, ds.SOPInstanceUID))

        orthanc = Orthanc(tmp)
        procs.append(orthanc.proc)
        for d in (big_dir, small_dir):
            for f in sorted(d.iterdir()):
                orthanc.upload(f.read_bytes())
        web = FastWeb(tmp, [big_dir, small_dir])
        procs.append(web.proc)
        looks = FastDimse(tmp, index=[big_dir, small_dir], patient="BIG")
        procs.append(looks.proc)
        relay = Nginx(tmp, orthanc.http_port, name="nginx-orthanc")
        procs.append(relay.proc)
        fast_relay = Nginx(tmp, web.port, name="nginx-fast")
        procs.append(fast_relay.proc)
        issuer = Issuer(tmp)
        procs.append(issuer.proc)
        gw = Gateway(tmp, orthanc, issuer, name="bench-gateway", log_filter="info")
        procs.append(gw.proc)
        fast_gw = fast_gateway(tmp, looks, issuer, web=web)
        procs.append(fast_gw.proc)
        gateways = {"orthanc": gw, "fast": fast_gw}
        big_token = issuer.mint(patient="BIG")
        qido_token = issuer.mint(patient="QIDO")
        rss0 = {t: vm(g.proc.pid, "VmRSS") for t, g in gateways.items()}
        # (target, side) -> (DICOMweb root, token of the big study's patient, of the small ones')
        sides = {
            ("orthanc", "direct"): (f"{orthanc.url}/dicom-web", None, None),
            ("orthanc", "relay"): (f"{relay.url}/dicom-web", None, None),
            ("orthanc", "gateway"): (f"{gw.public_url}/dicom-web", big_token, qido_token),
            ("fast", "direct"): (f"{web.url}/dicom-web", None, None),
            ("fast", "relay"): (f"{fast_relay.url}/dicom-web", None, None),
            ("fast", "gateway"): (f"{fast_gw.public_url}/dicom-web", big_token, qido_token),
        }

        for base, tok, _ in sides.values():  # warm the PACS's cache and every connection
            curl(f"{base}/studies/{study}", tok)
        wado = {k: [] for k in sides}
        gw_cpu = {t: 0.0 for t in gateways}
        for _ in range(ROUNDS):
            for (t, s), (base, tok, _) in sides.items():
                c0 = cpu_seconds(gateways[t].proc.pid)
                wado[(t, s)].append(curl(f"{base}/studies/{study}", tok))
                if s == "gateway":
                    gw_cpu[t] += cpu_seconds(gateways[t].proc.pid) - c0
        # The gateway re-frames the parts (its own boundary and part headers): the instances
        # must be the same, byte for byte; each side's size must not vary between rounds.
        digests = {k: instance_digests(f"{base}/studies/{study}", tok) for k, (base, tok, _) in sides.items()}
        for k, d in digests.items():
            assert len(d) == INSTANCES and d == digests[(k[0], "direct")], f"{k}: not the same instances as direct"
        for k, v in wado.items():
            assert len({b for b, _ in v}) == 1, f"{k}: sizes vary between rounds: {v}"
        hwm = {t: vm(g.proc.pid, "VmHWM") for t, g in gateways.items()}

        def qido_url(k):
            base, _, tok = sides[k]
            return (f"{base}/studies", tok) if k[1] == "gateway" else (f"{base}/studies?PatientID=QIDO", None)

        for k in sides:  # warm-up
            qido_latencies(*qido_url(k), n=min(QIDO_N, 30))
        qido = {k: qido_latencies(*qido_url(k)) for k in sides}
        meta = {k: meta_latencies(base, small, tok) for k, (base, _, tok) in sides.items()}

        lines = [
            f"DICOMweb benchmark: release build, loopback, 2 cores; WADO-RS of a {wado[('orthanc', 'direct')][0][0] / 1024 / 1024:.0f} MiB study "
            f"({INSTANCES} instances, mean of {ROUNDS} after a warm-up); QIDO-RS /studies with 100 matches ({QIDO_N} requests);",
            "instance metadata of 100 instances not seen before. Relay: nginx (proxy_buffering off, keep-alive upstream).",
            "Ratios are the side's figure over direct's: above 1 is slower for a latency, below 1 is slower for a throughput.",
        ]
        for t, title in (("orthanc", "Orthanc"), ("fast", "the fast origin (examples/bench_origin_web.rs, look-ups by examples/bench_origin_dimse.rs)")):
            w = {s: statistics.mean(b / x / 1e6 for b, x in wado[(t, s)]) for s in SIDES}
            rows = [f"| WADO-RS study retrieval | " + " | ".join(f"{w[s]:.1f} MB/s" for s in SIDES)
                    + f" | {ratio(w['relay'], w['direct'])} | {ratio(w['gateway'], w['direct'])} |"]
            for label, data, f in (
                ("QIDO-RS latency p50", qido, lambda v: pct(v, .5)),
                ("QIDO-RS latency p99", qido, lambda v: pct(v, .99)),
                ("instance metadata, UIDs not seen before, p50", meta, lambda v: pct(v, .5)),
                ("instance metadata, UIDs not seen before, p99", meta, lambda v: pct(v, .99)),
            ):
                v = {s: f(data[(t, s)]) for s in SIDES}
                rows.append(f"| {label} | " + " | ".join(f"{v[s]:.2f} ms" for s in SIDES)
                            + f" | {ratio(v['relay'], v['direct'])} | {ratio(v['gateway'], v['direct'])} |")
                if label == "QIDO-RS latency p99":
                    q = {s: 1000 / statistics.mean(qido[(t, s)]) for s in SIDES}
                    rows.append("| QIDO-RS throughput | " + " | ".join(f"{q[s]:.1f} req/s" for s in SIDES)
                                + f" | {ratio(q['relay'], q['direct'])} | {ratio(q['gateway'], q['direct'])} |")
            relayed = sum(b for b, _ in wado[(t, "gateway")]) / 1e9
            lines += [
                "",
                f"Against {title}:",
                "",
                "| measure | direct | through nginx | through pacsgate | nginx/direct | pacsgate/direct |",
                "|---|---|---|---|---|---|",
                *rows,
                "",
                f"Gateway CPU time per GB of WADO-RS relayed: {gw_cpu[t] / relayed:.3f} s. Gateway resident memory: "
                f"{rss0[t]:.1f} MiB at start, peak {hwm[t]:.1f} MiB while streaming the study (limit: 100 MiB).",
            ]
        write_results("dicomweb", "\n".join(lines))
        if max(hwm.values()) >= 100:
            print("a gateway's peak memory reached 100 MiB", file=sys.stderr)
            sys.exit(1)
    finally:
        for p in reversed(procs):
            stop(p)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
