"""Verification modes and federation quirks end to end, through DIMSE and DICOMweb against
Orthanc: SMART Backend Services (private_key_jwt) toward an introspection endpoint derived from
the token endpoint, local JWT checks plus revocation by introspection, a multi-server token
whose authorization_details name the gateway (with aud = the EHR's FHIR base, accepted only
where configured), and a patient given in `sub`."""

import base64
import json
import subprocess
import time

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from conftest import Gateway, Issuer, binary, stop
from test_dimse_association import associate, assert_rejected_permanent
from test_dimse_find import STUDY_ROOT, find, query


def both_protocols(g, token):
    """(PatientIDs of the C-FIND matches, study UIDs of QIDO) for a STUDY-level search."""
    assoc, _ = associate(g, token)
    assert assoc.is_established
    final, matches = find(assoc, query("STUDY"), STUDY_ROOT)
    assoc.release()
    assert final == 0x0000
    r = requests.get(f"{g.public_url}/dicom-web/studies", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 200, r.text
    return {m.PatientID for m in matches}, {s["0020000D"]["Value"][0] for s in r.json()}


def refused_on_both(g, token, status=401):
    assoc, received = associate(g, token)
    assert_rejected_permanent(assoc, received)
    r = requests.get(f"{g.public_url}/dicom-web/studies", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == status, r.text


def test_backend_services_introspection_from_the_token_endpoint(tmp_root, orthanc):
    d = tmp_root / "backend-services"
    d.mkdir()
    key = d / "gateway-client.pem"
    # The gateway's own ES384 key, made by the project's own tooling.
    subprocess.run([str(binary()), "dev-issuer", "mint", "--issuer", "http://127.0.0.1:1", "--key-file", str(key), "--alg", "ES384"], check=True, capture_output=True)
    ehr = Issuer(d, extra_args=["--client-key", f"pacsgate={key}"])
    g = Gateway(
        d, orthanc, ehr, name="backend-services-gateway",
        issuer_extra=f'verify = "introspection"\nclient_id = "pacsgate"\nclient_key_file = "{key}"\nintrospection_from_token_endpoint = true',
    )
    try:
        token = ehr.mint(patient="PAT-A", opaque=True)
        assert both_protocols(g, token) == ({"PAT-A"}, orthanc.studies["PAT-A"])
        assert "introspection failed" not in g.log_text()
    finally:
        stop(g.proc)
        stop(ehr.proc)


def b64url_int(n: int, size=None) -> str:
    raw = n.to_bytes(size or max(1, (n.bit_length() + 7) // 8), "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def registration_keys(kind: str):
    """(private JWK, public JWK) of a key made by the `cryptography` package, with a kid, as a
    SMART Backend Services registration holds it."""
    if kind == "EC P-384":
        k = ec.generate_private_key(ec.SECP384R1())
        pub = k.public_key().public_numbers()
        public = {"kty": "EC", "crv": "P-384", "kid": "gw-2026-ec", "use": "sig", "alg": "ES384",
                  "x": b64url_int(pub.x, 48), "y": b64url_int(pub.y, 48)}
        private = dict(public, d=b64url_int(k.private_numbers().private_value, 48))
    else:
        k = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        n = k.private_numbers()
        public = {"kty": "RSA", "kid": "gw-2026-rsa", "use": "sig", "alg": "RS384",
                  "n": b64url_int(n.public_numbers.n), "e": b64url_int(n.public_numbers.e)}
        private = dict(public, d=b64url_int(n.d), p=b64url_int(n.p), q=b64url_int(n.q),
                       dp=b64url_int(n.dmp1), dq=b64url_int(n.dmq1), qi=b64url_int(n.iqmp))
    return private, public


@pytest.mark.parametrize("form", ["JWK", "JWK Set"])
@pytest.mark.parametrize("kind", ["EC P-384", "RSA"])
def test_backend_services_with_the_key_a_registration_hands_out(tmp_root, orthanc, kind, form):
    """client_key_file holds the private JWK (or a JWK Set with it beside a public key); the EHR
    knows only the public JWK Set and verifies the gateway's assertion by its kid."""
    d = tmp_root / f"registration-{kind}-{form}".replace(" ", "-")
    d.mkdir()
    private, public = registration_keys(kind)
    other, _ = registration_keys("EC P-384")
    key = d / "gateway-client.json"
    key.write_text(json.dumps(private if form == "JWK" else {"keys": [dict(other, d=None) | {"kid": "old"}, private]}))
    jwks = d / "registered.jwks"
    jwks.write_text(json.dumps({"keys": [public]}))
    ehr = Issuer(d, extra_args=["--client-jwks", f"pacsgate={jwks}"])
    cfg_issuer = f'verify = "introspection"\nclient_id = "pacsgate"\nclient_key_file = "{key}"\nintrospection_from_token_endpoint = true'
    r = subprocess.run([str(binary()), "check-config", "--config", "/dev/stdin"], capture_output=True, text=True,
                       input=f"""[gateway]\nae_title = "GW"\ndimse_listen = "127.0.0.1:1"\npublic_url = "http://127.0.0.1:8080"
[pacs]\nae_title = "P"\naddress = "127.0.0.1:2"\n[[issuers]]\nissuer = "{ehr.url}"\n{cfg_issuer}\n""")
    assert r.returncode == 0, r.stderr
    g = Gateway(d, orthanc, ehr, name="registration-gateway", issuer_extra=cfg_issuer)
    try:
        token = ehr.mint(patient="PAT-A", opaque=True)
        assert both_protocols(g, token) == ({"PAT-A"}, orthanc.studies["PAT-A"])
    finally:
        stop(g.proc)
        stop(ehr.proc)


def test_a_public_jwk_as_client_key_file_is_refused_with_the_reason(tmp_root):
    d = tmp_root / "registration-public"
    d.mkdir()
    _, public = registration_keys("EC P-384")
    key = d / "public.json"
    key.write_text(json.dumps(public))
    cfg = d / "g.toml"
    cfg.write_text(f"""[gateway]\nae_title = "GW"\ndimse_listen = "127.0.0.1:1"\npublic_url = "http://127.0.0.1:8080"
[pacs]\nae_title = "P"\naddress = "127.0.0.1:2"\n[[issuers]]\nissuer = "http://127.0.0.1:3"\nverify = "introspection"
client_id = "pacsgate"\nclient_key_file = "{key}"\n""")
    r = subprocess.run([str(binary()), "check-config", "--config", str(cfg)], capture_output=True, text=True)
    assert r.returncode != 0
    assert "client_key_file" in r.stderr and "public key" in r.stderr, r.stderr


def test_jwt_plus_introspection_sees_revocation_on_both_protocols(tmp_root, orthanc):
    d = tmp_root / "jwt-introspection"
    d.mkdir()
    ehr = Issuer(d, extra_args=["--client", "pacsgate:s3cret"])
    g = Gateway(
        d, orthanc, ehr, name="jwt-introspection-gateway",
        issuer_extra='verify = "jwt+introspection"\nclient_id = "pacsgate"\nclient_secret = "s3cret"\nintrospection_cache_secs = 1',
    )
    try:
        token = ehr.mint(patient="PAT-B")
        assert token.count(".") == 2
        assert both_protocols(g, token) == ({"PAT-B"}, orthanc.studies["PAT-B"])
        requests.post(f"{ehr.url}/revoke", data={"token": token}, timeout=10).raise_for_status()
        time.sleep(1.2)  # the cached answer expires
        refused_on_both(g, token)
    finally:
        stop(g.proc)
        stop(ehr.proc)


@pytest.fixture(scope="module")
def shared(tmp_root, orthanc, issuer):
    d = tmp_root / "multi-server"
    d.mkdir()
    g = Gateway(
        d, orthanc, issuer, name="multi-server-gateway",
        issuer_extra=f'verify = "jwt"\nfhir_base_url = "{issuer.url}/fhir"\naccept_ehr_audience = true\npatient_in_sub = true',
    )
    yield g
    stop(g.proc)


def test_authorization_details_name_the_gateway(shared, gateway, issuer, orthanc):
    # One token for the EHR (patient EHR-123 there) and for the gateway (PAT-A here).
    details = [
        {"type": "smart_on_fhir", "locations": [f"{issuer.url}/fhir"], "scope": "patient/*.rs", "patient": "EHR-123"},
        {"type": "smart_on_fhir", "locations": [f"{shared.public_url}/dicom-web"], "scope": "patient/ImagingStudy.rs", "patient": "PAT-A"},
    ]
    token = issuer.mint(patient="EHR-123", scope="patient/*.rs", aud=f"{issuer.url}/fhir", claims={"authorization_details": details})
    assert both_protocols(shared, token) == ({"PAT-A"}, orthanc.studies["PAT-A"])
    # The same token at a gateway that does not accept the EHR's audience: refused.
    refused_on_both(gateway, token)


def test_patient_in_sub_where_configured(shared, gateway, issuer, orthanc):
    token = issuer.mint(scope="patient/ImagingStudy.rs", claims={"sub": "Patient/PAT-B"})
    assert both_protocols(shared, token) == ({"PAT-B"}, orthanc.studies["PAT-B"])
    # Elsewhere a token without `patient` has no patient in context.
    refused_on_both(gateway, token, status=403)


def test_user_level_tokens_under_deny_and_allow(tmp_root, gateway, issuer, orthanc):
    token = issuer.mint(scope="user/ImagingStudy.rs")
    # deny (the default): no association, 403 on DICOMweb
    refused_on_both(gateway, token, status=403)
    d = tmp_root / "user-level-allow"
    d.mkdir()
    g = Gateway(d, orthanc, issuer, name="user-level-allow-gateway", extra='[policy]\nuser_level = "allow"',
                gateway_extra='metrics_clients = ["10.9.9.0/24"]')
    try:
        # allow: every patient, on both protocols
        pids, studies = both_protocols(g, token)
        assert {"PAT-A", "PAT-B", "CASE01", "case01"} <= pids
        assert orthanc.studies["PAT-A"] | orthanc.studies["PAT-B"] <= studies
        # a patient-level write scope writes for its patient only, even beside user-level read
        import io

        import pydicom
        from pydicom.uid import generate_uid

        from dicomdata import make_instance

        mixed = issuer.mint(patient="PAT-W", scope="user/ImagingStudy.rs patient/ImagingStudy.c")
        own = make_instance("PAT-W", generate_uid(), generate_uid(), 9400, 1, 1, "20250101")
        other = make_instance("PAT-B", generate_uid(), generate_uid(), 9401, 1, 1, "20250101")
        body = b"".join(b"--x\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n" for part in (own, other)) + b"--x--\r\n"
        r = requests.post(f"{g.public_url}/dicom-web/studies", headers={"Authorization": f"Bearer {mixed}",
                          "Content-Type": 'multipart/related; type="application/dicom"; boundary=x'}, data=body, timeout=30)
        assert r.status_code == 202, r.text
        sop = lambda data: pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID
        assert orthanc.holds(sop(own)) and not orthanc.holds(sop(other))
        # metrics only for the configured clients: loopback is not one of them here
        assert requests.get(f"{g.public_url}/metrics", timeout=10).status_code == 404
    finally:
        stop(g.proc)
