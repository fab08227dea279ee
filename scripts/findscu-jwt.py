#!/usr/bin/env python3
"""A C-FIND client that presents a SMART access token, for trying the gateway by hand.

    .venv/bin/python scripts/findscu-jwt.py --token "$TOKEN" --level STUDY 127.0.0.1 11112

The token goes in the A-ASSOCIATE-RQ user identity (type 5, JWT; --passcode sends it as
type 2 username + passcode instead). Prints one line per match and the final status.
"""

import argparse
import sys

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.pdu_primitives import UserIdentityNegotiation
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--token", help="the SMART access token (omit to see the rejection)")
    p.add_argument("--passcode", action="store_true", help="send the token as type 2 passcode")
    p.add_argument("--aet", default="VIEWER")
    p.add_argument("--aec", default="PACSGATE")
    p.add_argument("--level", default="STUDY", choices=["PATIENT", "STUDY", "SERIES", "IMAGE"])
    p.add_argument("--root", default="study", choices=["study", "patient"])
    p.add_argument("--patient-id", help="PatientID matching key (default: universal)")
    a = p.parse_args()

    model = StudyRootQueryRetrieveInformationModelFind if a.root == "study" else PatientRootQueryRetrieveInformationModelFind
    ae = AE(ae_title=a.aet)
    ae.add_requested_context(model)
    ext = []
    if a.token:
        u = UserIdentityNegotiation()
        if a.passcode:
            u.user_identity_type = 2
            u.primary_field = b"viewer"
            u.secondary_field = a.token.strip().encode()
        else:
            u.user_identity_type = 5
            u.primary_field = a.token.strip().encode()
        u.positive_response_requested = True
        ext.append(u)
    assoc = ae.associate(a.host, a.port, ae_title=a.aec, ext_neg=ext)
    if not assoc.is_established:
        print("association rejected" if assoc.is_rejected else "association failed")
        return 1
    ds = Dataset()
    ds.QueryRetrieveLevel = a.level
    ds.PatientID = a.patient_id or ""
    ds.PatientName = ""
    if a.level != "PATIENT":
        ds.StudyInstanceUID = ""
        ds.StudyDate = ""
        ds.StudyDescription = ""
    if a.level in ("SERIES", "IMAGE"):
        ds.SeriesInstanceUID = ""
    if a.level == "IMAGE":
        ds.SOPInstanceUID = ""
    n, final = 0, None
    for status, ident in assoc.send_c_find(ds, model):
        if status is None or "Status" not in status:
            print("no response")
            break
        if status.Status in (0xFF00, 0xFF01):
            n += 1
            uid = ident.get("StudyInstanceUID", "") if a.level != "PATIENT" else ""
            print(f"  PatientID={ident.PatientID!s:<10} {a.level.lower()}: {ident.get('StudyDescription', '')} {uid}")
        else:
            final = status.Status
    assoc.release()
    print(f"{n} match(es), final status 0x{final:04X}" if final is not None else f"{n} match(es)")
    return 0 if final == 0 else 2


if __name__ == "__main__":
    sys.exit(main())
