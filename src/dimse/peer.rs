//! One side of a relayed association: PDU framing on a TCP stream, with every buffer bounded.
//!
//! Owns: reading PDUs (length checked before a byte of the body is buffered), writing PDUs, a
//! reader task that turns the socket into a bounded channel (so waiting on both peers at once is
//! cancel-safe), and turning P-DATA into message events through the [`Assembler`]. Must not know
//! what messages mean.

use super::message::{Assembler, DEFAULT_MAX_COMMAND, Event, FramingError, fragment};
use dicom_ul::pdu::{AbortRQServiceProviderReason, AbortRQSource, PDataValueType, Pdu};
use std::collections::VecDeque;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// PDUs read ahead of the session per peer; with the PDU size cap this bounds memory.
const READ_AHEAD: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum PduError {
    #[error("connection closed")]
    Closed,
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("PDU of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: u32, max: u32 },
    #[error("malformed PDU: {0}")]
    Malformed(String),
}

/// Reads one PDU, refusing any whose announced length exceeds `max_len`.
pub async fn read_pdu<R: AsyncRead + Unpin>(rd: &mut R, max_len: u32) -> Result<Pdu, PduError> {
    let mut header = [0u8; 6];
    match rd.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(PduError::Closed),
        Err(e) => return Err(PduError::Io(e)),
    }
    let len = u32::from_be_bytes([header[2], header[3], header[4], header[5]]);
    if len > max_len {
        return Err(PduError::TooLarge { len, max: max_len });
    }
    let mut buf = vec![0u8; 6 + len as usize];
    buf[..6].copy_from_slice(&header);
    rd.read_exact(&mut buf[6..]).await?;
    match dicom_ul::read_pdu(&buf[..], dicom_ul::pdu::MAXIMUM_PDU_SIZE, false) {
        Ok(Some(pdu)) => Ok(pdu),
        Ok(None) => Err(PduError::Malformed("truncated".into())),
        Err(e) => Err(PduError::Malformed(e.to_string())),
    }
}

/// Encodes PDUs into one buffer, so a message goes out in one write.
pub fn encode(pdus: &[Pdu]) -> Result<Vec<u8>, PduError> {
    let mut out = Vec::new();
    for p in pdus {
        dicom_ul::write_pdu(&mut out, p).map_err(|e| PduError::Malformed(e.to_string()))?;
    }
    Ok(out)
}

pub async fn write_pdu(w: &mut (impl AsyncWriteExt + Unpin), pdu: &Pdu) -> Result<(), PduError> {
    let bytes = encode(std::slice::from_ref(pdu))?;
    w.write_all(&bytes).await?;
    Ok(())
}

/// What the session sees arriving from a peer.
#[derive(Debug)]
pub enum Incoming {
    Message(Event),
    ReleaseRq,
    ReleaseRp,
    Abort,
    /// The peer closed the connection or broke the protocol; the association is over.
    Gone(String),
}

/// One established peer of a relayed association.
pub struct Peer {
    pub name: &'static str,
    rx: mpsc::Receiver<Result<Pdu, PduError>>,
    writer: OwnedWriteHalf,
    reader: JoinHandle<()>,
    assembler: Assembler,
    queue: VecDeque<Incoming>,
    /// The peer's Maximum Length: fragments sent to it are at most this long.
    pub peer_max: u32,
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Peer {
    /// Takes over an established connection; `read_max` is the largest PDU accepted from it.
    pub fn new(name: &'static str, stream: TcpStream, read_max: u32, peer_max: u32) -> Peer {
        let (rd, writer) = stream.into_split();
        let (tx, rx) = mpsc::channel(READ_AHEAD);
        let reader = tokio::spawn(reader_task(rd, read_max, tx));
        Peer {
            name,
            rx,
            writer,
            reader,
            assembler: Assembler::new(DEFAULT_MAX_COMMAND),
            queue: VecDeque::new(),
            peer_max,
        }
    }

    /// The next thing from this peer. Cancel-safe: nothing is lost if the future is dropped.
    pub async fn next(&mut self) -> Incoming {
        loop {
            if let Some(i) = self.queue.pop_front() {
                return i;
            }
            let pdu = match self.rx.recv().await {
                None => return Incoming::Gone("connection closed".into()),
                Some(Err(e)) => return Incoming::Gone(e.to_string()),
                Some(Ok(p)) => p,
            };
            match pdu {
                Pdu::PData { data } => {
                    for pdv in data {
                        match self.assembler.push(pdv) {
                            Ok(Some(ev)) => self.queue.push_back(Incoming::Message(ev)),
                            Ok(None) => {}
                            Err(e) => {
                                self.queue.push_back(Incoming::Gone(framing(e)));
                                break;
                            }
                        }
                    }
                }
                Pdu::ReleaseRQ => return Incoming::ReleaseRq,
                Pdu::ReleaseRP => return Incoming::ReleaseRp,
                Pdu::AbortRQ { .. } => return Incoming::Abort,
                other => {
                    return Incoming::Gone(format!("unexpected {}", other.short_description()));
                }
            }
        }
    }

    /// Must follow every `Event::Command` taken from [`Peer::next`].
    pub fn expect_data(&mut self, pc_id: u8, has_data: bool) {
        self.assembler.expect_data(pc_id, has_data);
    }

    /// Sends a command and optional data set, fragmented to the peer's maximum, in one write.
    pub async fn send_message(
        &mut self,
        pc_id: u8,
        command: &[u8],
        data: Option<&[u8]>,
    ) -> Result<(), PduError> {
        let mut pdus = fragment(pc_id, PDataValueType::Command, command, self.peer_max);
        if let Some(d) = data {
            pdus.extend(fragment(pc_id, PDataValueType::Data, d, self.peer_max));
        }
        let bytes = encode(&pdus)?;
        self.writer.write_all(&bytes).await?;
        Ok(())
    }

    /// Reads the whole data set of the current message (at most `max` bytes, each fragment
    /// within `wait`). Used for identifiers, which are small; instances are streamed instead.
    pub async fn collect_data(
        &mut self,
        pc_id: u8,
        max: usize,
        wait: std::time::Duration,
    ) -> Result<Vec<u8>, String> {
        self.collect_data_with(pc_id, max, wait, true).await
    }

    async fn collect_data_with(
        &mut self,
        pc_id: u8,
        max: usize,
        wait: std::time::Duration,
        keep: bool,
    ) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        loop {
            let next = tokio::time::timeout(wait, self.next())
                .await
                .map_err(|_| format!("{} sent no data for {wait:?}", self.name))?;
            match next {
                Incoming::Message(Event::Data {
                    pc_id: pc,
                    bytes,
                    last,
                }) if pc == pc_id => {
                    if keep {
                        if out.len() + bytes.len() > max {
                            return Err(format!(
                                "{} sent a data set larger than {max} bytes",
                                self.name
                            ));
                        }
                        out.extend_from_slice(&bytes);
                    }
                    if last {
                        return Ok(out);
                    }
                }
                Incoming::Message(Event::Command { .. }) => {
                    return Err(format!("{} sent a command inside a data set", self.name));
                }
                Incoming::Message(Event::Data { pc_id: pc, .. }) => {
                    return Err(format!(
                        "{} sent data on context {pc} inside a data set on {pc_id}",
                        self.name
                    ));
                }
                Incoming::ReleaseRq | Incoming::ReleaseRp => {
                    return Err(format!(
                        "{} released in the middle of a data set",
                        self.name
                    ));
                }
                Incoming::Abort => return Err(format!("{} aborted", self.name)),
                Incoming::Gone(why) => return Err(format!("{}: {why}", self.name)),
            }
        }
    }

    /// Reads and drops the data set of the current message without holding it.
    pub async fn discard_data(
        &mut self,
        pc_id: u8,
        wait: std::time::Duration,
    ) -> Result<(), String> {
        self.collect_data_with(pc_id, usize::MAX, wait, false)
            .await
            .map(|_| ())
    }

    pub async fn send_pdu(&mut self, pdu: &Pdu) -> Result<(), PduError> {
        write_pdu(&mut self.writer, pdu).await
    }

    /// Sends an A-ABORT (service provider) and closes; errors are moot at this point.
    pub async fn abort(&mut self) {
        let pdu = Pdu::AbortRQ {
            source: AbortRQSource::ServiceProvider(
                AbortRQServiceProviderReason::ReasonNotSpecified,
            ),
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            let _ = write_pdu(&mut self.writer, &pdu).await;
            let _ = self.writer.shutdown().await;
        })
        .await;
    }

    pub async fn close(&mut self) {
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(2), self.writer.shutdown()).await;
    }
}

fn framing(e: FramingError) -> String {
    format!("DIMSE framing violation: {e}")
}

async fn reader_task(mut rd: OwnedReadHalf, max: u32, tx: mpsc::Sender<Result<Pdu, PduError>>) {
    loop {
        let r = read_pdu(&mut rd, max).await;
        let end = match &r {
            Err(_) => true,
            Ok(Pdu::AbortRQ { .. }) => true,
            Ok(_) => false,
        };
        if tx.send(r).await.is_err() || end {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn oversized_pdu_is_refused_before_buffering() {
        // A header announcing 4 GiB must fail at once, not allocate.
        let bytes = [0x04u8, 0, 0xff, 0xff, 0xff, 0xff];
        let mut rd = &bytes[..];
        assert!(matches!(
            read_pdu(&mut rd, 65536).await,
            Err(PduError::TooLarge { .. })
        ));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn pdus_roundtrip_and_truncation_is_detected() {
        let p = Pdu::ReleaseRQ;
        let bytes = encode(&[p.clone(), Pdu::ReleaseRP]).unwrap();
        let mut rd = &bytes[..];
        assert_eq!(read_pdu(&mut rd, 65536).await.unwrap(), p);
        assert_eq!(read_pdu(&mut rd, 65536).await.unwrap(), Pdu::ReleaseRP);
        assert!(matches!(
            read_pdu(&mut rd, 65536).await,
            Err(PduError::Closed)
        ));
        let mut short = &bytes[..8];
        assert!(read_pdu(&mut short, 65536).await.is_err());
        // garbage body
        let junk = [0x01u8, 0, 0, 0, 0, 3, 1, 2, 3];
        let mut rd = &junk[..];
        assert!(matches!(
            read_pdu(&mut rd, 65536).await,
            Err(PduError::Malformed(_))
        ));
    }
}
