//! Randomness the gateway's unguessable values come from (multipart boundaries, C-MOVE route
//! ids).
//!
//! Owns: [`random`], which takes the operating system's generator directly (no per-thread
//! seeding on the request path), and the library's generator only if that fails. Must not know
//! what the values are for.

/// Fills `buf` with random bytes; `false` only when no generator answered.
pub fn random(buf: &mut [u8]) -> bool {
    getrandom::fill(buf).is_ok() || aws_lc_rs::rand::fill(buf).is_ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn values_differ() {
        let (mut a, mut b) = ([0u8; 16], [0u8; 16]);
        assert!(super::random(&mut a) && super::random(&mut b));
        assert_ne!(a, b);
    }
}
