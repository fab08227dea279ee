"""Attack suite, retrievals: sub-operations the gateway withholds must not break off the rest
of a C-GET or C-MOVE (provoked with one PatientID held under two IssuerOfPatientID values,
patients.use_issuer), and the C-MOVE receiver must not take an instance from a process that
merely claims the PACS's AE title from the PACS's address and guesses the Move Originator
Message ID of a running (or no) move.

Both use gateways of their own, each with its own AE title toward Orthanc, registered in
Orthanc as a modality (REST) for the time of the module."""

import io
import threading
import time

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

import rawdicom as rd
from conftest import Gateway, free_port, stop
from dicomdata import make_instance
from test_attack_dimse_commands import (
    CONTEXTS, ECHO, FIND, GET, MOVE, PGET, PMOVE, STORE, WRITE, PacsState, StorageSCP, assert_gateway_serves,
    connect, fresh_instance, own,
)

PID = "PAT-J"  # one PatientID under HOSP_A (the caller), HOSP_B and no issuer: three patients


def register(orthanc, name, aet, port):
    r = requests.put(f"{orthanc.url}/modalities/{name}", json={"AET": aet, "Host": "127.0.0.1", "Port": port}, timeout=10)
    r.raise_for_status()


@pytest.fixture(scope="module")
def issued(orthanc):
    """PAT-J's instances by issuer: HOSP_A two, HOSP_B one, none one (SOP UIDs)."""
    out = {}
    for n, iss in enumerate(["HOSP_A", "HOSP_B", None]):
        study, series = generate_uid(), generate_uid()
        sops = set()
        for i in range(2 if iss == "HOSP_A" else 1):
            data = make_instance(PID, study, series, 9500 + n, 1, i + 1, "20240101", issuer=iss)
            orthanc.upload(data)
            sops.add(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)
        out[iss] = (study, sops)
    return out


@pytest.fixture(scope="module")
def issuer_env(tmp_root, orthanc, issuer, issued):
    d = tmp_root / "attack-retrieve-issuer"
    d.mkdir()
    table = d / "patients.csv"
    table.write_text(f"patient,patient_id,issuer\nEHR-J,{PID},HOSP_A\n")
    receive, dest_port = free_port(), free_port()
    register(orthanc, "attack-issuer", "PGATEISS", receive)
    dest = StorageSCP(dest_port, "DESTJ")
    g = Gateway(d, orthanc, issuer, name="attack-retrieve-issuer", receive_port=receive, destinations=[("DESTJ", dest_port)],
                calling_ae="PGATEISS", patients=f'[patients]\nmap = "table"\ntable_file = "{table}"\nuse_issuer = true')
    yield g, dest
    stop(g.proc)
    dest.stop()
    requests.delete(f"{orthanc.url}/modalities/attack-issuer", timeout=10)


def serves(g, issuer):
    """The use_issuer gateway (which maps only EHR-J) still serves a valid client."""
    assert g.proc.poll() is None, "the gateway process died"
    a = connect(g, issuer.mint(patient="EHR-J"), CONTEXTS[:2], calling="CHECKER")
    assert a.echo(ECHO) == rd.SUCCESS
    a.release()
    assert requests.get(f"{g.public_url}/healthz", timeout=10).status_code == 200


def patient_identifier():
    return rd.encode(rd.identifier("PATIENT", PatientID=PID))


def test_patient_level_c_get_goes_on_after_withheld_instances(issuer_env, issuer, issued):
    g, _ = issuer_env
    a = connect(g, issuer.mint(patient="EHR-J"))
    ex = a.dimse(PGET, rd.command_set(rd.c_get_rq(1, rd.PATIENT_GET)), patient_identifier(), timeout=30)
    got = {a.decode(m).SOPInstanceUID for m in ex.stores}
    assert got == issued["HOSP_A"][1], "exactly the caller's own instances are delivered"
    final = ex.final.command
    assert ex.status == rd.SUBOPS_WARNING, f"{ex.status:#06x}"
    assert final.get(rd.COMPLETED) == 2 and final.get(rd.FAILED) == 2, final
    assert a.echo(ECHO, message_id=2) == rd.SUCCESS, "the association survives withheld sub-operations"
    a.release()
    serves(g, issuer)


def test_patient_level_c_move_goes_on_after_withheld_instances(issuer_env, issuer, issued):
    g, dest = issuer_env
    dest.received.clear()
    a = connect(g, issuer.mint(patient="EHR-J"))
    ex = a.dimse(PMOVE, rd.command_set(rd.c_move_rq(1, rd.PATIENT_MOVE, "DESTJ")), patient_identifier(), timeout=30)
    final = ex.final.command
    assert {d.SOPInstanceUID for d in dest.received} == issued["HOSP_A"][1], "every own instance arrives"
    assert {d.IssuerOfPatientID for d in dest.received} == {"HOSP_A"}
    assert ex.status == rd.SUBOPS_WARNING, f"{ex.status:#06x}"
    assert final.get(rd.COMPLETED) == 2 and final.get(rd.FAILED) == 2, final
    assert a.echo(ECHO, message_id=2) == rd.SUCCESS
    a.release()
    serves(g, issuer)


@pytest.mark.parametrize("other", ["HOSP_B", None])
def test_other_issuers_study_moves_nothing(issuer_env, issuer, issued, other):
    g, dest = issuer_env
    dest.received.clear()
    a = connect(g, issuer.mint(patient="EHR-J"))
    ident = rd.encode(rd.identifier("STUDY", StudyInstanceUID=issued[other][0]))
    ex = a.dimse(MOVE, rd.command_set(rd.c_move_rq(1, rd.STUDY_MOVE, "DESTJ")), ident, timeout=30)
    assert ex.status == rd.NOT_AUTHORIZED
    a.release()
    time.sleep(0.3)
    assert dest.received == []
    serves(g, issuer)


# ---- the C-MOVE receiver: injected instances ----

@pytest.fixture(scope="module")
def inject_env(tmp_root, orthanc, issuer):
    d = tmp_root / "attack-retrieve-inject"
    d.mkdir()
    receive, dest_port = free_port(), free_port()
    register(orthanc, "attack-inject", "PGATEINJ", receive)
    g = Gateway(d, orthanc, issuer, name="attack-retrieve-inject", receive_port=receive, destinations=[("DESTI", dest_port)],
                calling_ae="PGATEINJ")
    yield g, receive, dest_port
    stop(g.proc)
    requests.delete(f"{orthanc.url}/modalities/attack-inject", timeout=10)


def inject(receive_port, orthanc, study, series, ids, stop_event=None):
    """Sends, as "ORTHANC" from 127.0.0.1 (the PACS's address), one made-up PAT-A instance of
    `study` per guessed Move Originator Message ID; returns the injected SOP UIDs and what
    became of each attempt (status, or how the association ended)."""
    sops, outcomes = [], []
    a = None
    for mid in ids:
        if stop_event is not None and stop_event.is_set():
            break
        if a is None:
            a = rd.Association(receive_port, timeout=5)
            ac = a.request(rd.associate_rq("PGATEINJ", "ORTHANC", [(1, rd.SECONDARY_CAPTURE, [rd.IMPLICIT_LE])]))
            if not isinstance(ac, rd.AssociateAC) or ac.accepted(1) is None:
                outcomes.append(("rejected", ac))
                a.close()
                return sops, outcomes
        sop = generate_uid()
        sops.append(sop)
        els = rd.instance_elements("PAT-A", study, series, sop)
        cmd = rd.command_set(rd.c_store_rq(mid, rd.SECONDARY_CAPTURE, sop, originator_ae="PACSGATE", originator_id=mid))
        try:
            outcomes.append(a.dimse(1, cmd, rd.encode(els), timeout=5).status)
        except (rd.Aborted, rd.Closed, OSError) as e:
            outcomes.append(type(e).__name__)
            a.close()
            a = None
    if a is not None:
        try:
            a.release()
        except (AssertionError, rd.Aborted, rd.Closed, OSError):
            a.close()
    return sops, outcomes


@pytest.mark.parametrize("when", ["during_a_move", "outside_any_move"])
def test_receiver_takes_no_injected_instance(inject_env, orthanc, issuer, when):
    g, receive, dest_port = inject_env
    before = PacsState(orthanc)
    _, study, series, _ = own(orthanc, "PAT-A")[0]
    real = {x[3] for x in own(orthanc, "PAT-A") if x[1] == study}
    # A slow destination keeps the move running while the injector tries its guesses.
    dest = StorageSCP(dest_port, "DESTI", delay=0.5 if when == "during_a_move" else 0.0)
    try:
        result = {}
        if when == "during_a_move":
            def run_move():
                a = connect(g, issuer.mint(patient="PAT-A"), timeout=30)
                ident = rd.encode(rd.identifier("STUDY", StudyInstanceUID=study))
                result["move"] = a.dimse(MOVE, rd.command_set(rd.c_move_rq(1, rd.STUDY_MOVE, "DESTI")), ident, timeout=30)
                a.release()

            t = threading.Thread(target=run_move)
            t.start()
            deadline = time.time() + 10
            while not dest.received and time.time() < deadline:
                time.sleep(0.02)
            assert dest.received, "the move did not start: the test proves nothing"
            sops, outcomes = inject(receive, orthanc, study, series, range(1, 201))
            t.join(timeout=40)
            assert not t.is_alive(), "the move did not finish"
            assert result["move"].status == rd.SUCCESS, f"{result['move'].status:#06x}"
        else:
            sops, outcomes = inject(receive, orthanc, study, series, range(1, 201))
        time.sleep(0.5)
        delivered = {d.SOPInstanceUID for d in dest.received}
        assert not delivered & set(sops), f"injected instances reached the destination: {len(delivered & set(sops))}"
        if when == "during_a_move":
            assert delivered == real, "the real move still delivers exactly the study"
        else:
            assert delivered == set()
        assert not any(orthanc.holds(s) for s in sops[:5])
    finally:
        dest.stop()
    after = PacsState(orthanc)
    assert after.ids == before.ids and after.counts == before.counts
    assert_gateway_serves(g, issuer)


# ---- one UID the PACS holds under two patients: neither is trusted ----

@pytest.fixture(scope="module")
def shared_study(orthanc):
    """A StudyInstanceUID that Orthanc holds under PAT-X1 and under PAT-X2 (Orthanc keys a
    study by PatientID and UID, so both are kept), and the two SOP Instance UIDs."""
    study = generate_uid()
    sops = []
    for n, pid in enumerate(["PAT-X1", "PAT-X2"]):
        data = make_instance(pid, study, generate_uid(), 9700 + n, 1, 1, "20240101")
        orthanc.upload(data)
        sops.append(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)
    return study, sops


def test_a_study_held_under_two_patients_is_refused_on_both_protocols(gateway, issuer, shared_study):
    study, _ = shared_study
    token = issuer.mint(patient="PAT-X1")
    # A retry cannot help, so this is a refusal (0124H, 403), not an unavailable PACS.
    a = connect(gateway, token)
    ident = rd.encode(rd.identifier("STUDY", StudyInstanceUID=study))
    ex = a.dimse(GET, rd.command_set(rd.c_get_rq(1, rd.STUDY_GET)), ident, timeout=30)
    assert ex.status == rd.NOT_AUTHORIZED, f"{ex.status:#06x}"
    assert ex.stores == [], "nothing of the study is delivered"
    a.release()
    r = requests.get(f"{gateway.public_url}/dicom-web/studies/{study}/metadata",
                     headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 403, (r.status_code, r.text[:200])
    assert "Retry-After" not in r.headers
    # A search inside the study, and a write into it, on both protocols.
    r = requests.get(f"{gateway.public_url}/dicom-web/studies/{study}/series",
                     headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 403 and "PAT-X2" not in r.text
    a = connect(gateway, token)
    ident = rd.encode(rd.identifier("SERIES", StudyInstanceUID=study, SeriesInstanceUID="", PatientID=""))
    ex = a.dimse(FIND, rd.command_set(rd.c_find_rq(1, rd.STUDY_FIND)), ident, timeout=30)
    assert ex.status == rd.NOT_AUTHORIZED and ex.matches == [], f"{ex.status:#06x}"
    a.release()
    writer = issuer.mint(patient="PAT-X1", scope=WRITE)
    els, sop = fresh_instance("PAT-X1", study=study)
    a = connect(gateway, writer)
    status = a.dimse(STORE, rd.command_set(rd.c_store_rq(1, rd.SECONDARY_CAPTURE, sop)), rd.encode(els),
                     timeout=30).status
    a.release()
    assert status == rd.NOT_AUTHORIZED, f"{status:#06x}"
    boundary = "conflict1234"
    data = make_instance("PAT-X1", study, generate_uid(), 9710, 1, 1, "20240101")
    body = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + f"\r\n--{boundary}--\r\n".encode()
    r = requests.post(f"{gateway.public_url}/dicom-web/studies", data=body, timeout=30, headers={
        "Authorization": f"Bearer {writer}", "Accept": "application/dicom+json",
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    assert r.status_code == 409, (r.status_code, r.text[:200])
    failed = r.json()["00081198"]["Value"]
    assert [f["00081197"]["Value"][0] for f in failed] == [0x0124]
