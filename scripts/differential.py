"""Differential check of the strict DICOM reader against DCMTK.

    .venv/bin/python scripts/differential.py [--count N] [--seed S] [--no-build] [--keep DIR]

Generates Part 10 inputs from the seed instances of fuzz/seeds.py and mutations of them (byte
flips, repeated, reordered and moved elements, changed lengths, nested and UN sequences, group
0002 in the data set, odd UIDs, mismatched meta groups, ...), reads each with the strict reader
(examples/strict_dump.rs: InstanceReader::part10, as STOW-RS and WADO read instances) and
with DCMTK's dcmdump, and for every input the strict reader ACCEPTS compares PatientID,
IssuerOfPatientID, StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID and SOPClassUID with
the top-level values dcmdump shows. Text values are compared without their padding spaces (as
LO values are), UIDs without their trailing NUL; an absent UID and an empty one are the same.
An input the strict reader accepts and DCMTK cannot read, or reads to other values, is a
failure: it is printed and saved under fuzz/diff-out/failures/ (exit 1).

Needs /usr/bin/dcmdump (Debian: dcmtk) and the project's .venv (pydicom, pynetdicom).
"""

import argparse
import collections
import concurrent.futures
import io
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zlib

warnings.simplefilter("ignore")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ = os.path.join(ROOT, "fuzz")
sys.path.insert(0, FUZZ)

import pydicom  # noqa: E402
from pydicom.filebase import DicomBytesIO  # noqa: E402
from pydicom.filewriter import write_data_element  # noqa: E402

import seeds  # noqa: E402  (fuzz/seeds.py)

IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
UNDEF = 0xFFFFFFFF
LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}

PATIENT_ID = 0x00100020
ISSUER = 0x00100021
STUDY = 0x0020000D
SERIES = 0x0020000E
SOP_INSTANCE = 0x00080018
SOP_CLASS = 0x00080016
KEYS = {
    "PatientID": (PATIENT_ID, "LO"),
    "IssuerOfPatientID": (ISSUER, "LO"),
    "StudyInstanceUID": (STUDY, "UI"),
    "SeriesInstanceUID": (SERIES, "UI"),
    "SOPInstanceUID": (SOP_INSTANCE, "UI"),
    "SOPClassUID": (SOP_CLASS, "UI"),
}
PIXEL_DATA = 0x7FE00010


# ---------------------------------------------------------------------------------------------
# Encoding


def pad(value, vr):
    if len(value) % 2:
        value += b"\0" if vr == "UI" else b" "
    return value


def ex(tag, vr, value=b"", length=None):
    """An explicit VR little endian element; `length` overrides the length field."""
    n = len(value) if length is None else length
    h = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode()
    if vr in LONG_VRS:
        h += b"\0\0" + struct.pack("<I", n)
    else:
        h += struct.pack("<H", n & 0xFFFF)
    return h + value


def im(tag, value=b"", length=None):
    n = len(value) if length is None else length
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, n) + value


def el(doc, tag, vr, value, length=None):
    return im(tag, value, length) if doc.implicit else ex(tag, vr, value, length)


def item(content, undefined=False):
    if undefined:
        return struct.pack("<HHI", 0xFFFE, 0xE000, UNDEF) + content + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(content)) + content


def seq(tag, items, implicit, undefined=False, vr="SQ"):
    body = b"".join(items)
    if undefined:
        body += struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
        n = UNDEF
    else:
        n = len(body)
    if implicit:
        return im(tag, body, n)
    return ex(tag, vr, body, n)


class Doc:
    """A Part 10 file as lists of raw top-level elements, so mutations can work on elements."""

    def __init__(self, meta, body, implicit, ts):
        self.meta = list(meta)  # [(tag, bytes)] without the group length
        self.body = list(body)  # [(tag, bytes)]
        self.implicit = implicit
        self.ts = ts
        self.group_length = None  # override

    def copy(self):
        d = Doc(self.meta, self.body, self.implicit, self.ts)
        d.group_length = self.group_length
        return d

    def set_meta(self, tag, value):
        raw = ex(tag, "UI", pad(value, "UI"))
        self.meta = [(t, raw if t == tag else b) for t, b in self.meta]

    def index(self, tag):
        for i, (t, _) in enumerate(self.body):
            if t == tag:
                return i
        return None

    def insert_sorted(self, tag, raw):
        i = next((i for i, (t, _) in enumerate(self.body) if t > tag), len(self.body))
        self.body.insert(i, (tag, raw))

    def replace(self, tag, raw):
        i = self.index(tag)
        if i is None:
            self.insert_sorted(tag, raw)
        else:
            self.body[i] = (tag, raw)

    def bytes(self):
        meta = b"".join(b for _, b in self.meta)
        gl = len(meta) if self.group_length is None else self.group_length
        return b"\0" * 128 + b"DICM" + ex(0x00020000, "UL", struct.pack("<I", gl)) + meta + b"".join(b for _, b in self.body)


def encode_element(elem, implicit):
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    write_data_element(fp, elem)
    return fp.getvalue()


def doc_of(raw):
    ds = pydicom.dcmread(io.BytesIO(raw))
    ts = str(ds.file_meta.TransferSyntaxUID)
    implicit = ts == IMPLICIT
    meta = [(e.tag, encode_element(e, False)) for e in ds.file_meta if e.tag != 0x00020000]
    body = [(e.tag, encode_element(e, implicit)) for e in ds]
    return Doc(meta, body, implicit, ts)


def reencode(doc, implicit):
    """The same body in the other encoding (for meta/body mismatches)."""
    raw = doc.bytes()
    ds = pydicom.dcmread(io.BytesIO(raw))
    return [(e.tag, encode_element(e, implicit)) for e in ds]


# ---------------------------------------------------------------------------------------------
# Mutations: each takes (doc, rng) and returns a Doc or raw bytes.


def m_identity(d, r):
    return d


def m_flip(d, r):
    b = bytearray(d.bytes())
    for _ in range(r.randint(1, 4)):
        # mostly in the data set, where the values are
        i = r.randrange(132, len(b)) if r.random() < 0.9 else r.randrange(len(b))
        b[i] = r.choice([b[i] ^ (1 << r.randrange(8)), r.randrange(256), 0x20, 0x00, 0x5C, 0x2E, 0x30 + r.randrange(10)])
    return bytes(b)


def m_flip_in_key(d, r):
    """A flip inside one of the six judged values (what decides ownership)."""
    name = r.choice(list(KEYS))
    tag, _ = KEYS[name]
    i = d.index(tag)
    if i is None:
        return m_flip(d, r)
    raw = bytearray(d.body[i][1])
    hdr = 8
    if len(raw) > hdr:
        j = r.randrange(hdr, len(raw))
        raw[j] = r.choice([0x20, 0x00, 0x5C, 0x2E, 0x30 + r.randrange(10), ord("A") + r.randrange(26), raw[j] ^ 1])
    d.body[i] = (tag, bytes(raw))
    return d


def m_repeat_same(d, r):
    i = r.randrange(len(d.body))
    d.body.insert(i + 1, d.body[i])
    return d


def m_repeat_other(d, r, last=None):
    name = r.choice(list(KEYS))
    tag, vr = KEYS[name]
    i = d.index(tag)
    other = b"EVIL-PATIENT" if vr == "LO" else b"2.25.666"
    new = (tag, el(d, tag, vr, pad(other, vr)))
    if i is None:
        d.insert_sorted(*new)
    elif last if last is not None else r.random() < 0.5:
        d.body.insert(i + 1, new)  # the other value last
    else:
        d.body.insert(i, new)  # the other value first
    return d


def m_repeat_other_first(d, r):
    return m_repeat_other(d, r, last=False)


def m_repeat_other_last(d, r):
    return m_repeat_other(d, r, last=True)


def m_swap(d, r):
    if len(d.body) > 2:
        i = r.randrange(len(d.body) - 1)
        d.body[i], d.body[i + 1] = d.body[i + 1], d.body[i]
    return d


def m_key_out_of_order(d, r):
    tag, _ = KEYS[r.choice(list(KEYS))]
    i = d.index(tag)
    if i is not None and i > 0:
        e = d.body.pop(i)
        d.body.insert(r.randrange(0, i), e)
    return d


def m_after_pixel(d, r):
    """A judged element moved, or a second copy put, after the pixel data."""
    name = r.choice(list(KEYS))
    tag, vr = KEYS[name]
    i = d.index(tag)
    if i is None:
        return d
    if r.random() < 0.5:
        d.body.append(d.body.pop(i))
    else:
        other = b"EVIL-PATIENT" if vr == "LO" else b"2.25.666"
        d.body.append((tag, el(d, tag, vr, pad(other, vr))))
    return d


def m_trailing_elements(d, r):
    """Legal elements after the pixel data (padding, a private group)."""
    d.body.append((0x7FE10010, el(d, 0x7FE10010, "OB", b"\0\1\2\3")))
    d.body.append((0xFFFCFFFC, el(d, 0xFFFCFFFC, "OB", b"\0" * 6)))
    return d


def _length_field(raw, implicit):
    """(offset, size) of an element's length field."""
    if implicit:
        return 4, 4
    vr = raw[4:6].decode("latin1")
    return (8, 4) if vr in LONG_VRS else (6, 2)


def m_length(d, r):
    i = r.randrange(len(d.body))
    tag, raw = d.body[i]
    off, size = _length_field(raw, d.implicit)
    fmt = "<I" if size == 4 else "<H"
    (n,) = struct.unpack_from(fmt, raw, off)
    if n == UNDEF:
        return d
    new = r.choice([n + 1, n - 1, n + 2, n - 2, n + 100, 0, (1 << (8 * size)) - 2, n * 2])
    new = max(0, min(new, (1 << (8 * size)) - 1))
    raw = raw[:off] + struct.pack(fmt, new) + raw[off + size:]
    d.body[i] = (tag, raw)
    return d


def m_length_beyond_end(d, r):
    tag, raw = d.body[-1]
    off, size = _length_field(raw, d.implicit)
    fmt = "<I" if size == 4 else "<H"
    (n,) = struct.unpack_from(fmt, raw, off)
    if n != UNDEF:
        raw = raw[:off] + struct.pack(fmt, min(n + r.choice([2, 4, 1000]), (1 << (8 * size)) - 2)) + raw[off + size:]
        d.body[-1] = (tag, raw)
    return d


def m_odd(d, r):
    """An odd-length value (one padding byte dropped, or a value of odd length as DCMTK allows)."""
    name = r.choice(list(KEYS) + ["StudyDescription"])
    tag, vr = KEYS.get(name, (0x00081030, "LO"))
    v = b"2.25.12345" if vr == "UI" else b"ODD"
    if vr == "UI":
        v = v + b"7"  # 11 bytes
    d.replace(tag, el(d, tag, vr, v))
    return d


def nested(d, depth, undefined, content):
    """`depth` sequences nested in one another, the innermost item holding `content`."""
    inner = item(content, undefined)
    for k in range(depth):
        tag = 0x00081115 if k % 2 == 0 else 0x00081140  # ReferencedSeries / ReferencedImage
        s = seq(tag, [inner], d.implicit, undefined)
        inner = item(s, undefined) if k + 1 < depth else s
    return inner


def evil_item_content(d):
    return el(d, PATIENT_ID, "LO", b"EVIL-PATIENT") + el(d, ISSUER, "LO", b"EVIL") + el(d, STUDY, "UI", pad(b"2.25.666", "UI"))


def m_nested_deep(d, r):
    depth = r.choice([1, 2, 3, 8, 15, 16, 17, 20])
    raw = nested(d, depth, r.random() < 0.5, evil_item_content(d))
    # the outermost is ReferencedSeriesSequence or ReferencedImageSequence
    outer = 0x00081115 if (depth - 1) % 2 == 0 else 0x00081140
    d.replace(outer, raw)
    return d


def m_other_patient_ids(d, r):
    """OtherPatientIDsSequence, whose items hold PatientID and IssuerOfPatientID."""
    undefined = r.random() < 0.5
    items = [item(evil_item_content(d), undefined) for _ in range(r.randint(1, 3))]
    d.replace(0x00101002, seq(0x00101002, items, d.implicit, undefined))
    return d


def m_un_undefined(d, r):
    """UN of undefined length (implicit VR inside, CP-246), private or standard, holding judged tags."""
    content = im(PATIENT_ID, b"EVIL-PATIENT") + im(STUDY, pad(b"2.25.666", "UI"))
    body = item(content, r.random() < 0.5) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    tag = r.choice([0x00091010, 0x00101002, 0x00081115, 0x00191001])
    if tag & 0x00010000:
        d.insert_sorted(tag & 0xFFFF0000 | 0x0010, el(d, tag & 0xFFFF0000 | 0x0010, "LO", b"FUZZ CREATOR"))
    raw = ex(tag, "UN", body, UNDEF) if not d.implicit else im(tag, body, UNDEF)
    d.replace(tag, raw)
    return d


def m_un_key(d, r):
    """A judged attribute encoded as UN (or another VR) in explicit VR."""
    name = r.choice(list(KEYS))
    tag, vr = KEYS[name]
    i = d.index(tag)
    if i is None or d.implicit:
        return d
    raw = d.body[i][1]
    off, size = _length_field(raw, False)
    value = raw[off + size:]
    d.body[i] = (tag, ex(tag, r.choice(["UN", "SH", "LT", "OB", "CS"]), value))
    return d


def m_undefined_nonsq(d, r):
    """An element that is not a sequence, given an undefined length and items inside."""
    tag = r.choice([0x00100010, 0x00081030, 0x00091001])
    content = item(evil_item_content(d), True) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    raw = im(tag, content, UNDEF) if d.implicit else ex(tag, r.choice(["LO", "UN", "OB"]), content, UNDEF)
    d.replace(tag, raw)
    return d


def m_group2_in_dataset(d, r):
    tag = r.choice([0x00020010, 0x00020003, 0x00020002, 0x00020000])
    vr = "UL" if tag == 0x00020000 else "UI"
    v = struct.pack("<I", 0) if vr == "UL" else pad(r.choice([b"1.2.840.10008.1.2.1.99", b"2.25.666"]), "UI")
    d.body.insert(0, (tag, el(d, tag, vr, v)))
    return d


def m_group_length(d, r):
    """Retired group length elements with arbitrary values."""
    for g in (0x0008, 0x0010, 0x0020):
        if r.random() < 0.6:
            d.insert_sorted(g << 16, el(d, g << 16, "UL", struct.pack("<I", r.choice([0, 4, 10, 1000, 0xFFFFFFF0]))))
    return d


def m_uid_leading_space(d, r):
    name = r.choice([k for k, (_, vr) in KEYS.items() if vr == "UI"])
    tag, _ = KEYS[name]
    i = d.index(tag)
    if i is None:
        return d
    raw = d.body[i][1]
    off, size = _length_field(raw, d.implicit)
    v = raw[off + size:].rstrip(b"\0")
    d.body[i] = (tag, el(d, tag, "UI", pad(r.choice([b" " + v, v + b" ", b"  " + v, v + b"\0\0"]), "UI")))
    return d


def m_uid_multi(d, r):
    name = r.choice([k for k, (_, vr) in KEYS.items() if vr == "UI"])
    tag, _ = KEYS[name]
    i = d.index(tag)
    if i is None:
        return d
    raw = d.body[i][1]
    off, size = _length_field(raw, d.implicit)
    v = raw[off + size:].rstrip(b"\0")
    d.body[i] = (tag, el(d, tag, "UI", pad(r.choice([v + b"\\2.25.666", b"2.25.666\\" + v, v + b"\\"]), "UI")))
    return d


def m_text_values(d, r):
    """PatientID / IssuerOfPatientID with padding, NULs, backslashes, empty or space-only values."""
    tag = r.choice([PATIENT_ID, ISSUER])
    v = r.choice([
        b" PAT-X ", b"PAT-X\0", b"PAT-X\\PAT-Y", b"", b"    ", b"PAT X", b"\\PAT-X", b"PAT-X\\",
        b"PAT-X\t", b"PAT-\xc3\x84", b"A" * 64, b"A" * 65, b"A" * 64 + b"\\" + b"B" * 63 + b" ",
        b"*", b"PAT?", b"\x1b(BPAT-X",
    ])
    d.replace(tag, el(d, tag, "LO", pad(v, "LO") if r.random() < 0.8 else v))
    return d


def m_delete_key(d, r):
    tag, _ = KEYS[r.choice(list(KEYS))]
    i = d.index(tag)
    if i is not None:
        del d.body[i]
    return d


def m_item_at_top(d, r):
    raw = r.choice([
        item(evil_item_content(d)),
        struct.pack("<HHI", 0xFFFE, 0xE0DD, 0),
        struct.pack("<HHI", 0xFFFE, 0xE00D, 0),
    ])
    d.body.insert(r.randrange(len(d.body) + 1), (0xFFFE0000, raw))
    return d


def m_deflated_meta(d, r):
    if r.random() < 0.5 and d.ts in (IMPLICIT, EXPLICIT):
        # really deflate the body (raw deflate, as PS3.5 A.5 says)
        body = b"".join(b for _, b in reencode(d, False))
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        z = c.compress(body) + c.flush()
        d.body = [(0, z + (b"\0" if len(z) % 2 else b""))]
    d.set_meta(0x00020010, DEFLATED.encode())
    d.ts = DEFLATED
    return d


def m_meta_sop_mismatch(d, r):
    tag = r.choice([0x00020003, 0x00020002])
    d.set_meta(tag, b"2.25.666")
    return d


def m_meta_ts_mismatch(d, r):
    """The meta group names one encoding, the body is in the other."""
    if d.ts not in (IMPLICIT, EXPLICIT):
        return d
    other_implicit = not d.implicit
    d.body = reencode(d, other_implicit)
    return d


def m_meta_group_length(d, r):
    meta = sum(len(b) for _, b in d.meta)
    d.group_length = max(0, meta + r.choice([-2, 2, -8, 8, 100, -meta]))
    return d


def m_truncate(d, r):
    b = d.bytes()
    return b[: r.randrange(132, len(b))]


def m_pixel_undefined_native(d, r):
    i = d.index(PIXEL_DATA)
    if i is None:
        return d
    frag = item(b"\0" * 8)
    body = item(b"") + frag + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    d.body[i] = (PIXEL_DATA, im(PIXEL_DATA, body, UNDEF) if d.implicit else ex(PIXEL_DATA, "OB", body, UNDEF))
    return d


def m_private_opaque(d, r):
    """A private element of defined length whose bytes look like a sequence holding judged tags."""
    d.insert_sorted(0x00090010, el(d, 0x00090010, "LO", b"FUZZ CREATOR"))
    content = item(im(PATIENT_ID, b"EVIL-PATIENT"))
    d.replace(0x00091001, im(0x00091001, content) if d.implicit else ex(0x00091001, r.choice(["UN", "OB"]), content))
    return d


TRICKS = [
    m_identity, m_flip, m_flip_in_key, m_repeat_same, m_repeat_other_first, m_repeat_other_last,
    m_swap, m_key_out_of_order, m_after_pixel, m_trailing_elements, m_length, m_length_beyond_end,
    m_odd, m_nested_deep, m_other_patient_ids, m_un_undefined, m_un_key, m_undefined_nonsq,
    m_group2_in_dataset, m_group_length, m_uid_leading_space, m_uid_multi, m_text_values,
    m_delete_key, m_item_at_top, m_deflated_meta, m_meta_sop_mismatch, m_meta_ts_mismatch,
    m_meta_group_length, m_truncate, m_pixel_undefined_native, m_private_opaque,
]


KEEPS_VALID = {
    m_flip_in_key, m_trailing_elements, m_nested_deep, m_other_patient_ids, m_un_undefined,
    m_group_length, m_text_values, m_delete_key, m_private_opaque, m_undefined_nonsq,
}


def generate(count, seed):
    """[(name, bytes)]: every trick on every base instance first, then random combinations."""
    r = random.Random(seed)
    bases = [(n, doc_of(b)) for n, b in seeds.instances()]
    out = []

    def apply(doc, tricks):
        cur = doc.copy()
        for t in tricks:
            try:
                res = t(cur, r)
            except Exception:  # a trick that does not apply to this instance
                continue
            if isinstance(res, bytes):
                return res
            cur = res
        return cur.bytes()

    for t in TRICKS:
        for n, d in bases:
            out.append((f"{n}.{t.__name__[2:]}", apply(d, [t])))
    # Random combinations, weighted toward tricks that usually leave the input readable (so
    # more accepted inputs reach the comparison); the rest are there to be refused.
    weights = [4 if t in KEEPS_VALID else 1 for t in TRICKS]
    while len(out) < count:
        n, d = r.choice(bases)
        ts = r.choices(TRICKS, weights, k=r.randint(1, 3))
        out.append((f"{n}." + "+".join(t.__name__[2:] for t in ts), apply(d, ts)))
    return out[:count]


# ---------------------------------------------------------------------------------------------
# Reading


LINE = re.compile(r"^\(([0-9a-fA-F]{4}),([0-9a-fA-F]{4})\) (\S\S) (.*?)\s*#\s*(\d+|u/l), (\d+) (\S+)\s*$")


def dcmtk_read(path):
    """{tag: value or None} of the top-level data set elements dcmdump prints, or an error."""
    p = subprocess.run(
        ["dcmdump", "+fo", "-Un", "+L", "+Qo", path],
        capture_output=True, timeout=30,
    )
    out = p.stdout.decode("latin1")
    if p.returncode != 0:
        err = (p.stderr.decode("latin1").strip().splitlines() or ["?"])[0]
        return None, f"dcmdump exit {p.returncode}: {err}"
    values = {}
    repeats = []
    in_data = False
    for line in out.splitlines():
        if line.startswith("# Dicom-Data-Set"):
            in_data = True
            continue
        if not in_data or not line.startswith("("):
            continue
        m = LINE.match(line)
        if not m:
            continue
        tag = int(m.group(1) + m.group(2), 16)
        v = m.group(4)
        if v == "(no value available)":
            val = ""
        elif v.startswith("[") and v.endswith("]"):
            val = v[1:-1]
        else:
            val = v
        if tag in values:
            repeats.append(tag)
            continue  # DCMTK keeps the first; so does this dump
        values[tag] = val
    return values, None


def strict_read_all(binary, paths):
    p = subprocess.run([binary], input="\n".join(paths).encode(), capture_output=True, timeout=600)
    if p.returncode != 0:
        raise SystemExit(f"strict_dump failed: {p.stderr.decode()[-2000:]}")
    res = {}
    for line in p.stdout.decode().splitlines():
        j = json.loads(line)
        res[j["file"]] = j
    return res


def norm_text(v):
    return None if v is None else v.strip(" ")


def norm_uid(v):
    if v is None:
        return None
    v = v.rstrip("\0").rstrip(" ")
    return v or None


def compare(strict, dcmtk):
    diffs = []
    for name, (tag, vr) in KEYS.items():
        s, t = strict.get(name), dcmtk.get(tag)
        if vr == "UI":
            s, t = norm_uid(s), norm_uid(t)
        else:
            s, t = norm_text(s), norm_text(t)
        if s != t:
            diffs.append((name, s, t))
    return diffs


def build(no_build):
    """The main crate's example `strict_dump`, built like the tests (debug, shared target dir)."""
    binary = os.path.join(ROOT, "target", "debug", "examples", "strict_dump")
    if no_build and os.path.exists(binary):
        return binary
    t0 = time.time()
    subprocess.run(
        ["cargo", "build", "--locked", "--manifest-path", os.path.join(ROOT, "Cargo.toml"), "--example", "strict_dump"],
        check=True,
    )
    print(f"strict_dump built in {time.time() - t0:.0f} s")
    return binary


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-build", action="store_true", help="use target/debug/examples/strict_dump as it is")
    ap.add_argument("--keep", help="keep every generated input in this directory")
    args = ap.parse_args()
    if not shutil.which("dcmdump"):
        raise SystemExit("dcmdump not found (Debian: apt-get install dcmtk)")
    binary = build(args.no_build)
    t0 = time.time()
    inputs = generate(args.count, args.seed)
    work = args.keep or tempfile.mkdtemp(prefix="pacsgate-diff.")
    os.makedirs(work, exist_ok=True)
    paths = []
    for i, (name, data) in enumerate(inputs):
        p = os.path.join(work, f"{i:05d}.dcm")
        with open(p, "wb") as f:
            f.write(data)
        paths.append(p)
    strict = strict_read_all(binary, paths)
    accepted = [p for p in paths if strict[p]["accepted"]]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as ex_:
        dcmtk = dict(zip(accepted, ex_.map(dcmtk_read, accepted)))

    per_trick = collections.defaultdict(lambda: [0, 0])
    reasons = collections.Counter()
    failures = []
    for p, (name, _) in zip(paths, inputs):
        trick = name.split(".", 1)[1]
        s = strict[p]
        per_trick[trick][0 if s["accepted"] else 1] += 1
        if not s["accepted"]:
            reasons[re.sub(r"\([0-9A-Fa-f]{4},[0-9A-Fa-f]{4}\)", "(tag)", s["reason"])] += 1
            continue
        values, err = dcmtk[p]
        if err:
            failures.append((p, name, f"strict reader accepted, DCMTK did not read it: {err}", s))
            continue
        d = compare(s, values)
        if d:
            failures.append((p, name, "; ".join(f"{k}: strict {a!r} vs DCMTK {b!r}" for k, a, b in d), s))

    fail_dir = os.path.join(FUZZ, "diff-out", "failures")
    if failures:
        os.makedirs(fail_dir, exist_ok=True)
    for p, name, why, _ in failures:
        dest = os.path.join(fail_dir, f"{os.path.basename(p)[:-4]}-{name.replace('+', '_')}.dcm")
        shutil.copy(p, dest)
        print(f"DISAGREE {name}: {why}\n         input saved to {os.path.relpath(dest, ROOT)}")
    if not args.keep:
        shutil.rmtree(work)

    print(f"\n{len(inputs)} inputs, {len(accepted)} accepted by the strict reader, "
          f"{len(inputs) - len(accepted)} refused; {len(failures)} disagreement(s) with DCMTK "
          f"({time.time() - t0:.0f} s)")
    if os.environ.get("DIFF_VERBOSE"):
        print("\naccepted/refused per single trick:")
        for t, (a, rf) in sorted(per_trick.items()):
            if "+" not in t:
                print(f"  {t:24} {a:5} {rf:5}")
        print("\nrefusal reasons:")
        for why, n in reasons.most_common(25):
            print(f"  {n:5}  {why}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
