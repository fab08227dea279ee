"""Patient identity mapping through both protocols: a table that maps one EHR patient to two
DICOM PatientIDs (the allowed set is their union, each matched exactly), a claim that holds the
PatientID (plain or in CX form), and patients that map to nothing (denied, never widened)."""

import pytest
import requests

from conftest import Gateway, stop
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
