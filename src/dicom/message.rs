//! The DIMSE message layer: reassembly of command and data sets from P-DATA values, and
//! fragmentation of outgoing messages to the peer's maximum PDU length.
//!
//! Owns: the strict rules of PS3.7 / PS3.8 for message framing: a command comes first and ends
//! with a last-fragment flag; a data set follows only when the command announces one; every
//! fragment of one message uses one presentation context; sizes are capped. A complete command
//! set is read here by the strict command reader, so whether a data set follows is known at
//! once, even when the data set's first fragment sits in the same P-DATA-TF PDU (PS3.8 9.3.5
//! allows several PDVs per PDU). It is pure (no I/O) so it can be tested and fuzzed alone.
//! Must not know what commands mean.

use crate::dicom::command::{Command, CommandError};
use bytes::Bytes;
use dicom_ul::pdu::PDataValueType;

/// One presentation data value of a P-DATA-TF PDU. The data is a view into the received PDU,
/// so relaying it copies nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pdv {
    pub presentation_context_id: u8,
    pub value_type: PDataValueType,
    pub is_last: bool,
    pub data: Bytes,
}

/// Parses the PDVs of a whole P-DATA-TF PDU (header included), without copying their data.
pub fn parse_pdata(frame: Bytes) -> Result<Vec<Pdv>, String> {
    if frame.len() < 6 || frame[0] != 0x04 {
        return Err("not a P-DATA-TF PDU".into());
    }
    let end = frame.len();
    let mut pos = 6;
    let mut out = Vec::new();
    while pos < end {
        if end - pos < 6 {
            return Err("truncated PDV item".into());
        }
        let len = u32::from_be_bytes([frame[pos], frame[pos + 1], frame[pos + 2], frame[pos + 3]])
            as usize;
        if len < 2 || len > end - pos - 4 {
            return Err(format!("PDV item length {len} does not fit the PDU"));
        }
        let control = frame[pos + 5];
        out.push(Pdv {
            presentation_context_id: frame[pos + 4],
            value_type: if control & 0x01 != 0 {
                PDataValueType::Command
            } else {
                PDataValueType::Data
            },
            is_last: control & 0x02 != 0,
            data: frame.slice(pos + 6..pos + 4 + len),
        });
        pos += 4 + len;
    }
    if out.is_empty() {
        return Err("P-DATA-TF without any PDV".into());
    }
    Ok(out)
}

/// Appends P-DATA-TF PDUs (one PDV each) carrying `bytes` to `out`, fragmented to the peer's
/// maximum; `last` sets the last-fragment flag on the final one.
pub(crate) fn encode_fragments(
    out: &mut Vec<u8>,
    pc_id: u8,
    value_type: PDataValueType,
    bytes: &[u8],
    peer_max: u32,
    last: bool,
) {
    let size = fragment_size(peer_max);
    let n = bytes.len().div_ceil(size).max(1);
    for i in 0..n {
        let chunk = &bytes[(i * size).min(bytes.len())..((i + 1) * size).min(bytes.len())];
        let is_last = last && i + 1 == n;
        let control = match value_type {
            PDataValueType::Command => 0x01,
            PDataValueType::Data => 0x00,
        } | if is_last { 0x02 } else { 0x00 };
        let item_len = (chunk.len() + 2) as u32;
        out.reserve(12 + chunk.len());
        out.extend_from_slice(&[0x04, 0x00]);
        out.extend_from_slice(&(item_len + 4).to_be_bytes());
        out.extend_from_slice(&item_len.to_be_bytes());
        out.extend_from_slice(&[pc_id, control]);
        out.extend_from_slice(chunk);
    }
}

/// One step of an incoming message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A complete command set, read strictly. If it announces a data set, `Data` events on
    /// the same presentation context follow.
    Command { pc_id: u8, command: Box<Command> },
    /// A fragment of the data set of the current message.
    Data { pc_id: u8, bytes: Bytes, last: bool },
}

/// A framing rule was broken; the association must be aborted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("data fragment received before any command")]
    DataWithoutCommand,
    #[error("command fragment received while the data set of the previous message was incomplete")]
    CommandDuringData,
    #[error("fragment on presentation context {got} inside a message on context {expected}")]
    ContextChanged { expected: u8, got: u8 },
    #[error("command set larger than {0} bytes")]
    CommandTooLarge(usize),
    #[error("data fragment received for a message that announced no data set")]
    UnexpectedData,
    #[error("{0}")]
    Command(#[from] CommandError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for (more of) a command.
    Command,
    /// The last command announced a data set on this context; its fragments are expected.
    Data(u8),
}

/// Reassembles messages from P-DATA values.
#[derive(Debug)]
pub struct Assembler {
    state: State,
    command: Vec<u8>,
    command_pc: Option<u8>,
    max_command: usize,
    /// Command sets may carry a tail of other groups (see [`Command::decode_with_tail`]):
    /// only for what the PACS sends.
    tail_tolerated: bool,
}

/// The largest command set accepted; real ones are a few hundred bytes.
pub const DEFAULT_MAX_COMMAND: usize = 64 * 1024;

impl Assembler {
    pub fn new(max_command: usize) -> Self {
        Assembler {
            state: State::Command,
            command: Vec::new(),
            command_pc: None,
            max_command,
            tail_tolerated: false,
        }
    }

    /// Reads this peer's command sets with [`Command::decode_with_tail`] (the PACS's side).
    pub fn tolerate_command_tail(&mut self) {
        self.tail_tolerated = true;
    }

    fn decode(&self, raw: &[u8]) -> Result<Command, CommandError> {
        if self.tail_tolerated {
            Command::decode_with_tail(raw)
        } else {
            Command::decode(raw)
        }
    }

    /// Feeds one P-DATA value.
    pub fn push(&mut self, pdv: Pdv) -> Result<Option<Event>, FramingError> {
        let pc = pdv.presentation_context_id;
        match (pdv.value_type, self.state) {
            (PDataValueType::Command, State::Data(_)) => Err(FramingError::CommandDuringData),
            (PDataValueType::Command, State::Command) => {
                if let Some(expected) = self.command_pc
                    && expected != pc
                {
                    return Err(FramingError::ContextChanged { expected, got: pc });
                }
                if self.command.len() + pdv.data.len() > self.max_command {
                    return Err(FramingError::CommandTooLarge(self.max_command));
                }
                self.command_pc = Some(pc);
                if !pdv.is_last {
                    self.command.extend_from_slice(&pdv.data);
                    return Ok(None);
                }
                self.command_pc = None;
                let command = if self.command.is_empty() {
                    self.decode(&pdv.data)?
                } else {
                    self.command.extend_from_slice(&pdv.data);
                    let c = self.decode(&self.command);
                    self.command.clear();
                    c?
                };
                if command.has_data_set() {
                    self.state = State::Data(pc);
                }
                Ok(Some(Event::Command {
                    pc_id: pc,
                    command: Box::new(command),
                }))
            }
            (PDataValueType::Data, State::Command) => {
                if self.command_pc.is_some() {
                    Err(FramingError::DataWithoutCommand)
                } else {
                    Err(FramingError::UnexpectedData)
                }
            }
            (PDataValueType::Data, State::Data(expected)) => {
                if expected != pc {
                    return Err(FramingError::ContextChanged { expected, got: pc });
                }
                if pdv.is_last {
                    self.state = State::Command;
                }
                Ok(Some(Event::Data {
                    pc_id: pc,
                    bytes: pdv.data,
                    last: pdv.is_last,
                }))
            }
        }
    }

    /// True when no message is half-received.
    pub fn is_idle(&self) -> bool {
        self.state == State::Command && self.command.is_empty()
    }
}

/// The largest PDV payload for a peer that announced `peer_max` (0: no limit, so a sane one is
/// chosen). The P-DATA-TF length counts the 6-byte PDV header (length, context id, control).
pub(crate) fn fragment_size(peer_max: u32) -> usize {
    let max = if peer_max == 0 {
        1 << 20
    } else {
        peer_max.min(1 << 24)
    };
    (max as usize).saturating_sub(6).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pdv(pc: u8, t: PDataValueType, last: bool, data: &[u8]) -> Pdv {
        Pdv {
            presentation_context_id: pc,
            value_type: t,
            is_last: last,
            data: Bytes::copy_from_slice(data),
        }
    }
    use PDataValueType::{Command as C, Data as D};

    /// An encoded C-FIND-RQ (with a data set) or C-ECHO-RQ (without).
    fn cmd(with_data: bool) -> Vec<u8> {
        use crate::dicom::command::{C_ECHO_RQ, C_FIND_RQ};
        if with_data {
            Command::request(C_FIND_RQ, 1, "1.2.840.10008.5.1.4.1.2.2.1", true).encode()
        } else {
            Command::request(C_ECHO_RQ, 1, "1.2.840.10008.1.1", false).encode()
        }
    }

    fn decoded(with_data: bool) -> Command {
        Command::decode(&cmd(with_data)).unwrap()
    }

    fn data(pc: u8, b: &[u8], last: bool) -> Event {
        Event::Data {
            pc_id: pc,
            bytes: Bytes::copy_from_slice(b),
            last,
        }
    }

    #[test]
    fn fragmented_command_and_data_reassemble() {
        let find = cmd(true);
        let mut a = Assembler::new(1024);
        assert_eq!(a.push(pdv(1, C, false, &find[..10])).unwrap(), None);
        assert_eq!(
            a.push(pdv(1, C, true, &find[10..])).unwrap(),
            Some(Event::Command {
                pc_id: 1,
                command: Box::new(decoded(true))
            })
        );
        assert!(!a.is_idle());
        assert_eq!(
            a.push(pdv(1, D, false, b"x")).unwrap(),
            Some(data(1, b"x", false))
        );
        assert_eq!(
            a.push(pdv(1, D, true, b"y")).unwrap(),
            Some(data(1, b"y", true))
        );
        assert!(a.is_idle());
        assert!(matches!(
            a.push(pdv(3, C, true, &cmd(false))).unwrap(),
            Some(Event::Command { pc_id: 3, .. })
        ));
        assert!(a.is_idle());
    }

    #[test]
    fn framing_violations_are_errors() {
        let (find, echo) = (cmd(true), cmd(false));
        let mut a = Assembler::new(1024);
        assert_eq!(
            a.push(pdv(1, D, true, b"x")),
            Err(FramingError::UnexpectedData)
        );

        let mut a = Assembler::new(1024);
        a.push(pdv(1, C, false, &find[..4])).unwrap();
        assert_eq!(
            a.push(pdv(3, C, true, &find[4..])),
            Err(FramingError::ContextChanged {
                expected: 1,
                got: 3
            })
        );

        let mut a = Assembler::new(1024);
        a.push(pdv(1, C, false, &find[..4])).unwrap();
        assert_eq!(
            a.push(pdv(1, D, true, b"b")),
            Err(FramingError::DataWithoutCommand)
        );

        let mut a = Assembler::new(1024);
        a.push(pdv(1, C, true, &find)).unwrap();
        assert_eq!(
            a.push(pdv(1, C, true, &echo)),
            Err(FramingError::CommandDuringData)
        );
        assert_eq!(
            a.push(pdv(5, D, true, b"b")),
            Err(FramingError::ContextChanged {
                expected: 1,
                got: 5
            })
        );

        let mut a = Assembler::new(1024);
        a.push(pdv(1, C, true, &echo)).unwrap();
        assert_eq!(
            a.push(pdv(1, D, true, b"b")),
            Err(FramingError::UnexpectedData)
        );

        let mut a = Assembler::new(4);
        a.push(pdv(1, C, false, b"abc")).unwrap();
        assert_eq!(
            a.push(pdv(1, C, true, b"de")),
            Err(FramingError::CommandTooLarge(4))
        );

        // a malformed command set is a framing error: the association is aborted
        let mut a = Assembler::new(1024);
        let mut twice = find.clone();
        twice.extend_from_slice(&echo[12..]);
        assert!(matches!(
            a.push(pdv(1, C, true, &twice)),
            Err(FramingError::Command(_))
        ));
    }

    #[test]
    fn a_command_and_its_data_set_in_one_pdu() {
        let mut out = Vec::new();
        let find = cmd(true);
        // One P-DATA-TF with the command and two data fragments (PS3.8 9.3.5).
        let items: Vec<(u8, &[u8])> = vec![(0x03, &find), (0x00, b"ab"), (0x02, b"cd")];
        let body: Vec<u8> = items
            .iter()
            .flat_map(|(control, d)| {
                let mut v = ((d.len() + 2) as u32).to_be_bytes().to_vec();
                v.extend_from_slice(&[1, *control]);
                v.extend_from_slice(d);
                v
            })
            .collect();
        out.extend_from_slice(&[0x04, 0]);
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        let mut a = Assembler::new(1024);
        let events: Vec<Event> = parse_pdata(Bytes::from(out))
            .unwrap()
            .into_iter()
            .filter_map(|p| a.push(p).unwrap())
            .collect();
        assert_eq!(events.len(), 3);
        assert!(matches!(&events[0], Event::Command { .. }));
        assert_eq!(events[2], data(1, b"cd", true));
        assert!(a.is_idle());
    }

    /// Splits an encoded byte stream into PDUs by their length fields.
    fn pdus(mut b: &[u8]) -> Vec<Bytes> {
        let mut v = Vec::new();
        while !b.is_empty() {
            let len = u32::from_be_bytes([b[2], b[3], b[4], b[5]]) as usize;
            v.push(Bytes::copy_from_slice(&b[..6 + len]));
            b = &b[6 + len..];
        }
        v
    }

    #[test]
    fn fragmentation_honours_peer_max_and_matches_dicom_rs() {
        let payload: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let mut out = Vec::new();
        encode_fragments(&mut out, 7, D, &payload, 4096, true);
        let frames = pdus(&out);
        assert_eq!(frames.len(), 3);
        let mut joined = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            assert!(f.len() - 6 <= 4096, "the PDU fits the peer's maximum");
            // dicom-rs reads what the gateway writes
            let Some(dicom_ul::Pdu::PData { data: theirs }) =
                dicom_ul::read_pdu(&f[..], 1 << 20, true).unwrap()
            else {
                panic!("not P-DATA")
            };
            let ours = parse_pdata(f.clone()).unwrap();
            assert_eq!(ours.len(), 1);
            assert_eq!(theirs[0].data, ours[0].data.to_vec());
            assert_eq!(theirs[0].is_last, i == 2);
            assert_eq!(ours[0].is_last, i == 2);
            assert_eq!(ours[0].presentation_context_id, 7);
            assert_eq!(ours[0].value_type, D);
            joined.extend_from_slice(&ours[0].data);
        }
        assert_eq!(joined, payload);
        // an empty part is one empty fragment; without `last`, no fragment carries the flag
        let mut out = Vec::new();
        encode_fragments(&mut out, 1, C, &[], 4096, true);
        let p = parse_pdata(Bytes::from(out)).unwrap();
        assert!(p[0].is_last && p[0].data.is_empty() && p[0].value_type == C);
        let mut out = Vec::new();
        encode_fragments(&mut out, 1, D, &payload, 4096, false);
        assert!(
            pdus(&out)
                .into_iter()
                .all(|f| !parse_pdata(f).unwrap()[0].is_last)
        );
        // an unlimited peer gets one fragment
        let mut out = Vec::new();
        encode_fragments(&mut out, 1, D, &payload, 0, true);
        assert_eq!(pdus(&out).len(), 1);
    }

    #[test]
    fn pdata_written_by_dicom_rs_parses_and_garbage_does_not() {
        let pdu = dicom_ul::Pdu::PData {
            data: vec![
                dicom_ul::pdu::PDataValue {
                    presentation_context_id: 3,
                    value_type: C,
                    is_last: true,
                    data: b"cmd".to_vec(),
                },
                dicom_ul::pdu::PDataValue {
                    presentation_context_id: 3,
                    value_type: D,
                    is_last: false,
                    data: b"data".to_vec(),
                },
            ],
        };
        let mut enc = Vec::new();
        dicom_ul::write_pdu(&mut enc, &pdu).unwrap();
        let p = parse_pdata(Bytes::from(enc.clone())).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(
            (&p[0].data[..], p[0].value_type.clone(), p[0].is_last),
            (&b"cmd"[..], C, true)
        );
        assert_eq!(
            (&p[1].data[..], p[1].value_type.clone(), p[1].is_last),
            (&b"data"[..], D, false)
        );
        // every truncation or corruption of the item length is an error, never a panic
        for n in 0..enc.len() {
            let _ = parse_pdata(Bytes::copy_from_slice(&enc[..n]));
        }
        let mut bad = enc.clone();
        bad[6..10].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_pdata(Bytes::from(bad)).is_err());
        let mut bad = enc;
        bad[6..10].copy_from_slice(&1u32.to_be_bytes());
        assert!(parse_pdata(Bytes::from(bad)).is_err());
        assert!(parse_pdata(Bytes::from_static(&[0x04, 0, 0, 0, 0, 0])).is_err());
    }

    #[test]
    fn reassembly_of_fragmented_output_roundtrips() {
        let c = cmd(true);
        let payload = vec![5u8; 20_000];
        let mut out = Vec::new();
        encode_fragments(&mut out, 1, C, &c, 64, true);
        encode_fragments(&mut out, 1, D, &payload, 1024, true);
        let mut a = Assembler::new(DEFAULT_MAX_COMMAND);
        let mut got_cmd = None;
        let mut got_data = Vec::new();
        for f in pdus(&out) {
            for v in parse_pdata(f).unwrap() {
                match a.push(v).unwrap() {
                    Some(Event::Command { command, .. }) => got_cmd = Some(command),
                    Some(Event::Data { bytes, .. }) => got_data.extend_from_slice(&bytes),
                    None => {}
                }
            }
        }
        assert_eq!(*got_cmd.unwrap(), decoded(true));
        assert_eq!(got_data, payload);
        assert!(a.is_idle());
    }
}
