//! Moving one instance (a C-STORE data set) from one peer to another without holding it whole:
//! read its head until the attributes a decision needs are known, then, if allowed, pass the
//! head and every further fragment on as they arrive.
//!
//! Owns: the head size cap and the streaming loop. Memory per instance is the head (at most
//! [`MAX_HEAD`]) plus one PDU. Must not decide: callers ask the policy core with what the head
//! says.

use super::message::Event;
use super::peer::{Incoming, MAX_BATCH, Peer};
use crate::dataset::scan_prefix;
use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_encoding::transfer_syntax::TransferSyntax;
use std::time::Duration;

/// The most of an instance held before its PatientID and UIDs are known. They sit at the
/// start (groups 0008 to 0020), so only instances with huge early elements come near it.
pub const MAX_HEAD: usize = 1024 * 1024;

/// The attributes an instance is judged by.
pub const WANTED: [Tag; 6] = [
    tags::STUDY_DATE,
    tags::MODALITY,
    tags::PATIENT_ID,
    tags::ISSUER_OF_PATIENT_ID,
    tags::STUDY_INSTANCE_UID,
    tags::SERIES_INSTANCE_UID,
];

/// The start of an instance's data set and what it says.
pub struct Head {
    pub bytes: Vec<u8>,
    /// The data set ended within the head.
    pub last: bool,
    pub patient_id: Option<String>,
    /// IssuerOfPatientID.
    pub issuer: Option<String>,
    pub study_uid: Option<String>,
    pub series_uid: Option<String>,
    pub study_date: Option<String>,
    pub modality: Option<String>,
}

pub enum HeadError {
    /// The data set could not be read far enough (malformed, or [`MAX_HEAD`] reached). `last`
    /// tells whether the rest still has to be drained.
    Unreadable { last: bool },
    /// The sending peer failed, aborted or broke the protocol.
    Peer(String),
}

/// Where streaming failed.
pub enum StreamError {
    From(String),
    To(String),
}

fn uid(v: Option<String>) -> Option<String> {
    v.map(|s| s.trim_end_matches(['\0', ' ']).to_string())
}

/// Reads fragments of the current data set from `from` until the [`WANTED`] attributes are known.
pub async fn read_head(
    from: &mut Peer,
    pc_id: u8,
    ts: &TransferSyntax,
    wait: Duration,
) -> Result<Head, HeadError> {
    let mut bytes = Vec::new();
    loop {
        let (chunk, last) = next_fragment(from, pc_id, wait)
            .await
            .map_err(HeadError::Peer)?;
        bytes.extend_from_slice(&chunk);
        match scan_prefix(&bytes, ts, &WANTED, last) {
            Ok(p) if p.complete => {
                let mut v = p.values.into_iter();
                let study_date = v.next().flatten();
                let modality = v.next().flatten();
                return Ok(Head {
                    bytes,
                    last,
                    study_date,
                    modality,
                    patient_id: v.next().flatten(),
                    issuer: v.next().flatten(),
                    study_uid: uid(v.next().flatten()),
                    series_uid: uid(v.next().flatten()),
                });
            }
            Ok(_) if !last && bytes.len() < MAX_HEAD => continue,
            _ => return Err(HeadError::Unreadable { last }),
        }
    }
}

/// The next data fragment of the current message from `from`.
pub async fn next_fragment(
    from: &mut Peer,
    pc_id: u8,
    wait: Duration,
) -> Result<(bytes::Bytes, bool), String> {
    match tokio::time::timeout(wait, from.next()).await {
        Err(_) => Err(format!(
            "{} sent nothing for {wait:?} inside a data set",
            from.name
        )),
        Ok(Incoming::Message(Event::Data {
            pc_id: pc,
            bytes,
            last,
        })) if pc == pc_id => Ok((bytes, last)),
        Ok(Incoming::Message(_)) => Err(format!("{} broke a data set off", from.name)),
        Ok(Incoming::Abort) => Err(format!("{} aborted", from.name)),
        Ok(Incoming::Gone(w)) => Err(format!("{}: {w}", from.name)),
        Ok(_) => Err(format!("{} released inside a data set", from.name)),
    }
}

/// Sends `command`, the head and then the rest of the data set from `from` to `to`, fragment by
/// fragment as it arrives.
pub async fn stream(
    from: &mut Peer,
    to: &mut Peer,
    pc_id: u8,
    command: &[u8],
    head: Head,
    wait: Duration,
) -> Result<(), StreamError> {
    to.send_command(pc_id, command)
        .await
        .map_err(|e| StreamError::To(e.to_string()))?;
    to.queue_data(pc_id, &head.bytes, head.last);
    drop(head.bytes);
    let mut last = head.last;
    loop {
        // Write when nothing more is at hand (or enough is queued): bursts go out in few writes.
        if last || !from.has_input_at_hand() || to.queued_bytes() >= MAX_BATCH {
            to.flush()
                .await
                .map_err(|e| StreamError::To(e.to_string()))?;
        }
        if last {
            return Ok(());
        }
        let (chunk, l) = next_fragment(from, pc_id, wait)
            .await
            .map_err(StreamError::From)?;
        last = l;
        to.queue_data(pc_id, &chunk, last);
    }
}

/// Reads and drops the rest of a data set (of an instance that was refused).
pub async fn drain(from: &mut Peer, pc_id: u8, wait: Duration) -> Result<(), String> {
    loop {
        let (_, last) = next_fragment(from, pc_id, wait).await?;
        if last {
            return Ok(());
        }
    }
}
