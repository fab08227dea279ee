//! P-DATA-TF parsing and message reassembly. The input is a byte stream cut into PDUs by
//! their own length fields, as `dicom::peer` cuts what arrives; the first byte chooses the
//! assembler's command size cap and whether command tails are tolerated (the PACS side).
//! Checks: parse_pdata agrees with dicom-ul on the PDVs when both accept; reassembled
//! commands are the strict decode of their fragments; data events carry the fragments as
//! they came; after the first error the stream ends (the association is aborted).
#![no_main]

use bytes::Bytes;
use dicom_ul::Pdu;
use dicom_ul::pdu::PDataValueType;
use libfuzzer_sys::fuzz_target;
use pacsgate::dicom::command::Command;
use pacsgate::dicom::message::{Assembler, DEFAULT_MAX_COMMAND, Event, parse_pdata};

fuzz_target!(|input: &[u8]| {
    let Some((&flags, mut rest)) = input.split_first() else {
        return;
    };
    let max = match flags & 3 {
        0 => 16,
        1 => 256,
        _ => DEFAULT_MAX_COMMAND,
    };
    let tail = flags & 4 != 0;
    let mut a = Assembler::new(max);
    if tail {
        a.tolerate_command_tail();
    }
    let mut command_bytes: Vec<u8> = Vec::new();
    let mut in_data = false;
    while rest.len() >= 6 {
        let len = u32::from_be_bytes([rest[2], rest[3], rest[4], rest[5]]) as usize;
        let total = (6 + len).min(rest.len());
        let frame = Bytes::copy_from_slice(&rest[..total]);
        rest = &rest[total..];
        let ours = parse_pdata(frame.clone());
        if total == 6 + len && frame[0] == 0x04 {
            if let (Ok(pdvs), Ok(Some(Pdu::PData { data: theirs }))) = (
                &ours,
                dicom_ul::read_pdu(&frame[..], dicom_ul::pdu::MAXIMUM_PDU_SIZE, false),
            ) {
                assert_eq!(pdvs.len(), theirs.len(), "PDV count differs from dicom-ul");
                for (o, t) in pdvs.iter().zip(theirs.iter()) {
                    assert_eq!(o.presentation_context_id, t.presentation_context_id);
                    assert_eq!(o.value_type, t.value_type);
                    assert_eq!(o.is_last, t.is_last);
                    assert_eq!(&o.data[..], &t.data[..]);
                }
            }
        }
        if pacsgate_fuzz::verbose() && ours.is_err() {
            eprintln!(
                "PDU type {:#04x}, {} bytes: {ours:?}",
                frame[0],
                frame.len()
            );
        }
        let Ok(pdvs) = ours else { continue };
        let inner: usize = pdvs.iter().map(|p| p.data.len() + 6).sum();
        assert_eq!(inner + 6, frame.len(), "the PDVs do not tile the PDU");
        for pdv in pdvs {
            let copy = pdv.clone();
            let pushed = a.push(pdv);
            if pacsgate_fuzz::verbose() {
                eprintln!(
                    "{:?} last {} {} bytes: {pushed:?}",
                    copy.value_type,
                    copy.is_last,
                    copy.data.len()
                );
            }
            match pushed {
                Err(_) => return, // the association is aborted
                Ok(None) => {
                    assert_eq!(copy.value_type, PDataValueType::Command);
                    assert!(!copy.is_last);
                    command_bytes.extend_from_slice(&copy.data);
                    assert!(command_bytes.len() <= max);
                }
                Ok(Some(Event::Command { pc_id, command })) => {
                    assert!(!in_data);
                    assert_eq!(pc_id, copy.presentation_context_id);
                    command_bytes.extend_from_slice(&copy.data);
                    let expected = if tail {
                        Command::decode_with_tail(&command_bytes)
                    } else {
                        Command::decode(&command_bytes)
                    };
                    assert_eq!(expected.as_ref(), Ok(&*command));
                    command_bytes.clear();
                    in_data = command.has_data_set();
                    assert_eq!(a.is_idle(), !in_data);
                }
                Ok(Some(Event::Data { pc_id, bytes, last })) => {
                    assert!(in_data);
                    assert_eq!(pc_id, copy.presentation_context_id);
                    assert_eq!(bytes, copy.data);
                    assert_eq!(last, copy.is_last);
                    in_data = !last;
                    assert_eq!(a.is_idle(), last);
                }
            }
        }
    }
});
