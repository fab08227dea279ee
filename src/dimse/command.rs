//! DIMSE command sets (PS3.7 Chapter 9 and Annex E): decoding, reading fields, and building the
//! responses the gateway itself sends.
//!
//! Owns: the command field numbers, status codes, and the Implicit VR Little Endian encoding of
//! command sets. Must not know policy.

use dicom_core::header::Header;
use dicom_core::{DataElement, PrimitiveValue, VR, dicom_value};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN;

pub const C_STORE_RQ: u16 = 0x0001;
pub const C_GET_RQ: u16 = 0x0010;
pub const C_FIND_RQ: u16 = 0x0020;
pub const C_MOVE_RQ: u16 = 0x0021;
pub const C_ECHO_RQ: u16 = 0x0030;
pub const C_CANCEL_RQ: u16 = 0x0FFF;
pub const C_STORE_RSP: u16 = 0x8001;
pub const C_GET_RSP: u16 = 0x8010;
pub const C_FIND_RSP: u16 = 0x8020;
pub const C_MOVE_RSP: u16 = 0x8021;
pub const C_ECHO_RSP: u16 = 0x8030;

/// CommandDataSetType value meaning "no data set".
pub const NO_DATA_SET: u16 = 0x0101;

pub const STATUS_SUCCESS: u16 = 0x0000;
/// Refused: Not Authorized.
pub const STATUS_NOT_AUTHORIZED: u16 = 0x0124;
/// Unrecognized operation.
pub const STATUS_UNRECOGNIZED_OPERATION: u16 = 0x0211;
/// C-FIND: Identifier does not match SOP Class.
pub const STATUS_IDENTIFIER_MISMATCH: u16 = 0xA900;
/// Unable to process (the upstream PACS failed or did not answer).
pub const STATUS_UNABLE_TO_PROCESS: u16 = 0xC001;
/// C-STORE: Cannot understand (the data set could not be read far enough to decide).
pub const STATUS_CANNOT_UNDERSTAND: u16 = 0xC000;
/// C-MOVE: Move destination unknown.
pub const STATUS_MOVE_DESTINATION_UNKNOWN: u16 = 0xA801;
/// C-MOVE/C-GET: Warning, sub-operations complete with one or more failures.
pub const STATUS_SUBOPS_WARNING: u16 = 0xB000;

/// Whether a status is Pending (more responses follow).
pub fn is_pending(status: u16) -> bool {
    status == 0xFF00 || status == 0xFF01
}

#[derive(Debug, thiserror::Error)]
#[error("malformed command set: {0}")]
pub struct CommandError(pub String);

/// A decoded command set, with the bytes it came in (relayed unchanged when possible).
///
/// Command sets are flat Implicit VR Little Endian group-0000 elements (PS3.7 6.3.1), so they
/// are read by a small bounds-checked parser rather than a general data set reader: this runs
/// for every message relayed.
#[derive(Debug, Clone)]
pub struct Command {
    pub raw: Vec<u8>,
    field: u16,
    message_id: Option<u16>,
    responded_to: Option<u16>,
    status: Option<u16>,
    data_set_type: Option<u16>,
    /// Offset in `raw` of the CommandDataSetType value.
    data_set_type_at: Option<usize>,
    sop_class: Option<String>,
    move_destination: Option<String>,
    move_originator_id: Option<u16>,
    /// Other US elements by element number (sub-operation counts and the like).
    other_us: Vec<(u16, u16)>,
}

impl Command {
    pub fn decode(raw: Vec<u8>) -> Result<Command, CommandError> {
        let mut c = Command {
            raw: Vec::new(),
            field: 0,
            message_id: None,
            responded_to: None,
            status: None,
            data_set_type: None,
            data_set_type_at: None,
            sop_class: None,
            move_destination: None,
            move_originator_id: None,
            other_us: Vec::new(),
        };
        let mut field = None;
        let mut i = 0usize;
        let u16_at = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        while i < raw.len() {
            if raw.len() - i < 8 {
                return Err(CommandError("truncated element header".into()));
            }
            let group = u16_at(&raw, i);
            let element = u16_at(&raw, i + 2);
            let len = u32::from_le_bytes([raw[i + 4], raw[i + 5], raw[i + 6], raw[i + 7]]) as usize;
            i += 8;
            if group != 0x0000 {
                return Err(CommandError(format!(
                    "element ({group:04X},{element:04X}) outside group 0000"
                )));
            }
            if len > raw.len() - i {
                return Err(CommandError(format!(
                    "element (0000,{element:04X}) runs past the end"
                )));
            }
            let value = &raw[i..i + len];
            let us = || {
                if len == 2 {
                    Ok(u16::from_le_bytes([value[0], value[1]]))
                } else {
                    Err(CommandError(format!(
                        "(0000,{element:04X}) is not a 2-byte US"
                    )))
                }
            };
            match element {
                0x0100 => field = Some(us()?),
                0x0110 => c.message_id = Some(us()?),
                0x0120 => c.responded_to = Some(us()?),
                0x0900 => c.status = Some(us()?),
                0x0800 => {
                    c.data_set_type = Some(us()?);
                    c.data_set_type_at = Some(i);
                }
                0x1031 => c.move_originator_id = Some(us()?),
                0x1020..=0x1023 => c.other_us.push((element, us()?)),
                0x0600 => {
                    let text = std::str::from_utf8(value)
                        .map_err(|_| CommandError("MoveDestination is not text".into()))?;
                    c.move_destination = Some(text.trim_matches(['\0', ' ']).to_string());
                }
                0x0002 => {
                    let text = std::str::from_utf8(value)
                        .map_err(|_| CommandError("AffectedSOPClassUID is not text".into()))?;
                    c.sop_class = Some(text.trim_end_matches(['\0', ' ']).to_string());
                }
                _ => {}
            }
            i += len;
        }
        c.field = field.ok_or_else(|| CommandError("no CommandField (0000,0100)".into()))?;
        c.raw = raw;
        Ok(c)
    }

    pub fn field(&self) -> Option<u16> {
        Some(self.field)
    }

    pub fn message_id(&self) -> Option<u16> {
        self.message_id
    }

    pub fn message_id_being_responded_to(&self) -> Option<u16> {
        self.responded_to
    }

    pub fn status(&self) -> Option<u16> {
        self.status
    }

    /// Whether a data set follows the command.
    pub fn has_data_set(&self) -> bool {
        self.data_set_type.is_some_and(|v| v != NO_DATA_SET)
    }

    /// A sub-operation count (0000,1020)-(0000,1023), if present.
    pub fn u16_field(&self, element: u16) -> Option<u16> {
        self.other_us
            .iter()
            .find(|(e, _)| *e == element)
            .map(|(_, v)| *v)
    }

    /// Move Destination (0000,0600) of a C-MOVE-RQ, padding removed.
    pub fn move_destination(&self) -> Option<&str> {
        self.move_destination.as_deref()
    }

    /// Move Originator Message ID (0000,1031) of a C-STORE-RQ sub-operation.
    pub fn move_originator_id(&self) -> Option<u16> {
        self.move_originator_id
    }

    pub fn affected_sop_class(&self) -> Option<String> {
        self.sop_class.clone()
    }

    /// A response to this request with `status` and no data set.
    pub fn response(&self, status: u16, comment: Option<&str>) -> Vec<u8> {
        build_response(
            self.field | 0x8000,
            self.message_id.unwrap_or(0),
            self.sop_class.as_deref(),
            status,
            comment,
        )
    }

    /// This command with its data-set type set to "none" (used when a data set the peer
    /// announced is withheld). The value has the same size, so the group length stays right.
    pub fn without_data_set(&self) -> Vec<u8> {
        let mut raw = self.raw.clone();
        if let Some(at) = self.data_set_type_at {
            raw[at..at + 2].copy_from_slice(&NO_DATA_SET.to_le_bytes());
        }
        raw
    }
}

/// A command field value to set when a command is rewritten.
pub enum Set<'a> {
    Us(u16),
    Ae(&'a str),
}

/// Rewrites fields of an encoded command set (e.g. the Move Destination or Message ID of a
/// relayed C-MOVE), recomputing the group length.
pub fn rewrite(raw: &[u8], edits: &[(dicom_core::Tag, Set<'_>)]) -> Result<Vec<u8>, CommandError> {
    let mut obj = InMemDicomObject::read_dataset_with_ts(raw, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .map_err(|e| CommandError(e.to_string()))?;
    for (tag, value) in edits {
        let el = match value {
            Set::Us(v) => DataElement::new(*tag, VR::US, dicom_value!(U16, [*v])),
            Set::Ae(a) => DataElement::new(*tag, VR::AE, PrimitiveValue::from(*a)),
        };
        obj.put(el);
    }
    Ok(encode(obj))
}

/// Encodes a command object, with its group length recomputed.
fn encode(obj: InMemDicomObject) -> Vec<u8> {
    let elements = obj
        .into_iter()
        .filter(|e| e.tag() != tags::COMMAND_GROUP_LENGTH);
    let cmd = InMemDicomObject::command_from_element_iter(elements);
    let mut out = Vec::new();
    // Writing an in-memory command set to a Vec cannot fail for well-formed elements; an empty
    // command is what the peer would get otherwise, and it would refuse it as malformed.
    let _ = cmd.write_dataset_with_ts(&mut out, &IMPLICIT_VR_LITTLE_ENDIAN.erased());
    out
}

/// Builds a request command set (C-FIND-RQ, C-MOVE-RQ, C-GET-RQ...) with its data-set type.
pub fn build_request(
    field: u16,
    message_id: u16,
    sop_class: &str,
    with_data: bool,
    extra: Vec<DataElement<InMemDicomObject>>,
) -> Vec<u8> {
    let mut elements = vec![
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(sop_class),
        ),
        DataElement::new(tags::COMMAND_FIELD, VR::US, dicom_value!(U16, [field])),
        DataElement::new(tags::MESSAGE_ID, VR::US, dicom_value!(U16, [message_id])),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            dicom_value!(U16, [if with_data { 0x0000 } else { NO_DATA_SET }]),
        ),
    ];
    if matches!(field, C_FIND_RQ | C_MOVE_RQ | C_GET_RQ | C_STORE_RQ) {
        elements.push(DataElement::new(
            tags::PRIORITY,
            VR::US,
            dicom_value!(U16, [0]),
        ));
    }
    elements.extend(extra);
    encode(InMemDicomObject::from_element_iter(elements))
}

/// Builds a response command set without a data set.
pub fn build_response(
    field: u16,
    message_id: u16,
    sop_class: Option<&str>,
    status: u16,
    comment: Option<&str>,
) -> Vec<u8> {
    let mut elements = Vec::new();
    if let Some(uid) = sop_class {
        elements.push(DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(uid),
        ));
    }
    elements.push(DataElement::new(
        tags::COMMAND_FIELD,
        VR::US,
        dicom_value!(U16, [field]),
    ));
    elements.push(DataElement::new(
        tags::MESSAGE_ID_BEING_RESPONDED_TO,
        VR::US,
        dicom_value!(U16, [message_id]),
    ));
    elements.push(DataElement::new(
        tags::COMMAND_DATA_SET_TYPE,
        VR::US,
        dicom_value!(U16, [NO_DATA_SET]),
    ));
    elements.push(DataElement::new(
        tags::STATUS,
        VR::US,
        dicom_value!(U16, [status]),
    ));
    if let Some(c) = comment {
        // ErrorComment is LO: at most 64 characters.
        let c: String = c.chars().filter(|ch| *ch != '\\').take(64).collect();
        elements.push(DataElement::new(
            tags::ERROR_COMMENT,
            VR::LO,
            PrimitiveValue::from(c),
        ));
    }
    encode(InMemDicomObject::from_element_iter(elements))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find_rq() -> Vec<u8> {
        let obj = InMemDicomObject::command_from_element_iter([
            DataElement::new(
                tags::AFFECTED_SOP_CLASS_UID,
                VR::UI,
                PrimitiveValue::from("1.2.840.10008.5.1.4.1.2.2.1"),
            ),
            DataElement::new(tags::COMMAND_FIELD, VR::US, dicom_value!(U16, [C_FIND_RQ])),
            DataElement::new(tags::MESSAGE_ID, VR::US, dicom_value!(U16, [7])),
            DataElement::new(tags::PRIORITY, VR::US, dicom_value!(U16, [0])),
            DataElement::new(
                tags::COMMAND_DATA_SET_TYPE,
                VR::US,
                dicom_value!(U16, [0x0000]),
            ),
        ]);
        let mut out = Vec::new();
        obj.write_dataset_with_ts(&mut out, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
            .unwrap();
        out
    }

    #[test]
    fn decode_and_respond() {
        let c = Command::decode(find_rq()).unwrap();
        assert_eq!(c.field(), Some(C_FIND_RQ));
        assert_eq!(c.message_id(), Some(7));
        assert!(c.has_data_set());
        assert_eq!(
            c.affected_sop_class().as_deref(),
            Some("1.2.840.10008.5.1.4.1.2.2.1")
        );

        let r = Command::decode(c.response(STATUS_NOT_AUTHORIZED, Some("not authorized"))).unwrap();
        assert_eq!(r.field(), Some(C_FIND_RSP));
        assert_eq!(r.status(), Some(STATUS_NOT_AUTHORIZED));
        assert!(!r.has_data_set());
        assert_eq!(r.message_id_being_responded_to(), Some(7));
        assert_eq!(
            r.affected_sop_class().as_deref(),
            Some("1.2.840.10008.5.1.4.1.2.2.1")
        );
        // group length is correct: the encoded length after the group length element
        let obj =
            InMemDicomObject::read_dataset_with_ts(&r.raw[..], &IMPLICIT_VR_LITTLE_ENDIAN.erased())
                .unwrap();
        let gl = obj
            .get(tags::COMMAND_GROUP_LENGTH)
            .unwrap()
            .to_int::<u32>()
            .unwrap();
        assert_eq!(gl as usize, r.raw.len() - 12);
        assert_eq!(
            obj.get(tags::ERROR_COMMENT)
                .unwrap()
                .to_str()
                .unwrap()
                .trim(),
            "not authorized"
        );

        let stripped = Command::decode(c.without_data_set()).unwrap();
        assert!(!stripped.has_data_set());
        assert_eq!(stripped.message_id(), Some(7));
    }

    #[test]
    fn garbage_is_refused() {
        assert!(Command::decode(vec![1, 2, 3]).is_err());
        assert!(Command::decode(Vec::new()).is_err());
        // an element whose length runs past the end
        assert!(Command::decode(vec![0, 0, 0, 1, 0xff, 0xff, 0, 0, 1, 2]).is_err());
        // an element of another group
        assert!(Command::decode(vec![8, 0, 0x50, 0, 0, 0, 0, 0]).is_err());
        // CommandField with a wrong size
        assert!(Command::decode(vec![0, 0, 0, 1, 1, 0, 0, 0, 5]).is_err());
        // every truncation of a valid command is refused, never a panic
        let good = find_rq();
        for n in 0..good.len() {
            let _ = Command::decode(good[..n].to_vec());
        }
        assert!(is_pending(0xFF00) && is_pending(0xFF01) && !is_pending(0));
    }
}
