#!/usr/bin/env python3
"""Transfer benchmark: C-STORE and C-GET of a large study (default 100 instances of 5 MiB =
500 MiB) straight to the PACS, through a plain TCP relay (haproxy, TCP mode) and through the
gateway, in one run; against Orthanc and against the project's fast origin
(examples/bench_origin_dimse.rs: stores discarded, C-GET served from memory), so that the
gateway's own cost shows without Orthanc's. Reports the gateways' peak resident memory. The
client is examples/dimse_bench.rs (release, TCP_NODELAY); the gateways are release builds with
info logging. Each side stores a study of its own (Orthanc would take a second copy of the
same instances as a no-op); every side retrieves the same study. A measurement: it asserts
only that every side stored and retrieved every instance, and fails if a gateway's peak memory
reaches 100 MiB. Writes bench-results/transfer.md.

Run it through scripts/bench-transfer.sh, which installs haproxy and builds what it needs.
Environment: BENCH_INSTANCES (100), BENCH_MIB per instance (5), BENCH_ROUNDS of C-GET (3),
PACSGATE_BIN (the gateway binary), KEEP_BENCH_DIR=1 keeps the temporary directory.
"""

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchlib import EXAMPLES, FastDimse, Haproxy, cpu_seconds, fast_gateway, ratio, vm, write_results

import pydicom  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from conftest import Gateway, Issuer, Orthanc, stop  # noqa: E402
from dicomdata import make_instance  # noqa: E402

CLIENT = EXAMPLES / "dimse_bench"
INSTANCES = int(os.environ.get("BENCH_INSTANCES", "100"))
MIB_EACH = int(os.environ.get("BENCH_MIB", "5"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
SC = "1.2.840.10008.5.1.4.1.1.7"
ELE = "1.2.840.10008.1.2.1"
SIDES = ("direct", "relay", "gateway")
TARGETS = ("orthanc", "fast")
PARTS = 5


def write_study(directory: Path, patient: str) -> str:
    """Writes the study in PARTS sub-directories, so stores can alternate between the sides."""
    study, series = generate_uid(), generate_uid()
    side = int((MIB_EACH * 1024 * 1024 / 2) ** 0.5)
    for i in range(INSTANCES):
        part = directory / f"part{i % PARTS}"
        part.mkdir(parents=True, exist_ok=True)
        ds = pydicom.dcmread(io.BytesIO(make_instance(patient, study, series, 1, 1, i + 1, "20250101")))
        ds.Rows = ds.Columns = side
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelData = os.urandom(side * side * 2)
        ds.save_as(part / f"{i:05d}.dcm", enforce_file_format=True)
    return study


def client(addr, called, token_file, *args):
    cmd = [str(CLIENT), "--addr", addr, "--called", called, *args]
    if token_file:
        cmd += ["--token-file", str(token_file)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"dimse_bench failed against {addr}: {r.stderr}")
    return json.loads(r.stdout)


def main():
    tmp = Path(tempfile.mkdtemp(prefix="pacsgate-bench-transfer-"))
    procs = []
    try:
        print(f"generating {len(SIDES)} studies of {INSTANCES} x {MIB_EACH} MiB ...", flush=True)
        dirs = {s: tmp / f"study-{s}" for s in SIDES}
        studies = {s: write_study(d, "BIG") for s, d in dirs.items()}
        orthanc = Orthanc(tmp)
        procs.append(orthanc.proc)
        # The fast origin holds the study every side retrieves; the others are new to it.
        fast = FastDimse(tmp, dirs=[dirs["direct"]], patient="BIG")
        procs.append(fast.proc)
        relay = Haproxy(tmp, orthanc.dicom_port, name="haproxy-orthanc")
        procs.append(relay.proc)
        fast_relay = Haproxy(tmp, fast.dicom_port, name="haproxy-fast")
        procs.append(fast_relay.proc)
        issuer = Issuer(tmp)
        procs.append(issuer.proc)
        gw = Gateway(tmp, orthanc, issuer, name="bench-gateway", log_filter="info")
        procs.append(gw.proc)
        fast_gw = fast_gateway(tmp, fast, issuer)
        procs.append(fast_gw.proc)
        token = tmp / "token"
        token.write_text(issuer.mint(patient="BIG", scope="patient/ImagingStudy.cruds"))
        gateways = {"orthanc": gw, "fast": fast_gw}
        rss_start = {t: vm(g.proc.pid, "VmRSS") for t, g in gateways.items()}
        sides = {
            ("orthanc", "direct"): (f"127.0.0.1:{orthanc.dicom_port}", orthanc.aet, None),
            ("orthanc", "relay"): (f"127.0.0.1:{relay.port}", orthanc.aet, None),
            ("orthanc", "gateway"): (f"127.0.0.1:{gw.dimse_port}", "PACSGATE", token),
            ("fast", "direct"): (f"127.0.0.1:{fast.dicom_port}", fast.aet, None),
            ("fast", "relay"): (f"127.0.0.1:{fast_relay.port}", fast.aet, None),
            ("fast", "gateway"): (f"127.0.0.1:{fast_gw.dimse_port}", "PACSGATE", token),
        }

        # Stores alternate part by part between the sides, so the PACS's state (database size,
        # page cache) weighs on all alike.
        stores = {k: {"instances": 0, "bytes": 0, "seconds": 0.0} for k in sides}
        for k in range(PARTS):
            for (t, s), (addr, called, tok) in sides.items():
                r = client(addr, called, tok, "--mode", "store", "--dir", str(dirs[s] / f"part{k}"))
                for key in stores[(t, s)]:
                    stores[(t, s)][key] += r[key]
        hwm_store = {t: vm(g.proc.pid, "VmHWM") for t, g in gateways.items()}
        for k, v in stores.items():
            assert v["instances"] == INSTANCES, f"{k} stored {v['instances']} instances"
        assert orthanc.counts("BIG")["instances"] == len(SIDES) * INSTANCES, "every instance stored in Orthanc"

        gets = {k: [] for k in sides}
        get_args = ("--mode", "get", "--study", studies["direct"], "--sop-class", SC, "--ts", ELE)
        # warm-up: the study is read once so that no side pays for a cold page cache
        client(*sides[("orthanc", "direct")], *get_args)
        client(*sides[("fast", "direct")], *get_args)
        for _ in range(ROUNDS):
            for k, (addr, called, tok) in sides.items():
                gets[k].append(client(addr, called, tok, *get_args))
        for k, v in gets.items():
            for g in v:
                assert g["instances"] == INSTANCES, f"{k} retrieved {g['instances']} instances"
            assert len({g["bytes"] for g in v} | {gets[("orthanc", "direct")][0]["bytes"]}) == 1, \
                f"{k}: every side must retrieve the same bytes"
        hwm = {t: vm(g.proc.pid, "VmHWM") for t, g in gateways.items()}
        cpu = {t: cpu_seconds(g.proc.pid) for t, g in gateways.items()}

        def rate(r):
            return r["bytes"] / r["seconds"] / 1e6, r["instances"] / r["seconds"]

        def mean_rate(rs):
            x = [rate(r) for r in rs]
            return sum(a for a, _ in x) / len(x), sum(b for _, b in x) / len(x)

        total_mib = stores[("orthanc", "gateway")]["bytes"] / 1024 / 1024
        lines = [
            f"Transfer benchmark: a study of {INSTANCES} instances x {MIB_EACH} MiB ({total_mib:.0f} MiB), release build, loopback, 2 cores.",
            "Relay: haproxy in TCP mode. Ratios are the side's throughput over direct's (below 1 is slower).",
        ]
        for t, title in (("orthanc", "Orthanc"), ("fast", "the fast origin (examples/bench_origin_dimse.rs)")):
            st = {s: rate(stores[(t, s)]) for s in SIDES}
            gt = {s: mean_rate(gets[(t, s)]) for s in SIDES}
            g = gateways[t]
            relayed = stores[(t, "gateway")]["bytes"] + sum(r["bytes"] for r in gets[(t, "gateway")])
            lines += [
                "",
                f"Against {title}:",
                "",
                "| operation | direct | through haproxy | through pacsgate | haproxy/direct | pacsgate/direct |",
                "|---|---|---|---|---|---|",
                f"| C-STORE ({PARTS} alternating parts) | " + " | ".join(f"{st[s][0]:.1f} MB/s, {st[s][1]:.1f} inst/s" for s in SIDES)
                + f" | {ratio(st['relay'][0], st['direct'][0])} | {ratio(st['gateway'][0], st['direct'][0])} |",
                f"| C-GET (mean of {ROUNDS}) | " + " | ".join(f"{gt[s][0]:.1f} MB/s, {gt[s][1]:.1f} inst/s" for s in SIDES)
                + f" | {ratio(gt['relay'][0], gt['direct'][0])} | {ratio(gt['gateway'][0], gt['direct'][0])} |",
                "",
                f"Gateway resident memory: {rss_start[t]:.1f} MiB at start, peak {hwm_store[t]:.1f} MiB after the C-STORE, "
                f"peak {hwm[t]:.1f} MiB over the whole run (limit: 100 MiB). Gateway CPU time for the whole run: {cpu[t]:.2f} s "
                f"for {relayed / 1e9:.2f} GB relayed.",
            ]
        write_results("transfer", "\n".join(lines), {f"{t}_{s}": {"store": stores[(t, s)], "get": gets[(t, s)]} for t, s in sides})
        if max(hwm.values()) >= 100:
            print("a gateway's peak memory reached 100 MiB", file=sys.stderr)
            sys.exit(1)
    finally:
        for p in reversed(procs):
            stop(p)
        if not os.environ.get("KEEP_BENCH_DIR"):
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
