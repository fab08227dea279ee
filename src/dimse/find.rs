//! C-FIND through the gateway (Patient Root and Study Root, every level).
//!
//! The identifier is read strictly (a malformed one is A900H and never reaches the PACS). The
//! policy core decides how it is narrowed; this file applies it: PatientID is set to the value
//! the decision names (added as a key when the caller did not send one, and then stripped from
//! what the caller gets back), the query goes to the PACS, and every pending response is read
//! strictly and checked against the decision's patient filter before it is relayed: a response
//! for another patient, or one that cannot be read unambiguously, is dropped and recorded as an
//! anomaly. Under a study restriction the Study Instance UID is asked for too (and stripped when
//! added), and each match's study is put to the policy core's study gate; matches outside are
//! withheld. C-CANCEL is relayed.

use crate::dicom::message::Event;
use crate::dicom::peer::Incoming;
use super::session::{Flow, Session};
use crate::audit::{self, Outcome};
use crate::dicom::command::{self, Command};
use crate::dicom::dataset::{DataSet, Edit};
use crate::dicom::reader::Encoding;
use crate::dicom::values;
use crate::policy::{
    Action, Allowed, Decision, EHR_BATCH, ResultStudy, StudyFacts, StudyGate, StudyMemo,
};
use dicom_core::{Tag, VR};
use dicom_dictionary_std::tags;
use std::time::SystemTime;

/// Patient-level counts (Number of Patient Related Studies, Series, Instances).
const PATIENT_COUNTS: [Tag; 3] = [
    Tag(0x0020, 0x1200),
    Tag(0x0020, 0x1202),
    Tag(0x0020, 0x1204),
];

pub async fn handle(s: &mut Session, pc_id: u8, cmd: Command) -> Flow {
    let (identifier, syntax) = match s.read_identifier(pc_id, &cmd).await {
        Ok(x) => x,
        Err(flow) => return flow,
    };
    let limits = s.ctx.cfg.limits.reader();
    let query = match DataSet::read(&identifier, syntax.encoding, limits) {
        Ok(q) => q,
        Err(v) => return s.bad_identifier(pc_id, &cmd, &v).await,
    };
    let requested = query.text(tags::PATIENT_ID);
    let decision = s.ctx.policy.decide(
        &s.principal,
        Action::Query {
            patient_id: requested,
        },
        SystemTime::now(),
    );
    let level = query
        .text(tags::QUERY_RETRIEVE_LEVEL)
        .map(values::trim_text)
        .unwrap_or_default()
        .to_string();
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
    let unmatched = |t| !query.contains(t) || query.is_empty(t);
    // A timezone offset in the query may shift the dates the PACS answers with.
    let study_facts = level == "STUDY"
        && allowed.wants_study_facts()
        && unmatched(tags::MODALITIES_IN_STUDY)
        && unmatched(tags::STUDY_DATE)
        && !query.contains(tags::TIMEZONE_OFFSET_FROM_UTC);
    let mut added: Vec<Tag> = Vec::new();
    let mut edits: Vec<Edit<'_>> = Vec::new();
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
        if wanted && !query.contains(tag) {
            added.push(tag);
            if tag != tags::PATIENT_ID {
                edits.push(Edit::Set(tag, vr, b""));
            }
        }
    }
    let keys_added = !edits.is_empty();
    let pids: Vec<Option<&str>> = if allowed.query_patient_ids.is_empty() {
        vec![None]
    } else {
        allowed
            .query_patient_ids
            .iter()
            .map(|p| Some(p.as_str()))
            .collect()
    };
    let mut queries = Vec::new();
    for pid in pids {
        // The bytes relayed unchanged are the bytes the strict reader judged.
        if !keys_added && (pid.is_none() || requested == pid) {
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
    let mut memo = StudyMemo::default();
    let upstream_cmd = cmd.encode();
    for (k, upstream_identifier) in queries.into_iter().enumerate() {
        if let Err(e) = s
            .pacs
            .send_message(pc_id, &upstream_cmd, Some(&upstream_identifier))
            .await
        {
            tracing::warn!(assoc = s.id, reason = %e, "cannot send C-FIND to the PACS");
            return fail_upstream(s, pc_id, &cmd).await;
        }
        let pass = Pass {
            allowed: &allowed,
            strip: &added,
            study_facts,
            encoding: syntax.encoding,
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
    encoding: Encoding,
    /// The last of the operation's queries: its final response goes to the client.
    last: bool,
    pc_id: u8,
}

/// A match admitted for its patient, waiting for its study to be judged and to be relayed.
struct HeldMatch {
    /// The pending response's command set, encoded (shared: consecutive ones are alike).
    rsp: std::sync::Arc<Vec<u8>>,
    /// The match as it goes to the client: the bytes read, less what the gateway added.
    data: Vec<u8>,
    study: Option<String>,
    facts: Option<StudyFacts>,
}

/// Relays the PACS's responses until the final one, checking each match; relays C-CANCEL.
async fn relay_responses(
    s: &mut Session,
    pc_id: u8,
    cmd: &Command,
    pass: Pass<'_>,
    memo: &mut StudyMemo,
) -> Step {
    let (allowed, last) = (pass.allowed, pass.last);
    let limits = s.ctx.cfg.limits.clone();
    let reader_limits = limits.reader();
    let mut counts = Counts::default();
    let mut held = Held::default();
    let mut last_rsp: Option<(Box<Command>, std::sync::Arc<Vec<u8>>)> = None;
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
                    Incoming::Message(Event::Command { pc_id: cpc, command: cancel })
                        if cancel.field == command::C_CANCEL_RQ && cpc == pc_id =>
                    {
                        if s.pacs.send_message(pc_id, &cancel.encode(), None).await.is_err() {
                            return Step::Done(fail_upstream(s, pc_id, cmd).await);
                        }
                        continue;
                    }
                    Incoming::Message(_) => {
                        return Step::Done(s.protocol_violation("client", "new request while a C-FIND is running").await);
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
        let (rpc, mut rsp) = match incoming {
            Incoming::Message(Event::Command {
                pc_id: rpc,
                command,
            }) => (rpc, command),
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
        if rsp.field != command::C_FIND_RSP || rpc != pc_id {
            return Step::Done(
                s.protocol_violation("pacs", "unexpected message during C-FIND")
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
                    &format!(
                        "{dropped} PACS match(es) for other patients (or unreadable) were withheld"
                    ),
                );
            }
            // A final response never carries a match; any data set it has is withheld.
            rsp.data_set_type = command::NO_DATA_SET;
            if !last && status == command::STATUS_SUCCESS {
                return Step::Next;
            }
            return Step::Done(s.reply(pc_id, &rsp, None).await);
        }
        let Some(data) = data else {
            // A pending response without a match: nothing to check, relay as is (after any
            // matches held before it, to keep the order).
            if let Flow::End = relay_held(s, &pass, &mut held, memo, &mut counts).await {
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
                let e = std::sync::Arc::new(rsp.encode());
                last_rsp = Some((rsp, e.clone()));
                e
            }
        };
        let Some(m) = judge_patient(&pass, reader_limits, encoded, data) else {
            counts.dropped += 1;
            tracing::warn!(
                assoc = s.id,
                "PACS returned a C-FIND match for another patient (or none, or unreadable); withheld"
            );
            continue;
        };
        held.bytes += m.data.len();
        held.matches.push(m);
        // Under ehr-check matches gather (up to a batch) while the PACS has more at hand, so
        // one EHR search judges them all; the loop's top relays them as soon as it has not.
        let flush = !batching || held.matches.len() >= EHR_BATCH || held.bytes >= MAX_HELD_BYTES;
        if flush && let Flow::End = relay_held(s, &pass, &mut held, memo, &mut counts).await {
            return Step::Done(Flow::End);
        }
    }
}

/// Reads a match strictly and checks its patient (and issuer, where it counts: a match must
/// say it, an empty value saying "none"), and strips what the gateway added (and, under a
/// study restriction, the patient-wide counts). `None`: withheld.
fn judge_patient(
    pass: &Pass<'_>,
    limits: crate::dicom::reader::Limits,
    rsp: std::sync::Arc<Vec<u8>>,
    data: Vec<u8>,
) -> Option<HeldMatch> {
    let allowed = pass.allowed;
    let m = DataSet::read(&data, pass.encoding, limits).ok()?;
    let issuer = if allowed.filter.compares_issuer() {
        Some(m.text(tags::ISSUER_OF_PATIENT_ID)?)
    } else {
        None
    };
    if !allowed.filter.admits(m.text(tags::PATIENT_ID), issuer) {
        return None;
    }
    let gated = !matches!(allowed.studies, StudyGate::Open);
    let study = m
        .uids(tags::STUDY_INSTANCE_UID)
        .first()
        .map(|u| u.to_string());
    let facts = (gated && pass.study_facts).then(|| StudyFacts {
        modalities: m
            .text(tags::MODALITIES_IN_STUDY)
            .map(|v| {
                v.split('\\')
                    .map(|x| x.trim_matches(' ').to_string())
                    .filter(|x| !x.is_empty())
                    .collect()
            })
            .unwrap_or_default(),
        study_date: m.text(tags::STUDY_DATE).map(str::to_string),
    });
    // Patient-wide counts would tell of studies outside the restriction.
    let counts = gated && PATIENT_COUNTS.iter().any(|t| m.contains(*t));
    let data = if !pass.strip.is_empty() || counts {
        let mut edits: Vec<Edit<'_>> = pass.strip.iter().map(|t| Edit::Remove(*t)).collect();
        if counts {
            edits.extend(PATIENT_COUNTS.iter().map(|t| Edit::Remove(*t)));
        }
        m.rewrite(&edits)
    } else {
        data
    };
    Some(HeldMatch {
        rsp,
        study,
        facts,
        data,
    })
}

/// The PACS failed: the client gets a failure status for its C-FIND, then both associations end,
/// since the upstream one is in an unknown state.
async fn fail_upstream(s: &mut Session, pc_id: u8, cmd: &Command) -> Flow {
    let rsp = cmd.response(command::STATUS_UNABLE_TO_PROCESS, Some("PACS unavailable"));
    let _ = s.client.send_message(pc_id, &rsp.encode(), None).await;
    s.abort_both().await
}

/// Matches a study gate has yet to judge, held for one batched EHR search.
#[derive(Default)]
struct Held {
    matches: Vec<HeldMatch>,
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
/// once first) and relays the admitted ones in order.
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
    let Pass { allowed, pc_id, .. } = *pass;
    let ctx = s.ctx.clone();
    let gated = !matches!(allowed.studies, StudyGate::Open);
    if allowed.asks_ehr() {
        let uids: Vec<String> = matches.iter().filter_map(|m| m.study.clone()).collect();
        ctx.policy
            .prefetch_ehr(&s.principal, allowed, &uids, memo, &*ctx.trust)
            .await;
    }
    for m in matches {
        if gated
            && !ctx
                .policy
                .admits_result(
                    &s.principal,
                    allowed,
                    ResultStudy {
                        uid: m.study.as_deref(),
                        facts: m.facts.as_ref(),
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
        counts.relayed += 1;
        if let Flow::End = s.relay_encoded(pc_id, &m.rsp, Some(&m.data)).await {
            return Flow::End;
        }
    }
    Flow::Continue
}
