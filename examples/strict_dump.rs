//! The strict reader's view of Part 10 files, for `scripts/differential.py`.
//!
//! `strict_dump FILE...` (or file names one per line on stdin when none are given) prints one
//! JSON object per file: `{"file":..,"accepted":true,"PatientID":..,"IssuerOfPatientID":..,
//! "StudyInstanceUID":..,"SeriesInstanceUID":..,"SOPInstanceUID":..,"SOPClassUID":..,
//! "TransferSyntaxUID":..}` with the values as `InstanceReader::part10` reports them (null when
//! absent; text values keep their padding), or `{"file":..,"accepted":false,"reason":..}`.
//! The file is fed in pieces of 4 KiB, the head asked for after each, as the front ends do.

use pacsgate::dicom::head::{InstanceHead, InstanceReader};
use pacsgate::dicom::reader::{Limits, Violation};
use serde_json::json;
use std::io::{BufRead, Write};

fn read(bytes: &[u8]) -> Result<(InstanceHead, String), Violation> {
    let mut r = InstanceReader::part10(Limits::default());
    let mut early: Option<InstanceHead> = None;
    for piece in bytes.chunks(4096) {
        r.feed(piece)?;
        if early.is_none() {
            early = r.head()?;
        }
    }
    r.finish()?;
    let head = r.head()?.ok_or(Violation::Truncated)?;
    if let Some(e) = early {
        // what a front end judged on is what the whole instance says
        assert_eq!(e, head, "early head differs from the final head");
    }
    let ts = r
        .meta()
        .map(|m| m.transfer_syntax.clone())
        .unwrap_or_default();
    Ok((head, ts))
}

fn dump(path: &str, out: &mut impl Write) -> std::io::Result<()> {
    let line = match std::fs::read(path) {
        Err(e) => json!({"file": path, "accepted": false, "reason": format!("unreadable: {e}")}),
        Ok(bytes) => match read(&bytes) {
            Ok((h, ts)) => json!({
                "file": path,
                "accepted": true,
                "PatientID": h.patient_id,
                "IssuerOfPatientID": h.issuer,
                "StudyInstanceUID": h.study,
                "SeriesInstanceUID": h.series,
                "SOPInstanceUID": h.sop_instance,
                "SOPClassUID": h.sop_class,
                "TransferSyntaxUID": ts,
            }),
            Err(v) => json!({"file": path, "accepted": false, "reason": v.to_string()}),
        },
    };
    writeln!(out, "{line}")
}

fn main() -> std::io::Result<()> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() {
        for line in std::io::stdin().lock().lines() {
            let line = line?;
            if !line.is_empty() {
                dump(&line, &mut out)?;
            }
        }
    } else {
        for a in &args {
            dump(a, &mut out)?;
        }
    }
    out.flush()
}
