"""The gateway as the imaging system's authorization server (`[authorization_server]`): RFC 8693
token exchange at `{public_url}/token`. An EHR access token in, a short-lived token of the
gateway's own out, never wider than the EHR token (scopes narrowed to the imaging scopes, the
patient as the gateway maps it, its lifetime within the subject token's, each subject token
exchanged once), signed with a key whose public half is at `/.well-known/jwks.json`, and taken
on every path: FHIR, DICOMweb (dicomweb-client) and DIMSE (pynetdicom). Runs against whichever
PACS the session uses."""

import base64
import json
import signal
import time

import pytest
import requests
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from conftest import Gateway, Issuer, free_port, stop
from test_dimse_association import associate

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS = "urn:ietf:params:oauth:token-type:access_token"


def auth(token):
    return {"Authorization": f"Bearer {token}"}


def b64(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def parts(token):
    h, p, s = token.split(".")
    return json.loads(b64(h)), json.loads(b64(p)), s


def wait_for(ok, what, timeout=10.0):
    deadline = time.time() + timeout
    while not ok():
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.1)


def own_studies(orthanc, pid):
    return sorted({x[1] for x in orthanc.instances if x[0] == pid})


def exchange(g, subject, **extra):
    form = {"grant_type": GRANT, "subject_token": subject, "subject_token_type": ACCESS, **extra}
    return requests.post(f"{g.public_url}/token", data=form, timeout=30)


def find_studies(g, token, pid=""):
    assoc, _ = associate(g, token)
    assert assoc.is_established
    try:
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.PatientID = pid
        q.StudyInstanceUID = ""
        return sorted(i.StudyInstanceUID for s, i in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind)
                      if s and s.Status in (0xFF00, 0xFF01))
    finally:
        assoc.release()


def as_server(key_file, subject_issuer, lifetime=300):
    return f"""
[authorization_server]
enabled = true
signing_key_file = "{key_file}"
token_lifetime_secs = {lifetime}
subject_issuers = ["{subject_issuer}"]
"""


@pytest.fixture(scope="module")
def ehr_and_imaging(tmp_root, orthanc):
    """An EHR that names the gateway's FHIR base among its associated endpoints, and the gateway
    as the imaging authorization server that trusts it."""
    d = tmp_root / "exchange"
    d.mkdir()
    port = free_port()
    ehr = Issuer(d, extra_args=("--associated-endpoint", f"http://127.0.0.1:{port}/fhir"))
    g = Gateway(d, orthanc, ehr, name="gateway-exchange", http_port=port, extra=as_server(d / "as-key.pem", ehr.url))
    yield ehr, g, d
    stop(g.proc)
    stop(ehr.proc)


def test_discovery_names_the_token_endpoint_the_grant_and_the_capability(ehr_and_imaging):
    ehr, g, _ = ehr_and_imaging
    imaging = next(e["url"] for e in requests.get(f"{ehr.url}/.well-known/smart-configuration", timeout=10).json()["associated_endpoints"])
    conf = requests.get(f"{imaging}/.well-known/smart-configuration", timeout=10).json()
    assert conf["issuer"] == g.public_url
    assert conf["token_endpoint"] == f"{g.public_url}/token"
    assert GRANT in conf["grant_types_supported"]
    assert "token-exchange-accesstoken" in conf["capabilities"] and "smart-imaging-access" in conf["capabilities"]
    jwks = requests.get(conf["jwks_uri"], timeout=10).json()
    assert len(jwks["keys"]) == 1 and "d" not in jwks["keys"][0], "the public half only"
    cap = requests.get(f"{imaging}/metadata", timeout=10).json()
    uris = cap["rest"][0]["security"]["extension"][0]["extension"]
    assert {"url": "token", "valueUri": f"{g.public_url}/token"} in uris


def test_an_apps_path_with_an_exchanged_token(ehr_and_imaging, orthanc):
    """EHR token, exchanged for the imaging server's own; that token on FHIR, WADO-RS (through
    the Endpoint, with dicomweb-client) and a DIMSE C-FIND (pynetdicom): the patient's studies
    and nothing else."""
    ehr, g, _ = ehr_and_imaging
    subject = ehr.mint(patient="PAT-A", scope="openid fhirUser launch/patient patient/*.read patient/Observation.rs", expires_in=3600)
    r = exchange(g, subject)
    assert r.status_code == 200, r.text
    assert r.headers["Cache-Control"] == "no-store"
    t = r.json()
    assert t["issued_token_type"] == ACCESS and t["token_type"] == "Bearer"
    assert t["scope"] == "patient/ImagingStudy.rs", "narrowed to the imaging scopes, never wider"
    assert t["patient"] == "PAT-A" and 0 < t["expires_in"] <= 300
    token = t["access_token"]
    header, claims, sig = parts(token)
    _, subject_claims, _ = parts(subject)
    assert header["typ"] == "at+jwt" and header["alg"] == "ES256"
    assert claims["iss"] == g.public_url and claims["iss"] != subject_claims["iss"]
    assert claims["exp"] <= subject_claims["exp"] and claims["patient"] == "PAT-A"
    assert f"{g.public_url}/dicom-web" in claims["aud"]
    # The signature verifies with the published key (as a resource server of the imaging
    # system would check it).
    key = requests.get(f"{g.public_url}/.well-known/jwks.json", timeout=10).json()["keys"][0]
    assert key["kid"] == header["kid"]
    pub = ec.EllipticCurvePublicNumbers(int.from_bytes(b64(key["x"]), "big"), int.from_bytes(b64(key["y"]), "big"), ec.SECP256R1()).public_key()
    raw = b64(sig)
    pub.verify(encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")),
               token.rsplit(".", 1)[0].encode(), ec.ECDSA(hashes.SHA256()))

    mine, theirs = own_studies(orthanc, "PAT-A"), own_studies(orthanc, "PAT-B")
    b = requests.get(f"{g.public_url}/fhir/ImagingStudy", params={"patient": "PAT-A", "_include": "ImagingStudy:endpoint"},
                     headers=auth(token), timeout=60).json()
    assert sorted(e["resource"]["id"] for e in b["entry"] if e["resource"]["resourceType"] == "ImagingStudy") == mine
    address = next(e["resource"]["address"] for e in b["entry"] if e["resource"]["resourceType"] == "Endpoint")
    assert requests.get(f"{g.public_url}/fhir/ImagingStudy", params={"patient": "PAT-B"}, headers=auth(token), timeout=60).status_code == 403
    client = DICOMwebClient(url=address, headers=auth(token))
    instances = client.retrieve_study(mine[0])
    assert instances and all(ds.PatientID == "PAT-A" for ds in instances)
    assert requests.get(f"{address}/studies/{theirs[0]}/metadata", headers=auth(token), timeout=60).status_code in (403, 404)
    assert find_studies(g, token) == mine
    assert find_studies(g, token, "PAT-B") == []
    # The audit trail names the exchange, never a token.
    wait_for(lambda: "token exchange" in g.log_text(), what="the exchange's audit record")
    assert subject not in g.log_text() and token not in g.log_text()


def test_refusals_are_rfc_6749_errors(ehr_and_imaging):
    ehr, g, _ = ehr_and_imaging
    subject = ehr.mint(patient="PAT-A")

    def refused(r, error, status=400):
        assert r.status_code == status, (r.status_code, r.text)
        body = r.json()
        assert body["error"] == error, body
        assert r.headers["Cache-Control"] == "no-store"
        assert subject not in r.text
        return body

    url = f"{g.public_url}/token"
    refused(requests.post(url, json={"grant_type": GRANT, "subject_token": subject, "subject_token_type": ACCESS}, timeout=10),
            "invalid_request")
    refused(exchange(g, subject, grant_type="client_credentials"), "unsupported_grant_type")
    refused(requests.post(url, data={"grant_type": GRANT, "subject_token_type": ACCESS}, timeout=10), "invalid_request")
    refused(exchange(g, subject, subject_token_type="urn:ietf:params:oauth:token-type:id_token"), "invalid_request")
    refused(exchange(g, subject, requested_token_type="urn:ietf:params:oauth:token-type:refresh_token"), "invalid_request")
    refused(exchange(g, subject, actor_token=subject, actor_token_type=ACCESS), "invalid_request")
    refused(exchange(g, subject, resource="https://elsewhere.example/fhir"), "invalid_target")
    # Each parameter once (RFC 6749 3.2): the PACS-side rule of "read once, never guess".
    body = f"grant_type={GRANT}&subject_token={subject}&subject_token_type={ACCESS}&scope=patient/ImagingStudy.rs&scope=user/ImagingStudy.rs"
    refused(requests.post(url, data=body, headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=10), "invalid_request")
    # The subject token is verified as on every path.
    refused(exchange(g, subject[:-4] + ("AAAA" if not subject.endswith("AAAA") else "BBBB")), "invalid_grant")
    refused(exchange(g, "not-a-token"), "invalid_grant")
    refused(exchange(g, ehr.mint(patient="PAT-A", expires_in=-300)), "invalid_grant")
    refused(exchange(g, ehr.mint(patient="PAT-A", aud="https://other.example/fhir")), "invalid_grant")
    # Scopes narrow, never widen; a token without imaging access gets none.
    refused(exchange(g, ehr.mint(patient="PAT-A"), scope="patient/ImagingStudy.crs"), "invalid_scope")
    refused(exchange(g, ehr.mint(patient="PAT-A"), scope="user/ImagingStudy.rs"), "invalid_scope")
    refused(exchange(g, ehr.mint(patient="PAT-A", scope="patient/Observation.rs openid")), "invalid_scope")
    refused(exchange(g, ehr.mint(patient=None)), "invalid_grant")
    # The gateway's own token is not a subject token.
    own = exchange(g, ehr.mint(patient="PAT-A")).json()["access_token"]
    refused(exchange(g, own), "invalid_grant")
    # A tampered token of the gateway's own is refused on every path.
    h, p, s = own.split(".")
    claims = json.loads(b64(p))
    claims["pacsgate"]["patients"] = [{"id": "PAT-B"}]
    forged = ".".join([h, base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("="), s])
    assert requests.get(f"{g.public_url}/dicom-web/studies", params={"PatientID": "PAT-B"}, headers=auth(forged), timeout=30).status_code == 401
    assoc, _ = associate(g, forged)
    assert not assoc.is_established


def test_a_subject_token_is_exchanged_once_even_across_a_reload(ehr_and_imaging):
    ehr, g, _ = ehr_and_imaging
    subject = ehr.mint(patient="PAT-A")
    assert exchange(g, subject).status_code == 200
    again = exchange(g, subject)
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
    assert "exchanged already" in again.json()["error_description"]
    g.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "configuration re-read" in g.log_text(), what="the reload")
    assert exchange(g, subject).json()["error"] == "invalid_grant"
    # A refused exchange does not use the token up: asking within its scopes then succeeds.
    fresh = ehr.mint(patient="PAT-A")
    assert exchange(g, fresh, scope="patient/ImagingStudy.crs").status_code == 400
    assert exchange(g, fresh, scope="patient/ImagingStudy.rs").status_code == 200


def test_lifetime_and_restrictions_are_never_wider_than_the_subject_token(ehr_and_imaging, orthanc):
    ehr, g, _ = ehr_and_imaging
    short = exchange(g, ehr.mint(patient="PAT-A", expires_in=90)).json()
    assert short["expires_in"] <= 90
    assert parts(short["access_token"])[1]["exp"] <= time.time() + 91
    mine = own_studies(orthanc, "PAT-A")
    one = ehr.mint(patient="PAT-A", scope=f"patient/ImagingStudy.rs?identifier=urn:oid:{mine[0]}")
    t = exchange(g, one).json()
    assert t["scope"] == f"patient/ImagingStudy.rs?identifier=urn:oid:{mine[0]}"
    token = t["access_token"]
    r = requests.get(f"{g.public_url}/dicom-web/studies", headers={**auth(token), "Accept": "application/dicom+json"}, timeout=60)
    assert r.status_code == 200
    assert [m["0020000D"]["Value"][0] for m in r.json()] == [mine[0]]
    assert find_studies(g, token) == [mine[0]]
    # Narrowed further by the request's own scope.
    t = exchange(g, ehr.mint(patient="PAT-A"), scope=f"patient/ImagingStudy.rs?identifier=urn:oid:{mine[1]}").json()
    assert find_studies(g, t["access_token"]) == [mine[1]]


def test_the_patient_is_mapped_as_configured(tmp_root, orthanc):
    """With `map = "claim"` the EHR's patient id is not the PatientID: the exchanged token names
    the PatientID the mapping gave, and is taken as it is (no second mapping)."""
    d = tmp_root / "exchange-mapped"
    d.mkdir()
    ehr = Issuer(d)
    g = Gateway(d, orthanc, ehr, name="gateway-exchange-mapped", extra=as_server(d / "as-key.pem", ehr.url),
                patients='[patients]\nmap = "claim"\nclaim = "dicom_pid"')
    try:
        subject = ehr.mint(patient="ehr-77", claims={"dicom_pid": "PAT-B"})
        t = exchange(g, subject).json()
        assert t["patient"] == "PAT-B", t
        assert find_studies(g, t["access_token"]) == own_studies(orthanc, "PAT-B")
        b = requests.get(f"{g.public_url}/fhir/ImagingStudy", params={"patient": "PAT-B"},
                         headers=auth(t["access_token"]), timeout=60).json()
        assert sorted(e["resource"]["id"] for e in b["entry"]) == own_studies(orthanc, "PAT-B")
        # A patient that maps to nobody gets no token.
        r = exchange(g, ehr.mint(patient="ehr-78"))
        assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
    finally:
        stop(g.proc)
        stop(ehr.proc)


def test_an_opaque_subject_token_is_introspected(tmp_root, orthanc):
    """A subject issuer verified by RFC 7662 introspection: the opaque EHR token is asked about
    as on every path; an active one is exchanged once, a revoked one never."""
    d = tmp_root / "exchange-introspected"
    d.mkdir()
    ehr = Issuer(d, extra_args=["--client", "pacsgate:s3cret"])
    g = Gateway(d, orthanc, ehr, name="gateway-exchange-introspected", extra=as_server(d / "as-key.pem", ehr.url),
                issuer_extra='verify = "introspection"\nclient_id = "pacsgate"\nclient_secret = "s3cret"\nintrospection_cache_secs = 1')
    try:
        subject = ehr.mint(patient="PAT-A", opaque=True, expires_in=120)
        assert subject.count(".") == 0
        r = exchange(g, subject)
        assert r.status_code == 200, r.text
        t = r.json()
        assert t["patient"] == "PAT-A" and t["expires_in"] <= 120
        assert find_studies(g, t["access_token"]) == own_studies(orthanc, "PAT-A")
        assert exchange(g, subject).json()["error"] == "invalid_grant", "each subject token once"
        revoked = ehr.mint(patient="PAT-A", opaque=True)
        requests.post(f"{ehr.url}/revoke", data={"token": revoked}, timeout=10)
        r = exchange(g, revoked)
        assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
        assert exchange(g, "opaque-that-nobody-issued").json()["error"] == "invalid_grant"
    finally:
        stop(g.proc)
        stop(ehr.proc)
