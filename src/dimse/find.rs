//! C-FIND through the gateway (Patient Root and Study Root, every level).
//!
//! The identifier is read strictly (a malformed one is A900H and never reaches the PACS). The
//! policy core decides the query and its plan ([`crate::policy::query`]); this file applies
//! them: PatientID is set to the value the permit names (one query per value), the return keys
//! the plan needs are added when the caller did not ask for them (and stripped again from what
//! the caller gets back), the query goes to the PACS, and every pending response is read
//! strictly and put to the policy core's result judge before it is relayed: a match of another
//! patient, outside the token's study restriction, or that cannot be read unambiguously, is
//! withheld (the first and last recorded as anomalies). C-CANCEL is relayed.

use super::association::{Association, Flow, Misbehaviour, Side};
use crate::audit::{Operation, Outcome};
use crate::dicom::command::{self, Command};
use crate::dicom::dataset::{DataSet, Edit};
use crate::dicom::message::Event;
use crate::dicom::peer::Incoming;
use crate::dicom::reader::Encoding;
use crate::dicom::values;
use crate::policy::query::PATIENT_COUNTS;
use crate::policy::{Action, MatchView, QueryLevel, QueryRequest, ResultJudge, ResultKey, Verdict};
use dicom_core::{Tag, VR};
use dicom_dictionary_std::tags;
use std::sync::Arc;

pub async fn handle(s: &mut Association, pc_id: u8, cmd: Command) -> Flow {
    let (identifier, syntax) = match s.read_identifier(pc_id, &cmd).await {
        Ok(x) => x,
        Err(flow) => return flow,
    };
    let limits = s.ctx.cfg.limits.reader();
    let query = match DataSet::read(&identifier, syntax.encoding, limits) {
        Ok(q) => q,
        Err(v) => return s.bad_identifier(pc_id, &cmd, &v).await,
    };
    let level_name = query
        .text(tags::QUERY_RETRIEVE_LEVEL)
        .map(values::trim_text)
        .unwrap_or_default()
        .to_string();
    let level = match level_name.as_str() {
        "PATIENT" => QueryLevel::Patient,
        "SERIES" => QueryLevel::Series,
        "IMAGE" => QueryLevel::Image,
        _ => QueryLevel::Study,
    };
    // A key with an empty value is a return key; one with a value is matched on.
    let matched = |t| query.contains(t) && !query.is_empty(t);
    let requested = query.text(tags::PATIENT_ID);
    // Below STUDY level a query naming studies (and at IMAGE level series) searches inside
    // them, as a QIDO-RS search under /studies/{uid} does.
    let studies = match level {
        QueryLevel::Series | QueryLevel::Image => query.uids(tags::STUDY_INSTANCE_UID),
        _ => Vec::new(),
    };
    let series = match level {
        QueryLevel::Image => query.uids(tags::SERIES_INSTANCE_UID),
        _ => Vec::new(),
    };
    let request = QueryRequest {
        level,
        patient_id: requested,
        inside_studies: &studies,
        inside_series: &series,
        matches_on_facts: matched(tags::MODALITIES_IN_STUDY)
            || matched(tags::STUDY_DATE)
            || query.contains(tags::TIMEZONE_OFFSET_FROM_UTC),
        // Patient Root and Patient/Study Only (by the negotiated context, not what the command
        // says): PatientID is the unique key above every level.
        patient_root: s.contexts.get(&pc_id).is_some_and(|c| {
            c.abstract_syntax == "1.2.840.10008.5.1.4.1.2.1.1"
                || c.abstract_syntax == "1.2.840.10008.5.1.4.1.2.3.1"
        }),
        by_dimse: true,
    };
    let what = format!("level={level_name}");
    let inside: Vec<String> = studies.iter().map(|u| u.to_string()).collect();
    let permit = match s.ctx.policy.decide(&s.caller, Action::Query(request)).await {
        Ok(p) => p,
        Err(d) => {
            return s
                .refuse_about(pc_id, &cmd, (Operation::Find, &what), &d, inside)
                .await;
        }
    };
    s.trail().about(permit.audited_patients(), inside).record(
        Operation::Find,
        &what,
        Outcome::Allowed,
        "patient scope applied",
    );

    // The return keys the judgement needs are asked for, and stripped again from the matches
    // when the caller did not ask; one query per PatientID the caller may see. The identifier
    // is re-encoded only when it changed: bytes relayed unchanged are the bytes judged.
    let pids = permit.query_patient_ids();
    let mut added: Vec<Tag> = Vec::new();
    let mut edits: Vec<Edit<'_>> = Vec::new();
    for key in permit.result_keys() {
        let tag = key.tag();
        // A PACS may echo a matching value back instead of the record's own: the issuer a match
        // is judged by is never one the caller chose, so the caller's value becomes a return key.
        if *key == ResultKey::IssuerOfPatientId && matched(tag) {
            edits.push(Edit::Set(tag, VR::LO, b""));
            continue;
        }
        if query.contains(tag) {
            continue;
        }
        added.push(tag);
        // PatientID is set below to the value each query carries.
        if *key != ResultKey::PatientId || pids.is_empty() {
            edits.push(Edit::Set(tag, vr_of(*key), b""));
        }
    }
    let targets: Vec<Option<&str>> = if pids.is_empty() {
        vec![None]
    } else {
        pids.iter().map(|p| Some(p.as_str())).collect()
    };
    let mut queries = Vec::new();
    for pid in targets {
        if edits.is_empty() && (pid.is_none() || requested == pid) {
            queries.push(identifier.clone());
            continue;
        }
        let mut e: Vec<Edit<'_>> = edits
            .iter()
            .map(|x| match x {
                Edit::Set(t, v, b) => Edit::Set(*t, *v, b),
                Edit::Remove(t) => Edit::Remove(*t),
            })
            .collect();
        if let Some(pid) = pid {
            e.push(Edit::Set(tags::PATIENT_ID, VR::LO, pid.as_bytes()));
        }
        queries.push(query.rewrite(&e));
    }
    let n = queries.len();
    let upstream_cmd = cmd.encode();
    let (ctx, caller) = (s.ctx.clone(), s.caller.clone());
    let mut pass = Pass {
        judge: ctx.policy.judge(&caller, &permit),
        strip: added,
        encoding: syntax.encoding,
        last: false,
        pc_id,
        held: Vec::new(),
        held_views: Vec::new(),
        held_bytes: 0,
        unreadable: 0,
    };
    for (k, upstream_identifier) in queries.into_iter().enumerate() {
        if let Err(e) = s
            .pacs
            .send_message(pc_id, &upstream_cmd, Some(&upstream_identifier))
            .await
        {
            tracing::warn!(assoc = s.id, reason = %e, "cannot send C-FIND to the PACS");
            return s.fail_upstream(pc_id, &cmd, "PACS unavailable").await;
        }
        pass.last = k + 1 == n;
        match relay_responses(s, &cmd, &mut pass).await {
            Step::Next => continue,
            Step::Done(flow) => return flow,
        }
    }
    Flow::Continue
}

fn vr_of(key: ResultKey) -> VR {
    match key {
        ResultKey::PatientId | ResultKey::IssuerOfPatientId => VR::LO,
        ResultKey::StudyInstanceUid => VR::UI,
        ResultKey::ModalitiesInStudy => VR::CS,
        ResultKey::StudyDate => VR::DA,
    }
}

/// Where a query for one PatientID left the operation.
enum Step {
    /// It succeeded and another query follows; its final response was not relayed.
    Next,
    Done(Flow),
}

/// How the operation's matches are judged and relayed, across its queries.
struct Pass<'a> {
    judge: ResultJudge<'a>,
    /// Keys the gateway added to the identifier, removed again from each match.
    strip: Vec<Tag>,
    encoding: Encoding,
    /// The last of the operation's queries: its final response goes to the client.
    last: bool,
    pc_id: u8,
    /// Matches read and waiting to be judged together (one EHR search for a batch), and what
    /// the judge is shown of each.
    held: Vec<HeldMatch>,
    held_views: Vec<MatchView>,
    held_bytes: usize,
    /// Matches the strict reader refused.
    unreadable: usize,
}

/// A match read, waiting to be judged and relayed.
struct HeldMatch {
    /// The pending response's command set, encoded (shared: consecutive ones are alike).
    rsp: Arc<Vec<u8>>,
    /// The match as it goes to the client: the bytes read, less what the gateway added.
    data: Vec<u8>,
}

/// Relays the PACS's responses until the final one, checking each match; relays C-CANCEL.
async fn relay_responses(s: &mut Association, cmd: &Command, pass: &mut Pass<'_>) -> Step {
    let pc_id = pass.pc_id;
    let limits = s.ctx.cfg.limits.clone();
    let reader_limits = limits.reader();
    let mut last_rsp: Option<(Box<Command>, Arc<Vec<u8>>)> = None;
    loop {
        // Never wait on the PACS with matches held back for the client.
        if !s.pacs.has_input_at_hand() {
            if let Flow::End = relay_held(s, pass).await {
                return Step::Done(Flow::End);
            }
            if s.client.queued_bytes() > 0
                && let Err(e) = s.client.flush().await
            {
                tracing::info!(assoc = s.id, reason = %e, "cannot write to the client");
                s.pacs.abort().await;
                return Step::Done(Flow::End);
            }
        }
        let incoming = tokio::select! {
            // Held matches wait only briefly for the rest of a message the PACS is sending.
            _ = tokio::time::sleep(MAX_HOLD), if !pass.held.is_empty() => {
                if let Flow::End = relay_held(s, pass).await {
                    return Step::Done(Flow::End);
                }
                continue;
            }
            i = tokio::time::timeout(limits.upstream_timeout, s.pacs.next()) => match i {
                Ok(i) => i,
                Err(_) => {
                    tracing::warn!(assoc = s.id, "PACS did not answer C-FIND within {:?}", limits.upstream_timeout);
                    return Step::Done(s.fail_upstream(pc_id, cmd, "PACS unavailable").await);
                }
            },
            c = s.client.next() => {
                match c {
                    Incoming::Message(Event::Command { pc_id: cpc, command: cancel })
                        if cancel.field == command::C_CANCEL_RQ && cpc == pc_id =>
                    {
                        if s.pacs.send_message(pc_id, &cancel.encode(), None).await.is_err() {
                            return Step::Done(s.fail_upstream(pc_id, cmd, "PACS unavailable").await);
                        }
                        continue;
                    }
                    Incoming::Message(_) => {
                        return Step::Done(s.protocol_violation(Side::Client, Misbehaviour::UnexpectedMessage, Some(Operation::Find)).await);
                    }
                    Incoming::Abort | Incoming::Gone(_) => {
                        tracing::info!(assoc = s.id, "client left during C-FIND");
                        s.pacs.abort().await;
                        return Step::Done(Flow::End);
                    }
                    _ => return Step::Done(s.protocol_violation(Side::Client, Misbehaviour::UnexpectedPdu, Some(Operation::Find)).await),
                }
            }
        };
        let (rpc, mut rsp) = match incoming {
            Incoming::Message(Event::Command {
                pc_id: rpc,
                command,
            }) => (rpc, command),
            Incoming::Abort | Incoming::Gone(_) | Incoming::ReleaseRq | Incoming::ReleaseRp => {
                tracing::warn!(assoc = s.id, "PACS went away during C-FIND");
                return Step::Done(s.fail_upstream(pc_id, cmd, "PACS unavailable").await);
            }
            Incoming::Message(Event::Data { .. }) => {
                return Step::Done(
                    s.protocol_violation(
                        Side::Pacs,
                        Misbehaviour::DataSetWithoutCommand,
                        Some(Operation::Find),
                    )
                    .await,
                );
            }
        };
        if rsp.field != command::C_FIND_RSP || rpc != pc_id {
            return Step::Done(
                s.protocol_violation(
                    Side::Pacs,
                    Misbehaviour::UnexpectedMessage,
                    Some(Operation::Find),
                )
                .await,
            );
        }
        let status = rsp.status.unwrap_or(command::STATUS_UNABLE_TO_PROCESS);
        let data = if rsp.has_data_set() {
            match s
                .pacs
                .collect_data(rpc, limits.max_identifier_bytes, limits.upstream_timeout)
                .await
            {
                Ok(d) => Some(d),
                Err(e) => {
                    tracing::warn!(assoc = s.id, reason = %e, "PACS failed while sending a C-FIND match");
                    return Step::Done(s.fail_upstream(pc_id, cmd, "PACS unavailable").await);
                }
            }
        } else {
            None
        };
        if !command::is_pending(status) {
            if let Flow::End = relay_held(s, pass).await {
                return Step::Done(Flow::End);
            }
            if pass.last {
                record_withheld(s, pass);
            }
            // A final response never carries a match; any data set it has is withheld.
            rsp.data_set_type = command::NO_DATA_SET;
            if !pass.last && status == command::STATUS_SUCCESS {
                return Step::Next;
            }
            return Step::Done(s.reply(pc_id, &rsp, None).await);
        }
        let Some(data) = data else {
            // A pending response without a match: nothing to check, relay as is (after any
            // matches held before it, to keep the order).
            if let Flow::End = relay_held(s, pass).await {
                return Step::Done(Flow::End);
            }
            if let Flow::End = s.relay_to_client(pc_id, &rsp, None).await {
                return Step::Done(Flow::End);
            }
            continue;
        };
        // Pending responses are alike: each distinct one is encoded once.
        let encoded = match &last_rsp {
            Some((c, e)) if **c == *rsp => e.clone(),
            _ => {
                let e = Arc::new(rsp.encode());
                last_rsp = Some((rsp, e.clone()));
                e
            }
        };
        let Some((m, view)) = read_match(pass, reader_limits, encoded, data) else {
            pass.unreadable += 1;
            tracing::warn!(
                assoc = s.id,
                "PACS returned a C-FIND match the strict reader refused; withheld"
            );
            continue;
        };
        // Nothing to ask and nothing held before it: judged and relayed at once.
        if pass.held.is_empty()
            && let Some(v) = pass.judge.judge_now(&view)
        {
            if v == Verdict::Admit {
                if let Flow::End = s.relay_encoded(pc_id, &m.rsp, Some(&m.data)).await {
                    return Step::Done(Flow::End);
                }
            } else {
                tracing::warn!(
                    assoc = s.id,
                    "PACS returned a C-FIND match for another patient (or one whose patient cannot be established); withheld"
                );
            }
            continue;
        }
        pass.held_bytes += m.data.len();
        pass.held.push(m);
        pass.held_views.push(view);
        if (pass.held.len() >= pass.judge.batch() || pass.held_bytes >= MAX_HELD_BYTES)
            && let Flow::End = relay_held(s, pass).await
        {
            return Step::Done(Flow::End);
        }
    }
}

/// Records in the audit trail what the operation withheld.
fn record_withheld(s: &Association, pass: &Pass<'_>) {
    let tally = pass.judge.tally();
    tracing::debug!(
        assoc = s.id,
        relayed = tally.admitted,
        withheld = tally.other_patient + tally.outside + pass.unreadable,
        "C-FIND done"
    );
    if tally.outside > 0 {
        s.trail().record(
            Operation::Find,
            "",
            Outcome::Allowed,
            &format!(
                "{} match(es) outside the token's study restriction withheld{}",
                tally.outside,
                pass.judge
                    .stopped()
                    .map(|why| format!(" (judging stopped: {why})"))
                    .unwrap_or_default()
            ),
        );
    }
    let dropped = tally.other_patient + pass.unreadable;
    if dropped > 0 {
        s.trail().record(
            Operation::Find,
            "",
            Outcome::Anomaly,
            &format!("{dropped} PACS match(es) for other patients (or unreadable) were withheld"),
        );
    }
}

/// Reads a match strictly into the view the judge needs, and strips what the gateway added
/// (and, under a study restriction, the patient-wide counts). `None`: unreadable.
fn read_match(
    pass: &Pass<'_>,
    limits: crate::dicom::reader::Limits,
    rsp: Arc<Vec<u8>>,
    data: Vec<u8>,
) -> Option<(HeldMatch, MatchView)> {
    let m = DataSet::read(&data, pass.encoding, limits).ok()?;
    let text = |t| m.text(t).map(str::to_string);
    // Present but not a judged text value: nothing can be said of its issuer.
    if m.contains(tags::ISSUER_OF_PATIENT_ID) && m.text(tags::ISSUER_OF_PATIENT_ID).is_none() {
        return None;
    }
    let studies = m.uids(tags::STUDY_INSTANCE_UID);
    let view = MatchView {
        patient_id: text(tags::PATIENT_ID),
        issuer: m
            .contains(tags::ISSUER_OF_PATIENT_ID)
            .then(|| text(tags::ISSUER_OF_PATIENT_ID)),
        study: studies.first().map(|u| u.to_string()),
        several_studies: studies.len() > 1,
        modalities: m
            .text(tags::MODALITIES_IN_STUDY)
            .map(|v| v.split('\\').map(str::to_string).collect())
            .unwrap_or_default(),
        study_date: text(tags::STUDY_DATE),
    };
    let counts =
        pass.judge.strips_patient_counts() && PATIENT_COUNTS.iter().any(|t| m.contains(*t));
    let data = if !pass.strip.is_empty() || counts {
        let mut edits: Vec<Edit<'_>> = pass.strip.iter().map(|t| Edit::Remove(*t)).collect();
        if counts {
            edits.extend(PATIENT_COUNTS.iter().map(|t| Edit::Remove(*t)));
        }
        m.rewrite(&edits)
    } else {
        data
    };
    Some((HeldMatch { rsp, data }, view))
}

/// The most match bytes held back for a batch.
const MAX_HELD_BYTES: usize = 1024 * 1024;

/// How long held matches wait for the rest of a message the PACS is sending.
const MAX_HOLD: std::time::Duration = std::time::Duration::from_millis(20);

/// Puts the held matches to the judge and relays the admitted ones in order.
async fn relay_held(s: &mut Association, pass: &mut Pass<'_>) -> Flow {
    if pass.held.is_empty() {
        return Flow::Continue;
    }
    pass.held_bytes = 0;
    let verdicts = pass.judge.judge(&pass.held_views).await;
    pass.held_views.clear();
    // Drained, not taken: the buffers keep their room for the next batch.
    for (m, v) in pass.held.drain(..).zip(verdicts) {
        if v != Verdict::Admit {
            if v == Verdict::OtherPatient {
                tracing::warn!(
                    assoc = s.id,
                    "PACS returned a C-FIND match for another patient (or one whose patient cannot be established); withheld"
                );
            }
            continue;
        }
        if let Flow::End = s.relay_encoded(pass.pc_id, &m.rsp, Some(&m.data)).await {
            return Flow::End;
        }
    }
    Flow::Continue
}
