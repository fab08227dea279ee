"""C-STORE and C-GET through the gateway against Orthanc, with pynetdicom and dcmtk: own data
moves with exact counts; no case delivers or stores a single instance of another patient; every
refusal is a standard status."""

import subprocess

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelGet as PATIENT_GET,
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelGet as STUDY_GET,
    Verification,
)

import io

import pydicom

from dicomdata import make_instance
from test_dimse_association import identity

NOT_AUTHORIZED = 0x0124


def connect(gateway, token, received=None, store_contexts=True):
    ae = AE(ae_title="VIEWER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(Verification)
    ae.add_requested_context(STUDY_GET)
    ae.add_requested_context(PATIENT_GET)
    ext = [identity(token)]
    handlers = []
    if store_contexts:
        ae.add_requested_context(SecondaryCaptureImageStorage)
        ext.append(build_role(SecondaryCaptureImageStorage, scp_role=True))
    if received is not None:
        def on_store(event):
            received.append(event.dataset)
            return 0x0000

        handlers.append((evt.EVT_C_STORE, on_store))
    assoc = ae.associate("127.0.0.1", gateway.dimse_port, ae_title=gateway.ae_title, ext_neg=ext, evt_handlers=handlers)
    assert assoc.is_established
    return assoc


def store(assoc, data: bytes) -> int:
    ds = pydicom.dcmread(io.BytesIO(data))
    status = assoc.send_c_store(ds)
    assert status is not None and "Status" in status, "C-STORE got no response"
    return status.Status


def writer(gateway, issuer, patient, scope="patient/ImagingStudy.cruds"):
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(SecondaryCaptureImageStorage)
    assoc = ae.associate("127.0.0.1", gateway.dimse_port, ae_title=gateway.ae_title, ext_neg=[identity(issuer.mint(patient=patient, scope=scope))])
    assert assoc.is_established
    return assoc


def new_instance(pid, study=None, series=None):
    study = study or generate_uid()
    data = make_instance(pid, study, series or generate_uid(), 7000, 1, 1, "20250101")
    sop = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID
    return data, sop


# ---- C-STORE ----

def test_store_own_instance_into_a_new_study(gateway, issuer, orthanc):
    assoc = writer(gateway, issuer, "PAT-W")
    data, sop = new_instance("PAT-W")
    assert store(assoc, data) == 0x0000
    assoc.release()
    assert orthanc.holds(sop), "success means the PACS stored it"


def test_store_into_own_existing_study(gateway, issuer, orthanc):
    study = generate_uid()
    assoc = writer(gateway, issuer, "PAT-W")
    first, sop1 = new_instance("PAT-W", study)
    second, sop2 = new_instance("PAT-W", study)
    assert store(assoc, first) == 0x0000
    assert store(assoc, second) == 0x0000
    assoc.release()
    assert orthanc.holds(sop1) and orthanc.holds(sop2)


def test_store_of_another_patients_instance_is_refused(gateway, issuer, orthanc):
    assoc = writer(gateway, issuer, "PAT-W")
    for pid in ("PAT-B", "pat-w", "PAT-W\\PAT-B", ""):
        data, sop = new_instance(pid)
        assert store(assoc, data) == NOT_AUTHORIZED, pid
        assert not orthanc.holds(sop), f"refused instance for {pid!r} must not be stored"
    # the association goes on after refusals
    data, sop = new_instance("PAT-W")
    assert store(assoc, data) == 0x0000
    assoc.release()


def test_store_into_another_patients_study_is_refused(gateway, issuer, orthanc):
    foreign_study = next(iter(orthanc.studies["PAT-B"]))
    foreign_series = next(se for p, st, se, _ in orthanc.instances if st == foreign_study)
    assoc = writer(gateway, issuer, "PAT-W")
    for study, series in ((foreign_study, None), (None, foreign_series)):
        data, sop = new_instance("PAT-W", study, series)
        assert store(assoc, data) == NOT_AUTHORIZED
        assert not orthanc.holds(sop)
    assoc.release()
    assert orthanc.patient_of_study(foreign_study) == "PAT-B"


def test_store_without_write_scope_is_refused(gateway, issuer, orthanc):
    assoc = writer(gateway, issuer, "PAT-W", scope="patient/ImagingStudy.rs")
    data, sop = new_instance("PAT-W")
    assert store(assoc, data) == NOT_AUTHORIZED
    assoc.release()
    assert not orthanc.holds(sop)


def test_dcmtk_storescu_stores_with_a_jwt(gateway, issuer, orthanc, tmp_root):
    data, sop = new_instance("PAT-W")
    f = tmp_root / "dcmtk-store.dcm"
    f.write_bytes(data)
    tok = tmp_root / "write.jwt"
    tok.write_text(issuer.mint(patient="PAT-W", scope="patient/ImagingStudy.cud"))
    r = subprocess.run(
        ["/usr/bin/storescu", "-v", "-aet", "MODALITY", "-aec", gateway.ae_title, "--jwt", str(tok),
         "127.0.0.1", str(gateway.dimse_port), str(f)],
        capture_output=True, text=True, timeout=60,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "Received Store Response (Success)" in out, out
    assert orthanc.holds(sop)

    data, sop = new_instance("PAT-B")
    f.write_bytes(data)
    r = subprocess.run(
        ["/usr/bin/storescu", "-v", "-aet", "MODALITY", "-aec", gateway.ae_title, "--jwt", str(tok),
         "127.0.0.1", str(gateway.dimse_port), str(f)],
        capture_output=True, text=True, timeout=60,
    )
    out = r.stdout + r.stderr
    assert "Received Store Response (Unknown Status: 0x124)" in out, out
    assert not orthanc.holds(sop)


# ---- C-GET ----

def get(assoc, ds, model=STUDY_GET):
    final, completed = None, None
    for status, _ in assoc.send_c_get(ds, model):
        assert status is not None and "Status" in status, "C-GET got no response"
        if status.Status not in (0xFF00, 0xFF01):
            final = status.Status
            completed = status.get("NumberOfCompletedSuboperations")
    return final, completed


def get_query(level, study=None, series=None, sop=None, pid=None):
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    if pid is not None:
        ds.PatientID = pid
    if study is not None:
        ds.StudyInstanceUID = study
    if series is not None:
        ds.SeriesInstanceUID = series
    if sop is not None:
        ds.SOPInstanceUID = sop
    return ds


def own(orthanc, pid):
    return [x for x in orthanc.instances if x[0] == pid]


def test_get_whole_study_series_and_instance(gateway, issuer, orthanc):
    mine = own(orthanc, "PAT-A")
    study = mine[0][1]
    series = mine[0][2]
    sop = mine[0][3]
    for ds, expected in (
        (get_query("STUDY", study=study), {x[3] for x in mine if x[1] == study}),
        (get_query("SERIES", study=study, series=series), {x[3] for x in mine if x[2] == series}),
        (get_query("IMAGE", study=study, series=series, sop=sop), {sop}),
    ):
        received = []
        assoc = connect(gateway, issuer.mint(patient="PAT-A"), received)
        final, completed = get(assoc, ds)
        assoc.release()
        assert final == 0x0000
        assert {r.SOPInstanceUID for r in received} == expected
        assert len(received) == len(expected) == completed
        assert {r.PatientID for r in received} == {"PAT-A"}


def test_get_patient_level_own_patient(gateway, issuer, orthanc):
    received = []
    assoc = connect(gateway, issuer.mint(patient="PAT-B"), received)
    final, completed = get(assoc, get_query("PATIENT", pid="PAT-B"), PATIENT_GET)
    assoc.release()
    assert final == 0x0000
    assert {r.SOPInstanceUID for r in received} == {x[3] for x in own(orthanc, "PAT-B")}
    assert completed == orthanc.counts("PAT-B")["instances"]


@pytest.mark.parametrize(
    "case",
    ["foreign_study_own_pid", "mixed_list", "foreign_series_under_own_study", "patient_level_foreign", "image_foreign",
     "unknown_study", "no_unique_key"],
)
def test_get_touching_foreign_or_unknown_uids_is_refused(gateway, issuer, orthanc, case):
    mine, theirs = own(orthanc, "PAT-A"), own(orthanc, "PAT-B")
    model = STUDY_GET
    if case == "foreign_study_own_pid":
        ds = get_query("STUDY", study=theirs[0][1], pid="PAT-A")
    elif case == "mixed_list":
        ds = get_query("STUDY", study=f"{mine[0][1]}\\{theirs[0][1]}")
    elif case == "foreign_series_under_own_study":
        ds = get_query("SERIES", study=mine[0][1], series=theirs[0][2])
    elif case == "patient_level_foreign":
        ds, model = get_query("PATIENT", pid="PAT-B"), PATIENT_GET
    elif case == "image_foreign":
        ds = get_query("IMAGE", study=mine[0][1], series=mine[0][2], sop=theirs[0][3])
    elif case == "unknown_study":
        ds = get_query("STUDY", study=generate_uid())
    else:
        ds = get_query("SERIES", study=mine[0][1])
    received = []
    assoc = connect(gateway, issuer.mint(patient="PAT-A"), received)
    final, _ = get(assoc, ds, model)
    assert final == NOT_AUTHORIZED
    assert received == [], "not a single instance may move"
    # the association stays usable
    final, _ = get(assoc, get_query("STUDY", study=mine[0][1]))
    assert final == 0x0000
    assoc.release()


def test_dcmtk_getscu_without_identity_is_rejected(gateway, orthanc, tmp_root):
    r = subprocess.run(
        ["/usr/bin/getscu", "-v", "-S", "-aet", "VIEWER", "-aec", gateway.ae_title, "-od", str(tmp_root),
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={own(orthanc, 'PAT-A')[0][1]}",
         "127.0.0.1", str(gateway.dimse_port)],
        capture_output=True, text=True, timeout=60,
    )
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "Association Rejected" in out, out
