//! A fast DIMSE origin for the benchmarks (scripts/bench-dimse.sh, bench-transfer.sh,
//! bench-dicomweb.sh): it stands where the PACS stands, so that the gateway's own cost shows
//! without the PACS's. It accepts every association and every presentation context, and:
//!
//! - answers C-ECHO;
//! - reads C-STORE data and discards it, answering success;
//! - answers C-FIND: a query whose level key names UIDs (StudyInstanceUID at STUDY,
//!   SeriesInstanceUID at SERIES, SOPInstanceUID at IMAGE; the gateway's ownership look-ups)
//!   gets one match per UID it holds, with that UID, its patient and its parents' UIDs (a UID
//!   it does not hold gets no match, as from a PACS that does not hold it); any other query
//!   gets `--matches` canned matches for the query's PatientID (or `--patient`);
//! - serves C-GET (STUDY, SERIES or IMAGE level) from the instances it holds in memory, as
//!   C-STORE sub-operations on the same association.
//!
//! bench_origin_dimse --listen 127.0.0.1:PORT [--dir DIR]... [--index DIR]...
//!                    [--patient ID] [--matches N] [--max-pdu N]
//!
//! --dir: Part 10 files (searched recursively) held in memory, for C-GET and look-ups;
//! --index: Part 10 files whose UIDs are known to the look-ups, their data not kept.
//! The listener opens once everything is loaded. Written on dicom-ul's PDU codec and its own
//! P-DATA framing, so that the origin costs as little as possible; it uses nothing of pacsgate.

use dicom_core::header::Header;
use dicom_core::{DataElement, PrimitiveValue, Tag, VR, dicom_value};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::{
    EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN,
};
use dicom_ul::Pdu;
use dicom_ul::pdu::{
    AssociationAC, AssociationRQ, PresentationContextResult, PresentationContextResultReason,
    UserVariableItem,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

const ILE: &str = "1.2.840.10008.1.2";
const ELE: &str = "1.2.840.10008.1.2.1";
const C_STORE_RQ: u16 = 0x0001;
const C_GET_RQ: u16 = 0x0010;
const C_FIND_RQ: u16 = 0x0020;
const C_ECHO_RQ: u16 = 0x0030;
const C_CANCEL_RQ: u16 = 0x0FFF;
const C_STORE_RSP: u16 = 0x8001;
const NO_DATA_SET: u16 = 0x0101;
const PENDING: u16 = 0xFF00;
/// The largest PDU read from a peer, whatever it announced.
const MAX_READ_PDU: usize = 4 << 20;
/// Encoded canned C-FIND answers kept at most (they are cleared when full).
const CACHE_ENTRIES: usize = 4096;

/// Encoded C-FIND matches.
type Answers = Arc<Vec<Vec<u8>>>;

/// One instance: who it is, and its data set (without the file meta) when held.
struct Instance {
    patient: String,
    study: String,
    series: String,
    sop_class: String,
    sop_instance: String,
    ts: String,
    data: Option<Vec<u8>>,
}

struct Store {
    instances: Vec<Instance>,
    by_study: HashMap<String, Vec<usize>>,
    by_series: HashMap<String, Vec<usize>>,
    by_sop: HashMap<String, usize>,
    patient: String,
    matches: usize,
    max_pdu: u32,
    /// Canned C-FIND answers by (transfer syntax, identifier bytes).
    cache: Mutex<HashMap<(bool, Vec<u8>), Answers>>,
}

fn args() -> Result<(String, Store, Vec<PathBuf>, Vec<PathBuf>), String> {
    let mut listen = String::new();
    let (mut dirs, mut index) = (Vec::new(), Vec::new());
    let mut store = Store {
        instances: Vec::new(),
        by_study: HashMap::new(),
        by_series: HashMap::new(),
        by_sop: HashMap::new(),
        patient: "BENCH".into(),
        matches: 100,
        max_pdu: 65536,
        cache: Mutex::new(HashMap::new()),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().ok_or(format!("{k} needs a value"))?;
        match k.as_str() {
            "--listen" => listen = v,
            "--dir" => dirs.push(PathBuf::from(v)),
            "--index" => index.push(PathBuf::from(v)),
            "--patient" => store.patient = v,
            "--matches" => store.matches = v.parse().map_err(|_| "--matches N")?,
            "--max-pdu" => store.max_pdu = v.parse().map_err(|_| "--max-pdu N")?,
            other => return Err(format!("unknown option {other}")),
        }
    }
    if listen.is_empty() {
        return Err("--listen HOST:PORT is required".into());
    }
    Ok((listen, store, dirs, index))
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            files(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

fn text(o: &InMemDicomObject, tag: Tag) -> String {
    o.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
        .unwrap_or_default()
}

/// Reads a Part 10 file's identity (and keeps its data set when `keep`).
fn load(path: &Path, keep: bool) -> Result<Instance, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.len() < 144 || &bytes[128..132] != b"DICM" {
        return Err(format!("{}: not a DICOM Part 10 file", path.display()));
    }
    // The file meta opens with its group length, (0002,0000) UL.
    let group_len = u32::from_le_bytes([bytes[140], bytes[141], bytes[142], bytes[143]]) as usize;
    let data_start = 144 + group_len;
    let obj = dicom_object::OpenFileOptions::new()
        .read_until(tags::PIXEL_DATA)
        .from_reader(&bytes[128..])
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let ts = obj
        .meta()
        .transfer_syntax()
        .trim_end_matches('\0')
        .to_string();
    Ok(Instance {
        patient: text(&obj, tags::PATIENT_ID),
        study: text(&obj, tags::STUDY_INSTANCE_UID),
        series: text(&obj, tags::SERIES_INSTANCE_UID),
        sop_class: text(&obj, tags::SOP_CLASS_UID),
        sop_instance: text(&obj, tags::SOP_INSTANCE_UID),
        ts,
        data: keep.then(|| bytes[data_start..].to_vec()),
    })
}

impl Store {
    fn add(&mut self, i: Instance) {
        let n = self.instances.len();
        self.by_study.entry(i.study.clone()).or_default().push(n);
        self.by_series.entry(i.series.clone()).or_default().push(n);
        self.by_sop.insert(i.sop_instance.clone(), n);
        self.instances.push(i);
    }

    /// The instances a retrieval identifier names (the lowest level given wins).
    fn select(&self, q: &InMemDicomObject) -> Vec<usize> {
        let uids = |t| -> Vec<String> {
            text(q, t)
                .split('\\')
                .filter(|u| !u.is_empty())
                .map(str::to_string)
                .collect()
        };
        let (st, se, sop) = (
            uids(tags::STUDY_INSTANCE_UID),
            uids(tags::SERIES_INSTANCE_UID),
            uids(tags::SOP_INSTANCE_UID),
        );
        if !sop.is_empty() {
            sop.iter()
                .filter_map(|u| self.by_sop.get(u).copied())
                .collect()
        } else if !se.is_empty() {
            se.iter()
                .flat_map(|u| self.by_series.get(u).cloned().unwrap_or_default())
                .collect()
        } else {
            st.iter()
                .flat_map(|u| self.by_study.get(u).cloned().unwrap_or_default())
                .collect()
        }
    }

    /// The matches of a C-FIND identifier, encoded.
    fn find(&self, q: &InMemDicomObject, explicit: bool) -> Answers {
        let level = text(q, tags::QUERY_RETRIEVE_LEVEL);
        let key = match level.as_str() {
            "STUDY" => Some(tags::STUDY_INSTANCE_UID),
            "SERIES" => Some(tags::SERIES_INSTANCE_UID),
            "IMAGE" => Some(tags::SOP_INSTANCE_UID),
            _ => None,
        };
        let named: Vec<String> = key
            .map(|k| {
                text(q, k)
                    .split('\\')
                    .filter(|u| !u.is_empty() && !u.contains(['*', '?']))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        if !named.is_empty() {
            // Ownership look-ups: one match per held UID, its identity from the instance.
            let mut out = Vec::new();
            for uid in named {
                let held = match level.as_str() {
                    "STUDY" => self.by_study.get(&uid).and_then(|v| v.first().copied()),
                    "SERIES" => self.by_series.get(&uid).and_then(|v| v.first().copied()),
                    _ => self.by_sop.get(&uid).copied(),
                };
                if let Some(n) = held {
                    let i = &self.instances[n];
                    let fill = |t: Tag| -> Option<String> {
                        Some(match t {
                            tags::PATIENT_ID => i.patient.clone(),
                            tags::STUDY_INSTANCE_UID => i.study.clone(),
                            tags::SERIES_INSTANCE_UID => i.series.clone(),
                            tags::SOP_INSTANCE_UID => i.sop_instance.clone(),
                            tags::SOP_CLASS_UID => i.sop_class.clone(),
                            tags::STUDY_DATE => "20250101".into(),
                            tags::MODALITIES_IN_STUDY | tags::MODALITY => "OT".into(),
                            _ => return None,
                        })
                    };
                    out.push(answer(q, &level, explicit, fill));
                }
            }
            return Arc::new(out);
        }
        let cache_key = (explicit, encode(q, explicit));
        if let Some(hit) = self.cache.lock().unwrap().get(&cache_key) {
            return hit.clone();
        }
        let pid = text(q, tags::PATIENT_ID);
        let pid = if pid.is_empty() || pid.contains(['*', '?']) {
            self.patient.clone()
        } else {
            pid
        };
        let out: Vec<Vec<u8>> = (0..self.matches)
            .map(|n| {
                let fill = |t: Tag| -> Option<String> {
                    Some(match t {
                        tags::PATIENT_ID => pid.clone(),
                        tags::PATIENT_NAME => format!("{pid}^CANNED"),
                        tags::STUDY_INSTANCE_UID => format!("2.25.{}", 1_000_000 + n),
                        tags::SERIES_INSTANCE_UID => format!("2.25.{}", 2_000_000 + n),
                        tags::SOP_INSTANCE_UID => format!("2.25.{}", 3_000_000 + n),
                        tags::STUDY_DATE => "20250101".into(),
                        tags::STUDY_TIME => "120000".into(),
                        tags::STUDY_DESCRIPTION => format!("canned study {n}"),
                        tags::ACCESSION_NUMBER => format!("A{n}"),
                        tags::MODALITIES_IN_STUDY | tags::MODALITY => "OT".into(),
                        _ => return None,
                    })
                };
                answer(q, &level, explicit, fill)
            })
            .collect();
        let mut cache = self.cache.lock().unwrap();
        if cache.len() >= CACHE_ENTRIES {
            cache.clear();
        }
        let out = Arc::new(out);
        cache.insert(cache_key, out.clone());
        out
    }
}

/// A match: every key of the query, with the value `fill` gives (or the query's own, or empty).
fn answer(
    q: &InMemDicomObject,
    level: &str,
    explicit: bool,
    fill: impl Fn(Tag) -> Option<String>,
) -> Vec<u8> {
    let mut o = InMemDicomObject::new_empty();
    for e in q.iter() {
        let t = e.tag();
        let v = if t == tags::QUERY_RETRIEVE_LEVEL {
            level.to_string()
        } else if let Some(v) = fill(t) {
            v
        } else if e.vr() == VR::SQ {
            continue;
        } else {
            text(q, t)
        };
        o.put(DataElement::new(t, e.vr(), PrimitiveValue::from(v)));
    }
    encode(&o, explicit)
}

fn encode(o: &InMemDicomObject, explicit: bool) -> Vec<u8> {
    let ts = if explicit {
        EXPLICIT_VR_LITTLE_ENDIAN.erased()
    } else {
        IMPLICIT_VR_LITTLE_ENDIAN.erased()
    };
    let mut out = Vec::new();
    o.write_dataset_with_ts(&mut out, &ts)
        .expect("in-memory encoding");
    out
}

fn decode(bytes: &[u8], explicit: bool) -> Result<InMemDicomObject, String> {
    let ts = if explicit {
        EXPLICIT_VR_LITTLE_ENDIAN.erased()
    } else {
        IMPLICIT_VR_LITTLE_ENDIAN.erased()
    };
    InMemDicomObject::read_dataset_with_ts(bytes, &ts).map_err(|e| e.to_string())
}

fn us(o: &InMemDicomObject, t: Tag) -> Option<u16> {
    o.get(t).and_then(|e| e.to_int::<u16>().ok())
}

/// A response command (or a sub-operation request): the elements given, encoded.
fn command(el: Vec<DataElement<InMemDicomObject>>) -> Vec<u8> {
    encode(&InMemDicomObject::command_from_element_iter(el), false)
}

fn response(
    rq: &InMemDicomObject,
    status: u16,
    with_data: bool,
    extra: Vec<DataElement<InMemDicomObject>>,
) -> Vec<u8> {
    let field = us(rq, tags::COMMAND_FIELD).unwrap_or(0) | 0x8000;
    let mut el = vec![
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(text(rq, tags::AFFECTED_SOP_CLASS_UID)),
        ),
        DataElement::new(tags::COMMAND_FIELD, VR::US, dicom_value!(U16, [field])),
        DataElement::new(
            tags::MESSAGE_ID_BEING_RESPONDED_TO,
            VR::US,
            dicom_value!(U16, [us(rq, tags::MESSAGE_ID).unwrap_or(0)]),
        ),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            dicom_value!(U16, [if with_data { 0 } else { NO_DATA_SET }]),
        ),
        DataElement::new(tags::STATUS, VR::US, dicom_value!(U16, [status])),
    ];
    el.extend(extra);
    command(el)
}

/// One association's two halves and what was negotiated.
struct Conn {
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
    /// Presentation context id → (abstract syntax, transfer syntax).
    pcs: HashMap<u8, (String, String)>,
    /// Data per PDV toward the peer.
    chunk: usize,
    buf: Vec<u8>,
    out: Vec<u8>,
}

enum In {
    /// A PDV: context, command?, last?, and where its bytes are in `buf`.
    Pdvs(Vec<(u8, bool, bool, std::ops::Range<usize>)>),
    Release,
    End,
}

impl Conn {
    async fn read_pdu(&mut self) -> std::io::Result<(u8, usize)> {
        let mut h = [0u8; 6];
        self.rd.read_exact(&mut h).await?;
        let len = u32::from_be_bytes([h[2], h[3], h[4], h[5]]) as usize;
        if len > MAX_READ_PDU {
            return Err(std::io::Error::other("PDU too large"));
        }
        self.buf.clear();
        self.buf.extend_from_slice(&h);
        self.buf.resize(6 + len, 0);
        self.rd.read_exact(&mut self.buf[6..]).await?;
        Ok((h[0], len))
    }

    async fn next(&mut self) -> Result<In, String> {
        let (ty, len) = match self.read_pdu().await {
            Ok(x) => x,
            Err(_) => return Ok(In::End),
        };
        match ty {
            0x04 => {
                let mut pdvs = Vec::new();
                let mut i = 6;
                while i + 6 <= 6 + len {
                    let l = u32::from_be_bytes(self.buf[i..i + 4].try_into().unwrap()) as usize;
                    if l < 2 || i + 4 + l > 6 + len {
                        return Err("malformed PDV".into());
                    }
                    let (pc, flags) = (self.buf[i + 4], self.buf[i + 5]);
                    pdvs.push((pc, flags & 1 != 0, flags & 2 != 0, i + 6..i + 4 + l));
                    i += 4 + l;
                }
                Ok(In::Pdvs(pdvs))
            }
            0x05 => Ok(In::Release),
            _ => Ok(In::End),
        }
    }

    /// Reads one whole message: its command, and its data set unless `discard`.
    async fn message(&mut self, discard_data: bool) -> Result<Option<Message>, String> {
        let mut cmd = Vec::new();
        let mut data = Vec::new();
        let mut command: Option<InMemDicomObject> = None;
        loop {
            let pdvs = match self.next().await? {
                In::Pdvs(p) => p,
                In::Release => {
                    let mut rp = Vec::new();
                    dicom_ul::pdu::write_pdu(&mut rp, &Pdu::ReleaseRP)
                        .map_err(|e| e.to_string())?;
                    let _ = self.wr.write_all(&rp).await;
                    return Ok(None);
                }
                In::End => return Ok(None),
            };
            for (pc, is_cmd, last, r) in pdvs {
                if is_cmd {
                    cmd.extend_from_slice(&self.buf[r]);
                    if last {
                        let c = decode(&cmd, false)?;
                        let has_data = us(&c, tags::COMMAND_DATA_SET_TYPE) != Some(NO_DATA_SET);
                        if !has_data {
                            return Ok(Some(Message {
                                pc_id: pc,
                                command: c,
                                data,
                            }));
                        }
                        command = Some(c);
                    }
                } else {
                    if !discard_data
                        || command.as_ref().and_then(|c| us(c, tags::COMMAND_FIELD))
                            != Some(C_STORE_RQ)
                    {
                        data.extend_from_slice(&self.buf[r]);
                    }
                    if last {
                        let Some(c) = command.take() else {
                            return Err("data set without a command".into());
                        };
                        return Ok(Some(Message {
                            pc_id: pc,
                            command: c,
                            data,
                        }));
                    }
                }
            }
        }
    }

    /// Sends one message (command, then data set) in PDUs no larger than the peer takes, after
    /// whatever was queued.
    async fn send(&mut self, pc_id: u8, cmd: &[u8], data: Option<&[u8]>) -> std::io::Result<()> {
        pdv(&mut self.out, pc_id, 0x03, cmd);
        if let Some(d) = data {
            let chunks: Vec<&[u8]> = d.chunks(self.chunk.max(1)).collect();
            if chunks.is_empty() {
                pdv(&mut self.out, pc_id, 0x02, &[]);
            }
            for (n, c) in chunks.iter().enumerate() {
                pdv(
                    &mut self.out,
                    pc_id,
                    if n + 1 == chunks.len() { 0x02 } else { 0 },
                    c,
                );
                if self.out.len() >= 256 * 1024 {
                    self.wr.write_all(&self.out).await?;
                    self.out.clear();
                }
            }
        }
        self.wr.write_all(&self.out).await?;
        self.out.clear();
        Ok(())
    }
}

impl Conn {
    /// Queues a small message (command, and a data set that fits one PDV) for the next send.
    fn queue(&mut self, pc_id: u8, cmd: &[u8], data: &[u8]) {
        pdv(&mut self.out, pc_id, 0x03, cmd);
        pdv(&mut self.out, pc_id, 0x02, data);
    }
}

/// Appends a P-DATA-TF PDU holding one PDV.
fn pdv(out: &mut Vec<u8>, pc_id: u8, flags: u8, data: &[u8]) {
    let item = data.len() as u32 + 2;
    out.extend_from_slice(&[0x04, 0]);
    out.extend_from_slice(&(item + 4).to_be_bytes());
    out.extend_from_slice(&item.to_be_bytes());
    out.extend_from_slice(&[pc_id, flags]);
    out.extend_from_slice(data);
}

struct Message {
    pc_id: u8,
    command: InMemDicomObject,
    data: Vec<u8>,
}

fn accept(rq: &AssociationRQ, our_max: u32) -> (AssociationAC, HashMap<u8, (String, String)>) {
    let mut pcs = HashMap::new();
    let mut results = Vec::new();
    for pc in &rq.presentation_contexts {
        let offered: Vec<String> = pc
            .transfer_syntaxes
            .iter()
            .map(|t| t.trim_end_matches('\0').to_string())
            .collect();
        let ts = [ELE, ILE]
            .iter()
            .find(|t| offered.iter().any(|o| o == *t))
            .map(|t| t.to_string())
            .or_else(|| offered.first().cloned())
            .unwrap_or_else(|| ILE.to_string());
        pcs.insert(
            pc.id,
            (
                pc.abstract_syntax.trim_end_matches('\0').to_string(),
                ts.clone(),
            ),
        );
        results.push(PresentationContextResult {
            id: pc.id,
            reason: PresentationContextResultReason::Acceptance,
            transfer_syntax: ts,
        });
    }
    let mut user_variables = vec![
        UserVariableItem::MaxLength(our_max),
        UserVariableItem::ImplementationClassUID("2.25.271828182845904523536".into()),
        UserVariableItem::ImplementationVersionName("BENCH_ORIGIN".into()),
    ];
    for v in &rq.user_variables {
        if let UserVariableItem::ScuScpRoleSelectionSubItem(..) = v {
            user_variables.push(v.clone());
        }
    }
    (
        AssociationAC {
            protocol_version: 1,
            calling_ae_title: rq.calling_ae_title.clone(),
            called_ae_title: rq.called_ae_title.clone(),
            application_context_name: rq.application_context_name.clone(),
            presentation_contexts: results,
            user_variables,
        },
        pcs,
    )
}

async fn serve(stream: TcpStream, store: Arc<Store>) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    let mut c = Conn {
        rd: BufReader::with_capacity(256 * 1024, rd),
        wr,
        pcs: HashMap::new(),
        chunk: 16384,
        buf: Vec::with_capacity(store.max_pdu as usize + 64),
        out: Vec::new(),
    };
    let (ty, _) = c.read_pdu().await.map_err(|e| e.to_string())?;
    if ty != 0x01 {
        return Err("expected an A-ASSOCIATE-RQ".into());
    }
    let rq = match dicom_ul::pdu::read_pdu(&c.buf[..], MAX_READ_PDU as u32, false) {
        Ok(Some(Pdu::AssociationRQ(rq))) => rq,
        other => return Err(format!("association request not read: {other:?}")),
    };
    let peer_max = rq
        .user_variables
        .iter()
        .find_map(|v| match v {
            UserVariableItem::MaxLength(m) => Some(*m as usize),
            _ => None,
        })
        .unwrap_or(16384);
    let peer_max = if peer_max == 0 {
        1 << 20
    } else {
        peer_max.min(1 << 20)
    };
    c.chunk = peer_max.saturating_sub(6).max(1);
    let (ac, pcs) = accept(&rq, store.max_pdu);
    c.pcs = pcs;
    let mut out = Vec::new();
    dicom_ul::pdu::write_pdu(&mut out, &Pdu::AssociationAC(ac)).map_err(|e| e.to_string())?;
    c.wr.write_all(&out).await.map_err(|e| e.to_string())?;

    while let Some(m) = c.message(true).await? {
        let field = us(&m.command, tags::COMMAND_FIELD).unwrap_or(0);
        let explicit = c.pcs.get(&m.pc_id).map(|p| p.1 == ELE).unwrap_or(false);
        let io = |e: std::io::Error| e.to_string();
        match field {
            C_ECHO_RQ => {
                let rsp = response(&m.command, 0, false, vec![]);
                c.send(m.pc_id, &rsp, None).await.map_err(io)?;
            }
            C_STORE_RQ => {
                let rsp = response(
                    &m.command,
                    0,
                    false,
                    vec![DataElement::new(
                        tags::AFFECTED_SOP_INSTANCE_UID,
                        VR::UI,
                        PrimitiveValue::from(text(&m.command, tags::AFFECTED_SOP_INSTANCE_UID)),
                    )],
                );
                c.send(m.pc_id, &rsp, None).await.map_err(io)?;
            }
            C_FIND_RQ => {
                let q = decode(&m.data, explicit)?;
                // Every answer in one write: the pending responses share their command.
                let pending = response(&m.command, PENDING, true, vec![]);
                for ds in store.find(&q, explicit).iter() {
                    if ds.len() + 6 <= c.chunk {
                        c.queue(m.pc_id, &pending, ds);
                    } else {
                        c.send(m.pc_id, &pending, Some(ds)).await.map_err(io)?;
                    }
                }
                let rsp = response(&m.command, 0, false, vec![]);
                c.send(m.pc_id, &rsp, None).await.map_err(io)?;
            }
            C_GET_RQ => {
                let q = decode(&m.data, explicit)?;
                get(&mut c, &store, &m, &q).await?;
            }
            C_CANCEL_RQ => {}
            _ => {
                let rsp = response(&m.command, 0x0211, false, vec![]);
                c.send(m.pc_id, &rsp, None).await.map_err(io)?;
            }
        }
    }
    Ok(())
}

fn counts(remaining: usize, done: usize, failed: usize) -> Vec<DataElement<InMemDicomObject>> {
    [
        (tags::NUMBER_OF_REMAINING_SUBOPERATIONS, remaining),
        (tags::NUMBER_OF_COMPLETED_SUBOPERATIONS, done),
        (tags::NUMBER_OF_FAILED_SUBOPERATIONS, failed),
        (tags::NUMBER_OF_WARNING_SUBOPERATIONS, 0),
    ]
    .into_iter()
    .map(|(t, n)| DataElement::new(t, VR::US, dicom_value!(U16, [n.min(65535) as u16])))
    .collect()
}

/// C-GET: every selected instance as a C-STORE sub-operation, each answered before the next.
async fn get(c: &mut Conn, store: &Store, m: &Message, q: &InMemDicomObject) -> Result<(), String> {
    let io = |e: std::io::Error| e.to_string();
    let selected = store.select(q);
    let (mut done, mut failed) = (0, 0);
    for (n, &k) in selected.iter().enumerate() {
        let i = &store.instances[k];
        let pc = c
            .pcs
            .iter()
            .find(|(_, (a, t))| *a == i.sop_class && *t == i.ts)
            .map(|(id, _)| *id);
        match (pc, &i.data) {
            (Some(pc), Some(data)) => {
                let rq = command(vec![
                    DataElement::new(
                        tags::AFFECTED_SOP_CLASS_UID,
                        VR::UI,
                        PrimitiveValue::from(i.sop_class.as_str()),
                    ),
                    DataElement::new(tags::COMMAND_FIELD, VR::US, dicom_value!(U16, [C_STORE_RQ])),
                    DataElement::new(
                        tags::MESSAGE_ID,
                        VR::US,
                        dicom_value!(U16, [(n % 60000) as u16 + 1]),
                    ),
                    DataElement::new(tags::PRIORITY, VR::US, dicom_value!(U16, [0])),
                    DataElement::new(tags::COMMAND_DATA_SET_TYPE, VR::US, dicom_value!(U16, [0])),
                    DataElement::new(
                        tags::AFFECTED_SOP_INSTANCE_UID,
                        VR::UI,
                        PrimitiveValue::from(i.sop_instance.as_str()),
                    ),
                ]);
                c.send(pc, &rq, Some(data)).await.map_err(io)?;
                let Some(rsp) = c.message(false).await? else {
                    return Ok(());
                };
                let ok = us(&rsp.command, tags::COMMAND_FIELD) == Some(C_STORE_RSP)
                    && us(&rsp.command, tags::STATUS) == Some(0);
                if ok {
                    done += 1;
                } else {
                    failed += 1;
                }
            }
            _ => failed += 1,
        }
        let rsp = response(
            &m.command,
            PENDING,
            false,
            counts(selected.len() - n - 1, done, failed),
        );
        c.send(m.pc_id, &rsp, None).await.map_err(io)?;
    }
    let status = if failed == 0 { 0 } else { 0xB000 };
    let rsp = response(&m.command, status, false, counts(0, done, failed));
    c.send(m.pc_id, &rsp, None).await.map_err(io)
}

#[tokio::main]
async fn main() {
    let (listen, mut store, dirs, index) = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench_origin_dimse: {e}");
            std::process::exit(2);
        }
    };
    for (list, keep) in [(&dirs, true), (&index, false)] {
        for d in list {
            let mut paths = Vec::new();
            if let Err(e) = files(d, &mut paths) {
                eprintln!("bench_origin_dimse: {}: {e}", d.display());
                std::process::exit(1);
            }
            paths.sort();
            for p in paths {
                match load(&p, keep) {
                    Ok(i) => store.add(i),
                    Err(e) => {
                        eprintln!("bench_origin_dimse: {e}");
                        std::process::exit(1);
                    }
                }
            }
        }
    }
    let listener = match TcpListener::bind(&listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("bench_origin_dimse: {listen}: {e}");
            std::process::exit(1);
        }
    };
    eprintln!(
        "bench_origin_dimse: {} instances ({} held), listening on {listen}",
        store.instances.len(),
        store.instances.iter().filter(|i| i.data.is_some()).count()
    );
    let store = Arc::new(store);
    loop {
        let Ok((s, _)) = listener.accept().await else {
            continue;
        };
        let store = store.clone();
        tokio::spawn(async move {
            if let Err(e) = serve(s, store).await {
                eprintln!("bench_origin_dimse: association ended: {e}");
            }
        });
    }
}
