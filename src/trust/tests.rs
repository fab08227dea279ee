//! Token validation tests against a live development issuer on loopback: good tokens of every
//! key type, and the forgeries RFC 8725 warns about.

use super::*;
use crate::config::Config;
use crate::devissuer::{DevIssuer, DevKey, MintRequest};
use base64::Engine;
use jsonwebtoken::Algorithm;
use serde_json::json;
use std::sync::Arc;

const AUD: &str = "http://127.0.0.1:8080/dicom-web";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

struct Fixture {
    issuer: Arc<DevIssuer>,
    trust: Arc<TrustCore>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn fixture_with(alg: Algorithm, extra_issuer_toml: &str) -> Fixture {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let issuer = Arc::new(DevIssuer::new(
        url.clone(),
        DevKey::generate(alg).unwrap(),
        AUD.into(),
    ));
    let server = tokio::spawn(crate::devissuer::serve(listener, issuer.clone()));
    let cfg = Config::parse(&format!(
        r#"
[gateway]
ae_title = "PACSGATE"
dimse_listen = "127.0.0.1:11112"
public_url = "http://127.0.0.1:8080"
[pacs]
ae_title = "ORTHANC"
address = "127.0.0.1:4242"
[[issuers]]
issuer = "{url}"
{extra_issuer_toml}
"#
    ))
    .unwrap();
    Fixture {
        trust: TrustCore::new(&cfg).unwrap(),
        issuer,
        server,
    }
}

async fn fixture() -> Fixture {
    fixture_with(Algorithm::ES256, "").await
}

fn req(patient: &str) -> MintRequest {
    MintRequest {
        patient: Some(patient.into()),
        scope: Some("openid patient/ImagingStudy.rs".into()),
        ..Default::default()
    }
}

fn parts(token: &str) -> (serde_json::Value, serde_json::Value, String) {
    let p: Vec<&str> = token.split('.').collect();
    (
        serde_json::from_slice(&B64.decode(p[0]).unwrap()).unwrap(),
        serde_json::from_slice(&B64.decode(p[1]).unwrap()).unwrap(),
        p[2].to_string(),
    )
}

fn assemble(h: &serde_json::Value, c: &serde_json::Value, sig: &str) -> String {
    format!(
        "{}.{}.{}",
        B64.encode(h.to_string()),
        B64.encode(c.to_string()),
        sig
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn good_tokens_of_every_key_type_verify() {
    for alg in [
        Algorithm::ES256,
        Algorithm::ES384,
        Algorithm::RS256,
        Algorithm::PS256,
    ] {
        let f = fixture_with(alg, "").await;
        let t = f.issuer.mint(&req("PAT1")).unwrap();
        let p = f
            .trust
            .verify(&t)
            .await
            .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
        assert_eq!(p.patient.as_deref(), Some("PAT1"));
        assert_eq!(p.client_id.as_deref(), Some("dev-viewer"));
        assert!(
            p.scopes
                .granted(scopes::Level::Patient, "ImagingStudy")
                .read
        );
        assert_eq!(p.token_id.len(), 16);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn patient_claim_is_normalized() {
    let f = fixture().await;
    let base = f.issuer.issuer.clone();
    for (claim, want) in [
        ("Patient/123".to_string(), Some("123")),
        (format!("{base}/Patient/abc-1.2"), Some("abc-1.2")),
        ("123".to_string(), Some("123")),
        ("https://elsewhere.example/Patient/9".to_string(), None),
        ("Patient/a b".to_string(), None),
        ("Patient/".to_string(), None),
    ] {
        let t = f.issuer.mint(&req(&claim)).unwrap();
        match (f.trust.verify(&t).await, want) {
            (Ok(p), Some(w)) => assert_eq!(p.patient.as_deref(), Some(w), "{claim}"),
            (Err(TrustError::Claim("patient")), None) => {}
            (other, _) => panic!("{claim}: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn alg_none_is_refused() {
    let f = fixture().await;
    let t = f.issuer.mint(&req("PAT1")).unwrap();
    let (mut h, c, _) = parts(&t);
    h["alg"] = json!("none");
    let forged = assemble(&h, &c, "");
    assert!(matches!(
        f.trust.verify(&forged).await,
        Err(TrustError::Algorithm(_))
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn hmac_signed_with_the_public_key_is_refused() {
    let f = fixture_with(Algorithm::RS256, "").await;
    let t = f.issuer.mint(&req("PAT1")).unwrap();
    let (mut h, c, _) = parts(&t);
    h["alg"] = json!("HS256");
    // The classic confusion attack: HMAC keyed with the issuer's public key material.
    let secret = f.issuer.key.public_jwk().to_string();
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).unwrap();
    let mut hdr = jsonwebtoken::Header::new(Algorithm::HS256);
    hdr.kid = h["kid"].as_str().map(str::to_string);
    hdr.typ = Some("at+jwt".into());
    let forged = jsonwebtoken::encode(&hdr, &c, &key).unwrap();
    assert!(matches!(f.trust.verify(&forged).await, Err(TrustError::Algorithm(a)) if a == "HS256"));
}

#[tokio::test(flavor = "multi_thread")]
async fn alg_not_matching_key_type_is_refused() {
    // An ES256 issuer; a token claiming RS256 must find no key.
    let f = fixture().await;
    let t = f.issuer.mint(&req("PAT1")).unwrap();
    let (mut h, c, s) = parts(&t);
    h["alg"] = json!("RS256");
    let forged = assemble(&h, &c, &s);
    assert!(matches!(
        f.trust.verify(&forged).await,
        Err(TrustError::Keys(_))
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn tampered_payload_is_refused() {
    let f = fixture().await;
    let t = f.issuer.mint(&req("PAT1")).unwrap();
    let (h, mut c, s) = parts(&t);
    c["patient"] = json!("PAT2");
    let forged = assemble(&h, &c, &s);
    assert!(matches!(
        f.trust.verify(&forged).await,
        Err(TrustError::Signature)
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn token_signed_by_another_key_with_the_same_kid_is_refused() {
    let f = fixture().await;
    let other = DevKey::generate(Algorithm::ES256).unwrap();
    let claims = f.issuer.claims(&req("PAT1"));
    let mut h = jsonwebtoken::Header::new(Algorithm::ES256);
    h.kid = Some(f.issuer.key.kid.clone());
    h.typ = Some("at+jwt".into());
    let t = other.sign(&claims).unwrap();
    let (_, c, s) = parts(&t);
    let forged = assemble(&serde_json::to_value(&h).unwrap(), &c, &s);
    assert!(matches!(
        f.trust.verify(&forged).await,
        Err(TrustError::Signature)
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_kid_is_refused_after_one_refetch() {
    let f = fixture().await;
    let other = DevKey::generate(Algorithm::ES256).unwrap();
    let t = other.sign(&f.issuer.claims(&req("PAT1"))).unwrap();
    match f.trust.verify(&t).await {
        Err(TrustError::Keys(KeyError::NoMatchingKey { kid, .. })) => {
            assert_eq!(kid.as_deref(), Some(other.kid.as_str()))
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_wrong_audience_and_future_tokens_are_refused() {
    let f = fixture().await;
    let expired = f
        .issuer
        .mint(&MintRequest {
            expires_in: Some(-120),
            ..req("PAT1")
        })
        .unwrap();
    assert!(matches!(
        f.trust.verify(&expired).await,
        Err(TrustError::Expired)
    ));
    // within the 60 s leeway
    let just = f
        .issuer
        .mint(&MintRequest {
            expires_in: Some(-30),
            ..req("PAT1")
        })
        .unwrap();
    assert!(f.trust.verify(&just).await.is_ok());

    let wrong_aud = f
        .issuer
        .mint(&MintRequest {
            aud: Some("https://other.example/fhir".into()),
            ..req("PAT1")
        })
        .unwrap();
    assert!(matches!(
        f.trust.verify(&wrong_aud).await,
        Err(TrustError::Audience)
    ));

    let mut c = f.issuer.claims(&req("PAT1"));
    c["aud"] = json!(["https://other.example", AUD]);
    assert!(
        f.trust
            .verify(&f.issuer.key.sign(&c).unwrap())
            .await
            .is_ok(),
        "aud as array"
    );

    let mut c = f.issuer.claims(&req("PAT1"));
    c.as_object_mut().unwrap().remove("aud");
    assert!(matches!(
        f.trust.verify(&f.issuer.key.sign(&c).unwrap()).await,
        Err(TrustError::Audience)
    ));

    let mut c = f.issuer.claims(&req("PAT1"));
    c.as_object_mut().unwrap().remove("exp");
    assert!(
        f.trust
            .verify(&f.issuer.key.sign(&c).unwrap())
            .await
            .is_err(),
        "exp is required"
    );

    let mut c = f.issuer.claims(&req("PAT1"));
    c["nbf"] = json!(c["iat"].as_i64().unwrap() + 600);
    assert!(matches!(
        f.trust.verify(&f.issuer.key.sign(&c).unwrap()).await,
        Err(TrustError::NotYetValid)
    ));

    let mut c = f.issuer.claims(&req("PAT1"));
    c["iat"] = json!(c["iat"].as_i64().unwrap() + 600);
    assert!(matches!(
        f.trust.verify(&f.issuer.key.sign(&c).unwrap()).await,
        Err(TrustError::IssuedInFuture)
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn untrusted_issuer_is_refused_without_network() {
    let f = fixture().await;
    let mut c = f.issuer.claims(&req("PAT1"));
    // An issuer URL on a port nobody listens on: a network call would fail differently.
    c["iss"] = json!("http://127.0.0.1:9/");
    let t = f.issuer.key.sign(&c).unwrap();
    assert!(matches!(
        f.trust.verify(&t).await,
        Err(TrustError::UntrustedIssuer(_))
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn typ_is_checked_per_issuer() {
    let f = fixture().await;
    let c = f.issuer.claims(&req("PAT1"));
    let jwt_typ = f.issuer.key.sign_with_typ(&c, Some("JWT")).unwrap();
    assert!(matches!(
        f.trust.verify(&jwt_typ).await,
        Err(TrustError::Type(_))
    ));
    let f = fixture_with(Algorithm::ES256, "accept_typ = [\"at+jwt\", \"JWT\", \"\"]").await;
    let c = f.issuer.claims(&req("PAT1"));
    assert!(
        f.trust
            .verify(&f.issuer.key.sign_with_typ(&c, Some("JWT")).unwrap())
            .await
            .is_ok()
    );
    assert!(
        f.trust
            .verify(&f.issuer.key.sign_with_typ(&c, None).unwrap())
            .await
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn embedded_keys_in_the_header_are_ignored() {
    // A token signed by an attacker's key that ships its own jwk/jku in the header.
    let f = fixture().await;
    let attacker = DevKey::generate(Algorithm::ES256).unwrap();
    let mut h = jsonwebtoken::Header::new(Algorithm::ES256);
    h.typ = Some("at+jwt".into());
    h.jku = Some("http://127.0.0.1:9/jwks".into());
    h.jwk = Some(serde_json::from_value(attacker.public_jwk().clone()).unwrap());
    let t = attacker.sign(&f.issuer.claims(&req("PAT1"))).unwrap();
    let (_, c, s) = parts(&t);
    let forged = assemble(&serde_json::to_value(&h).unwrap(), &c, &s);
    assert!(matches!(
        f.trust.verify(&forged).await,
        Err(TrustError::Signature)
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn allowed_client_ids_restrict_clients() {
    let f = fixture_with(Algorithm::ES256, "allowed_client_ids = [\"viewer-app\"]").await;
    let t = f.issuer.mint(&req("PAT1")).unwrap();
    assert!(matches!(f.trust.verify(&t).await, Err(TrustError::Client)));
    let t = f
        .issuer
        .mint(&MintRequest {
            client_id: Some("viewer-app".into()),
            ..req("PAT1")
        })
        .unwrap();
    assert!(f.trust.verify(&t).await.is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_and_oversized_tokens_are_refused() {
    let f = fixture().await;
    for t in ["", "abc", "a.b.c", "....", "eyJhbGciOiJFUzI1NiJ9.e30"] {
        assert!(f.trust.verify(t).await.is_err(), "{t:?}");
    }
    let big = "a".repeat(MAX_TOKEN_BYTES + 1);
    assert!(matches!(f.trust.verify(&big).await, Err(TrustError::Size)));
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_are_discovered_and_cached() {
    let mut f = fixture().await;
    let t = f.issuer.mint(&req("PAT1")).unwrap();
    f.trust.verify(&t).await.unwrap();
    // A second verification must not need the issuer: the keys are cached.
    f.server.abort();
    let _ = (&mut f.server).await;
    let t2 = f.issuer.mint(&req("PAT2")).unwrap();
    assert!(f.trust.verify(&t2).await.is_ok());
}

/// An issuer whose metadata and JWKS are served by a test server that counts requests: two
/// keys of different types, discovery only through openid-configuration.
struct CountingIssuer {
    url: String,
    keys: Vec<DevKey>,
    jwks_hits: Arc<std::sync::atomic::AtomicUsize>,
}

async fn counting_issuer() -> CountingIssuer {
    use axum::routing::get;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let keys = vec![
        DevKey::generate(Algorithm::ES256).unwrap(),
        DevKey::generate(Algorithm::RS256).unwrap(),
    ];
    let jwks = json!({ "keys": keys.iter().map(|k| k.public_jwk().clone()).collect::<Vec<_>>() });
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let u = url.clone();
    let app = axum::Router::new()
        // no smart-configuration here: the openid-configuration fallback must be used
        .route(
            "/.well-known/openid-configuration",
            get(move || async move {
                axum::Json(json!({ "issuer": u, "jwks_uri": format!("{u}/keys") }))
            }),
        )
        .route(
            "/keys",
            get(move || {
                h.fetch_add(1, Ordering::SeqCst);
                let j = jwks.clone();
                async move { axum::Json(j) }
            }),
        );
    tokio::spawn(async move { axum::serve(listener, app).await });
    CountingIssuer {
        url,
        keys,
        jwks_hits: hits,
    }
}

fn trust_for(url: &str) -> Arc<TrustCore> {
    let cfg = Config::parse(&format!(
        "[gateway]\nae_title = \"GW\"\ndimse_listen = \"127.0.0.1:1\"\npublic_url = \"http://127.0.0.1:8080\"\n\
         [pacs]\nae_title = \"P\"\naddress = \"127.0.0.1:2\"\n[[issuers]]\nissuer = \"{url}\"\n"
    ))
    .unwrap();
    TrustCore::new(&cfg).unwrap()
}

fn claims_for(iss: &str, patient: &str) -> serde_json::Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    json!({"iss": iss, "aud": AUD, "exp": now + 600, "iat": now, "scope": "patient/ImagingStudy.rs", "patient": patient})
}

#[tokio::test(flavor = "multi_thread")]
async fn several_keys_openid_discovery_and_rate_limited_refetch() {
    use std::sync::atomic::Ordering;
    let ci = counting_issuer().await;
    let trust = trust_for(&ci.url);
    // both keys of the set verify their tokens
    for k in &ci.keys {
        let p = trust
            .verify(&k.sign(&claims_for(&ci.url, "P1")).unwrap())
            .await
            .unwrap();
        assert_eq!(p.patient.as_deref(), Some("P1"));
    }
    assert_eq!(
        ci.jwks_hits.load(Ordering::SeqCst),
        1,
        "one fetch serves both keys"
    );
    // a burst of tokens with unknown kids causes at most one refetch per minute
    for _ in 0..20 {
        let stranger = DevKey::generate(Algorithm::ES256).unwrap();
        assert!(
            trust
                .verify(&stranger.sign(&claims_for(&ci.url, "P1")).unwrap())
                .await
                .is_err()
        );
    }
    assert_eq!(
        ci.jwks_hits.load(Ordering::SeqCst),
        1,
        "refetches are rate-limited"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_issuer_fails_closed() {
    // A configured issuer nobody serves: the key fetch fails and the token is refused.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let trust = trust_for(&url);
    let k = DevKey::generate(Algorithm::ES256).unwrap();
    match trust
        .verify(&k.sign(&claims_for(&url, "P1")).unwrap())
        .await
    {
        Err(TrustError::Keys(KeyError::Unavailable { .. })) => {}
        other => panic!("{other:?}"),
    }
}

// ---- introspection ----

struct IntroFixture {
    issuer: Arc<DevIssuer>,
    trust: Arc<TrustCore>,
    url: String,
}

/// A development issuer with a registered client, and a trust core that introspects at it.
async fn intro_fixture(
    mode: &str,
    client: crate::devissuer::DevClient,
    creds: &str,
) -> IntroFixture {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let mut di = DevIssuer::new(
        url.clone(),
        DevKey::generate(Algorithm::ES256).unwrap(),
        AUD.into(),
    );
    di.clients.push(client);
    let issuer = Arc::new(di);
    tokio::spawn(crate::devissuer::serve(listener, issuer.clone()));
    let cfg = Config::parse(&format!(
        "[gateway]\nae_title = \"GW\"\ndimse_listen = \"127.0.0.1:1\"\npublic_url = \"http://127.0.0.1:8080\"\n\
         [limits]\nhttp_fetch_timeout_secs = 1\n\
         [pacs]\nae_title = \"P\"\naddress = \"127.0.0.1:2\"\n[[issuers]]\nissuer = \"{url}\"\nverify = \"{mode}\"\n{creds}\n"
    ))
    .unwrap();
    IntroFixture {
        trust: TrustCore::new(&cfg).unwrap(),
        issuer,
        url,
    }
}

fn secret_client() -> crate::devissuer::DevClient {
    crate::devissuer::DevClient {
        id: "pacsgate".into(),
        secret: Some("s3cret".into()),
        key: None,
        jwks: None,
    }
}

const SECRET: &str = "client_id = \"pacsgate\"\nclient_secret = \"s3cret\"";

#[tokio::test(flavor = "multi_thread")]
async fn opaque_tokens_are_judged_by_introspection() {
    let f = intro_fixture("introspection", secret_client(), SECRET).await;
    let t = f.issuer.mint_opaque(&req("Patient/PAT1"));
    assert!(!t.contains('.'), "an opaque token");
    let p = f.trust.verify(&t).await.unwrap();
    assert_eq!(p.patient.as_deref(), Some("PAT1"));
    assert!(
        p.scopes
            .granted(scopes::Level::Patient, "ImagingStudy")
            .read
    );
    assert!(matches!(
        f.trust.verify("opaque-unknown-token").await,
        Err(TrustError::Inactive)
    ));
    // a JWT of an introspection issuer is judged by introspection too
    let jwt = f.issuer.mint(&req("PAT2")).unwrap();
    assert_eq!(
        f.trust.verify(&jwt).await.unwrap().patient.as_deref(),
        Some("PAT2")
    );
    // expired
    let old = f.issuer.mint_opaque(&MintRequest {
        expires_in: Some(-10),
        ..req("PAT1")
    });
    assert!(matches!(
        f.trust.verify(&old).await,
        Err(TrustError::Inactive)
    ));
    // another audience in the answer
    let other = f.issuer.mint_opaque(&MintRequest {
        aud: Some("https://elsewhere.example".into()),
        ..req("PAT1")
    });
    assert!(matches!(
        f.trust.verify(&other).await,
        Err(TrustError::Audience)
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_are_cached_and_revocation_is_seen_after_the_cache() {
    let f = intro_fixture(
        "jwt+introspection",
        secret_client(),
        &format!("{SECRET}\nintrospection_cache_secs = 0.3"),
    )
    .await;
    let t = f.issuer.mint(&req("PAT1")).unwrap();
    f.trust.verify(&t).await.unwrap();
    let http = reqwest::Client::new();
    http.post(format!("{}/revoke", f.url))
        .form(&[("token", t.as_str())])
        .send()
        .await
        .unwrap();
    assert!(f.trust.verify(&t).await.is_ok(), "cached answer");
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    assert!(
        matches!(f.trust.verify(&t).await, Err(TrustError::Inactive)),
        "revoked"
    );
    // jwt+introspection still checks the signature first
    let other = DevKey::generate(Algorithm::ES256).unwrap();
    let forged = other.sign(&f.issuer.claims(&req("PAT1"))).unwrap();
    assert!(f.trust.verify(&forged).await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_secret_fails_closed() {
    let f = intro_fixture(
        "introspection",
        secret_client(),
        "client_id = \"pacsgate\"\nclient_secret = \"wrong\"",
    )
    .await;
    let t = f.issuer.mint_opaque(&req("PAT1"));
    assert!(matches!(
        f.trust.verify(&t).await,
        Err(TrustError::Unavailable(_))
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn backend_services_credentials_work() {
    let dir = std::env::temp_dir().join(format!("pacsgate-client-key-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key_file = dir.join("client.pem");
    let key = DevKey::generate(Algorithm::RS384).unwrap();
    let _ = std::fs::remove_file(&key_file);
    key.save_new(&key_file).unwrap();
    let public = DevKey::load(&key_file, Algorithm::RS384).unwrap();
    let client = crate::devissuer::DevClient {
        id: "pacsgate".into(),
        secret: None,
        key: Some(public),
        jwks: None,
    };
    let f = intro_fixture(
        "introspection",
        client,
        &format!(
            "client_id = \"pacsgate\"\nclient_key_file = \"{}\"",
            key_file.display()
        ),
    )
    .await;
    let t = f.issuer.mint_opaque(&req("PAT1"));
    assert_eq!(
        f.trust.verify(&t).await.unwrap().patient.as_deref(),
        Some("PAT1")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// An introspection endpoint that misbehaves: garbage, or no answer in time.
async fn broken_endpoint(kind: &'static str) -> String {
    use axum::routing::post;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/introspect", listener.local_addr().unwrap());
    let app = axum::Router::new().route(
        "/introspect",
        post(move || async move {
            match kind {
                "garbage" => "<html>surprise</html>".to_string(),
                "no-active" => "{\"scope\": \"patient/*.*\"}".to_string(),
                _ => {
                    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                    "{\"active\": true}".to_string()
                }
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_introspection_endpoints_deny() {
    for kind in ["garbage", "no-active", "slow"] {
        let endpoint = broken_endpoint(kind).await;
        let f = intro_fixture(
            "introspection",
            secret_client(),
            &format!("{SECRET}\nintrospection_endpoint = \"{endpoint}\""),
        )
        .await;
        let t = f.issuer.mint_opaque(&req("PAT1"));
        let started = std::time::Instant::now();
        match f.trust.verify(&t).await {
            Err(TrustError::Unavailable(_)) => {}
            other => panic!("{kind}: {other:?}"),
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(4),
            "{kind}: bounded wait"
        );
    }
    // and an endpoint nobody serves
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}/introspect", dead.local_addr().unwrap());
    drop(dead);
    let f = intro_fixture(
        "introspection",
        secret_client(),
        &format!("{SECRET}\nintrospection_endpoint = \"{endpoint}\""),
    )
    .await;
    assert!(matches!(
        f.trust.verify(&f.issuer.mint_opaque(&req("PAT1"))).await,
        Err(TrustError::Unavailable(_))
    ));
}

/// An introspection endpoint answering whatever `answer` holds (`{ISS}` stands for the
/// issuer's URL), counting the requests it gets.
async fn scripted_endpoint(
    answer: Arc<std::sync::Mutex<String>>,
    hits: Arc<std::sync::atomic::AtomicUsize>,
) -> String {
    use axum::routing::post;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/introspect", listener.local_addr().unwrap());
    let app = axum::Router::new().route(
        "/introspect",
        post(move || {
            let a = answer.lock().unwrap().clone();
            hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move { ([("content-type", "application/json")], a) }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

#[tokio::test(flavor = "multi_thread")]
async fn introspection_answers_must_be_the_issuers_about_an_access_token_for_the_gateway() {
    let answer = Arc::new(std::sync::Mutex::new(String::new()));
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let endpoint = scripted_endpoint(answer.clone(), hits.clone()).await;
    let f = intro_fixture(
        "introspection",
        secret_client(),
        &format!("{SECRET}\nintrospection_endpoint = \"{endpoint}\""),
    )
    .await;
    let later = now_secs() + 3600;
    let base = format!(
        r#""active": true, "scope": "patient/ImagingStudy.rs", "patient": "PAT1", "exp": {later}"#
    );
    let cases = [
        (
            format!(r#"{{{base}, "iss": "{{ISS}}", "aud": "{AUD}"}}"#),
            true,
        ),
        (format!(r#"{{{base}, "aud": "{AUD}"}}"#), true),
        (
            format!(r#"{{{base}, "iss": "{{ISS}}", "aud": "{AUD}", "token_type": "Bearer"}}"#),
            true,
        ),
        // no aud, or someone else's
        (format!(r#"{{{base}, "iss": "{{ISS}}"}}"#), false),
        (
            format!(r#"{{{base}, "iss": "{{ISS}}", "aud": "https://other.example"}}"#),
            false,
        ),
        // another issuer's string, a trailing slash, not a string
        (
            format!(r#"{{{base}, "iss": "https://other.example", "aud": "{AUD}"}}"#),
            false,
        ),
        (
            format!(r#"{{{base}, "iss": "{{ISS}}/", "aud": "{AUD}"}}"#),
            false,
        ),
        (
            format!(r#"{{{base}, "iss": ["{{ISS}}"], "aud": "{AUD}"}}"#),
            false,
        ),
        // not an access token, not valid yet
        (
            format!(r#"{{{base}, "aud": "{AUD}", "token_type": "refresh_token"}}"#),
            false,
        ),
        (
            format!(r#"{{{base}, "aud": "{AUD}", "nbf": {later}}}"#),
            false,
        ),
    ];
    for (json, ok) in cases {
        *answer.lock().unwrap() = json.replace("{ISS}", &f.url);
        let t = f.issuer.mint_opaque(&req("PAT1"));
        let r = f.trust.verify(&t).await;
        assert_eq!(r.is_ok(), ok, "{json}: {r:?}");
    }
    // an authorization server that omits aud, where the issuer says so
    let optional = intro_fixture(
        "introspection",
        secret_client(),
        &format!(
            "{SECRET}\nintrospection_endpoint = \"{endpoint}\"\nintrospection_aud_optional = true"
        ),
    )
    .await;
    *answer.lock().unwrap() = format!("{{{base}}}");
    assert!(
        optional
            .trust
            .verify(&optional.issuer.mint_opaque(&req("PAT1")))
            .await
            .is_ok()
    );
}

// ---- multi-server tokens and vendor quirks ----

#[tokio::test(flavor = "multi_thread")]
async fn authorization_details_for_the_gateway_apply_their_own_scope_and_patient() {
    let f = fixture().await;
    let mut c = f.issuer.claims(&req("EHR-123"));
    c["scope"] = json!("patient/*.rs");
    c["authorization_details"] = json!([
        {"type": "smart_on_fhir", "locations": ["https://ehr.example.org/fhir"], "scope": "patient/*.cruds", "patient": "EHR-123"},
        {"type": "smart_on_fhir", "locations": ["http://127.0.0.1:8080/dicom-web/"], "scope": "patient/ImagingStudy.rs", "patient": "Patient/MRN-9"},
    ]);
    let p = f
        .trust
        .verify(&f.issuer.key.sign(&c).unwrap())
        .await
        .unwrap();
    assert_eq!(
        p.patient.as_deref(),
        Some("MRN-9"),
        "the gateway's own patient id"
    );
    assert!(
        p.scopes
            .granted(scopes::Level::Patient, "ImagingStudy")
            .read
    );
    assert!(
        !p.scopes
            .granted(scopes::Level::Patient, "ImagingStudy")
            .create,
        "the location's scope, not the top-level one"
    );
    // an entry for other servers only changes nothing
    let mut c = f.issuer.claims(&req("EHR-123"));
    c["authorization_details"] =
        json!([{"type": "smart_on_fhir", "locations": ["https://other.example"], "patient": "X"}]);
    assert_eq!(
        f.trust
            .verify(&f.issuer.key.sign(&c).unwrap())
            .await
            .unwrap()
            .patient
            .as_deref(),
        Some("EHR-123")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn patient_in_sub_only_when_configured() {
    let f = fixture().await;
    let mut c = f.issuer.claims(&MintRequest {
        scope: Some("patient/ImagingStudy.rs".into()),
        ..Default::default()
    });
    c["sub"] = json!("Patient/P77");
    assert_eq!(
        f.trust
            .verify(&f.issuer.key.sign(&c).unwrap())
            .await
            .unwrap()
            .patient,
        None
    );
    let f = fixture_with(Algorithm::ES256, "patient_in_sub = true").await;
    let mut c = f.issuer.claims(&MintRequest {
        scope: Some("patient/ImagingStudy.rs".into()),
        ..Default::default()
    });
    c["sub"] = json!(format!("{}/Patient/P77", f.issuer.issuer));
    assert_eq!(
        f.trust
            .verify(&f.issuer.key.sign(&c).unwrap())
            .await
            .unwrap()
            .patient
            .as_deref(),
        Some("P77")
    );
    c["sub"] = json!("user-1");
    assert_eq!(
        f.trust
            .verify(&f.issuer.key.sign(&c).unwrap())
            .await
            .unwrap()
            .patient,
        None
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn introspection_endpoint_derived_from_the_token_endpoint() {
    use axum::routing::get;
    // The issuer's metadata (served apart) advertises a broken introspection endpoint; the
    // working one sits next to its token endpoint, as on servers that do not advertise it.
    let broken = broken_endpoint("garbage").await;
    let meta = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let iss = format!("http://{}", meta.local_addr().unwrap());
    let dev = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dev_url = format!("http://{}", dev.local_addr().unwrap());
    let mut di = DevIssuer::new(
        iss.clone(),
        DevKey::generate(Algorithm::ES256).unwrap(),
        AUD.into(),
    );
    di.clients.push(secret_client());
    let issuer = Arc::new(di);
    tokio::spawn(crate::devissuer::serve(dev, issuer.clone()));
    let doc = json!({"issuer": iss, "token_endpoint": format!("{dev_url}/token"), "introspection_endpoint": broken});
    let app = axum::Router::new().route(
        "/.well-known/smart-configuration",
        get(move || async move { axum::Json(doc) }),
    );
    tokio::spawn(async move { axum::serve(meta, app).await });
    let trust_with = |derive: bool| {
        let cfg = Config::parse(&format!(
            "[gateway]\nae_title = \"GW\"\ndimse_listen = \"127.0.0.1:1\"\npublic_url = \"http://127.0.0.1:8080\"\n\
             [pacs]\nae_title = \"P\"\naddress = \"127.0.0.1:2\"\n[[issuers]]\nissuer = \"{iss}\"\nverify = \"introspection\"\n{SECRET}\n\
             introspection_from_token_endpoint = {derive}\n"
        ))
        .unwrap();
        TrustCore::new(&cfg).unwrap()
    };
    let t = issuer.mint_opaque(&req("PAT1"));
    assert!(
        matches!(
            trust_with(false).verify(&t).await,
            Err(TrustError::Unavailable(_))
        ),
        "the advertised one is broken"
    );
    assert_eq!(
        trust_with(true)
            .verify(&t)
            .await
            .unwrap()
            .patient
            .as_deref(),
        Some("PAT1")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ehr_audience_only_when_allowed() {
    let ehr_aud = "https://ehr.example.org/fhir";
    let f = fixture().await;
    let t = f
        .issuer
        .mint(&MintRequest {
            aud: Some(ehr_aud.into()),
            ..req("PAT1")
        })
        .unwrap();
    assert!(matches!(
        f.trust.verify(&t).await,
        Err(TrustError::Audience)
    ));
    let f = fixture_with(
        Algorithm::ES256,
        &format!("fhir_base_url = \"{ehr_aud}\"\naccept_ehr_audience = true"),
    )
    .await;
    let t = f
        .issuer
        .mint(&MintRequest {
            aud: Some(ehr_aud.into()),
            ..req("PAT1")
        })
        .unwrap();
    assert_eq!(
        f.trust.verify(&t).await.unwrap().patient.as_deref(),
        Some("PAT1")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn launch_context_restricts_only_when_configured() {
    use super::ContextStudy;
    let ctx = json!([
        {"reference": "Patient/EHR-123", "role": "launch-patient"},
        {"reference": "ImagingStudy/is-1"},
        {"type": "ImagingStudy", "identifier": {"system": "urn:dicom:uid", "value": "urn:oid:1.2.3"}},
        {"reference": "http://ehr.example/fhir/ImagingStudy/is-2"},
        {"reference": "https://elsewhere.example/fhir/ImagingStudy/is-3"},
        {"type": "ImagingStudy", "identifier": {"system": "http://hospital/acc", "value": "A1"}},
        {"reference": "ImagingStudy/../Patient/1"},
    ]);
    let f = fixture().await;
    let mut c = f.issuer.claims(&req("EHR-123"));
    c["fhirContext"] = ctx.clone();
    let p = f
        .trust
        .verify(&f.issuer.key.sign(&c).unwrap())
        .await
        .unwrap();
    assert_eq!(p.launch_studies, None, "off by default: context is context");

    let f = fixture_with(
        Algorithm::ES256,
        "launch_context_restricts = true\nfhir_base_url = \"http://ehr.example/fhir\"",
    )
    .await;
    let mut c = f.issuer.claims(&req("EHR-123"));
    c["fhirContext"] = ctx;
    let token = f.issuer.key.sign(&c).unwrap();
    let p = f.trust.verify(&token).await.unwrap();
    assert_eq!(
        p.launch_studies,
        Some(vec![
            ContextStudy::Reference("is-1".into()),
            ContextStudy::Uid("1.2.3".into()),
            ContextStudy::Reference("is-2".into()),
            ContextStudy::Unknown,
            ContextStudy::Unknown,
            ContextStudy::Unknown,
        ])
    );
    // The token is kept for calls on the caller's behalf, and never printed.
    assert_eq!(p.bearer.expose(), token);
    assert!(!format!("{p:?}").contains(&token));
    // Without an ImagingStudy in the context there is no restriction.
    let mut c = f.issuer.claims(&req("EHR-123"));
    c["fhirContext"] = json!([{"reference": "Encounter/e1"}]);
    let p = f
        .trust
        .verify(&f.issuer.key.sign(&c).unwrap())
        .await
        .unwrap();
    assert_eq!(p.launch_studies, None);
    // A per-location context applies here.
    let mut c = f.issuer.claims(&req("EHR-123"));
    c["authorization_details"] = json!([{"type": "smart_on_fhir",
        "locations": ["http://127.0.0.1:8080/dicom-web"], "scope": "patient/ImagingStudy.rs",
        "patient": "EHR-123", "fhirContext": [{"reference": "ImagingStudy/here"}]}]);
    c["fhirContext"] = json!([{"reference": "ImagingStudy/top"}]);
    let p = f
        .trust
        .verify(&f.issuer.key.sign(&c).unwrap())
        .await
        .unwrap();
    assert_eq!(
        p.launch_studies,
        Some(vec![ContextStudy::Reference("here".into())])
    );
    // Other shapes: SMART 2.0 bare strings, an identifier without `type`, a context that is
    // not a list (nothing then), an entry that is neither string nor object.
    for (ctx, expected) in [
        (
            json!(["ImagingStudy/s20"]),
            Some(vec![ContextStudy::Reference("s20".into())]),
        ),
        (
            json!([{"identifier": {"system": "urn:dicom:uid", "value": "urn:oid:1.2.9"}}]),
            Some(vec![ContextStudy::Uid("1.2.9".into())]),
        ),
        (
            json!([{"identifier": {"system": "urn:dicom:uid", "value": "1.2.9"}}]),
            Some(vec![ContextStudy::Unknown]),
        ),
        (
            json!({"reference": "ImagingStudy/x"}),
            Some(vec![ContextStudy::Unknown]),
        ),
        (json!("ImagingStudy/x"), Some(vec![ContextStudy::Unknown])),
        (json!([42]), Some(vec![ContextStudy::Unknown])),
        (json!(["Patient/1", {"reference": "Encounter/2"}]), None),
        (json!([]), None),
    ] {
        let mut c = f.issuer.claims(&req("EHR-123"));
        c["fhirContext"] = ctx.clone();
        let p = f
            .trust
            .verify(&f.issuer.key.sign(&c).unwrap())
            .await
            .unwrap();
        assert_eq!(p.launch_studies, expected, "{ctx}");
    }
}

/// The gateway's own tokens (`[authorization_server]`): verified with the key given, never
/// fetched; the claim of what was granted is required, and read back as it was written.
#[tokio::test(flavor = "multi_thread")]
async fn tokens_of_the_gateways_own_carry_what_was_granted() {
    let cfg = Config::parse(
        r#"
[gateway]
ae_title = "PACSGATE"
dimse_listen = "127.0.0.1:11112"
public_url = "http://127.0.0.1:8080"
[pacs]
ae_title = "ORTHANC"
address = "127.0.0.1:4242"
[[issuers]]
issuer = "http://127.0.0.1:9"
[authorization_server]
enabled = true
signing_key_file = "/nonexistent/as.pem"
subject_issuers = ["http://127.0.0.1:9"]
"#,
    )
    .unwrap();
    let key = crate::crypto::SigningKey::generate(Algorithm::ES256).unwrap();
    let trust = TrustCore::with_own_keys(&cfg, &[key.public_jwk().clone()]).unwrap();
    let exp = now_secs() + 300;
    let good = json!({
        "iss": "http://127.0.0.1:8080", "aud": [AUD], "exp": exp, "iat": now_secs(),
        "scope": "patient/ImagingStudy.rs", "patient": "PAT-A",
        "pacsgate": {"subject_issuer": "http://127.0.0.1:9", "patients": [{"id": "PAT-A"}], "studies": ["1.2.3"]},
    });
    let p = trust
        .verify(&key.sign(&good).unwrap())
        .await
        .expect("own token");
    assert_eq!(p.issuer, "http://127.0.0.1:8080");
    assert_eq!(p.patient.as_deref(), Some("PAT-A"));
    let g = p.granted.as_ref().expect("granted");
    assert_eq!(g.patients.as_ref().map(|v| v[0].id.as_str()), Some("PAT-A"));
    assert_eq!(
        p.launch_studies,
        Some(vec![ContextStudy::Uid("1.2.3".into())])
    );

    // Without the claim, or signed by another key, or without at+jwt: refused.
    let mut bare = good.clone();
    bare.as_object_mut().unwrap().remove("pacsgate");
    assert!(matches!(
        trust.verify(&key.sign(&bare).unwrap()).await,
        Err(TrustError::Claim("pacsgate"))
    ));
    let other = crate::crypto::SigningKey::generate(Algorithm::ES256).unwrap();
    assert!(trust.verify(&other.sign(&good).unwrap()).await.is_err());
    assert!(matches!(
        trust
            .verify(&key.sign_with_typ(&good, Some("JWT")).unwrap())
            .await,
        Err(TrustError::Type(_))
    ));
    // A trust core not given the key refuses them (no fetch is attempted).
    let blind = TrustCore::new(&cfg).unwrap();
    assert!(blind.verify(&key.sign(&good).unwrap()).await.is_err());
}
