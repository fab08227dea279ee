//! The DIMSE relay against a scripted PACS that misbehaves on purpose, with dicom-rs's own
//! association client as the viewer. Orthanc's matching is well-behaved enough that the
//! gateway's second line of defence (checking every match) never fires against it; here the PACS
//! returns other patients' matches, fragments with a tiny maximum PDU, hangs, or is absent.

use dicom_core::{DataElement, PrimitiveValue, Tag, VR, dicom_value};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::{
    EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN,
};
use dicom_ul::ClientAssociationOptions;
use dicom_ul::association::client::AsyncClientAssociation;
use dicom_ul::pdu::{
    AssociationAC, AssociationRJResult, PDataValue, PDataValueType, Pdu, PresentationContextResult,
    PresentationContextResultReason, RequestorRoles, UserVariableItem,
};
use jsonwebtoken::Algorithm;
use pacsgate::config::Config;
use pacsgate::devissuer::{DevIssuer, DevKey, MintRequest};
use pacsgate::dicom::command;
use pacsgate::dicom::{
    message::Event,
    pdu::{read_pdu, write_pdu},
    peer::{Incoming, Peer},
};
use pacsgate::dimse;
use pacsgate::pacs::PacsLookup;
use pacsgate::policy::{Policy, Ports};
use pacsgate::trust::TrustCore;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

const FIND: &str = "1.2.840.10008.5.1.4.1.2.2.1";
const ELE: &str = "1.2.840.10008.1.2.1";

/// What the scripted PACS does after it received a C-FIND.
#[derive(Clone, Copy, PartialEq)]
enum Script {
    /// Matches for the caller and for others, then success.
    MixedMatches,
    /// One match, then waits for C-CANCEL and answers 0xFE00.
    WaitForCancel,
    /// Never answers.
    Hang,
    /// Large matches, fragmented to its own tiny maximum PDU.
    LargeMatches,
    /// C-GET: answers ownership look-ups (study 1.1 is PAT1's), then sends two sub-operations:
    /// an instance of PAT1 and one of PAT2.
    GetWithForeign,
    /// C-GET: one sub-operation, then waits for C-CANCEL and answers 0xFE00.
    GetCancel,
}

/// What the scripted PACS saw.
#[derive(Default)]
struct Seen {
    calling_ae: String,
    identity_forwarded: bool,
    query_patient_ids: Vec<Option<String>>,
    cancels: usize,
    /// Statuses the gateway answered for C-GET sub-operations, in order.
    sub_statuses: Vec<u16>,
}

const PACS_MAX_PDU: u32 = 1024;

fn ds_bytes(obj: &InMemDicomObject) -> Vec<u8> {
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, &EXPLICIT_VR_LITTLE_ENDIAN.erased())
        .unwrap();
    out
}

fn find_rsp(msg_id: u16, status: u16, with_data: bool) -> Vec<u8> {
    let cmd = InMemDicomObject::command_from_element_iter([
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(FIND),
        ),
        DataElement::new(tags::COMMAND_FIELD, VR::US, dicom_value!(U16, [0x8020])),
        DataElement::new(
            tags::MESSAGE_ID_BEING_RESPONDED_TO,
            VR::US,
            dicom_value!(U16, [msg_id]),
        ),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            dicom_value!(U16, [if with_data { 0 } else { 0x0101 }]),
        ),
        DataElement::new(tags::STATUS, VR::US, dicom_value!(U16, [status])),
    ]);
    let mut out = Vec::new();
    cmd.write_dataset_with_ts(&mut out, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .unwrap();
    out
}

const SC: &str = "1.2.840.10008.5.1.4.1.1.7";
const STUDY_GET: &str = "1.2.840.10008.5.1.4.1.2.2.3";

fn get_rsp(msg_id: u16, status: u16) -> Vec<u8> {
    command::Command {
        field: command::C_GET_RSP,
        responded_to: Some(msg_id),
        affected_sop_class: Some(STUDY_GET.into()),
        data_set_type: command::NO_DATA_SET,
        status: Some(status),
        ..Default::default()
    }
    .encode()
}

/// A small instance data set of a patient.
fn instance(patient_id: &str, sop_uid: &str) -> Vec<u8> {
    let mut o = InMemDicomObject::new_empty();
    o.put(DataElement::new(
        tags::SOP_CLASS_UID,
        VR::UI,
        PrimitiveValue::from(SC),
    ));
    o.put(DataElement::new(
        tags::SOP_INSTANCE_UID,
        VR::UI,
        PrimitiveValue::from(sop_uid),
    ));
    o.put(DataElement::new(
        tags::PATIENT_ID,
        VR::LO,
        PrimitiveValue::from(patient_id),
    ));
    o.put(DataElement::new(
        tags::STUDY_INSTANCE_UID,
        VR::UI,
        PrimitiveValue::from("1.1"),
    ));
    o.put(DataElement::new(
        tags::SERIES_INSTANCE_UID,
        VR::UI,
        PrimitiveValue::from("1.1.1"),
    ));
    o.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        PrimitiveValue::from(vec![7u8; 5000]),
    ));
    ds_bytes(&o)
}

fn study(patient_id: Option<&str>, uid: &str, description_len: usize) -> InMemDicomObject {
    let mut o = InMemDicomObject::new_empty();
    o.put(DataElement::new(
        tags::QUERY_RETRIEVE_LEVEL,
        VR::CS,
        PrimitiveValue::from("STUDY"),
    ));
    if let Some(p) = patient_id {
        o.put(DataElement::new(
            tags::PATIENT_ID,
            VR::LO,
            PrimitiveValue::from(p),
        ));
    }
    o.put(DataElement::new(
        tags::STUDY_INSTANCE_UID,
        VR::UI,
        PrimitiveValue::from(uid),
    ));
    if description_len > 0 {
        let d: String = "X".repeat(description_len);
        o.put(DataElement::new(
            tags::STUDY_DESCRIPTION,
            VR::UT,
            PrimitiveValue::from(d),
        ));
    }
    o
}

async fn fake_pacs(listener: TcpListener, script: Script, seen: Arc<Mutex<Seen>>) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        let seen = seen.clone();
        tokio::spawn(async move {
            let Ok(Pdu::AssociationRQ(rq)) = read_pdu(&mut s, 1 << 20).await else {
                return;
            };
            {
                let mut g = seen.lock().unwrap();
                g.calling_ae = rq.calling_ae_title.trim().to_string();
                g.identity_forwarded = rq
                    .user_variables
                    .iter()
                    .any(|v| matches!(v, UserVariableItem::UserIdentityItem(_)));
            }
            let ac = AssociationAC {
                protocol_version: 1,
                calling_ae_title: rq.calling_ae_title.clone(),
                called_ae_title: rq.called_ae_title.clone(),
                application_context_name: rq.application_context_name.clone(),
                presentation_contexts: rq
                    .presentation_contexts
                    .iter()
                    .map(|pc| PresentationContextResult {
                        id: pc.id,
                        reason: PresentationContextResultReason::Acceptance,
                        transfer_syntax: pc.transfer_syntaxes[0].clone(),
                    })
                    .collect(),
                user_variables: vec![
                    UserVariableItem::MaxLength(PACS_MAX_PDU),
                    UserVariableItem::ScuScpRoleSelectionSubItem(
                        SC.into(),
                        RequestorRoles {
                            scu: false,
                            scp: true,
                        },
                    ),
                ],
            };
            let storage_pc = rq
                .presentation_contexts
                .iter()
                .find(|p| p.abstract_syntax.trim_end_matches('\0') == SC)
                .map(|p| p.id);
            write_pdu(&mut s, &Pdu::AssociationAC(ac)).await.unwrap();
            let _ = s.set_nodelay(true);
            // The gateway must respect the PACS's maximum: read with exactly that limit.
            let mut peer = Peer::new("gateway", s, PACS_MAX_PDU, 0);
            let mut msg_id = 0;
            loop {
                match peer.next().await {
                    Incoming::Message(Event::Command {
                        pc_id,
                        command: cmd,
                    }) => {
                        match cmd.field {
                            command::C_ECHO_RQ => {
                                let r = cmd.response(0, None).encode();
                                peer.send_message(pc_id, &r, None).await.unwrap();
                            }
                            command::C_CANCEL_RQ => {
                                seen.lock().unwrap().cancels += 1;
                                let r = find_rsp(msg_id, 0xFE00, false);
                                peer.send_message(pc_id, &r, None).await.unwrap();
                            }
                            command::C_FIND_RQ => {
                                msg_id = cmd.message_id.unwrap();
                                let data = peer
                                    .collect_data(pc_id, 1 << 20, Duration::from_secs(5))
                                    .await
                                    .unwrap();
                                let q = InMemDicomObject::read_dataset_with_ts(
                                    &data[..],
                                    &EXPLICIT_VR_LITTLE_ENDIAN.erased(),
                                )
                                .unwrap();
                                let pid = q
                                    .get(tags::PATIENT_ID)
                                    .map(|e| e.to_str().unwrap().into_owned());
                                seen.lock().unwrap().query_patient_ids.push(pid);
                                if matches!(script, Script::GetWithForeign | Script::GetCancel) {
                                    // an ownership look-up by the gateway
                                    let uid = q.get(tags::STUDY_INSTANCE_UID).map(|e| {
                                        e.to_str().unwrap().trim_end_matches('\0').to_string()
                                    });
                                    if uid.as_deref() == Some("1.1") {
                                        let d = ds_bytes(&study(Some("PAT1"), "1.1", 0));
                                        peer.send_message(
                                            pc_id,
                                            &find_rsp(msg_id, 0xFF00, true),
                                            Some(&d),
                                        )
                                        .await
                                        .unwrap();
                                    }
                                    peer.send_message(pc_id, &find_rsp(msg_id, 0, false), None)
                                        .await
                                        .unwrap();
                                    continue;
                                }
                                let (matches, finish) = match script {
                                    Script::MixedMatches => (
                                        [
                                            (Some("PAT1"), "1.1"),
                                            (Some("PAT2"), "2.1"),
                                            (Some("pat1"), "3.1"),
                                            (None, "4.1"),
                                            (Some("PAT1\\PAT2"), "5.1"),
                                            (Some("PAT1  "), "1.2"),
                                        ]
                                        .iter()
                                        .map(|(p, uid)| {
                                            let mut o = study(*p, uid, 0);
                                            // A patient-wide count, as PACS give at STUDY level.
                                            o.put(DataElement::new(
                                                Tag(0x0020, 0x1200),
                                                VR::IS,
                                                PrimitiveValue::from("6"),
                                            ));
                                            o
                                        })
                                        .collect(),
                                        true,
                                    ),
                                    Script::WaitForCancel => {
                                        (vec![study(Some("PAT1"), "1.1", 0)], false)
                                    }
                                    Script::Hang | Script::GetWithForeign | Script::GetCancel => {
                                        (vec![], false)
                                    }
                                    Script::LargeMatches => (
                                        ["1.1", "1.2"]
                                            .iter()
                                            .map(|uid| study(Some("PAT1"), uid, 20_000))
                                            .collect(),
                                        true,
                                    ),
                                };
                                for m in matches {
                                    let d = ds_bytes(&m);
                                    peer.send_message(
                                        pc_id,
                                        &find_rsp(msg_id, 0xFF00, true),
                                        Some(&d),
                                    )
                                    .await
                                    .unwrap();
                                }
                                if finish {
                                    peer.send_message(pc_id, &find_rsp(msg_id, 0, false), None)
                                        .await
                                        .unwrap();
                                }
                            }
                            command::C_GET_RQ => {
                                msg_id = cmd.message_id.unwrap();
                                peer.collect_data(pc_id, 1 << 20, Duration::from_secs(5))
                                    .await
                                    .unwrap();
                                let spc = storage_pc.unwrap();
                                let pids: &[&str] = if script == Script::GetWithForeign {
                                    &["PAT1", "PAT2"]
                                } else {
                                    &["PAT1"]
                                };
                                for (n, pid) in pids.iter().enumerate() {
                                    let inst = instance(pid, &format!("9.{n}"));
                                    let mut c = command::Command::request(
                                        command::C_STORE_RQ,
                                        100 + n as u16,
                                        SC,
                                        true,
                                    );
                                    c.affected_sop_instance = Some(format!("9.{n}"));
                                    let cmd = c.encode();
                                    peer.send_message(spc, &cmd, Some(&inst)).await.unwrap();
                                    // the gateway's answer for this sub-operation
                                    match peer.next().await {
                                        Incoming::Message(Event::Command {
                                            command: r, ..
                                        }) => {
                                            seen.lock()
                                                .unwrap()
                                                .sub_statuses
                                                .push(r.status.unwrap());
                                        }
                                        _ => return,
                                    }
                                }
                                if script == Script::GetCancel {
                                    match peer.next().await {
                                        Incoming::Message(Event::Command {
                                            command: c, ..
                                        }) => {
                                            assert_eq!(c.field, command::C_CANCEL_RQ);
                                            seen.lock().unwrap().cancels += 1;
                                            peer.send_message(
                                                pc_id,
                                                &get_rsp(msg_id, 0xFE00),
                                                None,
                                            )
                                            .await
                                            .unwrap();
                                        }
                                        _ => return,
                                    }
                                } else {
                                    peer.send_message(pc_id, &get_rsp(msg_id, 0xB000), None)
                                        .await
                                        .unwrap();
                                }
                            }
                            _ => return,
                        }
                    }
                    Incoming::ReleaseRq => {
                        let _ = peer.send_pdu(&Pdu::ReleaseRP).await;
                        return;
                    }
                    _ => return,
                }
            }
        });
    }
}

struct Setup {
    gateway: std::net::SocketAddr,
    issuer: Arc<DevIssuer>,
    seen: Arc<Mutex<Seen>>,
}

async fn setup(script: Script, pacs_up: bool, extra_limits: &str) -> Setup {
    let il = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let issuer_url = format!("http://{}", il.local_addr().unwrap());
    let issuer = Arc::new(DevIssuer::new(
        issuer_url.clone(),
        DevKey::generate(Algorithm::ES256).unwrap(),
        "http://127.0.0.1:8080/dicom-web".into(),
    ));
    tokio::spawn(pacsgate::devissuer::serve(il, issuer.clone()));

    let seen = Arc::new(Mutex::new(Seen::default()));
    let pl = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let pacs_addr = pl.local_addr().unwrap();
    if pacs_up {
        tokio::spawn(fake_pacs(pl, script, seen.clone()));
    } else {
        drop(pl); // nothing listens there
    }
    let cfg = Config::parse(&format!(
        r#"
[gateway]
ae_title = "PACSGATE"
dimse_listen = "127.0.0.1:0"
public_url = "http://127.0.0.1:8080"
[limits]
upstream_timeout_secs = 1
{extra_limits}
[pacs]
ae_title = "FAKEPACS"
address = "{pacs_addr}"
[[issuers]]
issuer = "{issuer_url}"
"#
    ))
    .unwrap();
    let cfg = Arc::new(cfg);
    let gl = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway = gl.local_addr().unwrap();
    let trust = TrustCore::new(&cfg).unwrap();
    let ehr = Arc::new(pacsgate::ehr::Ehr::new(&cfg, trust.clone()).unwrap());
    let slots = pacsgate::pacs::Slots::new(cfg.pacs.max_associations, cfg.limits.upstream_timeout);
    let ports = Ports::new(Arc::new(PacsLookup::new(&cfg, slots.clone())), ehr);
    let ctx = dimse::Ctx::new(
        cfg.clone(),
        trust,
        Arc::new(Policy::new(&cfg, ports)),
        slots,
    );
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let (_ctx_tx, current) = tokio::sync::watch::channel(ctx);
    tokio::spawn(async move {
        let _keep = (_tx, _ctx_tx);
        dimse::serve(gl, current, None, rx, Duration::from_secs(1)).await
    });
    Setup {
        gateway,
        issuer,
        seen,
    }
}

fn token(s: &Setup, patient: &str) -> String {
    scoped_token(s, patient, "patient/ImagingStudy.rs")
}

fn scoped_token(s: &Setup, patient: &str, scope: &str) -> String {
    s.issuer
        .mint(&MintRequest {
            patient: Some(patient.into()),
            scope: Some(scope.into()),
            ..Default::default()
        })
        .unwrap()
}

async fn connect(
    s: &Setup,
    token: &str,
) -> Result<AsyncClientAssociation<TcpStream>, dicom_ul::association::Error> {
    ClientAssociationOptions::new()
        .calling_ae_title("VIEWER")
        .called_ae_title("PACSGATE")
        .with_presentation_context(FIND, vec![ELE])
        .max_pdu_length(4096)
        .jwt(token)
        .read_timeout(Duration::from_secs(10))
        .establish_async(s.gateway)
        .await
}

fn find_rq(msg_id: u16) -> Vec<u8> {
    let cmd = InMemDicomObject::command_from_element_iter([
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(FIND),
        ),
        DataElement::new(tags::COMMAND_FIELD, VR::US, dicom_value!(U16, [0x0020])),
        DataElement::new(tags::MESSAGE_ID, VR::US, dicom_value!(U16, [msg_id])),
        DataElement::new(tags::PRIORITY, VR::US, dicom_value!(U16, [0])),
        DataElement::new(tags::COMMAND_DATA_SET_TYPE, VR::US, dicom_value!(U16, [0])),
    ]);
    let mut out = Vec::new();
    cmd.write_dataset_with_ts(&mut out, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .unwrap();
    out
}

fn cancel_rq(msg_id: u16) -> Vec<u8> {
    let cmd = InMemDicomObject::command_from_element_iter([
        DataElement::new(tags::COMMAND_FIELD, VR::US, dicom_value!(U16, [0x0FFF])),
        DataElement::new(
            tags::MESSAGE_ID_BEING_RESPONDED_TO,
            VR::US,
            dicom_value!(U16, [msg_id]),
        ),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            dicom_value!(U16, [0x0101]),
        ),
    ]);
    let mut out = Vec::new();
    cmd.write_dataset_with_ts(&mut out, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .unwrap();
    out
}

fn pdv(t: PDataValueType, data: Vec<u8>) -> Pdu {
    Pdu::PData {
        data: vec![PDataValue {
            presentation_context_id: 1,
            value_type: t,
            is_last: true,
            data,
        }],
    }
}

async fn send_find(a: &mut AsyncClientAssociation<TcpStream>, query: &InMemDicomObject) {
    a.send(&pdv(PDataValueType::Command, find_rq(1)))
        .await
        .unwrap();
    a.send(&pdv(PDataValueType::Data, ds_bytes(query)))
        .await
        .unwrap();
}

/// Reads one response: its status and its data set, reassembled from fragments.
async fn next_response(
    a: &mut AsyncClientAssociation<TcpStream>,
) -> (u16, Option<InMemDicomObject>) {
    let mut cmd = Vec::new();
    let mut data = Vec::new();
    let mut status = None;
    loop {
        match a.receive().await.unwrap() {
            Pdu::PData { data: pdvs } => {
                for v in pdvs {
                    assert!(
                        v.data.len() + 6 <= 4096,
                        "fragments respect the client's maximum"
                    );
                    match v.value_type {
                        PDataValueType::Command => {
                            cmd.extend(v.data);
                            if v.is_last {
                                let c =
                                    command::Command::decode(&std::mem::take(&mut cmd)).unwrap();
                                let st = c.status.unwrap();
                                if !c.has_data_set() {
                                    return (st, None);
                                }
                                status = Some(st);
                            }
                        }
                        PDataValueType::Data => {
                            data.extend(v.data);
                            if v.is_last {
                                let obj = InMemDicomObject::read_dataset_with_ts(
                                    &data[..],
                                    &EXPLICIT_VR_LITTLE_ENDIAN.erased(),
                                )
                                .unwrap();
                                return (status.unwrap(), Some(obj));
                            }
                        }
                    }
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn study_query(patient_id: Option<&str>) -> InMemDicomObject {
    let mut q = study(patient_id, "", 0);
    q.put(DataElement::new(
        tags::STUDY_INSTANCE_UID,
        VR::UI,
        PrimitiveValue::from(""),
    ));
    q
}

#[tokio::test(flavor = "multi_thread")]
async fn foreign_matches_from_the_pacs_are_withheld() {
    let s = setup(Script::MixedMatches, true, "").await;
    let mut a = connect(&s, &token(&s, "PAT1")).await.unwrap();
    send_find(&mut a, &study_query(None)).await;
    let mut uids = Vec::new();
    loop {
        let (status, ds) = next_response(&mut a).await;
        if status == 0xFF00 {
            let ds = ds.unwrap();
            assert!(
                ds.get(tags::PATIENT_ID).is_none(),
                "PatientID the gateway added is stripped"
            );
            uids.push(
                ds.get(tags::STUDY_INSTANCE_UID)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .trim_end_matches('\0')
                    .to_string(),
            );
        } else {
            assert_eq!(status, 0);
            break;
        }
    }
    assert_eq!(
        uids,
        vec!["1.1", "1.2"],
        "only PAT1's matches (padding aside) reach the client"
    );
    a.release().await.unwrap();
    let seen = s.seen.lock().unwrap();
    assert_eq!(
        seen.query_patient_ids,
        vec![Some("PAT1".to_string())],
        "the query was narrowed"
    );
    assert_eq!(seen.calling_ae, "PACSGATE");
    assert!(!seen.identity_forwarded, "the token is never sent upstream");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_study_restriction_withholds_matches_and_patient_wide_counts() {
    let s = setup(Script::MixedMatches, true, "").await;
    let unrestricted = connect(&s, &token(&s, "PAT1")).await.unwrap();
    let restricted = connect(
        &s,
        &scoped_token(&s, "PAT1", "patient/ImagingStudy.rs?identifier=urn:oid:1.2"),
    )
    .await
    .unwrap();
    for (mut a, expected, counted) in [
        (unrestricted, vec!["1.1", "1.2"], true),
        (restricted, vec!["1.2"], false),
    ] {
        send_find(&mut a, &study_query(None)).await;
        let mut uids = Vec::new();
        loop {
            let (status, ds) = next_response(&mut a).await;
            if status != 0xFF00 {
                assert_eq!(status, 0);
                break;
            }
            let ds = ds.unwrap();
            assert_eq!(
                ds.get(Tag(0x0020, 0x1200)).is_some(),
                counted,
                "the count is withheld only under the restriction"
            );
            uids.push(
                ds.get(tags::STUDY_INSTANCE_UID)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .trim_end_matches('\0')
                    .to_string(),
            );
        }
        assert_eq!(uids, expected);
        a.release().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn asked_patient_id_is_kept_in_matches() {
    let s = setup(Script::MixedMatches, true, "").await;
    let mut a = connect(&s, &token(&s, "PAT1")).await.unwrap();
    send_find(&mut a, &study_query(Some(""))).await;
    let (status, ds) = next_response(&mut a).await;
    assert_eq!(status, 0xFF00);
    assert_eq!(
        ds.unwrap()
            .get(tags::PATIENT_ID)
            .unwrap()
            .to_str()
            .unwrap()
            .trim(),
        "PAT1"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_is_relayed_to_the_pacs() {
    let s = setup(Script::WaitForCancel, true, "").await;
    let mut a = connect(&s, &token(&s, "PAT1")).await.unwrap();
    send_find(&mut a, &study_query(None)).await;
    let (status, _) = next_response(&mut a).await;
    assert_eq!(status, 0xFF00);
    a.send(&pdv(PDataValueType::Command, cancel_rq(1)))
        .await
        .unwrap();
    let (status, _) = next_response(&mut a).await;
    assert_eq!(status, 0xFE00);
    assert_eq!(s.seen.lock().unwrap().cancels, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn hanging_pacs_gives_a_failure_status_not_a_hang() {
    let s = setup(Script::Hang, true, "").await;
    let mut a = connect(&s, &token(&s, "PAT1")).await.unwrap();
    send_find(&mut a, &study_query(None)).await;
    let started = std::time::Instant::now();
    let (status, _) = next_response(&mut a).await;
    assert_eq!(status, command::STATUS_UNABLE_TO_PROCESS);
    assert!(started.elapsed() < Duration::from_secs(5));
    // then the association is aborted
    assert!(matches!(
        a.receive().await,
        Ok(Pdu::AbortRQ { .. }) | Err(_)
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn pacs_down_rejects_transiently() {
    let s = setup(Script::Hang, false, "").await;
    match connect(&s, &token(&s, "PAT1")).await {
        Err(dicom_ul::association::Error::Rejected { association_rj, .. }) => {
            assert_eq!(association_rj.result, AssociationRJResult::Transient)
        }
        other => panic!("expected a rejection, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn large_matches_are_refragmented_between_different_maximums() {
    let s = setup(Script::LargeMatches, true, "").await;
    let mut a = connect(&s, &token(&s, "PAT1")).await.unwrap();
    send_find(&mut a, &study_query(Some("PAT1"))).await;
    for _ in 0..2 {
        let (status, ds) = next_response(&mut a).await;
        assert_eq!(status, 0xFF00);
        let d = ds
            .unwrap()
            .get(tags::STUDY_DESCRIPTION)
            .unwrap()
            .to_str()
            .unwrap()
            .into_owned();
        assert_eq!(d.trim_end().len(), 20_000);
    }
    assert_eq!(next_response(&mut a).await.0, 0);
    a.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn association_cap_refuses_with_local_limit() {
    let s = setup(Script::MixedMatches, true, "max_associations = 1").await;
    let first = connect(&s, &token(&s, "PAT1")).await.unwrap();
    match connect(&s, &token(&s, "PAT1")).await {
        Err(dicom_ul::association::Error::Rejected { association_rj, .. }) => {
            assert_eq!(association_rj.result, AssociationRJResult::Transient)
        }
        other => panic!("expected a rejection, got {:?}", other.map(|_| ())),
    }
    first.release().await.unwrap();
    // the slot is free again
    tokio::time::sleep(Duration::from_millis(200)).await;
    let again = connect(&s, &token(&s, "PAT1")).await.unwrap();
    again.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_client_is_dropped_after_the_request_timeout() {
    let s = setup(
        Script::MixedMatches,
        true,
        "association_request_timeout_secs = 0.5",
    )
    .await;
    let mut c = TcpStream::connect(s.gateway).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut c, &mut buf),
    )
    .await
    .expect("the gateway must close an idle connection")
    .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_association_request_is_refused() {
    let s = setup(Script::MixedMatches, true, "").await;
    let mut c = TcpStream::connect(s.gateway).await.unwrap();
    // An A-ASSOCIATE-RQ header announcing 16 MiB: refused without reading it.
    tokio::io::AsyncWriteExt::write_all(&mut c, &[0x01, 0, 0x01, 0, 0, 0])
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), read_pdu(&mut c, 1 << 16))
        .await
        .unwrap();
    assert!(matches!(r, Ok(Pdu::AbortRQ { .. }) | Err(_)));
}

async fn connect_get(s: &Setup, token: &str) -> AsyncClientAssociation<TcpStream> {
    ClientAssociationOptions::new()
        .calling_ae_title("VIEWER")
        .called_ae_title("PACSGATE")
        .with_presentation_context(STUDY_GET, vec![ELE])
        .with_presentation_context(SC, vec![ELE])
        .with_role_selection(SC, false, true)
        .max_pdu_length(4096)
        .jwt(token)
        .read_timeout(Duration::from_secs(10))
        .establish_async(s.gateway)
        .await
        .unwrap()
}

/// Runs a C-GET of study 1.1; answers every sub-operation with success; returns the PatientIDs
/// received and the final status. With `cancel`, a C-CANCEL goes out after the first instance.
async fn run_get(a: &mut AsyncClientAssociation<TcpStream>, cancel: bool) -> (Vec<String>, u16) {
    let get_pc = a
        .presentation_contexts()
        .iter()
        .find(|p| p.abstract_syntax.trim_end_matches('\0') == STUDY_GET)
        .unwrap()
        .id;
    let mut q = InMemDicomObject::new_empty();
    q.put(DataElement::new(
        tags::QUERY_RETRIEVE_LEVEL,
        VR::CS,
        PrimitiveValue::from("STUDY"),
    ));
    q.put(DataElement::new(
        tags::STUDY_INSTANCE_UID,
        VR::UI,
        PrimitiveValue::from("1.1"),
    ));
    let cmd = command::Command::request(command::C_GET_RQ, 5, STUDY_GET, true).encode();
    let one = |pc: u8, t: PDataValueType, data: Vec<u8>| Pdu::PData {
        data: vec![PDataValue {
            presentation_context_id: pc,
            value_type: t,
            is_last: true,
            data,
        }],
    };
    a.send(&one(get_pc, PDataValueType::Command, cmd))
        .await
        .unwrap();
    a.send(&one(get_pc, PDataValueType::Data, ds_bytes(&q)))
        .await
        .unwrap();
    let mut got = Vec::new();
    let (mut cmd_buf, mut data_buf) = (Vec::new(), Vec::new());
    let mut pending: Option<command::Command> = None;
    loop {
        let Pdu::PData { data } = a.receive().await.unwrap() else {
            panic!("unexpected PDU")
        };
        for v in data {
            match v.value_type {
                PDataValueType::Command => {
                    cmd_buf.extend(v.data);
                    if !v.is_last {
                        continue;
                    }
                    let c = command::Command::decode(&std::mem::take(&mut cmd_buf)).unwrap();
                    if c.field == command::C_GET_RSP && !command::is_pending(c.status.unwrap()) {
                        return (got, c.status.unwrap());
                    }
                    if c.has_data_set() {
                        pending = Some(c);
                    }
                }
                PDataValueType::Data => {
                    data_buf.extend(v.data);
                    if !v.is_last {
                        continue;
                    }
                    let obj = InMemDicomObject::read_dataset_with_ts(
                        &data_buf[..],
                        &EXPLICIT_VR_LITTLE_ENDIAN.erased(),
                    )
                    .unwrap();
                    data_buf.clear();
                    got.push(
                        obj.get(tags::PATIENT_ID)
                            .unwrap()
                            .to_str()
                            .unwrap()
                            .trim()
                            .to_string(),
                    );
                    let c = pending.take().unwrap();
                    a.send(&one(
                        v.presentation_context_id,
                        PDataValueType::Command,
                        c.response(0, None).encode(),
                    ))
                    .await
                    .unwrap();
                    if cancel {
                        a.send(&one(get_pc, PDataValueType::Command, cancel_rq(5)))
                            .await
                            .unwrap();
                    }
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn c_get_withholds_a_foreign_instance_from_the_pacs() {
    let s = setup(Script::GetWithForeign, true, "").await;
    let mut a = connect_get(&s, &token(&s, "PAT1")).await;
    let (got, status) = run_get(&mut a, false).await;
    assert_eq!(
        got,
        vec!["PAT1"],
        "only the caller's instance reaches the client"
    );
    assert_eq!(status, 0xB000);
    assert_eq!(
        s.seen.lock().unwrap().sub_statuses,
        vec![0x0000, command::STATUS_CANNOT_UNDERSTAND],
        "the withheld one is refused toward the PACS with a status C-GET SCPs go on after"
    );
    a.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn c_get_cancel_is_relayed() {
    let s = setup(Script::GetCancel, true, "").await;
    let mut a = connect_get(&s, &token(&s, "PAT1")).await;
    let (got, status) = run_get(&mut a, true).await;
    assert_eq!(got, vec!["PAT1"]);
    assert_eq!(status, 0xFE00);
    assert_eq!(s.seen.lock().unwrap().cancels, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn c_get_of_a_foreign_study_moves_nothing() {
    let s = setup(Script::GetWithForeign, true, "").await;
    let mut a = connect_get(&s, &token(&s, "PAT2")).await;
    let (got, status) = run_get(&mut a, false).await;
    assert!(got.is_empty());
    assert_eq!(status, command::STATUS_NOT_AUTHORIZED);
    assert!(
        s.seen.lock().unwrap().sub_statuses.is_empty(),
        "the PACS was never asked"
    );
}
