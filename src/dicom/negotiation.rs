//! Association negotiation of the relay (PS3.7 Annex D, PS3.8 9.3): the user identity a client
//! presents, the A-ASSOCIATE-RQ the gateway sends the PACS on the client's behalf, the
//! A-ASSOCIATE-AC it answers with (including the 0x59 user identity response), and the
//! A-ASSOCIATE-RJ forms it refuses with.
//!
//! Owns: the shape of those PDUs. Pure functions; the I/O is in the acceptor. Must not know
//! tokens' contents or policy.

use dicom_ul::pdu::{
    AssociationAC, AssociationRJ, AssociationRJResult, AssociationRJServiceProviderASCEReason,
    AssociationRJServiceProviderPresentationReason, AssociationRJServiceUserReason,
    AssociationRJSource, AssociationRQ, PresentationContextProposed, PresentationContextResult,
    PresentationContextResultReason, UserIdentityType, UserVariableItem,
};
use std::collections::HashMap;

/// The DICOM application context name.
pub(crate) const APPLICATION_CONTEXT: &str = "1.2.840.10008.3.1.1.1";
/// The gateway's implementation class UID (a UUID-derived UID under 2.25).
pub(crate) const IMPLEMENTATION_CLASS_UID: &str = "2.25.336851160592358114325118563930571390839";
pub(crate) const IMPLEMENTATION_VERSION_NAME: &str = "PACSGATE_010";
/// Item type of the Asynchronous Operations Window sub-item; the relay runs one operation at a
/// time, so it never forwards this.
const ASYNC_OPERATIONS_WINDOW: u8 = 0x53;

/// Why no token could be taken from an A-ASSOCIATE-RQ.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "no user identity sub-item (a SMART access token is required: type 5 JWT, or type 2 with the token as passcode)"
    )]
    Missing,
    #[error(
        "user identity type {0} is not accepted (use type 5 JWT, or type 2 with the token as passcode)"
    )]
    UnsupportedType(u8),
    #[error("the token in the user identity is not UTF-8")]
    NotUtf8,
    #[error("the user identity field is empty")]
    Empty,
}

/// The token a client presented, and whether it asked for a positive response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresentedIdentity {
    pub token: String,
    pub positive_response_requested: bool,
    pub kind: UserIdentityType,
}

fn type_code(t: &UserIdentityType) -> u8 {
    match t {
        UserIdentityType::Username => 1,
        UserIdentityType::UsernamePassword => 2,
        UserIdentityType::KerberosServiceTicket => 3,
        UserIdentityType::SamlAssertion => 4,
        UserIdentityType::Jwt => 5,
        _ => 0,
    }
}

/// Takes the token from the user identity sub-item: the primary field of type 5, or the
/// passcode (secondary field) of type 2.
pub fn presented_identity(rq: &AssociationRQ) -> Result<PresentedIdentity, IdentityError> {
    let ui = rq
        .user_variables
        .iter()
        .find_map(|v| match v {
            UserVariableItem::UserIdentityItem(ui) => Some(ui),
            _ => None,
        })
        .ok_or(IdentityError::Missing)?;
    let kind = ui.identity_type();
    let field = match kind {
        UserIdentityType::Jwt => ui.primary_field(),
        UserIdentityType::UsernamePassword => ui.secondary_field(),
        ref other => return Err(IdentityError::UnsupportedType(type_code(other))),
    };
    let token = String::from_utf8(field).map_err(|_| IdentityError::NotUtf8)?;
    // A token file written with a trailing newline is a common client mistake (dcmtk sends the
    // file byte for byte); whitespace is never part of a compact JWS.
    let token = token
        .trim_matches(|c: char| c.is_ascii_whitespace())
        .to_string();
    if token.is_empty() {
        return Err(IdentityError::Empty);
    }
    Ok(PresentedIdentity {
        token,
        positive_response_requested: ui.positive_response_requested(),
        kind,
    })
}

/// The Maximum Length a peer announced (0 means unlimited), or the PS3.8 default when absent.
pub fn announced_max(items: &[UserVariableItem]) -> u32 {
    items
        .iter()
        .find_map(|v| match v {
            UserVariableItem::MaxLength(m) => Some(*m),
            _ => None,
        })
        .unwrap_or(dicom_ul::pdu::DEFAULT_MAX_PDU)
}

/// The request the gateway sends the PACS: its own AE titles and identity, the client's
/// presentation contexts with their ids unchanged, role selection and extended negotiation
/// passed through; the client's identity and asynchronous operations window are not forwarded.
pub fn upstream_request(
    rq: &AssociationRQ,
    calling: &str,
    called: &str,
    our_max: u32,
    get_by_move: bool,
) -> AssociationRQ {
    let mut user_variables = vec![
        UserVariableItem::MaxLength(our_max),
        UserVariableItem::ImplementationClassUID(IMPLEMENTATION_CLASS_UID.into()),
        UserVariableItem::ImplementationVersionName(IMPLEMENTATION_VERSION_NAME.into()),
    ];
    for v in &rq.user_variables {
        match v {
            UserVariableItem::ScuScpRoleSelectionSubItem(..)
            | UserVariableItem::SopClassExtendedNegotiationSubItem(..) => {
                user_variables.push(v.clone())
            }
            UserVariableItem::Unknown(t, _)
                if *t != ASYNC_OPERATIONS_WINDOW && *t != 0x58 && *t != 0x59 =>
            {
                user_variables.push(v.clone())
            }
            _ => {}
        }
    }
    // Only transfer syntaxes the strict reader decodes are offered: an instance in any other
    // could not be judged (a deflated stream would be read as another syntax). A context left
    // with none is not proposed, and the client is told its syntaxes are not supported.
    let presentation_contexts = rq
        .presentation_contexts
        .iter()
        .filter_map(|pc| {
            let readable: Vec<String> = pc
                .transfer_syntaxes
                .iter()
                .filter(|t| crate::dicom::syntax::readable(t).is_some())
                .cloned()
                .collect();
            // A PACS without C-GET serves a client's C-GET by C-MOVE to the gateway: the
            // model's MOVE is proposed in its place, under the same id.
            let abstract_syntax = match get_by_move.then(|| move_of_get(&pc.abstract_syntax)) {
                Some(Some(m)) => m.to_string(),
                _ => pc.abstract_syntax.clone(),
            };
            (!readable.is_empty()).then_some(PresentationContextProposed {
                id: pc.id,
                abstract_syntax,
                transfer_syntaxes: readable,
            })
        })
        .collect();
    AssociationRQ {
        protocol_version: 1,
        calling_ae_title: calling.to_string(),
        called_ae_title: called.to_string(),
        application_context_name: rq.application_context_name.clone(),
        presentation_contexts,
        user_variables,
    }
}

/// The C-MOVE SOP class of the same information model as a C-GET one (Composite Instance Root
/// has none).
pub fn move_of_get(get: &str) -> Option<&'static str> {
    match get.trim_end_matches('\0') {
        "1.2.840.10008.5.1.4.1.2.1.3" => Some("1.2.840.10008.5.1.4.1.2.1.2"),
        "1.2.840.10008.5.1.4.1.2.2.3" => Some("1.2.840.10008.5.1.4.1.2.2.2"),
        "1.2.840.10008.5.1.4.1.2.3.3" => Some("1.2.840.10008.5.1.4.1.2.3.2"),
        _ => None,
    }
}

/// A presentation context as accepted on both legs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedContext {
    pub abstract_syntax: String,
    pub transfer_syntax: String,
}

/// The answer to the client, built from what the PACS accepted: the same presentation context
/// results (a context the PACS accepted with a transfer syntax the client did not propose is
/// refused instead), the PACS's role selection and extended negotiation answers, the gateway's
/// own Maximum Length and implementation identity, and a 0x59 item with an empty server response
/// when the client requested a positive response.
pub fn downstream_accept(
    rq: &AssociationRQ,
    upstream: &AssociationAC,
    our_max: u32,
    identity_response: bool,
    get_by_move: bool,
) -> (AssociationAC, HashMap<u8, AcceptedContext>) {
    let mut accepted = HashMap::new();
    let mut results = Vec::new();
    for proposed in &rq.presentation_contexts {
        let up = upstream
            .presentation_contexts
            .iter()
            .find(|r| r.id == proposed.id);
        let readable = proposed
            .transfer_syntaxes
            .iter()
            .any(|t| crate::dicom::syntax::readable(t).is_some());
        let result = match up {
            _ if !readable => PresentationContextResult {
                id: proposed.id,
                reason: PresentationContextResultReason::TransferSyntaxesNotSupported,
                transfer_syntax: proposed
                    .transfer_syntaxes
                    .first()
                    .cloned()
                    .unwrap_or_default(),
            },
            Some(r)
                if r.reason == PresentationContextResultReason::Acceptance
                    && crate::dicom::syntax::readable(&r.transfer_syntax).is_some()
                    && proposed
                        .transfer_syntaxes
                        .iter()
                        .any(|t| ts_eq(t, &r.transfer_syntax)) =>
            {
                accepted.insert(
                    proposed.id,
                    AcceptedContext {
                        abstract_syntax: proposed
                            .abstract_syntax
                            .trim_end_matches('\0')
                            .to_string(),
                        transfer_syntax: r.transfer_syntax.trim_end_matches('\0').to_string(),
                    },
                );
                r.clone()
            }
            Some(r) if r.reason != PresentationContextResultReason::Acceptance => r.clone(),
            _ => PresentationContextResult {
                id: proposed.id,
                reason: PresentationContextResultReason::NoReason,
                transfer_syntax: proposed
                    .transfer_syntaxes
                    .first()
                    .cloned()
                    .unwrap_or_default(),
            },
        };
        results.push(result);
    }
    let mut user_variables = vec![
        UserVariableItem::MaxLength(our_max),
        UserVariableItem::ImplementationClassUID(IMPLEMENTATION_CLASS_UID.into()),
        UserVariableItem::ImplementationVersionName(IMPLEMENTATION_VERSION_NAME.into()),
    ];
    for v in &upstream.user_variables {
        match v {
            UserVariableItem::SopClassExtendedNegotiationSubItem(..) => {
                user_variables.push(v.clone())
            }
            UserVariableItem::ScuScpRoleSelectionSubItem(..) if !get_by_move => {
                user_variables.push(v.clone())
            }
            _ => {}
        }
    }
    if get_by_move {
        // The gateway itself sends the C-GET's instances (they reach it by C-MOVE): it takes
        // the roles the client asked for, whatever the PACS said of them.
        for v in &rq.user_variables {
            if matches!(v, UserVariableItem::ScuScpRoleSelectionSubItem(..)) {
                user_variables.push(v.clone());
            }
        }
    }
    if identity_response {
        // PS3.7 D.3.3.7.2: server-response-length (2 bytes) then the response; none is defined
        // for a JWT, so it is empty.
        user_variables.push(UserVariableItem::Unknown(0x59, vec![0, 0]));
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
        accepted,
    )
}

fn ts_eq(a: &str, b: &str) -> bool {
    a.trim_end_matches('\0') == b.trim_end_matches('\0')
}

/// The refusals the acceptor sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The identity is missing, invalid or grants nothing: rejected-permanent, source "UL
    /// service-provider (ACSE related function)", no reason given (PS3.7 D.3.3.7).
    Identity,
    CalledAeTitle,
    /// The receiver accepts only the PACS.
    CallingAeTitle,
    ApplicationContext,
    /// The gateway or the PACS cannot take the association now: rejected-transient, source "UL
    /// service-provider (presentation related function)", temporary congestion.
    Unavailable,
    /// Too many associations: rejected-transient, local limit exceeded.
    Busy,
}

impl Refusal {
    /// A short name, for metrics.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::Identity => "identity",
            Refusal::CalledAeTitle => "called_ae_title",
            Refusal::CallingAeTitle => "calling_ae_title",
            Refusal::ApplicationContext => "application_context",
            Refusal::Unavailable => "unavailable",
            Refusal::Busy => "busy",
        }
    }
}

pub fn reject(r: Refusal) -> AssociationRJ {
    use AssociationRJSource as S;
    let (result, source) = match r {
        Refusal::Identity => (
            AssociationRJResult::Permanent,
            S::ServiceProviderASCE(AssociationRJServiceProviderASCEReason::NoReasonGiven),
        ),
        Refusal::CalledAeTitle => (
            AssociationRJResult::Permanent,
            S::ServiceUser(AssociationRJServiceUserReason::CalledAETitleNotRecognized),
        ),
        Refusal::CallingAeTitle => (
            AssociationRJResult::Permanent,
            S::ServiceUser(AssociationRJServiceUserReason::CallingAETitleNotRecognized),
        ),
        Refusal::ApplicationContext => (
            AssociationRJResult::Permanent,
            S::ServiceUser(AssociationRJServiceUserReason::ApplicationContextNameNotSupported),
        ),
        Refusal::Unavailable => (
            AssociationRJResult::Transient,
            S::ServiceProviderPresentation(
                AssociationRJServiceProviderPresentationReason::TemporaryCongestion,
            ),
        ),
        Refusal::Busy => (
            AssociationRJResult::Transient,
            S::ServiceProviderPresentation(
                AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
            ),
        ),
    };
    AssociationRJ { result, source }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_ul::pdu::{RequestorRoles, UserIdentity};

    const FIND: &str = "1.2.840.10008.5.1.4.1.2.2.1";
    const ELE: &str = "1.2.840.10008.1.2.1";
    const ILE: &str = "1.2.840.10008.1.2";

    fn rq(identity: Option<UserIdentity>) -> AssociationRQ {
        let mut uv = vec![
            UserVariableItem::MaxLength(16384),
            UserVariableItem::ImplementationClassUID("1.2.3".into()),
            UserVariableItem::Unknown(ASYNC_OPERATIONS_WINDOW, vec![0, 1, 0, 1]),
            UserVariableItem::ScuScpRoleSelectionSubItem(
                "1.2.840.10008.5.1.4.1.1.2".into(),
                RequestorRoles {
                    scu: false,
                    scp: true,
                },
            ),
        ];
        if let Some(i) = identity {
            uv.push(UserVariableItem::UserIdentityItem(i));
        }
        AssociationRQ {
            protocol_version: 1,
            calling_ae_title: "CLIENT".into(),
            called_ae_title: "PACSGATE".into(),
            application_context_name: APPLICATION_CONTEXT.into(),
            presentation_contexts: vec![
                PresentationContextProposed {
                    id: 1,
                    abstract_syntax: FIND.into(),
                    transfer_syntaxes: vec![ELE.into(), ILE.into()],
                },
                PresentationContextProposed {
                    id: 3,
                    abstract_syntax: "1.2.840.10008.1.1".into(),
                    transfer_syntaxes: vec![ILE.into()],
                },
                PresentationContextProposed {
                    id: 5,
                    abstract_syntax: "1.2.3.4".into(),
                    transfer_syntaxes: vec![ILE.into()],
                },
            ],
            user_variables: uv,
        }
    }

    #[test]
    fn identity_types() {
        let jwt = UserIdentity::new(true, UserIdentityType::Jwt, b"a.b.c\n".to_vec(), vec![]);
        let p = presented_identity(&rq(Some(jwt))).unwrap();
        assert_eq!(p.token, "a.b.c");
        assert!(p.positive_response_requested);

        let up = UserIdentity::new(
            false,
            UserIdentityType::UsernamePassword,
            b"user".to_vec(),
            b"x.y.z".to_vec(),
        );
        assert_eq!(presented_identity(&rq(Some(up))).unwrap().token, "x.y.z");

        assert_eq!(presented_identity(&rq(None)), Err(IdentityError::Missing));
        let u = UserIdentity::new(false, UserIdentityType::Username, b"alice".to_vec(), vec![]);
        assert_eq!(
            presented_identity(&rq(Some(u))),
            Err(IdentityError::UnsupportedType(1))
        );
        let saml = UserIdentity::new(
            false,
            UserIdentityType::SamlAssertion,
            b"<x/>".to_vec(),
            vec![],
        );
        assert_eq!(
            presented_identity(&rq(Some(saml))),
            Err(IdentityError::UnsupportedType(4))
        );
        let empty = UserIdentity::new(false, UserIdentityType::Jwt, vec![], vec![]);
        assert_eq!(
            presented_identity(&rq(Some(empty))),
            Err(IdentityError::Empty)
        );
        let bad = UserIdentity::new(false, UserIdentityType::Jwt, vec![0xff, 0xfe], vec![]);
        assert_eq!(
            presented_identity(&rq(Some(bad))),
            Err(IdentityError::NotUtf8)
        );
    }

    #[test]
    fn upstream_request_keeps_contexts_and_drops_identity() {
        let jwt = UserIdentity::new(
            true,
            UserIdentityType::Jwt,
            b"secret.token.here".to_vec(),
            vec![],
        );
        let up = upstream_request(&rq(Some(jwt)), "PACSGATE", "ORTHANC", 65536, false);
        assert_eq!(up.calling_ae_title, "PACSGATE");
        assert_eq!(up.called_ae_title, "ORTHANC");
        assert_eq!(up.presentation_contexts, rq(None).presentation_contexts);
        assert!(
            up.user_variables
                .contains(&UserVariableItem::MaxLength(65536))
        );
        assert!(
            !up.user_variables
                .iter()
                .any(|v| matches!(v, UserVariableItem::UserIdentityItem(_)))
        );
        assert!(
            !up.user_variables
                .iter()
                .any(|v| matches!(v, UserVariableItem::Unknown(ASYNC_OPERATIONS_WINDOW, _)))
        );
        assert!(
            up.user_variables
                .iter()
                .any(|v| matches!(v, UserVariableItem::ScuScpRoleSelectionSubItem(..)))
        );
        let mut enc = Vec::new();
        dicom_ul::write_pdu(&mut enc, &dicom_ul::Pdu::AssociationRQ(up)).unwrap();
        assert!(
            !enc.windows(17).any(|w| w == b"secret.token.here"),
            "the token never goes upstream"
        );
    }

    #[test]
    fn downstream_accept_mirrors_the_pacs() {
        let upstream = AssociationAC {
            protocol_version: 1,
            calling_ae_title: "PACSGATE".into(),
            called_ae_title: "ORTHANC".into(),
            application_context_name: APPLICATION_CONTEXT.into(),
            presentation_contexts: vec![
                PresentationContextResult {
                    id: 1,
                    reason: PresentationContextResultReason::Acceptance,
                    transfer_syntax: ILE.into(),
                },
                // accepted with a syntax the client never proposed for id 3: must be refused
                PresentationContextResult {
                    id: 3,
                    reason: PresentationContextResultReason::Acceptance,
                    transfer_syntax: ELE.into(),
                },
                PresentationContextResult {
                    id: 5,
                    reason: PresentationContextResultReason::AbstractSyntaxNotSupported,
                    transfer_syntax: ILE.into(),
                },
            ],
            user_variables: vec![UserVariableItem::MaxLength(16384)],
        };
        let (ac, accepted) = downstream_accept(&rq(None), &upstream, 65536, true, false);
        assert_eq!(ac.calling_ae_title, "CLIENT");
        assert_eq!(ac.called_ae_title, "PACSGATE");
        assert_eq!(
            ac.presentation_contexts[0].reason,
            PresentationContextResultReason::Acceptance
        );
        assert_eq!(ac.presentation_contexts[0].transfer_syntax, ILE);
        assert_eq!(
            ac.presentation_contexts[1].reason,
            PresentationContextResultReason::NoReason
        );
        assert_eq!(
            ac.presentation_contexts[2].reason,
            PresentationContextResultReason::AbstractSyntaxNotSupported
        );
        assert_eq!(accepted.len(), 1);
        assert_eq!(accepted[&1].abstract_syntax, FIND);
        assert!(
            ac.user_variables
                .contains(&UserVariableItem::Unknown(0x59, vec![0, 0]))
        );
        assert!(
            ac.user_variables
                .contains(&UserVariableItem::MaxLength(65536))
        );
        let (ac, _) = downstream_accept(&rq(None), &upstream, 65536, false, false);
        assert!(
            !ac.user_variables
                .iter()
                .any(|v| matches!(v, UserVariableItem::Unknown(0x59, _)))
        );
        // The 0x59 item is encoded as PS3.7 Table D.3-15 says: 59 00 | 00 02 | 00 00
        let (ac, _) = downstream_accept(&rq(None), &upstream, 65536, true, false);
        let mut enc = Vec::new();
        dicom_ul::write_pdu(&mut enc, &dicom_ul::Pdu::AssociationAC(ac)).unwrap();
        assert!(enc.windows(6).any(|w| w == [0x59, 0, 0, 2, 0, 0]));
    }

    #[test]
    fn rejections_have_standard_sources() {
        let r = reject(Refusal::Identity);
        assert_eq!(r.result, AssociationRJResult::Permanent);
        assert!(matches!(
            r.source,
            AssociationRJSource::ServiceProviderASCE(
                AssociationRJServiceProviderASCEReason::NoReasonGiven
            )
        ));
        assert_eq!(reject(Refusal::Busy).result, AssociationRJResult::Transient);
    }
}
