//! The STOW relay's delimiter scan: `Delimiter::found_in` over chunks must say, for every
//! chunk, exactly whether an occurrence of `CRLF--boundary` ends inside that chunk (a naive
//! search of the joined bytes), so the first chunk it flags is the first one that completes
//! the delimiter. Input: byte 0 = boundary length (1..=70), byte 1 = split seed, then the
//! boundary bytes (mapped to printable ASCII), then the stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pacsgate::web::multipart::Delimiter;
use pacsgate_fuzz::Splitter;

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
    let boundary: String = rest[..blen]
        .iter()
        .map(|b| char::from(0x20 + (b % 0x5F)))
        .collect();
    let stream = &rest[blen..];
    let needle = format!("\r\n--{boundary}").into_bytes();
    // ends[i]: an occurrence ends at offset i (exclusive end)
    let ends: Vec<usize> = (0..=stream.len().saturating_sub(needle.len()))
        .filter(|&i| stream.len() >= needle.len() && stream[i..i + needle.len()] == needle[..])
        .map(|i| i + needle.len())
        .collect();
    let mut d = Delimiter::new(&boundary);
    let mut at = 0usize;
    let mut first_flag = None;
    for (n, chunk) in Splitter::new(seed).split(stream).into_iter().enumerate() {
        let got = d.found_in(chunk);
        let end = at + chunk.len();
        let want = ends.iter().any(|&e| e > at && e <= end);
        assert_eq!(
            got, want,
            "chunk {n} ({at}..{end}): scan says {got}, the bytes say {want}"
        );
        if got && first_flag.is_none() {
            first_flag = Some(n);
        }
        at = end;
    }
    assert_eq!(
        first_flag.is_some(),
        !ends.is_empty(),
        "the scan and a search of the whole disagree"
    );
});
