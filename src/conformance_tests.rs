//! The conformance statement (`conformance/dicom-conformance.md`) read against the code: the
//! query/retrieve SOP classes, transfer syntaxes, user identity types and SMART scopes it lists
//! must be exactly those the code accepts, and what it says each grants must be what the policy
//! core grants. A change on either side alone fails here.

use crate::dicom::command::{FIND_MODELS, GET_MODELS, MOVE_MODELS, Service};
use crate::policy::tests::{cfg, principal};
use crate::policy::{Access, Denial, Policy};
use std::collections::BTreeSet;

const STATEMENT: &str = include_str!("../conformance/dicom-conformance.md");

/// The body of the section whose heading starts with `## {number}.`.
fn section(number: u32) -> &'static str {
    let head = format!("\n## {number}. ");
    let start = STATEMENT
        .find(&head)
        .unwrap_or_else(|| panic!("no section {number}"));
    let body = &STATEMENT[start + head.len()..];
    match body.find("\n## ") {
        Some(end) => &body[..end],
        None => body,
    }
}

/// The rows of every table in `text`, as trimmed cells (header and rule rows left out).
fn rows(text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut header_next = true;
    for line in text.lines() {
        let Some(inner) = line.trim().strip_prefix('|') else {
            header_next = true;
            continue;
        };
        let cells: Vec<String> = inner
            .trim_end_matches('|')
            .split('|')
            .map(|c| c.trim().to_string())
            .collect();
        if header_next {
            header_next = false;
            continue;
        }
        if cells.iter().all(|c| c.chars().all(|ch| ch == '-')) {
            continue;
        }
        out.push(cells);
    }
    out
}

fn set(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn the_query_retrieve_sop_classes_are_those_listed() {
    let mut listed = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new(), false);
    for r in rows(section(1)) {
        let (name, uid) = (&r[0], &r[1]);
        let expect = if name.contains("– FIND") {
            listed.0.insert(uid.clone());
            Service::Find
        } else if name.contains("– GET") {
            listed.1.insert(uid.clone());
            Service::Get
        } else if name.contains("– MOVE") {
            listed.2.insert(uid.clone());
            Service::Move
        } else if name == "Verification" {
            listed.3 = true;
            Service::Verification
        } else {
            continue;
        };
        assert_eq!(Service::of(uid), expect, "{name} {uid}");
        assert_eq!(r[2], "SCP", "{name}");
    }
    assert_eq!(listed.0, set(FIND_MODELS), "FIND models");
    assert_eq!(listed.1, set(GET_MODELS), "GET models");
    assert_eq!(listed.2, set(MOVE_MODELS), "MOVE models");
    assert!(listed.3, "Verification is listed");
    // What the statement says of the rest: storage under the storage root and private
    // classes, other standard classes relayed to no service.
    assert_eq!(Service::of("1.2.840.10008.5.1.4.1.1.7"), Service::Storage);
    assert_eq!(Service::of("1.2.3.4.5"), Service::Storage);
    assert_eq!(Service::of("1.2.840.10008.5.1.4.31"), Service::Other);
}

#[test]
fn the_transfer_syntaxes_are_those_listed() {
    let (mut yes, mut no) = (BTreeSet::new(), BTreeSet::new());
    for r in rows(section(5)) {
        if r[1] == "—" {
            continue;
        }
        if r[2] == "yes" {
            yes.insert(r[1].clone());
        } else {
            assert!(r[2].starts_with("no"), "{r:?}");
            no.insert(r[1].clone());
        }
    }
    assert_eq!(yes, set(&crate::dicom::syntax::all()), "accepted syntaxes");
    for uid in &no {
        assert!(
            crate::dicom::syntax::readable(uid).is_none(),
            "{uid} is listed as refused"
        );
    }
    assert!(no.len() >= 5, "the refused ones are named too");
}

#[test]
fn the_user_identity_types_are_those_listed() {
    use dicom_ul::pdu::{AssociationRQ, UserIdentity, UserIdentityType, UserVariableItem};
    let mut listed = BTreeSet::new();
    for r in rows(section(3)) {
        if r[1] == "yes" {
            let code: u8 = r[0]
                .split_whitespace()
                .next()
                .and_then(|c| c.parse().ok())
                .unwrap_or_else(|| panic!("{r:?}"));
            listed.insert(code);
        }
    }
    let mut accepted = BTreeSet::new();
    for (code, kind) in [
        (1, UserIdentityType::Username),
        (2, UserIdentityType::UsernamePassword),
        (3, UserIdentityType::KerberosServiceTicket),
        (4, UserIdentityType::SamlAssertion),
        (5, UserIdentityType::Jwt),
    ] {
        let rq = AssociationRQ {
            protocol_version: 1,
            calling_ae_title: "VIEWER".into(),
            called_ae_title: "PACSGATE".into(),
            application_context_name: "1.2.840.10008.3.1.1.1".into(),
            presentation_contexts: Vec::new(),
            user_variables: vec![UserVariableItem::UserIdentityItem(UserIdentity::new(
                false,
                kind,
                b"user-or-token".to_vec(),
                b"token".to_vec(),
            ))],
        };
        if crate::dicom::negotiation::presented_identity(&rq).is_ok() {
            accepted.insert(code);
        }
    }
    assert_eq!(listed, accepted);
}

/// What a scope grants a token with a patient in context, as the statement words it.
fn grant(a: Result<Access, Denial>) -> &'static str {
    match a {
        Ok(Access {
            read: Some(_),
            write: Some(_),
            ..
        }) => "read and write",
        Ok(Access { read: Some(_), .. }) => "read",
        Ok(Access { write: Some(_), .. }) => "write",
        _ => "nothing",
    }
}

/// Every v2 action (ordered subsets of `cruds`), the v1 ones, and some that do not parse.
fn every_action() -> Vec<String> {
    let mut v: Vec<String> = (1u32..32)
        .map(|bits| {
            "cruds"
                .chars()
                .enumerate()
                .filter(|(i, _)| bits & (1 << i) != 0)
                .map(|(_, c)| c)
                .collect()
        })
        .collect();
    v.extend(["read", "write", "*", "sr", "rr", "crudsx", ""].map(String::from));
    v
}

#[test]
fn the_scopes_grant_what_the_statement_says() {
    let mut listed = std::collections::BTreeMap::new();
    for r in rows(section(8)) {
        let grants = r[0].clone();
        if !matches!(
            grants.as_str(),
            "read" | "write" | "read and write" | "nothing"
        ) {
            continue;
        }
        for action in r[1].split(',') {
            let action = action.trim();
            if let Some(a) = action.strip_prefix('`').and_then(|a| a.split('`').next()) {
                listed.insert(a.to_string(), grants.clone());
            }
        }
    }
    assert!(listed.len() > 20, "the table was read: {listed:?}");
    let patient = Policy::bare(&cfg("deny"));
    let user = Policy::bare(&cfg("allow"));
    for action in every_action() {
        for resource in ["ImagingStudy", "*"] {
            let at = |level: &str, pol: &Policy| {
                let p = principal(&format!("{level}/{resource}.{action}"), Some("A"));
                grant(pol.access(&p))
            };
            let got = at("patient", &patient);
            let said = listed.get(&action).map(String::as_str).unwrap_or("nothing");
            assert_eq!(got, said, "patient/{resource}.{action}");
            // user/ and system/ grant the same with user_level = "allow", nothing with "deny".
            for level in ["user", "system"] {
                let p = principal(&format!("{level}/{resource}.{action}"), None);
                assert_eq!(grant(user.access(&p)), said, "{level}/{resource}.{action}");
                assert_eq!(
                    grant(patient.access(&p)),
                    "nothing",
                    "{level}/{resource}.{action} under user_level = deny"
                );
            }
        }
    }
    // Other resource types and non-resource scopes grant nothing.
    for s in [
        "patient/Patient.read",
        "patient/Observation.rs",
        "openid fhirUser launch",
    ] {
        assert_eq!(
            grant(patient.access(&principal(s, Some("A")))),
            "nothing",
            "{s}"
        );
    }
    // Every scope the discovery documents advertise grants what the table says.
    for s in crate::web::discovery::SCOPES {
        if let Some((_, rest)) = s.split_once('/')
            && let Some((_, action)) = rest.split_once('.')
        {
            assert!(
                listed.contains_key(action),
                "advertised {s} is in the table"
            );
        }
    }
}
