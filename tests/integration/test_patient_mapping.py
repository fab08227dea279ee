"""Patient identity mapping through both protocols: a table that maps one EHR patient to two
DICOM PatientIDs (the allowed set is their union, each matched exactly), a claim that holds the
PatientID (plain or in CX form), and patients that map to nothing (denied, never widened)."""

import pytest
import requests

from conftest import Gateway, Issuer, stop
from test_dimse_association import associate, assert_rejected_permanent
from test_dimse_find import STUDY_ROOT, find, query


def qido(g, token, **params):
    return requests.get(f"{g.public_url}/dicom-web/studies", headers={"Authorization": f"Bearer {token}"}, params=params, timeout=30)


@pytest.fixture(scope="module")
def table_gateway(tmp_root, orthanc, issuer):
    d = tmp_root / "mapping-table"
    d.mkdir()
    table = d / "patients.csv"
    table.write_text("patient,patient_id,issuer\nEHR-1,PAT-A,\nEHR-1,PAT-B,\nEHR-2,CASE01,\n")
    g = Gateway(d, orthanc, issuer, name="table-gateway", patients=f'[patients]\nmap = "table"\ntable_file = "{table}"')
    yield g
    stop(g.proc)


@pytest.fixture(scope="module")
def claim_gateway(tmp_root, orthanc, issuer):
    d = tmp_root / "mapping-claim"
    d.mkdir()
    g = Gateway(d, orthanc, issuer, name="claim-gateway", patients='[patients]\nmap = "claim"\nclaim = "extensions.ihe_bppc.patient_id"')
    yield g
    stop(g.proc)


def test_table_maps_one_patient_to_the_union_of_its_ids(table_gateway, issuer, orthanc):
    token = issuer.mint(patient="EHR-1")
    expected = orthanc.studies["PAT-A"] | orthanc.studies["PAT-B"]
    assoc, _ = associate(table_gateway, token)
    final, matches = find(assoc, query("STUDY"), STUDY_ROOT)
    assert final == 0x0000
    assert {m.StudyInstanceUID for m in matches} == expected
    final, matches = find(assoc, query("STUDY", patient_id="PAT-B"), STUDY_ROOT)
    assert {m.StudyInstanceUID for m in matches} == orthanc.studies["PAT-B"]
    final, _ = find(assoc, query("STUDY", patient_id="CASE01"), STUDY_ROOT)
    assert final == 0x0124
    assoc.release()
    r = qido(table_gateway, token)
    assert r.status_code == 200
    assert {s["0020000D"]["Value"][0] for s in r.json()} == expected
    # case variants stay apart through the mapping: CASE01 only, not case01
    r = qido(table_gateway, issuer.mint(patient="EHR-2"))
    assert {s["00100020"]["Value"][0] for s in r.json()} == {"CASE01"}


def test_a_patient_in_no_table_row_gets_nothing(table_gateway, issuer):
    token = issuer.mint(patient="EHR-UNKNOWN")
    assoc, received = associate(table_gateway, token)
    assert_rejected_permanent(assoc, received)
    r = qido(table_gateway, token)
    assert r.status_code == 403, r.text


def test_claim_holds_the_patient_id(claim_gateway, issuer, orthanc):
    token = issuer.mint(patient="EHR-9", claims={"extensions": {"ihe_bppc": {"patient_id": "PAT-B^^^&1.2.3.4&ISO"}}})
    assoc, _ = associate(claim_gateway, token)
    final, matches = find(assoc, query("STUDY"), STUDY_ROOT)
    assoc.release()
    assert final == 0x0000
    assert {m.StudyInstanceUID for m in matches} == orthanc.studies["PAT-B"]
    r = qido(claim_gateway, token)
    assert {s["0020000D"]["Value"][0] for s in r.json()} == orthanc.studies["PAT-B"]
    # without the claim the token's patient maps to nothing
    assert qido(claim_gateway, issuer.mint(patient="PAT-A")).status_code == 403


@pytest.fixture(scope="module")
def fhir_env(tmp_root, orthanc):
    from conftest import Issuer

    d = tmp_root / "mapping-fhir"
    d.mkdir()
    ehr = Issuer(d, extra_args=["--client", "pacsgate:s3cret", "--fhir-patient", "EHR-7=PAT-A", "--fhir-patient", "EHR-8=case01"])
    g = Gateway(
        d, orthanc, ehr, name="fhir-gateway",
        issuer_extra=f'verify = "jwt"\nclient_id = "pacsgate"\nclient_secret = "s3cret"\nfhir_base_url = "{ehr.url}/fhir"',
        patients='[patients]\nmap = "fhir"\nidentifier_type = "MR"',
    )
    yield ehr, g
    stop(g.proc)
    stop(ehr.proc)


def test_fhir_patient_identifiers_map_to_patient_ids(fhir_env, orthanc):
    ehr, g = fhir_env
    token = ehr.mint(patient="EHR-7")
    assoc, _ = associate(g, token)
    final, matches = find(assoc, query("STUDY"), STUDY_ROOT)
    assoc.release()
    assert final == 0x0000
    assert {m.StudyInstanceUID for m in matches} == orthanc.studies["PAT-A"]
    r = qido(g, token)
    assert {s["0020000D"]["Value"][0] for s in r.json()} == orthanc.studies["PAT-A"]
    # the MR identifier is matched exactly: case01, not CASE01
    r = qido(g, ehr.mint(patient="EHR-8"))
    assert {s["00100020"]["Value"][0] for s in r.json()} == {"case01"}


def test_fhir_look_up_failure_grants_nothing(tmp_root, orthanc):
    from conftest import Issuer

    d = tmp_root / "mapping-fhir-wrong-secret"
    d.mkdir()
    ehr = Issuer(d, extra_args=["--client", "pacsgate:s3cret"])
    g = Gateway(
        d, orthanc, ehr, name="fhir-gateway-bad",
        issuer_extra=f'verify = "jwt"\nclient_id = "pacsgate"\nclient_secret = "wrong"\nfhir_base_url = "{ehr.url}/fhir"',
        patients='[patients]\nmap = "fhir"\nidentifier_type = "MR"',
    )
    try:
        token = ehr.mint(patient="EHR-7")
        assoc, received = associate(g, token)
        assert_rejected_permanent(assoc, received)
        assert qido(g, token).status_code == 403
    finally:
        stop(g.proc)
        stop(ehr.proc)


# ---- IssuerOfPatientID (patients.use_issuer) ----

ISSUED = "PAT-I"  # one PatientID, three issuers: three patients where the issuer counts


@pytest.fixture(scope="module")
def issued(orthanc):
    """Loads PAT-I's studies under issuers HOSP_A (two instances), HOSP_B and none."""
    import io

    import pydicom
    from pydicom.uid import generate_uid

    from dicomdata import make_instance

    out = {}
    for n, issuer in enumerate(["HOSP_A", "HOSP_B", None]):
        study, series = generate_uid(), generate_uid()
        sops = []
        for i in range(2 if issuer == "HOSP_A" else 1):
            data = make_instance(ISSUED, study, series, 9300 + n, 1, i + 1, "20240101", issuer=issuer)
            orthanc.upload(data)
            sops.append(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)
        out[issuer] = (study, set(sops))
    return out


@pytest.fixture(scope="module")
def issuer_gateway(tmp_root, orthanc, issuer):
    d = tmp_root / "mapping-issuer"
    d.mkdir()
    table = d / "patients.csv"
    table.write_text(f"patient,patient_id,issuer\nEHR-I,{ISSUED},HOSP_A\nEHR-NONE,{ISSUED},\n")
    g = Gateway(d, orthanc, issuer, name="issuer-gateway", patients=f'[patients]\nmap = "table"\ntable_file = "{table}"\nuse_issuer = true')
    yield g
    stop(g.proc)


def test_use_issuer_separates_patients_sharing_a_patient_id(issuer_gateway, issuer, issued, orthanc):
    from test_dimse_store_get import store, writer
    from test_study_restrictions import c_get_study as c_get_study_sops

    token = issuer.mint(patient="EHR-I")
    a_study, a_sops = issued["HOSP_A"]
    assoc, _ = associate(issuer_gateway, token)
    final, matches = find(assoc, query("STUDY"), STUDY_ROOT)
    assert final == 0x0000
    assert {m.StudyInstanceUID for m in matches} == {a_study}
    assert all("IssuerOfPatientID" not in m for m in matches), "the key the gateway added is stripped"
    ds = query("STUDY")
    ds.IssuerOfPatientID = ""
    final, matches = find(assoc, ds, STUDY_ROOT)
    assert [m.IssuerOfPatientID for m in matches] == ["HOSP_A"]
    assoc.release()
    assert {s["0020000D"]["Value"][0] for s in qido(issuer_gateway, token).json()} == {a_study}
    # Retrievals: HOSP_A's study only.
    assert c_get_study_sops(issuer_gateway, token, a_study) == (0x0000, a_sops)
    for other in ("HOSP_B", None):
        final, got = c_get_study_sops(issuer_gateway, token, issued[other][0])
        assert final == 0x0124 and not got, other
        r = requests.get(f"{issuer_gateway.public_url}/dicom-web/studies/{issued[other][0]}/metadata",
                         headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert r.status_code == 403, other
    # A patient mapped without an issuer sees only the data without one.
    none_token = issuer.mint(patient="EHR-NONE")
    assoc, _ = associate(issuer_gateway, none_token)
    final, matches = find(assoc, query("STUDY"), STUDY_ROOT)
    assoc.release()
    assert final == 0x0000 and {m.StudyInstanceUID for m in matches} == {issued[None][0]}
    # Orthanc's QIDO leaves an absent IssuerOfPatientID out even when asked: the gateway then
    # asks its own C-FIND, which says "none" with an empty value.
    assert {s["0020000D"]["Value"][0] for s in qido(issuer_gateway, none_token).json()} == {issued[None][0]}
    # Stores: the instance's issuer must be the patient's; HOSP_A's own study takes more.
    from dicomdata import make_instance
    from pydicom.uid import generate_uid

    w = writer(issuer_gateway, issuer, "EHR-I")
    foreign = make_instance(ISSUED, generate_uid(), generate_uid(), 9310, 1, 1, "20240101", issuer="HOSP_B")
    into_b = make_instance(ISSUED, issued["HOSP_B"][0], generate_uid(), 9311, 1, 1, "20240101", issuer="HOSP_A")
    own = make_instance(ISSUED, a_study, generate_uid(), 9312, 1, 1, "20240101", issuer="HOSP_A")
    assert store(w, foreign) == 0x0124
    assert store(w, into_b) == 0x0124, "HOSP_B's study is another patient's"
    assert store(w, own) == 0x0000
    w.release()


def test_use_issuer_with_fhir_identifier_system(tmp_root, orthanc, issued):
    d = tmp_root / "mapping-fhir-issuer"
    d.mkdir()
    ehr = Issuer(d, extra_args=["--client", "pacsgate:s3cret", "--fhir-patient", f"EHR-77={ISSUED}"])
    g = Gateway(
        d, orthanc, ehr, name="fhir-issuer-gateway",
        issuer_extra=f'verify = "jwt"\nclient_id = "pacsgate"\nclient_secret = "s3cret"\nfhir_base_url = "{ehr.url}/fhir"',
        patients='[patients]\nmap = "fhir"\nidentifier_type = "MR"\nuse_issuer = true\nissuer_names = { "urn:oid:1.2.36.146.595.217.0.1" = "HOSP_B" }',
    )
    try:
        token = ehr.mint(patient="EHR-77")
        assert {s["0020000D"]["Value"][0] for s in qido(g, token).json()} == {issued["HOSP_B"][0]}
        assoc, _ = associate(g, token)
        final, matches = find(assoc, query("STUDY"), STUDY_ROOT)
        assoc.release()
        assert final == 0x0000 and {m.StudyInstanceUID for m in matches} == {issued["HOSP_B"][0]}
    finally:
        stop(g.proc)
        stop(ehr.proc)


def test_use_issuer_patient_level_get_delivers_own_and_reports_others_failed(issuer_gateway, issuer, issued):
    """PAT-I is held under three issuers; a PATIENT-level C-GET makes Orthanc send all four
    instances. The gateway withholds the two of other issuers, goes on with the rest, and
    reports the withheld ones as failed."""
    from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelGet as PATIENT_GET

    from test_dimse_store_get import connect, get_query

    token = issuer.mint(patient="EHR-I")
    received = []
    assoc = connect(issuer_gateway, token, received)
    final = None
    for status, _ in assoc.send_c_get(get_query("PATIENT", pid=ISSUED), PATIENT_GET):
        assert status is not None and "Status" in status, "C-GET got no response"
        if status.Status not in (0xFF00, 0xFF01):
            final = status
    assert assoc.is_established, "the association survives a withheld sub-operation"
    assoc.release()
    # HOSP_A's instances (an earlier test may have stored one more), nothing of the others
    assert issued["HOSP_A"][1] <= {r.SOPInstanceUID for r in received}
    assert {r.IssuerOfPatientID for r in received} == {"HOSP_A"}
    assert final.Status == 0xB000
    assert final.NumberOfCompletedSuboperations == len(received)
    assert final.NumberOfFailedSuboperations == 2


def test_use_issuer_patient_level_move_delivers_own_and_reports_others_failed(tmp_root, orthanc, issuer, issued):
    """The same through C-MOVE: the receiver withholds the other issuers' instances without
    stopping the PACS's move, so the caller's own arrive, and the final counts say what
    failed."""
    from conftest import free_port
    from test_dimse_move import PATIENT_MOVE, Destination, move, query as move_query

    d = tmp_root / "mapping-issuer-move"
    d.mkdir()
    table = d / "patients.csv"
    table.write_text(f"patient,patient_id,issuer\nEHR-I,{ISSUED},HOSP_A\n")
    receive, dest_port = free_port(), free_port()
    # Orthanc learns this gateway's receiver under an AE title of its own.
    r = requests.put(f"{orthanc.url}/modalities/issuer-move", json={"AET": "PACSGATEI", "Host": "127.0.0.1", "Port": receive}, timeout=30)
    r.raise_for_status()
    g = Gateway(d, orthanc, issuer, name="issuer-move-gateway", receive_port=receive, destinations=[("DEST", dest_port)],
                calling_ae="PACSGATEI", patients=f'[patients]\nmap = "table"\ntable_file = "{table}"\nuse_issuer = true')
    dest = Destination(dest_port)
    try:
        final = move(g, issuer.mint(patient="EHR-I"), move_query("PATIENT", pid=ISSUED), model=PATIENT_MOVE)
        assert issued["HOSP_A"][1] <= {x.SOPInstanceUID for x in dest.received}
        assert {x.IssuerOfPatientID for x in dest.received} == {"HOSP_A"}
        assert final.Status == 0xB000
        assert final.NumberOfCompletedSuboperations == len(dest.received)
        assert final.NumberOfFailedSuboperations == 2
    finally:
        dest.stop()
        stop(g.proc)
        requests.delete(f"{orthanc.url}/modalities/issuer-move", timeout=30)
