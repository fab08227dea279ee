//! One side of a relayed association: PDU framing on a TCP stream, with every buffer bounded.
//!
//! Owns: reading PDUs (length checked before the body is buffered; reads are cancel-safe, so a
//! session can wait on both peers at once), writing PDUs, and turning P-DATA into message events
//! through the [`Assembler`]. Must not know what messages mean.

use super::message::{
    Assembler, DEFAULT_MAX_COMMAND, Event, FramingError, Pdv, encode_fragments, parse_pdata,
};
use super::pdu::{PduError, write_pdu};
use bytes::BytesMut;
use dicom_ul::pdu::{AbortRQServiceProviderReason, AbortRQSource, PDataValueType, Pdu};
use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// The read buffer's starting size; it grows to one PDU at most.
const INITIAL_BUFFER: usize = 16 * 1024;

/// One PDU as read: P-DATA already split into its values.
enum Frame {
    PData(Vec<Pdv>),
    Other(Pdu),
}

/// What the session sees arriving from a peer.
#[derive(Debug)]
pub enum Incoming {
    Message(Event),
    ReleaseRq,
    ReleaseRp,
    Abort,
    /// The peer closed the connection or broke the protocol; the association is over.
    Gone(Gone),
}

/// Why a peer's leg is over. A peer that broke the protocol is told which rule by the reason
/// of the A-ABORT it is sent ([`Gone::abort_reason`], PS3.8 9.3.8).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Gone {
    /// The connection closed or failed: nobody is left to tell.
    #[error("{0}")]
    Connection(String),
    /// A PDU larger than the negotiated limit, or one that does not parse.
    #[error("{0}")]
    BadPdu(String),
    /// A PDU the established association does not admit (an A-ASSOCIATE-RQ, say).
    #[error("unexpected {0}")]
    UnexpectedPdu(String),
    /// A P-DATA framing or command set rule broken.
    #[error("DIMSE framing violation: {0}")]
    Framing(FramingError),
}

impl Gone {
    pub(crate) fn abort_reason(&self) -> AbortRQServiceProviderReason {
        use AbortRQServiceProviderReason as R;
        match self {
            Gone::Connection(_) => R::ReasonNotSpecified,
            Gone::BadPdu(_) => R::InvalidPduParameter,
            Gone::UnexpectedPdu(_) => R::UnexpectedPdu,
            Gone::Framing(FramingError::Command(_)) => R::InvalidPduParameter,
            Gone::Framing(_) => R::UnexpectedPduParameter,
        }
    }
}

/// Why the data set of the current message did not arrive whole. The wire reason each case
/// earns is [`Broken::abort_reason`]: a peer that broke a rule is told which one; a peer that
/// went quiet or aborted is not told anything new.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Broken {
    #[error("{peer} sent nothing for {wait:?} inside a data set")]
    Silent {
        peer: &'static str,
        wait: std::time::Duration,
    },
    #[error("{peer} sent a data set larger than {max} bytes")]
    TooLarge { peer: &'static str, max: usize },
    /// A command (or data on another presentation context) before the last fragment.
    #[error("{peer} broke a data set off")]
    BrokenOff { peer: &'static str },
    #[error("{peer} released inside a data set")]
    Released { peer: &'static str },
    #[error("{peer} aborted")]
    Aborted { peer: &'static str },
    #[error("{peer}: {gone}")]
    Gone { peer: &'static str, gone: Gone },
}

impl Broken {
    /// The A-ABORT reason the peer that broke the data set is sent (PS3.8 9.3.8).
    pub(crate) fn abort_reason(&self) -> AbortRQServiceProviderReason {
        use AbortRQServiceProviderReason as R;
        match self {
            Broken::Silent { .. } | Broken::Aborted { .. } => R::ReasonNotSpecified,
            Broken::TooLarge { .. } => R::InvalidPduParameter,
            Broken::BrokenOff { .. } => R::UnexpectedPduParameter,
            Broken::Released { .. } => R::UnexpectedPdu,
            Broken::Gone { gone, .. } => gone.abort_reason(),
        }
    }
}

impl From<PduError> for Gone {
    fn from(e: PduError) -> Gone {
        match e {
            PduError::Closed | PduError::Io(_) => Gone::Connection(e.to_string()),
            PduError::TooLarge { .. } | PduError::Malformed(_) => Gone::BadPdu(e.to_string()),
        }
    }
}

/// The connection under a peer: TCP, or TLS over TCP (DICOM TLS, PS3.15 Annex B).
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Stream {
        Stream::Plain(s)
    }
}

impl Stream {
    /// The subject of the certificate the other end presented and the handshake verified.
    pub fn peer_subject(&self) -> Option<String> {
        match self {
            Stream::Plain(_) => None,
            Stream::Tls(s) => crate::tls::subject_of(s.get_ref().1.peer_certificates()),
        }
    }
}

impl Stream {
    /// Whether the certificate the other end presented names `name` (see
    /// [`crate::tls::certifies_name`]); false in plaintext.
    pub fn peer_certifies(&self, name: &str) -> bool {
        match self {
            Stream::Plain(_) => false,
            Stream::Tls(s) => crate::tls::certifies_name(s.get_ref().1.peer_certificates(), name),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

/// One established peer of a relayed association.
pub struct Peer {
    pub name: &'static str,
    reader: ReadHalf,
    /// Bytes read but not yet framed; never more than one PDU (`read_max` + header) plus one read.
    buf: BytesMut,
    read_max: u32,
    /// Set once the connection failed; every later read reports it again.
    failed: Option<Gone>,
    writer: WriteHalf,
    /// Encoded PDUs not yet written: messages are batched while more input is already at hand,
    /// so a burst of responses costs one write (and one wake-up of the peer), not one each.
    out: Vec<u8>,
    assembler: Assembler,
    queue: VecDeque<Incoming>,
    /// The peer's Maximum Length: fragments sent to it are at most this long.
    pub peer_max: u32,
}

/// Queued output is written once it reaches this size, batching or not.
pub(crate) const MAX_BATCH: usize = 64 * 1024;

impl Peer {
    /// Takes over an established connection; `read_max` is the largest PDU accepted from it.
    pub fn new(
        name: &'static str,
        stream: impl Into<Stream>,
        read_max: u32,
        peer_max: u32,
    ) -> Peer {
        // TCP splits without a lock between the halves; TLS shares one session state.
        let (reader, writer): (ReadHalf, WriteHalf) = match stream.into() {
            Stream::Plain(t) => {
                let (r, w) = t.into_split();
                (Box::new(r), Box::new(w))
            }
            Stream::Tls(t) => {
                let (r, w) = tokio::io::split(*t);
                (Box::new(r), Box::new(w))
            }
        };
        Peer {
            name,
            reader,
            buf: BytesMut::with_capacity(INITIAL_BUFFER),
            read_max,
            failed: None,
            writer,
            out: Vec::new(),
            assembler: Assembler::new(DEFAULT_MAX_COMMAND),
            queue: VecDeque::new(),
            peer_max,
        }
    }

    /// This peer is a PACS: its command sets may carry a tail of other groups, which is read
    /// strictly and dropped (DCMTK-based PACS put C-GET failure lists there).
    pub(crate) fn tolerating_command_tail(mut self) -> Peer {
        self.assembler.tolerate_command_tail();
        self
    }

    /// Reads one PDU. Cancel-safe: partial data stays in `buf` (reads happen on the session's
    /// own task, without a hop through another task per PDU). P-DATA is parsed here without
    /// copying its data; other PDUs by dicom-ul.
    async fn read_frame(&mut self) -> Result<Frame, PduError> {
        loop {
            if self.buf.len() >= 6 {
                let len = u32::from_be_bytes([self.buf[2], self.buf[3], self.buf[4], self.buf[5]]);
                if len > self.read_max {
                    return Err(PduError::TooLarge {
                        len,
                        max: self.read_max,
                    });
                }
                let total = 6 + len as usize;
                if self.buf.len() >= total {
                    let frame = self.buf.split_to(total).freeze();
                    if frame[0] == 0x04 {
                        return parse_pdata(frame)
                            .map(Frame::PData)
                            .map_err(PduError::Malformed);
                    }
                    return match dicom_ul::read_pdu(
                        &frame[..],
                        dicom_ul::pdu::MAXIMUM_PDU_SIZE,
                        false,
                    ) {
                        Ok(Some(pdu)) => Ok(Frame::Other(pdu)),
                        Ok(None) => Err(PduError::Malformed("truncated".into())),
                        Err(e) => Err(PduError::Malformed(e.to_string())),
                    };
                }
                self.buf.reserve(total - self.buf.len());
            }
            // Frames handed out share the buffer's memory; keep room for a full read so each
            // system call brings in as much as is waiting.
            if self.buf.capacity() - self.buf.len() < INITIAL_BUFFER / 2 {
                self.buf.reserve(INITIAL_BUFFER);
            }
            if self.reader.read_buf(&mut self.buf).await? == 0 {
                return Err(PduError::Closed);
            }
        }
    }

    /// The next thing from this peer. Cancel-safe: nothing is lost if the future is dropped.
    pub async fn next(&mut self) -> Incoming {
        loop {
            if let Some(i) = self.queue.pop_front() {
                return i;
            }
            if let Some(why) = &self.failed {
                return Incoming::Gone(why.clone());
            }
            let frame = match self.read_frame().await {
                Ok(p) => p,
                Err(e) => {
                    let why = Gone::from(e);
                    self.failed = Some(why.clone());
                    return Incoming::Gone(why);
                }
            };
            match frame {
                Frame::PData(pdvs) => {
                    for pdv in pdvs {
                        match self.assembler.push(pdv) {
                            Ok(Some(ev)) => self.queue.push_back(Incoming::Message(ev)),
                            Ok(None) => {}
                            Err(e) => {
                                let why = Gone::Framing(e);
                                self.failed = Some(why.clone());
                                self.queue.push_back(Incoming::Gone(why));
                                break;
                            }
                        }
                    }
                }
                Frame::Other(Pdu::ReleaseRQ) => return Incoming::ReleaseRq,
                Frame::Other(Pdu::ReleaseRP) => return Incoming::ReleaseRp,
                Frame::Other(Pdu::AbortRQ { .. }) => return Incoming::Abort,
                Frame::Other(other) => {
                    return Incoming::Gone(Gone::UnexpectedPdu(
                        other.short_description().to_string(),
                    ));
                }
            }
        }
    }

    /// Sends a command and optional data set, fragmented to the peer's maximum, in one write
    /// (together with anything queued before).
    pub async fn send_message(
        &mut self,
        pc_id: u8,
        command: &[u8],
        data: Option<&[u8]>,
    ) -> Result<(), PduError> {
        self.queue_message(pc_id, command, data)?;
        self.flush().await
    }

    /// Encodes a message into the output queue without writing it; [`Peer::flush`] writes.
    pub(crate) fn queue_message(
        &mut self,
        pc_id: u8,
        command: &[u8],
        data: Option<&[u8]>,
    ) -> Result<(), PduError> {
        encode_fragments(
            &mut self.out,
            pc_id,
            PDataValueType::Command,
            command,
            self.peer_max,
            true,
        );
        if let Some(d) = data {
            encode_fragments(
                &mut self.out,
                pc_id,
                PDataValueType::Data,
                d,
                self.peer_max,
                true,
            );
        }
        Ok(())
    }

    /// Sends a command that announces a data set; the data follows with [`Peer::send_data`].
    pub async fn send_command(&mut self, pc_id: u8, command: &[u8]) -> Result<(), PduError> {
        encode_fragments(
            &mut self.out,
            pc_id,
            PDataValueType::Command,
            command,
            self.peer_max,
            true,
        );
        self.flush().await
    }

    /// Queues a piece of a data set, fragmented to the peer's maximum; `last` marks the end of
    /// the data set. The caller flushes (see [`Peer::flush`]); nothing but this piece is held.
    pub(crate) fn queue_data(&mut self, pc_id: u8, bytes: &[u8], last: bool) {
        encode_fragments(
            &mut self.out,
            pc_id,
            PDataValueType::Data,
            bytes,
            self.peer_max,
            last,
        );
    }

    /// Queues a fragment with an even length, holding back an odd last byte in `carry` until
    /// the next one (the final fragment goes whole: a data set has an even length). DCMTK-based
    /// peers refuse odd fragments, which a sender may produce.
    pub(crate) fn queue_even(
        &mut self,
        pc_id: u8,
        bytes: &[u8],
        last: bool,
        carry: &mut Option<u8>,
    ) {
        let joined;
        let bytes = match carry.take() {
            Some(b) => {
                let mut v = Vec::with_capacity(bytes.len() + 1);
                v.push(b);
                v.extend_from_slice(bytes);
                joined = v;
                &joined[..]
            }
            None => bytes,
        };
        if !last && bytes.len() % 2 == 1 {
            let (even, odd) = bytes.split_at(bytes.len() - 1);
            *carry = odd.first().copied();
            if !even.is_empty() {
                self.queue_data(pc_id, even, false);
            }
            return;
        }
        self.queue_data(pc_id, bytes, last);
    }

    /// Sends a piece of a data set at once.
    pub async fn send_data(&mut self, pc_id: u8, bytes: &[u8], last: bool) -> Result<(), PduError> {
        self.queue_data(pc_id, bytes, last);
        self.flush().await
    }

    pub(crate) fn queued_bytes(&self) -> usize {
        self.out.len()
    }

    /// Writes the output queue.
    pub async fn flush(&mut self) -> Result<(), PduError> {
        if !self.out.is_empty() {
            // Over TLS, write_all can return with records still in the session's buffer (the
            // socket was full): only flush sends them. Without it a response can wait there
            // while the peer waits for it.
            let r = async {
                self.writer.write_all(&self.out).await?;
                self.writer.flush().await
            }
            .await;
            self.out.clear();
            r?;
        }
        Ok(())
    }

    /// Whether the next [`Peer::next`] can answer from what was already read: an event is
    /// waiting or a whole PDU is buffered.
    pub(crate) fn has_input_at_hand(&self) -> bool {
        if !self.queue.is_empty() {
            return true;
        }
        if self.buf.len() < 6 {
            return false;
        }
        let len = u32::from_be_bytes([self.buf[2], self.buf[3], self.buf[4], self.buf[5]]) as usize;
        self.buf.len() >= 6 + len
    }

    /// The next data fragment of the current message on `pc_id`, and whether it is the last.
    pub async fn next_fragment(
        &mut self,
        pc_id: u8,
        wait: std::time::Duration,
    ) -> Result<(bytes::Bytes, bool), Broken> {
        let peer = self.name;
        match tokio::time::timeout(wait, self.next()).await {
            Err(_) => Err(Broken::Silent { peer, wait }),
            Ok(Incoming::Message(Event::Data {
                pc_id: pc,
                bytes,
                last,
            })) if pc == pc_id => Ok((bytes, last)),
            Ok(Incoming::Message(_)) => Err(Broken::BrokenOff { peer }),
            Ok(Incoming::ReleaseRq | Incoming::ReleaseRp) => Err(Broken::Released { peer }),
            Ok(Incoming::Abort) => Err(Broken::Aborted { peer }),
            Ok(Incoming::Gone(gone)) => Err(Broken::Gone { peer, gone }),
        }
    }

    /// Reads the whole data set of the current message (at most `max` bytes, each fragment
    /// within `wait`). Used for identifiers, which are small; instances are streamed instead.
    pub async fn collect_data(
        &mut self,
        pc_id: u8,
        max: usize,
        wait: std::time::Duration,
    ) -> Result<Vec<u8>, Broken> {
        let mut out = Vec::new();
        loop {
            let (bytes, last) = self.next_fragment(pc_id, wait).await?;
            if out.len() + bytes.len() > max {
                return Err(Broken::TooLarge {
                    peer: self.name,
                    max,
                });
            }
            out.extend_from_slice(&bytes);
            if last {
                return Ok(out);
            }
        }
    }

    /// Reads and drops the data set of the current message without holding it.
    pub async fn discard_data(
        &mut self,
        pc_id: u8,
        wait: std::time::Duration,
    ) -> Result<(), Broken> {
        loop {
            if self.next_fragment(pc_id, wait).await?.1 {
                return Ok(());
            }
        }
    }

    pub async fn send_pdu(&mut self, pdu: &Pdu) -> Result<(), PduError> {
        self.flush().await?;
        write_pdu(&mut self.writer, pdu).await
    }

    /// Sends an A-ABORT (service provider) and closes; errors are moot at this point.
    pub(crate) async fn abort(&mut self) {
        self.abort_with(AbortRQServiceProviderReason::ReasonNotSpecified)
            .await
    }

    /// Sends an A-ABORT (source: service provider) with `reason` and closes the connection.
    pub(crate) async fn abort_with(&mut self, reason: AbortRQServiceProviderReason) {
        let pdu = Pdu::AbortRQ {
            source: AbortRQSource::ServiceProvider(reason),
        };
        self.out.clear();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            let _ = write_pdu(&mut self.writer, &pdu).await;
            let _ = self.writer.shutdown().await;
        })
        .await;
    }

    /// Ends the association with an A-RELEASE: waits up to `within` for the peer's A-RELEASE-RP
    /// (skipping late responses of operations given up; a release request crossing ours counts
    /// as done), then closes the connection. A peer that aborts, goes away or does not answer
    /// in time gets an A-ABORT instead, and the reason is returned.
    pub(crate) async fn release(&mut self, within: std::time::Duration) -> Result<(), String> {
        let answer = async {
            self.send_pdu(&Pdu::ReleaseRQ)
                .await
                .map_err(|e| e.to_string())?;
            loop {
                match self.next().await {
                    Incoming::ReleaseRp | Incoming::ReleaseRq => return Ok(()),
                    Incoming::Message(_) => continue,
                    Incoming::Abort => return Err("the peer aborted during the release".into()),
                    Incoming::Gone(w) => return Err(w.to_string()),
                }
            }
        };
        let r = match tokio::time::timeout(within, answer).await {
            Ok(r) => r,
            Err(_) => Err(format!("no A-RELEASE-RP within {within:?}")),
        };
        match &r {
            Ok(()) => self.close().await,
            Err(_) => self.abort().await,
        }
        r
    }

    pub async fn close(&mut self) {
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(2), self.writer.shutdown()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::super::pdu::{encode, read_pdu};
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
