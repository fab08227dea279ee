//! A fast DICOMweb origin for the benchmark (scripts/bench-dicomweb.sh): it stands where the
//! PACS's DICOMweb service stands, so that the gateway's own cost shows without the PACS's.
//! Everything is answered from memory:
//!
//! - WADO-RS `GET {root}/studies/{study}[/series/{series}[/instances/{sop}]]`: the instances
//!   as multipart/related; type="application/dicom", each part the Part 10 file as loaded;
//! - `.../metadata` at the same three levels: DICOM JSON of the instances' identity;
//! - QIDO-RS `GET {root}/studies?PatientID=..[&StudyInstanceUID=..]`: DICOM JSON, one object
//!   per study (other keys are ignored; no PatientID means every study).
//!
//! bench_origin_web --listen 127.0.0.1:PORT --dir DIR [--dir DIR]... [--root /dicom-web]
//!
//! Part 10 files are searched recursively; the listener opens once everything is loaded. It
//! uses nothing of pacsgate.

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::serve::ListenerExt;
use bytes::Bytes;
use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const BOUNDARY: &str = "bench-origin-0f3c2a9d6e7b4181";

struct Instance {
    study: String,
    series: String,
    sop: String,
    /// The Part 10 file, from its preamble.
    file: Bytes,
    /// One DICOM JSON object, serialized.
    metadata: String,
}

struct Study {
    patient: String,
    /// One QIDO-RS study object, serialized.
    qido: String,
    instances: Vec<usize>,
}

struct Origin {
    root: String,
    instances: Vec<Instance>,
    studies: BTreeMap<String, Study>,
}

fn text(o: &InMemDicomObject, tag: Tag) -> String {
    o.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
        .unwrap_or_default()
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

fn attr(vr: &str, v: &str) -> Value {
    if v.is_empty() {
        json!({ "vr": vr })
    } else if vr == "PN" {
        json!({ "vr": vr, "Value": [{ "Alphabetic": v }] })
    } else if vr == "IS" || vr == "US" {
        match v.parse::<i64>() {
            Ok(n) => json!({ "vr": vr, "Value": [n] }),
            Err(_) => json!({ "vr": vr }),
        }
    } else {
        json!({ "vr": vr, "Value": v.split('\\').collect::<Vec<_>>() })
    }
}

fn load(dirs: &[PathBuf], root: String) -> Result<Origin, String> {
    let mut paths = Vec::new();
    for d in dirs {
        files(d, &mut paths).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    paths.sort();
    let mut o = Origin {
        root,
        instances: Vec::new(),
        studies: BTreeMap::new(),
    };
    // Per study: patient, date, time, accession, modalities, series and instance counts.
    let mut facts: HashMap<String, (InMemDicomObject, Vec<String>, Vec<String>)> = HashMap::new();
    for p in paths {
        let bytes = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        if bytes.len() < 132 || &bytes[128..132] != b"DICM" {
            return Err(format!("{}: not a DICOM Part 10 file", p.display()));
        }
        let obj = dicom_object::OpenFileOptions::new()
            .read_until(tags::PIXEL_DATA)
            .from_reader(&bytes[128..])
            .map_err(|e| format!("{}: {e}", p.display()))?;
        let ds: InMemDicomObject = (*obj).clone();
        let t = |tag| text(&ds, tag);
        let mut m = serde_json::Map::new();
        for (tag, key, vr) in [
            (tags::SPECIFIC_CHARACTER_SET, "00080005", "CS"),
            (tags::SOP_CLASS_UID, "00080016", "UI"),
            (tags::SOP_INSTANCE_UID, "00080018", "UI"),
            (tags::STUDY_DATE, "00080020", "DA"),
            (tags::STUDY_TIME, "00080030", "TM"),
            (tags::ACCESSION_NUMBER, "00080050", "SH"),
            (tags::MODALITY, "00080060", "CS"),
            (tags::PATIENT_NAME, "00100010", "PN"),
            (tags::PATIENT_ID, "00100020", "LO"),
            (tags::STUDY_INSTANCE_UID, "0020000D", "UI"),
            (tags::SERIES_INSTANCE_UID, "0020000E", "UI"),
            (tags::STUDY_ID, "00200010", "SH"),
            (tags::SERIES_NUMBER, "00200011", "IS"),
            (tags::INSTANCE_NUMBER, "00200013", "IS"),
            (tags::ROWS, "00280010", "US"),
            (tags::COLUMNS, "00280011", "US"),
        ] {
            if ds.get(tag).is_some() {
                m.insert(key.into(), attr(vr, &t(tag)));
            }
        }
        let (study, series, sop) = (
            t(tags::STUDY_INSTANCE_UID),
            t(tags::SERIES_INSTANCE_UID),
            t(tags::SOP_INSTANCE_UID),
        );
        let f = facts
            .entry(study.clone())
            .or_insert_with(|| (ds.clone(), Vec::new(), Vec::new()));
        if !f.1.contains(&series) {
            f.1.push(series.clone());
        }
        let modality = t(tags::MODALITY);
        if !modality.is_empty() && !f.2.contains(&modality) {
            f.2.push(modality);
        }
        let n = o.instances.len();
        o.studies
            .entry(study.clone())
            .or_insert_with(|| Study {
                patient: t(tags::PATIENT_ID),
                qido: String::new(),
                instances: Vec::new(),
            })
            .instances
            .push(n);
        o.instances.push(Instance {
            study,
            series,
            sop,
            file: Bytes::from(bytes),
            metadata: Value::Object(m).to_string(),
        });
    }
    for (uid, s) in o.studies.iter_mut() {
        let (ds, series, modalities) = &facts[uid];
        let t = |tag| text(ds, tag);
        s.qido = json!({
            "00080005": attr("CS", &t(tags::SPECIFIC_CHARACTER_SET)),
            "00080020": attr("DA", &t(tags::STUDY_DATE)),
            "00080030": attr("TM", &t(tags::STUDY_TIME)),
            "00080050": attr("SH", &t(tags::ACCESSION_NUMBER)),
            "00080061": attr("CS", &modalities.join("\\")),
            "00100010": attr("PN", &t(tags::PATIENT_NAME)),
            "00100020": attr("LO", &s.patient),
            "0020000D": attr("UI", uid),
            "00200010": attr("SH", &t(tags::STUDY_ID)),
            "00201206": attr("IS", &series.len().to_string()),
            "00201208": attr("IS", &s.instances.len().to_string()),
        })
        .to_string();
    }
    Ok(o)
}

fn query_pairs(q: &str) -> Vec<(String, String)> {
    url::form_urlencoded::parse(q.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn dicom_json(objects: impl Iterator<Item = String>) -> Response {
    let mut body = String::from("[");
    for (n, o) in objects.enumerate() {
        if n > 0 {
            body.push(',');
        }
        body.push_str(&o);
    }
    body.push(']');
    let mut r = Response::new(Body::from(body));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/dicom+json"),
    );
    r
}

fn multipart(o: &Origin, selected: &[usize]) -> Response {
    let mut chunks: Vec<Bytes> = Vec::with_capacity(selected.len() * 3 + 1);
    for &k in selected {
        let f = &o.instances[k].file;
        chunks.push(Bytes::from(format!(
            "--{BOUNDARY}\r\nContent-Type: application/dicom\r\nContent-Length: {}\r\n\r\n",
            f.len()
        )));
        chunks.push(f.clone());
        chunks.push(Bytes::from_static(b"\r\n"));
    }
    chunks.push(Bytes::from(format!("--{BOUNDARY}--\r\n")));
    let len: usize = chunks.iter().map(Bytes::len).sum();
    let stream = futures_util::stream::iter(chunks.into_iter().map(Ok::<_, std::io::Error>));
    let mut r = Response::new(Body::from_stream(stream));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&format!(
            "multipart/related; type=\"application/dicom\"; boundary={BOUNDARY}"
        ))
        .expect("a valid header"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    r
}

async fn handle(State(o): State<Arc<Origin>>, req: Request) -> Response {
    let path = req.uri().path();
    let Some(rest) = path.strip_prefix(o.root.as_str()) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let (segs, metadata) = match segs.split_last() {
        Some((&"metadata", head)) => (head.to_vec(), true),
        _ => (segs, false),
    };
    match segs.as_slice() {
        ["studies"] if !metadata => {
            let pairs = query_pairs(req.uri().query().unwrap_or(""));
            let wanted = |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(k))
                    .map(|(_, v)| v.clone())
            };
            let (pid, uid) = (
                wanted("PatientID").or(wanted("00100020")),
                wanted("StudyInstanceUID").or(wanted("0020000D")),
            );
            let matching: Vec<String> = o
                .studies
                .iter()
                .filter(|(u, s)| {
                    pid.as_ref().is_none_or(|p| *p == s.patient)
                        && uid.as_ref().is_none_or(|x| x.split(',').any(|x| x == *u))
                })
                .map(|(_, s)| s.qido.clone())
                .collect();
            if matching.is_empty() {
                return StatusCode::NO_CONTENT.into_response();
            }
            dicom_json(matching.into_iter())
        }
        ["studies", study, tail @ ..] => {
            let Some(s) = o.studies.get(*study) else {
                return StatusCode::NOT_FOUND.into_response();
            };
            let selected: Vec<usize> = match tail {
                [] => s.instances.clone(),
                ["series", se] => s
                    .instances
                    .iter()
                    .copied()
                    .filter(|&k| o.instances[k].series == *se)
                    .collect(),
                ["series", se, "instances", sop] => s
                    .instances
                    .iter()
                    .copied()
                    .filter(|&k| o.instances[k].series == *se && o.instances[k].sop == *sop)
                    .collect(),
                _ => return StatusCode::NOT_FOUND.into_response(),
            };
            if selected.is_empty() {
                return StatusCode::NOT_FOUND.into_response();
            }
            debug_assert!(selected.iter().all(|&k| o.instances[k].study == *study));
            if metadata {
                dicom_json(selected.iter().map(|&k| o.instances[k].metadata.clone()))
            } else {
                multipart(&o, &selected)
            }
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

#[tokio::main]
async fn main() {
    let (mut listen, mut dirs, mut root) = (String::new(), Vec::new(), "/dicom-web".to_string());
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let Some(v) = it.next() else {
            eprintln!("bench_origin_web: {k} needs a value");
            std::process::exit(2);
        };
        match k.as_str() {
            "--listen" => listen = v,
            "--dir" => dirs.push(PathBuf::from(v)),
            "--root" => root = v.trim_end_matches('/').to_string(),
            other => {
                eprintln!("bench_origin_web: unknown option {other}");
                std::process::exit(2);
            }
        }
    }
    if listen.is_empty() {
        eprintln!("bench_origin_web: --listen HOST:PORT is required");
        std::process::exit(2);
    }
    let origin = match load(&dirs, root) {
        Ok(o) => Arc::new(o),
        Err(e) => {
            eprintln!("bench_origin_web: {e}");
            std::process::exit(1);
        }
    };
    let listener = match tokio::net::TcpListener::bind(&listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("bench_origin_web: {listen}: {e}");
            std::process::exit(1);
        }
    };
    eprintln!(
        "bench_origin_web: {} instances in {} studies, listening on {listen}",
        origin.instances.len(),
        origin.studies.len()
    );
    let app = Router::new().fallback(handle).with_state(origin);
    let listener = listener.tap_io(|s| {
        let _ = s.set_nodelay(true);
    });
    if let Err(e) = axum::serve(listener, app).await {
        eprintln!("bench_origin_web: {e}");
        std::process::exit(1);
    }
}
