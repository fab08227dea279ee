"""Fixtures that run the real parts on loopback: Orthanc (with generated patients), the
development issuer, and `pacsgate serve`. Every server gets free loopback ports and a
temporary directory; everything is stopped at the end of the session.

Nothing here is skipped when a dependency is missing: a missing Orthanc, dcmtk or
pacsgate binary is an error, because a green run without them would prove nothing.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import io

import pydicom
import pytest
import requests

from dicomdata import generate

ROOT = Path(__file__).resolve().parents[2]
ORTHANC_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"

# The patients the tests rely on. Two ids that differ only by case are two patients; an id
# with padding spaces is the same patient as without (PatientID is LO).
PATIENTS = {
    "PAT-A": {"studies": 3, "series": 2, "instances": 2},
    "PAT-B": {"studies": 2, "series": 1, "instances": 2},
    "CASE01": {"studies": 1, "series": 1, "instances": 1},
    "case01": {"studies": 2, "series": 1, "instances": 1},
}
# Stored as "SPACE01" once and as "SPACE01  " once: Orthanc (and DICOM) see one patient.
# "PAT-W" is not loaded: store tests write it, so the counts of the patients above never change.
PADDED = [("SPACE01", 1), ("SPACE01  ", 1)]


def binary() -> Path:
    path = Path(os.environ.get("PACSGATE_BIN", ROOT / "target" / "debug" / "pacsgate"))
    if not path.exists():
        raise RuntimeError(f"{path} does not exist: build it first (cargo build)")
    return path


def peak_memory_mib(pid: int) -> float:
    """The peak resident memory (VmHWM) of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_tcp(port: int, proc: subprocess.Popen, what: str, timeout: float = 30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout}s")


def stop(proc: subprocess.Popen):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# PACSGATE_DICOMWEB=translate: every gateway answers DICOMweb by translation to DIMSE (no
# pacs.dicomweb_url), in front of an Orthanc whose DICOMweb plugin is disabled.
TRANSLATE = os.environ.get("PACSGATE_DICOMWEB") == "translate"


class Orthanc:
    def __init__(self, tmp: Path, modalities=None, extra=None, https_ca=None, name="orthanc", ports=None):
        """`extra`: more Orthanc settings (TLS ones, say); `https_ca`: its REST API is HTTPS,
        with a certificate this CA file verifies; `ports`: (DICOM, HTTP) chosen beforehand."""
        self.dicom_port, self.http_port = ports or (free_port(), free_port())
        self.aet = "ORTHANC"
        self.verify = str(https_ca) if https_ca else True
        self.url = f"{'https' if https_ca else 'http'}://127.0.0.1:{self.http_port}"
        storage = tmp / f"{name}-db"
        storage.mkdir()
        cfg = {
            "Name": "pacsgate-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
            "DicomCheckCalledAet": False,
            "UnknownSopClassAccepted": True,
            "SynchronousCMove": True,
            "SaveJobs": False,
            "StableAge": 1,
            "Plugins": [ORTHANC_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "DicomModalities": modalities or {},
            **(extra or {}),
        }
        self.config = tmp / f"{name}.json"
        self.config.write_text(json.dumps(cfg, indent=2))
        self.log_path = tmp / f"{name}.log"
        self.log = open(self.log_path, "w")
        exe = shutil.which("Orthanc")
        if exe is None:
            raise RuntimeError("Orthanc is not installed (Debian package orthanc)")
        if not Path(ORTHANC_PLUGIN).exists():
            raise RuntimeError(f"{ORTHANC_PLUGIN} is missing (Debian package orthanc-dicomweb)")
        self.exe = exe
        self.tmp = tmp
        self.start()

    def start(self):
        """Starts (or restarts, on the same storage and ports) the Orthanc process."""
        env = dict(os.environ, TCP_NODELAY="1")
        self.proc = subprocess.Popen([self.exe, str(self.config)], stdout=self.log, stderr=subprocess.STDOUT, env=env)
        tmp = self.tmp
        deadline = time.time() + 30
        while True:
            if self.proc.poll() is not None:
                self.log.flush()
                tail = self.log_path.read_text(errors="replace")[-1500:]
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}; its log ends:\n{tail}")
            try:
                if requests.get(f"{self.url}/system", timeout=1, verify=self.verify).ok:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                raise RuntimeError("Orthanc did not start within 30 s")
            time.sleep(0.1)
        wait_tcp(self.dicom_port, self.proc, "Orthanc DICOM")

    def upload(self, data: bytes):
        r = requests.post(f"{self.url}/instances", data=data, headers={"Content-Type": "application/dicom"}, timeout=30,
                          verify=self.verify)
        r.raise_for_status()

    def holds(self, sop_uid: str) -> bool:
        r = requests.post(f"{self.url}/tools/lookup", data=sop_uid, timeout=30, verify=self.verify)
        r.raise_for_status()
        return any(x["Type"] == "Instance" for x in r.json())

    def patient_of_study(self, study_uid: str):
        r = requests.post(f"{self.url}/tools/lookup", data=study_uid, timeout=30)
        r.raise_for_status()
        for x in r.json():
            if x["Type"] == "Study":
                return requests.get(f"{self.url}/studies/{x['ID']}", timeout=30).json()["PatientMainDicomTags"]["PatientID"]
        return None

    def counts(self, patient_id: str) -> dict:
        """What Orthanc holds for a PatientID, compared exactly (Orthanc strips trailing spaces)."""
        for p in requests.get(f"{self.url}/patients?expand", timeout=30).json():
            if p["MainDicomTags"].get("PatientID") == patient_id:
                pid = p["ID"]
                return {
                    "studies": len(p["Studies"]),
                    "series": len(requests.get(f"{self.url}/patients/{pid}/series", timeout=30).json()),
                    "instances": len(requests.get(f"{self.url}/patients/{pid}/instances", timeout=30).json()),
                }
        return {"studies": 0, "series": 0, "instances": 0}


class Dcmqrscp:
    """DCMTK's dcmqrscp as a second PACS: DIMSE only, its own index and storage, configured as
    sites usually run it (relational queries accepted) unless `flags` say otherwise
    (`--check-find`, `--check-move`: its strict identifier checks; `--disable-get`). `peers`:
    (AE title, port) of every move destination it must know (the gateway's receiver)."""

    def __init__(self, tmp: Path, name="dcmqrscp", flags=(), peers=(), max_associations=16):
        self.dicom_port = free_port()
        # With its strict identifier checks on, it enforces the hierarchical query model: the
        # gateway is told so.
        self.strict = "--check-find" in flags
        # Without C-GET, the gateway retrieves for DICOMweb by C-MOVE to its receiver.
        self.no_get = "--disable-get" in flags
        self.pacs_extra = "\n".join(
            line for on, line in ((self.strict, 'query_model = "hierarchical"'), (self.no_get, 'retrieve = "c-move"')) if on)
        self.aet = "DCMQRSCP"
        self.url = None  # no DICOMweb service
        self.tmp = tmp / name
        storage = self.tmp / "storage"
        storage.mkdir(parents=True)
        hosts = "".join(f"{ae.lower()} = ({ae}, 127.0.0.1, {port})\n" for ae, port in peers)
        self.config = self.tmp / "dcmqrscp.cfg"
        self.config.write_text(
            f"""NetworkTCPPort  = {self.dicom_port}
MaxPDUSize      = 65536
MaxAssociations = {max_associations}

HostTable BEGIN
{hosts}HostTable END

VendorTable BEGIN
VendorTable END

AETable BEGIN
{self.aet} {storage} RW (200, 1024mb) ANY
AETable END
"""
        )
        self.log_path = self.tmp / "dcmqrscp.log"
        self.log = open(self.log_path, "w")
        exe = shutil.which("dcmqrscp")
        if exe is None:
            raise RuntimeError("dcmqrscp is not installed (Debian package dcmtk)")
        self.proc = subprocess.Popen([exe, "-ll", "info", *flags, "-c", str(self.config)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_tcp(self.dicom_port, self.proc, "dcmqrscp")
        self.studies = {}
        self.instances = []

    def upload(self, data: bytes):
        """Stores one Part 10 instance directly (not through the gateway)."""
        from pynetdicom import AE, StoragePresentationContexts

        ds = pydicom.dcmread(io.BytesIO(data))
        ae = AE(ae_title="LOADER")
        ae.requested_contexts = StoragePresentationContexts[:120]
        assoc = ae.associate("127.0.0.1", self.dicom_port, ae_title=self.aet)
        assert assoc.is_established, "dcmqrscp refused the loader"
        try:
            status = assoc.send_c_store(ds)
            assert status and status.Status == 0x0000, status
        finally:
            assoc.release()

    def load(self, patients, padded=()):
        for pid, study_uid, data in generate(patients, padded):
            self.upload(data)
            self.studies.setdefault(pid, set()).add(study_uid)
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            self.instances.append((pid, study_uid, ds.SeriesInstanceUID, ds.SOPInstanceUID))

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def _find(self, level, **keys):
        """Matches of a C-FIND asked of dcmqrscp directly (relational, Study Root)."""
        from pynetdicom import AE
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

        ds = pydicom.Dataset()
        ds.QueryRetrieveLevel = level
        for k, v in keys.items():
            setattr(ds, k, v)
        ae = AE(ae_title="CHECKER")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = ae.associate("127.0.0.1", self.dicom_port, ae_title=self.aet)
        assert assoc.is_established, "dcmqrscp refused the checker"
        try:
            return [i for s, i in assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind)
                    if s and s.Status in (0xFF00, 0xFF01)]
        finally:
            assoc.release()

    def _everything(self):
        """(PatientID, study, series, SOP instance) of every instance held. With its strict
        checks on, dcmqrscp answers only hierarchical queries: the hierarchy is walked."""
        if not self.strict:
            return [(x.PatientID, x.StudyInstanceUID, x.SeriesInstanceUID, x.SOPInstanceUID)
                    for x in self._find("IMAGE", PatientID="", StudyInstanceUID="", SeriesInstanceUID="", SOPInstanceUID="")]
        out = []
        for st in self._find("STUDY", PatientID="", StudyInstanceUID=""):
            for se in self._find("SERIES", StudyInstanceUID=st.StudyInstanceUID, SeriesInstanceUID=""):
                for im in self._find("IMAGE", StudyInstanceUID=st.StudyInstanceUID,
                                     SeriesInstanceUID=se.SeriesInstanceUID, SOPInstanceUID=""):
                    out.append((st.PatientID, st.StudyInstanceUID, se.SeriesInstanceUID, im.SOPInstanceUID))
        return out

    def holds(self, sop_uid: str) -> bool:
        if not self.strict:
            return bool(self._find("IMAGE", SOPInstanceUID=sop_uid, StudyInstanceUID="", SeriesInstanceUID=""))
        return any(x[3] == sop_uid for x in self._everything())

    def patient_of_study(self, study_uid: str):
        m = self._find("STUDY", StudyInstanceUID=study_uid, PatientID="")
        return m[0].PatientID if m else None

    def counts(self, patient_id: str) -> dict:
        """What dcmqrscp holds for a PatientID, compared exactly (it keeps padding)."""
        mine = [x for x in self._everything() if x[0] == patient_id]
        return {"studies": len({x[1] for x in mine}), "series": len({x[2] for x in mine}), "instances": len(mine)}


class Issuer:
    def __init__(self, tmp: Path, extra_args=()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key_file = tmp / "dev-issuer-key.pem"
        self.log = open(tmp / "dev-issuer.log", "w")
        self.proc = subprocess.Popen(
            [str(binary()), "dev-issuer", "--listen", f"127.0.0.1:{self.port}", "--key-file", str(self.key_file), *extra_args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_tcp(self.port, self.proc, "dev-issuer")

    def mint(self, patient=None, scope="patient/ImagingStudy.rs", aud=None, expires_in=3600, client_id=None, opaque=False, claims=None) -> str:
        form = {"scope": scope, "expires_in": str(expires_in)}
        if claims is not None:
            form["claims"] = json.dumps(claims)
        if opaque:
            form["opaque"] = "true"
        if patient is not None:
            form["patient"] = patient
        if aud is not None:
            form["aud"] = aud
        if client_id is not None:
            form["client_id"] = client_id
        r = requests.post(f"{self.url}/token", data=form, timeout=10)
        r.raise_for_status()
        return r.json()["access_token"]


class Gateway:
    def __init__(self, tmp: Path, orthanc: Orthanc, issuer: Issuer, name="gateway", extra="", log_filter="info,pacsgate=debug",
                 receive_port=None, destinations=(), dicomweb_url=None, issuer_extra='verify = "jwt"', patients="", gateway_extra="", calling_ae="PACSGATE",
                 limits_extra="", public_url=None, idle_timeout=60, serve_args=(), translate=None, upstream_timeout=20,
                 cors_origins=("https://viewer.example.org",), fhir=True, http_port=None):
        """`translate`: DICOMweb by translation to DIMSE (no `pacs.dicomweb_url`); by default as
        PACSGATE_DICOMWEB=translate says."""
        if translate is None:
            translate = TRANSLATE
        self.dimse_port = free_port()
        self.http_port = http_port or free_port()
        self.issuer = issuer
        self.ae_title = "PACSGATE"
        self.public_url = public_url or f"http://127.0.0.1:{self.http_port}"
        self.config = tmp / f"{name}.toml"
        web = dicomweb_url or (orthanc.url + "/dicom-web" if orthanc.url and not translate else None)
        dicomweb_line = f'dicomweb_url = "{web}"' if web else ""
        # What the PACS needs said of it; retrieving by C-MOVE needs a receiver (a gateway
        # started without one retrieves nothing in its test).
        pacs_extra = "\n".join(line for line in getattr(orthanc, "pacs_extra", "").splitlines()
                                if receive_port or not line.startswith("retrieve"))
        self.config.write_text(
            f"""
[gateway]
ae_title = "{self.ae_title}"
dimse_listen = "127.0.0.1:{self.dimse_port}"
http_listen = "127.0.0.1:{self.http_port}"
public_url = "{self.public_url}"
audiences = ["http://127.0.0.1:8080/dicom-web", "{self.public_url}/dicom-web"]
cors_origins = {json.dumps(list(cors_origins))}
{gateway_extra}

[limits]
idle_timeout_secs = {idle_timeout}
upstream_timeout_secs = {upstream_timeout}
{limits_extra}

[[issuers]]
issuer = "{issuer.url}"
{issuer_extra}

[pacs]
ae_title = "{orthanc.aet}"
address = "127.0.0.1:{orthanc.dicom_port}"
calling_ae_title = "{calling_ae}"
{pacs_extra}
{dicomweb_line}
{f'receive_listen = "127.0.0.1:{receive_port}"' if receive_port else ""}

{extra}
{patients}
{"[fhir]" + chr(10) + "enabled = true" if fhir else ""}
{"".join(f'[[destinations]]{chr(10)}ae_title = "{ae}"{chr(10)}address = "127.0.0.1:{port}"{chr(10)}' for ae, port in destinations)}
"""
        )
        self.log_path = tmp / f"{name}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [str(binary()), *serve_args, "serve", "--config", str(self.config)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PACSGATE_LOG=log_filter),
        )
        try:
            wait_tcp(self.dimse_port, self.proc, "pacsgate")
            wait_tcp(self.http_port, self.proc, "pacsgate http")
        except RuntimeError as e:
            # What made it stop is in its log (the test directory may be gone by the report).
            raise RuntimeError(f"{e}; its log ends:\n{self.log_text()[-1500:]}") from None

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text()


@pytest.fixture(scope="session")
def tmp_root():
    d = Path(tempfile.mkdtemp(prefix="pacsgate-it-"))
    yield d
    if os.environ.get("KEEP_TEST_DIR"):
        print(f"test files kept in {d}")
    else:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def ports():
    """Ports fixed for the session: the gateway's C-MOVE receiver (Orthanc must know it) and
    the C-MOVE destination the gateway is configured with."""
    return {"receive": free_port(), "dest": free_port()}


@pytest.fixture(scope="session")
def orthanc(tmp_root, ports):
    """The PACS under test: Orthanc, or with PACSGATE_PACS=dcmqrscp (or dcmqrscp-strict),
    DCMTK's dcmqrscp (DIMSE only: DICOMweb is then answered by translation)."""
    which = os.environ.get("PACSGATE_PACS")
    if which in ("dcmqrscp", "dcmqrscp-strict", "dcmqrscp-noget"):
        # "dcmqrscp-strict": with its identifier checks on (the hierarchical query model);
        # "dcmqrscp-noget": without C-GET.
        flags = {"dcmqrscp-strict": ("--check-find", "--check-move"), "dcmqrscp-noget": ("--disable-get",)}.get(which, ())
        d = Dcmqrscp(tmp_root, flags=flags, peers=[("PACSGATE", ports["receive"]), ("DEST", ports["dest"])])
        d.load(PATIENTS, PADDED)
        yield d
        stop(d.proc)
        return
    # DICOMweb by translation: Orthanc's own DICOMweb service is off, so nothing can reach it.
    extra = {"DicomWeb": {"Enable": False}} if TRANSLATE else None
    o = Orthanc(tmp_root, modalities={"PACSGATE": ["PACSGATE", "127.0.0.1", ports["receive"]]}, extra=extra)
    studies = {}
    instances = []  # (PatientID, study, series, SOP instance) of everything loaded
    for pid, study_uid, data in generate(PATIENTS, PADDED):
        o.upload(data)
        studies.setdefault(pid, set()).add(study_uid)
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        instances.append((pid, study_uid, ds.SeriesInstanceUID, ds.SOPInstanceUID))
    o.studies = studies
    o.instances = instances
    yield o
    stop(o.proc)


@pytest.fixture(scope="session")
def issuer(tmp_root):
    i = Issuer(tmp_root)
    yield i
    stop(i.proc)


class Replicas:
    """Two gateways behind HAProxy (TCP mode for DIMSE, HTTP mode for DICOMweb, round robin), in
    front of the same PACS, looking to clients like one gateway. Each replica has its own C-MOVE
    receiver, registered in the PACS under its own calling AE title, since a C-MOVE's
    sub-operations must come back to the replica that started it; nothing else is shared."""

    def __init__(self, tmp, orthanc, issuer, destinations=()):
        self.dimse_port, self.http_port = free_port(), free_port()
        self.public_url = f"http://127.0.0.1:{self.http_port}"
        self.ae_title = "PACSGATE"
        self.issuer = issuer
        self.replicas = []
        for n in (1, 2):
            receive = free_port()
            aet = f"PACSGATE{n}"
            r = requests.put(f"{orthanc.url}/modalities/{aet}", json={"AET": aet, "Host": "127.0.0.1", "Port": receive},
                             timeout=10)
            r.raise_for_status()
            self.replicas.append(Gateway(tmp, orthanc, issuer, name=f"replica-{n}", receive_port=receive,
                                         destinations=destinations, calling_ae=aet, public_url=self.public_url))
        d = tmp / "haproxy-replicas"
        d.mkdir()
        cfg = d / "haproxy.cfg"
        servers = lambda port: "\n".join(f"    server r{i} 127.0.0.1:{getattr(g, port)}" for i, g in enumerate(self.replicas))
        # Every request and connection is logged (haproxy.log beside the replicas' logs), with
        # HAProxy's termination flags: what a 502 was.
        cfg.write_text(f"""global
    maxconn 4096
    log stdout format raw local0
defaults
    log global
    timeout connect 5s
    timeout client 10m
    timeout server 10m
frontend dimse
    mode tcp
    option tcplog
    bind 127.0.0.1:{self.dimse_port}
    default_backend dimse
backend dimse
    mode tcp
    balance roundrobin
{servers("dimse_port")}
frontend web
    mode http
    option httplog
    bind 127.0.0.1:{self.http_port}
    default_backend web
backend web
    mode http
    balance roundrobin
    # A keep-alive connection the replica closed as HAProxy reused it: tried again, as a
    # deployment's balancer should be configured.
    retries 2
    retry-on conn-failure empty-response
{servers("http_port")}
""")
        self.log = open(d / "haproxy.log", "w")
        exe = shutil.which("haproxy") or "/usr/sbin/haproxy"
        self.proc = subprocess.Popen([exe, "-db", "-f", str(cfg)], stdout=self.log, stderr=subprocess.STDOUT)
        wait_tcp(self.dimse_port, self.proc, "haproxy")
        wait_tcp(self.http_port, self.proc, "haproxy")

    def log_text(self) -> str:
        return "".join(g.log_text() for g in self.replicas)


def finish_gateway(g):
    """Every test (the attack suite included) ran against this process: its peak memory stays
    small, whatever was thrown at it, it stops cleanly, and no token reached its log."""
    hwm = peak_memory_mib(g.proc.pid)
    print(f"\nsession gateway peak memory: {hwm:.1f} MiB")
    stop(g.proc)
    assert hwm < 100, f"the gateway's peak memory was {hwm:.1f} MiB"
    assert g.proc.returncode == 0, f"pacsgate did not stop cleanly: {g.proc.returncode}"
    log = g.log_text()
    # Every minted token has the same JWS header prefix.
    assert "eyJ" not in log, "a token appeared in the gateway log"


@pytest.fixture(scope="session")
def gateway(tmp_root, orthanc, issuer, ports):
    """The gateway under test; with PACSGATE_REPLICAS=2, two replicas behind HAProxy instead."""
    if os.environ.get("PACSGATE_REPLICAS") == "2":
        front = Replicas(tmp_root, orthanc, issuer, destinations=[("DEST", ports["dest"])])
        yield front
        stop(front.proc)
        served = [g.log_text().count("association requested") + g.log_text().count("request{id=") for g in front.replicas]
        print(f"\nreplicas served (associations + HTTP requests logged): {served}")
        for g in front.replicas:
            finish_gateway(g)
        assert all(n > 0 for n in served), f"a replica served nothing: {served}"
        return
    g = Gateway(tmp_root, orthanc, issuer, receive_port=ports["receive"], destinations=[("DEST", ports["dest"])])
    yield g
    finish_gateway(g)
