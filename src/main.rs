//! The `pacsgate` command: `serve`, `check-config`, and `dev-issuer` (with `mint`).
//!
//! Owns: argument parsing, logging set-up, exit codes and user-facing messages. Must not know
//! business rules.

use clap::{Args, Parser, Subcommand};
use pacsgate::config::Config;
use pacsgate::devissuer::{self, DevClient, DevIssuer, DevKey, MintRequest};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "pacsgate",
    version,
    about = "SMART-on-FHIR authorization gateway in front of a PACS"
)]
struct Cli {
    /// Log lines as human-readable text, or as one JSON object each (for a log collector).
    /// Levels per module come from PACSGATE_LOG, e.g. `info,pacsgate::trust=debug`.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway until SIGINT/SIGTERM.
    Serve {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file without opening ports.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// A development authorization server for demos and tests. NEVER FOR PRODUCTION.
    DevIssuer(Box<DevIssuerArgs>),
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct DevIssuerArgs {
    #[command(subcommand)]
    mint: Option<DevIssuerCommand>,
    /// Address to listen on, e.g. 127.0.0.1:9400.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// A client allowed to introspect and to get its own token, with a secret: ID:SECRET.
    #[arg(long)]
    client: Vec<String>,
    /// A client that authenticates with a private_key_jwt assertion: ID=KEY-FILE (PKCS#8 PEM,
    /// JWK or JWK Set; the issuer uses its public half).
    #[arg(long)]
    client_key: Vec<String>,
    /// A client registered with its public JWK Set: ID=JWKS-FILE; an assertion is verified
    /// with the key its `kid` names, as an EHR's registration does.
    #[arg(long)]
    client_jwks: Vec<String>,
    /// The MRN the FHIR Patient endpoint reports for a patient: ID=MRN (default MRN-{id}).
    #[arg(long)]
    fhir_patient: Vec<String>,
    /// An ImagingStudy the FHIR endpoint knows, for launch contexts naming a study by
    /// reference: ID=STUDY-INSTANCE-UID. (What a user's token may see through
    /// `ImagingStudy?identifier=` is the token's own `ehr_studies` claim.)
    #[arg(long)]
    imaging_study: Vec<String>,
    /// An imaging FHIR server that accepts this issuer's tokens (the gateway's
    /// `{public_url}/fhir`), listed in the smart-configuration's `associated_endpoints` with
    /// the `smart-imaging-access` capability, as the multi-server and imaging guides say.
    #[arg(long)]
    associated_endpoint: Vec<String>,
    #[command(flatten)]
    key: KeyArgs,
}

#[derive(Args, Clone)]
struct KeyArgs {
    /// The issuer URL put in `iss` and discovery (default: http://LISTEN).
    #[arg(long)]
    issuer: Option<String>,
    /// PKCS#8 PEM signing key; created if missing. Without it a fresh key is generated.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Signing algorithm: ES256, ES384, RS256, RS384 or PS256.
    #[arg(long, default_value = "ES256")]
    alg: String,
    /// Default `aud` of minted tokens.
    #[arg(long, default_value = "http://127.0.0.1:8080/dicom-web")]
    aud: String,
}

#[derive(Subcommand)]
enum DevIssuerCommand {
    /// Print one signed token (uses the same --key-file and --issuer as the server).
    Mint {
        #[command(flatten)]
        key: KeyArgs,
        #[arg(long)]
        patient: Option<String>,
        #[arg(long, default_value = "patient/ImagingStudy.rs")]
        scope: String,
        #[arg(long)]
        token_aud: Option<String>,
        #[arg(long, default_value_t = 3600)]
        expires_in: i64,
        #[arg(long)]
        client_id: Option<String>,
    },
}

/// Every log line carries the span it was written in: `association{id=…}` on DIMSE,
/// `request{id=…}` on HTTP, the same id as the audit records' `session`.
fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("PACSGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(true);
    match format {
        LogFormat::Text => fmt
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => {
            pacsgate::logtext::set_json_lines(true);
            fmt.json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false)
                .init()
        }
    }
}

fn load_key(k: &KeyArgs) -> anyhow::Result<DevKey> {
    let alg = devissuer::parse_alg(&k.alg)?;
    match &k.key_file {
        Some(p) => DevKey::load_or_create(p, alg),
        None => DevKey::generate(alg),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(c) => {
                let g = &c.gateway;
                let listeners: Vec<String> = [
                    ("DIMSE", g.dimse_listen),
                    ("DICOM TLS", g.dimse_tls_listen),
                    ("HTTP", g.http_listen),
                    ("HTTPS", g.https_listen),
                ]
                .iter()
                .filter_map(|(what, a)| a.map(|a| format!("{what} on {a}")))
                .collect();
                println!(
                    "{}: valid ({} issuer(s), PACS {} at {}, {})",
                    config.display(),
                    c.issuers.len(),
                    c.pacs.ae_title,
                    c.pacs.address,
                    listeners.join(", ")
                );
                for w in c.warnings() {
                    eprintln!("warning: {w}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprint!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Serve { config } => {
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprint!("{e}");
                    return ExitCode::from(2);
                }
            };
            init_logging(cli.log_format);
            run_async(pacsgate::server::run(cfg, config))
        }
        Command::DevIssuer(args) => match args.mint {
            Some(DevIssuerCommand::Mint {
                key,
                patient,
                scope,
                token_aud,
                expires_in,
                client_id,
            }) => {
                let Some(issuer) = key.issuer.clone() else {
                    eprintln!(
                        "mint needs --issuer (the URL of the running dev issuer) and its --key-file"
                    );
                    return ExitCode::from(2);
                };
                let result = load_key(&key).and_then(|k| {
                    let di = DevIssuer::new(issuer, k, key.aud.clone());
                    di.mint(&MintRequest {
                        patient,
                        scope: Some(scope),
                        aud: token_aud,
                        expires_in: Some(expires_in),
                        client_id,
                        ..Default::default()
                    })
                });
                match result {
                    Ok(t) => {
                        println!("{t}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("cannot mint: {e:#}");
                        ExitCode::from(1)
                    }
                }
            }
            None => {
                let Some(listen) = args.listen else {
                    eprintln!(
                        "dev-issuer needs --listen ADDR (e.g. 127.0.0.1:9400), or the `mint` subcommand"
                    );
                    return ExitCode::from(2);
                };
                init_logging(cli.log_format);
                run_async(async move {
                    let key = load_key(&args.key)?;
                    let listener = tokio::net::TcpListener::bind(listen)
                        .await
                        .map_err(|e| anyhow::anyhow!("--listen {listen}: {e}"))?;
                    let issuer = args
                        .key
                        .issuer
                        .clone()
                        .unwrap_or_else(|| format!("http://{listen}"));
                    tracing::warn!(
                        %issuer, alg = ?key.alg, kid = %key.kid,
                        "DEVELOPMENT ISSUER: anyone who can reach it can mint tokens. Never trust it in production."
                    );
                    let mut di = DevIssuer::new(
                        issuer.trim_end_matches('/').to_string(),
                        key,
                        args.key.aud.clone(),
                    );
                    for c in &args.client {
                        let (id, secret) = c
                            .split_once(':')
                            .ok_or_else(|| anyhow::anyhow!("--client takes ID:SECRET"))?;
                        di.clients.push(DevClient {
                            id: id.into(),
                            secret: Some(secret.into()),
                            key: None,
                            jwks: None,
                        });
                    }
                    for c in &args.client_key {
                        let (id, file) = c
                            .split_once('=')
                            .ok_or_else(|| anyhow::anyhow!("--client-key takes ID=PEM-FILE"))?;
                        let key = DevKey::load(
                            std::path::Path::new(file),
                            jsonwebtoken::Algorithm::RS384,
                        )
                        .or_else(|_| {
                            DevKey::load(std::path::Path::new(file), jsonwebtoken::Algorithm::ES384)
                        })?;
                        di.clients.push(DevClient {
                            id: id.into(),
                            secret: None,
                            key: Some(key),
                            jwks: None,
                        });
                    }
                    for c in &args.client_jwks {
                        let (id, file) = c
                            .split_once('=')
                            .ok_or_else(|| anyhow::anyhow!("--client-jwks takes ID=JWKS-FILE"))?;
                        let text = std::fs::read_to_string(file)
                            .map_err(|e| anyhow::anyhow!("--client-jwks {file}: {e}"))?;
                        let jwks: jsonwebtoken::jwk::JwkSet =
                            serde_json::from_str(&text).map_err(|e| {
                                anyhow::anyhow!("--client-jwks {file}: not a JWK Set: {e}")
                            })?;
                        di.clients.push(DevClient {
                            id: id.into(),
                            secret: None,
                            key: None,
                            jwks: Some(jwks),
                        });
                    }
                    for m in &args.fhir_patient {
                        let (id, mrn) = m
                            .split_once('=')
                            .ok_or_else(|| anyhow::anyhow!("--fhir-patient takes ID=MRN"))?;
                        di.mrns.insert(id.into(), mrn.into());
                    }
                    for m in &args.imaging_study {
                        let (id, uid) = m
                            .split_once('=')
                            .ok_or_else(|| anyhow::anyhow!("--imaging-study takes ID=UID"))?;
                        di.studies.insert(id.into(), uid.into());
                    }
                    for url in &args.associated_endpoint {
                        if !(url.starts_with("http://") || url.starts_with("https://")) {
                            anyhow::bail!("--associated-endpoint takes an http(s) URL");
                        }
                        di.associated.push(url.trim_end_matches('/').to_string());
                    }
                    devissuer::serve(listener, Arc::new(di)).await
                })
            }
        },
    }
}

fn run_async(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    // Multi-thread runtime: dicom-ul's async writer needs it, and both front ends use it.
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pacsgate: {e:#}");
            ExitCode::from(1)
        }
    }
}
