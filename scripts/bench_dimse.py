#!/usr/bin/env python3
"""DIMSE benchmark: the gateway versus straight to Orthanc, in one run.

Measures (1) association + C-ECHO + release and (2) a study-level C-FIND returning 100 matches,
with examples/dimse_bench.rs as the client (release build, TCP_NODELAY), against Orthanc
directly and through `pacsgate serve` (release build, info logging with the audit trail, as in
production). Runs alternate in rounds so drift affects both sides alike. Prints a table and
writes it to bench-results/dimse.md.

Run it through scripts/bench-dimse.sh, which builds what it needs.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))
os.environ.setdefault("PACSGATE_BIN", str(ROOT / "target" / "release" / "pacsgate"))

from conftest import Gateway, Issuer, Orthanc, stop  # noqa: E402
from dicomdata import generate  # noqa: E402

CLIENT = ROOT / "target" / "release" / "examples" / "dimse_bench"
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
ASSOC_PER_ROUND = int(os.environ.get("BENCH_ASSOC", "200"))
FIND_PER_ROUND = int(os.environ.get("BENCH_FIND", "40"))


def cpu_seconds(pid):
    """User + system CPU time of a process, from /proc (clock ticks of 1/100 s)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client(addr, called, mode, count, token_file=None):
    cmd = [str(CLIENT), "--addr", addr, "--called", called, "--mode", mode, "--count", str(count)]
    if token_file:
        cmd += ["--token-file", str(token_file)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"dimse_bench failed: {r.stderr}")
    return json.loads(r.stdout)


def main():
    tmp = Path(tempfile.mkdtemp(prefix="pacsgate-bench-"))
    orthanc = Orthanc(tmp)
    procs = [orthanc.proc]
    try:
        shape = {"BENCH": {"studies": 100, "series": 1, "instances": 1}, "OTHER": {"studies": 20, "series": 1, "instances": 1}}
        for _, _, data in generate(shape, []):
            orthanc.upload(data)
        issuer = Issuer(tmp)
        procs.append(issuer.proc)
        gw = Gateway(tmp, orthanc, issuer, name="bench-gateway", log_filter="info")
        procs.append(gw.proc)
        token_file = tmp / "token"
        token_file.write_text(issuer.mint(patient="BENCH"))
        direct = f"127.0.0.1:{orthanc.dicom_port}"
        via = f"127.0.0.1:{gw.dimse_port}"
        # warm-up: keys fetched, connections and caches warm on both sides
        client(direct, "ORTHANC", "assoc", 20)
        client(via, "PACSGATE", "assoc", 20, token_file)
        client(direct, "ORTHANC", "find", 5)
        client(via, "PACSGATE", "find", 5, token_file)

        res = {k: [] for k in ("assoc_direct", "assoc_gw", "find_direct", "find_gw")}
        cpu = {"assoc": 0.0, "find": 0.0}
        for _ in range(ROUNDS):
            res["assoc_direct"].append(client(direct, "ORTHANC", "assoc", ASSOC_PER_ROUND))
            c0 = cpu_seconds(gw.proc.pid)
            res["assoc_gw"].append(client(via, "PACSGATE", "assoc", ASSOC_PER_ROUND, token_file))
            c1 = cpu_seconds(gw.proc.pid)
            res["find_direct"].append(client(direct, "ORTHANC", "find", FIND_PER_ROUND))
            c2 = cpu_seconds(gw.proc.pid)
            res["find_gw"].append(client(via, "PACSGATE", "find", FIND_PER_ROUND, token_file))
            c3 = cpu_seconds(gw.proc.pid)
            cpu["assoc"] += c1 - c0
            cpu["find"] += c3 - c2
        matches = {r["matches_per_query"] for r in res["find_direct"] + res["find_gw"]}
        assert matches == {100}, f"both sides must return the 100 matches: {matches}"

        def med(key, field):
            return statistics.median(r[field] for r in res[key])

        a_d, a_g = med("assoc_direct", "p50_us"), med("assoc_gw", "p50_us")
        a_d99, a_g99 = med("assoc_direct", "p99_us"), med("assoc_gw", "p99_us")
        f_d, f_g = med("find_direct", "mean_us"), med("find_gw", "mean_us")
        f_d50, f_g50 = med("find_direct", "p50_us"), med("find_gw", "p50_us")
        lines = [
            f"DIMSE benchmark, {ROUNDS} rounds (median of per-round figures), release build, loopback, 2 cores",
            "",
            "| measure | direct to Orthanc | through pacsgate | difference |",
            "|---|---|---|---|",
            f"| association + C-ECHO + release, p50 | {a_d/1000:.3f} ms | {a_g/1000:.3f} ms | {(a_g-a_d)/1000:+.3f} ms |",
            f"| association + C-ECHO + release, p99 | {a_d99/1000:.3f} ms | {a_g99/1000:.3f} ms | {(a_g99-a_d99)/1000:+.3f} ms |",
            f"| study C-FIND, 100 matches, p50 | {f_d50/1000:.3f} ms | {f_g50/1000:.3f} ms | {(f_g50-f_d50)/1000:+.3f} ms |",
            f"| study C-FIND throughput | {1e6/f_d:.1f} queries/s | {1e6/f_g:.1f} queries/s | ratio {f_d/f_g:.3f} |",
            "",
            f"Gateway CPU time: {cpu['assoc'] * 1e6 / (ROUNDS * ASSOC_PER_ROUND):.0f} us per association, "
            f"{cpu['find'] * 1e6 / (ROUNDS * FIND_PER_ROUND):.0f} us per 100-match C-FIND.",
            f"({ROUNDS * ASSOC_PER_ROUND} associations and {ROUNDS * FIND_PER_ROUND} C-FINDs per side.)",
        ]
        text = "\n".join(lines)
        print(text)
        out = ROOT / "bench-results"
        out.mkdir(exist_ok=True)
        (out / "dimse.md").write_text(text + "\n")
        (out / "dimse.json").write_text(json.dumps(res, indent=1))
    finally:
        for p in reversed(procs):
            stop(p)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
