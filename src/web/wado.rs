//! WADO-RS through the gateway: study, series, instance, metadata, frames, rendered, thumbnail
//! and bulk data.
//!
//! The policy core resolves the study (and the series and instance, which must belong to it)
//! against the PACS before a byte is relayed; another patient's UID and an unknown UID get the
//! same 403, with no DICOM in the body. Instances and metadata in the PACS's answer are checked
//! again one by one ([`super::checked`]); metadata URLs are rewritten to the gateway's; frames,
//! bulk data and rendered images stream through as they are.

use super::WebCtx;
use super::auth::ApiError;
use super::checked;
use super::path::{Part, Resource};
use super::render;
use super::translate;
use crate::audit::{Operation, WadoPart};
use crate::pacs::dicomweb::read_bounded;
use crate::pacs::dimse::Target;
use crate::policy::{Action, Caller, RetrieveRequest, UidLevel};
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;

/// The largest metadata document read (it is rewritten, so it is held whole).
const MAX_METADATA_BYTES: usize = 256 * 1024 * 1024;

/// Query strings passed to the PACS (rendered parameters and the like) may hold only these.
fn safe_query(q: &str) -> bool {
    q.len() <= 1024
        && q.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"=&,._-%+:;*".contains(&b))
}

pub(crate) async fn retrieve(
    ctx: &WebCtx,
    caller: &Caller,
    resource: &Resource,
    query: Option<&str>,
    headers: &HeaderMap,
    upstream: super::Upstream<'_>,
) -> Result<Response, ApiError> {
    let Resource::Retrieve {
        study,
        series,
        instance,
        what,
    } = resource
    else {
        return Err(ApiError::NotFound);
    };
    let level = if instance.is_some() {
        UidLevel::Instance
    } else if series.is_some() {
        UidLevel::Series
    } else {
        UidLevel::Study
    };
    let req = RetrieveRequest {
        level: Some(level),
        patient_id: None,
        study_uids: vec![study.clone()],
        series_uids: series.iter().cloned().collect(),
        instance_uids: instance.iter().cloned().collect(),
    };
    let part = match what {
        Part::Instances => WadoPart::Instances,
        Part::Metadata => WadoPart::Metadata,
        Part::Rendered | Part::FrameRendered(_) => WadoPart::Rendered,
        Part::Thumbnail | Part::FrameThumbnail(_) => WadoPart::Thumbnail,
        Part::Frames(_) => WadoPart::Frames,
        Part::Bulk(_) => WadoPart::BulkData,
    };
    let on = format!("study={study}");
    let p = caller.principal();
    let allowed = ctx
        .permit(
            caller,
            Action::Retrieve(req),
            (Operation::Wado(part), &on),
            "the UIDs belong to the caller's patient",
            vec![study.to_string()],
        )
        .await?;
    let check = checked::Check {
        allowed,
        principal: p.clone(),
        request_id: super::request_id(),
        client_cert: super::client_cert(),
        op: Operation::Wado(part),
        object: on.clone(),
        limits: ctx.cfg.limits.reader(),
    };
    if query.is_some_and(|q| !q.is_empty() && !safe_query(q)) {
        return Err(ApiError::BadRequest(
            "the query string holds characters that are not allowed".into(),
        ));
    }
    let upstream = match upstream {
        super::Upstream::Web(web) => web,
        super::Upstream::Dimse(dimse) => {
            let target = Target {
                study: study.clone(),
                series: series.clone(),
                instance: instance.clone(),
            };
            let out = match what {
                Part::Instances => {
                    let syntaxes = translate::accepted_syntaxes(headers.get(header::ACCEPT))?;
                    translate::instances(dimse, target, syntaxes, check).await?
                }
                Part::Metadata => {
                    translate::metadata(dimse, target, check, &ctx.public_base).await?
                }
                Part::Frames(list) if instance.is_some() => {
                    translate::frames(dimse, target, list, check).await?
                }
                Part::Rendered | Part::Thumbnail => {
                    let thumbnail = matches!(what, Part::Thumbnail);
                    let opts = render::options(query, thumbnail)?;
                    let media = render::media(headers.get(header::ACCEPT))?;
                    translate::rendered(dimse, target, None, thumbnail, opts, media, check).await?
                }
                Part::FrameRendered(list) | Part::FrameThumbnail(list) => {
                    let thumbnail = matches!(what, Part::FrameThumbnail(_));
                    let [n] = translate::frame_list(list)?[..] else {
                        return Err(ApiError::BadRequest(
                            "one frame is rendered at a time (a frame list is not served)".into(),
                        ));
                    };
                    let opts = render::options(query, thumbnail)?;
                    let media = render::media(headers.get(header::ACCEPT))?;
                    translate::rendered(dimse, target, Some(n), thumbnail, opts, media, check)
                        .await?
                }
                Part::Bulk(path) if instance.is_some() => {
                    translate::bulk(dimse, target, path, check).await?
                }
                _ => {
                    return Err(ApiError::NotAcceptable(
                        "frames and bulk data are served per instance".into(),
                    ));
                }
            };
            return Ok(private(out));
        }
    };
    let resp = upstream
        .retrieve(
            &resource.upstream_path(),
            query,
            headers.get(header::ACCEPT),
        )
        .await?;
    let status = resp.status();
    let content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
    let mut out = match what {
        // Instances carry who they are: each is checked as it streams.
        Part::Instances => return checked::instances(resp, check).await.map(private),
        Part::Metadata => {
            let body = read_bounded(resp, MAX_METADATA_BYTES).await?;
            checked::metadata(&body, &check)?;
            let text = String::from_utf8(body)
                .map_err(|_| ApiError::Upstream("metadata is not UTF-8".into()))?;
            let mut r = Response::new(Body::from(ctx.rewrite_urls(&text)));
            *r.status_mut() = StatusCode::OK;
            r
        }
        // Frames, bulk data and rendered images name no patient: the look-up before is the
        // check.
        _ => {
            let len = resp.content_length();
            let mut r = Response::new(Body::from_stream(resp.bytes_stream()));
            *r.status_mut() = status;
            if let Some(l) = len.and_then(|l| HeaderValue::from_str(&l.to_string()).ok()) {
                r.headers_mut().insert(header::CONTENT_LENGTH, l);
            }
            r
        }
    };
    let h = out.headers_mut();
    if let Some(ct) = content_type {
        h.insert(header::CONTENT_TYPE, ct);
    }
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-store"),
    );
    Ok(out)
}

/// Marks a response as not to be stored by caches.
fn private(mut r: Response) -> Response {
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-store"),
    );
    r
}
