"""C-MOVE through the gateway against Orthanc: the PACS moves to the gateway's receiver, which
checks each instance and forwards it to the configured destination (a pynetdicom storage SCP
here). Exact counts for own data; nothing moves for foreign or unknown UIDs; unknown
destinations get A801H."""

import subprocess
import threading

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelMove as PATIENT_MOVE,
    StudyRootQueryRetrieveInformationModelMove as STUDY_MOVE,
)

from test_dimse_association import identity

NOT_AUTHORIZED = 0x0124


class Destination:
    """A storage SCP that records what it receives."""

    def __init__(self, port):
        self.received = []
        self.requests = []
        self.lock = threading.Lock()
        ae = AE(ae_title="DEST")
        ae.supported_contexts = AllStoragePresentationContexts
        ae.maximum_associations = 4

        def on_store(event):
            with self.lock:
                self.received.append(event.dataset)
                self.requests.append(event.request)
            return 0x0000

        self.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])

    def stop(self):
        self.server.shutdown()


@pytest.fixture
def destination(ports):
    d = Destination(ports["dest"])
    yield d
    d.stop()


def move(gateway, token, ds, dest="DEST", model=STUDY_MOVE, msg_id=1):
    ae = AE(ae_title="VIEWER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(STUDY_MOVE)
    ae.add_requested_context(PATIENT_MOVE)
    assoc = ae.associate("127.0.0.1", gateway.dimse_port, ae_title=gateway.ae_title, ext_neg=[identity(token)])
    assert assoc.is_established
    final = None
    for status, _ in assoc.send_c_move(ds, dest, model, msg_id=msg_id):
        assert status is not None and "Status" in status, "C-MOVE got no response"
        if status.Status not in (0xFF00, 0xFF01):
            final = status
    assoc.release()
    return final


def query(level, study=None, series=None, sop=None, pid=None):
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k, v in (("PatientID", pid), ("StudyInstanceUID", study), ("SeriesInstanceUID", series), ("SOPInstanceUID", sop)):
        if v is not None:
            setattr(ds, k, v)
    return ds


def own(orthanc, pid):
    return [x for x in orthanc.instances if x[0] == pid]


def test_move_study_series_and_instance_to_a_configured_destination(gateway, issuer, orthanc, destination):
    mine = own(orthanc, "PAT-A")
    study, series, sop = mine[0][1], mine[0][2], mine[0][3]
    for ds, expected in (
        (query("STUDY", study=study), {x[3] for x in mine if x[1] == study}),
        (query("SERIES", study=study, series=series), {x[3] for x in mine if x[2] == series}),
        (query("IMAGE", study=study, series=series, sop=sop), {sop}),
    ):
        destination.received.clear()
        destination.requests.clear()
        final = move(gateway, issuer.mint(patient="PAT-A"), ds, msg_id=42)
        assert final.Status == 0x0000
        assert final.NumberOfCompletedSuboperations == len(expected)
        assert final.get("NumberOfFailedSuboperations", 0) == 0
        assert {r.SOPInstanceUID for r in destination.received} == expected
        assert {r.PatientID for r in destination.received} == {"PAT-A"}
        # the destination sees the client as the move originator, not the gateway
        assert {r.MoveOriginatorApplicationEntityTitle.strip() for r in destination.requests} == {"VIEWER"}
        assert {r.MoveOriginatorMessageID for r in destination.requests} == {42}


def test_move_patient_level(gateway, issuer, orthanc, destination):
    final = move(gateway, issuer.mint(patient="PAT-B"), query("PATIENT", pid="PAT-B"), model=PATIENT_MOVE)
    assert final.Status == 0x0000
    assert {r.SOPInstanceUID for r in destination.received} == {x[3] for x in own(orthanc, "PAT-B")}


def test_unknown_destination_is_refused(gateway, issuer, orthanc, destination):
    study = own(orthanc, "PAT-A")[0][1]
    final = move(gateway, issuer.mint(patient="PAT-A"), query("STUDY", study=study), dest="ELSEWHERE")
    assert final.Status == 0xA801
    assert destination.received == []


@pytest.mark.parametrize("case", ["foreign_study_own_pid", "mixed_list", "foreign_series", "foreign_instance", "unknown", "patient_foreign"])
def test_nothing_moves_for_foreign_or_unknown_uids(gateway, issuer, orthanc, destination, case):
    mine, theirs = own(orthanc, "PAT-A"), own(orthanc, "PAT-B")
    model = STUDY_MOVE
    ds = {
        "foreign_study_own_pid": lambda: query("STUDY", study=theirs[0][1], pid="PAT-A"),
        "mixed_list": lambda: query("STUDY", study=f"{mine[0][1]}\\{theirs[0][1]}"),
        "foreign_series": lambda: query("SERIES", study=mine[0][1], series=theirs[0][2]),
        "foreign_instance": lambda: query("IMAGE", study=mine[0][1], series=mine[0][2], sop=theirs[0][3]),
        "unknown": lambda: query("STUDY", study=generate_uid()),
        "patient_foreign": lambda: query("PATIENT", pid="PAT-B"),
    }[case]()
    if case == "patient_foreign":
        model = PATIENT_MOVE
    final = move(gateway, issuer.mint(patient="PAT-A"), ds, model=model)
    assert final.Status == NOT_AUTHORIZED
    assert destination.received == [], "not a single instance may move"


def test_unreachable_destination_counts_failures(gateway, issuer, orthanc):
    # no destination fixture: nothing listens on DEST's port
    mine = own(orthanc, "PAT-A")
    study = mine[0][1]
    n = len([x for x in mine if x[1] == study])
    final = move(gateway, issuer.mint(patient="PAT-A"), query("STUDY", study=study))
    assert final.Status != 0x0000, "a failure at the destination leg is never a success"
    assert final.get("NumberOfCompletedSuboperations", 0) == 0
    # Orthanc stops at the first failed sub-operation; the gateway reports what it saw fail
    assert 1 <= final.get("NumberOfFailedSuboperations", 0) <= n


def test_dcmtk_movescu_without_identity_is_rejected(gateway, orthanc):
    r = subprocess.run(
        ["/usr/bin/movescu", "-v", "-S", "-aet", "VIEWER", "-aec", gateway.ae_title, "-aem", "DEST",
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={own(orthanc, 'PAT-A')[0][1]}",
         "127.0.0.1", str(gateway.dimse_port)],
        capture_output=True, text=True, timeout=60,
    )
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "Association Rejected" in out, out


def test_receiver_accepts_only_the_pacs(gateway, ports):
    ae = AE(ae_title="INTRUDER")
    ae.acse_timeout = 10
    ae.requested_contexts = AllStoragePresentationContexts[:5]
    for _ in range(3):  # pynetdicom may lose the answer (see test_dimse_association.associate)
        assoc = ae.associate("127.0.0.1", ports["receive"], ae_title="PACSGATE")
        if assoc.is_rejected or assoc.is_established:
            break
    assert assoc.is_rejected
