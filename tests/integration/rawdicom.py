"""A raw DICOM Upper Layer client and byte-level DICOM builders, for the attack suite.

Nothing here normalizes, sorts or checks what it is given: every byte that goes on the wire is
the one the test asked for, so malformed messages (repeated tags, tags out of order, lengths
that lie, wrong group lengths, odd fragmentation) can be written as easily as good ones.
pynetdicom and pydicom are used only to *read* what comes back (decoding identifiers and
instances), never to write what is sent.

Sections:

- Values and elements: `element`, `item`, `sequence`, `nested_sequences`, `encode` (a list
  of elements in the order given, Implicit or Explicit VR Little Endian), `E` for elements
  with crafted lengths or raw bytes; list edits that keep the rest as it is: `replace`,
  `repeat_before`, `insert_sorted`, `swap`, `remove`.
- Instances and identifiers: `instance_elements` (a small Secondary Capture instance as a
  sorted list of elements, to be mutated by tests), `identifier`.
- Part 10 files: `file_meta_elements`, `file_meta` (right, missing or wrong group length),
  `part10` (preamble, magic), `part10_instance`.
- Command sets: `command_set` (group 0000, Implicit VR LE, with a correct, missing or wrong
  group length, elements in the order given), `c_echo_rq` and friends, `parse_command`.
- PDUs: `associate_rq`, `p_data_tf`, `pdv`, parsed answers `AssociateAC` / `AssociateRJ`.
- `Association`: a blocking socket client that sends PDUs and messages and reads them back
  (messages reassembled, C-STORE sub-operations of a C-GET answered), and reports an A-ABORT
  or a closed connection as `Aborted` / `Closed`.
- Reading what comes back: `decode_dataset`, `Association.decode` (pydicom Datasets).

Tags are ints written 0xGGGGEEEE. Lengths are the declared lengths on the wire.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field

# ---- well-known UIDs ----

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.7433.1"
IMPLEMENTATION_VERSION = "RAWDICOM_1"

VERIFICATION = "1.2.840.10008.1.1"
PATIENT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_GET = "1.2.840.10008.5.1.4.1.2.2.3"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"

# ---- command fields and statuses ----

C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_GET_RQ, C_GET_RSP = 0x0010, 0x8010
C_FIND_RQ, C_FIND_RSP = 0x0020, 0x8020
C_MOVE_RQ, C_MOVE_RSP = 0x0021, 0x8021
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
C_CANCEL_RQ = 0x0FFF

NO_DATA_SET = 0x0101
HAS_DATA_SET = 0x0000

SUCCESS = 0x0000
PENDING = (0xFF00, 0xFF01)
SOP_CLASS_NOT_SUPPORTED = 0x0122
NOT_AUTHORIZED = 0x0124
IDENTIFIER_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
MOVE_DESTINATION_UNKNOWN = 0xA801
SUBOPS_WARNING = 0xB000

# ---- tags used by the tests (0xGGGGEEEE) ----

T = {
    "SpecificCharacterSet": 0x00080005,
    "SOPClassUID": 0x00080016,
    "SOPInstanceUID": 0x00080018,
    "StudyDate": 0x00080020,
    "StudyTime": 0x00080030,
    "AccessionNumber": 0x00080050,
    "QueryRetrieveLevel": 0x00080052,
    "Modality": 0x00080060,
    "ConversionType": 0x00080064,
    "ReferringPhysicianName": 0x00080090,
    "StudyDescription": 0x00081030,
    "ReferencedStudySequence": 0x00081110,
    "ReferencedSeriesSequence": 0x00081115,
    "ReferencedImageSequence": 0x00081140,
    "PatientName": 0x00100010,
    "PatientID": 0x00100020,
    "IssuerOfPatientID": 0x00100021,
    "PatientBirthDate": 0x00100030,
    "PatientSex": 0x00100040,
    "OtherPatientIDsSequence": 0x00101002,
    "StudyInstanceUID": 0x0020000D,
    "SeriesInstanceUID": 0x0020000E,
    "StudyID": 0x00200010,
    "SeriesNumber": 0x00200011,
    "InstanceNumber": 0x00200013,
    "SamplesPerPixel": 0x00280002,
    "PhotometricInterpretation": 0x00280004,
    "Rows": 0x00280010,
    "Columns": 0x00280011,
    "BitsAllocated": 0x00280100,
    "BitsStored": 0x00280101,
    "HighBit": 0x00280102,
    "PixelRepresentation": 0x00280103,
    "RequestAttributesSequence": 0x00400275,
    "ContentSequence": 0x0040A730,
    "PixelData": 0x7FE00010,
    "DigitalSignaturesSequence": 0xFFFAFFFA,
    "DataSetTrailingPadding": 0xFFFCFFFC,
}

ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF

# Explicit VR: these VRs have 2 reserved bytes and a 4-byte length; all others a 2-byte length.
LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


# ---- values and elements ----

def value_bytes(vr: str, value) -> bytes:
    """The bytes of a value as the VR writes it. Bytes are taken as they are (no padding);
    a str is ASCII padded to even length (NUL for UI, space otherwise); a list of str is
    joined with backslashes; an int (or list of ints) is packed for US, SS, UL, SL, AT."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        value = "\\".join(value)
    if isinstance(value, str):
        b = value.encode("latin-1")
        if len(b) % 2:
            b += b"\0" if vr == "UI" else b" "
        return b
    ints = [value] if isinstance(value, int) else list(value)
    fmt = {"US": "<H", "SS": "<h", "UL": "<I", "SL": "<i", "AT": "<HH"}[vr]
    if vr == "AT":
        return b"".join(struct.pack(fmt, v >> 16, v & 0xFFFF) for v in ints)
    return b"".join(struct.pack(fmt, v) for v in ints)


def tag_bytes(tag: int) -> bytes:
    return struct.pack("<HH", tag >> 16, tag & 0xFFFF)


def header(tag: int, vr: str | None, length: int, explicit: bool) -> bytes:
    """An element header: tag, (VR), declared length. Item and delimiter tags never have a VR."""
    if not explicit or vr is None or (tag >> 16) == 0xFFFE:
        return tag_bytes(tag) + struct.pack("<I", length)
    if vr in LONG_VRS:
        return tag_bytes(tag) + vr.encode() + b"\0\0" + struct.pack("<I", length)
    if length > 0xFFFF:
        raise ValueError(f"VR {vr} has a 2-byte length; {length:#x} does not fit (use a long VR)")
    return tag_bytes(tag) + vr.encode() + struct.pack("<H", length)


def element(tag: int, vr: str, value=b"", *, explicit: bool = False, length: int | None = None) -> bytes:
    """One element, its declared length `length` if given (whatever follows), else the value's."""
    v = value_bytes(vr, value)
    return header(tag, vr, len(v) if length is None else length, explicit) + v


def item(content: bytes, *, undefined: bool = True, length: int | None = None) -> bytes:
    """A sequence item around already encoded content: undefined length with an item
    delimiter (the default), or a defined length (`length` overrides what is declared)."""
    if undefined and length is None:
        return tag_bytes(ITEM) + struct.pack("<I", UNDEFINED) + content + tag_bytes(ITEM_DELIMITER) + b"\0\0\0\0"
    return tag_bytes(ITEM) + struct.pack("<I", len(content) if length is None else length) + content


def sequence(tag: int, items: list[bytes], *, explicit: bool = False, undefined: bool = True,
             length: int | None = None) -> bytes:
    """A sequence (VR SQ) of already encoded items (see `item`): undefined length with a
    sequence delimiter (the default), or a defined length."""
    body = b"".join(items)
    if undefined and length is None:
        return header(tag, "SQ", UNDEFINED, explicit) + body + tag_bytes(SEQUENCE_DELIMITER) + b"\0\0\0\0"
    return header(tag, "SQ", len(body) if length is None else length, explicit) + body


def nested_sequences(depth: int, innermost: bytes = b"", *, tag: int = T["ContentSequence"],
                     explicit: bool = False, undefined: bool = True) -> bytes:
    """`depth` sequences, each holding one item that holds the next; `innermost` (encoded
    elements) sits in the deepest item. Built iteratively, so any depth is cheap."""
    out = innermost
    for _ in range(depth):
        out = sequence(tag, [item(out, undefined=undefined)], explicit=explicit, undefined=undefined)
    return out


@dataclass
class E:
    """An element in an element list (see `encode`).

    value: bytes/str/int as `value_bytes` takes them; for VR "SQ" a list of items, each a
    list of elements (encoded recursively, undefined lengths unless `undefined` is False).
    length: the declared length, whatever the value (a lie, UNDEFINED, ...).
    raw: bytes written instead of the whole element (the tag is then only a label)."""

    tag: int
    vr: str
    value: object = b""
    length: int | None = None
    undefined: bool = True
    raw: bytes | None = None


def as_e(x) -> E:
    if isinstance(x, E):
        return x
    if isinstance(x, tuple):
        return E(*x)
    raise TypeError(f"not an element: {x!r}")


def encode(elements, *, explicit: bool = False) -> bytes:
    """Encodes a list of elements in exactly the order given. Entries are `E`, tuples
    (tag, vr, value[, length]) or bytes (written as they are)."""
    out = []
    for x in elements:
        if isinstance(x, (bytes, bytearray)):
            out.append(bytes(x))
            continue
        e = as_e(x)
        if e.raw is not None:
            out.append(e.raw)
        elif e.vr == "SQ" and isinstance(e.value, list):
            items = [item(encode(i, explicit=explicit), undefined=e.undefined) for i in e.value]
            out.append(sequence(e.tag, items, explicit=explicit, undefined=e.undefined, length=e.length))
        else:
            out.append(element(e.tag, e.vr, e.value, explicit=explicit, length=e.length))
    return b"".join(out)


def tag_of(x) -> int:
    """The tag of an element-list entry: an `E`, or a tuple whose first item is the tag
    (element tuples and command fields alike)."""
    return x.tag if isinstance(x, E) else x[0]


def replace(elements, tag: int, vr: str, value) -> list:
    """A copy of `elements` with the value of `tag` replaced (added in order when missing)."""
    out, done = [], False
    for x in elements:
        if tag_of(x) == tag and not done:
            out.append(E(tag, vr, value))
            done = True
        else:
            out.append(x)
    if not done:
        out = sorted(out + [E(tag, vr, value)], key=tag_of)
    return out


def repeat_before(elements, tag: int, vr: str, value) -> list:
    """A copy with a second `tag` element holding `value` written just BEFORE the existing
    one: a reader that keeps the first sees `value`, one that keeps the last sees the old."""
    out = []
    for x in elements:
        if tag_of(x) == tag:
            out.append(E(tag, vr, value))
        out.append(x)
    return out


def remove(elements, tag: int) -> list:
    return [x for x in elements if tag_of(x) != tag]


def insert_sorted(elements, *new) -> list:
    """A copy with `new` elements inserted at their place in ascending order (stable)."""
    return sorted(list(elements) + list(new), key=tag_of)


def swap(elements, tag_a: int, tag_b: int) -> list:
    """A copy with the elements of two tags exchanged in position (tags then out of order)."""
    out = list(elements)
    i = next(n for n, x in enumerate(out) if tag_of(x) == tag_a)
    j = next(n for n, x in enumerate(out) if tag_of(x) == tag_b)
    out[i], out[j] = out[j], out[i]
    return out


# ---- instances and identifiers ----

def instance_elements(patient_id: str, study: str, series: str, sop: str, *, sop_class: str = SECONDARY_CAPTURE,
                      pixels: bytes | None = None, rows: int = 8, columns: int = 8, issuer: str | None = None,
                      number: int = 1) -> list[E]:
    """A small Secondary Capture instance (the shape of dicomdata.make_instance) as a sorted
    element list; `pixels` defaults to rows*columns bytes. Encode with `encode`."""
    if pixels is None:
        pixels = bytes(i % 256 for i in range(rows * columns))
    els = [
        E(T["SpecificCharacterSet"], "CS", "ISO_IR 100"),
        E(T["SOPClassUID"], "UI", sop_class),
        E(T["SOPInstanceUID"], "UI", sop),
        E(T["StudyDate"], "DA", "20250101"),
        E(T["StudyTime"], "TM", "120000"),
        E(T["AccessionNumber"], "SH", f"ACC{number:04d}"),
        E(T["Modality"], "CS", "OT"),
        E(T["ConversionType"], "CS", "WSD"),
        E(T["StudyDescription"], "LO", "attack suite"),
        E(T["PatientName"], "PN", f"Test^{patient_id.strip()}"),
        E(T["PatientID"], "LO", patient_id),
        E(T["PatientBirthDate"], "DA", "19700101"),
        E(T["PatientSex"], "CS", "O"),
        E(T["StudyInstanceUID"], "UI", study),
        E(T["SeriesInstanceUID"], "UI", series),
        E(T["StudyID"], "SH", str(number)),
        E(T["SeriesNumber"], "IS", "1"),
        E(T["InstanceNumber"], "IS", str(number)),
        E(T["SamplesPerPixel"], "US", 1),
        E(T["PhotometricInterpretation"], "CS", "MONOCHROME2"),
        E(T["Rows"], "US", rows),
        E(T["Columns"], "US", columns),
        E(T["BitsAllocated"], "US", 8),
        E(T["BitsStored"], "US", 8),
        E(T["HighBit"], "US", 7),
        E(T["PixelRepresentation"], "US", 0),
        E(T["PixelData"], "OB", pixels),
    ]
    if issuer is not None:
        els = insert_sorted(els, E(T["IssuerOfPatientID"], "LO", issuer))
    return els


def identifier(level: str, **keys) -> list[E]:
    """A query/retrieve identifier as a sorted element list: QueryRetrieveLevel plus the
    named keys (PatientID, PatientName, StudyInstanceUID, SeriesInstanceUID,
    SOPInstanceUID); a value of None is left out, "" is a universal (return) key."""
    vrs = {"PatientID": "LO", "PatientName": "PN", "StudyInstanceUID": "UI", "SeriesInstanceUID": "UI",
           "SOPInstanceUID": "UI", "StudyDate": "DA", "Modality": "CS", "IssuerOfPatientID": "LO"}
    els = [E(T["QueryRetrieveLevel"], "CS", level)]
    for k, v in keys.items():
        if v is not None:
            els.append(E(T[k], vrs[k], v))
    return sorted(els, key=tag_of)


# ---- Part 10 files ----

def file_meta_elements(sop_class: str, sop_instance: str, transfer_syntax: str = EXPLICIT_LE) -> list[E]:
    """The file meta group (without its group length) as a sorted element list."""
    return [
        E(0x00020001, "OB", b"\0\1"),
        E(0x00020002, "UI", sop_class),
        E(0x00020003, "UI", sop_instance),
        E(0x00020010, "UI", transfer_syntax),
        E(0x00020012, "UI", IMPLEMENTATION_CLASS_UID),
        E(0x00020013, "SH", IMPLEMENTATION_VERSION),
    ]


def file_meta(elements, *, group_length: bool | int = True) -> bytes:
    """The file meta group, always Explicit VR LE: (0002,0000) with the right length first
    (group_length=True), none (False), or the given (wrong) value (an int)."""
    body = encode(elements, explicit=True)
    if group_length is False:
        return body
    n = len(body) if group_length is True else group_length
    return element(0x00020000, "UL", n, explicit=True) + body


def part10(meta: bytes, dataset: bytes, *, preamble: bytes = b"\0" * 128, magic: bytes = b"DICM") -> bytes:
    """A Part 10 file: preamble, magic, file meta group (see `file_meta`), data set."""
    return preamble + magic + meta + dataset


def part10_instance(elements, *, transfer_syntax: str = EXPLICIT_LE, meta_elements=None) -> bytes:
    """A Part 10 file of an instance element list, the meta group derived from it unless
    given. Only Implicit and Explicit VR LE data sets are encoded here."""
    els = [as_e(x) for x in elements if not isinstance(x, (bytes, bytearray))]
    sop_class = next((e.value for e in els if e.tag == T["SOPClassUID"]), SECONDARY_CAPTURE)
    sop = next((e.value for e in els if e.tag == T["SOPInstanceUID"]), "1.2.3")
    meta = file_meta(meta_elements or file_meta_elements(sop_class, sop, transfer_syntax))
    return part10(meta, encode(elements, explicit=transfer_syntax != IMPLICIT_LE))


# ---- command sets ----

# The VR of each command element (PS3.7 E.1), for value conversion.
COMMAND_VR = {
    0x0000: "UL", 0x0002: "UI", 0x0003: "UI", 0x0100: "US", 0x0110: "US", 0x0120: "US", 0x0600: "AE",
    0x0700: "US", 0x0800: "US", 0x0900: "US", 0x0901: "AT", 0x0902: "LO", 0x0903: "US", 0x1000: "UI",
    0x1001: "UI", 0x1002: "US", 0x1005: "AT", 0x1008: "US", 0x1020: "US", 0x1021: "US", 0x1022: "US",
    0x1023: "US", 0x1030: "AE", 0x1031: "US",
}

AFFECTED_SOP_CLASS = 0x0002
COMMAND_FIELD = 0x0100
MESSAGE_ID = 0x0110
RESPONDED_TO = 0x0120
MOVE_DESTINATION = 0x0600
PRIORITY = 0x0700
DATA_SET_TYPE = 0x0800
STATUS = 0x0900
AFFECTED_SOP_INSTANCE = 0x1000
REMAINING, COMPLETED, FAILED, WARNING = 0x1020, 0x1021, 0x1022, 0x1023
MOVE_ORIGINATOR_AE = 0x1030
MOVE_ORIGINATOR_ID = 0x1031


def command_set(fields, *, group_length: bool | int = True) -> bytes:
    """A command set in Implicit VR LE, elements in exactly the order given.

    fields: (element, value) pairs, element a group 0000 element number (0x0100) or a full
    tag (0x00080018) for an element outside the group; values as `value_bytes` takes them
    (bytes raw: any size); or bytes entries written as they are.
    group_length: True writes (0000,0000) first with the right length, False none, an int
    that (wrong) value."""
    body = []
    for f in fields:
        if isinstance(f, (bytes, bytearray)):
            body.append(bytes(f))
            continue
        el, value = f
        # (0000,eeee) as a 32-bit tag is the element number itself.
        vr = COMMAND_VR.get(el, "UN") if el <= 0xFFFF else "UN"
        body.append(element(el, vr, value))
    body = b"".join(body)
    if group_length is False:
        return body
    n = len(body) if group_length is True else group_length
    return element(0x00000000, "UL", n) + body


def c_echo_rq(message_id: int = 1, sop_class: str = VERIFICATION) -> list:
    return [(AFFECTED_SOP_CLASS, sop_class), (COMMAND_FIELD, C_ECHO_RQ), (MESSAGE_ID, message_id),
            (DATA_SET_TYPE, NO_DATA_SET)]


def c_find_rq(message_id: int, sop_class: str, priority: int = 0) -> list:
    return [(AFFECTED_SOP_CLASS, sop_class), (COMMAND_FIELD, C_FIND_RQ), (MESSAGE_ID, message_id),
            (PRIORITY, priority), (DATA_SET_TYPE, HAS_DATA_SET)]


def c_get_rq(message_id: int, sop_class: str, priority: int = 0) -> list:
    return [(AFFECTED_SOP_CLASS, sop_class), (COMMAND_FIELD, C_GET_RQ), (MESSAGE_ID, message_id),
            (PRIORITY, priority), (DATA_SET_TYPE, HAS_DATA_SET)]


def c_move_rq(message_id: int, sop_class: str, destination: str, priority: int = 0) -> list:
    return [(AFFECTED_SOP_CLASS, sop_class), (COMMAND_FIELD, C_MOVE_RQ), (MESSAGE_ID, message_id),
            (MOVE_DESTINATION, destination), (PRIORITY, priority), (DATA_SET_TYPE, HAS_DATA_SET)]


def c_store_rq(message_id: int, sop_class: str, sop_instance: str, priority: int = 0,
               originator_ae: str | None = None, originator_id: int | None = None) -> list:
    f = [(AFFECTED_SOP_CLASS, sop_class), (COMMAND_FIELD, C_STORE_RQ), (MESSAGE_ID, message_id),
         (PRIORITY, priority), (DATA_SET_TYPE, HAS_DATA_SET), (AFFECTED_SOP_INSTANCE, sop_instance)]
    if originator_ae is not None:
        f.append((MOVE_ORIGINATOR_AE, originator_ae))
    if originator_id is not None:
        f.append((MOVE_ORIGINATOR_ID, originator_id))
    return f


def c_store_rsp(responded_to: int, sop_class: str, sop_instance: str, status: int = SUCCESS) -> list:
    return [(AFFECTED_SOP_CLASS, sop_class), (COMMAND_FIELD, C_STORE_RSP), (RESPONDED_TO, responded_to),
            (DATA_SET_TYPE, NO_DATA_SET), (STATUS, status), (AFFECTED_SOP_INSTANCE, sop_instance)]


def parse_command(raw: bytes) -> dict:
    """A command set (Implicit VR LE) as {element: value}: US/UL as int, UI/AE/LO as str
    without padding, anything else as bytes. Elements of other groups are kept by full tag.
    A repeated element keeps its first value. Raises ValueError on a truncated element."""
    out, pos = {}, 0
    while pos < len(raw):
        if pos + 8 > len(raw):
            raise ValueError("truncated element header in command set")
        group, el, n = struct.unpack_from("<HHI", raw, pos)
        pos += 8
        if pos + n > len(raw):
            raise ValueError("element runs past the end of the command set")
        v = raw[pos:pos + n]
        pos += n
        key = el if group == 0 else (group << 16) | el
        if key in out:
            continue
        vr = COMMAND_VR.get(el) if group == 0 else None
        if vr == "US" and n == 2:
            out[key] = struct.unpack("<H", v)[0]
        elif vr == "UL" and n == 4:
            out[key] = struct.unpack("<I", v)[0]
        elif vr in ("UI", "AE", "LO"):
            out[key] = v.decode("latin-1").rstrip("\0 ").lstrip(" ")
        else:
            out[key] = v
    return out


# ---- PDUs ----

def _ae(title) -> bytes:
    """An AE title field: str (ASCII) or bytes, space padded to 16 bytes (longer is cut)."""
    b = title.encode("latin-1") if isinstance(title, str) else bytes(title)
    return b.ljust(16, b" ")[:16]


def _sub(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBI", kind, 0, len(body)) + body


def associate_rq(called, calling, contexts, *, token: str | bytes | None = None, identity_type: int = 5,
                 positive_response: bool = False, secondary: bytes = b"", max_length: int = 65536,
                 implementation_uid: str = IMPLEMENTATION_CLASS_UID,
                 implementation_version: str | None = IMPLEMENTATION_VERSION, roles=(),
                 application_context: str = APPLICATION_CONTEXT) -> bytes:
    """An A-ASSOCIATE-RQ.

    contexts: (id, abstract syntax, [transfer syntaxes]) triples, written in that order.
    token: the User Identity primary field (type 5, JWT, by default); None sends no identity.
    roles: (SOP class UID, scu, scp) for SCP/SCU Role Selection items (C-GET)."""
    items = [_sub(0x10, application_context.encode())]
    for pc_id, abstract, syntaxes in contexts:
        body = struct.pack(">BBBB", pc_id, 0, 0, 0) + _sub(0x30, abstract.encode())
        body += b"".join(_sub(0x40, ts.encode()) for ts in syntaxes)
        items.append(_sub(0x20, body))
    user = [_sub(0x51, struct.pack(">I", max_length)), _sub(0x52, implementation_uid.encode())]
    for uid, scu, scp in roles:
        user.append(_sub(0x54, struct.pack(">H", len(uid)) + uid.encode() + bytes([int(scu), int(scp)])))
    if implementation_version is not None:
        user.append(_sub(0x55, implementation_version.encode()))
    if token is not None:
        primary = token.encode() if isinstance(token, str) else token
        body = struct.pack(">BBH", identity_type, int(positive_response), len(primary)) + primary
        body += struct.pack(">H", len(secondary)) + secondary
        user.append(_sub(0x58, body))
    items.append(_sub(0x50, b"".join(user)))
    fixed = struct.pack(">HH", 1, 0) + _ae(called) + _ae(calling) + b"\0" * 32
    return pdu(0x01, fixed + b"".join(items))


def pdv(pc_id: int, data: bytes, *, command: bool, last: bool) -> bytes:
    """One Presentation Data Value item (PS3.8 9.3.5.1)."""
    control = (1 if command else 0) | (2 if last else 0)
    return struct.pack(">IBB", len(data) + 2, pc_id, control) + data


def p_data_tf(*pdvs: bytes) -> bytes:
    """A P-DATA-TF PDU of already encoded PDV items (see `pdv`), as many as given."""
    return pdu(0x04, b"".join(pdvs))


RELEASE_RQ = pdu(0x05, b"\0\0\0\0")
RELEASE_RP = pdu(0x06, b"\0\0\0\0")
ABORT = pdu(0x07, b"\0\0\0\0")


@dataclass
class AssociateAC:
    contexts: dict  # id -> (result, transfer syntax or None)
    max_length: int
    user_identity_response: bytes | None
    implementation_uid: str | None
    raw: bytes

    def accepted(self, pc_id: int) -> str | None:
        """The transfer syntax accepted for a context, or None when it was refused."""
        result, ts = self.contexts.get(pc_id, (None, None))
        return ts if result == 0 else None

    def result(self, pc_id: int) -> int | None:
        """0 acceptance, 1 user rejection, 2 no reason, 3 abstract syntax not supported,
        4 transfer syntaxes not supported."""
        return self.contexts.get(pc_id, (None, None))[0]


@dataclass
class AssociateRJ:
    result: int
    source: int
    reason: int


def parse_ac(body: bytes) -> AssociateAC:
    contexts, max_length, identity, impl = {}, 0, None, None
    pos = 68
    while pos + 4 <= len(body):
        kind, _, n = struct.unpack_from(">BBH", body, pos)
        v = body[pos + 4:pos + 4 + n]
        pos += 4 + n
        if kind == 0x21:
            pc_id, result = v[0], v[2]
            ts = None
            if len(v) >= 8 and v[4] == 0x40:
                (tn,) = struct.unpack_from(">H", v, 6)
                ts = v[8:8 + tn].decode().rstrip("\0")
            contexts[pc_id] = (result, ts)
        elif kind == 0x50:
            sp = 0
            while sp + 4 <= len(v):
                sk, _, sn = struct.unpack_from(">BBH", v, sp)
                sv = v[sp + 4:sp + 4 + sn]
                sp += 4 + sn
                if sk == 0x51:
                    (max_length,) = struct.unpack(">I", sv)
                elif sk == 0x52:
                    impl = sv.decode("latin-1").rstrip("\0")
                elif sk == 0x59:
                    (rn,) = struct.unpack_from(">H", sv, 0)
                    identity = sv[2:2 + rn]
    return AssociateAC(contexts, max_length, identity, impl, body)


# ---- the client ----

class Aborted(Exception):
    """The peer sent an A-ABORT."""

    def __init__(self, source: int, reason: int):
        super().__init__(f"A-ABORT (source {source}, reason {reason})")
        self.source, self.reason = source, reason


class Closed(Exception):
    """The peer closed (or reset) the connection without an A-ABORT."""


@dataclass
class Message:
    pc_id: int
    command: dict
    command_raw: bytes
    data: bytes | None = None

    @property
    def field(self) -> int:
        return self.command.get(COMMAND_FIELD)

    @property
    def status(self) -> int | None:
        return self.command.get(STATUS)

    @property
    def pending(self) -> bool:
        return self.status in PENDING


@dataclass
class Exchange:
    """What one DIMSE request brought back: every response in order (the last one final),
    and the C-STORE sub-operations received meanwhile (C-GET)."""

    responses: list = field(default_factory=list)
    stores: list = field(default_factory=list)  # Message with .data the instance

    @property
    def final(self) -> Message:
        return self.responses[-1]

    @property
    def status(self) -> int:
        return self.final.status

    @property
    def matches(self) -> list:
        return [m.data for m in self.responses if m.pending and m.data is not None]


class Association:
    """One connection to a DICOM Upper Layer peer, driven byte by byte.

    Typical use:

        a = Association(port)                     # connect (optionally from another source IP)
        ac = a.request(associate_rq(...))         # AssociateAC, or AssociateRJ
        a.send_message(1, command_set(c_echo_rq(1)))
        m = a.recv_message()                      # Message; Aborted / Closed when so
        a.release()
    """

    def __init__(self, port: int, host: str = "127.0.0.1", *, source: str | None = None, timeout: float = 20.0):
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.peer_max = 16384
        self.ac: AssociateAC | None = None
        self._pdvs: list = []  # received PDVs not yet consumed: (pc_id, control, data)

    # -- PDUs --

    def send(self, data: bytes):
        self.sock.sendall(data)

    def _read(self, n: int, timeout: float) -> bytes:
        self.sock.settimeout(timeout)
        buf = b""
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except (ConnectionResetError, BrokenPipeError) as e:
                raise Closed(str(e)) from e
            if not chunk:
                raise Closed("connection closed by the peer")
            buf += chunk
        return buf

    def recv_pdu(self, timeout: float | None = None) -> tuple[int, bytes]:
        """The next PDU as (type, body). An A-ABORT raises Aborted; EOF raises Closed."""
        t = self.timeout if timeout is None else timeout
        kind, _, n = struct.unpack(">BBI", self._read(6, t))
        body = self._read(n, t)
        if kind == 0x07:
            raise Aborted(body[2], body[3])
        return kind, body

    def request(self, rq: bytes, timeout: float | None = None):
        """Sends an A-ASSOCIATE-RQ; returns AssociateAC or AssociateRJ."""
        self.send(rq)
        kind, body = self.recv_pdu(timeout)
        if kind == 0x02:
            self.ac = parse_ac(body)
            self.peer_max = self.ac.max_length or 1 << 30
            return self.ac
        if kind == 0x03:
            return AssociateRJ(body[1], body[2], body[3])
        raise AssertionError(f"unexpected PDU type {kind:#x} in answer to an A-ASSOCIATE-RQ")

    # -- messages --

    def send_message(self, pc_id: int, command: bytes, data: bytes | None = None, *,
                     fragment: int | None = None, one_pdu: bool = False):
        """Sends a command (and its data set) on a context. Each is cut into PDVs of at most
        `fragment` bytes (default: what the peer's maximum PDU length allows). With one_pdu,
        every PDV of the message travels in a single P-DATA-TF (legal per PS3.8 9.3.5)."""
        size = fragment or max(1, self.peer_max - 6)
        pdvs = self.fragments(pc_id, command, command=True, size=size)
        if data is not None:
            pdvs += self.fragments(pc_id, data, command=False, size=size)
        if one_pdu:
            self.send(p_data_tf(*pdvs))
        else:
            self.send(b"".join(p_data_tf(p) for p in pdvs))

    @staticmethod
    def fragments(pc_id: int, data: bytes, *, command: bool, size: int) -> list[bytes]:
        """PDVs of `size` bytes at most, the last one flagged last."""
        chunks = [data[i:i + size] for i in range(0, len(data), size)] or [b""]
        return [pdv(pc_id, c, command=command, last=n == len(chunks) - 1) for n, c in enumerate(chunks)]

    def _next_pdv(self, timeout: float):
        while not self._pdvs:
            kind, body = self.recv_pdu(timeout)
            if kind == 0x06:
                raise Closed("A-RELEASE-RP while a message was expected")
            if kind == 0x05:
                self.send(RELEASE_RP)
                raise Closed("the peer released the association")
            if kind != 0x04:
                raise AssertionError(f"unexpected PDU type {kind:#x} while reading a message")
            pos = 0
            while pos < len(body):
                (n,) = struct.unpack_from(">I", body, pos)
                self._pdvs.append((body[pos + 4], body[pos + 5], body[pos + 6:pos + 4 + n]))
                pos += 4 + n
        return self._pdvs.pop(0)

    def recv_message(self, timeout: float | None = None) -> Message:
        """The next whole message: command fragments, then data fragments when the command
        says a data set follows."""
        t = self.timeout if timeout is None else timeout
        raw, pc_id = b"", None
        while True:
            pc_id, control, data = self._next_pdv(t)
            if not control & 1:
                raise AssertionError("data fragment where a command was expected")
            raw += data
            if control & 2:
                break
        cmd = parse_command(raw)
        msg = Message(pc_id, cmd, raw)
        if cmd.get(DATA_SET_TYPE, NO_DATA_SET) != NO_DATA_SET:
            data = b""
            while True:
                _, control, chunk = self._next_pdv(t)
                if control & 1:
                    raise AssertionError("command fragment inside a data set")
                data += chunk
                if control & 2:
                    break
            msg.data = data
        return msg

    def dimse(self, pc_id: int, command: bytes, data: bytes | None = None, *, timeout: float | None = None,
              store_status: int = SUCCESS, **send) -> Exchange:
        """Sends one request and reads until its final (non-pending) response. C-STORE
        requests the peer sends meanwhile (C-GET sub-operations) are kept and answered with
        `store_status`."""
        self.send_message(pc_id, command, data, **send)
        out = Exchange()
        while True:
            m = self.recv_message(timeout)
            if m.field == C_STORE_RQ:
                out.stores.append(m)
                rsp = c_store_rsp(m.command.get(MESSAGE_ID, 0), m.command.get(AFFECTED_SOP_CLASS, ""),
                                  m.command.get(AFFECTED_SOP_INSTANCE, ""), store_status)
                self.send_message(m.pc_id, command_set(rsp))
                continue
            out.responses.append(m)
            if not m.pending:
                return out

    def decode(self, m: Message):
        """The data set of a received message as a pydicom Dataset, read in the transfer
        syntax accepted for its context."""
        return decode_dataset(m.data, explicit=self.ac.accepted(m.pc_id) != IMPLICIT_LE)

    def echo(self, pc_id: int, message_id: int = 1) -> int:
        return self.dimse(pc_id, command_set(c_echo_rq(message_id))).status

    # -- ending --

    def release(self, timeout: float = 10.0):
        """A-RELEASE-RQ, then waits for the RP (other PDUs on the way are dropped)."""
        self.send(RELEASE_RQ)
        deadline = time.time() + timeout
        try:
            while time.time() < deadline:
                kind, _ = self.recv_pdu(max(0.1, deadline - time.time()))
                if kind == 0x06:
                    return
        finally:
            self.close()
        raise AssertionError("no A-RELEASE-RP")

    def abort(self):
        try:
            self.send(ABORT)
        except OSError:
            pass
        self.close()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def ended_by_peer(self, timeout: float = 10.0) -> str | None:
        """Waits for the peer to end the association: "abort" for an A-ABORT, "closed" for a
        closed connection, None if it is still open after `timeout` (PDUs that arrive
        meanwhile are dropped, except that a response message makes it return "message")."""
        deadline = time.time() + timeout
        while True:
            left = deadline - time.time()
            if left <= 0:
                return None
            try:
                kind, _ = self.recv_pdu(left)
            except Aborted:
                return "abort"
            except Closed:
                return "closed"
            except socket.timeout:
                return None
            if kind == 0x04:
                return "message"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---- reading what comes back ----

def decode_dataset(data: bytes, *, explicit: bool = False):
    """A data set received on a context (no file meta) as a pydicom Dataset."""
    import io

    from pydicom.filereader import read_dataset

    return read_dataset(io.BytesIO(data), is_implicit_VR=not explicit, is_little_endian=True)
