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
