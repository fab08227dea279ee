//! Transfer syntaxes the strict reader really decodes.
//!
//! Owns: the list, and nothing else. Implicit and Explicit VR Little Endian, and the
//! encapsulated syntaxes whose data set is Explicit VR Little Endian with pixel data in
//! fragments (the JPEG family, JPEG-LS, JPEG 2000, HTJ2K, JPEG XL, RLE, MPEG and HEVC video,
//! encapsulated uncompressed). Deflated syntaxes (the gateway has no inflater), the retired
//! big endian one, retired JPEG processes and every private or unknown UID are refused: an
//! instance in a syntax the gateway cannot read must never be read as another one.

use super::reader::Encoding;

/// How the data sets of a transfer syntax are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Syntax {
    pub encoding: Encoding,
    /// Pixel data may be encapsulated (undefined length, in fragments).
    pub encapsulated: bool,
}

pub const IMPLICIT_VR_LITTLE_ENDIAN: &str = "1.2.840.10008.1.2";
pub const EXPLICIT_VR_LITTLE_ENDIAN: &str = "1.2.840.10008.1.2.1";

/// Encapsulated syntaxes with an Explicit VR Little Endian data set.
const ENCAPSULATED: &[&str] = &[
    "1.2.840.10008.1.2.1.98", // Encapsulated Uncompressed Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50", // JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51", // JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57", // JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70", // JPEG Lossless, First-Order Prediction
    "1.2.840.10008.1.2.4.80", // JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81", // JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90", // JPEG 2000 (Lossless Only)
    "1.2.840.10008.1.2.4.91", // JPEG 2000
    "1.2.840.10008.1.2.4.92", // JPEG 2000 Part 2 Multi-component (Lossless Only)
    "1.2.840.10008.1.2.4.93", // JPEG 2000 Part 2 Multi-component
    "1.2.840.10008.1.2.4.100", // MPEG2 Main Profile / Main Level
    "1.2.840.10008.1.2.4.101", // MPEG2 Main Profile / High Level
    "1.2.840.10008.1.2.4.102", // MPEG-4 AVC/H.264 High Profile / Level 4.1
    "1.2.840.10008.1.2.4.103", // MPEG-4 AVC/H.264 BD-compatible High Profile / Level 4.1
    "1.2.840.10008.1.2.4.104", // MPEG-4 AVC/H.264 High Profile / Level 4.2 For 2D Video
    "1.2.840.10008.1.2.4.105", // MPEG-4 AVC/H.264 High Profile / Level 4.2 For 3D Video
    "1.2.840.10008.1.2.4.106", // MPEG-4 AVC/H.264 Stereo High Profile / Level 4.2
    "1.2.840.10008.1.2.4.107", // HEVC/H.265 Main Profile / Level 5.1
    "1.2.840.10008.1.2.4.108", // HEVC/H.265 Main 10 Profile / Level 5.1
    "1.2.840.10008.1.2.4.110", // JPEG XL Lossless
    "1.2.840.10008.1.2.4.111", // JPEG XL JPEG Recompression
    "1.2.840.10008.1.2.4.112", // JPEG XL
    "1.2.840.10008.1.2.4.201", // High-Throughput JPEG 2000 (Lossless Only)
    "1.2.840.10008.1.2.4.202", // High-Throughput JPEG 2000 with RPCL Options (Lossless Only)
    "1.2.840.10008.1.2.4.203", // High-Throughput JPEG 2000
    "1.2.840.10008.1.2.5",    // RLE Lossless
];

/// Explicit VR Little Endian syntaxes whose pixel data is referenced, not encapsulated.
const REFERENCED: &[&str] = &["1.2.840.10008.1.2.4.94"]; // JPIP Referenced

/// Every transfer syntax the gateway reads (for the conformance statement's test).
#[cfg(test)]
pub(crate) fn all() -> Vec<&'static str> {
    [IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN]
        .into_iter()
        .chain(REFERENCED.iter().copied())
        .chain(ENCAPSULATED.iter().copied())
        .collect()
}

/// How data sets in the transfer syntax `uid` are read (one trailing NUL tolerated, as in a
/// negotiated UID); `None` when the gateway does not read them.
pub fn readable(uid: &str) -> Option<Syntax> {
    let uid = uid.strip_suffix('\0').unwrap_or(uid);
    if uid == IMPLICIT_VR_LITTLE_ENDIAN {
        return Some(Syntax {
            encoding: Encoding::ImplicitLittle,
            encapsulated: false,
        });
    }
    if uid == EXPLICIT_VR_LITTLE_ENDIAN || REFERENCED.contains(&uid) {
        return Some(Syntax {
            encoding: Encoding::ExplicitLittle,
            encapsulated: false,
        });
    }
    ENCAPSULATED.contains(&uid).then_some(Syntax {
        encoding: Encoding::ExplicitLittle,
        encapsulated: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_syntaxes_the_reader_decodes() {
        assert_eq!(
            readable("1.2.840.10008.1.2\0").map(|s| s.encoding),
            Some(Encoding::ImplicitLittle)
        );
        assert!(readable("1.2.840.10008.1.2.4.50").is_some_and(|s| s.encapsulated));
        assert!(readable("1.2.840.10008.1.2.1").is_some_and(|s| !s.encapsulated));
        for refused in [
            "1.2.840.10008.1.2.1.99", // deflated
            "1.2.840.10008.1.2.4.95", // JPIP referenced deflate
            "1.2.840.10008.1.2.2",    // big endian
            "1.2.840.10008.1.2.4.53", // retired JPEG
            "1.2.3.4.5",              // private
            "",
        ] {
            assert!(readable(refused).is_none(), "{refused}");
        }
    }
}
