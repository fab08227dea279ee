//! The cost of one access decision: token verification (local JWT, or RFC 7662 introspection
//! with a cold and a warm cache) plus the policy decision, against a development issuer on
//! loopback in the same process, and the cost of judging one study for a user-level token
//! under `user_level = "ehr-check"` (one ImagingStudy search with the caller's token, then
//! cached). Prints a table; run with
//! `cargo run --release --example decision_bench`.

use jsonwebtoken::Algorithm;
use pacsgate::config::Config;
use pacsgate::devissuer::{DevClient, DevIssuer, DevKey, MintRequest};
use pacsgate::ehr::Ehr;
use pacsgate::policy::{
    Action, HoldsFuture, LookupError, LookupFuture, MatchView, OwnerLookup, Policy, Ports,
    QueryRequest, UidLevel, Verdict,
};
use pacsgate::trust::TrustCore;
use std::sync::Arc;
use std::time::Instant;

const N: usize = 2000;

fn percentile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * q) as usize]
}

/// No study facts are needed for an ehr-check without scope constraints: never asked.
struct NoPacs;

impl OwnerLookup for NoPacs {
    fn owners<'a>(&'a self, _: UidLevel, _: &'a str) -> LookupFuture<'a> {
        Box::pin(async {
            Err(LookupError::Unreachable(
                "not expected: no study facts are needed".to_string(),
            ))
        })
    }

    fn holds<'a>(
        &'a self,
        _: UidLevel,
        _: &'a str,
        _: &'a str,
        _: Option<&'a str>,
    ) -> HoldsFuture<'a> {
        Box::pin(async {
            Err(LookupError::Unreachable(
                "not expected: no series or instance is named".to_string(),
            ))
        })
    }
}

fn req() -> MintRequest {
    MintRequest {
        patient: Some("PAT-A".into()),
        scope: Some("patient/ImagingStudy.rs".into()),
        ..Default::default()
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let mut di = DevIssuer::new(
        url.clone(),
        DevKey::generate(Algorithm::ES256)?,
        "http://127.0.0.1:8080/dicom-web".into(),
    );
    di.clients.push(DevClient {
        id: "pacsgate".into(),
        secret: Some("s3cret".into()),
        key: None,
        jwks: None,
    });
    let issuer = Arc::new(di);
    tokio::spawn(pacsgate::devissuer::serve(listener, issuer.clone()));

    let config = |verify: &str| {
        Config::parse(&format!(
            "[gateway]\nae_title = \"GW\"\ndimse_listen = \"127.0.0.1:1\"\npublic_url = \"http://127.0.0.1:8080\"\n\
             [pacs]\nae_title = \"P\"\naddress = \"127.0.0.1:2\"\n[[issuers]]\nissuer = \"{url}\"\nverify = \"{verify}\"\n\
             client_id = \"pacsgate\"\nclient_secret = \"s3cret\"\nfhir_base_url = \"{url}/fhir\"\n\
             [policy]\nuser_level = \"ehr-check\"\n"
        ))
        .map_err(|p| anyhow::anyhow!("{p:?}"))
    };
    let jwt_cfg = config("jwt")?;
    let intro_cfg = config("introspection")?;
    let mut rows = Vec::new();
    // local JWT verification (keys fetched once beforehand)
    let trust = TrustCore::new(&jwt_cfg)?;
    let policy = Policy::new(
        &jwt_cfg,
        Ports::new(
            Arc::new(NoPacs),
            Arc::new(Ehr::new(&jwt_cfg, trust.clone())?),
        ),
    );
    let query = || Action::Query(QueryRequest::with_patient(None));
    trust.verify(&issuer.mint(&req())?).await?;
    let tokens: Vec<String> = (0..N)
        .map(|_| issuer.mint(&req()))
        .collect::<Result<_, _>>()?;
    let mut us = Vec::with_capacity(N);
    for t in &tokens {
        let s = Instant::now();
        let p = trust.verify(t).await?;
        let c = policy.caller(p).await;
        anyhow::ensure!(policy.decide(&c, query()).await.is_ok(), "query refused");
        us.push(s.elapsed().as_secs_f64() * 1e6);
    }
    rows.push(("local JWT (ES256), keys cached", us));

    // introspection: each token once (cold), then the same token again (warm)
    let trust = TrustCore::new(&intro_cfg)?;
    trust.verify(&issuer.mint_opaque(&req())).await?;
    let opaque: Vec<String> = (0..N).map(|_| issuer.mint_opaque(&req())).collect();
    let mut cold = Vec::with_capacity(N);
    for t in &opaque {
        let s = Instant::now();
        let p = trust.verify(t).await?;
        let c = policy.caller(p).await;
        let _ = policy.decide(&c, query()).await;
        cold.push(s.elapsed().as_secs_f64() * 1e6);
    }
    let mut warm = Vec::with_capacity(N);
    for t in &opaque {
        let s = Instant::now();
        let p = trust.verify(t).await?;
        let c = policy.caller(p).await;
        let _ = policy.decide(&c, query()).await;
        warm.push(s.elapsed().as_secs_f64() * 1e6);
    }
    rows.push((
        "introspection, cold cache (one round trip to the issuer on loopback)",
        cold,
    ));
    rows.push(("introspection, warm cache", warm));

    // ehr-check: one study judged per user-level token (cold: one EHR search), then again (warm)
    let user = |n: usize| MintRequest {
        scope: Some("user/ImagingStudy.rs".into()),
        claims: Some(format!("{{\"ehr_studies\": [\"1.2.3.{n}\"]}}")),
        ..Default::default()
    };
    let trust = TrustCore::new(&jwt_cfg)?;
    let policy = Policy::new(
        &jwt_cfg,
        Ports::new(
            Arc::new(NoPacs),
            Arc::new(Ehr::new(&jwt_cfg, trust.clone())?),
        ),
    );
    let principals = futures_util::future::try_join_all((0..N).map(|n| {
        let t = issuer.mint(&user(n));
        let trust = trust.clone();
        async move { trust.verify(&t?).await.map_err(anyhow::Error::from) }
    }))
    .await?;
    let (mut cold, mut warm) = (Vec::with_capacity(N), Vec::with_capacity(N));
    for round in [&mut cold, &mut warm] {
        for (n, p) in principals.iter().enumerate() {
            let s = Instant::now();
            let c = policy.caller(p.clone()).await;
            let Ok(a) = policy.decide(&c, query()).await else {
                anyhow::bail!("user-level query refused");
            };
            let view = MatchView {
                study: Some(format!("1.2.3.{n}")),
                ..MatchView::default()
            };
            let shown = policy.judge(&c, &a).judge(&[view]).await == [Verdict::Admit];
            round.push(s.elapsed().as_secs_f64() * 1e6);
            anyhow::ensure!(shown, "the EHR shows this study to this user");
        }
    }
    rows.push((
        "ehr-check: query decision + one study judged, cold (one ImagingStudy search on loopback)",
        cold,
    ));
    rows.push((
        "ehr-check: query decision + one study judged, warm (cached per token and study)",
        warm,
    ));

    println!("| decision (verification + policy), {N} tokens | p50 | p99 |");
    println!("|---|---|---|");
    for (name, mut v) in rows {
        println!(
            "| {name} | {:.1} us | {:.1} us |",
            percentile(&mut v, 0.5),
            percentile(&mut v, 0.99)
        );
    }
    Ok(())
}
