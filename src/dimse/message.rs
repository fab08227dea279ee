//! The DIMSE message layer: reassembly of command and data sets from P-DATA values, and
//! fragmentation of outgoing messages to the peer's maximum PDU length.
//!
//! Owns: the strict rules of PS3.7 / PS3.8 for message framing: a command comes first and ends
//! with a last-fragment flag; a data set follows only when the command announces one; every
//! fragment of one message uses one presentation context; sizes are capped. It is pure (no I/O)
//! so it can be tested and fuzzed alone. Must not know what commands mean.

use dicom_ul::pdu::{PDataValue, PDataValueType, Pdu};

/// One step of an incoming message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A complete command set (encoded, Implicit VR Little Endian). If it announces a data set,
    /// `Data` events on the same presentation context follow.
    Command { pc_id: u8, bytes: Vec<u8> },
    /// A fragment of the data set of the current message.
    Data {
        pc_id: u8,
        bytes: Vec<u8>,
        last: bool,
    },
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
        }
    }

    /// Tells the assembler whether the command it just returned announced a data set. Must be
    /// called after every `Event::Command`.
    pub fn expect_data(&mut self, pc_id: u8, has_data: bool) {
        self.state = if has_data {
            State::Data(pc_id)
        } else {
            State::Command
        };
    }

    /// Feeds one P-DATA value.
    pub fn push(&mut self, pdv: PDataValue) -> Result<Option<Event>, FramingError> {
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
                if self.command.is_empty() && pdv.is_last {
                    self.command_pc = None;
                    return Ok(Some(Event::Command {
                        pc_id: pc,
                        bytes: pdv.data,
                    }));
                }
                self.command.extend_from_slice(&pdv.data);
                if pdv.is_last {
                    self.command_pc = None;
                    let bytes = std::mem::take(&mut self.command);
                    return Ok(Some(Event::Command { pc_id: pc, bytes }));
                }
                Ok(None)
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
pub fn fragment_size(peer_max: u32) -> usize {
    let max = if peer_max == 0 {
        1 << 20
    } else {
        peer_max.min(1 << 24)
    };
    (max as usize).saturating_sub(6).max(1)
}

/// Splits one part of a message (command or data) into P-DATA-TF PDUs with one PDV each.
pub fn fragment(pc_id: u8, value_type: PDataValueType, bytes: &[u8], peer_max: u32) -> Vec<Pdu> {
    let size = fragment_size(peer_max);
    if bytes.is_empty() {
        return vec![Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc_id,
                value_type,
                is_last: true,
                data: Vec::new(),
            }],
        }];
    }
    let n = bytes.len().div_ceil(size);
    bytes
        .chunks(size)
        .enumerate()
        .map(|(i, chunk)| Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc_id,
                value_type: value_type.clone(),
                is_last: i + 1 == n,
                data: chunk.to_vec(),
            }],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pdv(pc: u8, t: PDataValueType, last: bool, data: &[u8]) -> PDataValue {
        PDataValue {
            presentation_context_id: pc,
            value_type: t,
            is_last: last,
            data: data.to_vec(),
        }
    }
    use PDataValueType::{Command as C, Data as D};

    #[test]
    fn fragmented_command_and_data_reassemble() {
        let mut a = Assembler::new(1024);
        assert_eq!(a.push(pdv(1, C, false, b"ab")).unwrap(), None);
        assert_eq!(
            a.push(pdv(1, C, true, b"cd")).unwrap(),
            Some(Event::Command {
                pc_id: 1,
                bytes: b"abcd".to_vec()
            })
        );
        a.expect_data(1, true);
        assert!(!a.is_idle());
        assert_eq!(
            a.push(pdv(1, D, false, b"x")).unwrap(),
            Some(Event::Data {
                pc_id: 1,
                bytes: b"x".to_vec(),
                last: false
            })
        );
        assert_eq!(
            a.push(pdv(1, D, true, b"y")).unwrap(),
            Some(Event::Data {
                pc_id: 1,
                bytes: b"y".to_vec(),
                last: true
            })
        );
        assert!(a.is_idle());
        // next message without data
        assert!(matches!(
            a.push(pdv(3, C, true, b"z")).unwrap(),
            Some(Event::Command { pc_id: 3, .. })
        ));
        a.expect_data(3, false);
        assert!(a.is_idle());
    }

    #[test]
    fn framing_violations_are_errors() {
        let mut a = Assembler::new(1024);
        assert_eq!(
            a.push(pdv(1, D, true, b"x")),
            Err(FramingError::UnexpectedData)
        );

        let mut a = Assembler::new(1024);
        a.push(pdv(1, C, false, b"a")).unwrap();
        assert_eq!(
            a.push(pdv(3, C, true, b"b")),
            Err(FramingError::ContextChanged {
                expected: 1,
                got: 3
            })
        );

        let mut a = Assembler::new(1024);
        a.push(pdv(1, C, false, b"a")).unwrap();
        assert_eq!(
            a.push(pdv(1, D, true, b"b")),
            Err(FramingError::DataWithoutCommand)
        );

        let mut a = Assembler::new(1024);
        a.push(pdv(1, C, true, b"a")).unwrap();
        a.expect_data(1, true);
        assert_eq!(
            a.push(pdv(1, C, true, b"b")),
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
        a.push(pdv(1, C, true, b"a")).unwrap();
        a.expect_data(1, false);
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
    }

    #[test]
    fn fragmentation_honours_peer_max() {
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let pdus = fragment(7, D, &data, 4096);
        assert_eq!(pdus.len(), 3);
        let mut joined = Vec::new();
        for (i, p) in pdus.iter().enumerate() {
            let Pdu::PData { data: pdvs } = p else {
                panic!()
            };
            assert_eq!(pdvs.len(), 1);
            assert!(pdvs[0].data.len() + 6 <= 4096);
            assert_eq!(pdvs[0].is_last, i == 2);
            assert_eq!(pdvs[0].presentation_context_id, 7);
            // the encoded PDU fits the peer's maximum
            let mut enc = Vec::new();
            dicom_ul::write_pdu(&mut enc, p).unwrap();
            assert!(enc.len() - 6 <= 4096);
            joined.extend_from_slice(&pdvs[0].data);
        }
        assert_eq!(joined, data);
        // empty part: one empty last fragment
        assert_eq!(fragment(1, C, &[], 4096).len(), 1);
        // unlimited peer
        assert_eq!(fragment(1, D, &data, 0).len(), 1);
    }

    #[test]
    fn reassembly_of_fragmented_output_roundtrips() {
        let cmd = vec![9u8; 3000];
        let data = vec![5u8; 20_000];
        let mut a = Assembler::new(DEFAULT_MAX_COMMAND);
        let mut got_cmd = None;
        let mut got_data = Vec::new();
        for p in fragment(1, C, &cmd, 1024)
            .into_iter()
            .chain(fragment(1, D, &data, 1024))
        {
            let Pdu::PData { data: pdvs } = p else {
                panic!()
            };
            for v in pdvs {
                match a.push(v).unwrap() {
                    Some(Event::Command { bytes, .. }) => {
                        a.expect_data(1, true);
                        got_cmd = Some(bytes)
                    }
                    Some(Event::Data { bytes, .. }) => got_data.extend(bytes),
                    None => {}
                }
            }
        }
        assert_eq!(got_cmd.unwrap(), cmd);
        assert_eq!(got_data, data);
        assert!(a.is_idle());
    }
}
