//! DIMSE command sets: `Command::decode` and `decode_with_tail` on arbitrary bytes. For
//! accepted input, `decode(encode(c)) == c` and the encoding is canonical
//! (`encode(decode(encode(c))) == encode(c)`); the strict decode and the PACS-side decode agree
//! on a command without a tail; a response the gateway builds to an accepted request decodes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pacsgate::dicom::command::{self, Command};

fn roundtrip(c: &Command) {
    let enc = c.encode();
    let back = Command::decode(&enc)
        .unwrap_or_else(|e| panic!("the gateway's encoding of {c:?} is refused: {e}"));
    assert_eq!(&back, c, "decode(encode(c)) != c");
    assert_eq!(back.encode(), enc, "the encoding is not canonical");
    assert_eq!(Command::decode_with_tail(&enc).as_ref(), Ok(c));
}

fuzz_target!(|data: &[u8]| {
    let strict = Command::decode(data);
    let tolerant = Command::decode_with_tail(data);
    if pacsgate_fuzz::verbose() {
        eprintln!(
            "decode: {strict:?}\ndecode_with_tail: {:?}",
            tolerant.as_ref().map(|c| c.field)
        );
    }
    if let Ok(c) = &strict {
        assert_eq!(
            tolerant.as_ref(),
            Ok(c),
            "decode accepted, decode_with_tail did not agree"
        );
        roundtrip(c);
        if matches!(
            c.field,
            command::C_STORE_RQ
                | command::C_GET_RQ
                | command::C_FIND_RQ
                | command::C_MOVE_RQ
                | command::C_ECHO_RQ
        ) {
            let comment = String::from_utf8_lossy(
                data.get(data.len().saturating_sub(80)..)
                    .unwrap_or_default(),
            );
            for status in [
                command::STATUS_SUCCESS,
                command::STATUS_NOT_AUTHORIZED,
                0xFF00,
            ] {
                let r = c.response(status, Some(&comment));
                let back = Command::decode(&r.encode())
                    .unwrap_or_else(|e| panic!("the response {r:?} is refused: {e}"));
                roundtrip(&back);
                assert_eq!(back.responded_to, c.message_id);
                assert_eq!(back.status, Some(status));
                assert!(!back.has_data_set());
            }
        }
    }
    if let Ok(c) = &tolerant {
        roundtrip(c);
    }
});
