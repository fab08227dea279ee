"""Attack suite, DIMSE command sets: an attacker with a valid token crafts command sets the
gateway and the PACS could read differently (a repeated Command Field, elements out of order,
lengths that lie), sends commands on presentation contexts they do not belong to, and uses the
legal but rarer framings (several PDVs in one P-DATA-TF PDU). Everything is written with the
raw client of rawdicom.py.

This module also holds what every test_attack_* file shares: the presentation contexts the
raw client proposes (`CONTEXTS`), `connect`, the tokens, the PACS snapshot and
`assert_unharmed`, the check that closes every attack: nothing foreign reached the PACS or a
destination, the other patient's data is intact and still served to that patient, and the
gateway still serves a valid client over DIMSE and HTTP.
"""

import threading
import time

import pytest
import requests
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt

import rawdicom as rd
from conftest import Gateway, free_port, stop
from rawdicom import T

# ---- shared: contexts, connection, tokens ----

ECHO, FIND, FIND_X, GET, GET_X, MOVE, MOVE_X = 1, 3, 5, 7, 9, 11, 13
PFIND, PMOVE, PGET, STORE, STORE_X, CT_STORE = 15, 17, 19, 21, 23, 25

CONTEXTS = [
    (ECHO, rd.VERIFICATION, [rd.IMPLICIT_LE]),
    (FIND, rd.STUDY_FIND, [rd.IMPLICIT_LE]),
    (FIND_X, rd.STUDY_FIND, [rd.EXPLICIT_LE]),
    (GET, rd.STUDY_GET, [rd.IMPLICIT_LE]),
    (GET_X, rd.STUDY_GET, [rd.EXPLICIT_LE]),
    (MOVE, rd.STUDY_MOVE, [rd.IMPLICIT_LE]),
    (MOVE_X, rd.STUDY_MOVE, [rd.EXPLICIT_LE]),
    (PFIND, rd.PATIENT_FIND, [rd.IMPLICIT_LE]),
    (PMOVE, rd.PATIENT_MOVE, [rd.IMPLICIT_LE]),
    (PGET, rd.PATIENT_GET, [rd.IMPLICIT_LE]),
    (STORE, rd.SECONDARY_CAPTURE, [rd.IMPLICIT_LE]),
    (STORE_X, rd.SECONDARY_CAPTURE, [rd.EXPLICIT_LE]),
    (CT_STORE, rd.CT_IMAGE, [rd.IMPLICIT_LE]),
]
EXPLICIT_CONTEXTS = {FIND_X, GET_X, MOVE_X, STORE_X}
# The client may act as a storage SCP on its association (C-GET sub-operations).
ROLES = [(rd.SECONDARY_CAPTURE, 1, 1)]

ATTACKER = "PAT-ATK"  # the attacker's own patient: not loaded, so no loaded count changes
READ = "patient/ImagingStudy.rs"
WRITE = "patient/ImagingStudy.cruds"


def connect(gateway, token, contexts=CONTEXTS, *, calling="ATTACKER", source=None, roles=ROLES,
            timeout=10.0) -> rd.Association:
    """An association with the gateway through the raw client; every proposed context must
    be accepted (else the test harness, not the gateway, is at fault)."""
    a = rd.Association(gateway.dimse_port, source=source, timeout=timeout)
    ac = a.request(rd.associate_rq(gateway.ae_title, calling, contexts, token=token, roles=roles))
    assert isinstance(ac, rd.AssociateAC), f"association refused: {ac}"
    missing = [pc for pc, _, _ in contexts if ac.accepted(pc) is None]
    assert not missing, f"contexts not accepted: {missing} ({ac.contexts})"
    return a


def own(orthanc, pid):
    """(PatientID, study, series, SOP instance) of every loaded instance of a patient."""
    return [x for x in orthanc.instances if x[0] == pid]


def find_studies(a: rd.Association, pc=FIND) -> tuple[int, list]:
    """A STUDY-level C-FIND on an open association: (final status, matches as Datasets)."""
    ident = rd.encode(rd.identifier("STUDY", PatientID="", StudyInstanceUID=""), explicit=pc in EXPLICIT_CONTEXTS)
    ex = a.dimse(pc, rd.command_set(rd.c_find_rq(1, rd.STUDY_FIND)), ident)
    return ex.status, [rd.decode_dataset(m, explicit=pc in EXPLICIT_CONTEXTS) for m in ex.matches]


# ---- shared: what the PACS holds, and the check after every attack ----

class PacsState:
    """Orthanc's instances (by Orthanc id) and the loaded patients' counts, at one moment."""

    WATCHED = ("PAT-A", "PAT-B")

    def __init__(self, orthanc):
        self.orthanc = orthanc
        self.ids = set(requests.get(f"{orthanc.url}/instances", timeout=30).json())
        self.counts = {p: orthanc.counts(p) for p in self.WATCHED}

    def new_sops(self, before: "PacsState") -> set:
        """SOP Instance UIDs of the instances present now and not in `before`."""
        out = set()
        for oid in self.ids - before.ids:
            tags = requests.get(f"{self.orthanc.url}/instances/{oid}", timeout=30).json()["MainDicomTags"]
            out.add(tags.get("SOPInstanceUID"))
        return out


_tokens = {}


def checker_token(issuer, patient) -> str:
    """A read token for the checks after each attack, minted once per issuer and patient."""
    key = (issuer.url, patient)
    if key not in _tokens:
        _tokens[key] = issuer.mint(patient=patient)
    return _tokens[key]


def assert_gateway_serves(gateway, issuer):
    """A valid client still gets an association and a C-ECHO, and /healthz answers."""
    assert gateway.proc.poll() is None, f"the gateway process died (exit {gateway.proc.returncode})"
    a = connect(gateway, checker_token(issuer, "PAT-A"), CONTEXTS[:2], calling="CHECKER")
    assert a.echo(ECHO) == rd.SUCCESS
    a.release()
    r = requests.get(f"{gateway.public_url}/healthz", timeout=10)
    assert r.status_code == 200


def held_studies(orthanc, patient) -> set:
    """The StudyInstanceUIDs Orthanc holds now for a PatientID (compared exactly)."""
    for p in requests.get(f"{orthanc.url}/patients?expand", timeout=30).json():
        if p["MainDicomTags"].get("PatientID") == patient:
            studies = requests.get(f"{orthanc.url}/patients/{p['ID']}/studies", timeout=30).json()
            return {s["MainDicomTags"]["StudyInstanceUID"] for s in studies}
    return set()


def assert_other_patient_served(gateway, issuer, orthanc, patient="PAT-B"):
    """The other patient's own token still finds exactly the studies the PACS holds for it
    (whether those changed is the snapshot's business, so one polluting case does not make
    every later one fail here)."""
    a = connect(gateway, checker_token(issuer, patient), CONTEXTS[:2], calling="VICTIM")
    status, matches = find_studies(a)
    a.release()
    assert status == rd.SUCCESS
    assert {m.StudyInstanceUID for m in matches} == held_studies(orthanc, patient)
    assert {m.PatientID for m in matches} == {patient}


def assert_unharmed(gateway, issuer, orthanc, before: PacsState, allowed_new=(), destinations=()):
    """Closes every attack: the gateway is alive and serves; the PACS holds nothing new but
    `allowed_new` (SOP Instance UIDs the attacker legitimately stored) and lost nothing; the
    loaded patients' counts are unchanged; every destination received nothing (each a
    test_dimse_move.Destination-like object with .received); PAT-B is still served."""
    assert gateway.proc.poll() is None, f"the gateway process died (exit {gateway.proc.returncode})"
    after = PacsState(orthanc)
    assert before.ids <= after.ids, "instances disappeared from the PACS"
    unexpected = after.new_sops(before) - set(allowed_new)
    assert not unexpected, f"the PACS stored what it must not: {unexpected}"
    assert after.counts == before.counts, f"loaded patients' counts changed: {before.counts} -> {after.counts}"
    for d in destinations:
        assert d.received == [], f"a destination received {[x.SOPInstanceUID for x in d.received]}"
    assert_other_patient_served(gateway, issuer, orthanc)
    assert_gateway_serves(gateway, issuer)


class StorageSCP:
    """A pynetdicom storage SCP that records what it receives (a C-MOVE destination)."""

    def __init__(self, port, ae_title, delay=0.0):
        self.received, self.requests = [], []
        self.lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.maximum_associations = 8

        def on_store(event):
            if delay:
                time.sleep(delay)
            with self.lock:
                self.received.append(event.dataset)
                self.requests.append(event.request)
            return 0x0000

        self.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])

    def stop(self):
        self.server.shutdown()


class OwnGateway:
    """A gateway of its own, with a receiver registered in Orthanc under its own AE title and
    a destination DEST of its own."""

    def __init__(self, tmp_root, orthanc, issuer, name, aet):
        self.orthanc, self.name = orthanc, name
        d = tmp_root / name
        d.mkdir()
        receive, dest_port = free_port(), free_port()
        r = requests.put(f"{orthanc.url}/modalities/{name}", json={"AET": aet, "Host": "127.0.0.1", "Port": receive}, timeout=10)
        r.raise_for_status()
        self.scp = StorageSCP(dest_port, "DEST")
        self.g = Gateway(d, orthanc, issuer, name=name, receive_port=receive, destinations=[("DEST", dest_port)], calling_ae=aet)

    def close(self, graceful=True):
        """Stops the gateway (SIGKILL when not graceful: these tests judge no clean exit)."""
        if graceful:
            stop(self.g.proc)
        else:
            self.g.proc.kill()
            self.g.proc.wait()
        self.scp.stop()
        requests.delete(f"{self.orthanc.url}/modalities/{self.name}", timeout=10)


def vm_peak(pid) -> int:
    """The peak address-space size of a process (VmPeak), in KiB."""
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith("VmPeak:"))
    return int(line.split()[1])


@pytest.fixture(scope="module")
def dest_scp(ports):
    d = StorageSCP(ports["dest"], "DEST")
    yield d
    d.stop()


@pytest.fixture
def dest(dest_scp):
    """The session gateway's configured C-MOVE destination DEST, empty at the start of a test."""
    with dest_scp.lock:
        dest_scp.received.clear()
        dest_scp.requests.clear()
    return dest_scp


@pytest.fixture(scope="module")
def evil_scp(orthanc):
    """A storage SCP that Orthanc knows as modality EVIL but that is no destination of the
    gateway: anything that arrives there went around the gateway's C-MOVE checks."""
    port = free_port()
    scp = StorageSCP(port, "EVIL")
    r = requests.put(f"{orthanc.url}/modalities/EVIL", json={"AET": "EVIL", "Host": "127.0.0.1", "Port": port}, timeout=10)
    r.raise_for_status()
    yield scp
    requests.delete(f"{orthanc.url}/modalities/EVIL", timeout=10)
    scp.stop()


@pytest.fixture
def evil(evil_scp):
    """EVIL, with what earlier tests delivered there forgotten."""
    with evil_scp.lock:
        evil_scp.received.clear()
        evil_scp.requests.clear()
    return evil_scp


def fresh_instance(pid=ATTACKER, study=None, series=None, sop=None, **kw):
    """(element list, SOP Instance UID) of a new instance of `pid` in a new (or given) study."""
    sop = sop or generate_uid()
    return rd.instance_elements(pid, study or generate_uid(), series or generate_uid(), sop, **kw), sop


# ---- malformed command sets: A-ABORT, nothing relayed ----

CF = rd.COMMAND_FIELD


def _with(fields, index, *new):
    """fields with `new` inserted at position `index`."""
    return list(fields[:index]) + list(new) + list(fields[index:])


def malformed(case, orthanc):
    """(context, command set bytes, data set bytes or None, token scope) of each case."""
    a_study = own(orthanc, "PAT-A")[0][1]
    echo = rd.c_echo_rq(1)
    if case == "field_twice_move_then_find":
        # The first Command Field says C-MOVE to EVIL, the last C-FIND; the identifier names
        # PAT-B first and PAT-A last. A reader keeping the last sees an own-patient C-FIND.
        fields = [(rd.AFFECTED_SOP_CLASS, rd.PATIENT_FIND), (CF, rd.C_MOVE_RQ), (CF, rd.C_FIND_RQ),
                  (rd.MESSAGE_ID, 1), (rd.MOVE_DESTINATION, "EVIL"), (rd.PRIORITY, 0), (rd.DATA_SET_TYPE, 0)]
        ident = rd.repeat_before(rd.identifier("PATIENT", PatientID="PAT-A"), T["PatientID"], "LO", "PAT-B")
        return PFIND, rd.command_set(fields), rd.encode(ident), READ
    if case == "field_twice_move_then_find_study":
        fields = [(rd.AFFECTED_SOP_CLASS, rd.STUDY_FIND), (CF, rd.C_MOVE_RQ), (CF, rd.C_FIND_RQ),
                  (rd.MESSAGE_ID, 1), (rd.MOVE_DESTINATION, "EVIL"), (rd.PRIORITY, 0), (rd.DATA_SET_TYPE, 0)]
        theirs = own(orthanc, "PAT-B")[0][1]
        ident = rd.repeat_before(rd.identifier("STUDY", StudyInstanceUID=a_study), T["StudyInstanceUID"], "UI", theirs)
        return FIND, rd.command_set(fields), rd.encode(ident), READ
    if case == "field_twice_store_then_find":
        # A read-only token: C-STORE first (what the PACS would run), C-FIND last.
        els, sop = fresh_instance()
        fields = [(rd.AFFECTED_SOP_CLASS, rd.SECONDARY_CAPTURE), (CF, rd.C_STORE_RQ), (CF, rd.C_FIND_RQ),
                  (rd.MESSAGE_ID, 1), (rd.PRIORITY, 0), (rd.DATA_SET_TYPE, 0), (rd.AFFECTED_SOP_INSTANCE, sop)]
        return STORE, rd.command_set(fields), rd.encode(els), READ
    if case == "field_twice_echo":
        return ECHO, rd.command_set(_with(echo, 2, (CF, rd.C_ECHO_RQ))), None, READ
    if case == "message_id_twice":
        return ECHO, rd.command_set(_with(echo, 3, (rd.MESSAGE_ID, 2))), None, READ
    if case == "out_of_order":
        return ECHO, rd.command_set(rd.swap(echo, CF, rd.MESSAGE_ID)), None, READ
    if case == "out_of_order_find":
        f = rd.c_find_rq(1, rd.STUDY_FIND)
        f = [f[0], f[1], f[2], f[4], f[3]]  # DataSetType before Priority
        return FIND, rd.command_set(f), rd.encode(rd.identifier("STUDY", StudyInstanceUID="")), READ
    if case == "group_length_short":
        body = rd.command_set(echo, group_length=False)
        return ECHO, rd.command_set(echo, group_length=len(body) - 2), None, READ
    if case == "group_length_long":
        body = rd.command_set(echo, group_length=False)
        return ECHO, rd.command_set(echo, group_length=len(body) + 8), None, READ
    if case == "group_length_not_first":
        body = rd.command_set(echo, group_length=False)
        return ECHO, body + rd.element(0x00000000, "UL", len(body)), None, READ
    if case == "element_past_end":
        raw = rd.command_set(echo[:-1], group_length=False) + rd.element(rd.DATA_SET_TYPE, "US", rd.NO_DATA_SET, length=0x40)
        return ECHO, rd.element(0x00000000, "UL", len(raw)) + raw, None, READ
    if case == "element_outside_group":
        return ECHO, rd.command_set(echo + [(T["SOPInstanceUID"], rd.value_bytes("UI", "1.2.3"))]), None, READ
    if case == "unknown_element":
        return ECHO, rd.command_set(echo + [(0x0999, b"garbage!")]), None, READ
    if case == "garbage_between":
        return ECHO, rd.command_set(_with(echo, 2, (0x0102, b"\xff\xfe"))), None, READ
    if case == "message_id_four_bytes":
        return ECHO, rd.command_set([echo[0], echo[1], (rd.MESSAGE_ID, b"\1\0\0\0"), echo[3]]), None, READ
    if case == "command_field_one_byte":
        return ECHO, rd.command_set([echo[0], (CF, b"\x30"), echo[2], echo[3]]), None, READ
    raise KeyError(case)


MALFORMED = [
    "field_twice_move_then_find", "field_twice_move_then_find_study", "field_twice_store_then_find",
    "field_twice_echo", "message_id_twice", "out_of_order", "out_of_order_find", "group_length_short",
    "group_length_long", "group_length_not_first", "element_past_end", "element_outside_group",
    "unknown_element", "garbage_between", "message_id_four_bytes", "command_field_one_byte",
]


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_command_set_is_aborted(gateway, issuer, orthanc, dest, evil, case):
    pc, command, data, scope = malformed(case, orthanc)
    before = PacsState(orthanc)
    a = connect(gateway, issuer.mint(patient=ATTACKER if case.startswith("field_twice_store") else "PAT-A", scope=scope))
    try:
        a.send_message(pc, command, data)
    except OSError:
        pass  # the gateway may already have aborted while the data set was on its way
    ended = a.ended_by_peer(timeout=10)
    a.close()
    assert ended == "abort", f"a malformed command set must end the association with an A-ABORT (got {ended})"
    time.sleep(0.5)  # a C-MOVE at the PACS would be delivering by now
    assert_unharmed(gateway, issuer, orthanc, before, destinations=[dest, evil])


# ---- commands on contexts they do not belong to: 0122H, the association goes on ----

def misplaced(case, orthanc):
    """(context, command fields, data set, token scope, written SOP or None) of each case."""
    mine = own(orthanc, "PAT-A")
    study = rd.encode(rd.identifier("STUDY", StudyInstanceUID=mine[0][1]))
    find_ident = rd.encode(rd.identifier("STUDY", PatientID="", StudyInstanceUID=""))
    if case == "move_on_find_context":
        return FIND, rd.c_move_rq(1, rd.STUDY_FIND, "DEST"), study, READ, None
    if case == "move_naming_move_class_on_find_context":
        return FIND, rd.c_move_rq(1, rd.STUDY_MOVE, "DEST"), study, READ, None
    if case == "get_on_find_context":
        return FIND, rd.c_get_rq(1, rd.STUDY_FIND), study, READ, None
    if case == "get_on_move_context":
        return MOVE, rd.c_get_rq(1, rd.STUDY_MOVE), study, READ, None
    if case == "find_on_move_context":
        return MOVE, rd.c_find_rq(1, rd.STUDY_MOVE), find_ident, READ, None
    if case == "find_on_verification_context":
        return ECHO, rd.c_find_rq(1, rd.VERIFICATION), find_ident, READ, None
    if case == "find_on_storage_context":
        return STORE, rd.c_find_rq(1, rd.SECONDARY_CAPTURE), find_ident, READ, None
    if case == "echo_on_find_context":
        return FIND, rd.c_echo_rq(1, rd.STUDY_FIND), None, READ, None
    if case == "store_on_find_context":
        els, sop = fresh_instance()
        return FIND, rd.c_store_rq(1, rd.STUDY_FIND, sop), rd.encode(els), WRITE, sop
    if case == "store_on_verification_context":
        els, sop = fresh_instance()
        return ECHO, rd.c_store_rq(1, rd.SECONDARY_CAPTURE, sop), rd.encode(els), WRITE, sop
    if case == "find_naming_patient_root_on_study_context":
        return FIND, rd.c_find_rq(1, rd.PATIENT_FIND), find_ident, READ, None
    if case == "move_naming_patient_root_on_study_context":
        return MOVE, rd.c_move_rq(1, rd.PATIENT_MOVE, "DEST"), study, READ, None
    if case == "store_naming_ct_on_sc_context":
        els, sop = fresh_instance(sop_class=rd.CT_IMAGE)
        return STORE, rd.c_store_rq(1, rd.CT_IMAGE, sop), rd.encode(els), WRITE, sop
    raise KeyError(case)


MISPLACED = [
    "move_on_find_context", "move_naming_move_class_on_find_context", "get_on_find_context", "get_on_move_context",
    "find_on_move_context", "find_on_verification_context", "find_on_storage_context", "echo_on_find_context",
    "store_on_find_context", "store_on_verification_context", "find_naming_patient_root_on_study_context",
    "move_naming_patient_root_on_study_context", "store_naming_ct_on_sc_context",
]


@pytest.mark.parametrize("case", MISPLACED)
def test_command_outside_its_context_class_is_refused_0122(gateway, issuer, orthanc, dest, case):
    pc, fields, data, scope, sop = misplaced(case, orthanc)
    before = PacsState(orthanc)
    a = connect(gateway, issuer.mint(patient="PAT-A" if scope == READ else ATTACKER, scope=scope))
    ex = a.dimse(pc, rd.command_set(fields), data)
    rq_field = dict(fields)[CF]
    assert ex.stores == [], "a refused C-GET delivered instances"
    assert ex.matches == [], "a refused C-FIND returned matches"
    assert ex.final.field == rq_field | 0x8000, f"the response is for another command: {ex.final.field:#06x}"
    assert ex.status == rd.SOP_CLASS_NOT_SUPPORTED, f"expected 0122H, got {ex.status:#06x}"
    # the association goes on
    assert a.echo(ECHO, message_id=2) == rd.SUCCESS
    a.release()
    if sop is not None:
        assert not orthanc.holds(sop)
    assert_unharmed(gateway, issuer, orthanc, before, destinations=[dest])


# ---- several PDVs in one P-DATA-TF PDU: legal, works normally ----

@pytest.mark.parametrize("case", ["find_command_and_identifier", "find_fragmented_one_pdu", "echo_command_fragments",
                                  "find_explicit_one_pdu"])
def test_several_pdvs_in_one_pdu_work(gateway, issuer, orthanc, case):
    before = PacsState(orthanc)
    a = connect(gateway, issuer.mint(patient="PAT-A"))
    if case == "echo_command_fragments":
        ex = a.dimse(ECHO, rd.command_set(rd.c_echo_rq(5)), fragment=10, one_pdu=True)
        assert ex.status == rd.SUCCESS
        assert ex.final.command[rd.RESPONDED_TO] == 5
    else:
        pc = FIND_X if case == "find_explicit_one_pdu" else FIND
        ident = rd.encode(rd.identifier("STUDY", PatientID="", StudyInstanceUID=""), explicit=pc == FIND_X)
        frag = 7 if case == "find_fragmented_one_pdu" else None
        ex = a.dimse(pc, rd.command_set(rd.c_find_rq(3, rd.STUDY_FIND)), ident, fragment=frag, one_pdu=True)
        assert ex.status == rd.SUCCESS
        matches = [rd.decode_dataset(m, explicit=pc == FIND_X) for m in ex.matches]
        assert {m.StudyInstanceUID for m in matches} == orthanc.studies["PAT-A"]
    assert a.echo(ECHO, message_id=9) == rd.SUCCESS
    a.release()
    assert_unharmed(gateway, issuer, orthanc, before)


@pytest.mark.parametrize("case", ["data_fragments_in_one_pdu", "command_and_data_in_one_pdu", "explicit_tiny_fragments"])
def test_store_with_several_pdvs_in_one_pdu_is_stored(gateway, issuer, orthanc, case):
    before = PacsState(orthanc)
    a = connect(gateway, issuer.mint(patient=ATTACKER, scope=WRITE))
    els, sop = fresh_instance()
    pc = STORE_X if case == "explicit_tiny_fragments" else STORE
    data = rd.encode(els, explicit=pc == STORE_X)
    command = rd.command_set(rd.c_store_rq(1, rd.SECONDARY_CAPTURE, sop))
    if case == "data_fragments_in_one_pdu":
        a.send(rd.p_data_tf(rd.pdv(pc, command, command=True, last=True)))
        a.send(rd.p_data_tf(*a.fragments(pc, data, command=False, size=100)))
        m = a.recv_message()
        status = m.status
    else:
        size = 3 if case == "explicit_tiny_fragments" else 64
        status = a.dimse(pc, command, data, fragment=size, one_pdu=True).status
    assert status == rd.SUCCESS, f"{status:#06x}"
    a.release()
    assert orthanc.holds(sop)
    assert_unharmed(gateway, issuer, orthanc, before, allowed_new={sop})


# ---- a protocol violation ends both associations; the A-ABORT names what was wrong ----

def abort_reason(a: rd.Association, timeout: float = 10.0) -> tuple[int, int] | None:
    """(source, reason) of the A-ABORT that ends the association; None if it ends otherwise."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            a.recv_pdu(max(0.1, deadline - time.time()))
        except rd.Aborted as e:
            return e.source, e.reason
        except (rd.Closed, OSError):
            return None
    return None


SERVICE_PROVIDER = 2
UNEXPECTED_PDU, UNEXPECTED_PARAMETER, INVALID_PARAMETER = 2, 5, 6


def violation(case):
    """The raw bytes of each violation, sent on an established association."""
    echo_rsp = rd.command_set([(rd.AFFECTED_SOP_CLASS, rd.VERIFICATION), (rd.COMMAND_FIELD, 0x8030),
                               (rd.RESPONDED_TO, 1), (rd.DATA_SET_TYPE, rd.NO_DATA_SET),
                               (rd.STATUS, 0)])
    if case == "data_set_without_command":
        return rd.p_data_tf(rd.pdv(FIND, b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY ", command=False, last=True))
    if case == "command_on_unaccepted_context":
        echo = rd.command_set(rd.c_echo_rq(1))
        return rd.p_data_tf(rd.pdv(99, echo, command=True, last=True))
    if case == "response_from_requestor":
        return rd.p_data_tf(rd.pdv(ECHO, echo_rsp, command=True, last=True))
    if case == "release_rp_unasked":
        return rd.RELEASE_RP
    # A data set that stops before its last fragment: by a new command, or by a release.
    find = rd.command_set(rd.c_find_rq(1, rd.STUDY_FIND))
    half = rd.encode(rd.identifier("STUDY", PatientID="PAT-A"))[:8]
    if case == "identifier_broken_off_by_command":
        return rd.p_data_tf(rd.pdv(FIND, find, command=True, last=True),
                            rd.pdv(FIND, half, command=False, last=False),
                            rd.pdv(ECHO, rd.command_set(rd.c_echo_rq(2)), command=True, last=True))
    if case == "identifier_broken_off_by_release":
        return rd.p_data_tf(rd.pdv(FIND, find, command=True, last=True),
                            rd.pdv(FIND, half, command=False, last=False)) + rd.RELEASE_RQ
    if case == "instance_broken_off_by_command":
        els, sop = fresh_instance()
        store = rd.command_set(rd.c_store_rq(1, rd.SECONDARY_CAPTURE, sop))
        return rd.p_data_tf(rd.pdv(STORE, store, command=True, last=True),
                            rd.pdv(STORE, rd.encode(els)[:64], command=False, last=False),
                            rd.pdv(ECHO, rd.command_set(rd.c_echo_rq(2)), command=True, last=True))
    raise KeyError(case)


@pytest.mark.parametrize("case,reason", [
    ("data_set_without_command", UNEXPECTED_PARAMETER),
    ("command_on_unaccepted_context", INVALID_PARAMETER),
    ("response_from_requestor", UNEXPECTED_PARAMETER),
    ("release_rp_unasked", UNEXPECTED_PDU),
    ("identifier_broken_off_by_command", UNEXPECTED_PARAMETER),
    ("identifier_broken_off_by_release", UNEXPECTED_PDU),
    ("instance_broken_off_by_command", UNEXPECTED_PARAMETER),
])
def test_protocol_violation_is_aborted_with_its_reason(gateway, issuer, orthanc, case, reason):
    a = connect(gateway, issuer.mint(patient="PAT-A", scope=WRITE if "instance" in case else READ))
    try:
        a.send(violation(case))
        got = abort_reason(a)
    finally:
        a.close()
    assert got == (SERVICE_PROVIDER, reason), f"{case}: expected A-ABORT (2, {reason}), got {got}"
    # The gateway is unharmed: the next association works.
    b = connect(gateway, issuer.mint(patient="PAT-A", scope=READ))
    try:
        status, _ = find_studies(b)
        assert status == 0
    finally:
        b.close()
