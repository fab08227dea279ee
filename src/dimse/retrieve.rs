//! What C-GET and C-MOVE share: reading a retrieval identifier, asking the policy core about
//! it, the sub-operation counts the client is given, and relaying a C-CANCEL while a retrieval
//! runs.
//!
//! Owns: the retrieval's translation into the policy core's [`RetrieveRequest`] and the
//! identifier sent upstream (the bytes that were judged, or their re-encoding with the
//! PatientID the permit names). Must not decide: the policy core does.

use super::association::{Association, Flow, Misbehaviour, Side};
use crate::audit::{Operation, Outcome};
use crate::dicom::command::{self, Command};
use crate::dicom::dataset::{DataSet, Edit};
use crate::dicom::message::Event;
use crate::dicom::peer::Incoming;
use crate::dicom::values;
use crate::policy::{Action, Permit, RetrieveRequest, UidLevel};
use dicom_core::VR;
use dicom_dictionary_std::tags;

/// What a retrieval identifier (C-GET or C-MOVE) asks for.
pub(crate) struct Retrieval {
    pub level_name: String,
    pub level: Option<UidLevel>,
    pub patient_id: Option<String>,
    pub study_uids: Vec<String>,
    pub series_uids: Vec<String>,
    pub instance_uids: Vec<String>,
}

/// Reads what a strictly read retrieval identifier asks for; `None` when it names no valid
/// level.
pub(crate) fn parse_retrieval(identifier: &DataSet<'_>) -> Option<Retrieval> {
    let level_name = values::trim_text(identifier.text(tags::QUERY_RETRIEVE_LEVEL)?).to_string();
    let level = match level_name.as_str() {
        "PATIENT" => None,
        "STUDY" => Some(UidLevel::Study),
        "SERIES" => Some(UidLevel::Series),
        "IMAGE" => Some(UidLevel::Instance),
        _ => return None,
    };
    let owned = |tag| {
        identifier
            .uids(tag)
            .into_iter()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    Some(Retrieval {
        patient_id: identifier.text(tags::PATIENT_ID).map(str::to_string),
        study_uids: owned(tags::STUDY_INSTANCE_UID),
        series_uids: owned(tags::SERIES_INSTANCE_UID),
        instance_uids: owned(tags::SOP_INSTANCE_UID),
        level_name,
        level,
    })
}

/// Reads a retrieval identifier and asks the policy core. On refusal the client has been
/// answered and `Err(flow)` says how the association goes on. On success: the identifier to
/// send upstream (the bytes that were judged, or their re-encoding with the PatientID the
/// decision names), and the decision every instance must pass.
pub(crate) async fn authorize(
    s: &mut Association,
    pc_id: u8,
    cmd: &Command,
    op: Operation,
) -> Result<(Vec<u8>, Permit), Flow> {
    let (bytes, syntax) = s.read_identifier(pc_id, cmd).await?;
    let identifier = match DataSet::read(&bytes, syntax.encoding, s.ctx.cfg.limits.reader()) {
        Ok(d) => d,
        Err(v) => return Err(s.bad_identifier(pc_id, cmd, &v).await),
    };
    let Some(r) = parse_retrieval(&identifier) else {
        let rsp = cmd.response(
            command::STATUS_IDENTIFIER_MISMATCH,
            Some("identifier names no query/retrieve level"),
        );
        return Err(s.reply(pc_id, &rsp, None).await);
    };
    let req = RetrieveRequest {
        level: r.level,
        patient_id: r.patient_id.as_deref(),
        study_uids: r.study_uids,
        series_uids: r.series_uids,
        instance_uids: r.instance_uids,
    };
    let what = format!(
        "level={} uids={}",
        r.level_name,
        req.study_uids.len() + req.series_uids.len() + req.instance_uids.len()
    );
    let asked: Vec<String> = req.study_uids.iter().map(|u| u.to_string()).collect();
    let allowed = match s.ctx.policy.decide(&s.caller, Action::Retrieve(req)).await {
        Ok(a) => a,
        Err(d) => {
            return Err(s.refuse_about(pc_id, cmd, (op, &what), &d, asked).await);
        }
    };
    s.trail().about_permit(&allowed).record(
        op,
        &what,
        Outcome::Allowed,
        "every UID belongs to the caller's patient",
    );
    let upstream = match allowed.query_patient_ids().first() {
        Some(pid) => identifier.rewrite(&[Edit::Set(tags::PATIENT_ID, VR::LO, pid.as_bytes())]),
        None => bytes.clone(),
    };
    Ok((upstream, allowed))
}

/// Sub-operations as the gateway saw them answered; the counts the client is given.
#[derive(Default, Clone, Copy)]
pub struct Tally {
    pub completed: usize,
    pub warning: usize,
    pub failed: usize,
    /// Of the failed: refused by the gateway (another patient's, not requested, unreadable).
    pub withheld: usize,
}

impl Tally {
    /// Counts one sub-operation's status.
    pub fn count(&mut self, status: u16) {
        match status {
            0x0000 => self.completed += 1,
            s if command::is_stored(s) => self.warning += 1,
            _ => self.failed += 1,
        }
    }

    /// Puts these counts on a final C-GET or C-MOVE response: the gateway's counts, never
    /// fewer failures than the PACS reported, and a success with failures becomes a warning.
    pub(crate) fn apply_final(&self, rsp: &mut Command) {
        let n = |v: usize| v.min(u16::MAX as usize) as u16;
        let pacs_failed = rsp.failed.unwrap_or(0);
        rsp.completed = Some(n(self.completed));
        rsp.warning = Some(n(self.warning));
        rsp.failed = Some(n(self.failed).max(pacs_failed));
        rsp.remaining = None;
        if rsp.status == Some(command::STATUS_SUCCESS) && (self.failed > 0 || self.warning > 0) {
            rsp.status = Some(command::STATUS_SUBOPS_WARNING);
        }
    }
}

/// Handles something from the client while a retrieval runs: a C-CANCEL is relayed (`None`:
/// go on); anything else ends the association.
pub(crate) async fn relay_cancel(s: &mut Association, pc_id: u8, c: Incoming) -> Option<Flow> {
    match c {
        Incoming::Message(Event::Command {
            pc_id: cpc,
            command: cancel,
        }) if cancel.field == command::C_CANCEL_RQ && cpc == pc_id => {
            match s.pacs.send_message(pc_id, &cancel.encode(), None).await {
                Ok(()) => None,
                Err(_) => Some(s.abort_both().await),
            }
        }
        Incoming::Message(_) => Some(
            s.protocol_violation(Side::Client, Misbehaviour::UnexpectedMessage, None)
                .await,
        ),
        Incoming::Abort | Incoming::Gone(_) => {
            tracing::info!(assoc = s.id, "client left during a retrieval");
            s.pacs.abort().await;
            Some(Flow::End)
        }
        _ => Some(
            s.protocol_violation(Side::Client, Misbehaviour::UnexpectedPdu, None)
                .await,
        ),
    }
}
