"""Study restrictions through both protocols against Orthanc: granular SMART v2 scope
constraints (modality, started, identifier), a launch context that names an ImagingStudy, and
user-level tokens under `user_level = "ehr-check"` (the EHR is asked, with the caller's own
token, which studies it shows). C-FIND, QIDO-RS, the FHIR ImagingStudy search, C-GET, WADO-RS, C-STORE and STOW-RS must agree;
every failure to judge withholds or denies."""

import io

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from conftest import Gateway, Issuer, free_port, stop
from dicomdata import make_instance
from test_dimse_association import associate, assert_rejected_permanent
from test_dimse_find import STUDY_ROOT, find, query
from test_dimse_store_get import connect, get, get_query, store, writer

NOT_AUTHORIZED = 0x0124
PID = "PAT-R"
# (modality, StudyDate) of PAT-R's three studies, each of one series of two instances.
SHAPE = {"CT": "20220610", "MR": "20230720", "OT": "20240801"}


@pytest.fixture(scope="module")
def studies(orthanc):
    """Loads PAT-R's studies; returns {modality: (study, series, [sop, sop])}."""
    out = {}
    for n, (modality, date) in enumerate(SHAPE.items()):
        study, series = generate_uid(), generate_uid()
        sops = []
        for i in range(2):
            data = make_instance(PID, study, series, 9100 + n, 1, i + 1, date, modality=modality)
            orthanc.upload(data)
            sops.append(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)
        out[modality] = (study, series, sops)
    return out


@pytest.fixture(scope="module")
def env(tmp_root, orthanc, studies):
    """An EHR (dev issuer with the gateway as a client, and ImagingStudy/is-ct known as the CT
    study) and a gateway trusting it with launch_context_restricts and user_level ehr-check."""
    d = tmp_root / "study-restrictions"
    d.mkdir()
    ehr = Issuer(d, extra_args=["--client", "pacsgate:s3cret", "--imaging-study", f"is-ct={studies['CT'][0]}"])
    g = Gateway(
        d, orthanc, ehr, name="restricting-gateway",
        issuer_extra=f'verify = "jwt"\nclient_id = "pacsgate"\nclient_secret = "s3cret"\nfhir_base_url = "{ehr.url}/fhir"\nlaunch_context_restricts = true',
        extra='[policy]\nuser_level = "ehr-check"',
    )
    yield ehr, g
    stop(g.proc)
    stop(ehr.proc)


def auth(token):
    return {"Authorization": f"Bearer {token}"}


def qido_studies(g, token, **params):
    r = requests.get(f"{g.public_url}/dicom-web/studies", headers=auth(token), params=params, timeout=30)
    assert r.status_code == 200, r.text
    return {s["0020000D"]["Value"][0] for s in r.json()}


def all_of_patient(gateway):
    """Every study of PAT-R, as an unrestricted token of the session's issuer sees them (the
    write test adds one)."""
    return qido_studies(gateway, gateway.issuer.mint(patient=PID))


def find_studies(g, token, pid=PID):
    assoc, _ = associate(g, token)
    assert assoc.is_established
    final, matches = find(assoc, query("STUDY", patient_id=pid), STUDY_ROOT)
    assoc.release()
    assert final == 0x0000
    return {m.StudyInstanceUID for m in matches}


def c_get_study(g, token, study):
    received = []
    assoc = connect(g, token, received)
    final, _ = get(assoc, get_query("STUDY", study=study))
    assoc.release()
    return final, {r.SOPInstanceUID for r in received}


def wado_status(g, token, study):
    r = requests.get(f"{g.public_url}/dicom-web/studies/{study}/metadata", headers=auth(token), timeout=30)
    if r.status_code != 200:
        assert b"7FE00010" not in r.content and b"00100020" not in r.content, "no DICOM data in a refusal"
    return r.status_code


def fhir_studies(g, token):
    r = requests.get(f"{g.public_url}/fhir/ImagingStudy", headers=auth(token), params={"patient": PID}, timeout=30)
    assert r.status_code == 200, r.text
    return {e["resource"]["id"] for e in r.json()["entry"] if e["resource"]["resourceType"] == "ImagingStudy"}


def assert_reach(g, token, studies, allowed):
    """Every path agrees: exactly the studies whose modality is in `allowed` are reachable."""
    want = {studies[m][0] for m in allowed}
    assert find_studies(g, token) == want
    assert qido_studies(g, token) == want
    assert fhir_studies(g, token) == want
    for m, (study, _, sops) in studies.items():
        final, got = c_get_study(g, token, study)
        if m in allowed:
            assert (final, got) == (0x0000, set(sops)), m
            assert wado_status(g, token, study) == 200, m
        else:
            assert final == NOT_AUTHORIZED and not got, m
            assert wado_status(g, token, study) == 403, m


@pytest.mark.parametrize(
    "scope,allowed",
    [
        ("patient/ImagingStudy.rs?modality=CT", {"CT"}),
        ("patient/ImagingStudy.rs?modality=http://dicom.nema.org/resources/ontology/DCM|MR,OT", {"MR", "OT"}),
        ("patient/ImagingStudy.rs?started=ge2023", {"MR", "OT"}),
        ("patient/ImagingStudy.rs?started=lt2023-07-21&modality=MR", {"MR"}),
        ("patient/ImagingStudy.r?modality=CT,OT patient/ImagingStudy.s?started=ge2024", {"OT"}),
        ("patient/ImagingStudy.rs?modality=CT patient/ImagingStudy.rs?started=2024-08", {"CT", "OT"}),
    ],
)
def test_granular_scopes_narrow_every_path(gateway, issuer, studies, scope, allowed):
    assert_reach(gateway, issuer.mint(patient=PID, scope=scope), studies, allowed)


def test_identifier_constraint_names_one_study(gateway, issuer, studies):
    ot = studies["OT"][0]
    token = issuer.mint(patient=PID, scope=f"patient/ImagingStudy.rs?identifier=urn:dicom:uid|urn:oid:{ot}")
    assert_reach(gateway, token, studies, {"OT"})


def test_study_level_results_are_judged_on_their_own_facts(env, studies):
    """A gateway with empty caches (the first test of `env`): judging STUDY-level results of a
    modality-constrained token needs no ownership look-up at the PACS."""
    from test_introspection import metric_values

    ehr, g = env
    token = ehr.mint(patient=PID, scope="patient/ImagingStudy.rs?modality=CT")
    lookups = lambda: sum(v for k, v in metric_values(g).items() if k.startswith("pacsgate_pacs_lookups_total"))
    before = lookups()
    assert qido_studies(g, token) == {studies["CT"][0]}
    assoc, _ = associate(g, token)
    final, matches = find(assoc, query("STUDY", patient_id=PID), STUDY_ROOT)
    assoc.release()
    assert final == 0x0000 and {m.StudyInstanceUID for m in matches} == {studies["CT"][0]}
    assert all("ModalitiesInStudy" not in m and "StudyDate" not in m for m in matches), "added keys are stripped"
    assert lookups() == before, "no ownership look-up was needed"
    # A SERIES-level query inside one study is a look into that study, judged like QIDO-RS
    # /studies/{uid}/series: on the study's facts as the PACS's look-up gives them (once).
    ds = query("SERIES", patient_id=PID)
    ds.StudyInstanceUID = studies["MR"][0]
    assoc, _ = associate(g, token)
    final, matches = find(assoc, ds, STUDY_ROOT)
    assoc.release()
    assert final == NOT_AUTHORIZED and matches == []
    assert lookups() == before + 1
    # A caller that matches on the facts itself gets them judged on the PACS's own look-up, not
    # on what the match echoes (the studies are cached by now).
    ds = query("STUDY", patient_id=PID)
    ds.ModalitiesInStudy = "CT"
    assoc, _ = associate(g, token)
    final, matches = find(assoc, ds, STUDY_ROOT)
    assoc.release()
    assert final == 0x0000 and {m.StudyInstanceUID for m in matches} == {studies["CT"][0]}
    assert "CT" in matches[0].ModalitiesInStudy
    r = requests.get(f"{g.public_url}/dicom-web/studies", headers=auth(token), params={"PatientID": PID, "ModalitiesInStudy": "MR"}, timeout=30)
    assert r.status_code == 200 and r.json() == []


def test_lower_levels_and_added_keys_under_a_restriction(gateway, issuer, studies):
    token = issuer.mint(patient=PID, scope="patient/ImagingStudy.rs?modality=CT")
    assoc, _ = associate(gateway, token)
    # The caller did not ask for the Study Instance UID: the gateway asks, judges and strips it.
    ds = query("STUDY", patient_id=PID)
    del ds.StudyInstanceUID
    final, matches = find(assoc, ds, STUDY_ROOT)
    assert final == 0x0000 and len(matches) == 1
    assert "StudyInstanceUID" not in matches[0]
    # Series of the MR study: a look into a study outside the restriction, refused as QIDO-RS
    # refuses /studies/{MR}/series below; of the CT study: shown.
    for m, status, n in (("MR", NOT_AUTHORIZED, 0), ("CT", 0x0000, 1)):
        ds = query("SERIES", patient_id=PID)
        ds.StudyInstanceUID = studies[m][0]
        final, matches = find(assoc, ds, STUDY_ROOT)
        assert final == status and len(matches) == n, m
    # Patient-level matches name no study: nothing can be judged, nothing is shown.
    final, matches = find(assoc, query("PATIENT", patient_id=PID), STUDY_ROOT)
    assert final == 0x0000 and matches == []
    assoc.release()
    r = requests.get(f"{gateway.public_url}/dicom-web/studies/{studies['MR'][0]}/series", headers=auth(token), timeout=30)
    assert r.status_code == 403
    r = requests.get(f"{gateway.public_url}/dicom-web/instances", headers=auth(token), params={"PatientID": PID}, timeout=30)
    assert r.status_code == 200 and {i["0020000D"]["Value"][0] for i in r.json()} == {studies["CT"][0]}
    # A PATIENT-level retrieval cannot be judged per study: refused.
    received = []
    assoc = connect(gateway, token, received)
    from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelGet as PATIENT_GET

    final, _ = get(assoc, get_query("PATIENT", pid=PID), PATIENT_GET)
    assoc.release()
    assert final == NOT_AUTHORIZED and not received


def test_constraints_the_gateway_cannot_evaluate_grant_nothing(gateway, issuer):
    for scope in ("patient/ImagingStudy.rs?category=exam", "patient/ImagingStudy.rs?started=ap2023", "patient/ImagingStudy.rs?modality:not=CT"):
        token = issuer.mint(patient=PID, scope=scope)
        assoc, received = associate(gateway, token)
        assert_rejected_permanent(assoc, received)
        r = requests.get(f"{gateway.public_url}/dicom-web/studies", headers=auth(token), timeout=30)
        assert r.status_code == 403, scope


def test_write_constraints_judge_the_instance(gateway, issuer, orthanc, studies):
    scope = "patient/ImagingStudy.rs patient/ImagingStudy.c?modality=CT"
    assoc = writer(gateway, issuer, PID, scope=scope)
    ot = make_instance(PID, generate_uid(), generate_uid(), 9200, 1, 1, "20250101", modality="OT")
    ct = make_instance(PID, generate_uid(), generate_uid(), 9201, 1, 1, "20250101", modality="CT")
    assert store(assoc, ot) == NOT_AUTHORIZED
    assert store(assoc, ct) == 0x0000
    # A CT instance into the existing MR study would make that study readable: refused.
    into_mr = make_instance(PID, studies["MR"][0], generate_uid(), 9203, 1, 1, "20250101", modality="CT")
    assert store(assoc, into_mr) == NOT_AUTHORIZED
    assoc.release()
    sop = lambda data: pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID
    assert not orthanc.holds(sop(ot)) and orthanc.holds(sop(ct))
    # STOW-RS: the same rule, per instance.
    ot2 = make_instance(PID, generate_uid(), generate_uid(), 9202, 1, 1, "20250101", modality="OT")
    boundary = "pacsgate-test-boundary"
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n" for part in (ot2,)
    ) + b"--" + boundary.encode() + b"--\r\n"
    r = requests.post(
        f"{gateway.public_url}/dicom-web/studies",
        headers={**auth(issuer.mint(patient=PID, scope=scope)), "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
        data=body,
        timeout=30,
    )
    assert r.status_code == 409, r.text
    assert not orthanc.holds(sop(ot2))


def test_launch_context_names_the_one_study(env, gateway, studies):
    ehr, g = env
    # By reference: the gateway resolves ImagingStudy/is-ct at the EHR with its own token.
    token = ehr.mint(patient=PID, claims={"fhirContext": [{"reference": "ImagingStudy/is-ct"}]})
    assert_reach(g, token, studies, {"CT"})
    # By identifier.
    mr = studies["MR"][0]
    token = ehr.mint(patient=PID, claims={"fhirContext": [{"type": "ImagingStudy", "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{mr}"}}]})
    assert_reach(g, token, studies, {"MR"})
    # SMART 2.0's bare reference strings too.
    token = ehr.mint(patient=PID, claims={"fhirContext": ["ImagingStudy/is-ct"]})
    assert qido_studies(g, token) == {studies["CT"][0]}
    # A reference the EHR does not know leaves nothing.
    token = ehr.mint(patient=PID, claims={"fhirContext": [{"reference": "ImagingStudy/unknown"}]})
    assert find_studies(g, token) == set()
    assert qido_studies(g, token) == set()
    # Context that names no study restricts nothing.
    token = ehr.mint(patient=PID, claims={"fhirContext": [{"reference": "Encounter/e1"}]})
    assert qido_studies(g, token) == all_of_patient(gateway)


def test_launch_context_is_only_context_unless_configured(gateway, issuer, studies):
    token = issuer.mint(patient=PID, claims={"fhirContext": [{"reference": "ImagingStudy/is-ct"}]})
    assert qido_studies(gateway, token) == all_of_patient(gateway) >= {s[0] for s in studies.values()}


def test_ehr_check_shows_what_the_ehr_shows_the_caller(env, gateway, orthanc, studies):
    ehr, g = env
    a_study = sorted(orthanc.studies["PAT-A"])[0]
    shown = {studies["CT"][0], a_study}
    token = ehr.mint(scope="user/ImagingStudy.rs", claims={"ehr_studies": sorted(shown)})
    from test_introspection import metric_values

    searches = lambda: metric_values(g).get(f'pacsgate_issuer_requests_total{{issuer="{ehr.url}",kind="study_search",result="ok"}}', 0)
    before = searches()
    # Queries across patients return exactly what the EHR shows this user...
    assert qido_studies(g, token) == shown
    # ...asked in batched searches of 50 for all the studies of the PACS's answer (how many
    # the shared PACS holds depends on the tests that ran before).
    held = len(requests.get(f"{orthanc.url}/studies", timeout=30).json())
    assert searches() - before == -(-held // 50), f"{held} studies"
    fresh = ehr.mint(scope="user/ImagingStudy.rs", claims={"ehr_studies": sorted(shown)})
    before = searches()
    assoc, _ = associate(g, fresh)
    final, matches = find(assoc, query("STUDY", ask_patient_id=False), STUDY_ROOT)
    assert final == 0x0000 and {m.StudyInstanceUID for m in matches} == shown
    n_studies = len(requests.get(f"{orthanc.url}/studies", timeout=30).json())
    # Matches arriving together are judged together (2 searches for 13 studies here; how many
    # arrive together depends on timing, so only "fewer than one per study" is asserted).
    assert searches() - before < n_studies
    final, matches = find(assoc, query("PATIENT"), STUDY_ROOT)
    assert final == 0x0000 and matches == [], "patient-level matches name no study"
    assoc.release()
    # Retrievals: shown studies only.
    final, got = c_get_study(g, token, a_study)
    assert final == 0x0000 and got == {x[3] for x in orthanc.instances if x[1] == a_study}
    assert wado_status(g, token, a_study) == 200
    for other in (studies["MR"][0], sorted(orthanc.studies["PAT-B"])[0]):
        final, got = c_get_study(g, token, other)
        assert final == NOT_AUTHORIZED and not got
        assert wado_status(g, token, other) == 403
    # A user the EHR shows nothing sees nothing; a patient-level token is judged as before.
    nobody = ehr.mint(scope="user/ImagingStudy.rs")
    assert qido_studies(g, nobody) == set()
    assert c_get_study(g, nobody, a_study)[0] == NOT_AUTHORIZED
    assert find_studies(g, ehr.mint(patient=PID)) == all_of_patient(gateway)
    # The gateway's log never holds the caller's token.
    assert token not in g.log_text()


def test_ehr_check_with_the_ehr_down_denies(tmp_root, orthanc, studies):
    d = tmp_root / "ehr-down"
    d.mkdir()
    ehr = Issuer(d)
    dead = free_port()
    g = Gateway(
        d, orthanc, ehr, name="ehr-down-gateway",
        issuer_extra=f'verify = "jwt"\nfhir_base_url = "http://127.0.0.1:{dead}/fhir"',
        extra='[policy]\nuser_level = "ehr-check"',
    )
    try:
        ct = studies["CT"][0]
        token = ehr.mint(scope="user/ImagingStudy.rs", claims={"ehr_studies": [ct]})
        assert qido_studies(g, token) == set()
        r = requests.get(f"{g.public_url}/dicom-web/studies/{ct}/metadata", headers=auth(token), timeout=30)
        assert r.status_code == 503 and "Retry-After" in r.headers and b"00100020" not in r.content
        # Refused: Out of Resources, unable to calculate the matches (a retry may succeed).
        assert c_get_study(g, token, ct)[0] == 0xA701
        assert "EHR study check failed; denying" in g.log_text()
        from test_introspection import metric_values

        m = metric_values(g)
        assert m[f'pacsgate_issuer_requests_total{{issuer="{ehr.url}",kind="study_search",result="error"}}'] >= 2
    finally:
        stop(g.proc)
        stop(ehr.proc)
