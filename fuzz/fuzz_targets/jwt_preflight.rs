//! `trust::preflight`: the only reading of a token before a key decides (header, algorithm,
//! unverified issuer). Arbitrary strings, and the input trimmed as the DIMSE front end trims.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pacsgate::trust;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    for token in [s, s.trim_matches(|c: char| c.is_ascii_whitespace())] {
        if let Ok(Some(p)) = trust::preflight(token) {
            assert_eq!(
                token.split('.').count(),
                3,
                "a preflight read a token that is not a JWS"
            );
            let _ = (p.alg.is_ok(), p.header.is_ok(), p.iss.len());
        }
    }
});
