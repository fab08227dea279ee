"""Opaque tokens judged by RFC 7662 introspection, through both protocols: a development
issuer that requires the gateway's client secret, and a gateway configured with
verify = "introspection". Revocation is seen once the cached answer expires; an introspection
endpoint that is down denies."""

import time

import pytest
import requests

from conftest import Gateway, Issuer, free_port, stop
from test_dimse_association import associate, assert_rejected_permanent
from test_dimse_find import STUDY_ROOT, find, query
from test_cli import wait_readyz


@pytest.fixture(scope="module")
def intro(tmp_root, orthanc):
    d = tmp_root / "introspection"
    d.mkdir()
    issuer = Issuer(d, extra_args=["--client", "pacsgate:s3cret"])
    g = Gateway(d, orthanc, issuer, name="intro-gateway", issuer_extra='verify = "introspection"\nclient_id = "pacsgate"\nclient_secret = "s3cret"\nintrospection_cache_secs = 1')
    yield issuer, g
    stop(g.proc)
    stop(issuer.proc)


def test_opaque_token_over_dimse_and_dicomweb(intro, orthanc):
    issuer, g = intro
    token = issuer.mint(patient="PAT-A", opaque=True)
    assert token.count(".") == 0
    assoc, _ = associate(g, token)
    assert assoc.is_established
    final, matches = find(assoc, query("STUDY"), STUDY_ROOT)
    assoc.release()
    assert final == 0x0000 and {m.PatientID for m in matches} == {"PAT-A"}
    r = requests.get(f"{g.public_url}/dicom-web/studies", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 200
    assert {s["0020000D"]["Value"][0] for s in r.json()} == orthanc.studies["PAT-A"]


def test_readyz_asks_the_introspection_endpoint(intro):
    """Ready once the endpoint answered the gateway (with its client secret)."""
    _, g = intro
    assert wait_readyz(g.public_url, 200) == {"status": "ready"}


def test_unknown_and_revoked_tokens_are_refused(intro):
    issuer, g = intro
    assoc, received = associate(g, "opaque-that-nobody-issued")
    assert_rejected_permanent(assoc, received)
    token = issuer.mint(patient="PAT-A", opaque=True)
    assert requests.get(f"{g.public_url}/dicom-web/studies", headers={"Authorization": f"Bearer {token}"}, timeout=30).status_code == 200
    requests.post(f"{issuer.url}/revoke", data={"token": token}, timeout=10)
    time.sleep(1.2)  # the cached answer expires
    r = requests.get(f"{g.public_url}/dicom-web/studies", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 401 and 'error="invalid_token"' in r.headers["WWW-Authenticate"]


def metric_values(g):
    r = requests.get(f"{g.public_url}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/openmetrics-text")
    out = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_introspection_down_denies(tmp_root, orthanc):
    d = tmp_root / "introspection-down"
    d.mkdir()
    issuer = Issuer(d, extra_args=["--client", "pacsgate:s3cret"])
    dead = f"http://127.0.0.1:{free_port()}/introspect"
    g = Gateway(d, orthanc, issuer, name="intro-down", issuer_extra=f'verify = "introspection"\nclient_id = "pacsgate"\nclient_secret = "s3cret"\nintrospection_endpoint = "{dead}"')
    try:
        token = issuer.mint(patient="PAT-A", opaque=True)
        r = requests.get(f"{g.public_url}/dicom-web/studies", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert r.status_code == 503 and "Retry-After" in r.headers
        assoc, received = associate(g, token)
        assert assoc.is_rejected
        rj = [p for p in received if getattr(p, "result", None) in (1, 2)]
        assert rj[0].result == 2, "transient: the gateway could not check, the token may be fine"
        # ...and says so in its metrics.
        m = metric_values(g)
        assert m[f'pacsgate_issuer_requests_total{{issuer="{issuer.url}",kind="introspection",result="error"}}'] >= 2
        assert m['pacsgate_token_checks_total{result="unavailable"}'] >= 2
        assert m['pacsgate_associations_rejected_total{reason="unavailable"}'] >= 1
        # Not ready, and the issuer is named as what is down.
        body = wait_readyz(g.public_url, 503)
        assert [c["component"] for c in body["down"]] == [issuer.url], body
        assert "introspection" in body["down"][0]["reason"], body
    finally:
        stop(g.proc)
        stop(issuer.proc)
