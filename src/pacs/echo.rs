//! The gateway's own C-ECHO to the PACS: is it there, and does it accept the gateway's AE title?
//!
//! Owns: one association with the Verification SOP class alone, one C-ECHO, a release, all
//! within one deadline. Must not know what the answer is used for (readiness).

use super::associate;
use crate::config::Pacs;
use crate::dicom::command::{self, Command};
use crate::dicom::message::Event;
use crate::dicom::peer::{Incoming, Peer};
use dicom_ul::pdu::{
    AssociationRQ, PresentationContextProposed, PresentationContextResultReason, UserVariableItem,
};
use std::time::Duration;

const VERIFICATION: &str = "1.2.840.10008.1.1";
const IMPLICIT_LE: &str = "1.2.840.10008.1.2";
/// The largest PDU the gateway takes from the PACS on this association (a C-ECHO-RSP is tiny).
const MAX_PDU: u32 = 16 * 1024;

/// Associates, echoes and releases within `deadline`; `Err` says what failed.
pub async fn echo(pacs: &Pacs, deadline: Duration) -> Result<(), String> {
    let t0 = std::time::Instant::now();
    let r = match tokio::time::timeout(deadline, echo_inner(pacs, deadline)).await {
        Ok(r) => r,
        Err(_) => Err(format!("the C-ECHO was not answered within {deadline:?}")),
    };
    crate::metrics::pacs_request("echo", t0.elapsed());
    r
}

async fn echo_inner(pacs: &Pacs, deadline: Duration) -> Result<(), String> {
    let rq = AssociationRQ {
        protocol_version: 1,
        calling_ae_title: pacs.calling_ae_title.clone(),
        called_ae_title: pacs.ae_title.clone(),
        application_context_name: crate::dicom::negotiation::APPLICATION_CONTEXT.into(),
        presentation_contexts: vec![PresentationContextProposed {
            id: 1,
            abstract_syntax: VERIFICATION.into(),
            transfer_syntaxes: vec![IMPLICIT_LE.into()],
        }],
        user_variables: vec![
            UserVariableItem::MaxLength(MAX_PDU),
            UserVariableItem::ImplementationClassUID(
                crate::dicom::negotiation::IMPLEMENTATION_CLASS_UID.into(),
            ),
            UserVariableItem::ImplementationVersionName(
                crate::dicom::negotiation::IMPLEMENTATION_VERSION_NAME.into(),
            ),
        ],
    };
    let (stream, ac) = associate(pacs, rq, deadline)
        .await
        .map_err(|e| e.to_string())?;
    let accepted = ac
        .presentation_contexts
        .iter()
        .any(|r| r.id == 1 && r.reason == PresentationContextResultReason::Acceptance);
    let mut peer = Peer::new(
        "pacs-echo",
        stream,
        MAX_PDU,
        crate::dicom::negotiation::announced_max(&ac.user_variables),
    );
    let result = if accepted {
        exchange(&mut peer).await
    } else {
        Err("the PACS accepts no Verification (C-ECHO) from the gateway".into())
    };
    let _ = peer.release(Duration::from_secs(2)).await;
    result
}

async fn exchange(peer: &mut Peer) -> Result<(), String> {
    let cmd = Command::request(command::C_ECHO_RQ, 1, VERIFICATION, false);
    peer.send_message(1, &cmd.encode(), None)
        .await
        .map_err(|e| e.to_string())?;
    match peer.next().await {
        Incoming::Message(Event::Command { command: rsp, .. })
            if rsp.field == command::C_ECHO_RSP && rsp.responded_to == Some(1) =>
        {
            match rsp.status {
                Some(0) => Ok(()),
                s => Err(format!(
                    "the PACS answered the C-ECHO with status {:#06x}",
                    s.unwrap_or(0xFFFF)
                )),
            }
        }
        other => Err(format!("the PACS did not answer the C-ECHO: {other:?}")),
    }
}
