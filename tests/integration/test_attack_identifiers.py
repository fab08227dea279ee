"""Attack suite, C-FIND / C-GET / C-MOVE identifiers: the attacker (a valid read token for
PAT-A) sends identifiers that a lenient reader and the PACS could read differently (a repeated
key with PAT-B's value first or last, keys out of order at any nesting level), or that make a
naive reader work without bound (2000 nested sequences, a declared length of 4 GiB), or whose
UIDs and judged attributes are not well formed. The gateway answers A900H (identifier does not
match SOP class), relays nothing, and the association goes on. Each case runs for the three
services and, where the encoding matters, in Implicit and Explicit VR Little Endian."""

import time

import pytest

import rawdicom as rd
from rawdicom import E, T
from test_attack_dimse_commands import (
    ECHO, EXPLICIT_CONTEXTS, FIND, FIND_X, GET, GET_X, MOVE, MOVE_X, OwnGateway, PacsState, assert_unharmed, connect, own,
    vm_peak,
)
from test_attack_dimse_commands import dest, dest_scp  # noqa: F401  (fixtures)

CONTEXT = {("find", False): FIND, ("find", True): FIND_X, ("get", False): GET, ("get", True): GET_X,
           ("move", False): MOVE, ("move", True): MOVE_X}
SOP_CLASS = {"find": rd.STUDY_FIND, "get": rd.STUDY_GET, "move": rd.STUDY_MOVE}

def command(op):
    return rd.command_set({"find": lambda: rd.c_find_rq(1, rd.STUDY_FIND),
                           "get": lambda: rd.c_get_rq(1, rd.STUDY_GET),
                           "move": lambda: rd.c_move_rq(1, rd.STUDY_MOVE, "DEST")}[op]())


def base(orthanc):
    """The well-formed identifier every case starts from: PAT-A's first study."""
    return rd.identifier("STUDY", PatientID="PAT-A", StudyInstanceUID=own(orthanc, "PAT-A")[0][1])


def padded_uid(uid: str, tail: bytes) -> bytes:
    return uid.encode() + tail


def build(case, orthanc, explicit):
    """The identifier bytes of a case."""
    b = base(orthanc)
    study = own(orthanc, "PAT-A")[0][1]
    theirs = own(orthanc, "PAT-B")[0][1]
    ref_item = [E(0x00081150, "UI", rd.SECONDARY_CAPTURE), E(0x00081155, "UI", own(orthanc, "PAT-A")[0][3])]
    if case == "repeated_patient_id_foreign_first":
        els = rd.repeat_before(b, T["PatientID"], "LO", "PAT-B")
    elif case == "repeated_patient_id_foreign_last":
        els = rd.insert_sorted(b, E(T["PatientID"], "LO", "PAT-B"))  # stable: after PAT-A's
    elif case == "repeated_study_uid_foreign_first":
        els = rd.repeat_before(b, T["StudyInstanceUID"], "UI", theirs)
    elif case == "repeated_study_uid_foreign_last":
        els = rd.insert_sorted(b, E(T["StudyInstanceUID"], "UI", theirs))
    elif case == "repeated_level":
        els = rd.repeat_before(b, T["QueryRetrieveLevel"], "CS", "PATIENT")
    elif case == "out_of_order_top":
        els = rd.swap(b, T["PatientID"], T["StudyInstanceUID"])
    elif case == "out_of_order_level_last":
        els = b[1:] + b[:1]
    elif case == "out_of_order_in_item":
        els = rd.insert_sorted(b, E(T["ReferencedStudySequence"], "SQ", [list(reversed(ref_item))]))
    elif case == "repeated_in_item":
        els = rd.insert_sorted(b, E(T["ReferencedStudySequence"], "SQ", [ref_item + [ref_item[1]]]))
    elif case == "out_of_order_at_depth_3":
        inner = E(T["ContentSequence"], "SQ", [[E(0x0040A160, "UT", "b"), E(0x0040A040, "CS", "TEXT")]])
        mid = E(T["ContentSequence"], "SQ", [[inner]])
        els = b + [E(T["ContentSequence"], "SQ", [[mid]])]
    elif case == "nested_17_deep":
        els = b + [rd.nested_sequences(17, rd.element(0x0040A040, "CS", "TEXT", explicit=explicit), explicit=explicit)]
    elif case == "nested_17_deep_defined_lengths":
        els = b + [rd.nested_sequences(17, rd.element(0x0040A040, "CS", "TEXT", explicit=explicit), explicit=explicit,
                                       undefined=False)]
    elif case == "declared_length_past_end":
        els = b + [E(0x00200010, "SH", "1234", length=100)]
    elif case == "declared_length_in_item_past_item":
        item = rd.element(0x00081150, "UI", rd.SECONDARY_CAPTURE, explicit=explicit)
        seq = rd.sequence(T["ReferencedStudySequence"], [rd.item(item, undefined=False, length=len(item) - 6)], explicit=explicit,
                          undefined=False)
        els = rd.insert_sorted(b, E(T["ReferencedStudySequence"], "SQ", raw=seq))
    elif case == "undefined_length_text":
        # In Explicit VR, UT has a 4-byte length that may not be undefined; in Implicit VR a
        # PatientName of undefined length is what some readers take for a sequence.
        tag, vr = (0x0040A160, "UT") if explicit else (T["PatientName"], "PN")
        bogus = rd.item(rd.element(T["PatientID"], "LO", "PAT-B", explicit=explicit))
        raw = rd.header(tag, vr, rd.UNDEFINED, explicit) + bogus + rd.tag_bytes(rd.SEQUENCE_DELIMITER) + b"\0\0\0\0"
        els = rd.insert_sorted(b, E(tag, vr, raw=raw))
    elif case == "uid_leading_space":
        els = rd.replace(b, T["StudyInstanceUID"], "UI", padded_uid(" " + study, b"" if len(study) % 2 else b"\0"))
    elif case == "uid_trailing_spaces":
        els = rd.replace(b, T["StudyInstanceUID"], "UI", padded_uid(study, b"  " if len(study) % 2 == 0 else b" "))
    elif case == "uid_two_nuls":
        els = rd.replace(b, T["StudyInstanceUID"], "UI", padded_uid(study, b"\0\0" if len(study) % 2 == 0 else b"\0\0\0"))
    elif case == "uid_letters":
        els = rd.replace(b, T["StudyInstanceUID"], "UI", study[:-3] + "abc")
    elif case == "uid_inner_nul":
        raw = study[:8].encode() + b"\0" + study[8:].encode()
        els = rd.replace(b, T["StudyInstanceUID"], "UI", raw + (b"\0" if len(raw) % 2 else b""))
    elif case == "uid_list_with_foreign_padded":
        els = rd.replace(b, T["StudyInstanceUID"], "UI", f"{study}\\ {theirs}")
    elif case == "level_two_values":
        els = rd.replace(b, T["QueryRetrieveLevel"], "CS", "STUDY\\PATIENT")
    elif case == "wrong_vr_study_uid":
        els = rd.replace(b, T["StudyInstanceUID"], "LO", study)
    elif case == "wrong_vr_patient_id":
        els = rd.replace(b, T["PatientID"], "UI", "PAT-A")
    elif case == "wrong_vr_level":
        els = rd.replace(b, T["QueryRetrieveLevel"], "LO", "STUDY")
    elif case == "patient_id_as_sequence":
        els = rd.replace(b, T["PatientID"], "SQ", [[E(T["PatientID"], "LO", "PAT-B")]])
    else:
        raise KeyError(case)
    return rd.encode(els, explicit=explicit)


BOTH = [
    "repeated_patient_id_foreign_first", "repeated_patient_id_foreign_last", "repeated_study_uid_foreign_first",
    "repeated_study_uid_foreign_last", "repeated_level", "out_of_order_top", "out_of_order_level_last",
    "out_of_order_in_item", "repeated_in_item", "out_of_order_at_depth_3", "nested_17_deep",
    "nested_17_deep_defined_lengths", "declared_length_past_end", "declared_length_in_item_past_item",
    "undefined_length_text", "uid_leading_space", "uid_trailing_spaces", "uid_two_nuls", "uid_letters",
    "uid_inner_nul", "uid_list_with_foreign_padded", "level_two_values", "patient_id_as_sequence",
]
EXPLICIT_ONLY = ["wrong_vr_study_uid", "wrong_vr_patient_id", "wrong_vr_level"]
CASES = [(c, enc) for c in BOTH for enc in ("implicit", "explicit")] + [(c, "explicit") for c in EXPLICIT_ONLY]


def run(gateway, issuer, op, pc, ident):
    a = connect(gateway, issuer.mint(patient="PAT-A"))
    ex = a.dimse(pc, command(op), ident)
    return a, ex


@pytest.mark.parametrize("op", ["find", "get", "move"])
@pytest.mark.parametrize("case,enc", CASES, ids=[f"{c}-{e}" for c, e in CASES])
def test_malformed_identifier_is_a900(gateway, issuer, orthanc, dest, op, case, enc):
    explicit = enc == "explicit"
    pc = CONTEXT[(op, explicit)]
    before = PacsState(orthanc)
    a, ex = run(gateway, issuer, op, pc, build(case, orthanc, explicit))
    assert ex.matches == [], f"matches were returned: {len(ex.matches)}"
    assert ex.stores == [], f"{len(ex.stores)} instances were delivered"
    assert ex.status == rd.IDENTIFIER_MISMATCH, f"expected A900H, got {ex.status:#06x}"
    assert a.echo(ECHO, message_id=2) == rd.SUCCESS, "the association goes on"
    a.release()
    time.sleep(0.2 if op == "move" else 0)
    assert_unharmed(gateway, issuer, orthanc, before, destinations=[dest])


@pytest.mark.parametrize("op", ["find", "get", "move"])
@pytest.mark.parametrize("enc", ["implicit", "explicit"])
def test_well_formed_identifier_control(gateway, issuer, orthanc, dest, op, enc):
    """The harness itself: the unmodified base identifier works on every service."""
    explicit = enc == "explicit"
    pc = CONTEXT[(op, explicit)]
    before = PacsState(orthanc)
    a, ex = run(gateway, issuer, op, pc, rd.encode(base(orthanc), explicit=explicit))
    assert ex.status == rd.SUCCESS, f"{ex.status:#06x}"
    study = own(orthanc, "PAT-A")[0][1]
    expected = {x[3] for x in own(orthanc, "PAT-A") if x[1] == study}
    if op == "find":
        matches = [rd.decode_dataset(m, explicit=pc in EXPLICIT_CONTEXTS) for m in ex.matches]
        assert [m.StudyInstanceUID for m in matches] == [study]
    elif op == "get":
        assert {a.decode(m).SOPInstanceUID for m in ex.stores} == expected
    else:
        assert {d.SOPInstanceUID for d in dest.received} == expected
        dest.received.clear()
    a.release()
    assert_unharmed(gateway, issuer, orthanc, before, destinations=[dest])


def unbounded(case, orthanc, explicit):
    b = base(orthanc)
    if case == "nested_2000_deep":
        # ~64 KB, well under max_identifier_bytes: only the depth is wrong.
        return rd.encode(b + [rd.nested_sequences(2000, explicit=explicit)], explicit=explicit)
    if case == "nested_2000_deep_in_item_chain":
        return rd.encode(b + [rd.nested_sequences(2000, rd.element(0x0040A040, "CS", "TEXT", explicit=explicit),
                                                  tag=T["ReferencedStudySequence"], explicit=explicit)], explicit=explicit)
    if case == "declares_4_gib_tiny":
        # A few dozen bytes: the level, then one element that declares 0xFFFFFFF0 bytes.
        return rd.encode([E(T["QueryRetrieveLevel"], "CS", "STUDY"), E(0x0040A160, "UT", b"xxxxxx", length=0xFFFFFFF0)],
                         explicit=explicit)
    if case == "declares_4_gib_after_keys":
        return rd.encode(b + [E(0x0040A160, "UT", b"", length=0xFFFFFFF0)], explicit=explicit)
    raise KeyError(case)


_fresh = [0]


@pytest.fixture
def unbounded_env(tmp_root, orthanc, issuer):
    """Each unbounded case gets a fresh gateway process: one that reads without bound dies of
    these (and should take no other test with it), and the address-space high-water mark
    (VmPeak) then shows what this case alone made it reserve."""
    _fresh[0] += 1
    own_g = OwnGateway(tmp_root, orthanc, issuer, f"attack-unbounded-{_fresh[0]}", aet=f"PGUNBOUND{_fresh[0]}")
    yield own_g.g, own_g.scp
    own_g.close(graceful=False)


@pytest.mark.parametrize("op", ["find", "get", "move"])
@pytest.mark.parametrize("enc", ["implicit", "explicit"])
@pytest.mark.parametrize("case", ["declares_4_gib_tiny", "declares_4_gib_after_keys", "nested_2000_deep",
                                  "nested_2000_deep_in_item_chain"])
def test_unbounded_identifier_is_a900_without_crash_or_allocation(unbounded_env, issuer, orthanc, op, case, enc):
    g, scp = unbounded_env
    scp.received.clear()
    explicit = enc == "explicit"
    pc = CONTEXT[(op, explicit)]
    assert g.proc.poll() is None, "the gateway process is not running"
    before = PacsState(orthanc)
    peak_before = vm_peak(g.proc.pid)
    a = connect(g, issuer.mint(patient="PAT-A"))
    try:
        ex = a.dimse(pc, command(op), unbounded(case, orthanc, explicit), timeout=15)
    except (rd.Aborted, rd.Closed) as e:
        pytest.fail(f"the association ended instead of an A900H answer: {e}; gateway alive: {g.proc.poll() is None}")
    assert ex.status == rd.IDENTIFIER_MISMATCH, f"expected A900H, got {ex.status:#06x}"
    assert ex.matches == [] and ex.stores == []
    assert a.echo(ECHO, message_id=2) == rd.SUCCESS
    a.release()
    peak_after = vm_peak(g.proc.pid)
    assert peak_after - peak_before < 512 * 1024, f"the gateway's address space grew by {(peak_after - peak_before) // 1024} MiB"
    assert_unharmed(g, issuer, orthanc, before, destinations=[scp])
