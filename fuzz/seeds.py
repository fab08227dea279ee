"""Seed corpora for the fuzz targets, made from real material with pydicom and pynetdicom.

Run with the project's virtualenv, from anywhere:

    .venv/bin/python fuzz/seeds.py            # (re)writes fuzz/corpus/<target>/
    .venv/bin/python fuzz/seeds.py --check    # exits 1 if the committed corpus is stale

Every seed is deterministic (fixed UIDs, fixed tokens), so running this again gives the same
files. `instances()` is shared with scripts/differential.py, which mutates these instances.
The input layout each target expects is described at the top of its fuzz_targets/*.rs file.
"""

import base64
import hashlib
import io
import json
import os
import struct
import sys
import warnings

warnings.simplefilter("ignore")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))

import pydicom  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.filebase import DicomBytesIO  # noqa: E402
from pydicom.filewriter import write_dataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import (  # noqa: E402
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
)

import dicomdata  # noqa: E402  (tests/integration/dicomdata.py)

SC = dicomdata.SECONDARY_CAPTURE
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
VERIFICATION = "1.2.840.10008.1.1"


class Uids:
    """Deterministic UIDs under 2.25 (so the corpus does not change from run to run)."""

    def __init__(self):
        self.n = 0

    def __call__(self, *_args, **_kwargs):
        self.n += 1
        return f"2.25.{1000 + self.n}"


UID = Uids()
# make_instance calls generate_uid() for the SOP Instance UID: make it deterministic too.
dicomdata.generate_uid = UID


# ---------------------------------------------------------------------------------------------
# DICOM material


def ds_bytes(ds, implicit=True):
    """A bare data set (no preamble, no meta), little endian."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def part10(ds, ts):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ts
    ds.file_meta = meta
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def base_dataset(pid="PAT-A", issuer=None, modality="OT"):
    study, series = UID(), UID()
    raw = dicomdata.make_instance(pid, study, series, 1, 1, 1, "20240115", modality=modality, issuer=issuer)
    return pydicom.dcmread(io.BytesIO(raw))


def item(**kw):
    d = Dataset()
    for k, v in kw.items():
        setattr(d, k, v)
    return d


def instances():
    """(name, bytes) of Part 10 instances covering what the strict reader meets."""
    out = []
    ds = base_dataset("PAT-A", issuer="HOSP-A")
    out.append(("sc_explicit", part10(ds, ExplicitVRLittleEndian)))

    ds = base_dataset("PAT-B")
    out.append(("sc_implicit", part10(ds, ImplicitVRLittleEndian)))

    # padded and multi-valued text, an issuer with spaces
    ds = base_dataset(" PAT-C ", issuer="ISSUER C ")
    out.append(("sc_padded_pid", part10(ds, ExplicitVRLittleEndian)))

    # nested sequences (defined lengths as pydicom writes them), a few levels deep
    ds = base_dataset("PAT-D", issuer="HOSP-D")
    inner = item(ReferencedSOPClassUID=SC, ReferencedSOPInstanceUID=UID())
    mid = item(ReferencedSeriesSequence=Sequence([item(SeriesInstanceUID=UID(), ReferencedInstanceSequence=Sequence([inner]))]))
    ds.ReferencedStudySequence = Sequence([mid, item(ReferencedSOPClassUID=SC, ReferencedSOPInstanceUID=UID())])
    ds.SourceImageSequence = Sequence([item(ReferencedSOPClassUID=SC, ReferencedSOPInstanceUID=UID())])
    out.append(("sc_sequences_explicit", part10(ds, ExplicitVRLittleEndian)))
    ds = pydicom.dcmread(io.BytesIO(out[-1][1]))
    del ds.file_meta
    out.append(("sc_sequences_implicit", part10(ds, ImplicitVRLittleEndian)))

    # private creator and private elements, one of them UN
    ds = base_dataset("PAT-E")
    ds.add_new(0x00090010, "LO", "PACSGATE FUZZ")
    ds.add_new(0x00091001, "LO", "private text")
    ds.add_new(0x00091002, "UN", b"\x01\x02\x03\x04")
    ds.add_new(0x00091003, "OB", b"\x00" * 16)
    out.append(("sc_private", part10(ds, ExplicitVRLittleEndian)))

    # encapsulated pixel data (JPEG Baseline, RLE): fragments the reader does not decode
    for name, ts in (("jpeg", JPEGBaseline8Bit), ("rle", RLELossless)):
        ds = base_dataset("PAT-F", issuer="HOSP-F", modality="CT")
        ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0" + bytes(60), b"\xff\xd8" + bytes(30)])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.NumberOfFrames = 2
        out.append((f"sc_{name}", part10(ds, ts)))

    # an element after the pixel data (DataSetTrailingPadding)
    ds = base_dataset("PAT-G")
    ds.add_new(0xFFFCFFFC, "OB", b"\x00" * 8)
    out.append(("sc_trailing_padding", part10(ds, ExplicitVRLittleEndian)))

    # no IssuerOfPatientID, a longer PatientID, other modality; a study without series text
    ds = base_dataset("1234567890-ABCDEFGHIJKLMNOPQRSTUVWXYZ-abcdefghijklmnopqrstuvwxyz", modality="MR")
    out.append(("sc_long_pid", part10(ds, ExplicitVRLittleEndian)))

    # syntaxes the gateway refuses (read only so the fuzzer sees their meta groups)
    ds = base_dataset("PAT-H")
    out.append(("sc_big_endian", part10(ds, ExplicitVRBigEndian)))
    ds = base_dataset("PAT-I")
    out.append(("sc_deflated", part10(ds, DeflatedExplicitVRLittleEndian)))
    return out


def find_identifier(level="STUDY", pid="PAT-A", **extra):
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    ds.PatientID = pid
    ds.StudyInstanceUID = ""
    for k, v in extra.items():
        setattr(ds, k, v)
    return ds


def identifiers():
    """Bare data sets (C-FIND/C-GET/C-MOVE identifiers and matches)."""
    out = []
    ds = find_identifier("STUDY", "PAT-A", StudyDate="20240101-20241231", ModalitiesInStudy="CT\\MR", PatientName="")
    out.append(("find_study", ds))
    out.append(("find_series", find_identifier("SERIES", "", SeriesInstanceUID="", Modality="")))
    out.append(("find_image", find_identifier("IMAGE", "*", SOPInstanceUID="", SeriesInstanceUID="2.25.77")))
    out.append(("find_patient_issuer", find_identifier("PATIENT", "PAT-A", IssuerOfPatientID="HOSP-A", TimezoneOffsetFromUTC="+0100")))
    get = Dataset()
    get.QueryRetrieveLevel = "SERIES"
    get.StudyInstanceUID = "2.25.1001"
    get.SeriesInstanceUID = "2.25.1002\\2.25.1003"
    out.append(("get_series", get))
    match = find_identifier("STUDY", "PAT-A", StudyDate="20240115", StudyDescription="Study 1")
    match.StudyInstanceUID = "2.25.1001"
    match.RetrieveAETitle = "ORTHANC"
    match.add_new(0x00081110, "SQ", Sequence([item(ReferencedSOPClassUID=SC, ReferencedSOPInstanceUID="2.25.9")]))
    out.append(("find_match", match))
    return out


def command_sets():
    """(name, bytes) of DIMSE command sets as pynetdicom encodes them."""
    out = []
    for name, msg in dimse_messages():
        # encode_msg sets the CommandGroupLength; only the command set is wanted here
        list(msg.encode_msg(1, 16384))
        out.append((name, ds_bytes(msg.command_set, implicit=True)))
    return out


def dimse_messages():
    from pynetdicom import dimse_primitives as P
    from pynetdicom.dimse_messages import (
        C_ECHO_RQ, C_ECHO_RSP, C_FIND_RQ, C_FIND_RSP, C_GET_RQ, C_GET_RSP, C_MOVE_RQ,
        C_MOVE_RSP, C_STORE_RQ, C_STORE_RSP, C_CANCEL_RQ, N_EVENT_REPORT_RQ,
    )

    def msg(cls, prim):
        m = cls()
        m.primitive_to_message(prim)
        return m

    out = []
    p = P.C_ECHO()
    p.MessageID = 1
    p.AffectedSOPClassUID = VERIFICATION
    out.append(("echo_rq", msg(C_ECHO_RQ, p)))
    p = P.C_ECHO()
    p.MessageIDBeingRespondedTo = 1
    p.AffectedSOPClassUID = VERIFICATION
    p.Status = 0
    out.append(("echo_rsp", msg(C_ECHO_RSP, p)))

    p = P.C_FIND()
    p.MessageID = 7
    p.AffectedSOPClassUID = STUDY_ROOT_FIND
    p.Priority = 0
    p.Identifier = io.BytesIO(ds_bytes(find_identifier()))
    out.append(("find_rq", msg(C_FIND_RQ, p)))
    for status in (0xFF00, 0x0000, 0xA900, 0x0124):
        p = P.C_FIND()
        p.MessageIDBeingRespondedTo = 7
        p.AffectedSOPClassUID = STUDY_ROOT_FIND
        p.Status = status
        if status == 0xFF00:
            p.Identifier = io.BytesIO(ds_bytes(find_identifier()))
        out.append((f"find_rsp_{status:04x}", msg(C_FIND_RSP, p)))

    p = P.C_MOVE()
    p.MessageID = 9
    p.AffectedSOPClassUID = STUDY_ROOT_MOVE
    p.Priority = 2
    p.MoveDestination = "STORESCP"
    p.Identifier = io.BytesIO(ds_bytes(find_identifier("STUDY", "", StudyInstanceUID="2.25.1001")))
    out.append(("move_rq", msg(C_MOVE_RQ, p)))
    p = P.C_MOVE()
    p.MessageIDBeingRespondedTo = 9
    p.AffectedSOPClassUID = STUDY_ROOT_MOVE
    p.Status = 0xFF00
    p.NumberOfRemainingSuboperations = 3
    p.NumberOfCompletedSuboperations = 1
    p.NumberOfFailedSuboperations = 0
    p.NumberOfWarningSuboperations = 0
    out.append(("move_rsp_pending", msg(C_MOVE_RSP, p)))

    p = P.C_GET()
    p.MessageID = 11
    p.AffectedSOPClassUID = STUDY_ROOT_GET
    p.Priority = 1
    p.Identifier = io.BytesIO(ds_bytes(find_identifier("SERIES", "", SeriesInstanceUID="2.25.1002")))
    out.append(("get_rq", msg(C_GET_RQ, p)))
    p = P.C_GET()
    p.MessageIDBeingRespondedTo = 11
    p.AffectedSOPClassUID = STUDY_ROOT_GET
    p.Status = 0xB000
    p.NumberOfRemainingSuboperations = 0
    p.NumberOfCompletedSuboperations = 2
    p.NumberOfFailedSuboperations = 1
    p.NumberOfWarningSuboperations = 0
    p.ErrorComment = "one withheld"
    out.append(("get_rsp_warning", msg(C_GET_RSP, p)))

    store = base_dataset("PAT-S")
    p = P.C_STORE()
    p.MessageID = 13
    p.AffectedSOPClassUID = SC
    p.AffectedSOPInstanceUID = store.SOPInstanceUID
    p.Priority = 0
    p.MoveOriginatorApplicationEntityTitle = "MOVESCU"
    p.MoveOriginatorMessageID = 9
    del store.file_meta
    p.DataSet = io.BytesIO(ds_bytes(store))
    out.append(("store_rq", msg(C_STORE_RQ, p)))
    p = P.C_STORE()
    p.MessageIDBeingRespondedTo = 13
    p.AffectedSOPClassUID = SC
    p.AffectedSOPInstanceUID = store.SOPInstanceUID
    p.Status = 0
    out.append(("store_rsp", msg(C_STORE_RSP, p)))

    p = P.C_CANCEL()
    p.MessageIDBeingRespondedTo = 7
    out.append(("cancel_rq", msg(C_CANCEL_RQ, p)))

    p = P.N_EVENT_REPORT()
    p.MessageID = 21
    p.AffectedSOPClassUID = "1.2.840.10008.1.20.1"
    p.AffectedSOPInstanceUID = "1.2.840.10008.1.20.1.1"
    p.EventTypeID = 1
    out.append(("n_event_report_rq", msg(N_EVENT_REPORT_RQ, p)))
    return out


def pdata_stream(messages, max_pdu, context_id=1):
    from pynetdicom.pdu import P_DATA_TF

    out = b""
    for m in messages:
        for prim in m.encode_msg(context_id, max_pdu):
            pdu = P_DATA_TF()
            pdu.from_primitive(prim)
            out += pdu.encode()
    return out


def association_rqs():
    from pynetdicom import build_context
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import (
        A_ASSOCIATE, AsynchronousOperationsWindowNegotiation, ImplementationClassUIDNotification,
        ImplementationVersionNameNotification, MaximumLengthNotification,
        SCP_SCU_RoleSelectionNegotiation, SOPClassExtendedNegotiation, UserIdentityNegotiation,
    )

    def rq(contexts, identity=None, extra=(), max_len=16382):
        a = A_ASSOCIATE()
        a.application_context_name = "1.2.840.10008.3.1.1.1"
        a.calling_ae_title = "FINDSCU"
        a.called_ae_title = "PACSGATE"
        for i, c in enumerate(contexts):
            c.context_id = 2 * i + 1
        a.presentation_context_definition_list = contexts
        ml = MaximumLengthNotification()
        ml.maximum_length_received = max_len
        ic = ImplementationClassUIDNotification()
        ic.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.3.0.4"
        iv = ImplementationVersionNameNotification()
        iv.implementation_version_name = "PYNETDICOM_304"
        items = [ml, ic, iv, *extra]
        if identity is not None:
            items.append(identity)
        a.user_information = items
        pdu = A_ASSOCIATE_RQ()
        pdu.from_primitive(a)
        return pdu.encode()

    def identity(kind, primary, secondary=None, positive=True):
        u = UserIdentityNegotiation()
        u.user_identity_type = kind
        u.positive_response_requested = positive
        u.primary_field = primary
        if secondary is not None:
            u.secondary_field = secondary
        return u

    def role(uid, scu, scp):
        r = SCP_SCU_RoleSelectionNegotiation()
        r.sop_class_uid = uid
        r.scu_role = scu
        r.scp_role = scp
        return r

    tok = jwts()[0][1].encode()
    all_ts = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, JPEGBaseline8Bit]
    find = lambda: build_context(STUDY_ROOT_FIND, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])  # noqa: E731
    out = [
        ("find_jwt", rq([find()], identity(5, tok))),
        ("find_jwt_newline", rq([find()], identity(5, tok + b"\n", positive=False))),
        ("find_passcode", rq([find(), build_context(VERIFICATION)], identity(2, b"user", tok))),
        ("username_only", rq([find()], identity(1, b"someone"))),
        ("no_identity", rq([find()])),
        ("empty_jwt", rq([find()], identity(5, b""))),
        ("store_many_syntaxes", rq(
            [build_context(SC, all_ts), build_context("1.2.840.10008.5.1.4.1.1.2", [DeflatedExplicitVRLittleEndian]), find()],
            identity(5, tok),
        )),
    ]
    aw = AsynchronousOperationsWindowNegotiation()
    aw.maximum_number_operations_invoked = 4
    aw.maximum_number_operations_performed = 4
    ext = SOPClassExtendedNegotiation()
    ext.sop_class_uid = STUDY_ROOT_FIND
    ext.service_class_application_information = b"\x01\x01\x00\x00"
    out.append(("get_roles_async_ext", rq(
        [build_context(STUDY_ROOT_GET), build_context(SC, [ExplicitVRLittleEndian]), find()],
        identity(5, tok),
        extra=[aw, role(SC, False, True), ext],
        max_len=0,
    )))
    return out


# ---------------------------------------------------------------------------------------------
# Tokens


def b64u(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def jwt(header, claims, sig=b"\x01" * 64):
    h = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    c = claims if isinstance(claims, bytes) else json.dumps(claims, separators=(",", ":")).encode()
    return f"{b64u(h)}.{b64u(c)}.{b64u(sig)}"


def jwts():
    claims = {
        "iss": "http://127.0.0.1:9400",
        "sub": "Patient/DEMO-B",
        "aud": "http://127.0.0.1:8042/dicom-web",
        "client_id": "viewer",
        "exp": 4102444800,
        "iat": 1700000000,
        "scope": "launch/patient patient/ImagingStudy.rs",
        "patient": "DEMO-B",
        "fhirUser": "Practitioner/7",
    }
    return [
        ("rs256", jwt({"alg": "RS256", "typ": "at+jwt", "kid": "k1"}, claims)),
        ("es256", jwt({"alg": "ES256", "typ": "at+jwt", "kid": "k2"}, claims)),
        ("ps384", jwt({"alg": "PS384", "typ": "JWT"}, dict(claims, aud=["a", "b"]))),
        ("none", jwt({"alg": "none"}, claims, sig=b"")),
        ("hs256", jwt({"alg": "HS256", "typ": "at+jwt"}, claims)),
        ("jku", jwt({"alg": "RS256", "jku": "http://evil/jwks", "x5u": "http://evil/x5u", "jwk": {"kty": "RSA", "n": "AQAB", "e": "AQAB"}}, claims)),
        ("no_iss", jwt({"alg": "RS256"}, {k: v for k, v in claims.items() if k != "iss"})),
        ("iss_number", jwt({"alg": "RS256"}, dict(claims, iss=7))),
        ("padded_b64", jwt({"alg": "RS256"}, claims).replace(".", "==.", 1)),
        ("auth_details", jwt({"alg": "ES384", "typ": "at+jwt"}, dict(claims, authorization_details=[{"type": "smart_imaging", "locations": ["http://127.0.0.1:8042"]}], fhirContext=[{"reference": "ImagingStudy/1"}]))),
        ("not_json", jwt(b"{\"alg\":", b"[1,2")),
        ("opaque", "2YotnFZFEjr1zCsicMWpAA"),
        ("dotted_opaque", "a.b.c"),
        ("whitespace", " " + jwt({"alg": "RS256"}, claims) + "\r\n"),
    ]


# ---------------------------------------------------------------------------------------------
# Corpus writing


def corpus():
    """{target: [(name, bytes)]}."""
    c = {}

    # strict_reader: [split seed, flags, bytes]; flags bit0 explicit, bit1 encapsulated,
    # bits 2-3 scope (0 data set, 1 command, 2 file meta), bits 4-7 depth (>=3: default 16)
    sr = []
    for i, (name, raw) in enumerate(instances()):
        explicit = 0 if "implicit" in name else 1
        encap = 2 if name in ("sc_jpeg", "sc_rle") else 0
        sr.append((name, bytes([i * 37 % 256, 0xF0 | encap | explicit]) + raw))
        # the same instance's data set alone (InstanceReader::dataset, DataSet::read)
        ds = pydicom.dcmread(io.BytesIO(raw))
        if name not in ("sc_big_endian", "sc_deflated"):
            body = raw[132 + 12 + struct.unpack_from("<I", raw, 140)[0]:]
            sr.append((name + "_dataset", bytes([i * 53 % 256, 0xF0 | encap | explicit]) + body))
        del ds
    for i, (name, ds) in enumerate(identifiers()):
        sr.append((name + "_implicit", bytes([i, 0xF0]) + ds_bytes(ds, True)))
        sr.append((name + "_explicit", bytes([i + 100, 0xF1]) + ds_bytes(ds, False)))
    # nesting at the depth limits (depth variants 0, 1 and 3)
    deep = Dataset()
    cur = deep
    for _ in range(4):
        nxt = Dataset()
        nxt.ReferencedSOPInstanceUID = "2.25.5"
        cur.ReferencedSeriesSequence = Sequence([nxt])
        cur = nxt
    for flags in (0x01, 0x11, 0x21, 0x31):
        sr.append((f"deep_{flags:02x}", bytes([3, flags]) + ds_bytes(deep, False)))
    for name, raw in command_sets()[:6]:
        sr.append(("command_" + name, bytes([5, 0xF4]) + raw))
    meta_raw = instances()[0][1]
    meta = meta_raw[132:144 + struct.unpack_from("<I", meta_raw, 140)[0]]
    sr.append(("file_meta", bytes([9, 0xF9]) + meta))
    c["strict_reader"] = sr

    cmds = command_sets()
    c["command_decode"] = list(cmds)
    # a PACS command with a tail of another group (what decode_with_tail exists for)
    get_rsp = dict(cmds)["get_rsp_warning"]
    tail = struct.pack("<HHI", 0x0008, 0x0058, 10) + b"2.25.1001\0"
    c["command_decode"].append(("get_rsp_with_tail", get_rsp + tail))

    c["association_rq"] = association_rqs()

    msgs = dict(dimse_messages())
    pd = []
    for flags, names, max_pdu in (
        (2, ["echo_rq"], 16384),
        (2, ["find_rq"], 16384),
        (2, ["find_rq"], 64),
        (6, ["find_rsp_ff00", "find_rsp_ff00", "find_rsp_0000"], 128),
        (2, ["store_rq"], 256),
        (6, ["get_rsp_warning", "move_rsp_pending"], 16384),
        (1, ["move_rq", "cancel_rq"], 48),
        (0, ["echo_rq", "echo_rq"], 16384),
    ):
        stream = pdata_stream([msgs[n] for n in names], max_pdu)
        pd.append(("_".join(names) + f"_{max_pdu}", bytes([flags]) + stream))
    # a command and its first data fragments in one P-DATA-TF (PS3.8 9.3.5)
    find_cmd = dict(cmds)["find_rq"]
    ident = ds_bytes(find_identifier())
    items = b"".join(struct.pack(">IBB", len(d) + 2, 1, ctl) + d for ctl, d in ((3, find_cmd), (0, ident[:10]), (2, ident[10:])))
    pd.append(("one_pdu_command_and_data", bytes([2]) + struct.pack(">BBI", 4, 0, len(items)) + items))
    pd.append(("release_between", bytes([2]) + pdata_stream([msgs["echo_rq"]], 16384) + bytes([5, 0, 0, 0, 0, 4, 0, 0, 0, 0])))
    c["pdata_reassembly"] = pd

    s, r, i = "1.2.840.113619.2.55.3.604688119.969.1268071029.320", "2.25.1002", "2.25.1003"
    paths = [
        "studies", "series", "instances",
        f"studies/{s}", f"studies/{s}/series", f"studies/{s}/instances", f"studies/{s}/metadata",
        f"studies/{s}/rendered", f"studies/{s}/thumbnail",
        f"studies/{s}/series/{r}", f"studies/{s}/series/{r}/instances", f"studies/{s}/series/{r}/metadata",
        f"studies/{s}/series/{r}/instances/{i}", f"studies/{s}/series/{r}/instances/{i}/frames/1,2,10",
        f"studies/{s}/series/{r}/instances/{i}/rendered", f"studies/{s}/series/{r}/instances/{i}/bulk/7fe00010/0",
        f"studies/{s}/series/{r}/instances/{i}/thumbnail",
        "studies?PatientID=PAT-A&includefield=00100010&includefield=StudyDescription&limit=10&offset=0",
        "studies?00100020=PAT%2DA&StudyDate=20240101-20241231&ModalitiesInStudy=CT%5CMR&fuzzymatching=false",
        f"studies/{s}/series?Modality=CT&SeriesDescription=*head*",
        "instances?PatientName=DOE%5EJ*&SOPClassUID=1.2.840.10008.5.1.4.1.1.2&a+b=c+d",
        "studies/%2e%2e/series", "studies//series", "studies/../studies", "studies/1.02.3",
        "studies?x=%zz&y=%C3%A9&z=%E2%82%AC", "?&&=&a=b=c&",
    ]
    c["dicomweb_path"] = [(f"path_{n:02d}", p.encode()) for n, p in enumerate(paths)]

    def delim(boundary, seed, stream):
        braw = bytes((ord(ch) - 0x20) for ch in boundary)
        return bytes([len(boundary) - 1, seed]) + braw + stream

    b = "pacsgate-0123456789abcdef0123456789abcdef"
    body = b"\r\n--" + b.encode()
    md = [
        ("found_middle", delim(b, 7, b"DICM" * 40 + body + b"\r\nContent-Type: application/dicom\r\n\r\n" + b"x" * 50)),
        ("found_start", delim(b, 0, body + b"--\r\n")),
        ("near_miss", delim(b, 3, b"\r\n-" + b.encode() + b"\r\n--pacsgate-0" + b"\r\n--" + b.encode()[:-1])),
        ("twice", delim(b, 200, b"ab" + body + b"cd" * 30 + body)),
        ("short_boundary", delim("b", 9, b"\r\n-\r\n--b\r\n--b--")),
        ("overlapping", delim("aa", 11, b"\r\n--a\r\n--aa\r\n--aaa")),
        ("rfc_chars", delim("simple boundary'()+_,-./:=?", 17, b"preamble\r\n--simple boundary'()+_,-./:=?\r\nbody")),
        ("none", delim(b, 250, bytes(range(256)))),
    ]
    c["multipart_delimiter"] = md

    scopes = [
        "patient/ImagingStudy.rs", "patient/ImagingStudy.read", "patient/*.read", "patient/*.*",
        "user/ImagingStudy.cruds system/*.rs", "openid fhirUser launch/patient offline_access patient/Patient.r",
        "patient/ImagingStudy.rs?modality=CT,MR", "patient/ImagingStudy.rs?modality=http://dicom.nema.org/resources/ontology/DCM|CT",
        "patient/ImagingStudy.rs?started=ge2023-01&modality=MR", "patient/ImagingStudy.rs?started=2024-02-29,lt2020,sa2019-12-31,eb2030",
        "patient/ImagingStudy.rs?identifier=urn:oid:1.2.840.113619.2.55.3.604688119",
        "patient/ImagingStudy.rs?identifier=urn:dicom:uid|urn:oid:2.25.1001,urn:oid:2.25.7",
        "patient/ImagingStudy.rs?started=ap2020", "patient/ImagingStudy.sr patient/ImagingStudy.rr patient/ImagingStudy.",
        "patient/ImagingStudy.rs?started=2023-02-29 patient/ImagingStudy.rs?modality=%43T",
        "patient/ImagingStudy.rs?category=x patient/ImagingStudy.rs? patient/ImagingStudy.rs?=x",
        "\tpatient/ImagingStudy.rs\r\nuser/*.write  system/Observation.s",
    ]
    c["smart_scope"] = [(f"scope_{n:02d}", s.encode()) for n, s in enumerate(scopes)]
    c["jwt_preflight"] = [(n, t.encode()) for n, t in jwts()]
    return c


def main():
    check = "--check" in sys.argv
    stale = []
    for target, seeds in corpus().items():
        d = os.path.join(HERE, "corpus", target)
        os.makedirs(d, exist_ok=True)
        wanted = {}
        for name, data in seeds:
            assert len(data) < 20 * 1024, (target, name, len(data))
            wanted[f"{name}-{hashlib.sha1(data).hexdigest()[:8]}"] = data
        have = set(os.listdir(d))
        if check:
            if have != set(wanted):
                stale.append(target)
            continue
        for f in have - set(wanted):
            os.remove(os.path.join(d, f))
        for f, data in wanted.items():
            with open(os.path.join(d, f), "wb") as fh:
                fh.write(data)
        print(f"{target}: {len(wanted)} seeds")
    if stale:
        print("stale corpus:", ", ".join(stale))
        sys.exit(1)


if __name__ == "__main__":
    main()
