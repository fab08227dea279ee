"""The newcomer's demo (the README's first command), run as a new user would: it shows both
protocols, and Ctrl-C stops every process it started within five seconds. It uses the demo's
fixed loopback ports (11112, 11113, 8080, 9400, 14242, 18042, 3000), below the range free ports come
from, and the gateway binary under test instead of building the release one."""

import os
import signal
import socket
import subprocess
import threading
import time

from conftest import ROOT, binary

DEMO_PORTS = (11112, 11113, 8080, 9400, 14242, 18042, 3000)


def listening(port):
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def descendants(pid):
    """Every process below `pid`, from /proc."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_demo_shows_both_protocols_and_ctrl_c_stops_everything():
    busy = [p for p in DEMO_PORTS if listening(p)]
    assert not busy, f"the demo's ports are in use by something else: {busy}"
    proc = subprocess.Popen(["bash", "scripts/demo.sh"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env=dict(os.environ, PACSGATE_BIN=str(binary())))
    lines, ready = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if "Press Ctrl-C" in line:
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(240), "the demo did not get to its prompt:\n" + "".join(lines[-40:])
        out = "".join(lines)
        # DIMSE and DICOMweb, the same token: only DEMO-A, the other patient's study refused.
        qido = out.split("QIDO-RS", 1)[1].split("== WADO-RS", 1)[0]
        assert "3 studies" in qido and "DEMO-A" in qido and "DEMO-B" not in qido, qido
        assert "metadata of DEMO-A's study" in out and out.split("metadata of DEMO-A's study", 1)[1].split("\n", 1)[0].endswith(": 200"), out
        refused = out.split("metadata of DEMO-B's study", 1)[1].split("\n", 1)[0]
        assert ": 403 (refused)" in refused, refused
        assert "without a token: 401" in out and "Bearer" in out.split("without a token:", 1)[1].split("\n", 1)[0], out
        assert "DICOMweb is not configured" not in out
        # The app's path: the EHR token exchanged once for the imaging server's own, which
        # then serves FHIR, WADO-RS and DIMSE for DEMO-A only.
        app = out.split("an imaging app's path", 1)[1].split("== OHIF", 1)[0]
        assert "exchanged: scope 'patient/ImagingStudy.rs', patient DEMO-A" in app, app
        assert "the same EHR token again: invalid_grant" in app, app
        assert app.count("WADO-RS metadata 200") == 3 and "DEMO-B with DEMO-A's imaging token: 403" in app, app
        assert "3 match(es), final status 0x0000" in app and "PatientID=DEMO-B" not in app, app
        started = descendants(proc.pid)
        assert len(started) >= 3, f"the demo runs Orthanc, the issuer and the gateway: {started}"
        # Ctrl-C in a terminal signals the whole foreground process group.
        t0 = time.time()
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=15)
        took = time.time() - t0
        left = [p for p in started if alive(p)]
        assert not left, f"still running after Ctrl-C: {left}"
        assert took < 5, f"Ctrl-C took {took:.1f} s to stop the demo"
        assert not [p for p in DEMO_PORTS if listening(p)], "a demo port still listens"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for p in descendants(proc.pid):
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
