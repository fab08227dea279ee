"""TLS on the gateway's front ends: DICOM TLS (PS3.15 Annex B) with pynetdicom and DCMTK, HTTPS
with requests, dicomweb-client and curl (HTTP/2 by ALPN), mutual TLS, the client certificate in
the audit trail, reload on SIGHUP, and the token never crossing in clear. Certificates come from
CAs the tests make (trustme); everything runs on loopback."""

import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time

import pytest
import requests
import trustme
from dicomweb_client.api import DICOMwebClient
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

from conftest import Gateway, wait_tcp, free_port, stop
from test_dimse_association import dcm_file, identity, write_token
from test_dimse_find import STUDY_ROOT, find, query

READ = "patient/ImagingStudy.rs"


class Pki:
    """A server CA with the gateway's certificate, a CA for workstations with one client
    certificate, and a CA nobody trusts with a certificate of its own."""

    def __init__(self, d):
        d.mkdir(exist_ok=True)
        self.dir = d
        self.server_ca, self.client_ca, self.rogue_ca = trustme.CA(), trustme.CA(), trustme.CA()
        self.ca = self.write("ca.pem", self.server_ca.cert_pem.bytes())
        self.server_cert, self.server_key = self.identity("server", self.server_ca.issue_cert("127.0.0.1", "localhost"))
        self.clients_ca = self.write("clients-ca.pem", self.client_ca.cert_pem.bytes())
        self.ws = self.identity("ws", self.client_ca.issue_cert("ws7.radiology.example", common_name="workstation-7"))
        self.rogue = self.identity("rogue", self.rogue_ca.issue_cert("rogue.example", common_name="rogue"))

    def write(self, name, blob):
        p = self.dir / name
        p.write_bytes(blob)
        return p

    def identity(self, name, cert):
        chain = b"".join(b.bytes() for b in cert.cert_chain_pems)
        return self.write(f"{name}.pem", chain), self.write(f"{name}-key.pem", cert.private_key_pem.bytes())

    def context(self, client=None, ca=None):
        """A client context that trusts the gateway's CA (or `ca`), presenting `client`."""
        ctx = ssl.create_default_context(cafile=str(ca or self.ca))
        if client:
            ctx.load_cert_chain(str(client[0]), str(client[1]))
        return ctx


@pytest.fixture(scope="module")
def pki(tmp_root):
    return Pki(tmp_root / "pki")


class TlsGateway(Gateway):
    def __init__(self, tmp, orthanc, issuer, pki, name, client_auth="optional", cert=None, key=None, **kw):
        self.dimse_tls_port, self.https_port = free_port(), free_port()
        tls = f'[tls]\ncert_file = "{cert or pki.server_cert}"\nkey_file = "{key or pki.server_key}"\n'
        if client_auth != "none":
            tls += f'client_ca_file = "{pki.clients_ca}"\nclient_auth = "{client_auth}"\n'
        super().__init__(tmp, orthanc, issuer, name=name, extra=tls,
                         gateway_extra=f'dimse_tls_listen = "127.0.0.1:{self.dimse_tls_port}"\n'
                                       f'https_listen = "127.0.0.1:{self.https_port}"', **kw)
        wait_tcp(self.dimse_tls_port, self.proc, "pacsgate dicom tls")
        wait_tcp(self.https_port, self.proc, "pacsgate https")
        self.https = f"https://127.0.0.1:{self.https_port}"


@pytest.fixture(scope="module")
def tls_gateway(tmp_root, orthanc, issuer, pki):
    g = TlsGateway(tmp_root, orthanc, issuer, pki, "tls-gateway")
    yield g
    stop(g.proc)


@pytest.fixture(scope="module")
def mtls_gateway(tmp_root, orthanc, issuer, pki):
    g = TlsGateway(tmp_root, orthanc, issuer, pki, "mtls-gateway", client_auth="required")
    yield g
    stop(g.proc)


def tls_associate(port, token, ctx, server_name="127.0.0.1"):
    ae = AE(ae_title="VIEWER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    ae.add_requested_context(Verification)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    return ae.associate("127.0.0.1", port, ae_title="PACSGATE", ext_neg=[identity(token)],
                        tls_args=(ctx, server_name))


def auth(token):
    return {"Authorization": f"Bearer {token}"}


def studies_of(r):
    return {s["0020000D"]["Value"][0] for s in r.json()}


# ---- DICOM TLS ----

def test_a_large_c_get_over_dicom_tls_completes(tls_gateway, orthanc, issuer, pki):
    """Enough data that the socket toward the client fills: every response still goes out (TLS
    records left in the session's buffer once stalled a C-GET for good)."""
    import io
    import os

    import pydicom
    from pydicom.uid import generate_uid
    from pynetdicom import build_role, evt
    from pynetdicom.sop_class import SecondaryCaptureImageStorage, StudyRootQueryRetrieveInformationModelGet

    from dicomdata import make_instance

    study, series = generate_uid(), generate_uid()
    for i in range(12):
        ds = pydicom.dcmread(io.BytesIO(make_instance("PAT-TLSBIG", study, series, 1, 1, i + 1, "20250101")))
        ds.Rows = ds.Columns = 1448
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelData = os.urandom(1448 * 1448 * 2)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        orthanc.upload(buf.getvalue())
    got = []
    ae = AE(ae_title="VIEWER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(SecondaryCaptureImageStorage)
    assoc = ae.associate("127.0.0.1", tls_gateway.dimse_tls_port, ae_title="PACSGATE",
                         ext_neg=[identity(issuer.mint(patient="PAT-TLSBIG")), build_role(SecondaryCaptureImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, lambda e: (got.append(e.request.AffectedSOPInstanceUID), 0)[1])],
                         tls_args=(pki.context(), "127.0.0.1"))
    assert assoc.is_established
    q = pydicom.Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = study
    statuses = [st.Status for st, _ in assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet)]
    assoc.release()
    assert statuses and statuses[-1] == 0x0000, [hex(x) for x in statuses]
    assert len(got) == 12

def test_pynetdicom_over_dicom_tls_is_scoped_as_in_plaintext(tls_gateway, orthanc, issuer, pki):
    assoc = tls_associate(tls_gateway.dimse_tls_port, issuer.mint(patient="PAT-A", scope=READ), pki.context())
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0
        final, matches = find(assoc, query("STUDY"), STUDY_ROOT)
        assert final == 0 and {m.PatientID for m in matches} == {"PAT-A"}
        assert {m.StudyInstanceUID for m in matches} == orthanc.studies["PAT-A"]
        ds = query("STUDY", patient_id="PAT-B")
        assert find(assoc, ds, STUDY_ROOT) == (0x0124, [])
    finally:
        assoc.release()


def test_dcmtk_storescu_stores_over_dicom_tls_with_its_jwt(tls_gateway, orthanc, issuer, pki, tmp_root):
    f = dcm_file(tmp_root)
    token = write_token(tmp_root, issuer.mint(patient="PAT-W", scope="patient/ImagingStudy.cruds"), "tls.jwt")
    r = subprocess.run(
        ["/usr/bin/storescu", "-v", "+tla", "+cf", str(pki.ca), "-aet", "VIEWER", "-aec", "PACSGATE",
         "--jwt", str(token), "127.0.0.1", str(tls_gateway.dimse_tls_port), str(f)],
        capture_output=True, text=True, timeout=60,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "Association Accepted" in out, out
    import pydicom
    assert orthanc.holds(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
    # A CA it does not know: DCMTK refuses the gateway's certificate, nothing is sent.
    r = subprocess.run(
        ["/usr/bin/storescu", "+tla", "+cf", str(pki.clients_ca), "-aet", "VIEWER", "-aec", "PACSGATE",
         "--jwt", str(token), "127.0.0.1", str(tls_gateway.dimse_tls_port), str(f)],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode != 0 and "Association Accepted" not in r.stdout + r.stderr


def test_dcmtk_echoscu_completes_the_handshake_and_is_refused_without_a_token(tls_gateway, pki):
    r = subprocess.run(["/usr/bin/echoscu", "-v", "+tla", "+cf", str(pki.ca), "-aec", "PACSGATE", "127.0.0.1",
                        str(tls_gateway.dimse_tls_port)], capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    assert "Association Rejected" in out, out


def test_only_tls_1_2_and_1_3_are_spoken(tls_gateway, pki):
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = pki.context()
        ctx.minimum_version = ctx.maximum_version = version
        with socket.create_connection(("127.0.0.1", tls_gateway.dimse_tls_port), timeout=10) as s:
            with ctx.wrap_socket(s, server_hostname="127.0.0.1") as t:
                assert t.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
    # TLS 1.1 offered by a client that would accept it: the gateway does not.
    import warnings
    warnings.simplefilter("ignore", DeprecationWarning)
    ctx = pki.context()
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    with socket.create_connection(("127.0.0.1", tls_gateway.https_port), timeout=10) as s:
        with pytest.raises(ssl.SSLError):
            ctx.wrap_socket(s, server_hostname="127.0.0.1")


# ---- HTTPS ----

def test_https_with_requests_and_dicomweb_client(tls_gateway, orthanc, issuer, pki):
    token = issuer.mint(patient="PAT-A", scope=READ)
    r = requests.get(f"{tls_gateway.https}/dicom-web/studies", headers=auth(token), verify=str(pki.ca), timeout=30)
    assert r.status_code == 200 and studies_of(r) == orthanc.studies["PAT-A"]
    r = requests.get(f"{tls_gateway.https}/dicom-web/studies", headers=auth(token), verify=str(pki.ca),
                     params={"PatientID": "PAT-B"}, timeout=30)
    assert r.status_code == 403
    assert requests.get(f"{tls_gateway.https}/healthz", verify=str(pki.ca), timeout=10).status_code == 200
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{tls_gateway.https}/healthz", timeout=10)  # the system's CAs do not know it
    session = requests.Session()
    session.verify = str(pki.ca)
    session.trust_env = False  # else REQUESTS_CA_BUNDLE, where set, replaces verify
    c = DICOMwebClient(url=f"{tls_gateway.https}/dicom-web", headers=auth(token), session=session)
    assert {s["0020000D"]["Value"][0] for s in c.search_for_studies()} == orthanc.studies["PAT-A"]


def test_https_negotiates_http2_by_alpn_and_http1_when_asked(tls_gateway, orthanc, issuer, pki):
    token = issuer.mint(patient="PAT-A", scope=READ)
    for flag, version in (("--http2", "2"), ("--http1.1", "1.1")):
        r = subprocess.run(["curl", "-sS", flag, "--cacert", str(pki.ca), "-H", f"Authorization: Bearer {token}",
                            "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
                            f"{tls_gateway.https}/dicom-web/studies"], capture_output=True, text=True, timeout=30)
        assert r.stdout.strip() == f"{version} 200", (flag, r.stdout, r.stderr)
    # Several requests on one HTTP/2 connection, each judged on its own.
    r = subprocess.run(["curl", "-sS", "--http2", "--cacert", str(pki.ca), "-H", f"Authorization: Bearer {token}",
                        "-o", "/dev/null", "-o", "/dev/null", "-w", "%{http_version} %{http_code} %{num_connects}\\n",
                        f"{tls_gateway.https}/dicom-web/studies",
                        f"{tls_gateway.https}/dicom-web/studies?PatientID=PAT-B"],
                       capture_output=True, text=True, timeout=30)
    lines = r.stdout.split()
    assert lines[:3] == ["2", "200", "1"] and lines[3:5] == ["2", "403"], r.stdout


# ---- mutual TLS ----

def test_mutual_tls_lets_only_signed_workstations_in_and_names_them(mtls_gateway, issuer, pki):
    token = issuer.mint(patient="PAT-A", scope=READ)
    # No certificate, or one the CA did not sign: no association, no HTTP answer.
    for client in (None, pki.rogue):
        assoc = tls_associate(mtls_gateway.dimse_tls_port, token, pki.context(client))
        assert not assoc.is_established
        with pytest.raises((requests.exceptions.SSLError, requests.exceptions.ConnectionError)):
            requests.get(f"{mtls_gateway.https}/healthz", verify=str(pki.ca), timeout=10,
                         cert=tuple(map(str, client)) if client else None)
    assoc = tls_associate(mtls_gateway.dimse_tls_port, token, pki.context(pki.ws))
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    r = requests.get(f"{mtls_gateway.https}/dicom-web/studies", headers=auth(token), verify=str(pki.ca),
                     cert=(str(pki.ws[0]), str(pki.ws[1])), timeout=30)
    assert r.status_code == 200
    # The workstation is named beside the user in the audit trail, on both protocols.
    log = mtls_gateway.log_text()
    audit = [l for l in log.splitlines() if "pacsgate::audit" in l and "CN=workstation-7" in l]
    assert any("channel=\"dimse\"" in l or "channel=dimse" in l for l in audit), audit[-3:]
    assert any("channel=\"http\"" in l or "channel=http" in l for l in audit), audit[-3:]
    assert token not in log


def test_dcmtk_presents_its_workstation_certificate(mtls_gateway, issuer, pki, tmp_root):
    f = dcm_file(tmp_root)
    token = write_token(tmp_root, issuer.mint(patient="PAT-W", scope="patient/ImagingStudy.cruds"), "mtls.jwt")
    common = ["+cf", str(pki.ca), "-aet", "VIEWER", "-aec", "PACSGATE", "--jwt", str(token),
              "127.0.0.1", str(mtls_gateway.dimse_tls_port), str(f)]
    r = subprocess.run(["/usr/bin/storescu", "-v", "+tls", str(pki.ws[1]), str(pki.ws[0]), *common],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Association Accepted" in r.stdout + r.stderr, r.stdout + r.stderr
    r = subprocess.run(["/usr/bin/storescu", "-v", "+tla", *common], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "Association Accepted" not in r.stdout + r.stderr


def test_optional_client_auth_admits_clients_without_a_certificate(tls_gateway, issuer, pki):
    token = issuer.mint(patient="PAT-A", scope=READ)
    assoc = tls_associate(tls_gateway.dimse_tls_port, token, pki.context())
    assert assoc.is_established
    assoc.release()
    # A certificate the CA did not sign is refused even when one is optional.
    assoc = tls_associate(tls_gateway.dimse_tls_port, token, pki.context(pki.rogue))
    assert not assoc.is_established


# ---- the token never crosses in clear ----

class Relay:
    """A TCP relay of the test's own that records every byte from the client."""

    def __init__(self, port):
        self.seen = bytearray()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.target = port
        threading.Thread(target=self.run, daemon=True).start()

    def run(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self.pipe, args=(c, u, True), daemon=True).start()
            threading.Thread(target=self.pipe, args=(u, c, False), daemon=True).start()

    def pipe(self, a, b, record):
        try:
            while data := a.recv(65536):
                if record:
                    self.seen += data
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.sock.close()


def test_the_token_does_not_cross_a_tls_association_in_clear(tls_gateway, issuer, pki):
    token = issuer.mint(patient="PAT-A", scope=READ)
    plain, secure = Relay(tls_gateway.dimse_port), Relay(tls_gateway.dimse_tls_port)
    try:
        # The capture works: over plaintext the token is in the bytes.
        ae = AE(ae_title="VIEWER")
        ae.add_requested_context(Verification)
        a = ae.associate("127.0.0.1", plain.port, ae_title="PACSGATE", ext_neg=[identity(token)])
        assert a.is_established
        a.release()
        assert token.encode() in plain.seen
        a = tls_associate(secure.port, token, pki.context())
        assert a.is_established and a.send_c_echo().Status == 0
        a.release()
        assert len(secure.seen) > 500
        assert token.encode() not in secure.seen
        for part in token.split("."):
            assert part.encode() not in secure.seen
    finally:
        plain.close()
        secure.close()


# ---- reload ----

def test_sighup_rereads_the_certificate_and_keeps_running_associations(tmp_root, orthanc, issuer, pki):
    d = tmp_root / "reload"
    d.mkdir(exist_ok=True)
    cert, key = d / "cert.pem", d / "key.pem"
    shutil.copy(pki.server_cert, cert)
    shutil.copy(pki.server_key, key)
    g = TlsGateway(tmp_root, orthanc, issuer, pki, "reload-gateway", client_auth="none", cert=cert, key=key)
    try:
        token = issuer.mint(patient="PAT-A", scope=READ)
        running = tls_associate(g.dimse_tls_port, token, pki.context())
        assert running.is_established
        new_ca = trustme.CA()
        new = new_ca.issue_cert("127.0.0.1")
        new_ca_file = pki.write("new-ca.pem", new_ca.cert_pem.bytes())
        cert.write_bytes(b"".join(b.bytes() for b in new.cert_chain_pems))
        key.write_bytes(new.private_key_pem.bytes())
        g.proc.send_signal(signal.SIGHUP)
        deadline = time.time() + 10
        while "TLS certificate and key re-read" not in g.log_text() and time.time() < deadline:
            time.sleep(0.1)
        assert "TLS certificate and key re-read" in g.log_text()
        # New connections get the new identity, on both listeners; the running one goes on.
        a = tls_associate(g.dimse_tls_port, token, pki.context(ca=new_ca_file))
        assert a.is_established
        a.release()
        assert requests.get(f"{g.https}/healthz", verify=str(new_ca_file), timeout=10).status_code == 200
        assert running.send_c_echo().Status == 0
        # A file that does not load is refused; the identity loaded last stays.
        cert.write_text("not a certificate\n")
        g.proc.send_signal(signal.SIGHUP)
        deadline = time.time() + 10
        while "do not load" not in g.log_text() and time.time() < deadline:
            time.sleep(0.1)
        assert "do not load" in g.log_text()
        assert requests.get(f"{g.https}/healthz", verify=str(new_ca_file), timeout=10).status_code == 200
        assert running.send_c_echo().Status == 0
        running.release()
    finally:
        stop(g.proc)


# ---- configuration that cannot leak ----

def test_plaintext_on_the_network_warns_and_require_tls_refuses_it(tmp_root, pki):
    from conftest import binary

    base = f"""
[gateway]
ae_title = "PACSGATE"
dimse_listen = "0.0.0.0:11112"
dimse_tls_listen = "127.0.0.1:2762"
https_listen = "127.0.0.1:8443"
public_url = "https://127.0.0.1:8443"
{{extra}}
[tls]
cert_file = "{pki.server_cert}"
key_file = "{pki.server_key}"
[pacs]
ae_title = "ORTHANC"
address = "127.0.0.1:4242"
[[issuers]]
issuer = "http://127.0.0.1:9400"
"""
    cfg = tmp_root / "leaky.toml"
    cfg.write_text(base.replace("{extra}", ""))
    r = subprocess.run([str(binary()), "check-config", "--config", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "warning: gateway.dimse_listen" in r.stderr and "0.0.0.0:11112" in r.stderr
    cfg.write_text(base.replace("{extra}", "require_tls = true"))
    r = subprocess.run([str(binary()), "check-config", "--config", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 2 and "gateway.dimse_listen" in r.stderr and "require_tls" in r.stderr, r.stderr
    # Loopback plaintext is fine even then; TLS files that do not load are named by key.
    cfg.write_text(base.replace("{extra}", "require_tls = true").replace("0.0.0.0:11112", "127.0.0.1:11112")
                   .replace(str(pki.server_key), str(pki.ca)))
    r = subprocess.run([str(binary()), "check-config", "--config", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 2 and "tls.key_file" in r.stderr, r.stderr
