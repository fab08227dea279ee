"""Attack suite, C-STORE: the attacker holds a write token for its own patient (PAT-ATK, not
loaded) and tries to get an instance into another patient's data, or to make the gateway and
the PACS read one instance two ways: repeated or out-of-order attributes in the head (PAT-B's
PatientID or study first), malformed UIDs, lengths that lie, nesting too deep, a defect placed
after the pixel data (when streaming to the PACS has begun), a SOP Instance UID another patient
already has, a command naming another instance than the data set, and transfer syntaxes the
gateway cannot read (deflated, big endian, private), which must not even be negotiated.

Expected: C000H for a defect in the head, 0124H for a foreign SOP Instance UID, never a stored
instance, and PAT-B's data unchanged."""

import zlib

import pytest
import requests
from pydicom.uid import generate_uid

import rawdicom as rd
from rawdicom import E, T
from test_attack_dimse_commands import (
    ATTACKER, ECHO, STORE, STORE_X, WRITE, OwnGateway, PacsState, assert_unharmed, connect, fresh_instance, own, vm_peak,
)

ABORTED = "aborted"


def show(status):
    return status if isinstance(status, str) else f"{status:#06x}"


def store(a: rd.Association, pc: int, sop: str, data: bytes, *, command_sop: str | None = None, fragment=None):
    """One C-STORE: its status, or ABORTED when the gateway ended the association."""
    cmd = rd.command_set(rd.c_store_rq(1, rd.SECONDARY_CAPTURE, command_sop or sop))
    try:
        return a.dimse(pc, cmd, data, fragment=fragment, timeout=15).status
    except (rd.Aborted, rd.Closed, BrokenPipeError, ConnectionResetError):
        return ABORTED
    except TimeoutError:
        return "no answer within 15 s"


def writer(gateway, issuer):
    return connect(gateway, issuer.mint(patient=ATTACKER, scope=WRITE))


def sop_owners(orthanc, sop) -> list:
    """The PatientIDs of every instance Orthanc holds under this SOP Instance UID."""
    out = []
    for x in requests.post(f"{orthanc.url}/tools/lookup", data=sop, timeout=30).json():
        if x["Type"] == "Instance":
            out.append(requests.get(f"{orthanc.url}/instances/{x['ID']}/patient", timeout=30).json()["MainDicomTags"]["PatientID"])
    return out


# ---- the harness itself ----

@pytest.mark.parametrize("enc", ["implicit", "explicit"])
def test_well_formed_raw_store_is_stored_control(gateway, issuer, orthanc, enc):
    before = PacsState(orthanc)
    els, sop = fresh_instance()
    a = writer(gateway, issuer)
    pc = STORE_X if enc == "explicit" else STORE
    assert store(a, pc, sop, rd.encode(els, explicit=enc == "explicit")) == rd.SUCCESS
    a.release()
    assert sop_owners(orthanc, sop) == [ATTACKER]
    assert_unharmed(gateway, issuer, orthanc, before, allowed_new={sop})


# ---- a defect in the head: C000H, nothing stored ----

def head_case(case, orthanc, explicit):
    """(element list or bytes, SOP Instance UIDs that must not be stored)."""
    theirs = own(orthanc, "PAT-B")[0]
    els, sop = fresh_instance()
    other = generate_uid()
    if case == "repeated_patient_id_foreign_first":
        return rd.repeat_before(els, T["PatientID"], "LO", "PAT-B"), {sop}
    if case == "repeated_patient_id_foreign_last":
        return rd.insert_sorted(els, E(T["PatientID"], "LO", "PAT-B")), {sop}
    if case == "repeated_study_uid_foreign_first":
        return rd.repeat_before(els, T["StudyInstanceUID"], "UI", theirs[1]), {sop}
    if case == "repeated_study_uid_foreign_last":
        return rd.insert_sorted(els, E(T["StudyInstanceUID"], "UI", theirs[1])), {sop}
    if case == "repeated_study_uid_both_new":
        return rd.repeat_before(els, T["StudyInstanceUID"], "UI", generate_uid()), {sop}
    if case == "repeated_series_uid_foreign_first":
        return rd.repeat_before(els, T["SeriesInstanceUID"], "UI", theirs[2]), {sop}
    if case == "repeated_sop_instance_uid":
        return rd.repeat_before(els, T["SOPInstanceUID"], "UI", other), {sop, other}
    if case == "out_of_order_patient_after_study":
        return rd.swap(els, T["PatientID"], T["StudyInstanceUID"]), {sop}
    if case == "out_of_order_sop_class_after_sop_instance":
        return rd.swap(els, T["SOPClassUID"], T["SOPInstanceUID"]), {sop}
    if case == "out_of_order_in_item":
        item = [E(0x00081155, "UI", theirs[3]), E(0x00081150, "UI", rd.SECONDARY_CAPTURE)]
        return rd.insert_sorted(els, E(T["ReferencedImageSequence"], "SQ", [item])), {sop}
    if case == "repeated_in_nested_item":
        inner = [E(T["PatientID"], "LO", "PAT-B"), E(T["PatientID"], "LO", ATTACKER)]
        return rd.insert_sorted(els, E(T["OtherPatientIDsSequence"], "SQ", [inner])), {sop}
    if case == "nested_17_deep":
        deep = rd.nested_sequences(17, rd.element(0x00081150, "UI", rd.SECONDARY_CAPTURE, explicit=explicit),
                                   tag=T["ReferencedImageSequence"], explicit=explicit)
        return rd.insert_sorted(els, E(T["ReferencedImageSequence"], "SQ", raw=deep)), {sop}
    if case == "declared_length_past_end":
        # ReferringPhysicianName declares more bytes than the whole rest of the data set.
        return rd.insert_sorted(els, E(T["ReferringPhysicianName"], "PN", "X^Y", length=0xFFF0)), {sop}
    if case == "declares_4_gib":
        return rd.insert_sorted(els, E(0x00111010, "UN", b"\0" * 16, length=0xFFFFFFF0)), {sop}
    if case == "undefined_length_text":
        tag, vr = (0x00081030, "UT") if explicit else (T["PatientName"], "PN")
        raw = rd.header(tag, vr, rd.UNDEFINED, explicit) + rd.item(rd.element(T["PatientID"], "LO", "PAT-B", explicit=explicit))
        raw += rd.tag_bytes(rd.SEQUENCE_DELIMITER) + b"\0\0\0\0"
        return rd.insert_sorted(rd.remove(els, tag), E(tag, vr, raw=raw)), {sop}
    if case == "uid_leading_space_study":
        study = generate_uid()
        return rd.replace(els, T["StudyInstanceUID"], "UI", (" " + study).encode() + (b"" if len(study) % 2 else b"\0")), {sop}
    if case == "uid_trailing_space_series":
        series = generate_uid()
        return rd.replace(els, T["SeriesInstanceUID"], "UI", series.encode() + (b" " if len(series) % 2 else b"  ")), {sop}
    if case == "uid_letters_sop":
        bad = sop[:-4] + "a.b1"
        return rd.replace(els, T["SOPInstanceUID"], "UI", bad), {sop, bad}
    if case == "sop_uid_two_values":
        return rd.replace(els, T["SOPInstanceUID"], "UI", f"{sop}\\{other}"), {sop, other}
    if case == "study_uid_two_values":
        return rd.replace(els, T["StudyInstanceUID"], "UI", f"{generate_uid()}\\{theirs[1]}"), {sop}
    if case == "wrong_vr_patient_id":
        return rd.replace(els, T["PatientID"], "UI", ATTACKER), {sop}
    if case == "wrong_vr_study_uid":
        return rd.replace(els, T["StudyInstanceUID"], "LO", generate_uid()), {sop}
    if case == "patient_id_as_sequence":
        return rd.replace(els, T["PatientID"], "SQ", [[E(T["PatientID"], "LO", ATTACKER)]]), {sop}
    raise KeyError(case)


HEAD_BOTH = [
    "repeated_patient_id_foreign_first", "repeated_patient_id_foreign_last", "repeated_study_uid_foreign_first",
    "repeated_study_uid_foreign_last", "repeated_study_uid_both_new", "repeated_series_uid_foreign_first",
    "repeated_sop_instance_uid", "out_of_order_patient_after_study", "out_of_order_sop_class_after_sop_instance",
    "out_of_order_in_item", "repeated_in_nested_item", "nested_17_deep", "declared_length_past_end", "declares_4_gib",
    "undefined_length_text", "uid_leading_space_study", "uid_trailing_space_series", "uid_letters_sop",
    "sop_uid_two_values", "study_uid_two_values", "patient_id_as_sequence",
]
HEAD_CASES = [(c, e) for c in HEAD_BOTH for e in ("implicit", "explicit")] + \
    [(c, "explicit") for c in ("wrong_vr_patient_id", "wrong_vr_study_uid")]


@pytest.mark.parametrize("case,enc", HEAD_CASES, ids=[f"{c}-{e}" for c, e in HEAD_CASES])
def test_store_with_malformed_head_is_c000(gateway, issuer, orthanc, case, enc):
    explicit = enc == "explicit"
    before = PacsState(orthanc)
    els, forbidden = head_case(case, orthanc, explicit)
    sop = next(iter(sorted(forbidden)))
    a = writer(gateway, issuer)
    status = store(a, STORE_X if explicit else STORE, sop, rd.encode(els, explicit=explicit))
    assert status == rd.CANNOT_UNDERSTAND, f"expected C000H, got {show(status)}"
    assert a.echo(ECHO, message_id=2) == rd.SUCCESS, "the association goes on"
    a.release()
    for uid in forbidden:
        assert not orthanc.holds(uid), f"{uid} was stored"
    assert_unharmed(gateway, issuer, orthanc, before)


_fresh = [0]


@pytest.mark.parametrize("channel", ["c_store_implicit", "c_store_explicit", "stow_rs"])
def test_head_declaring_4_gib_reserves_nothing(tmp_root, orthanc, issuer, channel):
    """On a fresh gateway process, so that its address-space high-water mark (VmPeak) shows
    what this one instance made it reserve."""
    _fresh[0] += 1
    own_g = OwnGateway(tmp_root, orthanc, issuer, f"attack-store-4gib-{_fresh[0]}", aet=f"PGSTORE4G{_fresh[0]}")
    g = own_g.g
    try:
        before = PacsState(orthanc)
        explicit = channel != "c_store_implicit"
        els, forbidden = head_case("declares_4_gib", orthanc, explicit)
        sop = next(iter(forbidden))
        peak = vm_peak(g.proc.pid)
        if channel == "stow_rs":
            body = b"--b4g\r\nContent-Type: application/dicom\r\n\r\n" + rd.part10_instance(els) + b"\r\n--b4g--\r\n"
            r = requests.post(f"{g.public_url}/dicom-web/studies", data=body, timeout=30, headers={
                "Authorization": f"Bearer {issuer.mint(patient=ATTACKER, scope=WRITE)}",
                "Content-Type": 'multipart/related; type="application/dicom"; boundary=b4g'})
            outcome, expected = r.status_code, 400
        else:
            a = writer(g, issuer)
            outcome, expected = store(a, STORE_X if explicit else STORE, sop, rd.encode(els, explicit=explicit)), rd.CANNOT_UNDERSTAND
            if outcome != ABORTED:
                a.release()
        grown = vm_peak(g.proc.pid) - peak
        assert grown < 512 * 1024, f"the gateway's address space grew by {grown // 1024} MiB"
        assert outcome == expected, f"expected {show(expected)}, got {show(outcome)}"
        assert not orthanc.holds(sop)
        assert_unharmed(g, issuer, orthanc, before)
    finally:
        own_g.close(graceful=False)


# ---- a defect after the pixel data (streaming to the PACS began): never stored ----

def tail_case(case, explicit):
    """(element list, SOP Instance UID) of an instance with 256 KiB of pixels and a late defect."""
    els, sop = fresh_instance(rows=512, columns=512)
    if case == "repeated_pixel_data":
        return els + [E(T["PixelData"], "OB", b"\0" * 64)], sop
    if case == "out_of_order_after_pixel_data":
        return els + [E(0x00400275, "SQ", [[E(0x00401001, "SH", "X")]])], sop
    if case == "repeated_trailing_padding":
        return els + [E(T["DataSetTrailingPadding"], "OB", b"\0\0"), E(T["DataSetTrailingPadding"], "OB", b"\0\0")], sop
    if case == "truncated_final_element":
        last = rd.element(T["DataSetTrailingPadding"], "OB", b"\0" * 8, explicit=explicit, length=72)
        return els + [last], sop
    if case == "truncated_pixel_data":
        pixels = els[-1].value
        return els[:-1] + [E(T["PixelData"], "OB", pixels[:-1000], length=len(pixels))], sop
    if case == "nested_17_deep_after_pixel_data":
        return els + [rd.nested_sequences(17, tag=T["DigitalSignaturesSequence"], explicit=explicit)], sop
    if case == "repeated_tag_in_late_item":
        return els + [E(T["DigitalSignaturesSequence"], "SQ", [[E(0x04000005, "US", 1), E(0x04000005, "US", 2)]])], sop
    raise KeyError(case)


TAIL_CASES = ["repeated_pixel_data", "out_of_order_after_pixel_data", "repeated_trailing_padding",
              "truncated_final_element", "truncated_pixel_data", "nested_17_deep_after_pixel_data",
              "repeated_tag_in_late_item"]


@pytest.mark.parametrize("enc", ["implicit", "explicit"])
@pytest.mark.parametrize("case", TAIL_CASES)
def test_store_with_late_defect_is_never_stored(gateway, issuer, orthanc, case, enc):
    explicit = enc == "explicit"
    before = PacsState(orthanc)
    els, sop = tail_case(case, explicit)
    a = writer(gateway, issuer)
    status = store(a, STORE_X if explicit else STORE, sop, rd.encode(els, explicit=explicit), fragment=16000)
    assert status in (rd.CANNOT_UNDERSTAND, ABORTED), f"expected C000H or an A-ABORT, got {show(status)}"
    if status != ABORTED:
        assert a.echo(ECHO, message_id=2) == rd.SUCCESS
        a.release()
    else:
        a.close()
    assert not orthanc.holds(sop), "a defective instance was stored"
    assert_unharmed(gateway, issuer, orthanc, before)


# ---- SOP Instance UIDs that exist elsewhere: 0124H, nothing changes ----

@pytest.mark.parametrize("case", ["foreign_sop_in_new_study", "foreign_sop_in_foreign_series_own_study",
                                  "own_sop_into_another_study", "own_sop_into_another_series"])
@pytest.mark.parametrize("enc", ["implicit", "explicit"])
def test_store_of_an_existing_sop_instance_uid_elsewhere_is_0124(gateway, issuer, orthanc, case, enc):
    explicit = enc == "explicit"
    pc = STORE_X if explicit else STORE
    a = writer(gateway, issuer)
    allowed = set()
    if case.startswith("foreign"):
        # the last loaded PAT-B instance: a gateway that lets this through leaves a second
        # instance under its UID, and other tests use the first one
        pid, study, series, sop = own(orthanc, "PAT-B")[-1]
        els, _ = fresh_instance(sop=sop, series=series if "series" in case else None)
        owners = ["PAT-B"]
    else:
        first, sop = fresh_instance()
        assert store(a, pc, sop, rd.encode(first, explicit=explicit)) == rd.SUCCESS
        allowed = {sop}
        study = next(e.value for e in first if e.tag == T["StudyInstanceUID"])
        els, _ = fresh_instance(sop=sop, study=None if case.endswith("study") else study)
        owners = [ATTACKER]
    before = PacsState(orthanc)
    status = store(a, pc, sop, rd.encode(els, explicit=explicit))
    assert status == rd.NOT_AUTHORIZED, f"expected 0124H, got {show(status)}"
    assert a.echo(ECHO, message_id=3) == rd.SUCCESS
    a.release()
    assert sop_owners(orthanc, sop) == owners, "the SOP Instance UID now names another instance too"
    assert_unharmed(gateway, issuer, orthanc, before, allowed_new=allowed)


def test_store_of_own_instance_again_in_place_is_accepted(gateway, issuer, orthanc):
    """The rule is about elsewhere: the caller's own instance sent again to its own place is fine."""
    before = PacsState(orthanc)
    a = writer(gateway, issuer)
    els, sop = fresh_instance()
    assert store(a, STORE, sop, rd.encode(els)) == rd.SUCCESS
    assert store(a, STORE, sop, rd.encode(els)) == rd.SUCCESS
    a.release()
    assert sop_owners(orthanc, sop) == [ATTACKER]
    assert_unharmed(gateway, issuer, orthanc, before, allowed_new={sop})


# ---- the command names another instance than the data set ----

@pytest.mark.parametrize("case", ["both_new", "command_names_foreign"])
@pytest.mark.parametrize("enc", ["implicit", "explicit"])
def test_command_sop_instance_differs_from_data_set(gateway, issuer, orthanc, case, enc):
    explicit = enc == "explicit"
    before = PacsState(orthanc)
    els, sop = fresh_instance()
    named = generate_uid() if case == "both_new" else own(orthanc, "PAT-B")[0][3]
    a = writer(gateway, issuer)
    status = store(a, STORE_X if explicit else STORE, sop, rd.encode(els, explicit=explicit), command_sop=named)
    assert status in (rd.CANNOT_UNDERSTAND, rd.IDENTIFIER_MISMATCH), \
        f"expected C000H or A900H, got {show(status)}"
    assert a.echo(ECHO, message_id=2) == rd.SUCCESS
    a.release()
    assert not orthanc.holds(sop)
    if case == "both_new":
        assert not orthanc.holds(named)
    assert_unharmed(gateway, issuer, orthanc, before)


# ---- transfer syntaxes the gateway cannot read: not negotiated ----

UNREADABLE = {
    "deflated": rd.DEFLATED_LE,
    "explicit_big_endian": rd.EXPLICIT_BE,
    "private": "1.2.826.0.1.3680043.8.498.4242.1",
    "unknown_standard_looking": "1.2.840.10008.1.2.4.999",
    "retired_jpeg": "1.2.840.10008.1.2.4.52",
}


@pytest.mark.parametrize("name", list(UNREADABLE))
def test_context_with_only_unreadable_transfer_syntaxes_is_refused(gateway, issuer, orthanc, name):
    before = PacsState(orthanc)
    contexts = [(ECHO, rd.VERIFICATION, [rd.IMPLICIT_LE]), (3, rd.SECONDARY_CAPTURE, [UNREADABLE[name]]),
                (5, rd.SECONDARY_CAPTURE, [UNREADABLE[name], rd.EXPLICIT_LE])]
    a = rd.Association(gateway.dimse_port, timeout=10)
    ac = a.request(rd.associate_rq(gateway.ae_title, "ATTACKER", contexts,
                                   token=issuer.mint(patient=ATTACKER, scope=WRITE)))
    assert isinstance(ac, rd.AssociateAC), ac
    assert ac.result(3) == 4, f"result {ac.result(3)} for a context proposing only {name} (4: transfer syntaxes not supported)"
    assert ac.accepted(5) == rd.EXPLICIT_LE, "a readable syntax beside it is what gets chosen"
    assert a.echo(ECHO) == rd.SUCCESS
    # An instance sent anyway on the refused context ends the association.
    els, sop = fresh_instance()
    data = rd.encode(els, explicit=True)
    if name == "deflated":
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        data = c.compress(data) + c.flush()
    status = store(a, 3, sop, data)
    assert status == ABORTED, f"a message on a refused context must be aborted, got {status}"
    a.close()
    assert not orthanc.holds(sop)
    assert_unharmed(gateway, issuer, orthanc, before)
