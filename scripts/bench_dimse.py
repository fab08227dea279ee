#!/usr/bin/env python3
"""DIMSE benchmark: straight to the PACS, through a plain TCP relay, and through the gateway,
in one run; against Orthanc and against the project's fast origin.

Measures (1) association + C-ECHO + release and (2) a study-level C-FIND returning 100 matches,
with examples/dimse_bench.rs as the client (release build, TCP_NODELAY), on six sides: Orthanc
directly, through haproxy (TCP mode) and through `pacsgate serve`; and the same three in front
of examples/bench_origin_dimse.rs, which answers from memory (100 canned matches, look-ups),
so that the gateway's own cost shows without Orthanc's. The gateways are release builds with
info logging and the audit trail, as in production. Runs alternate between the sides in
rounds so drift affects all alike. Asserts only that every side returned the 100 matches.
Prints the tables and writes them to bench-results/dimse.md (per-round figures in dimse.json).

Run it through scripts/bench-dimse.sh, which installs haproxy and builds what it needs.
Environment: BENCH_ROUNDS (5), BENCH_ASSOC associations per round and side (200),
BENCH_FIND C-FINDs per round and side (40), PACSGATE_BIN (the gateway binary).
"""

import json
import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from benchlib import EXAMPLES, FastDimse, Haproxy, cpu_seconds, fast_gateway, ratio, write_results
from conftest import Gateway, Issuer, Orthanc, stop
from dicomdata import generate

CLIENT = EXAMPLES / "dimse_bench"
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
ASSOC_PER_ROUND = int(os.environ.get("BENCH_ASSOC", "200"))
FIND_PER_ROUND = int(os.environ.get("BENCH_FIND", "40"))
SIDES = ("direct", "relay", "gateway")


def client(addr, called, mode, count, token_file=None):
    cmd = [str(CLIENT), "--addr", addr, "--called", called, "--mode", mode, "--count", str(count)]
    if token_file:
        cmd += ["--token-file", str(token_file)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"dimse_bench failed against {addr}: {r.stderr}")
    return json.loads(r.stdout)


def main():
    tmp = Path(tempfile.mkdtemp(prefix="pacsgate-bench-"))
    procs = []
    try:
        orthanc = Orthanc(tmp)
        procs.append(orthanc.proc)
        shape = {"BENCH": {"studies": 100, "series": 1, "instances": 1}, "OTHER": {"studies": 20, "series": 1, "instances": 1}}
        for _, _, data in generate(shape, []):
            orthanc.upload(data)
        fast = FastDimse(tmp, patient="BENCH", matches=100)
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
        token_file = tmp / "token"
        token_file.write_text(issuer.mint(patient="BENCH"))

        # (target, side) -> (address, called AE, token file, gateway process or None)
        sides = {
            ("orthanc", "direct"): (f"127.0.0.1:{orthanc.dicom_port}", orthanc.aet, None, None),
            ("orthanc", "relay"): (f"127.0.0.1:{relay.port}", orthanc.aet, None, None),
            ("orthanc", "gateway"): (f"127.0.0.1:{gw.dimse_port}", "PACSGATE", token_file, gw.proc),
            ("fast", "direct"): (f"127.0.0.1:{fast.dicom_port}", fast.aet, None, None),
            ("fast", "relay"): (f"127.0.0.1:{fast_relay.port}", fast.aet, None, None),
            ("fast", "gateway"): (f"127.0.0.1:{fast_gw.dimse_port}", "PACSGATE", token_file, fast_gw.proc),
        }
        # warm-up: keys fetched, connections and caches warm on every side
        for addr, called, tok, _ in sides.values():
            client(addr, called, "assoc", 20, tok)
            client(addr, called, "find", 5, tok)

        res = {f"{mode}_{t}_{s}": [] for mode in ("assoc", "find") for (t, s) in sides}
        cpu = {f"{mode}_{t}": 0.0 for mode in ("assoc", "find") for t in ("orthanc", "fast")}
        for _ in range(ROUNDS):
            for mode, count in (("assoc", ASSOC_PER_ROUND), ("find", FIND_PER_ROUND)):
                for (t, s), (addr, called, tok, gproc) in sides.items():
                    c0 = cpu_seconds(gproc.pid) if gproc else 0.0
                    res[f"{mode}_{t}_{s}"].append(client(addr, called, mode, count, tok))
                    if gproc:
                        cpu[f"{mode}_{t}"] += cpu_seconds(gproc.pid) - c0
        matches = {k: {r["matches_per_query"] for r in v} for k, v in res.items() if k.startswith("find_")}
        assert all(m == {100} for m in matches.values()), f"every side must return the 100 matches: {matches}"

        def med(key, field):
            return statistics.median(r[field] for r in res[key])

        lines = [
            f"DIMSE benchmark, {ROUNDS} rounds (median of per-round figures), release build, loopback, 2 cores.",
            "Relay: haproxy in TCP mode. Ratios are the side's figure over direct's: above 1 is slower for a",
            "latency, below 1 is slower for a throughput.",
        ]
        for t, title in (("orthanc", "Orthanc"), ("fast", "the fast origin (examples/bench_origin_dimse.rs)")):
            rows = []
            for label, mode, field, conv, unit in (
                ("association + C-ECHO + release, p50", "assoc", "p50_us", lambda v: v / 1000, "ms"),
                ("association + C-ECHO + release, p99", "assoc", "p99_us", lambda v: v / 1000, "ms"),
                ("study C-FIND, 100 matches, p50", "find", "p50_us", lambda v: v / 1000, "ms"),
                ("study C-FIND throughput", "find", "mean_us", lambda v: 1e6 / v, "queries/s"),
            ):
                v = {s: conv(med(f"{mode}_{t}_{s}", field)) for s in SIDES}
                fmt = "{:.3f} " + unit if unit == "ms" else "{:.1f} " + unit
                rows.append(f"| {label} | " + " | ".join(fmt.format(v[s]) for s in SIDES)
                            + f" | {ratio(v['relay'], v['direct'])} | {ratio(v['gateway'], v['direct'])} |")
            lines += [
                "",
                f"Against {title}:",
                "",
                "| measure | direct | through haproxy | through pacsgate | haproxy/direct | pacsgate/direct |",
                "|---|---|---|---|---|---|",
                *rows,
                "",
                f"Gateway CPU time: {cpu[f'assoc_{t}'] * 1e6 / (ROUNDS * ASSOC_PER_ROUND):.0f} us per association, "
                f"{cpu[f'find_{t}'] * 1e6 / (ROUNDS * FIND_PER_ROUND):.0f} us per 100-match C-FIND.",
            ]
        lines.append(f"\n({ROUNDS * ASSOC_PER_ROUND} associations and {ROUNDS * FIND_PER_ROUND} C-FINDs per side.)")
        write_results("dimse", "\n".join(lines), res)
    finally:
        for p in reversed(procs):
            stop(p)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
