"""Patient-scoped C-FIND through the gateway against Orthanc, driven by pynetdicom: exact
results at every level and root, refusals for foreign ids and patterns, case and padding
variants of PatientID, and token expiry during an association."""

import time

import pytest
from pydicom.dataset import Dataset
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind as PATIENT_ROOT,
    StudyRootQueryRetrieveInformationModelFind as STUDY_ROOT,
)

from test_dimse_association import associate

NOT_AUTHORIZED = 0x0124
LEVEL_UID = {"PATIENT": None, "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}
LEVEL_COUNT = {"PATIENT": None, "STUDY": "studies", "SERIES": "series", "IMAGE": "instances"}


def query(level, patient_id=None, ask_patient_id=True):
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    if patient_id is not None or ask_patient_id:
        ds.PatientID = patient_id if patient_id is not None else ""
    ds.PatientName = ""
    if level != "PATIENT":
        ds.StudyInstanceUID = ""
    if level in ("SERIES", "IMAGE"):
        ds.SeriesInstanceUID = ""
    if level == "IMAGE":
        ds.SOPInstanceUID = ""
    return ds


def find(assoc, ds, model):
    """Runs one C-FIND; returns (final status, matches)."""
    matches, final = [], None
    for status, identifier in assoc.send_c_find(ds, model):
        assert status is not None and "Status" in status, "the C-FIND got no response"
        if status.Status in (0xFF00, 0xFF01):
            matches.append(identifier)
        else:
            final = status.Status
    return final, matches


@pytest.fixture
def session(gateway, issuer):
    opened = []

    def open_for(patient, **kw):
        assoc, _ = associate(gateway, issuer.mint(patient=patient, **kw))
        assert assoc.is_established
        opened.append(assoc)
        return assoc

    yield open_for
    for a in opened:
        if a.is_established:
            a.release()


CASES = [(PATIENT_ROOT, lvl) for lvl in ("PATIENT", "STUDY", "SERIES", "IMAGE")] + [
    (STUDY_ROOT, lvl) for lvl in ("STUDY", "SERIES", "IMAGE")
]


@pytest.mark.parametrize("model,level", CASES, ids=[f"{m.name}-{l}" for m, l in CASES])
@pytest.mark.parametrize("patient", ["PAT-A", "PAT-B"])
def test_exactly_own_patient_at_every_level(session, orthanc, model, level, patient):
    assoc = session(patient)
    final, matches = find(assoc, query(level), model)
    assert final == 0x0000
    assert matches, "own data must be found"
    assert {m.PatientID for m in matches} == {patient}
    held = orthanc.counts(patient)
    if level == "PATIENT":
        assert len(matches) == 1
    else:
        uids = {getattr(m, LEVEL_UID[level]) for m in matches}
        assert len(uids) == len(matches) == held[LEVEL_COUNT[level]], (level, held)
    if level == "STUDY":
        assert {m.StudyInstanceUID for m in matches} == orthanc.studies[patient]


def test_patient_id_not_asked_is_narrowed_and_not_returned(session, orthanc):
    assoc = session("PAT-A")
    final, matches = find(assoc, query("STUDY", ask_patient_id=False), STUDY_ROOT)
    assert final == 0x0000
    assert {m.StudyInstanceUID for m in matches} == orthanc.studies["PAT-A"]
    assert all("PatientID" not in m for m in matches), "the key the gateway added is stripped"


def test_universal_match_is_narrowed(session, orthanc):
    assoc = session("PAT-A")
    final, matches = find(assoc, query("STUDY", patient_id="*"), STUDY_ROOT)
    assert final == 0x0000
    assert {m.StudyInstanceUID for m in matches} == orthanc.studies["PAT-A"]
    assert {m.PatientID for m in matches} == {"PAT-A"}


@pytest.mark.parametrize("pid", ["PAT-B", "PAT*", "PAT-?", "*A", "PAT-A\\PAT-B", "pat-a"])
def test_foreign_patterns_and_multiple_values_are_refused(session, pid):
    assoc = session("PAT-A")
    final, matches = find(assoc, query("STUDY", patient_id=pid), STUDY_ROOT)
    assert final == NOT_AUTHORIZED
    assert matches == []
    # the association stays usable after a refusal
    final, matches = find(assoc, query("STUDY"), STUDY_ROOT)
    assert final == 0x0000 and matches


def test_ids_differing_by_case_are_two_patients(session, orthanc):
    for patient in ("CASE01", "case01"):
        assoc = session(patient)
        final, matches = find(assoc, query("STUDY"), STUDY_ROOT)
        assert final == 0x0000
        assert {m.PatientID for m in matches} == {patient}
        assert {m.StudyInstanceUID for m in matches} == orthanc.studies[patient]
        assert len(matches) == orthanc.counts(patient)["studies"]
        other = "case01" if patient == "CASE01" else "CASE01"
        final, _ = find(assoc, query("STUDY", patient_id=other), STUDY_ROOT)
        assert final == NOT_AUTHORIZED


def test_padding_spaces_are_one_patient(session, orthanc):
    expected = orthanc.studies["SPACE01"] | orthanc.studies["SPACE01  "]
    assert len(expected) == 2 == orthanc.counts("SPACE01")["studies"]
    assoc = session("SPACE01")
    for pid in (None, "SPACE01", "SPACE01 ", " SPACE01"):
        ds = query("STUDY", patient_id=pid) if pid is not None else query("STUDY")
        final, matches = find(assoc, ds, STUDY_ROOT)
        assert final == 0x0000, pid
        assert {m.StudyInstanceUID for m in matches} == expected, pid
        assert {m.PatientID.strip() for m in matches} == {"SPACE01"}


def test_expiry_during_association_refuses_later_operations(gateway, issuer):
    assoc, _ = associate(gateway, issuer.mint(patient="PAT-A", expires_in=3))
    assert assoc.is_established
    final, matches = find(assoc, query("STUDY"), STUDY_ROOT)
    assert final == 0x0000 and matches
    time.sleep(4)
    final, matches = find(assoc, query("STUDY"), STUDY_ROOT)
    assert final == NOT_AUTHORIZED and matches == []
    assert assoc.send_c_echo().Status == NOT_AUTHORIZED
    assoc.release()


def test_an_association_ends_soon_after_its_token_expires(gateway, issuer):
    """A request just after expiry is answered 0124H (the client learns to renew); the
    association itself ends 10 s after the expiry, whatever the client sends, long before the
    idle timeout: it holds a slot and a PACS association otherwise."""
    assoc, _ = associate(gateway, issuer.mint(patient="PAT-A", expires_in=2))
    assert assoc.is_established
    final, matches = find(assoc, query("STUDY"), STUDY_ROOT)
    assert final == 0x0000 and matches
    time.sleep(3)
    assert assoc.send_c_echo().Status == NOT_AUTHORIZED
    deadline = time.time() + 20
    while assoc.is_established and time.time() < deadline:
        # Refused requests do not keep it open.
        assoc.send_c_echo()
        time.sleep(1)
    assert assoc.is_aborted, "the association outlived its token"
    again, _ = associate(gateway, issuer.mint(patient="PAT-A"))
    assert again.is_established
    final, matches = find(again, query("STUDY"), STUDY_ROOT)
    assert final == 0x0000 and matches
    again.release()


def test_cancel_during_find_ends_cleanly(session):
    assoc = session("PAT-A")
    responses = assoc.send_c_find(query("IMAGE"), PATIENT_ROOT, msg_id=7)
    status, _ = next(responses)
    assert status.Status in (0xFF00, 0xFF01)
    cx = assoc._get_valid_context(PATIENT_ROOT, "", "scu")
    assoc.send_c_cancel(7, cx.context_id)
    rest = list(responses)
    # Orthanc may have sent every match before the cancel arrived: either way the operation
    # ends with a final status and the association stays usable.
    assert rest and rest[-1][0].Status in (0x0000, 0xFE00)
    final, matches = find(assoc, query("STUDY"), STUDY_ROOT)
    assert final == 0x0000 and matches


def test_write_only_token_cannot_query(gateway, issuer):
    assoc, _ = associate(gateway, issuer.mint(patient="PAT-A", scope="patient/ImagingStudy.c"))
    assert assoc.is_established
    final, matches = find(assoc, query("STUDY"), STUDY_ROOT)
    assert final == NOT_AUTHORIZED and matches == []
    assoc.release()
