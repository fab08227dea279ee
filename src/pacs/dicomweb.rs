//! The DICOMweb client: the gateway's requests to the PACS's own DICOMweb service.
//!
//! Owns: the HTTP client toward the PACS (connect and read timeouts, no redirects, the
//! gateway's user agent), the URLs of its DICOMweb and WADO-URI services, reading answers under
//! a size bound, what an answer's status means, and rewriting the PACS's URLs in a body to the
//! gateway's. Requests carry no token of the caller: the PACS sees the gateway only. Must not
//! know tokens, policy or the HTTP front end; it returns typed errors that the front end maps
//! to its wire.

use crate::config::Config;
use reqwest::header::{self, HeaderValue};

/// Why a request to the PACS's DICOMweb service did not give an answer to relay.
#[derive(Debug, thiserror::Error)]
pub enum DicomWebError {
    #[error("the PACS did not answer: {0}")]
    Unreachable(String),
    /// The PACS answered with this non-success status (its body is not passed on).
    #[error("the PACS answered {0}")]
    Status(u16),
    #[error("the PACS broke off: {0}")]
    BrokeOff(String),
    #[error("the PACS's answer is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the PACS answered the search with invalid JSON")]
    BadJson,
    #[error("pacs.dicomweb_url has no path, so the WADO-URI service cannot be located")]
    NoWadoUri,
}

/// The PACS's DICOMweb service, as `pacs.dicomweb_url` names it.
pub struct DicomWeb {
    /// Replaced when SIGHUP re-reads `[pacs.tls]`; requests running keep the one they took.
    http: std::sync::RwLock<reqwest::Client>,
    cfg: std::sync::Arc<Config>,
    /// The DICOMweb root, without a trailing slash.
    base: String,
    /// The WADO-URI service: the root with its last path segment replaced by `wado`, as Orthanc
    /// lays it out.
    wado_uri: Option<String>,
}

impl DicomWeb {
    /// An HTTP client with the PACS's connect and read timeouts, no redirects, the gateway's
    /// user agent; with `tls`, TLS that trusts that CA only (and presents the gateway's client
    /// certificate when one is configured), else the system's trust anchors.
    pub(crate) fn http_client(
        cfg: &Config,
        tls: Option<&crate::tls::ClientTls>,
    ) -> anyhow::Result<reqwest::Client> {
        let mut b = reqwest::Client::builder()
            .connect_timeout(cfg.pacs.connect_timeout)
            .read_timeout(cfg.limits.upstream_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("pacsgate/", env!("CARGO_PKG_VERSION")));
        if let Some(t) = tls {
            b = b.tls_backend_preconfigured(t.config());
        }
        Ok(b.build()?)
    }

    fn pacs_client(cfg: &Config) -> anyhow::Result<reqwest::Client> {
        Self::http_client(cfg, cfg.pacs.tls.as_ref().map(|t| &*t.http))
    }

    /// Takes the TLS identity toward the PACS as `[pacs.tls]`'s files now make it (after they
    /// were re-read); new requests use it.
    pub fn reload(&self) -> anyhow::Result<()> {
        let c = Self::pacs_client(&self.cfg)?;
        *self.http.write().unwrap_or_else(|e| e.into_inner()) = c;
        Ok(())
    }

    fn client(&self) -> reqwest::Client {
        self.http.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The client for `pacs.dicomweb_url`, with a connection pool of its own (and `[pacs.tls]`
    /// when set); `None` when it is not configured.
    pub fn new(cfg: &std::sync::Arc<Config>) -> anyhow::Result<Option<DicomWeb>> {
        let Some(url) = cfg.pacs.dicomweb_url.as_ref() else {
            return Ok(None);
        };
        let base = url.trim_end_matches('/').to_string();
        let wado_uri = base
            .rsplit_once('/')
            .filter(|(root, _)| root.contains("://") && !root.ends_with('/'))
            .map(|(root, _)| format!("{root}/wado"));
        Ok(Some(DicomWeb {
            http: std::sync::RwLock::new(Self::pacs_client(cfg)?),
            cfg: cfg.clone(),
            base,
            wado_uri,
        }))
    }

    /// A QIDO-RS search (`path_and_query` below the root, already encoded): the matches, and
    /// the bytes read, at most `budget` of them. 204 is no matches.
    pub async fn search(
        &self,
        path_and_query: &str,
        budget: usize,
    ) -> Result<(Vec<serde_json::Value>, usize), DicomWebError> {
        let rq = self
            .client()
            .get(format!("{}/{path_and_query}", self.base))
            .header(header::ACCEPT, "application/dicom+json");
        let resp = send(rq).await?;
        if resp.status() == reqwest::StatusCode::NO_CONTENT {
            return Ok((Vec::new(), 0));
        }
        let resp = success(resp)?;
        let body = read_bounded(resp, budget).await?;
        if body.is_empty() {
            return Ok((Vec::new(), 0));
        }
        let matches = serde_json::from_slice(&body).map_err(|_| DicomWebError::BadJson)?;
        Ok((matches, body.len()))
    }

    /// A WADO-RS retrieval (`path` below the root; `query` already checked by the caller), with
    /// the caller's Accept header passed on. Only a success is returned.
    pub(crate) async fn retrieve(
        &self,
        path: &str,
        query: Option<&str>,
        accept: Option<&HeaderValue>,
    ) -> Result<reqwest::Response, DicomWebError> {
        let mut url = format!("{}/{path}", self.base);
        if let Some(q) = query.filter(|q| !q.is_empty()) {
            url.push('?');
            url.push_str(q);
        }
        let mut rq = self.client().get(&url);
        if let Some(a) = accept {
            rq = rq.header(header::ACCEPT, a.clone());
        }
        success(send(rq).await?)
    }

    /// A WADO-URI request with an encoded query. Only a success is returned.
    pub(crate) async fn wado_uri(&self, query: &str) -> Result<reqwest::Response, DicomWebError> {
        let base = self.wado_uri.as_ref().ok_or(DicomWebError::NoWadoUri)?;
        success(send(self.client().get(format!("{base}?{query}"))).await?)
    }

    /// A STOW-RS request of one multipart/related body framed with `boundary`. The answer is
    /// returned whatever its status: the front end judges what the PACS says it stored.
    pub async fn store(
        &self,
        boundary: &str,
        body: reqwest::Body,
    ) -> Result<reqwest::Response, DicomWebError> {
        let rq = self
            .client()
            .post(format!("{}/studies", self.base))
            .header(
                header::CONTENT_TYPE,
                format!("multipart/related; type=\"application/dicom\"; boundary={boundary}"),
            )
            .header(header::ACCEPT, "application/dicom+json")
            .body(body);
        send(rq).await
    }

    /// The PACS's URLs in a body, rewritten to `public_base`.
    pub(crate) fn rewrite_urls(&self, body: &str, public_base: &str) -> String {
        body.replace(self.base.as_str(), public_base)
    }
}

/// Sends one request to the PACS, until its response head. A kept-alive connection the PACS
/// closed just as the request went out (Orthanc closes idle ones after a second) fails before
/// any answer: a request that can be sent again (a GET, not a streamed STOW-RS body) is sent
/// once more on a new connection. Every failure is logged with its cause (never the URL: it
/// names UIDs), as the 502 it becomes says only "the PACS did not answer".
async fn send(rq: reqwest::RequestBuilder) -> Result<reqwest::Response, DicomWebError> {
    let t0 = std::time::Instant::now();
    let again = rq.try_clone();
    let r = match (rq.send().await, again) {
        (Err(e), Some(again)) if closed_before_answer(&e) => {
            tracing::debug!(error = %cause(&e), "the PACS closed a kept-alive connection; sending again on a new one");
            again.send().await
        }
        (r, _) => r,
    };
    crate::metrics::pacs_request("dicomweb", t0.elapsed());
    r.map_err(|e| {
        let why = cause(&e);
        tracing::warn!(error = %why, "the PACS's DICOMweb service did not answer");
        DicomWebError::Unreachable(why)
    })
}

/// The request reached a connection but no answer came: not a refused connection, not a
/// timeout (either would fail again, or has used its time).
fn closed_before_answer(e: &reqwest::Error) -> bool {
    e.is_request() && !e.is_connect() && !e.is_timeout()
}

/// An error with its sources, without the URL.
fn cause(e: &reqwest::Error) -> String {
    let mut out = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out.replace(e.url().map(|u| u.as_str()).unwrap_or("\u{0}"), "(url)")
}

fn success(resp: reqwest::Response) -> Result<reqwest::Response, DicomWebError> {
    if resp.status().is_success() {
        Ok(resp)
    } else {
        Err(DicomWebError::Status(resp.status().as_u16()))
    }
}

/// Reads a response body of at most `max` bytes.
pub(crate) async fn read_bounded(
    mut resp: reqwest::Response,
    max: usize,
) -> Result<Vec<u8>, DicomWebError> {
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| DicomWebError::BrokeOff(e.without_url().to_string()))?
    {
        if body.len() + chunk.len() > max {
            return Err(DicomWebError::TooLarge(max));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
