"""Faults around the relay: the PACS stopped in the middle of a C-STORE and of a C-MOVE, a token
that expires during an association, cancellation, and many broken-off operations that must
leave no socket or task behind. These tests get an Orthanc and a gateway of their own, since
they stop the PACS."""

import io
import os
import signal
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import (
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelFind as STUDY_FIND,
    StudyRootQueryRetrieveInformationModelGet as STUDY_GET,
    StudyRootQueryRetrieveInformationModelMove as STUDY_MOVE,
    Verification,
)

from conftest import Gateway, Orthanc, free_port, stop
from dicomdata import make_instance
from test_dimse_association import identity

NOT_AUTHORIZED = 0x0124


def big_instance(pid, study, series, megabytes):
    """A Secondary Capture instance with `megabytes` of pixel data."""
    side = int((megabytes * 1024 * 1024 / 2) ** 0.5)
    ds = pydicom.dcmread(io.BytesIO(make_instance(pid, study, series, 8000, 1, 1, "20250101")))
    ds.Rows = ds.Columns = side
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelData = os.urandom(side * side * 2)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


@pytest.fixture(scope="module")
def env(tmp_root, issuer):
    d = tmp_root / "faults"
    d.mkdir()
    receive, dest = free_port(), free_port()
    o = Orthanc(d, modalities={"PACSGATE": ["PACSGATE", "127.0.0.1", receive]})
    # one study of PAT-F, 6 instances of 4 MB: enough to be mid-transfer when the PACS stops
    study, series = generate_uid(), generate_uid()
    for _ in range(6):
        buf = io.BytesIO()
        big_instance("PAT-F", study, series, 4).save_as(buf, enforce_file_format=True)
        o.upload(buf.getvalue())
    g = Gateway(d, o, issuer, name="faults-gateway", receive_port=receive, destinations=[("DEST", dest)])
    env = {"orthanc": o, "gateway": g, "study": study, "dest_port": dest, "dir": d}
    yield env
    stop(g.proc)
    stop(o.proc)


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def associate(gateway, token, contexts, ext=(), handlers=(), may_fail=False):
    ae = AE(ae_title="VIEWER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for c in contexts:
        ae.add_requested_context(c)
    # see test_dimse_association.associate: pynetdicom may lose the answer; try again then
    for _ in range(3):
        assoc = ae.associate("127.0.0.1", gateway.dimse_port, ae_title=gateway.ae_title,
                             ext_neg=[identity(token), *ext], evt_handlers=list(handlers))
        if assoc.is_established or assoc.is_rejected:
            break
    assert may_fail or assoc.is_established
    return assoc


def test_token_expiring_during_an_association_stops_stores_and_retrievals(env, issuer):
    g = env["gateway"]
    received = []
    handlers = [(evt.EVT_C_STORE, lambda e: (received.append(1), 0x0000)[1])]
    assoc = associate(g, issuer.mint(patient="PAT-F", scope="patient/ImagingStudy.cruds", expires_in=3),
                      [STUDY_GET, SecondaryCaptureImageStorage],
                      ext=[build_role(SecondaryCaptureImageStorage, scp_role=True)], handlers=handlers)
    time.sleep(4)
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = env["study"]
    statuses = [s.Status for s, _ in assoc.send_c_get(q, STUDY_GET)]
    assert statuses[-1] == NOT_AUTHORIZED and received == []
    assoc.release()
    writer = associate(g, issuer.mint(patient="PAT-F", scope="patient/ImagingStudy.cruds", expires_in=2),
                       [SecondaryCaptureImageStorage])
    time.sleep(3)
    ds = big_instance("PAT-F", env["study"], generate_uid(), 1)
    assert writer.send_c_store(ds).Status == NOT_AUTHORIZED
    writer.release()
    assert not env["orthanc"].holds(ds.SOPInstanceUID)


def test_cancel_during_c_get_ends_the_operation(env, issuer):
    g = env["gateway"]
    received = []
    state = {}

    def on_store(event):
        received.append(1)
        if len(received) == 1:
            # cancel from the handler's thread while sub-operations are still coming
            event.assoc.send_c_cancel(11, state["cx"])
        return 0x0000

    assoc = associate(g, issuer.mint(patient="PAT-F"), [STUDY_GET, SecondaryCaptureImageStorage],
                      ext=[build_role(SecondaryCaptureImageStorage, scp_role=True)],
                      handlers=[(evt.EVT_C_STORE, on_store)])
    state["cx"] = assoc._get_valid_context(STUDY_GET, "", "scu").context_id
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = env["study"]
    statuses = [s.Status for s, _ in assoc.send_c_get(q, STUDY_GET, msg_id=11)]
    # the PACS may or may not honour the cancel before it is done; either way the operation
    # ends with a final status and the association goes on
    assert statuses[-1] in (0x0000, 0xFE00, 0xB000)
    if statuses[-1] == 0xFE00:
        assert len(received) < 6
    q2 = Dataset()
    q2.QueryRetrieveLevel = "STUDY"
    q2.StudyInstanceUID = env["study"]
    statuses = [s.Status for s, _ in assoc.send_c_get(q2, STUDY_GET)]
    assert statuses[-1] == 0x0000, "the association goes on after a cancel"
    assoc.release()


def test_broken_off_operations_leave_no_sockets_behind(env, issuer):
    g = env["gateway"]
    pid = g.proc.pid
    # warm up (key cache, first connections), then take the baseline
    a = associate(g, issuer.mint(patient="PAT-F"), [STUDY_FIND])
    a.release()
    time.sleep(0.5)
    baseline = open_fds(pid)
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = env["study"]
    for i in range(40):
        received = []
        assoc = associate(g, issuer.mint(patient="PAT-F"), [STUDY_GET, SecondaryCaptureImageStorage],
                          ext=[build_role(SecondaryCaptureImageStorage, scp_role=True)],
                          handlers=[(evt.EVT_C_STORE, lambda e: (received.append(1), 0x0000)[1])])
        if i % 2:
            # abort in the middle of a C-GET
            responses = assoc.send_c_get(q, STUDY_GET)
            next(responses)
        assoc.abort()
    deadline = time.time() + 15
    while time.time() < deadline and open_fds(pid) > baseline:
        time.sleep(0.2)
    assert open_fds(pid) <= baseline, f"{open_fds(pid)} descriptors open, {baseline} before"
    # and the gateway still serves
    a = associate(g, issuer.mint(patient="PAT-F"), [Verification])
    assert a.send_c_echo().Status == 0x0000
    a.release()


def test_pacs_stopped_during_a_wado_response(env, issuer):
    """The client must see a broken response, never a complete-looking one."""
    import requests

    g, o = env["gateway"], env["orthanc"]
    url = f"{g.public_url}/dicom-web/studies/{env['study']}"
    headers = {"Authorization": f"Bearer {issuer.mint(patient='PAT-F')}", "Accept": 'multipart/related; type="application/dicom"'}
    full = len(requests.get(url, headers=headers, timeout=60).content)
    assert full > 20_000_000
    r = requests.get(url, headers=headers, stream=True, timeout=60)
    assert r.status_code == 200
    got = 0
    broken = False
    try:
        it = r.iter_content(chunk_size=65536)
        for chunk in it:
            got += len(chunk)
            if got >= 1_000_000 and o.proc.poll() is None:
                o.proc.send_signal(signal.SIGKILL)
                o.proc.wait()
                time.sleep(0.5)
    except Exception:
        broken = True
    assert broken or got < full, "a truncated study must not look complete"
    o.start()  # the next test needs the PACS


def test_pacs_stopped_during_c_move_and_c_store(env, issuer):
    """Runs last in this module: it stops this module's Orthanc."""
    g, o = env["gateway"], env["orthanc"]
    got = []
    ae = AE(ae_title="DEST")
    ae.supported_contexts = AllStoragePresentationContexts

    def slow_store(event):
        got.append(1)
        time.sleep(0.3)  # keep the move running long enough to stop the PACS in its middle
        return 0x0000

    server = ae.start_server(("127.0.0.1", env["dest_port"]), block=False, evt_handlers=[(evt.EVT_C_STORE, slow_store)])
    try:
        move_result = {}

        def run_move():
            assoc = associate(g, issuer.mint(patient="PAT-F"), [STUDY_MOVE])
            q = Dataset()
            q.QueryRetrieveLevel = "STUDY"
            q.StudyInstanceUID = env["study"]
            move_result["statuses"] = [s.get("Status") for s, _ in assoc.send_c_move(q, "DEST", STUDY_MOVE)]
            move_result["aborted"] = assoc.is_aborted
            if assoc.is_established:
                assoc.release()

        store_result = {}
        big = big_instance("PAT-F", generate_uid(), generate_uid(), 150)
        # associated before the PACS stops, so the C-STORE is cut off in its middle
        store_assoc = associate(g, issuer.mint(patient="PAT-F", scope="patient/ImagingStudy.c"), [SecondaryCaptureImageStorage])

        def run_store():
            try:
                status = store_assoc.send_c_store(big)
                store_result["status"] = status.get("Status") if status is not None else None
            except Exception as e:  # a broken association may surface as an exception
                store_result["error"] = repr(e)
            store_result["aborted"] = store_assoc.is_aborted
            if store_assoc.is_established:
                store_assoc.release()

        t = threading.Thread(target=run_move)
        started = time.time()
        t.start()
        while not got and time.time() - started < 20:
            time.sleep(0.05)
        assert got, "the move never started"
        t2 = threading.Thread(target=run_store)
        t2.start()
        time.sleep(1.0)  # the 150 MB instance is on its way through the gateway
        o.proc.send_signal(signal.SIGKILL)
        t.join(timeout=60)
        t2.join(timeout=60)
        assert not t.is_alive() and not t2.is_alive(), "a client hung after the PACS stopped"
        statuses = [s for s in move_result["statuses"] if s is not None]
        assert move_result["aborted"] or (statuses and statuses[-1] not in (0x0000, 0xFF00, 0xFF01)), move_result
        assert store_result, "the C-STORE thread did not finish"
        if store_result.get("status") == 0x0000:
            # The PACS answered before it stopped: then it must really hold the instance.
            o.start()
            assert o.holds(big.SOPInstanceUID), "success was reported for an instance the PACS does not hold"
            o.proc.send_signal(signal.SIGKILL)
            o.proc.wait()
        assert len(got) < 6
    finally:
        server.shutdown()

    # C-STORE with the PACS gone: a failure status or a rejection, never a success
    assoc = associate(g, issuer.mint(patient="PAT-F", scope="patient/ImagingStudy.c"), [SecondaryCaptureImageStorage], may_fail=True)
    if assoc.is_established:
        status = assoc.send_c_store(big_instance("PAT-F", generate_uid(), generate_uid(), 1))
        assert "Status" not in status or status.Status != 0x0000
        assoc.release()
    else:
        assert assoc.is_rejected


def test_sigterm_finishes_the_running_operation_then_ends_every_association(tmp_root, issuer):
    """On SIGTERM the gateway stops accepting, lets a running C-GET finish, then ends each
    association (A-ABORT to the client, A-RELEASE to the PACS) and exits well within the drain
    time; an idle association does not hold the stop up."""
    d = tmp_root / "stopping"
    d.mkdir()
    o = Orthanc(d)
    study, series = generate_uid(), generate_uid()
    for _ in range(6):
        buf = io.BytesIO()
        big_instance("PAT-F", study, series, 4).save_as(buf, enforce_file_format=True)
        o.upload(buf.getvalue())
    env = {"study": study}
    g = Gateway(d, o, issuer, name="stopping-gateway")
    try:
        token = issuer.mint(patient="PAT-F", scope="patient/ImagingStudy.rs")
        idle = associate(g, token, [Verification])
        received = []

        def on_store(e):
            received.append(1)
            if len(received) == 1:
                g.proc.send_signal(signal.SIGTERM)
            return 0x0000

        busy = associate(g, token, [STUDY_GET, SecondaryCaptureImageStorage],
                         ext=[build_role(SecondaryCaptureImageStorage, scp_role=True)],
                         handlers=[(evt.EVT_C_STORE, on_store)])
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = env["study"]
        t0 = time.monotonic()
        statuses = [s.Status for s, _ in busy.send_c_get(q, STUDY_GET) if s]
        assert statuses[-1] == 0x0000 and len(received) == 6, "the running C-GET finished"
        assert g.proc.wait(timeout=15) == 0
        assert time.monotonic() - t0 < 12, "the stop waited for nothing but the running operation"
        deadline = time.monotonic() + 5
        while (idle.is_established or busy.is_established) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert idle.is_aborted and busy.is_aborted
        log = g.log_text()
        assert log.count("the gateway is stopping; the association ends between operations") == 2
        assert "drain time over" not in log
    finally:
        stop(g.proc)
        stop(o.proc)
