#!/usr/bin/env python3
"""TLS cost, side by side in one run: pacsgate's HTTPS against nginx terminating TLS in front of
the same DICOMweb origin, and pacsgate's DICOM TLS against stunnel terminating TLS in front of
the same DIMSE origin (a plain relay of bytes once decrypted), with the plaintext origin itself
as the reference. The origins are the project's fast ones (examples/bench_origin_web.rs and
bench_origin_dimse.rs), so the figures are the TLS terminators' and the gateway's, not a PACS's.

Measures, alternating between the sides in rounds:
- a new connection per request: association + C-ECHO + release over a fresh DICOM TLS
  connection (examples/dimse_bench.rs --mode assoc), and a QIDO-RS search over a fresh HTTPS
  connection (curl, one per request); p50 latency;
- throughput: C-GET of a study (dimse_bench --mode get) and WADO-RS of the same study (curl),
  in MB/s.
The nginx and stunnel sides check no token and no patient; the gateway does all its work on top
(token, look-ups, strict reading of every instance). Asserts only that every side returned the
same instances. Writes bench-results/tls.md (and tls.json).

Run it through scripts/bench-tls.sh. Environment: BENCH_ROUNDS (3), BENCH_INSTANCES (20),
BENCH_MIB (5), BENCH_CONNECT (50 fresh connections per round and side), PACSGATE_BIN.
"""

import json
import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from benchlib import write_big_study, EXAMPLES, FastDimse, FastWeb, Nginx, _start, ratio, write_results

import trustme  # noqa: E402

from conftest import Gateway, Issuer, free_port, stop, wait_tcp  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
INSTANCES = int(os.environ.get("BENCH_INSTANCES", "20"))
MIB_EACH = int(os.environ.get("BENCH_MIB", "5"))
CONNECT = int(os.environ.get("BENCH_CONNECT", "50"))
SC = "1.2.840.10008.5.1.4.1.1.7"
ELE = "1.2.840.10008.1.2.1"
ACCEPT_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'


class Stunnel:
    """stunnel terminating TLS (1.2 and 1.3) on loopback in front of 127.0.0.1:upstream_port."""

    def __init__(self, tmp: Path, upstream_port: int, cert, key):
        self.port = free_port()
        d = tmp / "stunnel"
        d.mkdir()
        cfg = d / "stunnel.conf"
        cfg.write_text(
            f"""foreground = yes
pid =
[dicom]
accept = 127.0.0.1:{self.port}
connect = 127.0.0.1:{upstream_port}
cert = {cert}
key = {key}
sslVersionMin = TLSv1.2
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1
"""
        )
        exe = shutil.which("stunnel4") or shutil.which("stunnel") or "/usr/bin/stunnel4"
        self.proc = _start([exe, str(cfg)], d / "stunnel.log", self.port, "stunnel")


def dimse_bench(addr, called, ca, token, *args):
    cmd = [str(EXAMPLES / "dimse_bench"), "--addr", addr, "--called", called, *args]
    if ca:
        cmd += ["--ca", str(ca)]
    if token:
        cmd += ["--token-file", str(token)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"dimse_bench {' '.join(args)} failed against {addr} (CA: {ca}): {r.stderr}")
    return json.loads(r.stdout)


def curl(url, ca=None, token=None, accept="application/dicom+json"):
    cmd = ["curl", "-sS", "--http1.1", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_total}",
           "-H", f"Accept: {accept}"]
    if ca:
        cmd += ["--cacert", str(ca)]
    if token:
        cmd += ["-H", f"Authorization: Bearer {token}"]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=600).stdout.split()
    if not out or out[0] != "200":
        raise RuntimeError(f"{url}: {out}")
    return int(out[1]), float(out[2])


def main():
    tmp = Path(tempfile.mkdtemp(prefix="pacsgate-bench-tls-"))
    procs = []
    try:
        study_dir = tmp / "study"
        study_dir.mkdir()
        study = write_big_study(study_dir, "BIG", INSTANCES, MIB_EACH)
        ca = trustme.CA()
        c = ca.issue_cert("127.0.0.1")
        ca_file, cert, key = tmp / "ca.pem", tmp / "cert.pem", tmp / "key.pem"
        ca_file.write_bytes(ca.cert_pem.bytes())
        cert.write_bytes(b"".join(b.bytes() for b in c.cert_chain_pems))
        key.write_bytes(c.private_key_pem.bytes())

        web = FastWeb(tmp, [study_dir])
        dimse = FastDimse(tmp, dirs=[study_dir], patient="BIG")
        nginx = Nginx(tmp, web.port, name="nginx-tls", tls=(cert, key))
        tunnel = Stunnel(tmp, dimse.dicom_port, cert, key)
        issuer = Issuer(tmp)
        procs += [web.proc, dimse.proc, nginx.proc, tunnel.proc, issuer.proc]
        tls_port, https_port = free_port(), free_port()
        g = Gateway(tmp, dimse, issuer, name="bench-gateway-tls", log_filter="info",
                    dicomweb_url=f"{web.url}/dicom-web",
                    gateway_extra=f'dimse_tls_listen = "127.0.0.1:{tls_port}"\nhttps_listen = "127.0.0.1:{https_port}"',
                    extra=f'[tls]\ncert_file = "{cert}"\nkey_file = "{key}"\n')
        procs.append(g.proc)
        wait_tcp(https_port, g.proc, "pacsgate https")
        token = issuer.mint(patient="BIG")
        token_file = tmp / "token"
        token_file.write_text(token)

        dimse_sides = {
            "origin (plaintext)": (f"127.0.0.1:{dimse.dicom_port}", dimse.aet, None, None),
            "stunnel": (f"127.0.0.1:{tunnel.port}", dimse.aet, ca_file, None),
            "pacsgate": (f"127.0.0.1:{tls_port}", "PACSGATE", ca_file, token_file),
        }
        web_sides = {
            "origin (plaintext)": (f"{web.url}/dicom-web", None, None),
            "nginx": (f"{nginx.url}/dicom-web", ca_file, None),
            "pacsgate": (f"https://127.0.0.1:{https_port}/dicom-web", ca_file, token),
        }
        get_args = ("--mode", "get", "--study", study, "--sop-class", SC, "--ts", ELE)
        results = {k: {"assoc_p50_ms": [], "get_mbs": []} for k in dimse_sides}
        results.update({f"web:{k}": {"qido_p50_ms": [], "wado_mbs": []} for k in web_sides})
        sizes = set()
        for _ in range(ROUNDS):
            for k, (addr, called, ca, tok) in dimse_sides.items():
                r = dimse_bench(addr, called, ca, tok, "--mode", "assoc", "--count", str(CONNECT))
                results[k]["assoc_p50_ms"].append(r["p50_us"] / 1000)
                r = dimse_bench(addr, called, ca, tok, *get_args)
                assert r["instances"] == INSTANCES, (k, r)
                sizes.add(("dimse", r["bytes"]))
                results[k]["get_mbs"].append(r["bytes"] / r["seconds"] / 1e6)
            for k, (base, ca, tok) in web_sides.items():
                lat = []
                for _ in range(CONNECT):
                    _, t = curl(f"{base}/studies?PatientID=BIG", ca, tok)
                    lat.append(t * 1000)
                results[f"web:{k}"]["qido_p50_ms"].append(statistics.median(lat))
                n, t = curl(f"{base}/studies/{study}", ca, tok, accept=ACCEPT_DICOM)
                sizes.add(("web", n // 1000))
                results[f"web:{k}"]["wado_mbs"].append(n / t / 1e6)
    finally:
        for p in procs:
            stop(p)
        shutil.rmtree(tmp, ignore_errors=True)

    med = {k: {m: statistics.median(v) for m, v in r.items()} for k, r in results.items()}
    o, s, p = med["origin (plaintext)"], med["stunnel"], med["pacsgate"]
    wo, wn, wp = med["web:origin (plaintext)"], med["web:nginx"], med["web:pacsgate"]
    text = "\n".join([
        f"TLS cost, {ROUNDS} rounds (medians), release build, loopback, {os.cpu_count()} cores; a study of "
        f"{INSTANCES} x {MIB_EACH} MiB; fresh connections: {CONNECT} per round and side. TLS 1.3, the "
        "terminators' default suites. stunnel and nginx check nothing; pacsgate verifies the token, looks "
        "the study up and reads every instance strictly.",
        "",
        "| DICOM | origin, plaintext | stunnel (TLS) | pacsgate (DICOM TLS) | pacsgate/stunnel |",
        "|---|---|---|---|---|",
        f"| association + C-ECHO + release on a new connection, p50 | {o['assoc_p50_ms']:.2f} ms | {s['assoc_p50_ms']:.2f} ms "
        f"| {p['assoc_p50_ms']:.2f} ms | {ratio(p['assoc_p50_ms'], s['assoc_p50_ms'])} |",
        f"| C-GET of the study | {o['get_mbs']:.0f} MB/s | {s['get_mbs']:.0f} MB/s | {p['get_mbs']:.0f} MB/s "
        f"| {ratio(p['get_mbs'], s['get_mbs'])} |",
        "",
        "| DICOMweb | origin, plaintext | nginx (HTTPS) | pacsgate (HTTPS) | pacsgate/nginx |",
        "|---|---|---|---|---|",
        f"| QIDO-RS on a new connection, p50 | {wo['qido_p50_ms']:.2f} ms | {wn['qido_p50_ms']:.2f} ms "
        f"| {wp['qido_p50_ms']:.2f} ms | {ratio(wp['qido_p50_ms'], wn['qido_p50_ms'])} |",
        f"| WADO-RS of the study | {wo['wado_mbs']:.0f} MB/s | {wn['wado_mbs']:.0f} MB/s | {wp['wado_mbs']:.0f} MB/s "
        f"| {ratio(wp['wado_mbs'], wn['wado_mbs'])} |",
        "",
        "Latency ratios above 1 and throughput ratios below 1 mean pacsgate is slower.",
    ])
    write_results("tls", text, {"rounds": results})
    assert len({b for kind, b in sizes if kind == "dimse"}) == 1, "every DICOM side retrieved the same bytes"


if __name__ == "__main__":
    main()
