//! DIMSE command sets (PS3.7 chapter 9, Annex E): read strictly into typed fields, and always
//! written anew from those fields.
//!
//! Owns: the command field numbers and statuses, the elements a command set may hold and the
//! form of each, the elements each command requires, and the one encoding (Implicit VR Little
//! Endian, group length first, elements ascending). Nothing received is ever relayed as it
//! came: what goes to a peer is [`Command::encode`] of what was read and checked, so a peer
//! cannot see a field the gateway did not. Also which commands each kind of SOP class admits
//! ([`Service`]). Must not know policy.

use super::dataset::DataSet;
use super::reader::{Encoding, Limits, Scope, Violation};
use super::values;
use dicom_core::Tag;

pub const C_STORE_RQ: u16 = 0x0001;
pub const C_GET_RQ: u16 = 0x0010;
pub const C_FIND_RQ: u16 = 0x0020;
pub const C_MOVE_RQ: u16 = 0x0021;
pub const C_ECHO_RQ: u16 = 0x0030;
pub const C_CANCEL_RQ: u16 = 0x0FFF;
pub const C_STORE_RSP: u16 = 0x8001;
pub const C_GET_RSP: u16 = 0x8010;
pub(crate) const C_FIND_RSP: u16 = 0x8020;
pub(crate) const C_MOVE_RSP: u16 = 0x8021;
pub(crate) const C_ECHO_RSP: u16 = 0x8030;

/// CommandDataSetType value meaning "no data set".
pub const NO_DATA_SET: u16 = 0x0101;

pub const STATUS_SUCCESS: u16 = 0x0000;
/// Refused: SOP Class not supported (the command does not belong to its context's SOP class).
pub(crate) const STATUS_SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
/// Refused: Not Authorized.
pub const STATUS_NOT_AUTHORIZED: u16 = 0x0124;
/// Unrecognized operation.
pub(crate) const STATUS_UNRECOGNIZED_OPERATION: u16 = 0x0211;
/// Refused: Out of resources (C-MOVE: unable to perform sub-operations).
pub(crate) const STATUS_OUT_OF_RESOURCES_SUBOPS: u16 = 0xA702;
/// Identifier does not match SOP Class (C-FIND, C-GET, C-MOVE); for C-STORE: Data Set does
/// not match SOP Class.
pub(crate) const STATUS_IDENTIFIER_MISMATCH: u16 = 0xA900;
/// Unable to process (the upstream PACS failed or did not answer).
pub const STATUS_UNABLE_TO_PROCESS: u16 = 0xC001;
/// C-STORE: Cannot understand (the data set could not be read far enough to decide).
pub const STATUS_CANNOT_UNDERSTAND: u16 = 0xC000;
/// C-MOVE: Move destination unknown.
pub(crate) const STATUS_MOVE_DESTINATION_UNKNOWN: u16 = 0xA801;

/// The status for a request refused because what its decision needs could not be asked (the
/// PACS's ownership answer, the EHR's): "Refused: Out of Resources" (PS3.4 C.4.1.1.4 A700H
/// for C-FIND, C.4.2.1.5 and C.4.3.1.4 A701H for C-MOVE and C-GET, 9.1.1.1.9 A7xxH for
/// C-STORE), which tells the caller a retry may succeed; C001H "Unable to process" otherwise.
pub(crate) fn unavailable_status(request_field: u16) -> u16 {
    match request_field {
        C_FIND_RQ | C_STORE_RQ => 0xA700,
        C_GET_RQ | C_MOVE_RQ => 0xA701,
        _ => STATUS_UNABLE_TO_PROCESS,
    }
}
/// C-MOVE/C-GET: Warning, sub-operations complete with one or more failures.
pub(crate) const STATUS_SUBOPS_WARNING: u16 = 0xB000;

/// Whether a status is Pending (more responses follow).
pub fn is_pending(status: u16) -> bool {
    status == 0xFF00 || status == 0xFF01
}

/// Whether a C-STORE status means the instance was stored (success or a warning, PS3.4 B.2.3).
pub(crate) fn is_stored(status: u16) -> bool {
    status == STATUS_SUCCESS
        || status == 0x0001
        || status == 0x0107
        || status == 0x0116
        || (status & 0xF000) == 0xB000
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("malformed command set: {0}")]
    Structure(#[from] Violation),
    #[error("command set element {0} is not one PS3.7 defines")]
    Unknown(Tag),
    #[error("command set element {0} has the wrong size or form")]
    Form(Tag),
    #[error("the command group length does not match the command set")]
    GroupLength,
    #[error("the command set lacks {0}, which its command requires")]
    Missing(&'static str),
    #[error("command field {0:#06x} is not a DIMSE-C or DIMSE-N command")]
    UnknownCommand(u16),
}

/// A command set, every field read and checked. Fields not listed here are refused when read,
/// so nothing else can travel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Command {
    pub field: u16,
    pub message_id: Option<u16>,
    pub responded_to: Option<u16>,
    pub affected_sop_class: Option<String>,
    pub requested_sop_class: Option<String>,
    pub affected_sop_instance: Option<String>,
    pub requested_sop_instance: Option<String>,
    pub priority: Option<u16>,
    /// CommandDataSetType as received ([`NO_DATA_SET`] for none).
    pub data_set_type: u16,
    pub status: Option<u16>,
    pub move_destination: Option<String>,
    /// OffendingElement: tags, as their encoded bytes (a multiple of 4).
    pub offending_element: Option<Vec<u8>>,
    pub error_comment: Option<String>,
    pub error_id: Option<u16>,
    pub event_type_id: Option<u16>,
    pub attribute_identifiers: Option<Vec<u8>>,
    pub action_type_id: Option<u16>,
    /// Number of Remaining, Completed, Failed and Warning sub-operations.
    pub remaining: Option<u16>,
    pub completed: Option<u16>,
    pub failed: Option<u16>,
    pub warning: Option<u16>,
    pub move_originator_ae: Option<String>,
    pub move_originator_id: Option<u16>,
}

fn us(tag: Tag, v: &[u8]) -> Result<u16, CommandError> {
    match v {
        [a, b] => Ok(u16::from_le_bytes([*a, *b])),
        _ => Err(CommandError::Form(tag)),
    }
}

fn uid(tag: Tag, v: &[u8]) -> Result<String, CommandError> {
    match values::uid_list(v)
        .map_err(|_| CommandError::Form(tag))?
        .as_slice()
    {
        [one] => Ok(one.to_string()),
        _ => Err(CommandError::Form(tag)),
    }
}

/// An AE title: 1 to 16 printable ASCII characters without `\`, padding spaces removed.
fn ae(tag: Tag, v: &[u8]) -> Result<String, CommandError> {
    let s = values::text(v, 16).map_err(|_| CommandError::Form(tag))?;
    let s = s.trim_matches(' ');
    if s.is_empty() || s.contains('\\') {
        return Err(CommandError::Form(tag));
    }
    Ok(s.to_string())
}

fn tags_list(tag: Tag, v: &[u8]) -> Result<Vec<u8>, CommandError> {
    if !v.len().is_multiple_of(4) {
        return Err(CommandError::Form(tag));
    }
    Ok(v.to_vec())
}

impl Command {
    /// Reads a command set as some DCMTK-based PACS send it: the command group, then elements
    /// of other groups (Orthanc puts the Failed SOP Instance UID List of a C-GET response
    /// there). The command group is read by [`Command::decode`]; the rest must be a
    /// well-formed data set and is dropped (commands are always re-encoded, so it goes
    /// nowhere). Used only for what the PACS sends.
    pub fn decode_with_tail(raw: &[u8]) -> Result<Command, CommandError> {
        let group = match raw.get(..12) {
            Some([0, 0, 0, 0, 4, 0, 0, 0, a, b, c, d]) => {
                u32::from_le_bytes([*a, *b, *c, *d]) as usize
            }
            _ => return Err(CommandError::GroupLength),
        };
        let end = 12usize
            .checked_add(group)
            .filter(|e| *e <= raw.len())
            .ok_or(CommandError::GroupLength)?;
        let command = Command::decode(&raw[..end])?;
        if end < raw.len() {
            DataSet::read(&raw[end..], Encoding::ImplicitLittle, Limits::default())?;
        }
        Ok(command)
    }

    /// Reads a command set strictly: structure (the strict reader), every element known and
    /// well formed, the group length first and right, the fields its command needs present.
    pub fn decode(raw: &[u8]) -> Result<Command, CommandError> {
        let set = DataSet::read_as(
            Scope::Command,
            raw,
            Encoding::ImplicitLittle,
            Limits::default(),
        )?;
        let mut c = Command::default();
        let mut field = None;
        let mut data_set_type = None;
        let mut first = true;
        for tag in set.tags() {
            let v = set.value(tag).unwrap_or_default();
            match tag.1 {
                0x0000 => {
                    let len = match v {
                        [a, b, c, d] => u32::from_le_bytes([*a, *b, *c, *d]) as usize,
                        _ => return Err(CommandError::Form(tag)),
                    };
                    if !first || len + 12 != raw.len() {
                        return Err(CommandError::GroupLength);
                    }
                }
                0x0002 => c.affected_sop_class = Some(uid(tag, v)?),
                0x0003 => c.requested_sop_class = Some(uid(tag, v)?),
                0x0100 => field = Some(us(tag, v)?),
                0x0110 => c.message_id = Some(us(tag, v)?),
                0x0120 => c.responded_to = Some(us(tag, v)?),
                0x0600 => c.move_destination = Some(ae(tag, v)?),
                0x0700 => c.priority = Some(us(tag, v)?),
                0x0800 => data_set_type = Some(us(tag, v)?),
                0x0900 => c.status = Some(us(tag, v)?),
                0x0901 => c.offending_element = Some(tags_list(tag, v)?),
                0x0902 => {
                    let s = values::text(v, 64).map_err(|_| CommandError::Form(tag))?;
                    c.error_comment = Some(s.trim_end_matches(' ').to_string());
                }
                0x0903 => c.error_id = Some(us(tag, v)?),
                0x1000 => c.affected_sop_instance = Some(uid(tag, v)?),
                0x1001 => c.requested_sop_instance = Some(uid(tag, v)?),
                0x1002 => c.event_type_id = Some(us(tag, v)?),
                0x1005 => c.attribute_identifiers = Some(tags_list(tag, v)?),
                0x1008 => c.action_type_id = Some(us(tag, v)?),
                0x1020 => c.remaining = Some(us(tag, v)?),
                0x1021 => c.completed = Some(us(tag, v)?),
                0x1022 => c.failed = Some(us(tag, v)?),
                0x1023 => c.warning = Some(us(tag, v)?),
                0x1030 => c.move_originator_ae = Some(ae(tag, v)?),
                0x1031 => c.move_originator_id = Some(us(tag, v)?),
                _ => return Err(CommandError::Unknown(tag)),
            }
            if first && tag.1 != 0x0000 {
                return Err(CommandError::GroupLength);
            }
            first = false;
        }
        if first {
            return Err(CommandError::GroupLength);
        }
        c.field = field.ok_or(CommandError::Missing("CommandField"))?;
        c.data_set_type = data_set_type.ok_or(CommandError::Missing("CommandDataSetType"))?;
        c.check_required()?;
        Ok(c)
    }

    /// The fields PS3.7 makes mandatory for each command that the gateway relies on.
    fn check_required(&self) -> Result<(), CommandError> {
        let need = |present: bool, name| {
            if present {
                Ok(())
            } else {
                Err(CommandError::Missing(name))
            }
        };
        match self.field {
            C_STORE_RQ | C_GET_RQ | C_FIND_RQ | C_MOVE_RQ | C_ECHO_RQ => {
                need(self.message_id.is_some(), "MessageID")?;
                need(self.affected_sop_class.is_some(), "AffectedSOPClassUID")?;
                if self.field != C_ECHO_RQ {
                    need(self.priority.is_some(), "Priority")?;
                }
                if self.field == C_MOVE_RQ {
                    need(self.move_destination.is_some(), "MoveDestination")?;
                }
                if self.field == C_STORE_RQ {
                    need(
                        self.affected_sop_instance.is_some(),
                        "AffectedSOPInstanceUID",
                    )?;
                }
                Ok(())
            }
            C_CANCEL_RQ => need(self.responded_to.is_some(), "MessageIDBeingRespondedTo"),
            C_STORE_RSP | C_GET_RSP | C_FIND_RSP | C_MOVE_RSP | C_ECHO_RSP => {
                need(self.responded_to.is_some(), "MessageIDBeingRespondedTo")?;
                need(self.status.is_some(), "Status")
            }
            // DIMSE-N requests and responses (N-EVENT-REPORT .. N-DELETE): read so they can be
            // refused politely; the gateway relays none of them.
            f if (0x0100..=0x0150).contains(&(f & 0x7FFF)) && (f & 0x7FFF) % 0x10 == 0 => Ok(()),
            f => Err(CommandError::UnknownCommand(f)),
        }
    }

    /// Whether a data set follows the command.
    pub fn has_data_set(&self) -> bool {
        self.data_set_type != NO_DATA_SET
    }

    pub(crate) fn is_response(&self) -> bool {
        self.field & 0x8000 != 0
    }

    /// The command set, encoded anew from its fields.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(160);
        let mut put = |element: u16, value: &[u8], pad: u8| {
            let mut v = value.to_vec();
            if v.len() % 2 == 1 {
                v.push(pad);
            }
            body.extend_from_slice(&0u16.to_le_bytes());
            body.extend_from_slice(&element.to_le_bytes());
            body.extend_from_slice(&(v.len() as u32).to_le_bytes());
            body.extend_from_slice(&v);
        };
        let us = |v: u16| v.to_le_bytes();
        if let Some(v) = &self.affected_sop_class {
            put(0x0002, v.as_bytes(), 0);
        }
        if let Some(v) = &self.requested_sop_class {
            put(0x0003, v.as_bytes(), 0);
        }
        put(0x0100, &us(self.field), 0);
        if let Some(v) = self.message_id {
            put(0x0110, &us(v), 0);
        }
        if let Some(v) = self.responded_to {
            put(0x0120, &us(v), 0);
        }
        if let Some(v) = &self.move_destination {
            put(0x0600, v.as_bytes(), b' ');
        }
        if let Some(v) = self.priority {
            put(0x0700, &us(v), 0);
        }
        put(0x0800, &us(self.data_set_type), 0);
        if let Some(v) = self.status {
            put(0x0900, &us(v), 0);
        }
        if let Some(v) = &self.offending_element {
            put(0x0901, v, 0);
        }
        if let Some(v) = &self.error_comment {
            put(0x0902, v.as_bytes(), b' ');
        }
        if let Some(v) = self.error_id {
            put(0x0903, &us(v), 0);
        }
        if let Some(v) = &self.affected_sop_instance {
            put(0x1000, v.as_bytes(), 0);
        }
        if let Some(v) = &self.requested_sop_instance {
            put(0x1001, v.as_bytes(), 0);
        }
        if let Some(v) = self.event_type_id {
            put(0x1002, &us(v), 0);
        }
        if let Some(v) = &self.attribute_identifiers {
            put(0x1005, v, 0);
        }
        if let Some(v) = self.action_type_id {
            put(0x1008, &us(v), 0);
        }
        for (e, v) in [
            (0x1020, self.remaining),
            (0x1021, self.completed),
            (0x1022, self.failed),
            (0x1023, self.warning),
        ] {
            if let Some(v) = v {
                put(e, &us(v), 0);
            }
        }
        if let Some(v) = &self.move_originator_ae {
            put(0x1030, v.as_bytes(), b' ');
        }
        if let Some(v) = self.move_originator_id {
            put(0x1031, &us(v), 0);
        }
        let mut out = Vec::with_capacity(12 + body.len());
        out.extend_from_slice(&[0, 0, 0, 0, 4, 0, 0, 0]);
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// A response to this request with `status` and no data set (the SOP class and, for
    /// C-STORE, the instance UID echoed, as PS3.7 asks).
    pub fn response(&self, status: u16, comment: Option<&str>) -> Command {
        Command {
            field: self.field | 0x8000,
            responded_to: Some(self.message_id.unwrap_or(0)),
            affected_sop_class: self.affected_sop_class.clone(),
            affected_sop_instance: if self.field == C_STORE_RQ {
                self.affected_sop_instance.clone()
            } else {
                None
            },
            data_set_type: NO_DATA_SET,
            status: Some(status),
            // ErrorComment is LO: at most 64 printable characters, no backslash.
            error_comment: comment.map(|c| {
                c.chars()
                    .filter(|ch| (' '..='~').contains(ch) && *ch != '\\')
                    .take(64)
                    .collect()
            }),
            ..Command::default()
        }
    }

    /// A request (C-FIND-RQ, C-MOVE-RQ, C-GET-RQ, C-ECHO-RQ ...) with medium priority.
    pub fn request(field: u16, message_id: u16, sop_class: &str, with_data: bool) -> Command {
        Command {
            field,
            message_id: Some(message_id),
            affected_sop_class: Some(sop_class.to_string()),
            priority: (field != C_ECHO_RQ).then_some(0),
            data_set_type: if with_data { 0x0000 } else { NO_DATA_SET },
            ..Command::default()
        }
    }
}

/// The kind of service a presentation context's abstract syntax is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Service {
    Verification,
    Find,
    Get,
    Move,
    /// Storage SOP classes (and private SOP classes, which are storage classes in practice).
    Storage,
    /// Any other standard service (worklists, storage commitment, print ...): no DIMSE-C
    /// request of the gateway's belongs to it.
    Other,
}

pub(crate) const FIND_MODELS: &[&str] = &[
    "1.2.840.10008.5.1.4.1.2.1.1", // Patient Root
    "1.2.840.10008.5.1.4.1.2.2.1", // Study Root
    "1.2.840.10008.5.1.4.1.2.3.1", // Patient/Study Only (retired)
];
pub(crate) const GET_MODELS: &[&str] = &[
    "1.2.840.10008.5.1.4.1.2.1.3",
    "1.2.840.10008.5.1.4.1.2.2.3",
    "1.2.840.10008.5.1.4.1.2.3.3",
    "1.2.840.10008.5.1.4.1.2.4.3", // Composite Instance Root
    "1.2.840.10008.5.1.4.1.2.5.3", // Composite Instance Retrieve Without Bulk Data
];
pub(crate) const MOVE_MODELS: &[&str] = &[
    "1.2.840.10008.5.1.4.1.2.1.2",
    "1.2.840.10008.5.1.4.1.2.2.2",
    "1.2.840.10008.5.1.4.1.2.3.2",
    "1.2.840.10008.5.1.4.1.2.4.2", // Composite Instance Root
];
/// The root of the standard storage SOP classes.
const STORAGE_ROOT: &str = "1.2.840.10008.5.1.4.1.1.";
const STANDARD_ROOT: &str = "1.2.840.10008.";

impl Service {
    pub fn of(abstract_syntax: &str) -> Service {
        let a = abstract_syntax
            .strip_suffix('\0')
            .unwrap_or(abstract_syntax);
        if a == "1.2.840.10008.1.1" {
            Service::Verification
        } else if FIND_MODELS.contains(&a) {
            Service::Find
        } else if GET_MODELS.contains(&a) {
            Service::Get
        } else if MOVE_MODELS.contains(&a) {
            Service::Move
        } else if a.starts_with(STORAGE_ROOT) || !a.starts_with(STANDARD_ROOT) {
            Service::Storage
        } else {
            Service::Other
        }
    }

    /// Whether a request with this command field belongs to the service (PS3.4: C-FIND only
    /// on FIND models, C-GET on GET, C-MOVE on MOVE, C-STORE on storage, C-ECHO on
    /// Verification; C-CANCEL on the three query/retrieve kinds).
    pub(crate) fn admits(self, field: u16) -> bool {
        matches!(
            (self, field),
            (Service::Verification, C_ECHO_RQ)
                | (Service::Find, C_FIND_RQ | C_CANCEL_RQ)
                | (Service::Get, C_GET_RQ | C_CANCEL_RQ)
                | (Service::Move, C_MOVE_RQ | C_CANCEL_RQ)
                | (Service::Storage, C_STORE_RQ)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn element(e: u16, v: &[u8]) -> Vec<u8> {
        let mut out = vec![0, 0];
        out.extend_from_slice(&e.to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        out.extend_from_slice(v);
        out
    }

    /// A command set from elements as given (any order, repeats allowed), with a right
    /// group length in front.
    fn raw(elements: &[(u16, &[u8])]) -> Vec<u8> {
        let body: Vec<u8> = elements.iter().flat_map(|(e, v)| element(*e, v)).collect();
        let mut out = element(0x0000, &(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    const FIND: &[u8] = b"1.2.840.10008.5.1.4.1.2.2.1\0";

    fn find_rq() -> Vec<(u16, &'static [u8])> {
        vec![
            (0x0002, FIND),
            (0x0100, &[0x20, 0x00]),
            (0x0110, &[7, 0]),
            (0x0700, &[0, 0]),
            (0x0800, &[0, 0]),
        ]
    }

    #[test]
    fn decode_and_encode_roundtrip() {
        let c = Command::decode(&raw(&find_rq())).unwrap();
        assert_eq!(c.field, C_FIND_RQ);
        assert_eq!(c.message_id, Some(7));
        assert!(c.has_data_set());
        assert_eq!(
            c.affected_sop_class.as_deref(),
            Some("1.2.840.10008.5.1.4.1.2.2.1")
        );
        let enc = c.encode();
        assert_eq!(
            enc,
            raw(&find_rq()),
            "canonical encoding is the standard one"
        );
        assert_eq!(Command::decode(&enc).unwrap(), c);

        let r = c.response(STATUS_NOT_AUTHORIZED, Some("not\nauthorized\\"));
        let r = Command::decode(&r.encode()).unwrap();
        assert_eq!(r.field, C_FIND_RSP);
        assert_eq!(r.status, Some(STATUS_NOT_AUTHORIZED));
        assert_eq!(r.responded_to, Some(7));
        assert!(!r.has_data_set());
        assert_eq!(r.error_comment.as_deref(), Some("notauthorized"));
    }

    #[test]
    fn dicom_rs_reads_what_is_encoded() {
        use dicom_dictionary_std::tags;
        use dicom_object::InMemDicomObject;
        use dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN;
        let mut c = Command::request(C_MOVE_RQ, 9, "1.2.840.10008.5.1.4.1.2.2.2", true);
        c.move_destination = Some("DEST".into());
        let enc = c.encode();
        let obj =
            InMemDicomObject::read_dataset_with_ts(&enc[..], &IMPLICIT_VR_LITTLE_ENDIAN.erased())
                .unwrap();
        assert_eq!(
            obj.get(tags::MOVE_DESTINATION)
                .unwrap()
                .to_str()
                .unwrap()
                .trim(),
            "DEST"
        );
        assert_eq!(
            obj.get(tags::COMMAND_GROUP_LENGTH)
                .unwrap()
                .to_int::<u32>()
                .unwrap() as usize,
            enc.len() - 12
        );
        assert_eq!(Command::decode(&enc).unwrap(), c);
    }

    #[test]
    fn ambiguous_or_malformed_command_sets_are_refused() {
        let mut twice = find_rq();
        twice.push((0x0100, &[0x21, 0x00]));
        assert!(matches!(
            Command::decode(&raw(&twice)),
            Err(CommandError::Structure(Violation::OutOfOrder { .. }))
        ));
        let mut repeated = find_rq();
        repeated.insert(2, (0x0100, &[0x21, 0x00]));
        assert!(matches!(
            Command::decode(&raw(&repeated)),
            Err(CommandError::Structure(Violation::Repeated(_)))
        ));
        let mut unknown = find_rq();
        unknown.push((0x4000, b"AB"));
        assert!(matches!(
            Command::decode(&raw(&unknown)),
            Err(CommandError::Unknown(_))
        ));
        let mut short = find_rq();
        short[1] = (0x0100, &[0x20]);
        assert!(Command::decode(&raw(&short)).is_err());
        let mut padded = find_rq();
        padded[0] = (0x0002, b" 1.2.840.10008.5.1.4.1.2.2.1");
        assert!(Command::decode(&raw(&padded)).is_err());
        // group length wrong, missing, or not first
        let mut bad = raw(&find_rq());
        bad[8] ^= 2;
        assert_eq!(Command::decode(&bad), Err(CommandError::GroupLength));
        let body: Vec<u8> = find_rq().iter().flat_map(|(e, v)| element(*e, v)).collect();
        assert_eq!(Command::decode(&body), Err(CommandError::GroupLength));
        // a length running past the end
        let mut past = raw(&find_rq());
        let n = past.len();
        past[n - 6] = 0xF0;
        assert!(Command::decode(&past).is_err());
        // another group
        let mut other = raw(&find_rq());
        other.extend_from_slice(&[8, 0, 0x50, 0, 0, 0, 0, 0]);
        assert!(Command::decode(&other).is_err());
        // required fields
        let no_priority: Vec<_> = find_rq()
            .into_iter()
            .filter(|(e, _)| *e != 0x0700)
            .collect();
        assert_eq!(
            Command::decode(&raw(&no_priority)),
            Err(CommandError::Missing("Priority"))
        );
        // every truncation fails, never panics
        let good = raw(&find_rq());
        for n in 0..good.len() {
            assert!(Command::decode(&good[..n]).is_err());
        }
        assert!(is_pending(0xFF00) && is_pending(0xFF01) && !is_pending(0));
    }

    #[test]
    fn a_pacs_command_tail_of_other_groups_is_read_and_dropped() {
        let mut raw = raw(&find_rq());
        let strict = Command::decode(&raw).unwrap();
        // (0008,0058) Failed SOP Instance UID List, as DCMTK appends it
        raw.extend_from_slice(&[8, 0, 0x58, 0, 4, 0, 0, 0, b'1', b'.', b'2', 0]);
        assert!(Command::decode(&raw).is_err(), "never from a client");
        assert_eq!(Command::decode_with_tail(&raw).unwrap(), strict);
        // the tail is still read strictly
        let mut bad = raw.clone();
        bad.extend_from_slice(&[8, 0, 0x58, 0, 0, 0, 0, 0]);
        assert!(Command::decode_with_tail(&bad).is_err());
        let mut cut = raw.clone();
        cut.truncate(cut.len() - 2);
        assert!(Command::decode_with_tail(&cut).is_err());
    }

    #[test]
    fn commands_belong_to_their_sop_class() {
        let find = Service::of("1.2.840.10008.5.1.4.1.2.2.1");
        assert!(find.admits(C_FIND_RQ) && find.admits(C_CANCEL_RQ));
        assert!(!find.admits(C_MOVE_RQ) && !find.admits(C_STORE_RQ) && !find.admits(C_GET_RQ));
        let store = Service::of("1.2.840.10008.5.1.4.1.1.7");
        assert!(store.admits(C_STORE_RQ) && !store.admits(C_FIND_RQ));
        assert_eq!(Service::of("1.2.826.0.1.3680043.2.1"), Service::Storage);
        assert_eq!(Service::of("1.2.840.10008.1.1\0"), Service::Verification);
        assert_eq!(Service::of("1.2.840.10008.1.20.1"), Service::Other);
        assert!(!Service::Other.admits(C_STORE_RQ));
        assert!(Service::of("1.2.840.10008.5.1.4.1.2.2.2").admits(C_MOVE_RQ));
        assert!(Service::of("1.2.840.10008.5.1.4.1.2.1.3").admits(C_GET_RQ));
    }
}
