"""DICOMweb by translation to DIMSE, in front of a PACS without a DICOMweb service: an Orthanc
of its own with the DICOMweb plugin disabled, and a fake DIMSE PACS (pynetdicom) that sends
another patient's instance on a C-GET. The rest of the DICOMweb suite runs by translation too
with PACSGATE_DICOMWEB=translate (see .ci/run); this module checks what only translation does:
QIDO parameters as C-FIND keys, transfer syntax negotiation, frames cut from native pixel data,
metadata with a bulk data reference, STOW-RS by C-STORE, and the checks on what the PACS sends."""

import io
import threading
import types

import pydicom
import pytest
import requests
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from conftest import Gateway, Orthanc, free_port, stop
from dicomdata import SECONDARY_CAPTURE, make_instance

IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


def auth(token):
    return {"Authorization": f"Bearer {token}"}


def multi_frame(patient_id, study, series, frames=3):
    """A native 16-bit instance of `frames` frames of 4x4 pixels, each frame's bytes distinct."""
    ds = pydicom.dcmread(io.BytesIO(make_instance(patient_id, study, series, 90, 9, 1, "20240101")))
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 4, 4, 16, 16, 15
    ds.NumberOfFrames = frames
    ds.PixelData = b"".join(bytes([f]) * 32 for f in range(1, frames + 1))
    ds["PixelData"].VR = "OW"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def pacs(tmp_root):
    d = tmp_root / "translate"
    d.mkdir()
    o = Orthanc(d, name="orthanc-translate", extra={"DicomWeb": {"Enable": False}})
    o.data = {}
    for pid in ("PAT-A", "PAT-B"):
        study, series = generate_uid(), generate_uid()
        files = [make_instance(pid, study, series, 1, 1, n, "20240102") for n in (1, 2)]
        files.append(multi_frame(pid, study, series))
        for f in files:
            o.upload(f)
        sops = [pydicom.dcmread(io.BytesIO(f), stop_before_pixels=True).SOPInstanceUID for f in files]
        o.data[pid] = {"study": study, "series": series, "sops": sops, "files": files}
    yield o
    stop(o.proc)


@pytest.fixture(scope="module")
def gw(tmp_root, pacs, issuer):
    g = Gateway(tmp_root / "translate", pacs, issuer, name="gateway-translate", translate=True)
    yield g
    stop(g.proc)


@pytest.fixture
def token_a(issuer):
    return issuer.mint(patient="PAT-A")


def web(gw, path, token, **kw):
    return requests.get(f"{gw.public_url}/dicom-web/{path}", headers={**auth(token), **kw.pop("headers", {})}, timeout=30, **kw)


def parts(resp):
    """The parts of a multipart/related answer: (headers text, body)."""
    ct = resp.headers["Content-Type"]
    boundary = [p.split("=", 1)[1].strip('"') for p in ct.split(";") if p.strip().startswith("boundary=")][0]
    body = resp.content
    assert body.rstrip().endswith(f"--{boundary}--".encode()), "the multipart answer is not complete"
    out = []
    for chunk in body.split(f"--{boundary}".encode())[1:-1]:
        head, _, data = chunk.partition(b"\r\n\r\n")
        out.append((head.decode(), data[:-2] if data.endswith(b"\r\n") else data))
    return out


def test_the_pacs_has_no_dicomweb_service(pacs):
    assert requests.get(f"{pacs.url}/dicom-web/studies", timeout=10).status_code == 404


# ---- QIDO-RS by C-FIND ----

def test_qido_studies_are_the_callers_with_retrieve_urls(gw, pacs, token_a):
    r = web(gw, "studies", token_a, params={"includefield": "StudyDescription"})
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/dicom+json")
    studies = r.json()
    assert [s["0020000D"]["Value"][0] for s in studies] == [pacs.data["PAT-A"]["study"]]
    s = studies[0]
    assert s["00100020"]["Value"] == ["PAT-A"]
    assert s["00081190"] == {"vr": "UR", "Value": [f"{gw.public_url}/dicom-web/studies/{pacs.data['PAT-A']['study']}"]}
    assert s["00081030"]["Value"] == ["Study 1"]
    assert s["00100010"]["Value"] == [{"Alphabetic": "Test^PAT-A"}]
    assert s["00201208"]["Value"] == [3], "NumberOfStudyRelatedInstances as a number"
    assert "00080052" not in s and "00080054" not in s, "no C-FIND bookkeeping in the answer"


def test_qido_instances_limit_offset_and_keys(gw, pacs, token_a):
    a = pacs.data["PAT-A"]
    path = f"studies/{a['study']}/series/{a['series']}/instances"
    every = web(gw, path, token_a).json()
    assert sorted(i["00080018"]["Value"][0] for i in every) == sorted(a["sops"])
    assert all(i["00081190"]["Value"][0].startswith(f"{gw.public_url}/dicom-web/studies/{a['study']}/series/") for i in every)
    page = web(gw, path, token_a, params={"limit": "1", "offset": "1"}).json()
    assert len(page) == 1 and page[0] == every[1]
    by_number = web(gw, path, token_a, params={"InstanceNumber": "2"}).json()
    assert [i["00200013"]["Value"] for i in by_number] == [[2]]
    one = web(gw, f"studies/{a['study']}/instances", token_a, params={"SOPInstanceUID": f"{a['sops'][0]},{a['sops'][2]}"}).json()
    assert sorted(i["00080018"]["Value"][0] for i in one) == sorted([a["sops"][0], a["sops"][2]])


@pytest.mark.parametrize("params", [{"NoSuchKeyword": "x"}, {"ReferencedSeriesSequence.SeriesInstanceUID": "1.2"},
                                    {"00080020": "2024", "StudyDate": "2024"}, {"StudyDescription": "a\\b"}, {"limit": "x"}])
def test_qido_keys_that_cannot_be_translated_are_400(gw, token_a, params):
    assert web(gw, "studies", token_a, params=params).status_code == 400


def test_qido_wildcards_reach_the_pacs(gw, pacs, token_a):
    r = web(gw, "studies", token_a, params={"PatientName": "Test*"})
    assert [s["0020000D"]["Value"][0] for s in r.json()] == [pacs.data["PAT-A"]["study"]]
    assert web(gw, "studies", token_a, params={"PatientName": "Nobody*"}).json() == []


def test_fuzzy_matching_asked_for_is_answered_as_literal_with_a_warning(gw, pacs, token_a):
    r = web(gw, "studies", token_a, params={"fuzzymatching": "true", "PatientName": "Test*"})
    assert r.status_code == 200 and len(r.json()) == 1
    assert r.headers["Warning"].startswith("299 ") and "Only literal matching has been performed" in r.headers["Warning"]
    r = web(gw, "studies", token_a, params={"fuzzymatching": "false"})
    assert r.status_code == 200 and "Warning" not in r.headers
    assert web(gw, "studies", token_a, params={"fuzzymatching": "maybe"}).status_code == 400


# ---- WADO-RS by C-GET ----

def test_wado_instances_in_the_syntax_asked_for(gw, pacs, token_a):
    a = pacs.data["PAT-A"]
    r = web(gw, f"studies/{a['study']}", token_a)
    got = parts(r)
    assert len(got) == 3
    for head, body in got:
        assert f"transfer-syntax={EXPLICIT}" in head
        ds = pydicom.dcmread(io.BytesIO(body))
        assert ds.PatientID == "PAT-A" and ds.SOPInstanceUID in a["sops"]
        assert ds.file_meta.TransferSyntaxUID == EXPLICIT
    r = web(gw, f"studies/{a['study']}/series/{a['series']}/instances/{a['sops'][0]}", token_a,
            headers={"Accept": f'multipart/related; type="application/dicom"; transfer-syntax={IMPLICIT}'})
    (head, body), = parts(r)
    assert f"transfer-syntax={IMPLICIT}" in head
    ds = pydicom.dcmread(io.BytesIO(body))
    assert ds.file_meta.TransferSyntaxUID == IMPLICIT and ds.SOPInstanceUID == a["sops"][0]
    r = web(gw, f"studies/{a['study']}", token_a, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.3.4'})
    assert r.status_code == 406 and b"DICM" not in r.content


def test_wado_frames_are_cut_from_native_pixel_data(gw, pacs, token_a):
    a = pacs.data["PAT-A"]
    base = f"studies/{a['study']}/series/{a['series']}/instances/{a['sops'][2]}/frames"
    got = parts(web(gw, f"{base}/1,3", token_a))
    assert [body for _, body in got] == [bytes([1]) * 32, bytes([3]) * 32]
    assert all("application/octet-stream" in head for head, _ in got)
    assert [b for _, b in parts(web(gw, f"{base}/2", token_a))] == [bytes([2]) * 32]
    assert web(gw, f"{base}/3,1", token_a).status_code == 400
    assert web(gw, f"{base}/4", token_a).status_code == 400
    single = f"studies/{a['study']}/series/{a['series']}/instances/{a['sops'][0]}/frames/1"
    assert [b for _, b in parts(web(gw, single, token_a))] == [bytes(range(64))]


def test_wado_metadata_refers_to_pixel_data(gw, pacs, token_a):
    a = pacs.data["PAT-A"]
    r = web(gw, f"studies/{a['study']}/metadata", token_a)
    assert r.status_code == 200
    meta = r.json()
    assert sorted(m["00080018"]["Value"][0] for m in meta) == sorted(a["sops"])
    for m in meta:
        assert m["00100020"]["Value"] == ["PAT-A"]
        assert "InlineBinary" not in m["7FE00010"]
        assert m["7FE00010"]["BulkDataURI"].startswith(f"{gw.public_url}/dicom-web/studies/{a['study']}/series/{a['series']}/instances/")
    multi = next(m for m in meta if m["00080018"]["Value"][0] == a["sops"][2])
    assert multi["00280008"]["Value"] == [3] and multi["00280010"]["Value"] == [4]


def picture(resp, kind="JPEG"):
    """The picture of an answer, checked to be of its Content-Type's kind."""
    assert resp.status_code == 200, resp.text[:300]
    assert resp.headers["Content-Type"] == f"image/{kind.lower()}"
    assert resp.headers["Cache-Control"].startswith("private")
    img = Image.open(io.BytesIO(resp.content))
    assert img.format == kind
    return img


def test_rendered_instances_and_frames_are_pictures_of_their_pixels(gw, pacs, token_a):
    a = pacs.data["PAT-A"]
    inst = f"studies/{a['study']}/series/{a['series']}/instances"
    # The 8x8 ramp 0..63, no window in the instance: stretched to black..white.
    img = picture(web(gw, f"{inst}/{a['sops'][0]}/rendered", token_a, headers={"Accept": "image/png"}), "PNG")
    assert img.size == (8, 8) and img.mode == "L"
    px = list(img.tobytes())
    assert px[0] == 0 and px[-1] == 255 and px == sorted(px), "a ramp stays a ramp"
    # A window of the caller's: values up to 16 are black, from 48 white.
    px = list(picture(web(gw, f"{inst}/{a['sops'][0]}/rendered", token_a, headers={"Accept": "image/png"},
                          params={"window": "32,32"}), "PNG").tobytes())
    assert px[:16] == [0] * 16 and px[-15:] == [255] * 15
    # JPEG is the default; a viewport scales, keeping the aspect.
    assert picture(web(gw, f"{inst}/{a['sops'][0]}/rendered", token_a, params={"viewport": "32,16", "quality": "70"})).size == (16, 16)
    # A frame of a multi-frame instance: frame 3's value (0x0303) lies above frame 1's (0x0101).
    w = {"window": f"{0x0202},{0x0100}"}
    f1 = picture(web(gw, f"{inst}/{a['sops'][2]}/frames/1/rendered", token_a, headers={"Accept": "image/png"}, params=w), "PNG")
    f3 = picture(web(gw, f"{inst}/{a['sops'][2]}/frames/3/rendered", token_a, headers={"Accept": "image/png"}, params=w), "PNG")
    assert f1.size == (4, 4) and set(f1.tobytes()) == {0} and set(f3.tobytes()) == {255}
    assert web(gw, f"{inst}/{a['sops'][2]}/frames/4/rendered", token_a).status_code == 400
    assert web(gw, f"{inst}/{a['sops'][2]}/frames/1,2/rendered", token_a).status_code == 400


def test_thumbnails_at_every_level(gw, pacs, token_a):
    a = pacs.data["PAT-A"]
    for path in (f"studies/{a['study']}/thumbnail", f"studies/{a['study']}/series/{a['series']}/thumbnail",
                 f"studies/{a['study']}/series/{a['series']}/instances/{a['sops'][0]}/thumbnail",
                 f"studies/{a['study']}/series/{a['series']}/instances/{a['sops'][2]}/frames/2/thumbnail"):
        img = picture(web(gw, path, token_a))
        assert max(img.size) <= 128, path
    big = picture(web(gw, f"studies/{a['study']}/thumbnail", token_a, params={"viewport": "64,64"}))
    assert big.size == (64, 64), "an asked-for viewport enlarges"


def test_a_series_rendered_is_a_picture_per_instance(gw, pacs, token_a):
    a = pacs.data["PAT-A"]
    r = web(gw, f"studies/{a['study']}/series/{a['series']}/rendered", token_a)
    assert r.status_code == 200 and 'type="image/jpeg"' in r.headers["Content-Type"]
    got = parts(r)
    assert len(got) == 3
    for head, body in got:
        assert "image/jpeg" in head and Image.open(io.BytesIO(body)).format == "JPEG"


@pytest.mark.parametrize("query", ["annotation=patient", "viewport=1,1,0,0,8,8", "window=1", "quality=0", "zoom=2"])
def test_rendering_parameters_not_applied_are_400(gw, pacs, token_a, query):
    a = pacs.data["PAT-A"]
    path = f"studies/{a['study']}/series/{a['series']}/instances/{a['sops'][0]}/rendered?{query}"
    assert web(gw, path, token_a).status_code == 400


def test_what_cannot_be_rendered_faithfully_is_406(gw, pacs, token_a):
    a = pacs.data["PAT-A"]
    inst = f"studies/{a['study']}/series/{a['series']}/instances/{a['sops'][0]}"
    assert web(gw, f"{inst}/rendered", token_a, headers={"Accept": "image/gif"}).status_code == 406
    assert web(gw, f"{inst}/rendered", token_a, headers={"Accept": "image/jpeg;q=0"}).status_code == 406


def test_bulk_pixel_data_and_its_uri_from_the_metadata(gw, pacs, token_a):
    a = pacs.data["PAT-A"]
    meta = web(gw, f"studies/{a['study']}/series/{a['series']}/metadata", token_a).json()
    multi = next(m for m in meta if m["00080018"]["Value"][0] == a["sops"][2])
    uri = multi["7FE00010"]["BulkDataURI"]
    assert uri.endswith("/bulk/7fe00010")
    r = requests.get(uri, headers=auth(token_a), timeout=30)
    (head, body), = parts(r)
    assert "application/octet-stream" in head
    assert body == bytes([1]) * 32 + bytes([2]) * 32 + bytes([3]) * 32, "the whole pixel data, every frame"
    inst = f"studies/{a['study']}/series/{a['series']}/instances/{a['sops'][0]}"
    assert web(gw, f"{inst}/bulk/00100010", token_a).status_code == 406


def test_wado_uri_renders_by_default_and_serves_the_instance_when_asked(gw, pacs, token_a):
    a = pacs.data["PAT-A"]
    q = {"requestType": "WADO", "studyUID": a["study"], "seriesUID": a["series"], "objectUID": a["sops"][0]}
    uri = f"{gw.public_url}/wado"
    assert picture(requests.get(uri, params=q, headers=auth(token_a), timeout=30)).size == (8, 8)
    img = picture(requests.get(uri, params={**q, "contentType": "image/png", "rows": "4", "windowCenter": "32",
                                            "windowWidth": "32"}, headers=auth(token_a), timeout=30), "PNG")
    assert img.size == (4, 4)
    frame3 = {**q, "objectUID": a["sops"][2], "frameNumber": "3", "contentType": "image/png",
              "windowCenter": str(0x0202), "windowWidth": str(0x0100)}
    assert set(picture(requests.get(uri, params=frame3, headers=auth(token_a), timeout=30), "PNG").tobytes()) == {255}
    for bad in ({"annotation": "patient"}, {"windowCenter": "1"}, {"rows": "4&annotation=x"}):
        assert requests.get(uri, params={**q, **bad}, headers=auth(token_a), timeout=30).status_code == 400, bad
    assert requests.get(uri, params={**q, "contentType": "image/gif"}, headers=auth(token_a), timeout=30).status_code == 406
    r = requests.get(uri, params={**q, "contentType": "application/dicom"}, headers=auth(token_a), timeout=30)
    assert r.status_code == 200 and pydicom.dcmread(io.BytesIO(r.content)).SOPInstanceUID == a["sops"][0]


def test_foreign_uids_are_403_without_dicom(gw, pacs, token_a):
    b = pacs.data["PAT-B"]
    inst = f"studies/{b['study']}/series/{b['series']}/instances/{b['sops'][2]}"
    for path in (f"studies/{b['study']}", f"studies/{b['study']}/metadata", f"{inst}/frames/1",
                 f"{inst}/rendered", f"{inst}/frames/1/rendered", f"{inst}/bulk/7fe00010",
                 f"studies/{b['study']}/thumbnail", f"studies/{b['study']}/series/{b['series']}/rendered"):
        r = web(gw, path, token_a)
        assert r.status_code == 403 and b"DICM" not in r.content and b"PAT-B" not in r.content


# ---- STOW-RS by C-STORE ----

def stow(gw, token, files):
    boundary = "translateboundary"
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f + b"\r\n" for f in files)
    body += f"--{boundary}--\r\n".encode()
    return requests.post(f"{gw.public_url}/dicom-web/studies", data=body, timeout=30,
                         headers={**auth(token), "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})


def test_stow_stores_own_instances_by_c_store(gw, pacs, issuer):
    writer = issuer.mint(patient="PAT-A", scope="patient/ImagingStudy.rs patient/ImagingStudy.c")
    a = pacs.data["PAT-A"]
    mine = make_instance("PAT-A", a["study"], a["series"], 1, 1, 7, "20240102")
    theirs = make_instance("PAT-B", generate_uid(), generate_uid(), 5, 1, 1, "20240102")
    r = stow(gw, writer, [mine, theirs])
    assert r.status_code == 202, r.text
    stored = pydicom.dcmread(io.BytesIO(mine)).SOPInstanceUID
    refused = pydicom.dcmread(io.BytesIO(theirs)).SOPInstanceUID
    assert pacs.holds(stored) and not pacs.holds(refused)
    answer = r.json()
    assert answer["00081199"]["Value"][0]["00081155"]["Value"] == [stored]
    assert answer["00081198"]["Value"][0]["00081155"]["Value"] == [refused]
    # A waveform, in a study of its own: stored by C-STORE, retrieved by C-GET.
    ds = pydicom.dcmread(io.BytesIO(make_instance("PAT-A", generate_uid(), generate_uid(), 1, 1, 8, "20240102")))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.9.1.1"  # 12-lead ECG
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    r = stow(gw, writer, [buf.getvalue()])
    assert r.status_code == 200, r.text
    (_, body), = parts(web(gw, f"studies/{ds.StudyInstanceUID}", writer))
    assert pydicom.dcmread(io.BytesIO(body)).SOPClassUID == "1.2.840.10008.5.1.4.1.1.9.1.1"


# ---- what a DIMSE PACS sends is checked ----

class FakePacs:
    """A DIMSE PACS (pynetdicom) that answers ownership look-ups for PAT-A's instance and
    sends what `send` holds on every C-GET."""

    def __init__(self, own: Dataset):
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import (StudyRootQueryRetrieveInformationModelFind,
                                          StudyRootQueryRetrieveInformationModelGet, Verification)
        self.own = own
        self.send = []
        self.gets = 0
        self.associations = 0
        self.port = free_port()
        self.aet = "FAKEPACS"
        self.dicom_port = self.port
        self.url = None
        ae = AE(ae_title=self.aet)
        ae.add_supported_context(Verification)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_supported_context(SECONDARY_CAPTURE, scu_role=False, scp_role=True)
        handlers = [(evt.EVT_C_FIND, self.on_find), (evt.EVT_C_GET, self.on_get), (evt.EVT_REQUESTED, self.on_requested),
                    (evt.EVT_SOP_EXTENDED, self.on_extended)]
        self.extended = []
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)

    def on_find(self, event):
        ident = event.identifier
        rsp = Dataset()
        for kw in ("QueryRetrieveLevel", "PatientID", "IssuerOfPatientID", "StudyDate", "ModalitiesInStudy",
                   "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            if kw in ident:
                value = {"ModalitiesInStudy": self.own.Modality, "QueryRetrieveLevel": ident.QueryRetrieveLevel,
                         "IssuerOfPatientID": ""}.get(kw) if kw in ("ModalitiesInStudy", "QueryRetrieveLevel", "IssuerOfPatientID") else getattr(self.own, kw)
                setattr(rsp, kw, value)
        yield 0xFF00, rsp

    def on_requested(self, event):
        self.associations += 1

    def on_extended(self, event):
        """C-FIND extended negotiation: fuzzy semantic matching (its third byte) is agreed to."""
        self.extended.append(dict(event.app_info))
        return {uid: bytes([0, 0, 1]) for uid, info in event.app_info.items() if info[2:3] == b"\x01"}

    def on_get(self, event):
        self.gets += 1
        yield len(self.send)
        for ds in self.send:
            if ds == "fail":
                yield 0xA702, None
                return
            yield 0xFF00, ds

    def stop(self):
        self.server.shutdown()


@pytest.fixture(scope="module")
def fake(tmp_root, pacs, issuer):
    a, b = pacs.data["PAT-A"], pacs.data["PAT-B"]
    own = pydicom.dcmread(io.BytesIO(a["files"][0]))
    foreign = pydicom.dcmread(io.BytesIO(b["files"][0]))
    f = FakePacs(own)
    f.own_ds, f.foreign_ds = own, foreign
    d = tmp_root / "translate-fake"
    d.mkdir()
    g = Gateway(d, types.SimpleNamespace(aet=f.aet, dicom_port=f.port, url=None), issuer, name="gateway-fake-pacs", translate=True)
    yield f, g
    stop(g.proc)
    f.stop()


@pytest.mark.parametrize("order", ["foreign_first", "foreign_second"])
def test_a_foreign_instance_from_the_pacs_is_withheld_on_every_path(fake, issuer, order):
    f, g = fake
    own = f.own_ds
    f.send = [f.foreign_ds, own] if order == "foreign_first" else [own, f.foreign_ds]
    token = issuer.mint(patient="PAT-A")
    inst = f"studies/{own.StudyInstanceUID}/series/{own.SeriesInstanceUID}/instances/{own.SOPInstanceUID}"
    before = f.gets

    def fetch(path):
        """Status, what arrived, and whether the answer was complete."""
        r = web(g, path, token, stream=True)
        got = b""
        try:
            for chunk in r.iter_content(65536):
                got += chunk
            return r.status_code, got, True
        except requests.exceptions.ChunkedEncodingError:
            return r.status_code, got, False

    series = f"studies/{own.StudyInstanceUID}/series/{own.SeriesInstanceUID}"
    for path in (f"studies/{own.StudyInstanceUID}", f"{inst}/frames/1", f"{series}/rendered"):
        status, body, complete = fetch(path)
        if order == "foreign_first":
            assert status == 502, path
        else:
            # The own instance went out before the foreign one arrived: the answer breaks off.
            assert status == 200 and not complete, f"{path}: an answer with a withheld instance must break off"
        assert b"PAT-B" not in body
    status, body, _ = fetch(f"studies/{own.StudyInstanceUID}/metadata")
    assert status == 502 and b"PAT-B" not in body
    if order == "foreign_first":
        # A single picture is made of the first instance: a foreign one is refused, not drawn.
        for path in (f"{inst}/rendered", f"studies/{own.StudyInstanceUID}/thumbnail"):
            status, body, _ = fetch(path)
            assert status == 502, path
    q = {"requestType": "WADO", "studyUID": own.StudyInstanceUID, "seriesUID": own.SeriesInstanceUID,
         "objectUID": own.SOPInstanceUID, "contentType": "application/dicom"}
    f.send = [f.foreign_ds]
    r = requests.get(f"{g.public_url}/wado", params=q, headers=auth(token), timeout=30)
    assert r.status_code == 502 and b"PAT-B" not in r.content
    assert f.gets == before + (7 if order == "foreign_first" else 5), "every path asked the PACS"
    assert "withheld" in g.log_text() or "does not reach" in g.log_text()


def test_fuzzy_matching_is_negotiated_with_a_pacs_that_offers_it(fake, issuer):
    f, g = fake
    token = issuer.mint(patient="PAT-A")
    r = web(g, "studies", token, params={"fuzzymatching": "true"})
    assert r.status_code == 200 and [s["0020000D"]["Value"][0] for s in r.json()] == [f.own_ds.StudyInstanceUID]
    assert "Warning" not in r.headers, "the PACS agreed to fuzzy matching"
    asked = [info for items in f.extended for info in items.values()]
    assert any(info[2:3] == b"\x01" for info in asked), "the gateway proposed fuzzy matching"


def test_translation_reuses_its_associations(fake, issuer):
    f, g = fake
    own = f.own_ds
    f.send = [own]
    token = issuer.mint(patient="PAT-A")
    q = {"requestType": "WADO", "studyUID": own.StudyInstanceUID, "seriesUID": own.SeriesInstanceUID,
         "objectUID": own.SOPInstanceUID, "contentType": "application/dicom"}
    r = requests.get(f"{g.public_url}/wado", params=q, headers=auth(token), timeout=30)
    assert r.status_code == 200
    before, gets = f.associations, f.gets
    for _ in range(4):
        r = requests.get(f"{g.public_url}/wado", params=q, headers=auth(token), timeout=30)
        assert r.status_code == 200 and pydicom.dcmread(io.BytesIO(r.content)).SOPInstanceUID == own.SOPInstanceUID
    assert f.gets == gets + 4
    assert f.associations == before, "each retrieval opened an association of its own"


def test_a_small_association_limit_makes_requests_wait_not_fail(tmp_root, pacs, issuer):
    import concurrent.futures

    d = tmp_root / "translate-limit"
    d.mkdir()
    g = Gateway(d, pacs, issuer, name="gateway-two-associations", translate=True, extra="max_associations = 2")
    try:
        a = pacs.data["PAT-A"]
        token = issuer.mint(patient="PAT-A")
        paths = [f"studies/{a['study']}", f"studies/{a['study']}/metadata", "studies",
                 f"studies/{a['study']}/series/{a['series']}/instances/{a['sops'][2]}/frames/2"] * 2
        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            codes = list(ex.map(lambda p: web(g, p, token).status_code, paths))
        assert codes == [200] * len(paths), codes
    finally:
        stop(g.proc)


def test_a_partial_or_empty_retrieval_is_not_presented_as_complete(fake, issuer):
    f, g = fake
    own = f.own_ds
    token = issuer.mint(patient="PAT-A")
    study = f"studies/{own.StudyInstanceUID}"
    # The PACS delivers one instance, then fails the rest (A702H, out of resources).
    f.send = [own, "fail"]
    r = web(g, study, token, stream=True)
    assert r.status_code == 200
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        b"".join(r.iter_content(65536))
    assert web(g, f"{study}/metadata", token).status_code == 502
    # Nothing delivered at all: 404, not an empty answer.
    f.send = []
    assert web(g, study, token).status_code == 404
    q = {"requestType": "WADO", "studyUID": own.StudyInstanceUID, "seriesUID": own.SeriesInstanceUID,
         "objectUID": own.SOPInstanceUID, "contentType": "application/dicom"}
    assert requests.get(f"{g.public_url}/wado", params=q, headers=auth(token), timeout=30).status_code == 404


def test_pixel_data_whose_header_spans_two_fragments(fake, issuer):
    """The gateway announces 64 KiB PDUs, so pynetdicom sends data sets in fragments of 65530
    bytes: a private element before Pixel Data puts its header across the first boundary."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    f, g = fake
    token = issuer.mint(patient="PAT-A")

    def encoded(ds):
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_dataset(fp, ds)
        return fp.getvalue()

    # Whatever the sender's exact fragment size near 64 KiB, one of these offsets puts the
    # 12-byte header across a boundary.
    for start in range(65500, 65540, 2):
        ds = f.own_ds.copy()
        ds.add_new(0x00090010, "LO", "PACSGATE TEST")
        ds.add_new(0x00091010, "OB", b"")
        ds[0x00091010].value = b"\0" * (start - encoded(ds).index(b"\xe0\x7f\x10\x00"))
        assert encoded(ds).index(b"\xe0\x7f\x10\x00") == start
        f.send = [ds]
        inst = f"studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
        r = web(g, f"{inst}/metadata", token)
        assert r.status_code == 200, (start, r.text)
        assert "BulkDataURI" in r.json()[0]["7FE00010"]
        got = parts(web(g, f"{inst}/frames/1", token))
        assert [b for _, b in got] == [bytes(range(64))], start


# ---- a PACS without C-GET: C-MOVE to the gateway's receiver, on both protocols ----

class FakeMovePacs(FakePacs):
    """A DIMSE PACS (pynetdicom) without C-GET: it serves C-MOVE only, delivering what `send`
    holds to the move destination (the gateway's receiver at `receiver_port`)."""

    def __init__(self, own: Dataset):
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import (StudyRootQueryRetrieveInformationModelFind,
                                          StudyRootQueryRetrieveInformationModelMove, Verification)
        self.own = own
        self.send = []
        self.moves = []
        self.gets = 0
        self.associations = 0
        self.receiver_port = free_port()
        self.port = free_port()
        self.aet = "FAKEPACS"
        self.dicom_port = self.port
        self.url = None
        self.pacs_extra = 'retrieve = "c-move"'
        ae = AE(ae_title=self.aet)
        ae.add_supported_context(Verification)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
        # Storage from clients (their C-GET's storage contexts are proposed upstream too), and
        # the sub-operations' association to the receiver: Explicit VR Little Endian, so the
        # instances moved are in the syntax of the client's context (the gateway does not
        # convert).
        ae.add_supported_context(SECONDARY_CAPTURE, "1.2.840.10008.1.2.1", scu_role=False, scp_role=True)
        ae.add_requested_context(SECONDARY_CAPTURE, ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
        handlers = [(evt.EVT_C_FIND, self.on_find), (evt.EVT_C_MOVE, self.on_move), (evt.EVT_REQUESTED, self.on_requested)]
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)

    def on_move(self, event):
        self.moves.append(event.move_destination.decode().strip() if isinstance(event.move_destination, bytes)
                          else str(event.move_destination).strip())
        yield "127.0.0.1", self.receiver_port
        yield len(self.send)
        for ds in self.send:
            yield 0xFF00, ds


@pytest.fixture(scope="module")
def fake_move(tmp_root, pacs, issuer):
    a, b = pacs.data["PAT-A"], pacs.data["PAT-B"]
    own = pydicom.dcmread(io.BytesIO(a["files"][0]))
    foreign = pydicom.dcmread(io.BytesIO(b["files"][0]))
    f = FakeMovePacs(own)
    f.own_ds, f.foreign_ds = own, foreign
    d = tmp_root / "translate-fake-move"
    d.mkdir()
    g = Gateway(d, f, issuer, name="gateway-fake-move-pacs", translate=True, receive_port=f.receiver_port)
    yield f, g
    stop(g.proc)
    f.stop()


@pytest.mark.parametrize("order", ["foreign_first", "foreign_second"])
def test_without_c_get_a_foreign_instance_moved_is_withheld_on_both_protocols(fake_move, issuer, order):
    from test_dimse_store_get import connect, get, get_query

    f, g = fake_move
    own = f.own_ds
    f.send = [f.foreign_ds, own] if order == "foreign_first" else [own, f.foreign_ds]
    token = issuer.mint(patient="PAT-A")
    moves = len(f.moves)
    # DICOMweb: the foreign instance never goes out; the answer is refused or broken off.
    r = web(g, f"studies/{own.StudyInstanceUID}", token, stream=True)
    body, complete = b"", True
    try:
        for chunk in r.iter_content(65536):
            body += chunk
    except requests.exceptions.ChunkedEncodingError:
        complete = False
    if order == "foreign_first":
        assert r.status_code == 502
    else:
        assert r.status_code == 200 and not complete
    assert b"PAT-B" not in body
    # DIMSE: the client's C-GET is served by C-MOVE; it gets its own instance only, and the
    # foreign one counts as failed.
    received = []
    assoc = connect(g, token, received)
    final, completed = get(assoc, get_query("STUDY", study=own.StudyInstanceUID))
    assoc.release()
    assert [d.SOPInstanceUID for d in received] == [own.SOPInstanceUID]
    assert final == 0xB000 and completed == 1
    # Both went to the gateway itself by C-MOVE.
    assert f.moves[moves:] == ["PACSGATE", "PACSGATE"]
    assert "PAT-B" not in {d.PatientID for d in received}
