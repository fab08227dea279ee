//! Multipart framing toward peers: boundaries the gateway chooses, and the scan that proves a
//! relayed part cannot close its frame early.
//!
//! Owns: [`random_boundary`] (128 random bits, so nobody can place the delimiter in a part in
//! advance), [`Delimiter`], which finds `CRLF--boundary` in a stream of chunks across chunk
//! edges, in one pass with a bounded carry-over, and [`Splitter`], which cuts a multipart body
//! as it streams into part headers and part data without copying the data (slices of the chunks
//! as they came). Must not know DICOM or policy.

use bytes::{Bytes, BytesMut};

/// A boundary toward the PACS that nobody can know in advance (128 random bits).
pub(crate) fn random_boundary() -> String {
    let mut b = [0u8; 16];
    if !crate::crypto::random(&mut b) {
        // No generator answered: the clock's nanoseconds, never a constant.
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b = n.to_le_bytes();
    }
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("pacsgate-{hex}")
}

/// Finds a multipart delimiter in a stream of chunks, across chunk edges.
pub struct Delimiter {
    needle: Vec<u8>,
    tail: Vec<u8>,
}

impl Delimiter {
    pub fn new(boundary: &str) -> Delimiter {
        Delimiter {
            needle: format!("\r\n--{boundary}").into_bytes(),
            tail: Vec::new(),
        }
    }

    /// Whether the delimiter occurs in what has passed so far, this chunk included.
    pub fn found_in(&mut self, chunk: &[u8]) -> bool {
        let keep = self.needle.len() - 1;
        let mut window = std::mem::take(&mut self.tail);
        window.extend_from_slice(&chunk[..chunk.len().min(keep)]);
        let edge = memchr::memmem::find(&window, &self.needle).is_some();
        let inside = memchr::memmem::find(chunk, &self.needle).is_some();
        let start = chunk.len().saturating_sub(keep);
        self.tail = if chunk.len() >= keep {
            chunk[start..].to_vec()
        } else {
            let mut t = window;
            let cut = t.len().saturating_sub(keep);
            t.drain(..cut);
            t
        };
        edge || inside
    }
}

/// The largest part header block accepted.
const MAX_PART_HEADERS: usize = 16 * 1024;

/// One step of a multipart body, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// A part begins: its header block as sent (without the blank line that ends it).
    Start(Vec<u8>),
    /// Bytes of the current part, a slice of what arrived.
    Data(Bytes),
    /// The current part ended at a delimiter.
    PartEnd,
    /// The closing delimiter was read: the body is complete.
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SplitState {
    Preamble,
    /// Just after a delimiter: transport padding then CRLF, or `--`.
    AfterDelimiter,
    Headers,
    Body,
    Epilogue,
}

/// Cuts a multipart body into [`Piece`]s as it streams (RFC 2046 5.1.1).
pub struct Splitter {
    finder: memchr::memmem::Finder<'static>,
    needle_len: usize,
    state: SplitState,
    /// Bytes that may begin a delimiter, held until the next chunk tells.
    held: BytesMut,
    /// The line after a delimiter, or the header block being read.
    head: Vec<u8>,
}

impl Splitter {
    pub fn new(boundary: &str) -> Splitter {
        let needle = format!("\r\n--{boundary}").into_bytes();
        let needle_len = needle.len();
        let mut held = BytesMut::new();
        // The first delimiter may start the body: read it as if a line ended before it.
        held.extend_from_slice(b"\r\n");
        Splitter {
            finder: memchr::memmem::Finder::new(&needle).into_owned(),
            needle_len,
            state: SplitState::Preamble,
            held,
            head: Vec::new(),
        }
    }

    /// Whether the closing delimiter has been read.
    #[cfg(test)]
    pub(crate) fn is_complete(&self) -> bool {
        self.state == SplitState::Epilogue
    }

    fn data(&self, b: Bytes, out: &mut Vec<Piece>) {
        if self.state == SplitState::Body && !b.is_empty() {
            out.push(Piece::Data(b));
        }
    }

    fn delimiter(&mut self, out: &mut Vec<Piece>) {
        if self.state == SplitState::Body {
            out.push(Piece::PartEnd);
        }
        self.state = SplitState::AfterDelimiter;
        self.head.clear();
    }

    /// The length of the longest end of `chunk` that is a proper beginning of the delimiter.
    fn partial_delimiter(&self, chunk: &[u8]) -> usize {
        let needle = self.finder.needle();
        let window = chunk.len().min(self.needle_len - 1);
        let tail = &chunk[chunk.len() - window..];
        // Every delimiter starts with CR; the earliest CR that starts one gives the longest end.
        memchr::memchr_iter(b'\r', tail)
            .find(|p| needle.starts_with(&tail[*p..]))
            .map_or(0, |p| tail.len() - p)
    }

    /// Reads the next chunk of the body.
    pub fn push(&mut self, mut chunk: Bytes, out: &mut Vec<Piece>) -> Result<(), &'static str> {
        while !chunk.is_empty() {
            match self.state {
                SplitState::Epilogue => return Ok(()),
                SplitState::Preamble | SplitState::Body => {
                    if !self.held.is_empty() && chunk.len() < self.needle_len {
                        // A small chunk: read it together with the held bytes.
                        let mut merged = self.held.split();
                        merged.extend_from_slice(&chunk);
                        chunk = merged.freeze();
                    }
                    if !self.held.is_empty() {
                        // A delimiter that starts in the held bytes ends in this chunk, which is
                        // at least a delimiter long.
                        let k = chunk.len().min(self.needle_len);
                        let mut window = self.held.to_vec();
                        window.extend_from_slice(&chunk[..k]);
                        match self.finder.find(&window) {
                            Some(i) if i < self.held.len() => {
                                let used = i + self.needle_len - self.held.len();
                                let before = self.held.split_to(i).freeze();
                                self.data(before, out);
                                self.held.clear();
                                chunk = chunk.slice(used..);
                                self.delimiter(out);
                                continue;
                            }
                            _ => {
                                let held = self.held.split().freeze();
                                self.data(held, out);
                            }
                        }
                    }
                    match self.finder.find(&chunk) {
                        Some(i) => {
                            self.data(chunk.slice(..i), out);
                            chunk = chunk.slice(i + self.needle_len..);
                            self.delimiter(out);
                        }
                        None => {
                            // The end may begin a delimiter: hold back the longest end that
                            // is the start of one (almost always none, so chunks go on whole).
                            let keep = self.partial_delimiter(&chunk);
                            let cut = chunk.len() - keep;
                            self.data(chunk.slice(..cut), out);
                            self.held.extend_from_slice(&chunk[cut..]);
                            chunk = Bytes::new();
                        }
                    }
                }
                SplitState::AfterDelimiter => {
                    let take = chunk.len().min(MAX_PART_HEADERS);
                    self.head.extend_from_slice(&chunk[..take]);
                    chunk = chunk.slice(take..);
                    if self.head.starts_with(b"--") {
                        out.push(Piece::End);
                        self.state = SplitState::Epilogue;
                        return Ok(());
                    }
                    if self.head == b"-" {
                        continue;
                    }
                    let Some(eol) = memchr::memmem::find(&self.head, b"\r\n") else {
                        // Only transport padding (and the CR of the line end) may be waiting.
                        let pad = match self.head.split_last() {
                            Some((b'\r', pad)) => pad,
                            _ => &self.head[..],
                        };
                        if pad.iter().any(|b| !matches!(b, b' ' | b'\t')) || self.head.len() > 256 {
                            return Err("a multipart delimiter is followed by other text");
                        }
                        continue;
                    };
                    if self.head[..eol].iter().any(|b| !matches!(b, b' ' | b'\t')) {
                        return Err("a multipart delimiter is followed by other text");
                    }
                    let rest = self.head.split_off(eol + 2);
                    self.head = rest;
                    self.state = SplitState::Headers;
                    let again = std::mem::take(&mut self.head);
                    chunk = if chunk.is_empty() {
                        Bytes::from(again)
                    } else {
                        let mut joined = again;
                        joined.extend_from_slice(&chunk);
                        Bytes::from(joined)
                    };
                }
                SplitState::Headers => {
                    let before = self.head.len();
                    let take = chunk
                        .len()
                        .min(MAX_PART_HEADERS + 4 - before.min(MAX_PART_HEADERS));
                    self.head.extend_from_slice(&chunk[..take]);
                    let end = if self.head.starts_with(b"\r\n") {
                        Some((0, 2))
                    } else {
                        memchr::memmem::find(&self.head, b"\r\n\r\n").map(|i| (i, i + 4))
                    };
                    let Some((headers_end, body_start)) = end else {
                        if self.head.len() >= MAX_PART_HEADERS {
                            return Err("a part's headers are too long");
                        }
                        chunk = chunk.slice(take..);
                        continue;
                    };
                    let headers = self.head[..headers_end].to_vec();
                    out.push(Piece::Start(headers));
                    // What followed the headers in this chunk is the part's first data.
                    let used = body_start - before;
                    chunk = chunk.slice(used..);
                    self.head.clear();
                    self.state = SplitState::Body;
                }
            }
        }
        Ok(())
    }
}

/// The value of a header in a part's header block (names compared without case).
pub(crate) fn header_value<'h>(headers: &'h [u8], name: &str) -> Option<&'h str> {
    std::str::from_utf8(headers)
        .ok()?
        .split("\r\n")
        .find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(body: &[u8], boundary: &str, step: usize) -> Result<Vec<Piece>, &'static str> {
        let mut s = Splitter::new(boundary);
        let mut out = Vec::new();
        for c in body.chunks(step.max(1)) {
            s.push(Bytes::copy_from_slice(c), &mut out)?;
        }
        // merge adjacent data for comparison
        let mut merged: Vec<Piece> = Vec::new();
        for p in out {
            match (merged.last_mut(), p) {
                (Some(Piece::Data(a)), Piece::Data(b)) => {
                    let mut v = a.to_vec();
                    v.extend_from_slice(&b);
                    *a = Bytes::from(v);
                }
                (_, p) => merged.push(p),
            }
        }
        assert_eq!(s.is_complete(), merged.last() == Some(&Piece::End));
        Ok(merged)
    }

    #[test]
    fn parts_are_cut_alike_in_any_pieces() {
        let body = b"preamble\r\n--XyZ\r\nContent-Type: application/dicom\r\n\r\npart one\r\n--XyZ  \r\nContent-Type: application/dicom; transfer-syntax=1.2.840.10008.1.2.1\r\n\r\npart\r\n--Xy two\r\n--XyZ--\r\nepilogue";
        let want = vec![
            Piece::Start(b"Content-Type: application/dicom".to_vec()),
            Piece::Data(Bytes::from_static(b"part one")),
            Piece::PartEnd,
            Piece::Start(
                b"Content-Type: application/dicom; transfer-syntax=1.2.840.10008.1.2.1".to_vec(),
            ),
            Piece::Data(Bytes::from_static(b"part\r\n--Xy two")),
            Piece::PartEnd,
            Piece::End,
        ];
        for step in 1..body.len() + 1 {
            assert_eq!(
                split(body, "XyZ", step).unwrap_or_else(|e| panic!("step {step}: {e}")),
                want,
                "step {step}"
            );
        }
        // no preamble; an empty part
        let body = b"--b\r\n\r\n\r\n--b--";
        assert_eq!(
            split(body, "b", 1).unwrap(),
            vec![Piece::Start(Vec::new()), Piece::PartEnd, Piece::End]
        );
        // a cut body never completes; junk after a delimiter is refused
        assert!(
            !split(&body[..body.len() - 2], "b", 3)
                .unwrap()
                .contains(&Piece::End)
        );
        assert!(split(b"--b\r\n\r\nx\r\n--bjunk\r\n", "b", 4).is_err());
        assert_eq!(
            header_value(b"content-type: application/dicom\r\nX: y", "Content-Type"),
            Some("application/dicom")
        );
    }

    #[test]
    fn the_delimiter_is_found_across_chunk_edges() {
        let b = random_boundary();
        assert_eq!(b.len(), "pacsgate-".len() + 32);
        assert_ne!(b, random_boundary());
        let needle = format!("\r\n--{b}");
        let data = format!("head{needle}tail").into_bytes();
        for step in 1..data.len() {
            let mut d = Delimiter::new(&b);
            let found = data.chunks(step).any(|c| d.found_in(c));
            assert!(found, "step {step}");
        }
        let mut d = Delimiter::new(&b);
        let clean = format!("\r\n-{b}\r\n--pacsgate-0").into_bytes();
        assert!(!clean.chunks(3).any(|c| d.found_in(c)));
    }
}
