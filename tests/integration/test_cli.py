"""The command line as an administrator meets it: check-config, serve's start-up errors,
/healthz, /readyz, the monitoring listener, and the dev issuer's mint command."""

import json
import socket
import subprocess
import time

import pytest
import requests

from conftest import ROOT, Gateway, Orthanc, binary, free_port, stop, wait_tcp
from test_dimse_association import associate


def run(*args, timeout=30):
    return subprocess.run([str(binary()), *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("sample", sorted(p.name for p in (ROOT / "samples").glob("*.toml")))
def test_every_sample_config_is_valid(sample):
    r = run("check-config", "--config", str(ROOT / "samples" / sample))
    assert r.returncode == 0, r.stderr
    assert "valid" in r.stdout


def test_bad_config_lists_every_problem_with_its_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        """
[gateway]
ae_title = "GW"
dimse_listen = "not-an-address"
public_url = "http://127.0.0.1:8080"
[pacs]
ae_title = "ORTHANC"
[[issuers]]
issuer = "http://127.0.0.1:9400"
verify = "sometimes"
[[destinations]]
ae_title = "GW"
address = "127.0.0.1:104"
"""
    )
    r = run("check-config", "--config", str(bad))
    assert r.returncode != 0
    for key in ("gateway.dimse_listen", "pacs.address", "issuers[0].verify", "destinations[0].ae_title"):
        assert key in r.stderr, (key, r.stderr)
    # serve refuses the same file before opening any port
    r = run("serve", "--config", str(bad))
    assert r.returncode != 0 and "issuers[0].verify" in r.stderr


def test_missing_file_is_reported():
    r = run("check-config", "--config", "/nonexistent/pacsgate.toml")
    assert r.returncode != 0 and "cannot read" in r.stderr


def test_port_in_use_names_the_key(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = tmp_path / "busy.toml"
        cfg.write_text(
            f"""
[gateway]
ae_title = "PACSGATE"
dimse_listen = "127.0.0.1:{port}"
http_listen = "127.0.0.1:{free_port()}"
public_url = "http://127.0.0.1:8080"
[pacs]
ae_title = "ORTHANC"
address = "127.0.0.1:4242"
[[issuers]]
issuer = "http://127.0.0.1:9400"
"""
        )
        r = run("serve", "--config", str(cfg))
    assert r.returncode != 0
    assert "gateway.dimse_listen" in r.stderr and "in use" in r.stderr, r.stderr


def test_healthz(gateway):
    r = requests.get(f"{gateway.public_url}/healthz", timeout=5)
    assert r.status_code == 200
    assert r.headers["cache-control"] == "no-store"


def test_minted_on_the_command_line_with_the_issuers_key(gateway, issuer):
    r = run("dev-issuer", "mint", "--issuer", issuer.url, "--key-file", str(issuer.key_file), "--patient", "PAT-A")
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    assoc, _ = associate(gateway, token)
    assert assoc.is_established
    assoc.release()


def test_dev_issuer_discovery_documents(issuer):
    for doc in ("smart-configuration", "openid-configuration"):
        d = requests.get(f"{issuer.url}/.well-known/{doc}", timeout=5).json()
        assert d["issuer"] == issuer.url
        assert d["jwks_uri"] == f"{issuer.url}/jwks"
    keys = requests.get(f"{issuer.url}/jwks", timeout=5).json()["keys"]
    assert len(keys) == 1 and "d" not in keys[0], "only the public key is published"
    tok = issuer.mint(patient="PAT-A")
    intro = requests.post(f"{issuer.url}/introspect", data={"token": tok}, timeout=5).json()
    assert intro["active"] is True and intro["patient"] == "PAT-A"
    assert requests.post(f"{issuer.url}/introspect", data={"token": "x.y.z"}, timeout=5).json() == {"active": False}


def test_the_monitoring_listener_serves_the_probes_and_nothing_else(tmp_root, orthanc, issuer):
    token_a = issuer.mint(patient="PAT-A")
    port = free_port()
    d = tmp_root / "monitor"
    d.mkdir(exist_ok=True)
    g = Gateway(d, orthanc, issuer, name="monitor", gateway_extra=f'monitor_listen = "127.0.0.1:{port}"')
    try:
        wait_tcp(port, g.proc, "pacsgate monitor")
        mon = f"http://127.0.0.1:{port}"
        r = requests.get(f"{mon}/healthz", timeout=5)
        assert r.status_code == 200 and r.text == "ok\n" and r.headers["cache-control"] == "no-store"
        # The same process's counters: a DICOMweb request on the front end shows on the monitor.
        assert requests.get(f"{g.public_url}/dicom-web/studies", headers={"Authorization": f"Bearer {token_a}"}, timeout=10).status_code == 200
        m = requests.get(f"{mon}/metrics", timeout=5)
        assert m.status_code == 200 and 'operation="QIDO-RS"' in m.text, m.text[:500]
        # Nothing a token opens, and no discovery: only the probes live there.
        for path in ("/dicom-web/studies", "/dicom-web/.well-known/smart-configuration", "/.well-known/oauth-protected-resource", "/wado"):
            r = requests.get(f"{mon}{path}", headers={"Authorization": f"Bearer {token_a}"}, timeout=5)
            assert r.status_code == 404, (path, r.status_code)
        assert requests.post(f"{mon}/dicom-web/studies", data=b"x", timeout=5).status_code in (404, 405)
        assert "monitoring listener" in g.log_text()
    finally:
        stop(g.proc)
    assert g.proc.returncode == 0, "the gateway with a monitoring listener did not stop cleanly"


def readyz(url, source=None):
    s = requests.Session()
    if source:
        s.mount("http://", SourceAdapter(source))
    r = s.get(f"{url}/readyz", timeout=5)
    assert r.headers["content-type"] == "application/json" and r.headers["cache-control"] == "no-store"
    return r.status_code, r.json()


class SourceAdapter(requests.adapters.HTTPAdapter):
    """Connects from another loopback address, as a host that is not a monitoring client."""

    def __init__(self, source):
        self.source = source
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        kwargs["source_address"] = (self.source, 0)
        super().init_poolmanager(*args, **kwargs)


def wait_readyz(url, want, timeout=20):
    deadline = time.time() + timeout
    while True:
        status, body = readyz(url)
        # Right after start nothing is checked yet: that 503 is no verdict on anything.
        starting = any(c.get("reason") == "not checked yet" for c in body.get("down", []))
        if status == want and not starting:
            return body
        assert time.time() < deadline, f"/readyz still {status} {body} after {timeout} s"
        time.sleep(0.5)


def test_readyz_is_ready_when_the_pacs_and_the_issuer_answer(gateway):
    assert wait_readyz(gateway.public_url, 200) == {"status": "ready"}


def test_readyz_names_what_is_down_and_comes_back_with_the_pacs(tmp_root, issuer):
    d = tmp_root / "readyz"
    d.mkdir(exist_ok=True)
    ports = (free_port(), free_port())
    dead_issuer = f"http://127.0.0.1:{free_port()}"

    class NotYet:  # the PACS the gateway is pointed at, before it runs
        aet, dicom_port, url = "ORTHANC", ports[0], f"http://127.0.0.1:{ports[1]}"

    monitor = free_port()
    g = Gateway(d, NotYet, issuer, name="readyz", gateway_extra=f'monitor_listen = "127.0.0.1:{monitor}"',
                extra=f'[[issuers]]\nissuer = "{dead_issuer}"\nverify = "jwt"\n')
    orthanc = None
    try:
        wait_tcp(monitor, g.proc, "pacsgate monitor")
        time.sleep(1)  # the first checks have run
        for url in (g.public_url, f"http://127.0.0.1:{monitor}"):
            status, body = readyz(url)
            assert status == 503 and body["status"] == "not ready", body
            down = {c["component"]: c.get("reason", "") for c in body["down"]}
            assert set(down) == {"pacs", dead_issuer}, body
            assert "PACS" in down["pacs"] and down[dead_issuer], body
        # Another host is told what is down, not why (no addresses, no errors).
        status, body = readyz(g.public_url, source="127.0.0.2")
        assert status == 503 and all(set(c) == {"component"} for c in body["down"]), body
        # The PACS comes up: at the next check it is no longer named; the dead issuer still is.
        orthanc = Orthanc(d, ports=ports)
        deadline = time.time() + 20
        while True:
            status, body = readyz(g.public_url)
            if [c["component"] for c in body.get("down", [])] == [dead_issuer]:
                break
            assert time.time() < deadline, f"the PACS is still named 20 s after it came up: {body}"
            time.sleep(0.5)
        assert status == 503
        # /healthz stays "the process serves".
        assert requests.get(f"{g.public_url}/healthz", timeout=5).status_code == 200
    finally:
        stop(g.proc)
        if orthanc:
            stop(orthanc.proc)
    assert "eyJ" not in g.log_text()


def test_json_logs_with_per_module_levels_and_one_span_per_association_and_request(tmp_root, orthanc, issuer):
    d = tmp_root / "json-logs"
    d.mkdir(exist_ok=True)
    g = Gateway(d, orthanc, issuer, name="json-logs", serve_args=("--log-format", "json"),
                log_filter="warn,pacsgate::audit=info,pacsgate::dimse::session=info")
    token = issuer.mint(patient="PAT-A")
    try:
        assoc, _ = associate(g, token)
        assert assoc.is_established and assoc.send_c_echo().Status == 0
        assoc.release()
        r = requests.get(f"{g.public_url}/dicom-web/studies", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert r.status_code == 200
        request_id = int(r.headers["x-request-id"])
        time.sleep(0.3)
    finally:
        stop(g.proc)
    text = g.log_text()
    assert token not in text
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line is one JSON object
    assert lines, "nothing was logged"
    # Levels per module: pacsgate::server logs at info only, so nothing of it shows.
    assert not [e for e in lines if e["target"] == "pacsgate::server"], "pacsgate::server was not filtered to warn"
    assert any(e["target"] == "pacsgate::dimse::session" and e.get("message") == "association requested" for e in lines)
    audit = [e for e in lines if e["target"] == "pacsgate::audit"]
    dimse = [e for e in audit if e["channel"] == "dimse" and e["operation"] in ("A-ASSOCIATE", "C-ECHO")]
    http = [e for e in audit if e["channel"] == "http" and e["operation"] == "QIDO-RS"]
    assert dimse and http, audit
    # One span per association and per request, with the audit records' correlation id.
    assert all(e["span"]["name"] == "association" and e["span"]["id"] == e["session"] for e in dimse), dimse
    assert all(e["span"]["name"] == "request" and e["span"]["id"] == e["session"] == request_id for e in http), http
    # Values are plain JSON strings (the JSON is the quoting), escaped as in text lines.
    assert all(e["patient"] == "PAT-A" and e["iss"] == issuer.url for e in dimse + http), dimse[0]
