"""DICOMweb through the gateway against Orthanc's DICOMweb plugin, with plain HTTP and
dicomweb-client: bearer errors per RFC 6750, QIDO-RS narrowed and checked, WADO-RS refused for
other patients' (or unknown) UIDs with no DICOM in the body, path tricks, URL rewriting and the
discovery documents."""

import http.client

import pytest
from pydicom.dataset import Dataset
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid

from conftest import Gateway, free_port


def auth(token):
    return {"Authorization": f"Bearer {token}"}


def own(orthanc, pid):
    return [x for x in orthanc.instances if x[0] == pid]


@pytest.fixture
def base(gateway):
    return f"{gateway.public_url}/dicom-web"


@pytest.fixture
def token_a(issuer):
    return issuer.mint(patient="PAT-A")


def qido(base, path, token, **params):
    return requests.get(f"{base}/{path}", headers={**auth(token), "Accept": "application/dicom+json"}, params=params, timeout=30)


# ---- authentication ----

def test_no_token_is_401_with_a_bearer_challenge(base, gateway):
    r = requests.get(f"{base}/studies", timeout=10)
    assert r.status_code == 401
    w = r.headers["WWW-Authenticate"]
    assert w.startswith("Bearer ") and 'realm="pacsgate"' in w
    assert f'resource_metadata="{gateway.public_url}/.well-known/oauth-protected-resource"' in w


@pytest.mark.parametrize("case", ["garbage", "expired", "wrong_audience", "tampered"])
def test_invalid_tokens_are_401_invalid_token(base, issuer, case):
    token = {
        "garbage": lambda: "not.a.token",
        "expired": lambda: issuer.mint(patient="PAT-A", expires_in=-300),
        "wrong_audience": lambda: issuer.mint(patient="PAT-A", aud="https://other.example/fhir"),
        "tampered": lambda: issuer.mint(patient="PAT-A")[:-4] + "AAAA",
    }[case]()
    r = qido(base, "studies", token)
    assert r.status_code == 401
    assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]
    assert token not in r.text


def test_missing_scope_is_403_insufficient_scope(base, issuer):
    r = qido(base, "studies", issuer.mint(patient="PAT-A", scope="patient/Observation.rs"))
    assert r.status_code == 403
    assert 'error="insufficient_scope"' in r.headers["WWW-Authenticate"]


# ---- QIDO-RS ----

def strict(pacs):
    """The PACS enforces the hierarchical query model (dcmqrscp with its identifier checks)."""
    return getattr(pacs, "strict", False)


def pids(results):
    return {r["00100020"]["Value"][0] for r in results}


def test_qido_every_level_returns_exactly_own_data(base, orthanc, token_a):
    held = orthanc.counts("PAT-A")
    r = qido(base, "studies", token_a)
    assert r.status_code == 200
    assert r.headers["Cache-Control"].startswith("private")
    assert int(r.headers["X-Request-Id"]) > 0
    studies = r.json()
    assert {s["0020000D"]["Value"][0] for s in studies} == orthanc.studies["PAT-A"]
    assert pids(studies) == {"PAT-A"}
    if strict(orthanc):
        # A PACS of the hierarchical query model searches series and instances only inside
        # their study: a search across studies is refused, saying so.
        for level in ("series", "instances"):
            r = qido(base, level, token_a)
            assert r.status_code == 400 and "hierarchical query model" in r.text, r.text
    else:
        series = qido(base, "series", token_a).json()
        assert len(series) == held["series"] and pids(series) == {"PAT-A"}
        instances = qido(base, "instances", token_a).json()
        assert len(instances) == held["instances"] and pids(instances) == {"PAT-A"}
    study, ser = own(orthanc, "PAT-A")[0][1], own(orthanc, "PAT-A")[0][2]
    nested = qido(base, f"studies/{study}/series", token_a).json()
    assert {s["0020000E"]["Value"][0] for s in nested} == {x[2] for x in own(orthanc, "PAT-A") if x[1] == study}
    nested = qido(base, f"studies/{study}/series/{ser}/instances", token_a).json()
    assert {s["00080018"]["Value"][0] for s in nested} == {x[3] for x in own(orthanc, "PAT-A") if x[2] == ser}


def test_qido_urls_point_at_the_gateway(base, orthanc, token_a):
    study, series = own(orthanc, "PAT-A")[0][1:3]
    path = f"studies/{study}/series/{series}/instances" if strict(orthanc) else "instances"
    instances = qido(base, path, token_a).json()
    urls = [i["00081190"]["Value"][0] for i in instances]
    assert urls and all(u.startswith(base + "/studies/") for u in urls), urls[:2]
    # The PACS's own address never shows (a DIMSE-only PACS has no URL of its own).
    pacs_address = orthanc.url or f"127.0.0.1:{orthanc.dicom_port}"
    assert not any(pacs_address in u for u in urls)


def test_qido_explicit_other_patient_is_403(base, token_a):
    for pid in ("PAT-B", "pat-a", "PAT*", "PAT-A\\PAT-B"):
        r = qido(base, "studies", token_a, PatientID=pid)
        assert r.status_code == 403, pid
        assert "PAT-B" not in r.text


def test_qido_case_variant_patients_stay_apart(base, issuer, orthanc):
    # Orthanc's QIDO matches PatientID case-insensitively: the gateway's check keeps them apart
    for patient in ("CASE01", "case01"):
        r = qido(base, "studies", issuer.mint(patient=patient))
        assert r.status_code == 200
        assert pids(r.json()) == {patient}
        assert len(r.json()) == orthanc.counts(patient)["studies"]


def test_qido_padding_is_one_patient(base, issuer, orthanc):
    r = qido(base, "studies", issuer.mint(patient="SPACE01"), PatientID="SPACE01 ")
    assert r.status_code == 200
    assert {s["0020000D"]["Value"][0] for s in r.json()} == orthanc.studies["SPACE01"] | orthanc.studies["SPACE01  "]


def test_qido_inside_another_patients_study_is_403(base, orthanc, token_a):
    theirs = own(orthanc, "PAT-B")[0]
    assert qido(base, f"studies/{theirs[1]}/series", token_a).status_code == 403
    assert qido(base, f"studies/{generate_uid()}/series", token_a).status_code == 403


def test_a_search_naming_studies_or_series_looks_into_each(base, gateway, orthanc, token_a):
    """Below the study level every study (and at the instance level every series) a search
    names, alone or in a list, in the path or as a key, is looked into like a retrieval, on
    both protocols: one of another patient's, or an unknown one, refuses the whole search."""
    from test_dimse_association import associate
    from test_dimse_find import NOT_AUTHORIZED, STUDY_ROOT, find, query

    mine, theirs = own(orthanc, "PAT-A"), own(orthanc, "PAT-B")
    my_studies = sorted({x[1] for x in mine})
    assert len(my_studies) >= 2
    r = qido(base, "series", token_a, StudyInstanceUID=my_studies[0])
    assert r.status_code == 200 and {s["0020000D"]["Value"][0] for s in r.json()} == {my_studies[0]}
    r = qido(base, "series", token_a, StudyInstanceUID=",".join(my_studies))
    if strict(orthanc):
        # Below the study level a hierarchical PACS searches one study at a time.
        assert r.status_code == 400 and "hierarchical query model" in r.text
    else:
        assert r.status_code == 200 and {s["0020000D"]["Value"][0] for s in r.json()} <= set(my_studies)
    refused = [
        ("series", "StudyInstanceUID", f"{my_studies[0]},{theirs[0][1]}"),
        ("series", "StudyInstanceUID", f"{my_studies[0]}\\{theirs[0][1]}"),
        ("instances", "0020000D", theirs[0][1]),
        ("series", "StudyInstanceUID", generate_uid()),
        ("instances", "SeriesInstanceUID", theirs[0][2]),
        (f"studies/{mine[0][1]}/instances", "SeriesInstanceUID", theirs[0][2]),
    ]
    for path, key, value in refused:
        r = qido(base, path, token_a, **{key: value})
        # A series named without its study cannot be asked about at a hierarchical PACS:
        # refused before anything is asked.
        want = 400 if strict(orthanc) and (path, key) == ("instances", "SeriesInstanceUID") else 403
        assert r.status_code == want, (path, key, value, r.status_code)
        assert "PAT-B" not in r.text
    # UID matching takes no wildcards: nothing to look into, so nothing to ask.
    assert qido(base, "series", token_a, StudyInstanceUID="1.2.*").status_code == 400

    assoc, _ = associate(gateway, token_a)
    try:
        ds = query("SERIES", patient_id="PAT-A")
        ds.StudyInstanceUID = my_studies
        final, matches = find(assoc, ds, STUDY_ROOT)
        if strict(orthanc):
            # Refused by the gateway (its audit record says why), nothing asked of the PACS.
            assert final == NOT_AUTHORIZED and matches == []
        else:
            assert final == 0x0000 and {m.StudyInstanceUID for m in matches} == set(my_studies)
        ds.StudyInstanceUID = [my_studies[0], theirs[0][1]]
        assert find(assoc, ds, STUDY_ROOT) == (NOT_AUTHORIZED, [])
        ds = query("IMAGE", patient_id="PAT-A")
        ds.SeriesInstanceUID = mine[0][2]
        if strict(orthanc):
            assert find(assoc, ds, STUDY_ROOT) == (NOT_AUTHORIZED, [])
            ds = Dataset()
            ds.QueryRetrieveLevel = "IMAGE"
            ds.StudyInstanceUID = mine[0][1]
            ds.SeriesInstanceUID = mine[0][2]
            ds.SOPInstanceUID = ""
        final, matches = find(assoc, ds, STUDY_ROOT)
        assert final == 0x0000 and matches and {m.SeriesInstanceUID for m in matches} == {mine[0][2]}
        ds.SeriesInstanceUID = theirs[0][2]
        assert find(assoc, ds, STUDY_ROOT) == (NOT_AUTHORIZED, [])
    finally:
        assoc.release()


def test_dicomweb_client_searches_own_studies(base, orthanc, token_a):
    c = DICOMwebClient(url=base, headers=auth(token_a))
    studies = c.search_for_studies()
    assert {s["0020000D"]["Value"][0] for s in studies} == orthanc.studies["PAT-A"]
    # wildcards are decoded once and sent to the PACS as it understands them
    named = c.search_for_studies(search_filters={"PatientName": "Test^PAT*"})
    assert {s["0020000D"]["Value"][0] for s in named} == orthanc.studies["PAT-A"]


# ---- WADO-RS ----

def test_wado_retrieves_own_study_series_instance(base, orthanc, token_a):
    c = DICOMwebClient(url=base, headers=auth(token_a))
    mine = own(orthanc, "PAT-A")
    study, series, sop = mine[0][1], mine[0][2], mine[0][3]
    got = c.retrieve_study(study)
    assert {d.SOPInstanceUID for d in got} == {x[3] for x in mine if x[1] == study}
    assert {d.PatientID for d in got} == {"PAT-A"}
    got = c.retrieve_series(study, series)
    assert {d.SOPInstanceUID for d in got} == {x[3] for x in mine if x[2] == series}
    one = c.retrieve_instance(study, series, sop)
    assert one.SOPInstanceUID == sop


def test_wado_metadata_urls_point_at_the_gateway(base, orthanc, token_a):
    study = own(orthanc, "PAT-A")[0][1]
    r = requests.get(f"{base}/studies/{study}/metadata", headers={**auth(token_a), "Accept": "application/dicom+json"}, timeout=30)
    assert r.status_code == 200
    assert r.headers["Cache-Control"].startswith("private")
    assert (orthanc.url or f"127.0.0.1:{orthanc.dicom_port}") not in r.text
    assert f"{base}/studies/{study}" in r.text, "BulkDataURIs point at the gateway"


def test_wado_frames_of_own_instance(base, orthanc, token_a):
    _, study, series, sop = own(orthanc, "PAT-A")[0]
    r = requests.get(
        f"{base}/studies/{study}/series/{series}/instances/{sop}/frames/1",
        headers={**auth(token_a), "Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'},
        timeout=30,
    )
    assert r.status_code == 200
    assert bytes(range(64)) in r.content


def test_wado_rendered_own_instance_and_frame_are_pictures(base, orthanc, token_a):
    _, study, series, sop = own(orthanc, "PAT-A")[0]
    inst = f"{base}/studies/{study}/series/{series}/instances/{sop}"
    for path, accept, magic in ((f"{inst}/rendered", "image/jpeg", b"\xff\xd8"), (f"{inst}/rendered", "image/png", b"\x89PNG"),
                                (f"{inst}/frames/1/rendered", "image/png", b"\x89PNG")):
        r = requests.get(path, headers={**auth(token_a), "Accept": accept}, timeout=30)
        assert r.status_code == 200, (path, r.status_code, r.text[:200])
        assert r.headers["Content-Type"].startswith(accept) and r.content.startswith(magic), path
        assert r.headers["Cache-Control"].startswith("private")


@pytest.mark.parametrize("case", ["foreign_study", "unknown_study", "foreign_series_in_own_study", "foreign_instance_in_own_series", "foreign_metadata", "foreign_frames",
                                  "foreign_rendered", "foreign_thumbnail"])
def test_wado_of_other_patients_or_unknown_uids_is_403_without_dicom(base, orthanc, token_a, case):
    mine, theirs = own(orthanc, "PAT-A")[0], own(orthanc, "PAT-B")[0]
    path = {
        "foreign_study": f"studies/{theirs[1]}",
        "unknown_study": f"studies/{generate_uid()}",
        "foreign_series_in_own_study": f"studies/{mine[1]}/series/{theirs[2]}",
        "foreign_instance_in_own_series": f"studies/{mine[1]}/series/{mine[2]}/instances/{theirs[3]}",
        "foreign_metadata": f"studies/{theirs[1]}/metadata",
        "foreign_frames": f"studies/{theirs[1]}/series/{theirs[2]}/instances/{theirs[3]}/frames/1",
        "foreign_rendered": f"studies/{theirs[1]}/series/{theirs[2]}/instances/{theirs[3]}/rendered",
        "foreign_thumbnail": f"studies/{theirs[1]}/thumbnail",
    }[case]
    r = requests.get(f"{base}/{path}", headers=auth(token_a), timeout=30)
    assert r.status_code == 403
    assert b"DICM" not in r.content and b"PAT-B" not in r.content
    assert r.headers["Content-Type"] == "application/json"


def raw_get(gateway, path, token):
    """Sends the path exactly as written (no client-side normalization of '..' or '%2e')."""
    c = http.client.HTTPConnection("127.0.0.1", gateway.http_port, timeout=10)
    c.request("GET", path, headers=auth(token))
    r = c.getresponse()
    body = r.read()
    c.close()
    return r.status, body


@pytest.mark.parametrize("tail", [
    "studies/{own}/../{theirs}",
    "studies/{own}/%2e%2e/{theirs}",
    "studies/{own}%2F..%2F{theirs}",
    "studies//{theirs}",
    "studies/{own}/series/",
    "studies/1.2.abc",
    "studies/{own}/whatever",
])
def test_path_tricks_are_400(gateway, orthanc, token_a, tail):
    p = "/dicom-web/" + tail.format(own=own(orthanc, "PAT-A")[0][1], theirs=own(orthanc, "PAT-B")[0][1])
    status, body = raw_get(gateway, p, token_a)
    assert status == 400, (p, status)
    assert b"DICM" not in body


# ---- WADO-URI ----

def wado_uri(gateway, token, study, series, sop, **extra):
    params = {"requestType": "WADO", "studyUID": study, "seriesUID": series, "objectUID": sop, **extra}
    return requests.get(f"{gateway.public_url}/wado", headers=auth(token), params=params, timeout=30)


def test_wado_uri_own_instance(gateway, orthanc, token_a):
    _, study, series, sop = own(orthanc, "PAT-A")[0]
    r = wado_uri(gateway, token_a, study, series, sop, contentType="application/dicom")
    assert r.status_code == 200
    assert r.content[128:132] == b"DICM"
    assert r.headers["Cache-Control"].startswith("private")


def test_wado_uri_of_another_patient_is_403(gateway, orthanc, token_a):
    _, study, series, sop = own(orthanc, "PAT-B")[0]
    r = wado_uri(gateway, token_a, study, series, sop, contentType="application/dicom")
    assert r.status_code == 403 and b"DICM" not in r.content
    mine = own(orthanc, "PAT-A")[0]
    r = wado_uri(gateway, token_a, mine[1], mine[2], sop, contentType="application/dicom")
    assert r.status_code == 403, "a foreign object under own study and series"
    r = wado_uri(gateway, token_a, "1.2.x", mine[2], mine[3])
    assert r.status_code == 400
    assert requests.get(f"{gateway.public_url}/wado", params={"requestType": "WADO", "studyUID": mine[1], "seriesUID": mine[2], "objectUID": mine[3]}, timeout=10).status_code == 401


# ---- browsers ----

def test_cors_preflight_without_token_and_headers_on_answers(base, token_a):
    r = requests.options(f"{base}/studies", headers={"Origin": "https://viewer.example.org", "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"}, timeout=10)
    assert r.status_code == 204
    assert r.headers["Access-Control-Allow-Origin"] == "https://viewer.example.org"
    assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
    assert "Access-Control-Allow-Credentials" not in r.headers
    r = requests.get(f"{base}/studies", headers={**auth(token_a), "Origin": "https://viewer.example.org"}, timeout=10)
    assert r.headers["Access-Control-Allow-Origin"] == "https://viewer.example.org"
    assert "WWW-Authenticate" in r.headers["Access-Control-Expose-Headers"]
    r = requests.options(f"{base}/studies", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}, timeout=10)
    assert "Access-Control-Allow-Origin" not in r.headers


# ---- discovery, STOW, PACS down ----

def test_discovery_documents(base, gateway, issuer):
    d = requests.get(f"{base}/.well-known/smart-configuration", timeout=10).json()
    assert "smart-imaging-access" in d["capabilities"]
    assert d["issuer"] == issuer.url
    assert d["token_endpoint"] == f"{issuer.url}/token"
    assert d["jwks_uri"].startswith("http")
    assert "patient/ImagingStudy.rs" in d["scopes_supported"]
    pr = requests.get(f"{gateway.public_url}/.well-known/oauth-protected-resource", timeout=10).json()
    assert pr["resource"] == base
    assert pr["authorization_servers"] == [issuer.url]
    assert pr["bearer_methods_supported"] == ["header"]


# ---- STOW-RS ----

def part10(pid, study=None, series=None):
    import io as _io

    import pydicom

    from dicomdata import make_instance

    data = make_instance(pid, study or generate_uid(), series or generate_uid(), 6000, 1, 1, "20250101")
    return data, pydicom.dcmread(_io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID


def stow(base, token, parts, path="studies"):
    boundary = "testboundary1234"
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n" for p in parts)
    body += f"--{boundary}--\r\n".encode()
    return requests.post(
        f"{base}/{path}",
        headers={**auth(token), "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}', "Accept": "application/dicom+json"},
        data=body,
        timeout=60,
    )


def seq(r, tag):
    return r.json().get(tag, {}).get("Value", [])


@pytest.fixture
def writer(issuer):
    return issuer.mint(patient="PAT-W", scope="patient/ImagingStudy.cruds")


def test_stow_own_instances(base, orthanc, writer):
    study = generate_uid()
    (a, sa), (b, sb) = part10("PAT-W", study), part10("PAT-W", study)
    r = stow(base, writer, [a, b])
    assert r.status_code == 200, r.text
    assert {i["00081155"]["Value"][0] for i in seq(r, "00081199")} == {sa, sb}
    assert orthanc.holds(sa) and orthanc.holds(sb)


def test_stow_mixed_reports_each_instance(base, orthanc, writer):
    own_data, own_sop = part10("PAT-W")
    foreign_data, foreign_sop = part10("PAT-B")
    into_foreign, into_sop = part10("PAT-W", own(orthanc, "PAT-B")[0][1])
    r = stow(base, writer, [own_data, foreign_data, into_foreign])
    assert r.status_code == 202, r.text
    assert [i["00081155"]["Value"][0] for i in seq(r, "00081199")] == [own_sop]
    failed = {i["00081155"]["Value"][0]: i["00081197"]["Value"][0] for i in seq(r, "00081198")}
    assert failed == {foreign_sop: 0x0124, into_sop: 0x0124}
    assert orthanc.holds(own_sop) and not orthanc.holds(foreign_sop) and not orthanc.holds(into_sop)
    assert orthanc.patient_of_study(own(orthanc, "PAT-B")[0][1]) == "PAT-B"


def test_stow_nothing_stored_is_409(base, orthanc, writer):
    data, sop = part10("PAT-B")
    r = stow(base, writer, [data])
    assert r.status_code == 409
    assert not orthanc.holds(sop)
    # an instance of another study than the path names
    data, sop = part10("PAT-W")
    r = stow(base, writer, [data], path=f"studies/{generate_uid()}")
    assert r.status_code == 409
    assert seq(r, "00081198")[0]["00081197"]["Value"][0] == 0xA900
    assert not orthanc.holds(sop)


def test_stow_without_write_scope_is_403(base, orthanc, issuer):
    data, sop = part10("PAT-W")
    r = stow(base, issuer.mint(patient="PAT-W", scope="patient/ImagingStudy.rs"), [data])
    assert r.status_code == 403
    assert 'error="insufficient_scope"' in r.headers["WWW-Authenticate"]
    assert not orthanc.holds(sop)


def test_every_stow_and_wado_uri_refusal_is_audited(base, gateway, orthanc, issuer, writer):
    """A refusal before the body is read (token, scope) and a part outside the study the path
    names each leave a denied audit record, as every other DICOMweb refusal does."""
    from test_introspection import metric_values

    def denied(op):
        return metric_values(gateway).get(f'pacsgate_audit_records_total{{channel="http",operation="{op}",outcome="denied"}}', 0)

    data, sop = part10("PAT-W")
    before = denied("STOW-RS")
    assert stow(base, issuer.mint(patient="PAT-W", scope="patient/ImagingStudy.rs"), [data]).status_code == 403
    assert stow(base, "not.a.token", [data]).status_code == 401
    assert stow(base, writer, [data], path=f"studies/{generate_uid()}").status_code == 409
    assert denied("STOW-RS") == before + 3
    assert not orthanc.holds(sop)
    _, study, series, inst = own(orthanc, "PAT-A")[0]
    before = denied("WADO-URI")
    r = requests.get(f"{gateway.public_url}/wado", headers=auth("not.a.token"), timeout=10,
                     params={"requestType": "WADO", "studyUID": study, "seriesUID": series, "objectUID": inst})
    assert r.status_code == 401
    assert denied("WADO-URI") == before + 1


def test_dicomweb_client_stores(base, orthanc, writer):
    import io as _io

    import pydicom

    data, sop = part10("PAT-W")
    c = DICOMwebClient(url=base, headers=auth(writer))
    c.store_instances([pydicom.dcmread(_io.BytesIO(data))])
    assert orthanc.holds(sop)


def test_pacs_dicomweb_down_is_502(tmp_root, orthanc, issuer):
    dead = f"http://127.0.0.1:{free_port()}/dicom-web"
    g = Gateway(tmp_root, orthanc, issuer, name="dead-dicomweb", dicomweb_url=dead)
    try:
        r = requests.get(f"{g.public_url}/dicom-web/studies", headers=auth(issuer.mint(patient="PAT-A")), timeout=30)
        assert r.status_code == 502
        assert "PAT-A" not in r.text
    finally:
        g.proc.terminate()
        g.proc.wait()


def test_a_token_without_imaging_access_is_403_before_anything_else(tmp_root, orthanc, issuer):
    """Whatever the request and whether DICOMweb is served at all: no imaging scope, 403."""
    import signal
    import time

    g = Gateway(tmp_root, orthanc, issuer, name="no-dicomweb")
    try:
        text = g.config.read_text()
        g.config.write_text("\n".join(l for l in text.splitlines() if not l.startswith("dicomweb_url")))
        g.proc.send_signal(signal.SIGHUP)
        deadline = time.time() + 10
        while "configuration re-read" not in g.log_text() and time.time() < deadline:
            time.sleep(0.1)
        none = issuer.mint(patient="PAT-A", scope="patient/Observation.rs openid")
        for path in ("studies", f"studies/{own(orthanc, 'PAT-A')[0][1]}", "series"):
            r = requests.get(f"{g.public_url}/dicom-web/{path}", headers=auth(none), timeout=30)
            assert r.status_code == 403 and "insufficient_scope" in r.headers["WWW-Authenticate"], (path, r.status_code)
        r = requests.post(f"{g.public_url}/dicom-web/studies", headers={**auth(none), "Content-Type": 'multipart/related; type="application/dicom"; boundary=x'}, data=b"--x--", timeout=30)
        assert r.status_code == 403
        # With imaging access, the same gateway answers by translation to DIMSE.
        r = requests.get(f"{g.public_url}/dicom-web/studies", headers=auth(issuer.mint(patient="PAT-A")), timeout=30)
        assert r.status_code == 200, r.text
        assert {s["0020000D"]["Value"][0] for s in r.json()} == orthanc.studies["PAT-A"]
    finally:
        g.proc.terminate()
        g.proc.wait()


def test_metrics_count_decisions_and_hold_no_phi_or_token(base, gateway, token_a):
    from test_introspection import metric_values

    assert qido(base, "studies", token_a).status_code == 200
    assert qido(base, "studies", token_a, PatientID="PAT-B").status_code == 403
    m = metric_values(gateway)
    assert m['pacsgate_audit_records_total{channel="http",operation="QIDO-RS",outcome="allowed"}'] >= 1
    assert m['pacsgate_audit_records_total{channel="http",operation="QIDO-RS",outcome="denied"}'] >= 1
    assert m['pacsgate_http_responses_total{class="2xx"}'] >= 1
    assert m['pacsgate_token_checks_total{result="valid"}'] >= 2
    text = requests.get(f"{gateway.public_url}/metrics", timeout=10).text
    assert "PAT-" not in text and token_a not in text and "1.2.826" not in text
