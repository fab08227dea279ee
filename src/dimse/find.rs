//! C-FIND through the gateway (Patient Root and Study Root, every level).
//!
//! The policy core decides how the identifier is narrowed; this file applies it: PatientID is set
//! to the value the decision names (added as a key when the caller did not send one, and then
//! stripped from what the caller gets back), the query goes to the PACS, and every pending
//! response is checked against the decision's patient filter before it is relayed: a response
//! for another patient is dropped and recorded as an anomaly. Under a study restriction the
//! Study Instance UID is asked for too (and stripped when added), and each match's study is put
//! to the policy core's study gate; matches outside are withheld. C-CANCEL is relayed.

use super::command::{self, Command};
use super::message::Event;
use super::peer::Incoming;
use super::session::{Flow, Session};
use crate::audit::{self, Outcome};
use crate::policy::{
    Action, Allowed, Decision, EHR_BATCH, ResultStudy, StudyFacts, StudyGate, StudyMemo,
};
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::transfer_syntax::TransferSyntax;
use dicom_object::InMemDicomObject;
use std::time::SystemTime;

/// Patient-level counts (Number of Patient Related Studies, Series, Instances).
const PATIENT_COUNTS: [dicom_core::Tag; 3] = [
    dicom_core::Tag(0x0020, 0x1200),
    dicom_core::Tag(0x0020, 0x1202),
    dicom_core::Tag(0x0020, 0x1204),
];

fn patient_id_of(obj: &InMemDicomObject) -> Option<String> {
    obj.get(tags::PATIENT_ID)
        .map(|e| e.to_str().map(|s| s.into_owned()).unwrap_or_default())
}

pub async fn handle(s: &mut Session, pc_id: u8, cmd: Command) -> Flow {
    let (identifier, ts) = match s.read_identifier(pc_id, &cmd).await {
        Ok(x) => x,
        Err(flow) => return flow,
    };
    let mut query = match InMemDicomObject::read_dataset_with_ts(&identifier[..], ts) {
        Ok(o) => o,
        Err(_) => {
            let rsp = cmd.response(
                command::STATUS_IDENTIFIER_MISMATCH,
                Some("identifier cannot be parsed"),
            );
            return s.reply(pc_id, &rsp, None).await;
        }
    };
    let requested = patient_id_of(&query);
    let decision = s.ctx.policy.decide(
        &s.principal,
        Action::Query {
            patient_id: requested.as_deref(),
        },
        SystemTime::now(),
    );
    let level = query
        .get(tags::QUERY_RETRIEVE_LEVEL)
        .and_then(|e| e.to_str().ok())
        .map(|l| l.trim().to_string())
        .unwrap_or_default();
    let what = format!("C-FIND level={level}");
    let allowed = match decision {
        Decision::Deny(d) => {
            return s.refuse(pc_id, &cmd, &what, &d).await;
        }
        Decision::Allow(a) => a,
    };
    audit::record(
        "dimse",
        s.id,
        Some(&s.principal),
        &what,
        Outcome::Allowed,
        "patient scope applied",
    );

    // Narrow the identifier as decided (one query per PatientID the caller may see); re-encode
    // only when it changed. Return keys the judgement needs are asked for, and stripped again
    // from the matches when the caller did not ask: the Study Instance UID under a study
    // restriction, IssuerOfPatientID where the issuer counts (patients.use_issuer), and at
    // STUDY level the facts a granular scope is judged on (so no look-up per study is needed).
    let gated = !matches!(allowed.studies, StudyGate::Open);
    // A match's facts are trusted only when the caller did not match on them: a PACS may echo
    // a matching value back instead of the study's own.
    let unmatched = |t| {
        query
            .get(t)
            .is_none_or(|e| e.to_str().map(|v| v.trim().is_empty()).unwrap_or(false))
    };
    // A timezone offset in the query may shift the dates the PACS answers with.
    let study_facts = level == "STUDY"
        && allowed.wants_study_facts()
        && unmatched(tags::MODALITIES_IN_STUDY)
        && unmatched(tags::STUDY_DATE)
        && query.get(tags::TIMEZONE_OFFSET_FROM_UTC).is_none();
    let mut added: Vec<Tag> = Vec::new();
    for (tag, vr, wanted) in [
        (
            tags::PATIENT_ID,
            VR::LO,
            !allowed.query_patient_ids.is_empty(),
        ),
        (
            tags::ISSUER_OF_PATIENT_ID,
            VR::LO,
            allowed.filter.compares_issuer(),
        ),
        (
            tags::STUDY_INSTANCE_UID,
            VR::UI,
            gated && level != "PATIENT",
        ),
        (tags::MODALITIES_IN_STUDY, VR::CS, study_facts),
        (tags::STUDY_DATE, VR::DA, study_facts),
    ] {
        if wanted && query.get(tag).is_none() {
            added.push(tag);
            if tag != tags::PATIENT_ID {
                query.put(DataElement::new(tag, vr, PrimitiveValue::from("")));
            }
        }
    }
    let keys_added = added.iter().any(|t| *t != tags::PATIENT_ID);
    let mut queries = Vec::new();
    let pids: Vec<Option<&str>> = if allowed.query_patient_ids.is_empty() {
        vec![None]
    } else {
        allowed
            .query_patient_ids
            .iter()
            .map(|p| Some(p.as_str()))
            .collect()
    };
    for pid in pids {
        if !keys_added && (pid.is_none() || requested.as_deref() == pid) {
            queries.push(identifier.clone());
            continue;
        }
        if let Some(pid) = pid {
            query.put(DataElement::new(
                tags::PATIENT_ID,
                VR::LO,
                PrimitiveValue::from(pid),
            ));
        }
        let mut out = Vec::with_capacity(identifier.len() + 32);
        if query.write_dataset_with_ts(&mut out, ts).is_err() {
            let rsp = cmd.response(
                command::STATUS_UNABLE_TO_PROCESS,
                Some("identifier cannot be encoded"),
            );
            return s.reply(pc_id, &rsp, None).await;
        }
        queries.push(out);
    }
    let n = queries.len();
    let mut memo = StudyMemo::default();
    for (k, upstream_identifier) in queries.into_iter().enumerate() {
        if let Err(e) = s
            .pacs
            .send_message(pc_id, &cmd.raw, Some(&upstream_identifier))
            .await
        {
            tracing::warn!(assoc = s.id, reason = %e, "cannot send C-FIND to the PACS");
            return fail_upstream(s, pc_id, &cmd).await;
        }
        let pass = Pass {
            allowed: &allowed,
            strip: &added,
            study_facts,
            ts,
            last: k + 1 == n,
            pc_id,
        };
        match relay_responses(s, pc_id, &cmd, pass, &mut memo).await {
            Step::Next => continue,
            Step::Done(flow) => return flow,
        }
    }
    Flow::Continue
}

/// Where a query for one PatientID left the operation.
enum Step {
    /// It succeeded and another query follows; its final response was not relayed.
    Next,
    Done(Flow),
}

/// How one upstream query's matches are judged and relayed.
struct Pass<'a> {
    allowed: &'a Allowed,
    /// Keys the gateway added to the identifier, removed again from each match.
    strip: &'a [Tag],
    /// Matches are studies carrying ModalitiesInStudy and StudyDate to be judged on.
    study_facts: bool,
    ts: &'static TransferSyntax,
    /// The last of the operation's queries: its final response goes to the client.
    last: bool,
    pc_id: u8,
}

/// Relays the PACS's responses until the final one, checking each match; relays C-CANCEL.
async fn relay_responses(
    s: &mut Session,
    pc_id: u8,
    cmd: &Command,
    pass: Pass<'_>,
    memo: &mut StudyMemo,
) -> Step {
    let (allowed, ts, last) = (pass.allowed, pass.ts, pass.last);
    let limits = s.ctx.cfg.limits.clone();
    let mut counts = Counts::default();
    let mut held = Held::default();
    let batching = allowed.asks_ehr();
    loop {
        // Never wait on the PACS with matches held back for the client.
        if !s.pacs.has_input_at_hand() {
            if let Flow::End = relay_held(s, &pass, &mut held, memo, &mut counts).await {
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
            _ = tokio::time::sleep(MAX_HOLD), if !held.matches.is_empty() => {
                if let Flow::End = relay_held(s, &pass, &mut held, memo, &mut counts).await {
                    return Step::Done(Flow::End);
                }
                continue;
            }
            i = tokio::time::timeout(limits.upstream_timeout, s.pacs.next()) => match i {
                Ok(i) => i,
                Err(_) => {
                    tracing::warn!(assoc = s.id, "PACS did not answer C-FIND within {:?}", limits.upstream_timeout);
                    return Step::Done(fail_upstream(s, pc_id, cmd).await);
                }
            },
            c = s.client.next() => {
                match c {
                    Incoming::Message(Event::Command { pc_id: cpc, bytes }) => {
                        match Command::decode(bytes) {
                            Ok(cancel) if cancel.field() == Some(command::C_CANCEL_RQ) && cpc == pc_id => {
                                s.client.expect_data(cpc, false);
                                if s.pacs.send_message(pc_id, &cancel.raw, None).await.is_err() {
                                    return Step::Done(fail_upstream(s, pc_id, cmd).await);
                                }
                                continue;
                            }
                            _ => return Step::Done(s.protocol_violation("client", "new request while a C-FIND is running").await),
                        }
                    }
                    Incoming::Abort | Incoming::Gone(_) => {
                        tracing::info!(assoc = s.id, "client left during C-FIND");
                        s.pacs.abort().await;
                        return Step::Done(Flow::End);
                    }
                    _ => return Step::Done(s.protocol_violation("client", "unexpected PDU during C-FIND").await),
                }
            }
        };
        let (rpc, bytes) = match incoming {
            Incoming::Message(Event::Command { pc_id: rpc, bytes }) => (rpc, bytes),
            Incoming::Abort | Incoming::Gone(_) | Incoming::ReleaseRq | Incoming::ReleaseRp => {
                tracing::warn!(assoc = s.id, "PACS went away during C-FIND");
                return Step::Done(fail_upstream(s, pc_id, cmd).await);
            }
            Incoming::Message(Event::Data { .. }) => {
                return Step::Done(
                    s.protocol_violation("pacs", "data set without a command")
                        .await,
                );
            }
        };
        let rsp = match Command::decode(bytes) {
            Ok(r) if r.field() == Some(command::C_FIND_RSP) && rpc == pc_id => r,
            _ => {
                return Step::Done(
                    s.protocol_violation("pacs", "unexpected message during C-FIND")
                        .await,
                );
            }
        };
        s.pacs.expect_data(rpc, rsp.has_data_set());
        let status = rsp.status().unwrap_or(command::STATUS_UNABLE_TO_PROCESS);
        let data = if rsp.has_data_set() {
            match s
                .pacs
                .collect_data(rpc, limits.max_identifier_bytes, limits.upstream_timeout)
                .await
            {
                Ok(d) => Some(d),
                Err(e) => {
                    tracing::warn!(assoc = s.id, reason = %e, "PACS failed while sending a C-FIND match");
                    return Step::Done(fail_upstream(s, pc_id, cmd).await);
                }
            }
        } else {
            None
        };
        if !command::is_pending(status) {
            if let Flow::End = relay_held(s, &pass, &mut held, memo, &mut counts).await {
                return Step::Done(Flow::End);
            }
            let Counts {
                relayed,
                dropped,
                outside,
            } = counts;
            tracing::debug!(
                assoc = s.id,
                relayed,
                dropped,
                status = format!("{status:#06x}"),
                "C-FIND done"
            );
            if outside > 0 {
                audit::record(
                    "dimse",
                    s.id,
                    Some(&s.principal),
                    "C-FIND",
                    Outcome::Allowed,
                    &format!(
                        "{outside} match(es) outside the token's study restriction withheld{}",
                        memo.stopped
                            .map(|why| format!(" (judging stopped: {why})"))
                            .unwrap_or_default()
                    ),
                );
            }
            if dropped > 0 {
                audit::record(
                    "dimse",
                    s.id,
                    Some(&s.principal),
                    "C-FIND",
                    Outcome::Anomaly,
                    &format!("{dropped} PACS match(es) for other patients were withheld"),
                );
            }
            // A final response never carries a match; any data set it has is withheld.
            let out = if rsp.has_data_set() {
                rsp.without_data_set()
            } else {
                rsp.raw
            };
            if !last && status == command::STATUS_SUCCESS {
                return Step::Next;
            }
            return Step::Done(s.reply(pc_id, &out, None).await);
        }
        let Some(data) = data else {
            // A pending response without a match: nothing to check, relay as is (after any
            // matches held before it, to keep the order).
            if let Flow::End = relay_held(s, &pass, &mut held, memo, &mut counts).await {
                return Step::Done(Flow::End);
            }
            if let Flow::End = s.relay_to_client(pc_id, &rsp.raw, None).await {
                return Step::Done(Flow::End);
            }
            continue;
        };
        // Where the issuer counts, a match must say it (an empty value says "none"): a PACS
        // that leaves the key out says nothing, and the match is withheld.
        let issuer = if allowed.filter.compares_issuer() {
            match crate::dataset::top_level_text(&data, ts, tags::ISSUER_OF_PATIENT_ID) {
                Ok(Some(i)) => Ok(Some(i)),
                _ => Err(()),
            }
        } else {
            Ok(None)
        };
        let admitted = match (crate::dataset::patient_id(&data, ts), issuer) {
            (Ok(pid), Ok(issuer)) => allowed.filter.admits(pid.as_deref(), issuer.as_deref()),
            _ => false,
        };
        if !admitted {
            counts.dropped += 1;
            tracing::warn!(
                assoc = s.id,
                "PACS returned a C-FIND match for another patient (or none); withheld"
            );
            continue;
        }
        held.bytes += data.len();
        held.matches.push((rsp.raw, data));
        // Under ehr-check a batch of matches is judged together (one EHR search for all of
        // them); otherwise, and whenever the PACS has nothing more at hand, matches go on now.
        // Under ehr-check matches gather (up to a batch) while the PACS has more at hand; the
        // loop's top relays them as soon as it has not.
        let flush = !batching || held.matches.len() >= EHR_BATCH || held.bytes >= MAX_HELD_BYTES;
        if flush && let Flow::End = relay_held(s, &pass, &mut held, memo, &mut counts).await {
            return Step::Done(Flow::End);
        }
    }
}

/// The PACS failed: the client gets a failure status for its C-FIND, then both associations end,
/// since the upstream one is in an unknown state.
async fn fail_upstream(s: &mut Session, pc_id: u8, cmd: &Command) -> Flow {
    let rsp = cmd.response(command::STATUS_UNABLE_TO_PROCESS, Some("PACS unavailable"));
    let _ = s.client.send_message(pc_id, &rsp, None).await;
    s.abort_both().await
}

/// Matches a study gate has yet to judge, held for one batched EHR search.
#[derive(Default)]
struct Held {
    matches: Vec<(Vec<u8>, Vec<u8>)>,
    bytes: usize,
}

/// The most match bytes held back for a batch.
const MAX_HELD_BYTES: usize = 1024 * 1024;

#[derive(Default, Clone, Copy)]
struct Counts {
    relayed: usize,
    dropped: usize,
    outside: usize,
}

/// How long held matches wait for the rest of a message the PACS is sending.
const MAX_HOLD: std::time::Duration = std::time::Duration::from_millis(20);

/// Judges the held matches against the study gate (asking the EHR about all their studies at
/// once first), strips what the gateway added, and relays the admitted ones in order.
async fn relay_held(
    s: &mut Session,
    pass: &Pass<'_>,
    held: &mut Held,
    memo: &mut StudyMemo,
    counts: &mut Counts,
) -> Flow {
    if held.matches.is_empty() {
        return Flow::Continue;
    }
    let matches = std::mem::take(&mut held.matches);
    held.bytes = 0;
    let Pass {
        allowed,
        strip,
        study_facts,
        ts,
        pc_id,
        ..
    } = *pass;
    let ctx = s.ctx.clone();
    let gated = !matches!(allowed.studies, StudyGate::Open);
    if allowed.asks_ehr() {
        let uids: Vec<String> = matches
            .iter()
            .filter_map(|(_, data)| {
                crate::dataset::top_level_text(data, ts, tags::STUDY_INSTANCE_UID)
                    .ok()
                    .flatten()
                    .map(|u| u.trim_end_matches(['\0', ' ']).to_string())
            })
            .collect();
        ctx.policy
            .prefetch_ehr(&s.principal, allowed, &uids, memo, &*ctx.trust)
            .await;
    }
    for (raw, data) in matches {
        if gated {
            let text = |t| crate::dataset::top_level_text(&data, ts, t).ok().flatten();
            let study = text(tags::STUDY_INSTANCE_UID);
            let facts = study_facts.then(|| StudyFacts {
                modalities: text(tags::MODALITIES_IN_STUDY)
                    .map(|m| {
                        m.split('\\')
                            .map(|x| x.trim_matches([' ', '\0']).to_string())
                            .filter(|x| !x.is_empty())
                            .collect()
                    })
                    .unwrap_or_default(),
                study_date: text(tags::STUDY_DATE),
            });
            if !ctx
                .policy
                .admits_result(
                    &s.principal,
                    allowed,
                    ResultStudy {
                        uid: study.as_deref(),
                        facts: facts.as_ref(),
                    },
                    memo,
                    &*ctx.lookup,
                    &*ctx.trust,
                )
                .await
            {
                counts.outside += 1;
                continue;
            }
        }
        // Patient-wide counts would tell of studies outside the restriction.
        let strip_counts = gated
            && PATIENT_COUNTS
                .iter()
                .any(|t| matches!(crate::dataset::top_level_text(&data, ts, *t), Ok(Some(_))));
        let out = if !strip.is_empty() || strip_counts {
            let stripped = InMemDicomObject::read_dataset_with_ts(&data[..], ts)
                .ok()
                .and_then(|mut obj| {
                    for t in strip {
                        obj.remove_element(*t);
                    }
                    if strip_counts {
                        for t in PATIENT_COUNTS {
                            obj.remove_element(t);
                        }
                    }
                    let mut out = Vec::with_capacity(data.len());
                    obj.write_dataset_with_ts(&mut out, ts).ok().map(|_| out)
                });
            match stripped {
                Some(out) => out,
                None => {
                    counts.dropped += 1;
                    continue;
                }
            }
        } else {
            data
        };
        counts.relayed += 1;
        if let Flow::End = s.relay_to_client(pc_id, &raw, Some(&out)).await {
            return Flow::End;
        }
    }
    Flow::Continue
}
