#!/usr/bin/env bash
# The pacsgate demo on a fresh Debian machine: installs what is missing, builds the gateway,
# starts Orthanc with two sample patients, the development token issuer and the gateway (with
# samples/pacsgate.toml), mints a token for one patient and shows a C-FIND through the gateway
# returning only that patient's studies, then the same token on DICOMweb (QIDO-RS, WADO-RS),
# then an imaging app's path (the EHR's discovery naming the gateway's FHIR base, the EHR token
# exchanged for the gateway's own imaging token, the ImagingStudy search, WADO-RS through the
# study's Endpoint, the same imaging token on a DIMSE C-FIND), and OHIF in a browser on
# http://127.0.0.1:3000 showing that patient's studies.
# Then it keeps everything running for you to try, until Ctrl-C (which stops every process it
# started within a few seconds). With --once it stops after the showcase.
# PACSGATE_BIN: a gateway binary to use instead of building the release one.
#
# Ports (loopback only): gateway DIMSE 11112, C-MOVE receiver 11113 and HTTP 8080, dev issuer 9400,
# Orthanc 14242/18042, OHIF 3000.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
once=0
[ "${1:-}" = "--once" ] && once=1

scripts/setup.sh
if [ -n "${PACSGATE_BIN:-}" ]; then
  bin=$PACSGATE_BIN
else
  echo "== building pacsgate (release)"
  cargo build --release --locked --bin pacsgate
  bin=target/release/pacsgate
fi

run=demo-run
rm -rf "$run"
mkdir -p "$run/orthanc-db"
pids=()
# Everything started here is stopped on the way out, however the script ends: SIGTERM first,
# then, for whatever still runs after 4 s, SIGKILL.
cleanup() {
  trap - EXIT INT TERM
  [ ${#pids[@]} -gt 0 ] || return 0
  kill "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 40); do
    kill -0 "${pids[@]}" 2>/dev/null || break
    sleep 0.1
  done
  kill -9 "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  echo "== stopped"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for port in 11112 11113 8080 9400 14242 18042 3000; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port on 127.0.0.1 is in use; stop what uses it (e.g. a system Orthanc: systemctl stop orthanc) and retry" >&2
    exit 1
  fi
done

echo "== starting Orthanc (DICOM 14242, HTTP 18042)"
cat > "$run/orthanc.json" <<EOF
{
  "Name": "pacsgate-demo", "StorageDirectory": "$PWD/$run/orthanc-db", "IndexDirectory": "$PWD/$run/orthanc-db",
  "DicomAet": "ORTHANC", "DicomPort": 14242, "HttpPort": 18042,
  "RemoteAccessAllowed": false, "AuthenticationEnabled": false,
  "DicomAlwaysAllowEcho": true, "DicomAlwaysAllowStore": true, "DicomAlwaysAllowFind": true,
  "DicomAlwaysAllowGet": true, "DicomAlwaysAllowMove": true, "DicomCheckCalledAet": false,
  "UnknownSopClassAccepted": true, "SaveJobs": false, "SynchronousCMove": true,
  "DicomModalities": { "PACSGATE": ["PACSGATE", "127.0.0.1", 11113] },
  "Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
  "DicomWeb": {"Enable": true, "Root": "/dicom-web/"}
}
EOF
TCP_NODELAY=1 Orthanc "$run/orthanc.json" >"$run/orthanc.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -fs http://127.0.0.1:18042/system >/dev/null 2>&1 && break; sleep 0.1; done
curl -fs http://127.0.0.1:18042/system >/dev/null || { echo "Orthanc did not start; see $run/orthanc.log" >&2; exit 1; }

echo "== loading sample patients DEMO-A (3 studies) and DEMO-B (2 studies) into Orthanc"
PYTHONPATH=tests/integration .venv/bin/python - <<'EOF'
import requests
from dicomdata import generate
for pid, study, data in generate({"DEMO-A": {"studies": 3, "series": 1, "instances": 2},
                                  "DEMO-B": {"studies": 2, "series": 1, "instances": 2}}, []):
    requests.post("http://127.0.0.1:18042/instances", data=data, timeout=30).raise_for_status()
EOF

echo "== starting the development token issuer on 127.0.0.1:9400 (NOT FOR PRODUCTION)"
# It names the gateway's FHIR base among its associated endpoints: how an app launched from the
# EHR discovers the imaging server.
"$bin" dev-issuer --listen 127.0.0.1:9400 --key-file "$run/dev-issuer-key.pem" \
  --associated-endpoint http://127.0.0.1:8080/fhir >"$run/dev-issuer.log" 2>&1 &
pids+=($!)
# Its key file exists once it answers: tokens minted below are signed with the key it publishes.
for _ in $(seq 100); do curl -fs http://127.0.0.1:9400/jwks >/dev/null 2>&1 && break; sleep 0.1; done
curl -fs http://127.0.0.1:9400/jwks >/dev/null || { echo "the dev issuer did not start; see $run/dev-issuer.log" >&2; exit 1; }

echo "== starting pacsgate with samples/pacsgate.toml (DIMSE 11112, HTTP 8080)"
"$bin" check-config --config samples/pacsgate.toml
"$bin" serve --config samples/pacsgate.toml >"$run/pacsgate.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -fs http://127.0.0.1:8080/healthz >/dev/null 2>&1 && break; sleep 0.1; done
curl -fs http://127.0.0.1:8080/healthz >/dev/null || { echo "pacsgate did not start; see $run/pacsgate.log" >&2; exit 1; }
# Ready: the gateway's own C-ECHO to Orthanc and the issuer's keys both answered.
for _ in $(seq 150); do curl -fs http://127.0.0.1:8080/readyz >/dev/null 2>&1 && break; sleep 0.1; done
echo "   /readyz: $(curl -s http://127.0.0.1:8080/readyz)"

echo "== minting a token for patient DEMO-A"
token=$("$bin" dev-issuer mint --issuer http://127.0.0.1:9400 --key-file "$run/dev-issuer-key.pem" \
  --patient DEMO-A --scope "patient/ImagingStudy.rs")
echo "   token: ${token:0:24}... (scope patient/ImagingStudy.rs, patient DEMO-A)"

echo
echo "== C-FIND (study level) through the gateway with DEMO-A's token: only DEMO-A's studies"
.venv/bin/python scripts/findscu-jwt.py --token "$token" --level STUDY 127.0.0.1 11112
echo
echo "== the same token asking for DEMO-B: refused (0x0124)"
.venv/bin/python scripts/findscu-jwt.py --token "$token" --level STUDY --patient-id DEMO-B 127.0.0.1 11112 || true
echo
study=$(.venv/bin/python scripts/findscu-jwt.py --token "$token" --level STUDY 127.0.0.1 11112 | awk '/study:/ {print $NF; exit}')
echo "== C-GET of DEMO-A's study $study through the gateway: every instance checked on its way"
.venv/bin/python scripts/getscu-jwt.py --token "$token" --study "$study" 127.0.0.1 11112
echo
echo "== a granular scope (patient/ImagingStudy.rs?started=ge2024-02): only DEMO-A's studies from February 2024 on"
narrow=$("$bin" dev-issuer mint --issuer http://127.0.0.1:9400 --key-file "$run/dev-issuer-key.pem" \
  --patient DEMO-A --scope "patient/ImagingStudy.rs?started=ge2024-02")
.venv/bin/python scripts/findscu-jwt.py --token "$narrow" --level STUDY 127.0.0.1 11112
echo
echo "== no token: the association is rejected"
.venv/bin/python scripts/findscu-jwt.py --level STUDY 127.0.0.1 11112 || true
echo
echo "== DICOMweb, the same token: QIDO-RS http://127.0.0.1:8080/dicom-web/studies finds only DEMO-A's studies"
curl -fsS -H "Authorization: Bearer $token" http://127.0.0.1:8080/dicom-web/studies | .venv/bin/python -c '
import json, sys
studies = json.load(sys.stdin)
for s in studies:
    print("   study:", s["00100020"]["Value"][0], s["0020000D"]["Value"][0])
print("  ", len(studies), "studies")'
echo
echo "== WADO-RS metadata of DEMO-A's study $study: $(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $token" "http://127.0.0.1:8080/dicom-web/studies/$study/metadata")"
other=$(curl -fsS "http://127.0.0.1:18042/studies?expand" | .venv/bin/python -c '
import json, sys
print(next(s["MainDicomTags"]["StudyInstanceUID"] for s in json.load(sys.stdin) if s["PatientMainDicomTags"]["PatientID"] == "DEMO-B"))')
echo "== WADO-RS metadata of DEMO-B's study $other with DEMO-A's token: $(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $token" "http://127.0.0.1:8080/dicom-web/studies/$other/metadata") (refused)"
echo "== without a token: $(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8080/dicom-web/studies), $(curl -s -D - -o /dev/null http://127.0.0.1:8080/dicom-web/studies | grep -i '^www-authenticate' | tr -d '\r')"

echo
echo "== an imaging app's path: the EHR's discovery names the imaging server, whose own"
echo "   authorization server exchanges the EHR token (RFC 8693) for an imaging token; with it the"
echo "   FHIR ImagingStudy search finds DEMO-A's studies, WADO-RS through their Endpoint"
ehr_token=$("$bin" dev-issuer mint --issuer http://127.0.0.1:9400 --key-file "$run/dev-issuer-key.pem" \
  --patient DEMO-A --scope "openid fhirUser launch/patient patient/*.read")
.venv/bin/python - "$ehr_token" "$run/imaging-token" <<'EOF'
import sys, requests
ehr_token, out = sys.argv[1], sys.argv[2]
conf = requests.get("http://127.0.0.1:9400/.well-known/smart-configuration", timeout=10).json()
fhir = next(e["url"] for e in conf["associated_endpoints"] if "smart-imaging-access" in e["capabilities"])
print("   associated endpoint with smart-imaging-access:", fhir)
imaging = requests.get(f"{fhir}/.well-known/smart-configuration", timeout=10).json()
print("   its token endpoint:", imaging["token_endpoint"], "| capabilities:", ", ".join(imaging["capabilities"][:2]))
exchange = lambda: requests.post(imaging["token_endpoint"], data={
    "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
    "subject_token": ehr_token,
    "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
}, timeout=30).json()
t = exchange()
print(f"   exchanged: scope {t['scope']!r}, patient {t['patient']}, expires in {t['expires_in']} s")
again = exchange()
print(f"   the same EHR token again: {again['error']} ({again['error_description']})")
auth = {"Authorization": f"Bearer {t['access_token']}"}
b = requests.get(f"{fhir}/ImagingStudy", params={"patient": t["patient"], "_include": "ImagingStudy:endpoint"},
                 headers=auth, timeout=30).json()
endpoint = next(e["resource"]["address"] for e in b["entry"] if e["resource"]["resourceType"] == "Endpoint")
for e in b["entry"]:
    s = e["resource"]
    if s["resourceType"] == "ImagingStudy":
        uid = s["identifier"][0]["value"].removeprefix("urn:oid:")
        r = requests.get(f"{endpoint}/studies/{uid}/metadata", headers=auth, timeout=30)
        print(f"   ImagingStudy {uid} ({s.get('started', '?')}, {s['numberOfSeries']} series): WADO-RS metadata {r.status_code}")
r = requests.get(f"{fhir}/ImagingStudy", params={"patient": "DEMO-B"}, headers=auth, timeout=30)
print(f"   ImagingStudy?patient=DEMO-B with DEMO-A's imaging token: {r.status_code} {r.json()['resourceType']}")
with open(out, "w") as f:
    f.write(t["access_token"])
EOF
echo "== the imaging token on DIMSE: C-FIND through the gateway finds DEMO-A's studies only"
.venv/bin/python scripts/findscu-jwt.py --token "$(cat "$run/imaging-token")" --level STUDY 127.0.0.1 11112

echo
echo "== OHIF (the viewer, npm @ohif/app) on http://127.0.0.1:3000 with DEMO-A's token"
.venv/bin/python tests/integration/ohif_site.py 3000 http://127.0.0.1:8080 "$token" >"$run/ohif.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do curl -fs http://127.0.0.1:3000/app-config.js >/dev/null 2>&1 && break; sleep 0.1; done
curl -fs http://127.0.0.1:3000/app-config.js >/dev/null || { echo "OHIF's site did not start; see $run/ohif.log" >&2; exit 1; }
echo "   open http://127.0.0.1:3000 in a browser: the study list shows DEMO-A's studies only"

if [ "$once" = 1 ]; then
  exit 0
fi
cat <<EOF

The demo keeps running. Try:
  token=\$($bin dev-issuer mint --issuer http://127.0.0.1:9400 --key-file $run/dev-issuer-key.pem --patient DEMO-B)
  .venv/bin/python scripts/findscu-jwt.py --token "\$token" --level SERIES 127.0.0.1 11112
  curl -s -H "Authorization: Bearer \$token" http://127.0.0.1:8080/dicom-web/studies
  curl -s http://127.0.0.1:8080/readyz
  curl -s http://127.0.0.1:8080/metrics
Logs (with the audit trail) are in $run/. Press Ctrl-C to stop everything.
EOF
# Until Ctrl-C, or until a process it started ends.
wait -n || true
