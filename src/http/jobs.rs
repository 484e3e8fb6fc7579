//! The healing jobs (admin): resync and the consistency check. A job
//! answers `202 {"id", "state", …}` and is polled at `GET <path>/{id}`.

use super::{ApiError, caller, check_len};
use crate::{engine::Engine, jobs::resync::Target};
use actix_web::{
    HttpRequest, HttpResponse,
    web::{self, Bytes, Data, Json},
};
use serde::Deserialize;
use serde_json::{Value, json};

/// `POST /v1/resync` body: `{"all": true}` or `{"user_ids": [...]}`, with
/// an optional `rate` (users per second) and `force`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResyncRequest {
    #[serde(default)]
    all: Option<bool>,
    #[serde(default)]
    user_ids: Option<Vec<String>>,
    /// Checked here, so the error names the field.
    #[serde(default)]
    rate: Option<Value>,
    #[serde(default)]
    force: bool,
}

/// A rate given as JSON: a whole number of `unit` per second, at least 1.
pub(super) fn parse_rate(v: Option<Value>, unit: &str) -> Result<Option<u64>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(r) if r >= 1 => Ok(Some(r)),
            _ => Err(ApiError::bad_request(format!(
                "rate: must be a whole number of {unit} per second, at least 1 (got {v})"
            ))),
        },
    }
}

pub(super) async fn start_resync(
    engine: Data<Engine>,
    req: HttpRequest,
    body: Json<ResyncRequest>,
) -> Result<HttpResponse, ApiError> {
    let by = caller(&req);
    let ResyncRequest {
        all,
        user_ids,
        rate,
        force,
    } = body.into_inner();
    let target = match (all, user_ids) {
        (Some(true), None) => Target::All,
        (None | Some(false), Some(ids)) => {
            check_len(&engine, "user_ids", ids.len())?;
            Target::UserIds(ids)
        }
        (Some(true), Some(_)) => {
            return Err(ApiError::bad_request(
                "give either `\"all\": true` or `user_ids`, not both",
            ));
        }
        _ => {
            return Err(ApiError::bad_request(
                "give exactly one of `\"all\": true` or `user_ids`",
            ));
        }
    };
    let rate = parse_rate(rate, "users")?;
    let job = engine.start_resync(target, rate, force, &by).await?;
    Ok(HttpResponse::Accepted().json(job))
}

pub(super) async fn resync_status(
    engine: Data<Engine>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(engine.resync_job(&id).await?))
}

pub(super) async fn cancel_resync(
    engine: Data<Engine>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let by = caller(&req);
    let job = engine.cancel_resync(&id, &by).await?;
    Ok(cancelled(job))
}

/// A cancelled job's record, with whether the cancel reached it running.
pub(super) fn cancelled<B: serde::Serialize>(job: crate::jobs::Job<B>) -> HttpResponse {
    let requested = !job.state.finished();
    let mut v = serde_json::to_value(job).expect("jobs serialize");
    v["cancel_requested"] = json!(requested);
    HttpResponse::Ok().json(v)
}

/// `POST /v1/consistency/check` body (optional): `force`, and `repair` /
/// `repair_orphans` overriding the configured ones for this check.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckRequest {
    #[serde(default)]
    force: bool,
    #[serde(default)]
    repair: Option<bool>,
    #[serde(default)]
    repair_orphans: Option<bool>,
}

pub(super) async fn start_check(
    engine: Data<Engine>,
    req: HttpRequest,
    body: Bytes,
) -> Result<HttpResponse, ApiError> {
    let by = caller(&req);
    let request: CheckRequest = if body.iter().all(u8::is_ascii_whitespace) {
        CheckRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))?
    };
    let job = engine
        .start_consistency_check(request.force, request.repair, request.repair_orphans, &by)
        .await?;
    Ok(HttpResponse::Accepted().json(job))
}

pub(super) async fn check_status(
    engine: Data<Engine>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(engine.consistency_check(&id).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportQuery {
    /// Parsed here rather than by serde, so the error names the parameter.
    hours: Option<String>,
}

pub(super) async fn report(
    engine: Data<Engine>,
    query: web::Query<ReportQuery>,
) -> Result<HttpResponse, ApiError> {
    let hours = match &query.hours {
        None => 24.0,
        Some(h) => h
            .parse::<f64>()
            .ok()
            .filter(|h| h.is_finite() && *h > 0.0 && *h <= 8760.0)
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "hours: `{h}` must be a number of hours above 0 and at most 8760"
                ))
            })?,
    };
    Ok(HttpResponse::Ok().json(engine.consistency_report(hours).await?))
}
