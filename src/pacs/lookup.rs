//! Ownership look-ups: which patient (and issuer) the PACS holds a study, series or instance
//! under, asked by C-FIND on associations of the gateway's own, pooled.
//!
//! Owns: the look-up associations (bounded; idle ones kept in a [`super::pool::Pool`]), the C-FIND it sends and
//! the strict reading of every answer. Reports every owner the PACS names for exactly the UID
//! asked; the policy core judges them (one UID under two patients included).
//! Must not know tokens or front ends.

use super::associate;
use crate::config::Pacs;
use crate::policy::{
    HoldsFuture, LookupError, LookupFuture, MAX_OWNERS, Owner, OwnerLookup, StudyFacts, UidLevel,
};
use dicom_ul::pdu::AssociationRQ;
use std::time::Duration;

/// Study Root Query/Retrieve Information Model – FIND.
pub(crate) const STUDY_ROOT_FIND: &str = "1.2.840.10008.5.1.4.1.2.2.1";
const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
const IMPLICIT_LE: &str = "1.2.840.10008.1.2";
/// Ownership look-ups running against the PACS at once; more wait (bounded by the timeout).
const MAX_CONCURRENT_LOOKUPS: usize = 8;

/// Idle look-up associations kept at most.
const MAX_IDLE: usize = MAX_CONCURRENT_LOOKUPS;
/// An idle look-up association is released after this long.
const MAX_IDLE_TIME: Duration = Duration::from_secs(10);

/// A look-up association and what it needs for the next C-FIND.
struct Conn {
    peer: crate::dicom::peer::Peer,
    /// Its place under `pacs.max_associations`.
    _slot: super::pool::Slot,
    syntax: crate::dicom::syntax::Syntax,
    next_message_id: u16,
}

impl super::pool::Pooled for Conn {
    fn peer(&mut self) -> &mut crate::dicom::peer::Peer {
        &mut self.peer
    }
}

/// The study (and series) a hierarchical look-up asks inside; `None`: a relational look-up.
type Within<'a> = Option<(&'a str, Option<&'a str>)>;

/// The pool key of look-up associations (they all propose the same context).
const KEY: &str = "lookup";

/// Resolves UIDs to their owners with C-FIND on associations of the gateway's own, kept open
/// for a few seconds between look-ups.
pub struct PacsLookup {
    pacs: Pacs,
    our_max: u32,
    timeout: Duration,
    /// Bounds of the strict reader, which reads every answer.
    reader: crate::dicom::reader::Limits,
    slots: tokio::sync::Semaphore,
    idle: super::pool::Pool<Conn>,
    /// Places under `pacs.max_associations`, shared with every association to the PACS.
    places: std::sync::Arc<super::pool::Slots>,
}

impl PacsLookup {
    pub fn new(
        cfg: &crate::config::Config,
        places: std::sync::Arc<super::pool::Slots>,
    ) -> PacsLookup {
        PacsLookup {
            pacs: cfg.pacs.clone(),
            our_max: cfg.limits.max_pdu_length,
            timeout: cfg.limits.upstream_timeout,
            reader: cfg.limits.reader(),
            slots: tokio::sync::Semaphore::new(MAX_CONCURRENT_LOOKUPS),
            idle: super::pool::Pool::counted(MAX_IDLE, MAX_IDLE_TIME, &places),
            places,
        }
    }

    async fn find_owners(
        &self,
        level: UidLevel,
        uid: &str,
        within: Within<'_>,
    ) -> Result<Vec<Owner>, LookupError> {
        let t0 = std::time::Instant::now();
        let r = match self.find_owner_bounded(level, uid, within).await {
            Ok(Ok(owners)) => Ok(owners),
            Ok(Err(e)) => Err(LookupError::BadAnswer(e)),
            Err(e) => Err(LookupError::Unreachable(e)),
        };
        crate::metrics::pacs_lookup(if r.is_ok() { "ok" } else { "error" });
        crate::metrics::pacs_request("lookup", t0.elapsed());
        r
    }

    async fn find_owner_bounded(
        &self,
        level: UidLevel,
        uid: &str,
        within: Within<'_>,
    ) -> Result<Result<Vec<Owner>, String>, String> {
        let _slot = tokio::time::timeout(self.timeout, self.slots.acquire())
            .await
            .map_err(|_| "no look-up slot free in time".to_string())?
            .map_err(|e| e.to_string())?;
        tokio::time::timeout(self.timeout, self.find_owner_inner(level, uid, within))
            .await
            .map_err(|_| {
                format!(
                    "the PACS did not answer the look-up within {:?}",
                    self.timeout
                )
            })?
    }

    /// One look-up: on an idle pooled association when there is one (a fresh one if that
    /// turns out closed), which then goes back to the pool.
    async fn find_owner_inner(
        &self,
        level: UidLevel,
        uid: &str,
        within: Within<'_>,
    ) -> Result<Result<Vec<Owner>, String>, String> {
        if let Some(mut conn) = self.idle.take(KEY) {
            // A pooled association may have died silently: it gets a shorter wait of its own,
            // so a fresh one still has time.
            let pooled_wait = (self.timeout / 4).max(Duration::from_secs(1));
            match tokio::time::timeout(pooled_wait, self.query(&mut conn, level, uid, within)).await
            {
                Ok(Ok(answer)) => {
                    self.keep(conn, &answer);
                    return Ok(answer);
                }
                Ok(Err(e)) => {
                    tracing::debug!(reason = %e, "pooled look-up association failed; opening a fresh one");
                }
                Err(_) => {
                    tracing::debug!(
                        "pooled look-up association did not answer; opening a fresh one"
                    );
                }
            }
        }
        let mut conn = self.open().await?;
        let answer = self.query(&mut conn, level, uid, within).await?;
        self.keep(conn, &answer);
        Ok(answer)
    }

    /// Pools an association after a look-up that was read to its final response; one given up
    /// on midway (a match the strict reader refused) may still have answers in flight, which
    /// the next look-up would have to read past: it is released instead.
    fn keep(&self, mut conn: Conn, answer: &Result<Vec<Owner>, String>) {
        if answer.is_ok() {
            self.idle.put(KEY.into(), conn);
        } else {
            tokio::spawn(async move {
                let _ = conn.peer.release(Duration::from_secs(2)).await;
            });
        }
    }

    /// Opens a look-up association (Study Root C-FIND only).
    async fn open(&self) -> Result<Conn, String> {
        use crate::dicom::peer::Peer;
        use dicom_ul::pdu::{
            PresentationContextProposed, PresentationContextResultReason, UserVariableItem,
        };

        let rq = AssociationRQ {
            protocol_version: 1,
            calling_ae_title: self.pacs.calling_ae_title.clone(),
            called_ae_title: self.pacs.ae_title.clone(),
            application_context_name: crate::dicom::negotiation::APPLICATION_CONTEXT.into(),
            presentation_contexts: vec![PresentationContextProposed {
                id: 1,
                abstract_syntax: STUDY_ROOT_FIND.into(),
                transfer_syntaxes: vec![EXPLICIT_LE.into(), IMPLICIT_LE.into()],
            }],
            user_variables: vec![
                UserVariableItem::MaxLength(self.our_max),
                UserVariableItem::ImplementationClassUID(
                    crate::dicom::negotiation::IMPLEMENTATION_CLASS_UID.into(),
                ),
                UserVariableItem::ImplementationVersionName(
                    crate::dicom::negotiation::IMPLEMENTATION_VERSION_NAME.into(),
                ),
            ],
        };
        let slot = self.places.lookup().await?;
        let (stream, ac) = associate(&self.pacs, rq, self.timeout)
            .await
            .map_err(|e| e.to_string())?;
        let ts_uid = ac
            .presentation_contexts
            .iter()
            .find(|r| r.id == 1 && r.reason == PresentationContextResultReason::Acceptance)
            .map(|r| r.transfer_syntax.trim_end_matches('\0').to_string())
            .ok_or("the PACS refused Study Root C-FIND")?;
        let syntax = crate::dicom::syntax::readable(&ts_uid)
            .ok_or_else(|| format!("unknown transfer syntax {ts_uid}"))?;
        let peer = Peer::new(
            "pacs-lookup",
            stream,
            self.our_max + 64,
            crate::dicom::negotiation::announced_max(&ac.user_variables),
        )
        .tolerating_command_tail();
        Ok(Conn {
            peer,
            _slot: slot,
            syntax,
            next_message_id: 1,
        })
    }

    /// One C-FIND on a look-up association: who holds `uid` (relational), or, `within` a study
    /// (and series), whether it is there (hierarchical; the matches then name no patient).
    /// The outer error: the association is unusable
    /// (it is dropped); the inner one: the PACS answered, but the UID's owner is not known.
    async fn query(
        &self,
        conn: &mut Conn,
        level: UidLevel,
        uid: &str,
        within: Within<'_>,
    ) -> Result<Result<Vec<Owner>, String>, String> {
        use crate::dicom::command::{self, Command};
        use crate::dicom::dataset::{DataSet, encode_element};
        use crate::dicom::message::Event;
        use crate::dicom::peer::Incoming;
        use dicom_core::VR;
        use dicom_dictionary_std::tags;

        let enc = conn.syntax.encoding;
        let msg_id = conn.next_message_id;
        conn.next_message_id = conn.next_message_id.wrapping_add(1).max(1);
        let peer = &mut conn.peer;
        let (level_name, key) = match level {
            UidLevel::Study => ("STUDY", tags::STUDY_INSTANCE_UID),
            UidLevel::Series => ("SERIES", tags::SERIES_INSTANCE_UID),
            UidLevel::Instance => ("IMAGE", tags::SOP_INSTANCE_UID),
        };
        // Ascending tags; the level's own key carries the UID, the rest are return keys.
        let mut keys: Vec<(dicom_core::Tag, VR, &[u8])> =
            vec![(tags::QUERY_RETRIEVE_LEVEL, VR::CS, level_name.as_bytes())];
        if let Some((study, series)) = within {
            // The hierarchical model: the unique keys above the level, with their values, and
            // nothing else of an upper level.
            keys.push((tags::STUDY_INSTANCE_UID, VR::UI, study.as_bytes()));
            if level == UidLevel::Instance {
                keys.push((
                    tags::SERIES_INSTANCE_UID,
                    VR::UI,
                    series.unwrap_or("").as_bytes(),
                ));
            }
            keys.push((key, VR::UI, b""));
        } else {
            keys.push((tags::PATIENT_ID, VR::LO, b""));
            keys.push((tags::ISSUER_OF_PATIENT_ID, VR::LO, b""));
            keys.push((tags::STUDY_INSTANCE_UID, VR::UI, b""));
            if level == UidLevel::Study {
                // What a study restriction (granular scopes) is judged on.
                keys.push((tags::MODALITIES_IN_STUDY, VR::CS, b""));
                keys.push((tags::STUDY_DATE, VR::DA, b""));
            } else {
                keys.push((tags::SERIES_INSTANCE_UID, VR::UI, b""));
            }
            if level == UidLevel::Instance {
                keys.push((tags::SOP_INSTANCE_UID, VR::UI, b""));
            }
        }
        for k in keys.iter_mut() {
            if k.0 == key {
                k.2 = uid.as_bytes();
            }
        }
        keys.sort_by_key(|k| k.0);
        let ident: Vec<u8> = keys
            .iter()
            .flat_map(|(t, vr, v)| encode_element(enc, *t, *vr, v))
            .collect();
        let cmd = Command::request(command::C_FIND_RQ, msg_id, STUDY_ROOT_FIND, true);
        peer.send_message(1, &cmd.encode(), Some(&ident))
            .await
            .map_err(|e| e.to_string())?;

        let mut owners: Vec<Owner> = Vec::new();
        loop {
            match peer.next().await {
                Incoming::Message(Event::Command {
                    pc_id,
                    command: rsp,
                }) => {
                    // An answer to anything but this C-FIND: the association is not to be trusted.
                    if rsp.field != command::C_FIND_RSP || rsp.responded_to != Some(msg_id) {
                        return Err(
                            "an answer to another request on the look-up association".into()
                        );
                    }
                    let status = rsp.status.unwrap_or(0xC000);
                    if rsp.has_data_set() {
                        let data = peer
                            .collect_data(pc_id, 1 << 20, self.timeout)
                            .await
                            .map_err(|e| e.to_string())?;
                        if command::is_pending(status) {
                            // An answer the strict reader refuses says nothing trustworthy.
                            let o = match DataSet::read(&data, enc, self.reader) {
                                Ok(o) => o,
                                Err(v) => {
                                    return Ok(Err(format!(
                                        "the PACS's look-up answer is not well formed: {v}"
                                    )));
                                }
                            };
                            let text = |t| {
                                o.text(t)
                                    .map(|v| v.trim_matches(' ').to_string())
                                    .filter(|v| !v.is_empty())
                            };
                            let first_uid = |t| o.uids(t).first().map(|u| u.to_string());
                            let owner = Owner {
                                patient_id: o
                                    .text(tags::PATIENT_ID)
                                    .unwrap_or_default()
                                    .to_string(),
                                issuer: text(tags::ISSUER_OF_PATIENT_ID),
                                issuer_known: o.contains(tags::ISSUER_OF_PATIENT_ID),
                                study_uid: first_uid(tags::STUDY_INSTANCE_UID).unwrap_or_default(),
                                series_uid: first_uid(tags::SERIES_INSTANCE_UID),
                                facts: (level == UidLevel::Study).then(|| StudyFacts {
                                    modalities: o
                                        .text(tags::MODALITIES_IN_STUDY)
                                        .map(|v| {
                                            v.split('\\')
                                                .map(|m| m.trim_matches(' ').to_string())
                                                .filter(|m| !m.is_empty())
                                                .collect()
                                        })
                                        .unwrap_or_default(),
                                    study_date: text(tags::STUDY_DATE),
                                }),
                            };
                            // A match for another UID (PACS matching rules differ) says nothing;
                            // nor does one inside another study or series than the one asked.
                            let same = match level {
                                UidLevel::Study => owner.study_uid == uid,
                                UidLevel::Series => owner.series_uid.as_deref() == Some(uid),
                                UidLevel::Instance => {
                                    first_uid(tags::SOP_INSTANCE_UID).as_deref() == Some(uid)
                                }
                            } && within.is_none_or(|(study, series)| {
                                owner.study_uid == study
                                    && (level != UidLevel::Instance
                                        || owner.series_uid.as_deref() == series)
                            });
                            // One more than the cap is kept: the policy core reads that many
                            // as an inconsistency, so nothing past the cap can hide a conflict.
                            if same && owners.len() <= MAX_OWNERS {
                                owners.push(owner);
                            }
                        }
                    }
                    if !command::is_pending(status) {
                        if status != 0 {
                            return Ok(Err(format!(
                                "the PACS answered the look-up with status {status:#06x}"
                            )));
                        }
                        break;
                    }
                }
                Incoming::Message(Event::Data { .. }) => {
                    return Err("data without a command".into());
                }
                other => return Err(format!("look-up association ended: {other:?}")),
            }
        }
        Ok(Ok(owners))
    }
}

impl OwnerLookup for PacsLookup {
    fn owners<'a>(&'a self, level: UidLevel, uid: &'a str) -> LookupFuture<'a> {
        Box::pin(self.find_owners(level, uid, None))
    }

    fn holds<'a>(
        &'a self,
        level: UidLevel,
        uid: &'a str,
        study: &'a str,
        series: Option<&'a str>,
    ) -> HoldsFuture<'a> {
        Box::pin(async move {
            let found = self.find_owners(level, uid, Some((study, series))).await?;
            Ok(!found.is_empty())
        })
    }
}
