//! DICOMweb paths and query strings: `web::path::parse` on the part before the first `?`
//! and `decode_query` on the rest (the whole input too, for both). A parsed path rebuilds to
//! an upstream path that parses to the same resource and holds only safe characters; a
//! decoded query re-encodes to one that decodes to the same pairs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pacsgate::web::path;

fn check_path(p: &str) {
    if let Ok(r) = path::parse(p) {
        let up = r.upstream_path();
        assert!(
            up.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"./,".contains(&b)),
            "unsafe upstream path {up:?}"
        );
        assert!(!up.split('/').any(|s| s.is_empty() || s == "." || s == ".."));
        assert_eq!(
            path::parse(&up).as_ref(),
            Ok(&r),
            "the upstream path names another resource"
        );
    }
}

fn check_query(q: &str) {
    if let Ok(pairs) = path::decode_query(q) {
        let enc = path::encode_query(&pairs);
        assert!(!enc.contains(['#', ' ', '\n', '\r', '+']));
        let back = path::decode_query(&enc).expect("an encoded query decodes");
        assert_eq!(back, pairs, "re-encoding changed the query");
    }
}

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    let (p, q) = s.split_once('?').unwrap_or((&s, ""));
    check_path(p);
    check_query(q);
    check_path(&s);
    check_query(&s);
});
