#!/usr/bin/env python3
"""DICOMweb by translation benchmark: the same DICOMweb work against Orthanc's own DICOMweb
plugin (direct), through the gateway relaying to that plugin (pacs.dicomweb_url), and through
the gateway answering by translation to Orthanc's DIMSE services (no pacs.dicomweb_url), in one
run on the same Orthanc and data, alternating sides round by round:

- QIDO-RS /studies with 100 matches (latency p50, p99);
- WADO-RS retrieval of a large study (MB/s; curl, body discarded);
- WADO-RS frames of a multi-frame instance, one frame per request as viewers ask (frames/s);
- the same frames rendered as JPEG, one per request (pictures/s);
- STOW-RS of small instances, one request of BENCH_STOW parts (instances/s).

A measurement, not a test: it asserts only that every side returned the same number of
instances, matches and frames, and fails if a gateway's peak memory reaches 100 MiB. Writes
bench-results/translate.md. Run it through scripts/bench-translate.sh.
Environment: BENCH_INSTANCES (100), BENCH_MIB per instance (5), BENCH_ROUNDS (3), BENCH_QIDO
(200), BENCH_FRAMES (30, of 512x512x16 bit), BENCH_STOW (50), PACSGATE_BIN.
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

from benchlib import cpu_seconds, ratio, vm, write_big_study, write_results

import pydicom  # noqa: E402
import requests  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from conftest import Gateway, Issuer, Orthanc, stop  # noqa: E402
from dicomdata import generate, make_instance  # noqa: E402

INSTANCES = int(os.environ.get("BENCH_INSTANCES", "100"))
MIB_EACH = int(os.environ.get("BENCH_MIB", "5"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
QIDO_N = int(os.environ.get("BENCH_QIDO", "200"))
FRAMES = int(os.environ.get("BENCH_FRAMES", "30"))
STOW_N = int(os.environ.get("BENCH_STOW", "50"))
SIDES = ("direct", "relay", "translate")
ACCEPT_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'
ACCEPT_FRAME = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


def curl(url, token=None):
    cmd = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_total}", "-H", f"Accept: {ACCEPT_DICOM}"]
    if token:
        cmd += ["-H", f"Authorization: Bearer {token}"]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=900).stdout.split()
    if out[0] != "200":
        raise RuntimeError(f"{url}: HTTP {out[0]}")
    return int(out[1]), float(out[2])


def session(token=None, accept="application/dicom+json"):
    s = requests.Session()
    s.headers["Accept"] = accept
    if token:
        s.headers["Authorization"] = f"Bearer {token}"
    return s


def qido(base, token, n):
    s = session(token)
    url = f"{base}/studies" + ("" if token else "?PatientID=QIDO")
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        r = s.get(url, timeout=60)
        lat.append((time.perf_counter() - t) * 1000)
        assert r.status_code == 200 and len(r.json()) == 100, (url, r.status_code)
    return sorted(lat)


def frames(base, token, path):
    s = session(token, ACCEPT_FRAME)
    t = time.perf_counter()
    for f in range(1, FRAMES + 1):
        r = s.get(f"{base}/{path}/frames/{f}", timeout=60)
        assert r.status_code == 200 and len(r.content) >= 512 * 512 * 2, (base, f, r.status_code)
    return FRAMES / (time.perf_counter() - t)


def rendered(base, token, path):
    s = session(token, "image/jpeg")
    t = time.perf_counter()
    for f in range(1, FRAMES + 1):
        r = s.get(f"{base}/{path}/frames/{f}/rendered", timeout=60)
        assert r.status_code == 200 and r.content[:2] == b"\xff\xd8", (base, f, r.status_code)
    return FRAMES / (time.perf_counter() - t)


def stow(base, token, study, series):
    boundary = "benchboundary"
    files = [make_instance("STOW", study, series, 1, 1, i + 1, "20250101") for i in range(STOW_N)]
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f + b"\r\n" for f in files)
    body += f"--{boundary}--\r\n".encode()
    h = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}', "Accept": "application/dicom+json"}
    if token:
        h["Authorization"] = f"Bearer {token}"
    t = time.perf_counter()
    r = requests.post(f"{base}/studies", data=body, headers=h, timeout=300)
    dt = time.perf_counter() - t
    assert r.status_code == 200, (base, r.status_code, r.text[:200])
    return STOW_N / dt


def pct(v, q):
    return v[int((len(v) - 1) * q)]


def main():
    tmp = Path(tempfile.mkdtemp(prefix="pacsgate-bench-translate-"))
    procs = []
    try:
        print(f"writing a study of {INSTANCES} x {MIB_EACH} MiB, 100 small studies, a {FRAMES}-frame instance ...", flush=True)
        big_dir = tmp / "big"
        big_dir.mkdir()
        study = write_big_study(big_dir, "BIG", INSTANCES, MIB_EACH)
        orthanc = Orthanc(tmp)
        procs.append(orthanc.proc)
        for f in sorted(big_dir.iterdir()):
            orthanc.upload(f.read_bytes())
        for _, _, data in generate({"QIDO": {"studies": 100, "series": 1, "instances": 1}}, []):
            orthanc.upload(data)
        fst, fse = generate_uid(), generate_uid()
        ds = pydicom.dcmread(io.BytesIO(make_instance("FRAMES", fst, fse, 1, 1, 1, "20250101")))
        ds.Rows = ds.Columns = 512
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.NumberOfFrames = FRAMES
        ds.PixelData = os.urandom(512 * 512 * 2 * FRAMES)
        ds["PixelData"].VR = "OW"
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        orthanc.upload(buf.getvalue())
        frames_path = f"studies/{fst}/series/{fse}/instances/{ds.SOPInstanceUID}"

        issuer = Issuer(tmp)
        procs.append(issuer.proc)
        relay = Gateway(tmp, orthanc, issuer, name="bench-relay", log_filter="info", translate=False)
        procs.append(relay.proc)
        trans = Gateway(tmp, orthanc, issuer, name="bench-translate", log_filter="info", translate=True)
        procs.append(trans.proc)
        gateways = {"relay": relay, "translate": trans}
        tok = {p: issuer.mint(patient=p, scope="patient/ImagingStudy.rs patient/ImagingStudy.c")
               for p in ("BIG", "QIDO", "FRAMES", "STOW")}
        base = {"direct": f"{orthanc.url}/dicom-web", "relay": f"{relay.public_url}/dicom-web",
                "translate": f"{trans.public_url}/dicom-web"}
        token = lambda side, p: None if side == "direct" else tok[p]  # noqa: E731

        for s in SIDES:  # warm the PACS's cache and every connection
            curl(f"{base[s]}/studies/{study}", token(s, "BIG"))
        wado = {s: [] for s in SIDES}
        cpu = {s: 0.0 for s in gateways}
        for _ in range(ROUNDS):
            for s in SIDES:
                c0 = cpu_seconds(gateways[s].proc.pid) if s in gateways else 0
                wado[s].append(curl(f"{base[s]}/studies/{study}", token(s, "BIG")))
                if s in gateways:
                    cpu[s] += cpu_seconds(gateways[s].proc.pid) - c0
        for s in SIDES:
            assert abs(wado[s][0][0] - wado["direct"][0][0]) < 0.01 * wado["direct"][0][0], f"{s}: not the same study"
        hwm = {s: vm(g.proc.pid, "VmHWM") for s, g in gateways.items()}

        for s in SIDES:
            qido(base[s], token(s, "QIDO"), 20)
        q = {s: qido(base[s], token(s, "QIDO"), QIDO_N) for s in SIDES}
        fr = {s: [] for s in SIDES}
        rd = {s: [] for s in SIDES}
        st = {s: [] for s in SIDES}
        for _ in range(ROUNDS):
            for s in SIDES:
                fr[s].append(frames(base[s], token(s, "FRAMES"), frames_path))
                rd[s].append(rendered(base[s], token(s, "FRAMES"), frames_path))
                st[s].append(stow(base[s], token(s, "STOW"), generate_uid(), generate_uid()))

        w = {s: statistics.mean(b / x / 1e6 for b, x in wado[s]) for s in SIDES}
        f = {s: statistics.mean(fr[s]) for s in SIDES}
        t = {s: statistics.mean(st[s]) for s in SIDES}
        rend = {s: statistics.mean(rd[s]) for s in SIDES}
        hwm_all = {s: vm(g.proc.pid, "VmHWM") for s, g in gateways.items()}
        rows = [
            ("QIDO-RS /studies, 100 matches, p50", {s: pct(q[s], .5) for s in SIDES}, "ms"),
            ("QIDO-RS /studies, 100 matches, p99", {s: pct(q[s], .99) for s in SIDES}, "ms"),
            (f"WADO-RS study ({wado['direct'][0][0] / 2**20:.0f} MiB, {INSTANCES} instances)", w, "MB/s"),
            ("WADO-RS frames, one per request (512x512x16)", f, "frames/s"),
            ("WADO-RS frames rendered as JPEG, one per request", rend, "pictures/s"),
            (f"STOW-RS, {STOW_N} instances per request", t, "instances/s"),
        ]
        lines = [
            "DICOMweb by translation benchmark: release build, loopback, 2 cores shared by client, Orthanc and the gateways;",
            f"means of {ROUNDS} rounds after a warm-up, sides alternating. direct: Orthanc's DICOMweb plugin; relay: pacsgate with",
            "pacs.dicomweb_url (that plugin); translate: pacsgate without it (Orthanc's DIMSE: C-FIND, C-GET, C-STORE).",
            "Ratios are the side's figure over direct's: above 1 is slower for a latency, below 1 is slower for a throughput.",
            "",
            "| measure | direct | relay | translate | relay/direct | translate/direct | translate/relay |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, v, unit in rows:
            lines.append(f"| {label} | " + " | ".join(f"{v[s]:.2f} {unit}" for s in SIDES)
                         + f" | {ratio(v['relay'], v['direct'])} | {ratio(v['translate'], v['direct'])} | {ratio(v['translate'], v['relay'])} |")
        gb = {s: sum(b for b, _ in wado[s]) / 1e9 for s in gateways}
        lines += ["", "Gateway CPU per GB of WADO-RS: " + ", ".join(f"{s} {cpu[s] / gb[s]:.2f} s" for s in gateways)
                  + ". Peak resident memory while streaming the study: " + ", ".join(f"{s} {hwm[s]:.1f} MiB" for s in gateways)
                  + " (limit: 100 MiB); over the whole run: " + ", ".join(f"{s} {hwm_all[s]:.1f} MiB" for s in gateways) + "."]
        write_results("translate", "\n".join(lines))
        if max(hwm.values()) >= 100:
            print("a gateway's peak memory reached 100 MiB", file=sys.stderr)
            sys.exit(1)
    finally:
        for p in reversed(procs):
            stop(p)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
