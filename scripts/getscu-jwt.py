#!/usr/bin/env python3
"""A C-GET client that presents a SMART access token, for trying the gateway by hand.

    .venv/bin/python scripts/getscu-jwt.py --token "$TOKEN" --study UID 127.0.0.1 11112 [--out DIR]

Retrieves a whole study (or --series UID within it) over the same association, with the token
in the A-ASSOCIATE-RQ user identity (type 5). Prints what arrived and the final status; with
--out, writes each instance there.
"""

import argparse
import sys
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.pdu_primitives import UserIdentityNegotiation
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--token", required=True)
    p.add_argument("--study", required=True)
    p.add_argument("--series")
    p.add_argument("--aet", default="VIEWER")
    p.add_argument("--aec", default="PACSGATE")
    p.add_argument("--out", type=Path)
    a = p.parse_args()

    ae = AE(ae_title=a.aet)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    # 127 storage contexts at most fit next to the C-GET context
    storage = StoragePresentationContexts[:120]
    roles = []
    for cx in storage:
        ae.add_requested_context(cx.abstract_syntax)
        roles.append(build_role(cx.abstract_syntax, scp_role=True))
    u = UserIdentityNegotiation()
    u.user_identity_type = 5
    u.primary_field = a.token.strip().encode()
    received = []

    def on_store(event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds.SOPInstanceUID)
        if a.out:
            a.out.mkdir(parents=True, exist_ok=True)
            ds.save_as(a.out / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        print(f"  received {ds.SOPInstanceUID} (PatientID={ds.PatientID})")
        return 0x0000

    assoc = ae.associate(a.host, a.port, ae_title=a.aec, ext_neg=[u, *roles], evt_handlers=[(evt.EVT_C_STORE, on_store)])
    if not assoc.is_established:
        print("association rejected" if assoc.is_rejected else "association failed")
        return 1
    q = Dataset()
    q.QueryRetrieveLevel = "SERIES" if a.series else "STUDY"
    q.StudyInstanceUID = a.study
    if a.series:
        q.SeriesInstanceUID = a.series
    final = None
    for status, _ in assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet):
        if status is None or "Status" not in status:
            print("no response")
            break
        if status.Status not in (0xFF00, 0xFF01):
            final = status.Status
    assoc.release()
    print(f"{len(received)} instance(s), final status 0x{final:04X}" if final is not None else f"{len(received)} instance(s)")
    return 0 if final == 0 else 2


if __name__ == "__main__":
    sys.exit(main())
