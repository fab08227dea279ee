"""A real viewer in a real browser: OHIF 3.13 (the prebuilt site of npm @ohif/app, fetched by
scripts/setup.sh) in Debian's chromium, driven headless by puppeteer-core (tests/browser/ohif.mjs),
against the gateway answering DICOMweb by translation to an Orthanc whose DICOMweb plugin is off.

OHIF is served from a local static server of another origin (so every request is cross-origin,
with CORS preflights), and carries the bearer token through a small extension in its app-config
that sets the DICOMweb data source's Authorization header. Checked: the study list shows exactly
the token's patient's studies; the viewer renders an own study (its QIDO with 00100020, series
metadata and frames fetched through the gateway; the screenshot is not blank); a viewer URL that
names another patient's study gets no image data; an expired token shows an error; and the app's
path with the imaging server's own token, exchanged for the EHR's at the gateway, shows the same."""

import io
import json
import os
import subprocess
import time

import pydicom
import pytest
import requests
from PIL import Image
from pydicom.uid import generate_uid

from conftest import ROOT, Gateway, Orthanc, free_port, stop
from dicomdata import make_instance
from ohif_site import OhifSite
from test_exchange import as_server, exchange

DRIVER = ROOT / "tests" / "browser" / "ohif.mjs"


def picture_instance(pid, study, series, n):
    """A 128x128 8-bit MONOCHROME2 image of diagonal bands: something to see on screen."""
    ds = pydicom.dcmread(io.BytesIO(make_instance(pid, study, series, 1, 1, n, "20240301")))
    ds.Rows = ds.Columns = 128
    ds.PixelData = bytes(((x + y) * 4 + n * 16) % 256 for y in range(128) for x in range(128))
    ds.WindowCenter, ds.WindowWidth = 128, 256
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def site():
    s = OhifSite(free_port())
    yield s
    s.stop()


@pytest.fixture(scope="module")
def pacs(tmp_root):
    d = tmp_root / "browser"
    d.mkdir()
    o = Orthanc(d, name="orthanc-browser", extra={"DicomWeb": {"Enable": False}})
    o.data = {}
    for pid in ("PAT-A", "PAT-B"):
        study, series = generate_uid(), generate_uid()
        for n in (1, 2, 3):
            o.upload(picture_instance(pid, study, series, n))
        o.data[pid] = study
    yield o
    stop(o.proc)


@pytest.fixture(scope="module")
def gw(tmp_root, pacs, issuer, site):
    # Also the imaging system's authorization server: the app's path exchanges the EHR token.
    d = tmp_root / "browser"
    g = Gateway(d, pacs, issuer, name="gateway-browser", translate=True, cors_origins=(site.origin,),
                extra=as_server(d / "as-key.pem", issuer.url))
    yield g
    stop(g.proc)


def browse(site, gw, url, wait, screenshot=None, timeout_ms=60000):
    args = {"url": f"{site.origin}{url}", "gateway": gw.public_url, "wait": wait, "timeout_ms": timeout_ms}
    if screenshot:
        args["screenshot"] = str(screenshot)
    r = subprocess.run(["node", str(DRIVER), json.dumps(args)], capture_output=True, text=True,
                       timeout=timeout_ms / 1000 + 60, cwd=DRIVER.parent, env={**os.environ})
    assert r.returncode == 0, f"the browser driver failed: {r.stderr[-2000:]}"
    return json.loads(r.stdout)


def paths(out, status=None):
    """The gateway paths (with queries) the page asked for, of one status if given."""
    n = len("http://127.0.0.1:00000")
    return [x["url"][n:] for x in out["responses"] if status is None or x["status"] == status]


def test_the_study_list_shows_exactly_the_patients_studies(site, gw, pacs, issuer):
    site.configure(gw, issuer.mint(patient="PAT-A"))
    out = browse(site, gw, "/", "list")
    assert out["met"], f"no study list rows: {out['text'][:500]}"
    assert "PAT-A" in out["text"] and "PAT-B" not in out["text"]
    searches = [x for x in out["responses"] if "/dicom-web/studies?" in x["url"] and x["method"] == "GET"]
    assert searches and all(x["status"] == 200 for x in searches), searches
    # The preflights and the searches alike were answered: nothing refused.
    assert all(x["status"] in (200, 204) for x in out["responses"]), out["responses"]


def test_the_viewer_renders_an_own_study_by_translation(site, gw, pacs, issuer, tmp_root):
    site.configure(gw, issuer.mint(patient="PAT-A"))
    shot = tmp_root / "browser" / "own-study.png"
    study = pacs.data["PAT-A"]
    out = browse(site, gw, f"/viewer?StudyInstanceUIDs={study}", "frames", screenshot=shot)
    assert out["met"], f"no frame arrived: {paths(out)} {out['console'][:5]}"
    ok = paths(out, 200)
    assert any("/dicom-web/studies?" in p and "00100020=PAT-A" in p for p in ok), ok
    assert any(p.startswith(f"/dicom-web/studies/{study}/series/") and "/metadata" in p for p in ok), ok
    assert any("/frames/" in p for p in ok), ok
    refused = [x for x in out["responses"] if x["status"] >= 400]
    assert not refused, refused
    # The viewport shows the bands: many grey levels, not one flat colour.
    img = Image.open(shot).convert("L")
    w, h = img.size
    middle = img.crop((w // 4, h // 4, 3 * w // 4, 3 * h // 4))
    assert len(set(middle.tobytes())) > 32, "the viewport is blank"


def test_a_viewer_url_naming_another_patients_study_shows_no_image_data(site, gw, pacs, issuer, tmp_root):
    site.configure(gw, issuer.mint(patient="PAT-A"))
    theirs = pacs.data["PAT-B"]
    out = browse(site, gw, f"/viewer?StudyInstanceUIDs={theirs}", "frames", timeout_ms=20000)
    assert not out["met"], "a frame of another patient's study arrived"
    # OHIF searches for the study first: the search is answered, with no match.
    let_through = [x for x in out["responses"] if theirs in x["url"] and x["status"] == 200
                   and not ("/dicom-web/studies?" in x["url"] and x.get("body", "").strip() == "[]")]
    assert not let_through, f"the gateway answered for another patient's study: {let_through}"
    assert any(theirs in x["url"] and x["status"] == 403 for x in out["responses"]), out["responses"]
    assert "PAT-B" not in out["text"]


def test_an_expired_token_shows_an_error(site, gw, pacs, issuer):
    site.configure(gw, issuer.mint(patient="PAT-A", expires_in=1))
    time.sleep(2)
    out = browse(site, gw, "/", "error", timeout_ms=15000)
    searches = [x for x in out["responses"] if "/dicom-web/studies" in x["url"] and x["method"] == "GET"]
    assert searches and all(x["status"] == 401 for x in searches), out["responses"]
    assert "PAT-A" not in out["text"]
    assert "Data Source Connection Error" in out["text"], f"no error shown: {out['text'][-500:]}"


def test_the_viewer_with_the_imaging_servers_own_token(site, gw, pacs, issuer, tmp_root):
    """The app's path: the EHR's token, the imaging server's token endpoint found in its
    smart-configuration, the token exchanged there (RFC 8693), and OHIF given the exchanged
    token: its study list and viewer are the token's patient's, through the gateway."""
    conf = requests.get(f"{gw.public_url}/fhir/.well-known/smart-configuration", timeout=10).json()
    assert conf["token_endpoint"] == f"{gw.public_url}/token"
    r = exchange(gw, issuer.mint(patient="PAT-A", scope="launch/patient patient/*.read"))
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]
    assert r.json()["scope"] == "patient/ImagingStudy.rs"
    site.configure(gw, token)
    listed = browse(site, gw, "/", "list")
    assert listed["met"] and "PAT-A" in listed["text"] and "PAT-B" not in listed["text"]
    shot = tmp_root / "browser" / "own-study-exchanged.png"
    study = pacs.data["PAT-A"]
    out = browse(site, gw, f"/viewer?StudyInstanceUIDs={study}", "frames", screenshot=shot)
    assert out["met"], f"no frame arrived: {paths(out)} {out['console'][:5]}"
    assert any("/frames/" in p for p in paths(out, 200)), paths(out)
    assert not [x for x in out["responses"] if x["status"] >= 400]
    img = Image.open(shot).convert("L")
    w, h = img.size
    assert len(set(img.crop((w // 4, h // 4, 3 * w // 4, 3 * h // 4)).tobytes())) > 32, "the viewport is blank"
    # The same exchanged token for another patient's study: no image data.
    out = browse(site, gw, f"/viewer?StudyInstanceUIDs={pacs.data['PAT-B']}", "frames", timeout_ms=20000)
    assert not out["met"] and "PAT-B" not in out["text"]
