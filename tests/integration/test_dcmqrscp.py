"""The gateway in front of a second, different PACS: DCMTK's dcmqrscp as sites usually run it
(relational queries accepted, identifiers not checked). The same patient scoping holds on every
DIMSE path: C-ECHO, C-FIND at each level (dcmqrscp ignores PatientID below STUDY level in Study
Root; the gateway's result judge withholds what it returns for other patients), C-GET, C-MOVE
through the gateway's receiver, C-STORE."""

import io

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind as PATIENT_FIND,
    StudyRootQueryRetrieveInformationModelFind as STUDY_FIND,
)

from conftest import PATIENTS, Dcmqrscp, Gateway, free_port, stop
from dicomdata import make_instance
from test_dimse_association import associate
from test_dimse_move import Destination, move
from test_dimse_store_get import connect, get, get_query, store, writer


@pytest.fixture(scope="module")
def env(tmp_root, issuer):
    d = tmp_root / "dcmqrscp-env"
    d.mkdir()
    receive, dest_port = free_port(), free_port()
    pacs = Dcmqrscp(d, peers=[("PACSGATE", receive)])
    pacs.load(PATIENTS)
    g = Gateway(d, pacs, issuer, name="dcmqrscp-gateway", receive_port=receive, destinations=[("DEST", dest_port)])
    yield {"pacs": pacs, "gateway": g, "dest_port": dest_port}
    stop(g.proc)
    stop(pacs.proc)


def own(pacs, pid):
    return [x for x in pacs.instances if x[0] == pid]


def find(assoc, ds, model=STUDY_FIND):
    out = []
    for status, ident in assoc.send_c_find(ds, model):
        assert status is not None and "Status" in status
        if status.Status in (0xFF00, 0xFF01):
            out.append(ident)
        else:
            final = status.Status
    return final, out


def level(name, **keys):
    ds = Dataset()
    ds.QueryRetrieveLevel = name
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def test_echo_and_study_level_find_see_only_the_callers_studies(env, issuer):
    g, pacs = env["gateway"], env["pacs"]
    assoc, _ = associate(g, issuer.mint(patient="PAT-A"), contexts=None)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    final, matches = find(assoc, level("STUDY", StudyInstanceUID="", PatientID=""))
    assert final == 0x0000
    assert {m.StudyInstanceUID for m in matches} == pacs.studies["PAT-A"]
    assert {m.PatientID for m in matches} == {"PAT-A"}
    # Another patient's PatientID is refused, not answered empty.
    final, matches = find(assoc, level("STUDY", PatientID="PAT-B", StudyInstanceUID=""))
    assert final == 0x0124 and matches == []
    # Patient Root: the patient level too.
    final, matches = find(assoc, level("PATIENT", PatientID="", PatientName=""), PATIENT_FIND)
    assert final == 0x0000 and {m.PatientID for m in matches} == {"PAT-A"}
    assoc.release()


def test_series_and_image_level_find_inside_an_own_study(env, issuer):
    g, pacs = env["gateway"], env["pacs"]
    mine = own(pacs, "PAT-A")
    study = mine[0][1]
    assoc, _ = associate(g, issuer.mint(patient="PAT-A"), contexts=None)
    final, matches = find(assoc, level("SERIES", StudyInstanceUID=study, SeriesInstanceUID=""))
    assert final == 0x0000
    assert {m.SeriesInstanceUID for m in matches} == {x[2] for x in mine if x[1] == study}
    series = mine[0][2]
    final, matches = find(assoc, level("IMAGE", StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=""))
    assert final == 0x0000
    assert {m.SOPInstanceUID for m in matches} == {x[3] for x in mine if x[2] == series}
    # Inside another patient's study: refused before the PACS is asked for its series.
    theirs = own(pacs, "PAT-B")[0][1]
    final, matches = find(assoc, level("SERIES", StudyInstanceUID=theirs, SeriesInstanceUID=""))
    assert final == 0x0124 and matches == []
    assoc.release()


def test_relational_series_find_withholds_what_dcmqrscp_returns_for_other_patients(env, issuer):
    """Without a study, dcmqrscp answers a Study Root SERIES query with every series it holds
    (it ignores PatientID below STUDY level): the gateway relays none of another patient's."""
    g, pacs = env["gateway"], env["pacs"]
    assoc, _ = associate(g, issuer.mint(patient="PAT-B"), contexts=None)
    final, matches = find(assoc, level("SERIES", SeriesInstanceUID="", StudyInstanceUID=""))
    assert final == 0x0000
    assoc.release()
    assert {m.SeriesInstanceUID for m in matches} == {x[2] for x in own(pacs, "PAT-B")}
    # dcmqrscp did answer with the others' series (so this tests the judge, not the PACS).
    foreign = {x[2] for x in pacs.instances if x[0] != "PAT-B"}
    assert g.log_text().count("PACS returned a C-FIND match for another patient") >= len(foreign)


def test_c_get_relays_own_instances_and_refuses_foreign_ones(env, issuer):
    g, pacs = env["gateway"], env["pacs"]
    mine = own(pacs, "PAT-A")
    study = mine[0][1]
    received = []
    assoc = connect(g, issuer.mint(patient="PAT-A"), received)
    final, completed = get(assoc, get_query("STUDY", study=study))
    assert final == 0x0000
    assert {r.SOPInstanceUID for r in received} == {x[3] for x in mine if x[1] == study} and completed == len(received)
    received.clear()
    theirs = own(pacs, "PAT-B")[0][1]
    final, _ = get(assoc, get_query("STUDY", study=theirs))
    assert final == 0x0124 and received == []
    assoc.release()


def test_c_move_goes_through_the_gateways_receiver(env, issuer):
    g, pacs = env["gateway"], env["pacs"]
    mine = own(pacs, "PAT-A")
    study = mine[0][1]
    dest = Destination(env["dest_port"])
    try:
        final = move(g, issuer.mint(patient="PAT-A"), level("STUDY", StudyInstanceUID=study))
        assert final.Status == 0x0000, hex(final.Status)
        assert {d.SOPInstanceUID for d in dest.received} == {x[3] for x in mine if x[1] == study}
        dest.received.clear()
        final = move(g, issuer.mint(patient="PAT-A"), level("STUDY", StudyInstanceUID=own(pacs, "PAT-B")[0][1]))
        assert final.Status == 0x0124 and dest.received == []
    finally:
        dest.stop()


def test_c_store_of_an_own_new_study_is_stored(env, issuer):
    g, pacs = env["gateway"], env["pacs"]
    study, series = generate_uid(), generate_uid()
    data = make_instance("PAT-A", study, series, 9100, 1, 1, "20240101")
    assoc = writer(g, issuer, "PAT-A")
    assert store(assoc, data) == 0x0000
    # Another patient's instance: refused, not stored.
    other = make_instance("PAT-B", generate_uid(), generate_uid(), 9101, 1, 1, "20240101")
    assert store(assoc, other) == 0x0124
    assoc.release()
    # Asked of dcmqrscp directly: the first is there, the second is not.
    ae = AE(ae_title="CHECKER")
    ae.add_requested_context(STUDY_FIND)
    direct = ae.associate("127.0.0.1", pacs.dicom_port, ae_title=pacs.aet)
    assert direct.is_established
    _, there = find(direct, level("STUDY", StudyInstanceUID=study))
    other_study = pydicom.dcmread(io.BytesIO(other)).StudyInstanceUID
    _, not_there = find(direct, level("STUDY", StudyInstanceUID=other_study))
    direct.release()
    assert len(there) == 1 and not_there == []


# ---- dcmqrscp with its identifier checks on: the hierarchical query model ----
#
# `--check-find` and `--check-move` make dcmqrscp refuse (A900H, "DataSetDoesNotMatchSOPClass")
# a query below STUDY level without the unique keys above it, or with PatientID in Study Root.
# With `pacs.query_model = "hierarchical"` the gateway asks such a PACS only what the model
# allows: a series or an instance is judged through its study's owner (asked at STUDY level)
# and whether that study holds it.

REFUSED_BY_PACS = "DataSetDoesNotMatchSOPClass"


@pytest.fixture(scope="module")
def strict(tmp_root, issuer):
    d = tmp_root / "dcmqrscp-strict"
    d.mkdir()
    receive, dest_port = free_port(), free_port()
    pacs = Dcmqrscp(d, flags=("--check-find", "--check-move"), peers=[("PACSGATE", receive), ("DEST", dest_port)])
    pacs.load(PATIENTS)
    assert pacs.strict and "hierarchical" in pacs.pacs_extra
    g = Gateway(d, pacs, issuer, name="strict-gateway", receive_port=receive, destinations=[("DEST", dest_port)],
                translate=True)
    yield {"pacs": pacs, "gateway": g, "dest_port": dest_port}
    stop(g.proc)
    stop(pacs.proc)


def test_strict_pacs_refuses_relational_queries(strict):
    """What makes the setting needed: dcmqrscp with its checks on refuses the relational
    look-up a gateway would otherwise send."""
    pacs = strict["pacs"]
    assert pacs._find("SERIES", PatientID="", StudyInstanceUID="", SeriesInstanceUID=own(pacs, "PAT-A")[0][2]) == []
    assert REFUSED_BY_PACS in pacs.log_text()


def test_strict_find_inside_own_study_and_refusals(strict, issuer):
    g, pacs = strict["gateway"], strict["pacs"]
    before = pacs.log_text().count(REFUSED_BY_PACS)
    mine, theirs = own(pacs, "PAT-A"), own(pacs, "PAT-B")
    study, series = mine[0][1], mine[0][2]
    assoc, _ = associate(g, issuer.mint(patient="PAT-A"), contexts=None)
    final, matches = find(assoc, level("SERIES", StudyInstanceUID=study, SeriesInstanceUID="", Modality=""))
    assert final == 0x0000
    assert {m.SeriesInstanceUID for m in matches} == {x[2] for x in mine if x[1] == study}
    final, matches = find(assoc, level("IMAGE", StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=""))
    assert final == 0x0000
    assert {m.SOPInstanceUID for m in matches} == {x[3] for x in mine if x[2] == series}
    # Inside another patient's study or series: refused by the gateway.
    assert find(assoc, level("SERIES", StudyInstanceUID=theirs[0][1], SeriesInstanceUID="")) == (0x0124, [])
    assert find(assoc, level("IMAGE", StudyInstanceUID=study, SeriesInstanceUID=theirs[0][2],
                             SOPInstanceUID="")) == (0x0124, [])
    # Relational forms (no study below STUDY level): refused before the PACS is asked.
    assert find(assoc, level("SERIES", StudyInstanceUID="", SeriesInstanceUID="")) == (0x0124, [])
    assert find(assoc, level("IMAGE", StudyInstanceUID=study, SeriesInstanceUID="", SOPInstanceUID="")) == (0x0124, [])
    # Study level: narrowed by PatientID as always.
    final, matches = find(assoc, level("STUDY", PatientID="", StudyInstanceUID=""))
    assert final == 0x0000 and {m.StudyInstanceUID for m in matches} == pacs.studies["PAT-A"]
    assoc.release()
    # Nothing the gateway sent was refused by the PACS.
    assert pacs.log_text().count(REFUSED_BY_PACS) == before


def test_strict_c_get_and_c_move_of_series_and_instances(strict, issuer):
    g, pacs = strict["gateway"], strict["pacs"]
    before = pacs.log_text().count(REFUSED_BY_PACS)
    mine, theirs = own(pacs, "PAT-A"), own(pacs, "PAT-B")
    study, series, sop = mine[0][1], mine[0][2], mine[0][3]
    received = []
    assoc = connect(g, issuer.mint(patient="PAT-A"), received)
    final, completed = get(assoc, get_query("SERIES", study=study, series=series))
    assert final == 0x0000, hex(final)
    assert {r.SOPInstanceUID for r in received} == {x[3] for x in mine if x[2] == series}
    received.clear()
    final, _ = get(assoc, get_query("IMAGE", study=study, series=series, sop=sop))
    assert final == 0x0000 and [r.SOPInstanceUID for r in received] == [sop]
    received.clear()
    # Another patient's series named inside an own study, and a series without its study.
    assert get(assoc, get_query("SERIES", study=study, series=theirs[0][2]))[0] == 0x0124
    assert get(assoc, get_query("SERIES", series=series))[0] == 0x0124
    assert received == []
    assoc.release()
    dest = Destination(strict["dest_port"])
    try:
        final = move(g, issuer.mint(patient="PAT-A"), level("SERIES", StudyInstanceUID=study, SeriesInstanceUID=series))
        assert final.Status == 0x0000, hex(final.Status)
        assert {d.SOPInstanceUID for d in dest.received} == {x[3] for x in mine if x[2] == series}
    finally:
        dest.stop()
    assert pacs.log_text().count(REFUSED_BY_PACS) == before


def test_strict_c_store_new_and_into_own_study(strict, issuer):
    g, pacs = strict["gateway"], strict["pacs"]
    before = pacs.log_text().count(REFUSED_BY_PACS)
    study, series = generate_uid(), generate_uid()
    assoc = writer(g, issuer, "PAT-A")
    first = make_instance("PAT-A", study, series, 9200, 1, 1, "20240101")
    assert store(assoc, first) == 0x0000
    # Into the series just stored (now held: judged through its study's owner).
    second = make_instance("PAT-A", study, series, 9200, 1, 2, "20240101")
    assert store(assoc, second) == 0x0000
    # Into an existing own study of the loaded data, a new series.
    mine = own(pacs, "PAT-A")
    third = make_instance("PAT-A", mine[0][1], generate_uid(), 9201, 2, 1, "20240101")
    assert store(assoc, third) == 0x0000
    # Another patient's instance into an own study, and an own one into another's study.
    assert store(assoc, make_instance("PAT-B", study, generate_uid(), 9202, 1, 1, "20240101")) == 0x0124
    theirs = own(pacs, "PAT-B")[0]
    assert store(assoc, make_instance("PAT-A", theirs[1], theirs[2], 9203, 1, 9, "20240101")) == 0x0124
    assoc.release()
    for data in (first, second, third):
        assert pacs.holds(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID)
    assert pacs.patient_of_study(theirs[1]) == "PAT-B"
    assert pacs.log_text().count(REFUSED_BY_PACS) == before


def test_strict_dicomweb_by_translation(strict, issuer):
    import requests

    g, pacs = strict["gateway"], strict["pacs"]
    before = pacs.log_text().count(REFUSED_BY_PACS)
    base = f"{g.public_url}/dicom-web"
    h = {"Authorization": f"Bearer {issuer.mint(patient='PAT-A')}", "Accept": "application/dicom+json"}
    mine, theirs = own(pacs, "PAT-A"), own(pacs, "PAT-B")
    # The last study: the store test above wrote into the first.
    study, series, sop = mine[-1][1:4]
    assert study != mine[0][1]
    r = requests.get(f"{base}/studies/{study}/series", headers=h, params={"includefield": "all"}, timeout=30)
    assert r.status_code == 200, r.text
    assert {s["0020000E"]["Value"][0] for s in r.json()} == {x[2] for x in mine if x[1] == study}
    r = requests.get(f"{base}/studies/{study}/series/{series}/instances", headers=h, timeout=30)
    assert r.status_code == 200 and {i["00080018"]["Value"][0] for i in r.json()} == {x[3] for x in mine if x[2] == series}
    # An upper level's attribute cannot be matched on below STUDY level there.
    r = requests.get(f"{base}/studies/{study}/series", headers=h, params={"PatientName": "x"}, timeout=30)
    assert r.status_code == 400 and "hierarchical" in r.text
    r = requests.get(f"{base}/studies/{study}/series/{series}/metadata", headers=h, timeout=30)
    assert r.status_code == 200 and {i["00080018"]["Value"][0] for i in r.json()} == {x[3] for x in mine if x[2] == series}
    r = requests.get(f"{base}/studies/{study}/series/{series}/instances/{sop}",
                     headers={**h, "Accept": "multipart/related; type=\"application/dicom\""}, timeout=30)
    assert r.status_code == 200 and sop.encode() in r.content
    r = requests.get(f"{base}/studies/{study}/series/{theirs[0][2]}/instances/{theirs[0][3]}",
                     headers={**h, "Accept": "multipart/related; type=\"application/dicom\""}, timeout=30)
    assert r.status_code == 403 and theirs[0][3].encode() not in r.content
    assert pacs.log_text().count(REFUSED_BY_PACS) == before


# ---- dcmqrscp without C-GET: DICOMweb retrieves by C-MOVE to the gateway's receiver ----

@pytest.fixture(scope="module")
def noget(tmp_root, issuer):
    d = tmp_root / "dcmqrscp-noget"
    d.mkdir()
    receive = free_port()
    pacs = Dcmqrscp(d, flags=("--disable-get",), peers=[("PACSGATE", receive)])
    pacs.load(PATIENTS)
    assert 'retrieve = "c-move"' in pacs.pacs_extra
    g = Gateway(d, pacs, issuer, name="noget-gateway", receive_port=receive, translate=True)
    yield {"pacs": pacs, "gateway": g}
    stop(g.proc)
    stop(pacs.proc)


def test_without_c_get_dicomweb_retrieves_by_c_move(noget, issuer):
    import requests
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as STUDY_GET

    g, pacs = noget["gateway"], noget["pacs"]
    # The PACS really has no C-GET.
    ae = AE(ae_title="CHECKER")
    ae.add_requested_context(STUDY_GET)
    direct = ae.associate("127.0.0.1", pacs.dicom_port, ae_title=pacs.aet)
    assert not direct.is_established or not any(
        c.abstract_syntax == STUDY_GET and c.result == 0 for c in direct.accepted_contexts)
    if direct.is_established:
        direct.release()
    base = f"{g.public_url}/dicom-web"
    h = {"Authorization": f"Bearer {issuer.mint(patient='PAT-A')}"}
    mine, theirs = own(pacs, "PAT-A"), own(pacs, "PAT-B")
    study, series, sop = mine[0][1:4]
    dicom = {**h, "Accept": 'multipart/related; type="application/dicom"'}
    r = requests.get(f"{base}/studies/{study}", headers=dicom, timeout=60)
    assert r.status_code == 200, r.text
    got = {x[3] for x in mine if x[1] == study}
    assert all(u.encode() in r.content for u in got)
    assert r.content.count(b"Content-Type: application/dicom") == len(got)
    r = requests.get(f"{base}/studies/{study}/series/{series}/metadata", headers={**h, "Accept": "application/dicom+json"}, timeout=60)
    assert r.status_code == 200 and {i["00080018"]["Value"][0] for i in r.json()} == {x[3] for x in mine if x[2] == series}
    r = requests.get(f"{base}/studies/{study}/series/{series}/instances/{sop}/frames/1",
                     headers={**h, "Accept": 'multipart/related; type="application/octet-stream"'}, timeout=60)
    assert r.status_code == 200 and bytes(range(64)) in r.content
    r = requests.get(f"{base}/studies/{theirs[0][1]}", headers=dicom, timeout=60)
    assert r.status_code == 403 and theirs[0][3].encode() not in r.content
    # Nothing of another patient's was moved, and the moves went to the gateway's receiver.
    log = pacs.log_text()
    assert log.count("Received Move SCP") >= 3 and "Move Destination              : PACSGATE" in log
    assert theirs[0][3] not in g.log_text()


def test_the_pacs_association_limit_covers_look_ups_and_client_relays(tmp_root, issuer):
    """dcmqrscp accepts 4 associations at once; `pacs.max_associations = 3` keeps client relays
    and look-ups together under that (the fourth is left for the gateway's readiness C-ECHO):
    a third client waits for a place instead of being refused, and every retrieval (each
    needing a look-up) succeeds."""
    import threading
    import time

    d = tmp_root / "dcmqrscp-limit"
    d.mkdir()
    pacs = Dcmqrscp(d, max_associations=4)
    pacs.load(PATIENTS)
    time.sleep(1)  # dcmqrscp counts its loader's children until they have exited
    pacs.pacs_extra = "max_associations = 3"
    g = Gateway(d, pacs, issuer, name="limit-gateway")
    try:
        token = issuer.mint(patient="PAT-A")
        studies = sorted(pacs.studies["PAT-A"])
        first, second = [], []
        a, b = connect(g, token, first), connect(g, token, second)
        assert a.is_established and b.is_established
        # Two relays hold two places; the look-ups of both retrievals share the third.
        assert get(a, get_query("STUDY", study=studies[0]))[0] == 0x0000
        assert get(b, get_query("STUDY", study=studies[1]))[0] == 0x0000
        assert first and second
        third, waited = [], {}

        def late():
            t0 = time.monotonic()
            c = connect(g, token, third)
            waited["s"] = time.monotonic() - t0
            waited["status"] = get(c, get_query("STUDY", study=studies[0]))[0]
            c.release()

        t = threading.Thread(target=late)
        t.start()
        time.sleep(1.5)
        a.release()
        t.join(30)
        b.release()
        assert waited.get("status") == 0x0000 and third, waited
        assert waited["s"] >= 1.0, "the third client should have waited for a place"
        # The PACS never turned the gateway away for its limit.
        assert "LocalLimitExceeded" not in g.log_text()
    finally:
        stop(g.proc)
        stop(pacs.proc)
    assert "Refusing Association" not in pacs.log_text().replace("Refusing Association (BadAppContext)", "")
