#!/usr/bin/env python3
"""Transfer benchmark: C-STORE and C-GET of a large study (default 100 instances of 5 MiB =
500 MiB) through the gateway and straight to Orthanc, in one run, with the gateway's peak
resident memory. The client is examples/dimse_bench.rs (release, TCP_NODELAY); the gateway is
the release build with info logging. Writes bench-results/transfer.md.

Run it through scripts/bench-transfer.sh, which builds what it needs.
"""

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))
os.environ.setdefault("PACSGATE_BIN", str(ROOT / "target" / "release" / "pacsgate"))

import pydicom  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from conftest import Gateway, Issuer, Orthanc, stop  # noqa: E402
from dicomdata import make_instance  # noqa: E402

CLIENT = ROOT / "target" / "release" / "examples" / "dimse_bench"
INSTANCES = int(os.environ.get("BENCH_INSTANCES", "100"))
MIB_EACH = int(os.environ.get("BENCH_MIB", "5"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
SC = "1.2.840.10008.5.1.4.1.1.7"
ELE = "1.2.840.10008.1.2.1"


PARTS = 5


def write_study(directory: Path, patient: str) -> str:
    """Writes the study in PARTS sub-directories, so stores can alternate between the two sides."""
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


def vm(pid, field):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # MiB
    return 0.0


def client(addr, called, token_file, *args):
    cmd = [str(CLIENT), "--addr", addr, "--called", called, *args]
    if token_file:
        cmd += ["--token-file", str(token_file)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"dimse_bench failed: {r.stderr}")
    return json.loads(r.stdout)


def main():
    tmp = Path(tempfile.mkdtemp(prefix="pacsgate-bench-transfer-"))
    procs = []
    try:
        print(f"generating 2 studies of {INSTANCES} x {MIB_EACH} MiB ...", flush=True)
        direct_dir, gw_dir = tmp / "direct", tmp / "gateway"
        direct_study = write_study(direct_dir, "BIG")
        gw_study = write_study(gw_dir, "BIG")
        orthanc = Orthanc(tmp)
        procs.append(orthanc.proc)
        issuer = Issuer(tmp)
        procs.append(issuer.proc)
        gw = Gateway(tmp, orthanc, issuer, name="bench-gateway", log_filter="info")
        procs.append(gw.proc)
        token = tmp / "token"
        token.write_text(issuer.mint(patient="BIG", scope="patient/ImagingStudy.cruds"))
        direct = f"127.0.0.1:{orthanc.dicom_port}"
        via = f"127.0.0.1:{gw.dimse_port}"
        rss_start = vm(gw.proc.pid, "VmRSS")

        # Stores alternate part by part, so the PACS's state (database size, page cache) weighs
        # on both sides alike.
        store_direct = {"instances": 0, "bytes": 0, "seconds": 0.0}
        store_gw = {"instances": 0, "bytes": 0, "seconds": 0.0}
        for k in range(PARTS):
            for total, addr, called, tok, d in ((store_direct, direct, "ORTHANC", None, direct_dir), (store_gw, via, "PACSGATE", token, gw_dir)):
                r = client(addr, called, tok, "--mode", "store", "--dir", str(d / f"part{k}"))
                for key in total:
                    total[key] += r[key]
        hwm_store = vm(gw.proc.pid, "VmHWM")
        assert store_direct["instances"] == store_gw["instances"] == INSTANCES
        assert orthanc.counts("BIG")["instances"] == 2 * INSTANCES, "every instance stored"

        gets = {"direct": [], "gateway": []}
        # warm-up: the study is read once so that no side pays for a cold page cache
        client(direct, "ORTHANC", None, "--mode", "get", "--study", direct_study, "--sop-class", SC, "--ts", ELE)
        for _ in range(ROUNDS):
            gets["direct"].append(client(direct, "ORTHANC", None, "--mode", "get", "--study", direct_study, "--sop-class", SC, "--ts", ELE))
            gets["gateway"].append(client(via, "PACSGATE", token, "--mode", "get", "--study", direct_study, "--sop-class", SC, "--ts", ELE))
        for g in gets["direct"] + gets["gateway"]:
            assert g["instances"] == INSTANCES, g
        hwm = vm(gw.proc.pid, "VmHWM")

        def rate(r):
            return r["bytes"] / r["seconds"] / 1e6, r["instances"] / r["seconds"]

        cpu = (Path(f"/proc/{gw.proc.pid}/stat").read_text().rsplit(")", 1)[1].split())
        gw_cpu = (int(cpu[11]) + int(cpu[12])) / os.sysconf("SC_CLK_TCK")

        sd, sg = rate(store_direct), rate(store_gw)
        gd = [rate(r) for r in gets["direct"]]
        gg = [rate(r) for r in gets["gateway"]]
        gd_mb = sum(x[0] for x in gd) / len(gd)
        gg_mb = sum(x[0] for x in gg) / len(gg)
        gd_i = sum(x[1] for x in gd) / len(gd)
        gg_i = sum(x[1] for x in gg) / len(gg)
        total_mib = store_gw["bytes"] / 1024 / 1024
        lines = [
            f"Transfer benchmark: a study of {INSTANCES} instances x {MIB_EACH} MiB ({total_mib:.0f} MiB), release build, loopback, 2 cores",
            "",
            "| operation | direct to Orthanc | through pacsgate | ratio gateway/direct |",
            "|---|---|---|---|",
            f"| C-STORE ({PARTS} alternating parts) | {sd[0]:.1f} MB/s, {sd[1]:.1f} inst/s | {sg[0]:.1f} MB/s, {sg[1]:.1f} inst/s | {sg[0] / sd[0]:.3f} |",
            f"| C-GET (mean of {ROUNDS}) | {gd_mb:.1f} MB/s, {gd_i:.1f} inst/s | {gg_mb:.1f} MB/s, {gg_i:.1f} inst/s | {gg_mb / gd_mb:.3f} |",
            "",
            f"Gateway resident memory: {rss_start:.1f} MiB at start, peak {hwm_store:.1f} MiB after the C-STORE, "
            f"peak {hwm:.1f} MiB over the whole run (limit: 100 MiB). Gateway CPU time for the whole run: {gw_cpu:.2f} s "
            f"for {(store_gw['bytes'] + sum(g['bytes'] for g in gets['gateway'])) / 1e9:.2f} GB relayed.",
        ]
        text = "\n".join(lines)
        print(text)
        out = ROOT / "bench-results"
        out.mkdir(exist_ok=True)
        (out / "transfer.md").write_text(text + "\n")
        if hwm >= 100:
            print("peak memory over 100 MiB", file=sys.stderr)
            sys.exit(1)
    finally:
        for p in reversed(procs):
            stop(p)
        if not os.environ.get("KEEP_BENCH_DIR"):
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
