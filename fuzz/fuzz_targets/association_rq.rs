//! A-ASSOCIATE-RQ as the listener reads it: `dicom_ul::read_pdu` (lenient, as
//! `dicom::peer` calls it, and strict), then for a request the user identity, the request sent
//! upstream (as is, and with C-GET contexts proposed as C-MOVE) and the answer built from a
//! PACS answer derived from the input. Checks that the token never goes upstream, that only
//! readable transfer syntaxes are offered and accepted, and that what the gateway writes,
//! dicom-ul reads back the same.
#![no_main]

use dicom_ul::Pdu;
use dicom_ul::pdu::{
    AssociationAC, AssociationRQ, MAXIMUM_PDU_SIZE, PresentationContextResult,
    PresentationContextResultReason as Reason, UserVariableItem,
};
use libfuzzer_sys::fuzz_target;
use pacsgate::dicom::negotiation as assoc;
use pacsgate::dicom::syntax;

fn written(pdu: &Pdu) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    dicom_ul::write_pdu(&mut out, pdu).ok()?;
    Some(out)
}

fn reread(pdu: &Pdu) {
    if let Some(bytes) = written(pdu) {
        let back = dicom_ul::read_pdu(&bytes[..], MAXIMUM_PDU_SIZE, false)
            .unwrap_or_else(|e| panic!("dicom-ul cannot read what it wrote for {pdu:?}: {e}"))
            .expect("a whole PDU");
        assert_eq!(
            &back, pdu,
            "what the gateway sends is read back differently"
        );
    }
}

fn exercise(rq: &AssociationRQ, get_by_move: bool) {
    let identity = assoc::presented_identity(rq);
    if let Ok(id) = &identity {
        assert!(!id.token.is_empty());
        let ws = |c: char| c.is_ascii_whitespace();
        assert!(!id.token.starts_with(ws) && !id.token.ends_with(ws));
    }
    let _ = assoc::announced_max(&rq.user_variables);
    let up = assoc::upstream_request(rq, "PACSGATE", "ORTHANC", 16384, get_by_move);
    for v in &up.user_variables {
        assert!(
            !matches!(v, UserVariableItem::UserIdentityItem(_)),
            "the client's identity goes upstream"
        );
        if let UserVariableItem::Unknown(t, _) = v {
            assert!(*t != 0x58 && *t != 0x59 && *t != 0x53);
        }
    }
    for pc in &up.presentation_contexts {
        assert!(!pc.transfer_syntaxes.is_empty());
        assert!(
            pc.transfer_syntaxes
                .iter()
                .all(|t| syntax::readable(t).is_some())
        );
    }
    reread(&Pdu::AssociationRQ(up.clone()));

    // A PACS answer derived from the request: each context accepted or refused, with one of
    // its syntaxes or one it did not propose; plus a context nobody proposed.
    let mut results: Vec<PresentationContextResult> = rq
        .presentation_contexts
        .iter()
        .map(|pc| {
            let k = pc.id as usize + pc.abstract_syntax.len();
            let reason = match k % 5 {
                0 | 1 | 2 => Reason::Acceptance,
                3 => Reason::AbstractSyntaxNotSupported,
                _ => Reason::TransferSyntaxesNotSupported,
            };
            let transfer_syntax = match k % 7 {
                6 => "1.2.840.10008.1.2.1.99".to_string(),
                _ if pc.transfer_syntaxes.is_empty() => String::new(),
                i => pc.transfer_syntaxes[i % pc.transfer_syntaxes.len()].clone(),
            };
            PresentationContextResult {
                id: pc.id,
                reason,
                transfer_syntax,
            }
        })
        .collect();
    results.push(PresentationContextResult {
        id: 255,
        reason: Reason::Acceptance,
        transfer_syntax: "1.2.840.10008.1.2".into(),
    });
    let ac = AssociationAC {
        protocol_version: 1,
        calling_ae_title: up.calling_ae_title.clone(),
        called_ae_title: up.called_ae_title.clone(),
        application_context_name: up.application_context_name.clone(),
        presentation_contexts: results,
        user_variables: rq.user_variables.clone(),
    };
    let positive = identity
        .as_ref()
        .is_ok_and(|i| i.positive_response_requested);
    let (down, accepted) = assoc::downstream_accept(rq, &ac, 16384, positive, get_by_move);
    assert_eq!(
        down.presentation_contexts.len(),
        rq.presentation_contexts.len()
    );
    for (id, a) in &accepted {
        let proposed = rq
            .presentation_contexts
            .iter()
            .find(|pc| pc.id == *id)
            .expect("an accepted context was proposed");
        assert!(syntax::readable(&a.transfer_syntax).is_some());
        assert!(
            proposed
                .transfer_syntaxes
                .iter()
                .any(|t| t.trim_end_matches('\0') == a.transfer_syntax)
        );
    }
    for v in &down.user_variables {
        assert!(!matches!(v, UserVariableItem::UserIdentityItem(_)));
    }
    reread(&Pdu::AssociationAC(down));
    for r in [
        assoc::Refusal::Identity,
        assoc::Refusal::Busy,
        assoc::Refusal::Unavailable,
    ] {
        let _ = written(&Pdu::AssociationRJ(assoc::reject(r)));
    }
}

fuzz_target!(|data: &[u8]| {
    for strict in [false, true] {
        let pdu = dicom_ul::read_pdu(data, MAXIMUM_PDU_SIZE, strict);
        if pacsgate_fuzz::verbose() {
            match &pdu {
                Ok(Some(Pdu::AssociationRQ(rq))) => eprintln!(
                    "strict {strict}: A-ASSOCIATE-RQ, {} contexts, identity {:?}",
                    rq.presentation_contexts.len(),
                    assoc::presented_identity(rq).map(|i| (i.kind, i.token.len()))
                ),
                other => eprintln!("strict {strict}: {other:?}"),
            }
        }
        if let Ok(Some(Pdu::AssociationRQ(rq))) = pdu {
            // Both the PACS that serves C-GET and the one whose C-GET the gateway serves by
            // C-MOVE: the second rewrites the contexts it proposes upstream.
            exercise(&rq, false);
            exercise(&rq, true);
        }
    }
});
