"""Attack suite, before authentication: anyone who can reach the ports, no token needed.
Silent or half-sent TCP connections to the DIMSE port must not hold the association slots a
valid client needs (they come from another loopback source address, 127.0.0.2, as a second
host would; the valid client uses 127.0.0.1), control characters in AE titles must not forge
lines in the gateway's log, and 1,100 half-sent HTTP requests must neither stop /healthz nor
DIMSE, and are closed by the server within the header timeout."""

import os
import resource
import selectors
import socket
import struct
import time

import pytest
import requests

import rawdicom as rd
from conftest import Gateway, stop
from test_attack_dimse_commands import CONTEXTS, ECHO, assert_gateway_serves, connect

ATTACKER_HOST = "127.0.0.2"  # all of 127/8 is loopback on Linux


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def connect_from(host, port, source, timeout=5.0):
    """A TCP connection from `source`, or None when the server refused or reset it."""
    s = socket.socket()
    s.settimeout(timeout)
    try:
        s.bind((source, 0))
        s.connect((host, port))
        return s
    except OSError:
        s.close()
        return None


def closed_by_server(s) -> bool:
    """Whether the server has closed this connection (EOF or reset); what it sent before
    closing (an A-ABORT, an A-ASSOCIATE-RJ, a 408) is read and dropped."""
    try:
        s.setblocking(False)
        while True:
            data = s.recv(65536)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def wait_all_closed(socks, deadline) -> list:
    """Waits until the server closed every socket or the deadline passes; returns the open ones."""
    # epoll, not select(): there are more than 1024 descriptors here.
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    pending = set(socks)
    try:
        while pending and time.time() < deadline:
            for key, _ in sel.select(0.2):
                if closed_by_server(key.fileobj):
                    pending.discard(key.fileobj)
                    sel.unregister(key.fileobj)
    finally:
        sel.close()
    return list(pending)


@pytest.fixture(scope="module")
def guarded(tmp_root, orthanc, issuer):
    """A gateway with short pre-authentication limits, so the test is fast."""
    d = tmp_root / "attack-preauth"
    d.mkdir()
    g = Gateway(d, orthanc, issuer, name="attack-preauth",
                limits_extra="association_request_timeout_secs = 3\nmax_pending_per_peer = 8\nhttp_header_timeout_secs = 3")
    yield g
    stop(g.proc)


# ---- DIMSE: connections that never finish an A-ASSOCIATE-RQ ----

def prelude(kind, port):
    """What each silent connection sends before it stops."""
    if kind == "silent":
        return b""
    if kind == "three_bytes_of_a_pdu_header":
        return b"\x01\x00\x00"
    if kind == "rq_header_then_nothing":
        return struct.pack(">BBI", 1, 0, 1000) + b"\x00\x01\x00\x00"
    if kind == "most_of_an_rq":
        rq = rd.associate_rq("PACSGATE", "SLOWLORIS", CONTEXTS[:1], token="x" * 200)
        return rq[:-10]
    raise KeyError(kind)


@pytest.mark.parametrize("kind", ["silent", "three_bytes_of_a_pdu_header", "rq_header_then_nothing", "most_of_an_rq"])
def test_silent_dimse_connections_do_not_starve_a_valid_client(guarded, issuer, kind):
    socks = []
    try:
        for _ in range(80):
            s = connect_from("127.0.0.1", guarded.dimse_port, ATTACKER_HOST)
            if s is not None:
                try:
                    s.sendall(prelude(kind, guarded.dimse_port))
                except OSError:
                    pass
                socks.append(s)
        assert socks, "no connection from 127.0.0.2 got through: the test proves nothing"
        # While all of them are held: a valid client associates and echoes at once.
        t0 = time.time()
        a = connect(guarded, issuer.mint(patient="PAT-A"), CONTEXTS[:2], calling="VALID", source="127.0.0.1", timeout=5)
        assert a.echo(ECHO) == rd.SUCCESS
        a.release()
        assert time.time() - t0 < 2.5, f"the valid client waited {time.time() - t0:.1f} s"
        # The gateway closes the silent ones within the request timeout (3 s), with slack.
        left = wait_all_closed(socks, time.time() + 3 + 4)
        assert not left, f"{len(left)} connections that never sent an A-ASSOCIATE-RQ are still open after 7 s"
    finally:
        for s in socks:
            s.close()
    assert_gateway_serves(guarded, issuer)


def connections_open(g) -> dict:
    """`pacsgate_connections_open` by listener, from the gateway's /metrics."""
    text = requests.get(f"{g.public_url}/metrics", headers={"Connection": "close"}, timeout=5).text
    out = {}
    for line in text.splitlines():
        if line.startswith("pacsgate_connections_open{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('listener="', 1)[1].split('"', 1)[0]] = int(float(value))
    return out


def test_every_listener_lets_go_of_finished_connections(guarded, issuer):
    """Each ended connection is joined when it ends, not when the next one arrives: a listener
    that only reaped on accept (or skipped it on one path) would keep a task, and its memory,
    for every association of a flood."""
    token = issuer.mint(patient="PAT-A")
    for i in range(100):
        if i % 3 == 0:
            a = rd.Association(guarded.dimse_port, source=ATTACKER_HOST, timeout=5)
            reply = a.request(rd.associate_rq(guarded.ae_title, "BADTOKEN", CONTEXTS[:1], token="x.y.z"))
            assert isinstance(reply, rd.AssociateRJ), reply
            a.close()
        elif i % 3 == 1:
            # Connected, said nothing, went away.
            rd.Association(guarded.dimse_port, source=ATTACKER_HOST, timeout=5).close()
        else:
            a = connect(guarded, token, CONTEXTS[:2], calling="VALID", source="127.0.0.1", timeout=5)
            assert a.echo(ECHO) == rd.SUCCESS
            a.release()
    for _ in range(50):
        assert requests.get(f"{guarded.public_url}/healthz", headers={"Connection": "close"}, timeout=5).ok
    deadline = time.time() + 5
    while True:
        n = connections_open(guarded)
        # The scrape itself is the one HTTP connection left.
        if n.get("dimse") == 0 and n.get("http") == 1:
            break
        assert time.time() < deadline, f"connections still held 5 s after they ended: {n}"
        time.sleep(0.2)


# ---- log forging through AE titles ----

# calling AE, called AE, and the text that must never start a log line
AE_CASES = {
    "newline_in_calling": (b"X\nFORGED-LINE-1", "PACSGATE", "FORGED-LINE-1"),
    "carriage_return_in_calling": (b"X\rFORGED-LINE-2", "PACSGATE", "FORGED-LINE-2"),
    "crlf_in_calling": (b"\r\nFORGED-LINE-3", "PACSGATE", "FORGED-LINE-3"),
    "escape_sequences_in_calling": (b"\x1b[2K\x1b[1GFORGED4", "PACSGATE", "FORGED4"),
    "nul_and_newline_in_calling": (b"\x00\nFORGED-LINE-5", "PACSGATE", "FORGED-LINE-5"),
    "newline_in_called": (b"VIEWER", b"P\nFORGED-LINE-6", "FORGED-LINE-6"),
    "vertical_tab_and_newline": (b"\x0b\x0c\nFORGED-LINE-7", "PACSGATE", "FORGED-LINE-7"),
}


@pytest.mark.parametrize("with_token", [True, False], ids=["valid_token", "no_token"])
@pytest.mark.parametrize("case", list(AE_CASES))
def test_control_characters_in_ae_titles_forge_no_log_line(gateway, issuer, case, with_token):
    calling, called, m = AE_CASES[case]
    already = len(gateway.log_text())
    a = rd.Association(gateway.dimse_port, timeout=10)
    token = issuer.mint(patient="PAT-A") if with_token else None
    try:
        answer = a.request(rd.associate_rq(called, calling, CONTEXTS[:2], token=token))
        if isinstance(answer, rd.AssociateAC):
            a.echo(ECHO)
            a.release()
    except (rd.Aborted, rd.Closed):
        pass
    finally:
        a.close()
    time.sleep(0.5)  # let the gateway write its lines
    log = gateway.log_text()[already:]  # what this test made the gateway write
    forged = [line for line in log.splitlines() if line.lstrip(" \t\x00\x0b\x0c").startswith(m)]
    assert not forged, f"forged log lines: {forged}"
    assert "\x1b" not in log, "an escape sequence reached the log"
    assert "\r" not in log, "a carriage return reached the log"
    assert "\x0b" not in log and "\x0c" not in log and "\x00" not in log
    assert_gateway_serves(gateway, issuer)


# ---- HTTP: half-sent requests ----

@pytest.fixture
def many_descriptors():
    """Raises this process's own descriptor limit for the test's sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 8192) if hard != resource.RLIM_INFINITY else 8192
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def http_guarded(tmp_root, orthanc, issuer, many_descriptors):
    """A gateway started with a common descriptor limit of 1024 (inherited at spawn), so that
    1,100 held connections would exhaust it if nothing bounded them."""
    d = tmp_root / "attack-preauth-http"
    d.mkdir(exist_ok=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    try:
        g = Gateway(d, orthanc, issuer, name="attack-preauth-http", limits_extra="http_header_timeout_secs = 3")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    yield g
    stop(g.proc)


@pytest.mark.parametrize("kind", ["partial_header", "request_line_only"])
def test_half_sent_http_requests_do_not_starve_healthz_or_dimse(http_guarded, issuer, kind):
    g = http_guarded
    fds_before = open_fds(g.proc.pid)
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " if kind == "partial_header" else b"GET /dicom-web/studies HTTP/1.1\r\n"
    socks, refused = [], 0
    try:
        for _ in range(1100):
            s = connect_from("127.0.0.1", g.http_port, ATTACKER_HOST, timeout=2)
            if s is None:
                refused += 1
                continue
            try:
                s.sendall(head)
            except OSError:
                pass
            socks.append(s)
        t0 = time.time()
        r = requests.get(f"{g.public_url}/healthz", timeout=5)
        assert r.status_code == 200
        a = connect(g, issuer.mint(patient="PAT-A"), CONTEXTS[:2], calling="VALID", source="127.0.0.1", timeout=5)
        assert a.echo(ECHO) == rd.SUCCESS
        a.release()
        assert time.time() - t0 < 5, f"healthz and a C-ECHO took {time.time() - t0:.1f} s"
        left = wait_all_closed(socks, time.time() + 3 + 5)
        assert not left, f"{len(left)} half-sent requests are still open 8 s later (header timeout 3 s)"
    finally:
        for s in socks:
            s.close()
    time.sleep(0.5)
    assert open_fds(g.proc.pid) <= fds_before + 16, "the gateway kept descriptors of closed connections"
    assert_gateway_serves(g, issuer)
