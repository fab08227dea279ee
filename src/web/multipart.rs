//! Multipart framing toward peers: boundaries the gateway chooses, and the scan that proves a
//! relayed part cannot close its frame early.
//!
//! Owns: [`random_boundary`] (128 random bits, so nobody can place the delimiter in a part in
//! advance) and [`Delimiter`], which finds `CRLF--boundary` in a stream of chunks across chunk
//! edges, in one pass with a bounded carry-over. Must not know DICOM or policy.

/// A boundary toward the PACS that nobody can know in advance (128 random bits).
pub fn random_boundary() -> String {
    let mut b = [0u8; 16];
    let _ = aws_lc_rs::rand::fill(&mut b);
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

#[cfg(test)]
mod tests {
    use super::*;

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
