"""Reload and stop as an operator drives them: SIGHUP re-reads the configuration file and
applies it to new associations and requests while running ones keep theirs; a file that does
not load is refused with its key named and changes nothing; settings bound to the listeners
wait for a restart. SIGTERM lets running work finish within gateway.drain_secs, then ends what
is left, on DIMSE and on DICOMweb, and exits 0."""

import io
import signal
import threading
import time

import pytest
import requests
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import build_role, evt
from pynetdicom.sop_class import (
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelFind as STUDY_FIND,
    StudyRootQueryRetrieveInformationModelGet as STUDY_GET,
)

from conftest import Gateway, Issuer, Orthanc, free_port, stop
from test_dimse_association import associate
from test_dimse_faults import associate as open_assoc
from test_dimse_faults import big_instance
from test_dimse_move import Destination, move, query

READ = "patient/ImagingStudy.rs"


def wait_log(g, text, count=1, timeout=15):
    deadline = time.time() + timeout
    while g.log_text().count(text) < count and time.time() < deadline:
        time.sleep(0.1)
    assert g.log_text().count(text) >= count, f"no {text!r} in the log"


def reload(g):
    """Sends SIGHUP and waits for the gateway to say how it went."""
    done = g.log_text().count("SIGHUP: configuration re-read") + g.log_text().count("SIGHUP: the configuration file is refused")
    g.proc.send_signal(signal.SIGHUP)
    deadline = time.time() + 15
    while time.time() < deadline:
        t = g.log_text()
        if t.count("SIGHUP: configuration re-read") + t.count("SIGHUP: the configuration file is refused") > done:
            return
        time.sleep(0.05)
    raise AssertionError("the gateway did not answer SIGHUP")


def studies(g, token):
    return requests.get(f"{g.public_url}/dicom-web/studies", headers={"Authorization": f"Bearer {token}"}, timeout=30)


def c_find(assoc):
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = ""
    return [s.Status for s, _ in assoc.send_c_find(q, STUDY_FIND) if s][-1]


@pytest.fixture(scope="module")
def second_issuer(tmp_root):
    d = tmp_root / "reload-second-issuer"
    d.mkdir()
    i = Issuer(d)
    yield i
    stop(i.proc)


def test_sighup_swaps_the_issuers_for_new_work_while_running_associations_keep_theirs(tmp_root, orthanc, issuer, second_issuer):
    d = tmp_root / "reload-issuers"
    d.mkdir()
    g = Gateway(d, orthanc, issuer, name="reload-issuers")
    try:
        old, new = issuer.mint(patient="PAT-A", scope=READ), second_issuer.mint(patient="PAT-A", scope=READ)
        assert studies(g, new).status_code == 401
        assoc, _ = associate(g, new)
        assert assoc.is_rejected
        running, _ = associate(g, old)
        assert running.is_established
        # The operator trusts the second issuer instead of the first.
        g.config.write_text(g.config.read_text().replace(f'issuer = "{issuer.url}"', f'issuer = "{second_issuer.url}"'))
        reload(g)
        assert "SIGHUP: configuration re-read" in g.log_text()
        assert "takes effect at the next restart" not in g.log_text()
        # New associations and requests: the new issuer only.
        assert studies(g, new).status_code == 200
        assert studies(g, old).status_code == 401
        a, _ = associate(g, new)
        assert a.is_established and c_find(a) == 0
        a.release()
        a, _ = associate(g, old)
        assert a.is_rejected
        # The association that was running goes on under the configuration it began with.
        assert running.send_c_echo().Status == 0
        assert c_find(running) == 0
        running.release()
        # /readyz checks the issuers now configured: the dropped one is not waited for.
        deadline = time.time() + 20
        while time.time() < deadline:
            r = requests.get(f"{g.public_url}/readyz", timeout=5)
            if r.status_code == 200:
                break
            time.sleep(0.5)
        assert r.status_code == 200, r.text
        assert issuer.url not in r.text
    finally:
        stop(g.proc)


def test_sighup_refuses_a_file_that_does_not_load_and_keeps_serving(tmp_root, orthanc, issuer):
    d = tmp_root / "reload-invalid"
    d.mkdir()
    g = Gateway(d, orthanc, issuer, name="reload-invalid", gateway_extra="require_tls = true")
    try:
        token = issuer.mint(patient="PAT-A", scope=READ)
        good = g.config.read_text()
        g.config.write_text(good.replace("idle_timeout_secs = 60", "idle_timeout_secs = -1"))
        reload(g)
        log = g.log_text()
        assert "SIGHUP: the configuration file is refused; the running configuration stays" in log
        assert "key=limits.idle_timeout_secs" in log
        assert studies(g, token).status_code == 200
        a, _ = associate(g, token)
        assert a.is_established and c_find(a) == 0
        a.release()
        # require_tls holds until a restart: a file that turns it off cannot bring in a
        # plaintext leg off this machine meanwhile.
        g.config.write_text(good.replace("require_tls = true", "require_tls = false").replace(
            f"127.0.0.1:{orthanc.dicom_port}", "10.1.2.3:104"))
        reload(g)
        assert "key=pacs.address" in g.log_text() and "(gateway.require_tls is set)" in g.log_text()
        # A key the gateway does not know, a file that is not TOML, a file that is gone: the same.
        g.config.write_text(good.replace("[pacs]\n", "[pacs]\nmax_weirdness = 3\n"))
        reload(g)
        assert "max_weirdness" in g.log_text()
        g.config.write_text("[gateway\n")
        reload(g)
        g.config.unlink()
        reload(g)
        assert g.log_text().count("the configuration file is refused") == 5
        assert "cannot read the file" in g.log_text()
        assert studies(g, token).status_code == 200
        assert g.proc.poll() is None
    finally:
        stop(g.proc)


def test_sighup_names_what_waits_for_a_restart_and_applies_the_rest(tmp_root, issuer):
    d = tmp_root / "reload-restart-only"
    d.mkdir()
    receive, dest_port = free_port(), free_port()
    o = Orthanc(d, modalities={"PACSGATE": ["PACSGATE", "127.0.0.1", receive]})
    study, series = generate_uid(), generate_uid()
    buf = io.BytesIO()
    big_instance("PAT-R", study, series, 1).save_as(buf, enforce_file_format=True)
    o.upload(buf.getvalue())
    g = Gateway(d, o, issuer, name="reload-restart-only", receive_port=receive)
    dest = Destination(dest_port)
    try:
        token = issuer.mint(patient="PAT-R", scope=READ)
        assert move(g, token, query("STUDY", study=study), dest="NEWDEST").Status == 0xA801
        other_port = free_port()
        text = g.config.read_text()
        text = text.replace(f'dimse_listen = "127.0.0.1:{g.dimse_port}"', f'dimse_listen = "127.0.0.1:{other_port}"\ndrain_secs = 3')
        text += f'\n[[destinations]]\nae_title = "NEWDEST"\naddress = "127.0.0.1:{dest_port}"\n'
        g.config.write_text(text)
        reload(g)
        log = g.log_text()
        for key in ("gateway.dimse_listen", "gateway.drain_secs"):
            assert f"key={key}" in log or f'key="{key}"' in log, key
        assert "takes effect at the next restart" in log
        # The listener stays where it was; the new destination is there at once.
        final = move(g, token, query("STUDY", study=study), dest="NEWDEST")
        assert final.Status == 0x0000
        assert len(dest.received) == 1
    finally:
        dest.stop()
        stop(g.proc)
        stop(o.proc)


@pytest.fixture(scope="module")
def slow_study(tmp_root):
    """On an Orthanc of its own: a study of 4 instances of 1 MB, and one of 8 instances of 4 MB
    (more than the socket buffers between a client that stops reading and the gateway hold)."""
    d = tmp_root / "reload-stop"
    d.mkdir()
    o = Orthanc(d)
    studies = {}
    for name, count, mb in (("small", 4, 1), ("big", 8, 4)):
        study, series = generate_uid(), generate_uid()
        for _ in range(count):
            buf = io.BytesIO()
            big_instance("PAT-S", study, series, mb).save_as(buf, enforce_file_format=True)
            o.upload(buf.getvalue())
        studies[name] = study
    yield d, o, studies
    stop(o.proc)


def test_sigterm_lets_a_running_wado_retrieval_finish_then_exits_0(slow_study, issuer):
    d, o, studies = slow_study
    study = studies["small"]
    g = Gateway(d, o, issuer, name="stop-web")
    try:
        token = issuer.mint(patient="PAT-S", scope=READ)
        r = requests.get(f"{g.public_url}/dicom-web/studies/{study}", stream=True, timeout=60,
                         headers={"Authorization": f"Bearer {token}", "Accept": 'multipart/related; type="application/dicom"'})
        assert r.status_code == 200
        it = r.iter_content(64 * 1024)
        body = next(it)
        g.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        # Stopped accepting: a new connection is refused, the running response goes on.
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{g.public_url}/healthz", timeout=5)
        for chunk in it:
            body += chunk
        assert body.count(b"DICM") == 4
        assert g.proc.wait(timeout=15) == 0
        assert "drain" in g.log_text()
    finally:
        stop(g.proc)


def test_sigterm_ends_what_outlasts_drain_secs_on_both_protocols(slow_study, issuer):
    """A client that stops reading holds its C-GET and its WADO response; after
    gateway.drain_secs the gateway aborts the association, drops the connection and exits 0."""
    d, o, studies = slow_study
    study = studies["big"]
    g = Gateway(d, o, issuer, name="stop-cut", gateway_extra="drain_secs = 2")
    release, storing = threading.Event(), threading.Event()
    try:
        token = issuer.mint(patient="PAT-S", scope=READ)

        def on_store(e):
            storing.set()
            release.wait(30)
            return 0x0000

        stuck = open_assoc(g, token, [STUDY_GET, SecondaryCaptureImageStorage],
                           ext=[build_role(SecondaryCaptureImageStorage, scp_role=True)],
                           handlers=[(evt.EVT_C_STORE, on_store)])
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = study
        results = []
        getter = threading.Thread(target=lambda: results.extend(stuck.send_c_get(q, STUDY_GET)), daemon=True)
        getter.start()
        r = requests.get(f"{g.public_url}/dicom-web/studies/{study}", stream=True, timeout=60,
                         headers={"Authorization": f"Bearer {token}", "Accept": 'multipart/related; type="application/dicom"'})
        assert r.status_code == 200
        assert storing.wait(20), "the C-GET is under way"
        t0 = time.monotonic()
        g.proc.send_signal(signal.SIGTERM)
        assert g.proc.wait(timeout=20) == 0
        took = time.monotonic() - t0
        assert 1.5 < took < 10, f"stopped after {took:.1f} s with drain_secs = 2"
        assert "drain time over; aborting what is left" in g.log_text()
        release.set()
        deadline = time.monotonic() + 10
        while stuck.is_established and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stuck.is_aborted
        # The unread WADO response ended with the connection, short of the study.
        with pytest.raises(requests.RequestException):
            for _ in r.iter_content(1 << 20):
                pass
    finally:
        release.set()
        stop(g.proc)
