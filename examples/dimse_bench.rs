//! A minimal DIMSE load client for the benchmark (scripts/bench-dimse.sh): it measures the same
//! operations against the gateway and straight against the PACS, so the two can be compared in
//! one run. Written on pacsgate's own PDU layer so the client adds as little time as possible.
//!
//! dimse_bench --addr 127.0.0.1:11112 --called PACSGATE [--token-file F] --mode assoc|find
//!             --count N [--patient-id ID]
//! dimse_bench ... --mode store --dir DIR          (C-STORE every file of DIR, one association)
//! dimse_bench ... --mode get --study UID --sop-class UID --ts UID   (C-GET a whole study)
//! dimse_bench ... --ca CA.pem                    (any mode over DICOM TLS, the peer verified by CA)
//! Prints one JSON object: latencies in microseconds, or bytes, instances and seconds.

use dicom_core::{DataElement, PrimitiveValue, VR, dicom_value};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN;
use dicom_ul::Pdu;
use dicom_ul::pdu::{
    AssociationRQ, PresentationContextProposed, UserIdentity, UserIdentityType, UserVariableItem,
};
use pacsgate::dicom::command::{self, Command};
use pacsgate::dicom::message::Event;
use pacsgate::dicom::pdu::{read_pdu, write_pdu};
use pacsgate::dicom::peer::{Incoming, Peer, Stream};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

const VERIFICATION: &str = "1.2.840.10008.1.1";
const STUDY_FIND: &str = "1.2.840.10008.5.1.4.1.2.2.1";
const ILE: &str = "1.2.840.10008.1.2";

struct Args {
    addr: String,
    called: String,
    token: Option<String>,
    mode: String,
    count: usize,
    patient_id: String,
    dir: String,
    study: String,
    sop_class: String,
    ts: String,
    /// DICOM TLS, verifying the peer against this CA file.
    tls: Option<std::sync::Arc<pacsgate::tls::ClientTls>>,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        addr: String::new(),
        called: "PACSGATE".into(),
        token: None,
        mode: "assoc".into(),
        count: 100,
        patient_id: "BENCH".into(),
        dir: String::new(),
        study: String::new(),
        sop_class: String::new(),
        ts: String::new(),
        tls: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().ok_or(format!("{k} needs a value"))?;
        match k.as_str() {
            "--addr" => a.addr = v,
            "--called" => a.called = v,
            "--token-file" => {
                a.token = Some(
                    std::fs::read_to_string(v)
                        .map_err(|e| e.to_string())?
                        .trim()
                        .to_string(),
                )
            }
            "--mode" => a.mode = v,
            "--count" => a.count = v.parse().map_err(|_| "--count N".to_string())?,
            "--patient-id" => a.patient_id = v,
            "--dir" => a.dir = v,
            "--study" => a.study = v,
            "--sop-class" => a.sop_class = v,
            "--ts" => a.ts = v,
            "--ca" => {
                let files = pacsgate::tls::ClientFiles {
                    ca_file: v,
                    cert_file: None,
                    key_file: None,
                    alpn: Vec::new(),
                };
                let t = pacsgate::tls::ClientTls::load(&files, "127.0.0.1")
                    .map_err(|e| e.to_string())?;
                a.tls = Some(std::sync::Arc::new(t));
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    if a.addr.is_empty() {
        return Err("--addr HOST:PORT is required".into());
    }
    Ok(a)
}

fn encode(obj: &InMemDicomObject) -> Vec<u8> {
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .expect("in-memory encoding");
    out
}

fn request(field: u16, sop: &str, msg_id: u16, with_data: bool) -> Vec<u8> {
    let mut el = vec![
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(sop),
        ),
        DataElement::new(tags::COMMAND_FIELD, VR::US, dicom_value!(U16, [field])),
        DataElement::new(tags::MESSAGE_ID, VR::US, dicom_value!(U16, [msg_id])),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            dicom_value!(U16, [if with_data { 0 } else { 0x0101 }]),
        ),
    ];
    if field == command::C_FIND_RQ {
        el.push(DataElement::new(
            tags::PRIORITY,
            VR::US,
            dicom_value!(U16, [0]),
        ));
    }
    encode(&InMemDicomObject::command_from_element_iter(el))
}

async fn associate(a: &Args) -> Result<Peer, String> {
    let pcs = vec![
        PresentationContextProposed {
            id: 1,
            abstract_syntax: VERIFICATION.into(),
            transfer_syntaxes: vec![ILE.into()],
        },
        PresentationContextProposed {
            id: 3,
            abstract_syntax: STUDY_FIND.into(),
            transfer_syntaxes: vec![ILE.into()],
        },
    ];
    associate_with(a, pcs, vec![]).await
}

async fn associate_with(
    a: &Args,
    pcs: Vec<PresentationContextProposed>,
    extra: Vec<UserVariableItem>,
) -> Result<Peer, String> {
    let tcp = TcpStream::connect(&a.addr)
        .await
        .map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut s = match &a.tls {
        None => Stream::Plain(tcp),
        Some(t) => Stream::Tls(Box::new(tokio_rustls::TlsStream::Client(
            t.connect(tcp).await.map_err(|e| format!("TLS: {e}"))?,
        ))),
    };
    let mut uv = vec![
        UserVariableItem::MaxLength(65536),
        UserVariableItem::ImplementationClassUID("2.25.1".into()),
    ];
    if let Some(t) = &a.token {
        uv.push(UserVariableItem::UserIdentityItem(UserIdentity::new(
            false,
            UserIdentityType::Jwt,
            t.as_bytes().to_vec(),
            vec![],
        )));
    }
    uv.extend(extra);
    let rq = AssociationRQ {
        protocol_version: 1,
        calling_ae_title: "BENCH".into(),
        called_ae_title: a.called.clone(),
        application_context_name: "1.2.840.10008.3.1.1.1".into(),
        presentation_contexts: pcs,
        user_variables: uv,
    };
    write_pdu(&mut s, &Pdu::AssociationRQ(rq))
        .await
        .map_err(|e| e.to_string())?;
    match read_pdu(&mut s, 1 << 20).await.map_err(|e| e.to_string())? {
        Pdu::AssociationAC(ac) => {
            let max = ac
                .user_variables
                .iter()
                .find_map(|v| {
                    if let UserVariableItem::MaxLength(m) = v {
                        Some(*m)
                    } else {
                        None
                    }
                })
                .unwrap_or(16384);
            Ok(Peer::new("peer", s, 1 << 20, max))
        }
        other => Err(format!(
            "association refused: {}",
            other.short_description()
        )),
    }
}

/// Reads responses until a final one; returns the number of matches.
async fn responses(p: &mut Peer) -> Result<usize, String> {
    let mut matches = 0;
    loop {
        match p.next().await {
            Incoming::Message(Event::Command { pc_id, command: c }) => {
                if c.has_data_set() {
                    p.collect_data(pc_id, 1 << 20, Duration::from_secs(30))
                        .await
                        .map_err(|e| e.to_string())?;
                }
                let st = c.status.unwrap_or(0xC000);
                if command::is_pending(st) {
                    matches += 1;
                } else if st == 0 {
                    return Ok(matches);
                } else {
                    return Err(format!("status {st:#06x}"));
                }
            }
            other => return Err(format!("unexpected {other:?}")),
        }
    }
}

async fn release(mut p: Peer) -> Result<(), String> {
    p.send_pdu(&Pdu::ReleaseRQ)
        .await
        .map_err(|e| e.to_string())?;
    loop {
        match p.next().await {
            Incoming::ReleaseRp => return Ok(()),
            Incoming::Message(_) => continue,
            other => return Err(format!("release: {other:?}")),
        }
    }
}

fn summary(mut us: Vec<f64>, extra: &str) -> String {
    us.sort_by(|a, b| a.total_cmp(b));
    let pct = |q: f64| us[((us.len() as f64 - 1.0) * q).round() as usize];
    let mean = us.iter().sum::<f64>() / us.len() as f64;
    format!(
        "{{\"n\":{},\"p50_us\":{:.1},\"p90_us\":{:.1},\"p99_us\":{:.1},\"mean_us\":{:.1}{extra}}}",
        us.len(),
        pct(0.5),
        pct(0.9),
        pct(0.99),
        mean
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("dimse_bench: {e}");
            std::process::exit(2);
        }
    };
    let result = match a.mode.as_str() {
        "assoc" => {
            let mut us = Vec::with_capacity(a.count);
            for i in 0..a.count {
                let t = Instant::now();
                let r: Result<(), String> = async {
                    let mut p = associate(&a).await?;
                    p.send_message(
                        1,
                        &request(
                            command::C_ECHO_RQ,
                            VERIFICATION,
                            (i % 60000) as u16 + 1,
                            false,
                        ),
                        None,
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                    responses(&mut p).await?;
                    release(p).await
                }
                .await;
                if let Err(e) = r {
                    eprintln!("dimse_bench: iteration {i}: {e}");
                    std::process::exit(1);
                }
                us.push(t.elapsed().as_secs_f64() * 1e6);
            }
            summary(us, "")
        }
        "find" => {
            let mut p = match associate(&a).await {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("dimse_bench: {e}");
                    std::process::exit(1);
                }
            };
            let mut q = InMemDicomObject::new_empty();
            q.put(DataElement::new(
                tags::QUERY_RETRIEVE_LEVEL,
                VR::CS,
                PrimitiveValue::from("STUDY"),
            ));
            q.put(DataElement::new(
                tags::PATIENT_ID,
                VR::LO,
                PrimitiveValue::from(a.patient_id.as_str()),
            ));
            q.put(DataElement::new(
                tags::STUDY_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from(""),
            ));
            q.put(DataElement::new(
                tags::STUDY_DATE,
                VR::DA,
                PrimitiveValue::from(""),
            ));
            q.put(DataElement::new(
                tags::STUDY_DESCRIPTION,
                VR::LO,
                PrimitiveValue::from(""),
            ));
            q.put(DataElement::new(
                tags::ACCESSION_NUMBER,
                VR::SH,
                PrimitiveValue::from(""),
            ));
            let ident = encode(&q);
            let mut us = Vec::with_capacity(a.count);
            let mut total = 0;
            for i in 0..a.count {
                let t = Instant::now();
                let cmd = request(command::C_FIND_RQ, STUDY_FIND, (i % 60000) as u16 + 1, true);
                if let Err(e) = p.send_message(3, &cmd, Some(&ident)).await {
                    eprintln!("dimse_bench: {e}");
                    std::process::exit(1);
                }
                match responses(&mut p).await {
                    Ok(n) => total += n,
                    Err(e) => {
                        eprintln!("dimse_bench: {e}");
                        std::process::exit(1);
                    }
                }
                us.push(t.elapsed().as_secs_f64() * 1e6);
            }
            let _ = release(p).await;
            summary(
                us,
                &format!(",\"matches_per_query\":{}", total / a.count.max(1)),
            )
        }
        "store" => match store_dir(&a).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("dimse_bench: {e}");
                std::process::exit(1);
            }
        },
        "get" => match get_study(&a).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("dimse_bench: {e}");
                std::process::exit(1);
            }
        },
        other => {
            eprintln!("dimse_bench: unknown mode {other}");
            std::process::exit(2);
        }
    };
    println!("{result}");
}

/// A Part 10 file: its SOP class, instance, transfer syntax and where the data set starts.
struct Part10 {
    sop_class: String,
    sop_instance: String,
    ts: String,
    bytes: Vec<u8>,
    data_start: usize,
}

fn read_part10(path: &std::path::Path) -> Result<Part10, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.len() < 144 || &bytes[128..132] != b"DICM" {
        return Err(format!("{}: not a DICOM file", path.display()));
    }
    // File meta: explicit VR little endian, starting with (0002,0000) group length.
    let group_len = u32::from_le_bytes([bytes[140], bytes[141], bytes[142], bytes[143]]) as usize;
    let data_start = 144 + group_len;
    let (mut sop_class, mut sop_instance, mut ts) = (String::new(), String::new(), String::new());
    let mut i = 144;
    while i + 8 <= data_start {
        let element = u16::from_le_bytes([bytes[i + 2], bytes[i + 3]]);
        let vr = &bytes[i + 4..i + 6];
        let (len, head) = if matches!(vr, b"OB" | b"OW" | b"OF" | b"SQ" | b"UT" | b"UN") {
            (
                u32::from_le_bytes([bytes[i + 8], bytes[i + 9], bytes[i + 10], bytes[i + 11]])
                    as usize,
                12,
            )
        } else {
            (u16::from_le_bytes([bytes[i + 6], bytes[i + 7]]) as usize, 8)
        };
        let v = String::from_utf8_lossy(&bytes[i + head..i + head + len])
            .trim_end_matches(['\0', ' '])
            .to_string();
        match element {
            0x0002 => sop_class = v,
            0x0003 => sop_instance = v,
            0x0010 => ts = v,
            _ => {}
        }
        i += head + len;
    }
    Ok(Part10 {
        sop_class,
        sop_instance,
        ts,
        bytes,
        data_start,
    })
}

async fn store_dir(a: &Args) -> Result<String, String> {
    let mut files: Vec<_> = std::fs::read_dir(&a.dir)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    let first = read_part10(files.first().ok_or("no files")?)?;
    let pcs = vec![PresentationContextProposed {
        id: 1,
        abstract_syntax: first.sop_class.clone(),
        transfer_syntaxes: vec![first.ts.clone()],
    }];
    let mut p = associate_with(a, pcs, vec![]).await?;
    let t = Instant::now();
    let (mut total, mut n) = (0usize, 0usize);
    for (i, f) in files.iter().enumerate() {
        let part = read_part10(f)?;
        let cmd = encode(&InMemDicomObject::command_from_element_iter([
            DataElement::new(
                tags::AFFECTED_SOP_CLASS_UID,
                VR::UI,
                PrimitiveValue::from(part.sop_class.as_str()),
            ),
            DataElement::new(
                tags::COMMAND_FIELD,
                VR::US,
                dicom_value!(U16, [command::C_STORE_RQ]),
            ),
            DataElement::new(
                tags::MESSAGE_ID,
                VR::US,
                dicom_value!(U16, [(i % 60000) as u16 + 1]),
            ),
            DataElement::new(tags::PRIORITY, VR::US, dicom_value!(U16, [0])),
            DataElement::new(tags::COMMAND_DATA_SET_TYPE, VR::US, dicom_value!(U16, [0])),
            DataElement::new(
                tags::AFFECTED_SOP_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from(part.sop_instance.as_str()),
            ),
        ]));
        p.send_command(1, &cmd).await.map_err(|e| e.to_string())?;
        let data = &part.bytes[part.data_start..];
        let chunks: Vec<&[u8]> = data.chunks(64 * 1024).collect();
        for (j, c) in chunks.iter().enumerate() {
            p.send_data(1, c, j + 1 == chunks.len())
                .await
                .map_err(|e| e.to_string())?;
        }
        responses(&mut p).await?;
        total += data.len();
        n += 1;
    }
    let secs = t.elapsed().as_secs_f64();
    let _ = release(p).await;
    Ok(format!(
        "{{\"instances\":{n},\"bytes\":{total},\"seconds\":{secs:.4}}}"
    ))
}

async fn get_study(a: &Args) -> Result<String, String> {
    const STUDY_GET: &str = "1.2.840.10008.5.1.4.1.2.2.3";
    let pcs = vec![
        PresentationContextProposed {
            id: 1,
            abstract_syntax: STUDY_GET.into(),
            transfer_syntaxes: vec![ILE.into()],
        },
        PresentationContextProposed {
            id: 3,
            abstract_syntax: a.sop_class.clone(),
            transfer_syntaxes: vec![a.ts.clone()],
        },
    ];
    let role = UserVariableItem::ScuScpRoleSelectionSubItem(
        a.sop_class.clone(),
        dicom_ul::pdu::RequestorRoles {
            scu: false,
            scp: true,
        },
    );
    let mut p = associate_with(a, pcs, vec![role]).await?;
    let mut q = InMemDicomObject::new_empty();
    q.put(DataElement::new(
        tags::QUERY_RETRIEVE_LEVEL,
        VR::CS,
        PrimitiveValue::from("STUDY"),
    ));
    q.put(DataElement::new(
        tags::STUDY_INSTANCE_UID,
        VR::UI,
        PrimitiveValue::from(a.study.as_str()),
    ));
    let t = Instant::now();
    let cmd = Command::request(command::C_GET_RQ, 1, STUDY_GET, true).encode();
    p.send_message(1, &cmd, Some(&encode(&q)))
        .await
        .map_err(|e| e.to_string())?;
    let (mut total, mut n) = (0usize, 0usize);
    loop {
        match p.next().await {
            Incoming::Message(Event::Command { pc_id, command: c }) => match c.field {
                command::C_STORE_RQ => {
                    loop {
                        let (chunk, last) = p
                            .next_fragment(pc_id, Duration::from_secs(60))
                            .await
                            .map_err(|e| e.to_string())?;
                        total += chunk.len();
                        if last {
                            break;
                        }
                    }
                    n += 1;
                    let rsp = c.response(0, None).encode();
                    p.send_message(pc_id, &rsp, None)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                command::C_GET_RSP => {
                    if c.has_data_set() {
                        p.collect_data(pc_id, 1 << 20, Duration::from_secs(60))
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                    let st = c.status.unwrap_or(0xC000);
                    if !command::is_pending(st) {
                        if st != 0 {
                            return Err(format!("C-GET final status {st:#06x}"));
                        }
                        break;
                    }
                }
                other => return Err(format!("unexpected command {other:?}")),
            },
            other => return Err(format!("unexpected {other:?}")),
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let _ = release(p).await;
    Ok(format!(
        "{{\"instances\":{n},\"bytes\":{total},\"seconds\":{secs:.4}}}"
    ))
}
