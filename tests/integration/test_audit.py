"""The ATNA audit trail as an audit repository receives it: DICOM PS3.15 A.5 AuditMessage XML in
RFC 5424 syslog over UDP (RFC 5426), TCP (RFC 6587 octet counting) and TLS (RFC 5425), received
by listeners in the test on loopback, and the same records as JSON lines in a file. Every
message is validated against the DICOM audit message schema shipped with the tests
(schema/audit-message.rnc, PS3.15 A.5.1.1). A receiver that is down costs clinical traffic
nothing but a metric."""

import json
import re
import socket
import ssl
import threading
import time
from pathlib import Path

import lxml.etree as ET
import pytest
import requests
import rnc2rng
import trustme

from conftest import Gateway, free_port, stop
from test_dimse_association import associate
from test_dimse_store_get import connect, get, get_query, own

FRAME = re.compile(rb"^<(\d+)>1 (\S+) (\S+) pacsgate (\d+) IHE\+RFC-3881 - \xef\xbb\xbf(.*)$", re.S)


@pytest.fixture(scope="module")
def schema():
    rnc = Path(__file__).parent / "schema" / "audit-message.rnc"
    return ET.RelaxNG(ET.fromstring(rnc2rng.dumps(rnc2rng.load(str(rnc))).encode()))


class Receiver:
    """A syslog receiver on loopback: UDP datagrams, or TCP (optionally TLS) streams framed by
    octet counting. Keeps every message's raw frame."""

    def __init__(self, kind, tls_context=None):
        self.kind, self.frames, self.lock = kind, [], threading.Lock()
        family = socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM
        self.sock = socket.socket(socket.AF_INET, family)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.tls_context = tls_context
        if kind != "udp":
            self.sock.listen()
        threading.Thread(target=self.run, daemon=True).start()

    def run(self):
        if self.kind == "udp":
            while True:
                data, _ = self.sock.recvfrom(65535)
                with self.lock:
                    self.frames.append(data)
        while True:
            conn, _ = self.sock.accept()
            if self.tls_context:
                conn = self.tls_context.wrap_socket(conn, server_side=True)
            threading.Thread(target=self.read_stream, args=(conn,), daemon=True).start()

    def read_stream(self, conn):
        buf = b""
        while True:
            data = conn.recv(65536)
            if not data:
                return
            buf += data
            while b" " in buf:
                length, rest = buf.split(b" ", 1)
                assert length.isdigit(), f"not octet counting: {buf[:40]!r}"
                n = int(length)
                if len(rest) < n:
                    break
                with self.lock:
                    self.frames.append(rest[:n])
                buf = rest[n:]

    def messages(self, schema):
        """(PRI, XML tree) of every frame so far; each frame must be RFC 5424 and each XML valid."""
        with self.lock:
            frames = list(self.frames)
        out = []
        for f in frames:
            m = FRAME.match(f)
            assert m, f"not an RFC 5424 frame: {f[:120]!r}"
            tree = ET.fromstring(m.group(5))
            assert schema.validate(tree), f"{schema.error_log.last_error}\n{m.group(5).decode()}"
            out.append((int(m.group(1)), tree))
        return out


def events(messages, code):
    return [t for _, t in messages if t.find("EventIdentification/EventID").get("csd-code") == code]


def objects(tree, type_code):
    return {p.get("ParticipantObjectID") for p in tree.findall("ParticipantObjectIdentification")
            if p.get("ParticipantObjectTypeCode") == type_code}


def audited_gateway(d, orthanc, issuer, name, syslog, extra=""):
    return Gateway(d, orthanc, issuer, name=name,
                   extra=f'[audit]\nsyslog = "{syslog}"\njson_file = "{d / (name + ".jsonl")}"\nsource_id = "PACSGATE-TEST"\n{extra}')


def drive(g, issuer, orthanc):
    """An allowed C-GET, an allowed QIDO-RS, a refused WADO-RS (another patient's study) and a
    refused association (a bad token); returns (study got, study refused, token)."""
    token = issuer.mint(patient="PAT-A", claims={"fhirUser": "Practitioner/dr-who"})
    mine = own(orthanc, "PAT-A")[0][1]
    theirs = own(orthanc, "PAT-B")[0][1]
    assoc = connect(g, token, [])
    assert get(assoc, get_query("STUDY", study=mine))[0] == 0x0000
    assoc.release()
    auth = {"Authorization": f"Bearer {token}"}
    assert requests.get(f"{g.public_url}/dicom-web/studies", headers=auth, timeout=30).status_code == 200
    assert requests.get(f"{g.public_url}/dicom-web/studies/{theirs}/metadata", headers=auth, timeout=30).status_code == 403
    bad, _ = associate(g, "not-a-token")
    assert not bad.is_established
    return mine, theirs, token


def wait_for(receiver, schema, predicate, timeout=10):
    deadline = time.time() + timeout
    while True:
        msgs = receiver.messages(schema)
        if predicate(msgs):
            return msgs
        assert time.time() < deadline, f"audit messages not received: {len(msgs)} so far"
        time.sleep(0.2)


@pytest.mark.parametrize("kind", ["udp", "tcp", "tls"])
def test_decisions_reach_the_syslog_receiver_as_schema_valid_audit_messages(tmp_root, orthanc, issuer, schema, kind):
    d = tmp_root / f"audit-{kind}"
    d.mkdir()
    extra, context = "", None
    if kind == "tls":
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(context)
        ca_file = d / "audit-ca.pem"
        ca_file.write_bytes(ca.cert_pem.bytes())
        extra = f'syslog_ca_file = "{ca_file}"\n'
    receiver = Receiver("udp" if kind == "udp" else "tcp", context)
    g = audited_gateway(d, orthanc, issuer, f"audit-{kind}", f"{kind}://127.0.0.1:{receiver.port}", extra)
    try:
        mine, theirs, token = drive(g, issuer, orthanc)
        msgs = wait_for(receiver, schema, lambda m: events(m, "110113") and events(m, "110104"))
    finally:
        stop(g.proc)
    assert g.proc.returncode == 0
    msgs = wait_for(receiver, schema, lambda m: len(events(m, "110100")) >= 2)
    raw = b"".join(receiver.frames)
    assert token.encode() not in raw, "a token reached the audit trail"

    # Application Activity: started, then stopped.
    starts = [t.find("EventIdentification/EventTypeCode").get("csd-code") for t in events(msgs, "110100")]
    assert starts[0] == "110120" and starts[-1] == "110121", starts

    # The C-GET: DICOM Instances Transferred, read, success, naming the user, the patient, the study.
    got = [t for t in events(msgs, "110104") if mine in objects(t, "2")]
    assert got, "no 110104 for the C-GET"
    t = got[0]
    ev = t.find("EventIdentification")
    assert ev.get("EventActionCode") == "R" and ev.get("EventOutcomeIndicator") == "0"
    user = [p for p in t.findall("ActiveParticipant") if p.get("UserIsRequestor") == "true"]
    assert user[0].get("UserID") == "Practitioner/dr-who", "the human behind the token (fhirUser)"
    assert user[0].get("AlternativeUserID") == "dev-viewer" and user[0].get("UserName") == issuer.url
    assert user[0].get("NetworkAccessPointID") == "127.0.0.1"
    assert objects(t, "1") == {"PAT-A"}
    gateway_part = [p for p in t.findall("ActiveParticipant") if p.get("UserIsRequestor") == "false"]
    assert gateway_part[0].get("UserID") == "PACSGATE" and gateway_part[0].get("AlternativeUserID").startswith("dimse-")
    assert t.find("AuditSourceIdentification").get("AuditSourceID") == "PACSGATE-TEST"

    # The refused WADO-RS: a security alert, outcome 4, naming the study asked for.
    alerts = [t for t in events(msgs, "110113") if theirs in objects(t, "2")]
    assert alerts and alerts[0].find("EventIdentification").get("EventOutcomeIndicator") == "4"
    assert "WADO-RS" in alerts[0].find("EventIdentification/EventOutcomeDescription").text
    # Refusals are sent at warning severity (facility 10, security).
    assert any(pri == 10 * 8 + 4 for pri, tr in msgs if tr is alerts[0] or tr == alerts[0])

    # The QIDO-RS: a query, and the refused token: a failed user authentication.
    assert any(t.find("EventIdentification").get("EventOutcomeIndicator") == "0" for t in events(msgs, "110112"))
    auth = events(msgs, "110114")
    assert any(t.find("EventIdentification").get("EventOutcomeIndicator") == "4" for t in auth)
    assert any(t.find("EventIdentification").get("EventOutcomeIndicator") == "0" for t in auth)

    # The same records as JSON lines, with the correlation ids.
    lines = [json.loads(x) for x in (d / f"audit-{kind}.jsonl").read_text().splitlines()]
    transfer = [x for x in lines if x["event_id"] == "110104" and mine in x["studies"]]
    assert transfer and transfer[0]["patients"] == ["PAT-A"] and transfer[0]["user"]["id"] == "Practitioner/dr-who"
    assert transfer[0]["correlation_id"].startswith("dimse-") and transfer[0]["address"] == "127.0.0.1"
    refused = [x for x in lines if x["event_id"] == "110113" and theirs in x["studies"]]
    assert refused and refused[0]["correlation_id"].startswith("http-")
    # Each HTTP request's accepted token is a user authentication of its own, as an association's is.
    logins = [x for x in lines if x["event_id"] == "110114" and x["outcome_indicator"] == "0"]
    assert any(x["correlation_id"].startswith("http-") for x in logins)
    assert any(x["correlation_id"].startswith("dimse-") for x in logins)
    assert token not in (d / f"audit-{kind}.jsonl").read_text()


def test_a_dead_receiver_costs_clinical_traffic_nothing_but_a_metric(tmp_root, orthanc, issuer):
    d = tmp_root / "audit-dead"
    d.mkdir()
    dead = free_port()  # nothing listens there
    g = audited_gateway(d, orthanc, issuer, "audit-dead", f"tcp://127.0.0.1:{dead}")
    try:
        t0 = time.time()
        for _ in range(3):
            drive(g, issuer, orthanc)
        took = time.time() - t0
        m = requests.get(f"{g.public_url}/metrics", timeout=10).text
        dropped = sum(float(line.rsplit(" ", 1)[1]) for line in m.splitlines()
                      if line.startswith('pacsgate_audit_dropped_total{sink="syslog"}'))
        assert dropped >= 10, m
        assert took < 30, f"clinical traffic waited for the dead receiver: {took:.1f} s"
        # The JSON file still has every record.
        lines = (d / "audit-dead.jsonl").read_text().splitlines()
        assert sum(1 for x in lines if json.loads(x).get("event_id") == "110104") >= 3
    finally:
        stop(g.proc)
    assert g.proc.returncode == 0


def test_audit_configuration_errors_name_their_key(tmp_root):
    from test_cli import run

    d = tmp_root / "audit-config"
    d.mkdir()
    for audit, key, says in (
        ('syslog = "syslog.example:514"', "audit.syslog", "udp://"),
        ('syslog = "tls://127.0.0.1:6514"', "audit.syslog_ca_file", "CA"),
        ('syslog = "udp://127.0.0.1"', "audit.syslog", "HOST:PORT"),
        ('json_file = "/nonexistent-dir/audit.jsonl"', "audit.json_file", "directory"),
        ('source_id = "X"', "audit", "no sink"),
    ):
        cfg = d / "c.toml"
        cfg.write_text(f"""[gateway]\nae_title = "GW"\ndimse_listen = "127.0.0.1:1"\npublic_url = "http://127.0.0.1:8080"
[pacs]\nae_title = "P"\naddress = "127.0.0.1:2"\n[[issuers]]\nissuer = "http://127.0.0.1:3"\n[audit]\n{audit}\n""")
        r = run("check-config", "--config", str(cfg))
        assert r.returncode != 0 and key in r.stderr and says in r.stderr, (audit, r.stderr)


def test_sighup_reopens_the_json_file_that_logrotate_moved_away(tmp_root, orthanc, issuer):
    import signal
    import stat

    d = tmp_root / "audit-rotate"
    d.mkdir()
    g = Gateway(d, orthanc, issuer, name="audit-rotate", extra=f'[audit]\njson_file = "{d / "audit.jsonl"}"\n')
    try:
        drive(g, issuer, orthanc)
        time.sleep(0.5)  # the writer has caught up: what follows the move is the reopen's
        live = d / "audit.jsonl"
        assert stat.S_IMODE(live.stat().st_mode) & 0o007 == 0, "the file is not world-readable"
        rotated = d / "audit.jsonl.1"
        live.rename(rotated)
        before = rotated.read_text()
        g.proc.send_signal(signal.SIGHUP)
        deadline = time.time() + 10
        while "audit.json_file reopened" not in g.log_text() and time.time() < deadline:
            time.sleep(0.1)
        assert "audit.json_file reopened" in g.log_text()
        drive(g, issuer, orthanc)
        deadline = time.time() + 10
        while not (live.exists() and live.read_text().count("\n") >= 4) and time.time() < deadline:
            time.sleep(0.1)
        lines = [json.loads(x) for x in live.read_text().splitlines()]
        assert {x["event_id"] for x in lines} >= {"110104", "110112", "110113", "110114"}
        assert rotated.read_text() == before, "nothing more went to the moved file"
    finally:
        stop(g.proc)
