//! Moving one instance (a C-STORE data set) from one peer to another without holding it whole:
//! read its head through the strict reader until the attributes a decision needs are known,
//! then, if allowed, pass the head and every further fragment on as they arrive, each fragment
//! read by the same strict reader before it goes on. A defect found in the tail (a repeated or
//! out-of-order tag, a length running past the end) stops the stream before the last fragment
//! is sent, so the receiving peer never holds a complete instance the gateway did not accept.
//!
//! Owns: the head size cap and the streaming loop. Memory per instance is the head (at most
//! [`MAX_HEAD`]) plus one PDU. Must not decide: callers ask the policy core with what the head
//! says.

use crate::dicom::head::{InstanceHead, InstanceReader, MAX_HEAD};
use crate::dicom::peer::{Broken, MAX_BATCH, Peer};
use crate::dicom::reader::{Limits, Violation};
use crate::dicom::syntax::Syntax;
use std::time::Duration;

/// The start of an instance's data set, what it says, and the reader that goes on reading it.
pub struct Head {
    pub bytes: Vec<u8>,
    /// The data set ended within the head (and was read to its end).
    pub last: bool,
    pub head: InstanceHead,
    reader: InstanceReader,
}

pub(crate) enum HeadError {
    /// The data set could not be read far enough, or the strict reader refused it (the
    /// violation says why; [`MAX_HEAD`] reached counts too). `last` tells whether the rest
    /// still has to be drained.
    Unreadable { last: bool, why: Violation },
    /// The sending peer failed, aborted or broke the protocol.
    Peer(Broken),
}

/// Where streaming failed.
pub enum StreamError {
    From(Broken),
    To(String),
    /// The strict reader refused the rest of the instance; the last fragment was not sent.
    /// `ended`: the refused fragment was the data set's last (nothing more to drain).
    Invalid {
        why: Violation,
        ended: bool,
    },
}

/// Reads fragments of the current data set from `from` until the instance's head is known.
pub(crate) async fn read_head(
    from: &mut Peer,
    pc_id: u8,
    syntax: Syntax,
    limits: Limits,
    wait: Duration,
) -> Result<Head, HeadError> {
    let mut reader = InstanceReader::dataset(syntax, limits);
    let mut bytes = Vec::new();
    loop {
        let (chunk, last) = from
            .next_fragment(pc_id, wait)
            .await
            .map_err(HeadError::Peer)?;
        let checked = reader
            .feed(&chunk)
            .and_then(|()| if last { reader.finish() } else { Ok(()) })
            .and_then(|()| reader.head());
        match checked {
            Err(why) => return Err(HeadError::Unreadable { last, why }),
            Ok(Some(head)) => {
                bytes.extend_from_slice(&chunk);
                return Ok(Head {
                    bytes,
                    last,
                    head,
                    reader,
                });
            }
            Ok(None) => {
                bytes.extend_from_slice(&chunk);
                if bytes.len() >= MAX_HEAD {
                    return Err(HeadError::Unreadable {
                        last,
                        why: Violation::TooLarge("the instance's head"),
                    });
                }
            }
        }
    }
}

/// Sends `command`, the head and then the rest of the data set from `from` to `to`, fragment by
/// fragment as it arrives, each read by the strict reader first; the data set's length once
/// all of it went out.
pub async fn stream(
    from: &mut Peer,
    to: &mut Peer,
    pc_id: u8,
    command: &[u8],
    head: Head,
    wait: Duration,
) -> Result<u64, StreamError> {
    let Head {
        bytes,
        last,
        mut reader,
        ..
    } = head;
    to.send_command(pc_id, command)
        .await
        .map_err(|e| StreamError::To(e.to_string()))?;
    // Fragments go on with even lengths: DCMTK-based peers refuse odd ones, which a client
    // may send. An odd fragment's last byte waits for the next one.
    let mut carry: Option<u8> = None;
    to.queue_even(pc_id, &bytes, last, &mut carry);
    let mut sent = bytes.len() as u64;
    drop(bytes);
    let mut last = last;
    loop {
        // Write when nothing more is at hand (or enough is queued): bursts go out in few writes.
        if last || !from.has_input_at_hand() || to.queued_bytes() >= MAX_BATCH {
            to.flush()
                .await
                .map_err(|e| StreamError::To(e.to_string()))?;
        }
        if last {
            return Ok(sent);
        }
        let (chunk, l) = from
            .next_fragment(pc_id, wait)
            .await
            .map_err(StreamError::From)?;
        reader
            .feed(&chunk)
            .and_then(|()| if l { reader.finish() } else { Ok(()) })
            .map_err(|why| StreamError::Invalid { why, ended: l })?;
        last = l;
        sent += chunk.len() as u64;
        to.queue_even(pc_id, &chunk, last, &mut carry);
    }
}
