"""The command line as an administrator meets it: check-config, serve's start-up errors,
/healthz, and the dev issuer's mint command."""

import socket
import subprocess

import pytest
import requests

from conftest import ROOT, Gateway, binary, free_port, stop, wait_tcp
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
