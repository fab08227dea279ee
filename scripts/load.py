#!/usr/bin/env python3
"""Load and abuse: what the gateway holds when a hospital leans on it. Bounded in count and time;
a measurement, not a timed test.

For plaintext and for TLS (DICOM TLS and HTTPS), examples/load.rs runs 500 associations at once
(each associates, echoes, holds until all are up, echoes again and releases) and then 1,000
QIDO-RS searches at once, with valid tokens; then the same again with a flood mixed in: invalid
tokens on both protocols, handshakes sent a byte at a time and connections that never speak.
/healthz is sampled every 50 ms throughout, on the HTTP front end and on gateway.monitor_listen
(the probes' own listener, thread and runtime). The gateway (release build, info logging, the audit
trail on) stands in front of the project's fast origins (examples/bench_origin_dimse.rs and
bench_origin_web.rs), so that what is measured is the gateway. Its peak resident memory is read
from /proc. Asserts only that every valid caller was served; prints the table and writes it to
bench-results/load.md (and load.json).

Run it through scripts/load.sh. Environment: LOAD_ASSOC (500), LOAD_REQUESTS (1000),
PACSGATE_BIN (the gateway binary).
"""

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from benchlib import EXAMPLES, FastDimse, FastWeb, vm, write_results

import requests  # noqa: E402
import trustme  # noqa: E402

from conftest import Gateway, Issuer, free_port, stop, wait_tcp  # noqa: E402
from dicomdata import generate  # noqa: E402

ASSOC = int(os.environ.get("LOAD_ASSOC", "500"))
REQUESTS = int(os.environ.get("LOAD_REQUESTS", "1000"))
PATIENT = "LOAD"

LIMITS = f"""max_associations = {ASSOC + 100}
max_pending_associations = 1000
max_http_connections = 4096
max_http_connections_per_peer = 256
"""


class Probe:
    """GET /healthz every 50 ms from a process of its own (this one), so that the probe does not
    wait behind the load client's own tasks; each probe on a new connection."""

    def __init__(self, url):
        self.url, self.ms, self.failed = url, [], 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.done.is_set():
            t0 = time.perf_counter()
            try:
                ok = requests.get(self.url, timeout=5).status_code == 200
            except requests.RequestException:
                ok = False
            if ok:
                self.ms.append((time.perf_counter() - t0) * 1000)
            else:
                self.failed += 1
            time.sleep(0.05)

    def stop(self):
        self.done.set()
        self.thread.join()
        ms = sorted(self.ms)
        return {"ok": len(ms), "failed": self.failed, "max_ms": ms[-1] if ms else 0.0,
                "p99_ms": ms[int((len(ms) - 1) * 0.99)] if ms else 0.0}


def run_client(g, token_file, ca=None, abuse=False):
    dimse = g.dimse_tls_port if ca else g.dimse_port
    http = f"https://127.0.0.1:{g.https_port}" if ca else g.public_url
    cmd = [str(EXAMPLES / "load"), "--dimse", f"127.0.0.1:{dimse}", "--http", http,
           "--health", f"{g.public_url}/healthz", "--token-file", str(token_file),
           "--assoc", str(ASSOC), "--requests", str(REQUESTS)]
    if ca:
        cmd += ["--ca", str(ca)]
    if abuse:
        cmd += ["--abuse", "--abuse-secs", "30"]
    probe = Probe(f"{g.public_url}/healthz")
    monitor = Probe(f"http://127.0.0.1:{g.monitor_port}/healthz")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    health = probe.stop()
    monitor_health = monitor.stop()
    if r.returncode != 0:
        raise RuntimeError(f"load client failed: {r.stderr}")
    out = json.loads(r.stdout)
    out["health_in_client"] = out.pop("health")
    out["health"] = health
    out["monitor_health"] = monitor_health
    return out


def main():
    tmp = Path(tempfile.mkdtemp(prefix="pacsgate-load-"))
    procs = []
    try:
        data = tmp / "studies"
        data.mkdir()
        for n, (_, _, blob) in enumerate(generate({PATIENT: {"studies": 20, "series": 1, "instances": 1}}, [])):
            (data / f"{n:05d}.dcm").write_bytes(blob)
        web = FastWeb(tmp, [data])
        procs.append(web.proc)
        origin = FastDimse(tmp, index=[data], patient=PATIENT)
        procs.append(origin.proc)
        issuer = Issuer(tmp)
        procs.append(issuer.proc)
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        ca_file, cert_file, key_file = tmp / "ca.pem", tmp / "cert.pem", tmp / "key.pem"
        ca_file.write_bytes(ca.cert_pem.bytes())
        cert_file.write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
        key_file.write_bytes(cert.private_key_pem.bytes())
        dimse_tls_port, https_port, monitor_port = free_port(), free_port(), free_port()
        g = Gateway(tmp, origin, issuer, name="load-gateway", log_filter="info",
                    dicomweb_url=f"{web.url}/dicom-web", limits_extra=LIMITS,
                    gateway_extra=f'dimse_tls_listen = "127.0.0.1:{dimse_tls_port}"\n'
                                  f'https_listen = "127.0.0.1:{https_port}"\n'
                                  f'monitor_listen = "127.0.0.1:{monitor_port}"',
                    extra=f'[tls]\ncert_file = "{cert_file}"\nkey_file = "{key_file}"\n')
        procs.append(g.proc)
        g.dimse_tls_port, g.https_port, g.monitor_port = dimse_tls_port, https_port, monitor_port
        wait_tcp(https_port, g.proc, "pacsgate https")
        wait_tcp(monitor_port, g.proc, "pacsgate monitor")
        token_file = tmp / "token"
        token_file.write_text(issuer.mint(patient=PATIENT, expires_in=3600))
        rss_start = vm(g.proc.pid, "VmRSS")
        runs = {}
        for transport, c in (("plaintext", None), ("TLS", ca_file)):
            for abuse in (False, True):
                name = f"{transport}{' + flood' if abuse else ''}"
                runs[name] = run_client(g, token_file, ca=c, abuse=abuse)
                runs[name]["gateway_peak_rss_mib"] = vm(g.proc.pid, "VmHWM")
        peak = vm(g.proc.pid, "VmHWM")
    finally:
        for p in procs:
            stop(p)
        if not os.environ.get("KEEP_LOAD_DIR"):
            shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    for name, r in runs.items():
        d, h, hz, mz = r["dimse"], r["http"], r["health"], r["monitor_health"]
        rows.append(
            f"| {name} | {d['ok']}/{ASSOC} ({d['failed']} failed), p50 {d['p50_ms']:.1f} ms, p99 {d['p99_ms']:.1f} ms "
            f"| {h['ok']}/{REQUESTS} ({h['failed']} failed), p50 {h['p50_ms']:.1f} ms, p99 {h['p99_ms']:.1f} ms "
            f"| {hz['ok']} probes, p99 {hz['p99_ms']:.1f} ms, max {hz['max_ms']:.1f} ms, {hz['failed']} failed "
            f"| {mz['ok']} probes, p99 {mz['p99_ms']:.1f} ms, max {mz['max_ms']:.1f} ms, {mz['failed']} failed "
            f"| {r['gateway_peak_rss_mib']:.1f} MiB |"
        )
    floods = [
        f"- {name}: {f['dimse_bad_tokens_rejected']} DIMSE associations with invalid tokens rejected, "
        f"{f['http_bad_tokens_401']} HTTP requests with invalid tokens answered 401 "
        f"(other outcomes: {f['dimse_bad_tokens_other']} DIMSE, {f['http_bad_tokens_other']} HTTP); "
        f"{f['slow_handshakes_closed_by_gateway']}/100 byte-a-time handshakes and "
        f"{f['silent_connections_closed_by_gateway']}/100 silent connections closed by the gateway"
        for name, r in runs.items() if r["abuse"] for f in [r["flood"]]
    ]
    text = "\n".join([
        f"Load: {ASSOC} associations at once (associate, C-ECHO, hold until all are up, C-ECHO, release), then "
        f"{REQUESTS} QIDO-RS searches at once, valid tokens; release build, loopback, {os.cpu_count()} cores, "
        "in front of the project's fast origins. Valid callers from 127.0.0.2-201, the flood from 127.0.1.x, "
        "/healthz probed every 50 ms from 127.0.0.1 by a process of its own, a new connection each time, "
        "on the HTTP front end and on monitor_listen.",
        "",
        "| run | associations (time to associate + first C-ECHO) | QIDO-RS searches | /healthz, front end "
        "| /healthz, monitor_listen | gateway peak RSS |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "The flood (30 s, started 6 s before the valid callers, from 200 addresses of its own):",
        *floods,
        "",
        f"Gateway resident memory: {rss_start:.1f} MiB at start, peak {peak:.1f} MiB over all runs.",
    ])
    write_results("load", text, runs)
    failed = [n for n, r in runs.items() if r["dimse"]["failed"] or r["http"]["failed"]]
    if failed:
        raise SystemExit(f"valid callers were not all served in: {', '.join(failed)}")


if __name__ == "__main__":
    main()
