//! WADO-URI through the gateway (`{public_url}/wado?requestType=WADO&studyUID=...&seriesUID=...
//! &objectUID=...`).
//!
//! The three UIDs are validated and go to the policy core as an instance retrieval, exactly as
//! WADO-RS does; only known parameters with safe values are passed to the PACS's WADO-URI service
//! (`pacs.dicomweb_url` with its last path segment replaced by `wado`, as Orthanc lays it out).
//! A DICOM answer is checked as it streams, like a WADO-RS part ([`super::checked`]).

use super::WebCtx;
use super::auth::ApiError;
use super::checked;
use super::path::{self, is_uid};
use super::render;
use crate::audit::Operation;
use crate::policy::{Action, RetrieveRequest, UidLevel};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::response::Response;
use std::sync::Arc;

/// WADO-URI parameters passed on, besides the UIDs.
const PASSED: [&str; 12] = [
    "contentType",
    "charset",
    "anonymize",
    "annotation",
    "rows",
    "columns",
    "region",
    "windowCenter",
    "windowWidth",
    "frameNumber",
    "imageQuality",
    "transferSyntax",
];

pub async fn handle(State(ctx): State<Arc<WebCtx>>, req: Request) -> Response {
    match wado(&ctx, req).await {
        Ok(r) => r,
        Err(e) => ctx.challenge.respond(e),
    }
}

async fn wado(ctx: &WebCtx, req: Request) -> Result<Response, ApiError> {
    let pairs =
        path::decode_query(req.uri().query().unwrap_or("")).map_err(ApiError::BadRequest)?;
    let get = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    if get("requestType").as_deref() != Some("WADO") {
        return Err(ApiError::BadRequest("requestType=WADO is required".into()));
    }
    let (Some(study), Some(series), Some(object)) =
        (get("studyUID"), get("seriesUID"), get("objectUID"))
    else {
        return Err(ApiError::BadRequest(
            "studyUID, seriesUID and objectUID are required".into(),
        ));
    };
    if !(is_uid(&study) && is_uid(&series) && is_uid(&object)) {
        return Err(ApiError::BadRequest(
            "a UID is not valid (digits and dots, at most 64 characters)".into(),
        ));
    }
    let rr = RetrieveRequest {
        level: Some(UidLevel::Instance),
        patient_id: None,
        study_uids: vec![study.clone()],
        series_uids: vec![series.clone()],
        instance_uids: vec![object.clone()],
    };
    let on = format!("study={study}");
    let caller = ctx
        .authenticate(req.headers(), (Operation::WadoUri, &on))
        .await?;
    let p = caller.principal();
    let allowed = ctx
        .permit(
            &caller,
            Action::Retrieve(rr),
            (Operation::WadoUri, &on),
            "the UIDs belong to the caller's patient",
            vec![study.to_string()],
        )
        .await?;
    let check = checked::Check {
        allowed,
        principal: p.clone(),
        request_id: super::request_id(),
        client_cert: super::client_cert(),
        op: Operation::WadoUri,
        object: on,
        limits: ctx.cfg.limits.reader(),
    };
    let upstream = match ctx.upstream() {
        super::Upstream::Web(web) => web,
        super::Upstream::Dimse(dimse) => {
            let target = crate::pacs::dimse::Target {
                study,
                series: Some(series),
                instance: Some(object),
            };
            // A rendered image is WADO-URI's default; its parameters become the WADO-RS
            // rendering ones, read by the one parser.
            // The first content type served: the instance itself, or a picture.
            let media = get("contentType")
                .unwrap_or_else(|| "image/jpeg".into())
                .split(',')
                .find_map(|t| match t.trim() {
                    "application/dicom" => Some(None),
                    "image/jpeg" | "image/*" | "*/*" => Some(Some(render::Media::Jpeg)),
                    "image/png" => Some(Some(render::Media::Png)),
                    _ => None,
                })
                .ok_or_else(|| {
                    ApiError::NotAcceptable(
                        "by translation to DIMSE, contentType is application/dicom, image/jpeg or image/png".into(),
                    )
                })?;
            if let Some(media) = media {
                let opts = rendering_options(&get)?;
                let frame = get("frameNumber")
                    .map(|f| {
                        f.parse::<u64>().ok().filter(|n| *n >= 1).ok_or_else(|| {
                            ApiError::BadRequest("frameNumber is a whole number from 1".into())
                        })
                    })
                    .transpose()?;
                let mut r =
                    super::translate::rendered(dimse, target, frame, false, opts, media, check)
                        .await?;
                r.headers_mut().insert(
                    header::CACHE_CONTROL,
                    HeaderValue::from_static("private, no-store"),
                );
                return Ok(r);
            }
            let syntax = match get("transferSyntax") {
                Some(t) if crate::dicom::syntax::readable(&t).is_some() => t,
                Some(_) => {
                    return Err(ApiError::NotAcceptable(
                        "the transfer syntax asked for is not one the gateway reads".into(),
                    ));
                }
                None => crate::dicom::syntax::EXPLICIT_VR_LITTLE_ENDIAN.to_string(),
            };
            let mut r = super::translate::single(dimse, target, vec![syntax], check).await?;
            r.headers_mut().insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("private, no-store"),
            );
            return Ok(r);
        }
    };
    let mut out = vec![
        ("requestType".to_string(), "WADO".to_string()),
        ("studyUID".to_string(), study),
        ("seriesUID".to_string(), series),
        ("objectUID".to_string(), object),
    ];
    for k in PASSED {
        if let Some(v) = get(k) {
            if v.len() > 128
                || !v
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/.,;=-+ ".contains(&b))
            {
                return Err(ApiError::BadRequest(format!(
                    "parameter {k} has characters that are not allowed"
                )));
            }
            out.push((k.to_string(), v));
        }
    }
    let resp = upstream.wado_uri(&path::encode_query(&out)).await?;
    let ct = resp.headers().get(header::CONTENT_TYPE).cloned();
    let is_dicom = ct
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<mime::Mime>().ok())
        .is_some_and(|m| m.essence_str() == "application/dicom");
    let mut r = if is_dicom {
        // An instance says whose it is: checked as it streams.
        checked::single(resp, check).await?
    } else {
        // A rendered image names no patient: the look-up before is the check.
        let mut r = Response::new(Body::from_stream(resp.bytes_stream()));
        if let Some(ct) = ct {
            r.headers_mut().insert(header::CONTENT_TYPE, ct);
        }
        r
    };
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-store"),
    );
    Ok(r)
}

/// WADO-URI's rendering parameters (PS3.18 9.2) as the WADO-RS rendering parameters they
/// mean, read by the one parser. One the gateway does not apply is 400, as there.
fn rendering_options(get: &dyn Fn(&str) -> Option<String>) -> Result<render::Options, ApiError> {
    for k in [
        "annotation",
        "region",
        "anonymize",
        "charset",
        "transferSyntax",
    ] {
        if get(k).is_some() {
            return Err(ApiError::BadRequest(format!(
                "{k} is not served with a rendered image by translation to DIMSE"
            )));
        }
    }
    let names = ["windowCenter", "windowWidth", "columns", "rows"];
    if names.iter().filter_map(|k| get(k)).any(|v| v.contains(',')) {
        return Err(ApiError::BadRequest(
            "a window or size parameter holds a ','".into(),
        ));
    }
    let mut q = Vec::new();
    match (get("windowCenter"), get("windowWidth")) {
        (Some(c), Some(w)) => q.push(("window".to_string(), format!("{c},{w}"))),
        (None, None) => {}
        _ => {
            return Err(ApiError::BadRequest(
                "windowCenter and windowWidth come together".into(),
            ));
        }
    }
    // A side not given is not a bound: the largest viewport side stands in for it.
    match (get("columns"), get("rows")) {
        (None, None) => {}
        (c, r) => q.push((
            "viewport".to_string(),
            format!(
                "{},{}",
                c.unwrap_or_else(|| "4096".into()),
                r.unwrap_or_else(|| "4096".into())
            ),
        )),
    }
    if let Some(v) = get("imageQuality") {
        q.push(("quality".to_string(), v));
    }
    render::options_of(&q, false)
}
