//! The WADO relay's multipart splitter (`web::multipart::Splitter`): however the body is cut
//! into chunks, it must yield the same parts (headers and data) as a reference reading of the
//! whole body (RFC 2046: a part ends at the first `CRLF--boundary`), never a part the reference
//! does not see, and report the body complete exactly when the reference finds the closing
//! delimiter. Input: byte 0 = boundary length (1..=70), byte 1 = split seed, then the boundary
//! bytes (mapped to letters and digits), then the body.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use pacsgate::web::multipart::{Piece, Splitter as Parts};
use pacsgate_fuzz::Splitter;

/// The parts of a whole body as RFC 2046 reads it: `None` when the framing is broken before
/// the closing delimiter (the relay refuses such a body).
fn reference(body: &[u8], boundary: &str) -> (Vec<(Vec<u8>, Vec<u8>)>, bool) {
    let needle = format!("\r\n--{boundary}").into_bytes();
    let mut text = b"\r\n".to_vec();
    text.extend_from_slice(body);
    let find = |from: usize| {
        text[from..]
            .windows(needle.len())
            .position(|w| w == needle.as_slice())
            .map(|p| p + from)
    };
    let mut parts = Vec::new();
    let Some(mut at) = find(0) else {
        return (parts, false);
    };
    loop {
        let after = at + needle.len();
        if text[after..].starts_with(b"--") {
            return (parts, true);
        }
        // transport padding, then CRLF
        let mut i = after;
        while i < text.len() && (text[i] == b' ' || text[i] == b'\t') {
            i += 1;
        }
        if !text[i..].starts_with(b"\r\n") {
            return (parts, false);
        }
        let start = i + 2;
        let (headers, data_start) = if text[start..].starts_with(b"\r\n") {
            (Vec::new(), start + 2)
        } else {
            match text[start..].windows(4).position(|w| w == b"\r\n\r\n") {
                Some(p) => (text[start..start + p].to_vec(), start + p + 4),
                None => return (parts, false),
            }
        };
        let Some(next) = find(data_start) else {
            return (parts, false);
        };
        parts.push((headers, text[data_start..next].to_vec()));
        at = next;
    }
}

fuzz_target!(|input: &[u8]| {
    if input.len() < 3 {
        return;
    }
    let blen = 1 + input[0] as usize % 70;
    let seed = input[1];
    let rest = &input[2..];
    if rest.len() < blen {
        return;
    }
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let boundary: String = rest[..blen]
        .iter()
        .map(|b| char::from(ALPHABET[*b as usize % ALPHABET.len()]))
        .collect();
    let body = &rest[blen..];
    let mut sp = Parts::new(&boundary);
    let mut pieces = Vec::new();
    let mut error = false;
    for chunk in Splitter::new(seed).split(body) {
        if sp.push(Bytes::copy_from_slice(chunk), &mut pieces).is_err() {
            error = true;
            break;
        }
    }
    // The relay's reading: parts complete at PartEnd.
    let mut got: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut open: Option<(Vec<u8>, Vec<u8>)> = None;
    let mut ended = false;
    for p in pieces {
        match p {
            Piece::Start(h) => open = Some((h, Vec::new())),
            Piece::Data(d) => open
                .as_mut()
                .expect("data outside a part")
                .1
                .extend_from_slice(&d),
            Piece::PartEnd => got.push(open.take().expect("an end outside a part")),
            Piece::End => ended = true,
        }
    }
    let (want, complete) = reference(body, &boundary);
    // Every part the relay completed is one the reference sees, in order.
    assert!(got.len() <= want.len(), "more parts than the body holds");
    assert_eq!(got[..], want[..got.len()], "a part differs from the body's");
    if ended {
        assert!(complete, "complete without the closing delimiter");
        assert_eq!(got, want, "complete with other parts than the body's");
    }
    if complete && !error {
        assert!(ended, "the closing delimiter was missed");
    }
});
