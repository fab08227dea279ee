"""TLS toward the PACS and the C-MOVE destinations: Orthanc with its DICOM TLS options as the
upstream (mutual TLS both ways), its DICOMweb behind nginx terminating TLS and requiring the
gateway's client certificate (Orthanc 1.10's own HTTPS server crashes on the first request here),
the C-MOVE receiver over TLS, a destination that speaks only TLS, and a PACS whose certificate does
not verify, which is an upstream failure and never a fallback to plaintext. CAs and certificates
are made by the tests (trustme), all on loopback."""

import io
import ssl
import threading

import pydicom
import pytest
import requests
import trustme
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as STUDY_MOVE

from conftest import Gateway, Orthanc, free_port, stop
from nginx import Nginx
from dicomdata import make_instance
from test_dimse_association import associate
from test_dimse_find import STUDY_ROOT, find, query

PID = "PAT-T"


class UpstreamPki:
    """The PACS's CA (Orthanc's certificate, which it also presents when it connects to the
    receiver), the gateway's CA (its server certificate and its client certificate, which
    Orthanc trusts), and a destination's CA."""

    def __init__(self, d):
        d.mkdir(exist_ok=True)
        self.dir = d
        pacs_ca, gw_ca, dest_ca, self.stranger = trustme.CA(), trustme.CA(), trustme.CA(), trustme.CA()
        self.pacs_ca = self.write("pacs-ca.pem", pacs_ca.cert_pem.bytes())
        self.gw_ca = self.write("gw-ca.pem", gw_ca.cert_pem.bytes())
        self.dest_ca = self.write("dest-ca.pem", dest_ca.cert_pem.bytes())
        self.stranger_ca = self.write("stranger-ca.pem", self.stranger.cert_pem.bytes())
        self.orthanc = self.pair("orthanc", pacs_ca.issue_cert("127.0.0.1"))
        self.gw_server = self.pair("gw-server", gw_ca.issue_cert("127.0.0.1"))
        self.gw_client = self.pair("gw-client", gw_ca.issue_cert("pacsgate.client", common_name="pacsgate"))
        self.dest = self.pair("dest", dest_ca.issue_cert("127.0.0.1"))
        # Signed by the PACS's CA, but for another machine (sites often have one CA for all).
        self.impostor = self.pair("impostor", pacs_ca.issue_cert("workstation.example"))

    def write(self, name, blob):
        p = self.dir / name
        p.write_bytes(blob)
        return p

    def pair(self, name, cert):
        return (self.write(f"{name}.pem", b"".join(b.bytes() for b in cert.cert_chain_pems)),
                self.write(f"{name}-key.pem", cert.private_key_pem.bytes()))


class TlsDestination:
    """A C-MOVE destination that speaks only DICOM TLS (pynetdicom with an SSL context)."""

    def __init__(self, pki, ae_title="TLSDEST"):
        self.port = free_port()
        self.received = []
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(pki.dest[0]), str(pki.dest[1]))
        self.ae = AE(ae_title=ae_title)
        self.ae.supported_contexts = AllStoragePresentationContexts

        def on_store(event):
            self.received.append(event.dataset.SOPInstanceUID)
            return 0x0000

        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False, ssl_context=ctx,
                                           evt_handlers=[(evt.EVT_C_STORE, on_store)])

    def close(self):
        self.server.shutdown()


@pytest.fixture(scope="module")
def upki(tmp_root):
    return UpstreamPki(tmp_root / "upstream-pki")


@pytest.fixture(scope="module")
def env(tmp_root, issuer, upki):
    d = tmp_root / "tls-upstream"
    d.mkdir(exist_ok=True)
    receive = free_port()
    orthanc = Orthanc(d, name="orthanc-tls", modalities={
        "PACSGATE": {"AET": "PACSGATE", "Host": "127.0.0.1", "Port": receive, "UseDicomTls": True}}, extra={
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(upki.orthanc[0]),
        "DicomTlsPrivateKey": str(upki.orthanc[1]),
        "DicomTlsTrustedCertificates": str(upki.gw_ca),
        "DicomTlsRemoteCertificateRequired": True,
    })
    web = Nginx(d, orthanc.http_port, name="nginx-tls", tls=upki.orthanc, client_ca=upki.gw_ca)
    study = generate_uid()
    sops = []
    for n in range(2):
        data = make_instance(PID, study, generate_uid(), 9800 + n, 1, 1, "20240101")
        orthanc.upload(data)
        sops.append(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)
    other = make_instance("PAT-U", generate_uid(), generate_uid(), 9810, 1, 1, "20240101")
    orthanc.upload(other)
    dest = TlsDestination(upki)
    pacs_tls = (f'[pacs.tls]\ndimse = true\nca_file = "{upki.pacs_ca}"\ncert_file = "{upki.gw_client[0]}"\n'
                f'key_file = "{upki.gw_client[1]}"\nreceive_tls_listen = "127.0.0.1:{receive}"\n')
    tls = f'[tls]\ncert_file = "{upki.gw_server[0]}"\nkey_file = "{upki.gw_server[1]}"\n'
    dests = f'[[destinations]]\nae_title = "TLSDEST"\naddress = "127.0.0.1:{dest.port}"\ntls = true\nca_file = "{upki.dest_ca}"\n'
    g = Gateway(d, orthanc, issuer, name="gw-tls-upstream", dicomweb_url=f"{web.url}/dicom-web",
                extra=pacs_tls + tls + dests)
    yield {"orthanc": orthanc, "gateway": g, "study": study, "sops": sops, "dest": dest, "dir": d, "web": web,
           "receive": receive}
    stop(g.proc)
    dest.close()
    stop(web.proc)
    stop(orthanc.proc)


def test_dimse_toward_a_tls_pacs_is_scoped_as_in_plaintext(env, issuer):
    g = env["gateway"]
    assoc, _ = associate(g, issuer.mint(patient=PID))
    assert assoc.is_established
    try:
        final, matches = find(assoc, query("STUDY"), STUDY_ROOT)
        assert final == 0 and {m.StudyInstanceUID for m in matches} == {env["study"]}
        assert {m.PatientID for m in matches} == {PID}
    finally:
        assoc.release()


def test_dicomweb_toward_an_https_pacs(env, issuer):
    g = env["gateway"]
    token = issuer.mint(patient=PID)
    r = requests.get(f"{g.public_url}/dicom-web/studies", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 200, r.text
    assert {s["0020000D"]["Value"][0] for s in r.json()} == {env["study"]}
    r = requests.get(f"{g.public_url}/dicom-web/studies/{env['study']}", timeout=60,
                     headers={"Authorization": f"Bearer {token}", "Accept": "multipart/related; type=\"application/dicom\""})
    assert r.status_code == 200 and r.content.count(b"DICM") == 2
    # It went over TLS with the gateway's client certificate (nginx requires one).
    assert env["web"].access_log().count("/dicom-web/") >= 2
    # SIGHUP re-reads [pacs.tls]; the PACS is reached as before on both protocols.
    import signal
    import time
    g.proc.send_signal(signal.SIGHUP)
    deadline = time.time() + 10
    while "TLS certificate and key re-read" not in g.log_text() and time.time() < deadline:
        time.sleep(0.1)
    assert "TLS certificate and key re-read" in g.log_text()
    r = requests.get(f"{g.public_url}/dicom-web/studies", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 200 and {s["0020000D"]["Value"][0] for s in r.json()} == {env["study"]}
    assoc, _ = associate(g, token)
    assert assoc.is_established and find(assoc, query("STUDY"), STUDY_ROOT)[0] == 0
    assoc.release()


def test_c_move_over_tls_from_the_pacs_to_a_tls_destination(env, issuer, upki):
    g, dest = env["gateway"], env["dest"]
    ae = AE(ae_title="VIEWER")
    ae.add_requested_context(STUDY_MOVE)
    from test_dimse_association import identity
    assoc = ae.associate("127.0.0.1", g.dimse_port, ae_title="PACSGATE", ext_neg=[identity(issuer.mint(patient=PID))])
    assert assoc.is_established
    q = pydicom.Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = env["study"]
    statuses = [s.Status for s, _ in assoc.send_c_move(q, "TLSDEST", STUDY_MOVE)]
    assoc.release()
    assert statuses[-1] == 0x0000, [hex(s) for s in statuses]
    assert sorted(dest.received) == sorted(env["sops"])
    # The receiver over TLS takes the PACS by its certificate: a peer with none, with one of
    # another CA, or with one of the PACS's CA for another name gets no association (whatever
    # AE title it claims).
    from pynetdicom.sop_class import SecondaryCaptureImageStorage
    for client in (None, upki.gw_client, upki.impostor):
        ctx = ssl.create_default_context(cafile=str(upki.gw_ca))
        if client:
            ctx.load_cert_chain(str(client[0]), str(client[1]))
        ae = AE(ae_title="ORTHANC")
        ae.add_requested_context(SecondaryCaptureImageStorage)
        a = ae.associate("127.0.0.1", env["receive"], ae_title="PACSGATE", tls_args=(ctx, "127.0.0.1"))
        assert not a.is_established, client


def test_a_pacs_whose_certificate_does_not_verify_is_an_upstream_failure(env, issuer, upki):
    """Another CA than the PACS's: every leg fails as the PACS being down does, and nothing is
    tried in plaintext."""
    d, orthanc = env["dir"], env["orthanc"]
    wrong = (f'[pacs.tls]\ndimse = true\nca_file = "{upki.stranger_ca}"\ncert_file = "{upki.gw_client[0]}"\n'
             f'key_file = "{upki.gw_client[1]}"\n')
    g = Gateway(d, orthanc, issuer, name="gw-wrong-ca", dicomweb_url=f"{env['web'].url}/dicom-web", extra=wrong)
    try:
        token = issuer.mint(patient=PID)
        assoc, received = associate(g, token)
        assert assoc.is_rejected
        rj = [p for p in received if getattr(p, "result", None) in (1, 2)]
        assert rj and rj[0].result == 2, "rejected-transient: the PACS is not reachable as it must be"
        r = requests.get(f"{g.public_url}/dicom-web/studies", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert r.status_code == 502
        assert "TLS with the PACS" in g.log_text()
    finally:
        stop(g.proc)
