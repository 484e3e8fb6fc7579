//! Operations (admin): replay, the offset-range index, the whitelist and
//! the operation log. Times are accepted as epoch milliseconds or RFC 3339
//! and answered as RFC 3339.

use super::{
    ApiError, caller, check_len,
    jobs::{cancelled, parse_rate},
    parse_limit,
};
use crate::{
    engine::{Engine, OffsetsQuery},
    jobs::replay::ReplayRequest,
    model::parse_time,
};
use actix_web::{
    HttpRequest, HttpResponse,
    web::{self, Data, Json},
};
use serde::Deserialize;
use serde_json::{Value, json};

/// `POST /v1/replay` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayBody {
    topic: Option<String>,
    /// Epoch ms or RFC 3339; checked by the engine, which names the field.
    #[serde(default)]
    from_time: Option<Value>,
    #[serde(default)]
    to_time: Option<Value>,
    #[serde(default)]
    from_offset: Option<i64>,
    #[serde(default)]
    to_offset: Option<i64>,
    #[serde(default)]
    partition: Option<i32>,
    #[serde(default)]
    user_ids: Option<Vec<String>>,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    target_collection: Option<String>,
    #[serde(default)]
    rate: Option<Value>,
    #[serde(default)]
    force: bool,
}

/// A time given as JSON: a string, or a whole number of epoch ms.
fn time_field(field: &str, v: Option<Value>) -> Result<Option<String>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(Value::Number(n)) if n.is_u64() => Ok(Some(n.to_string())),
        Some(other) => Err(ApiError::bad_request(format!(
            "{field}: give epoch milliseconds or an RFC 3339 time (got {other})"
        ))),
    }
}

pub(super) async fn start_replay(
    engine: Data<Engine>,
    req: HttpRequest,
    body: Json<ReplayBody>,
) -> Result<HttpResponse, ApiError> {
    let by = caller(&req);
    let b = body.into_inner();
    if let Some(ids) = &b.user_ids {
        check_len(&engine, "user_ids", ids.len())?;
    }
    let request = ReplayRequest {
        topic: b.topic.ok_or_else(|| {
            ApiError::bad_request("topic: missing; give `dynamic`, `static` or a topic name")
        })?,
        from_time: time_field("from_time", b.from_time)?,
        to_time: time_field("to_time", b.to_time)?,
        from_offset: b.from_offset,
        to_offset: b.to_offset,
        partition: b.partition,
        user_ids: b.user_ids,
        dry_run: b.dry_run,
        target_collection: b.target_collection,
        rate: parse_rate(b.rate, "events")?,
    };
    let job = engine.start_replay(request, b.force, &by).await?;
    Ok(HttpResponse::Accepted().json(job))
}

pub(super) async fn replay_status(
    engine: Data<Engine>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(engine.replay_job(&id).await?))
}

pub(super) async fn cancel_replay(
    engine: Data<Engine>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let by = caller(&req);
    Ok(cancelled(engine.cancel_replay(&id, &by).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OffsetsParams {
    topic: Option<String>,
    /// Parsed here, so errors name the parameter.
    partition: Option<String>,
    from: Option<String>,
    to: Option<String>,
    limit: Option<String>,
}

/// Most ranges one answer lists.
const MAX_RANGES: usize = 10_000;

pub(super) async fn offsets(
    engine: Data<Engine>,
    q: web::Query<OffsetsParams>,
) -> Result<HttpResponse, ApiError> {
    let q = q.into_inner();
    let time = |field: &str, v: &Option<String>| {
        v.as_deref()
            .map(|s| parse_time(s).map_err(|e| ApiError::bad_request(format!("{field}: {e}"))))
            .transpose()
    };
    let partition = q
        .partition
        .as_deref()
        .map(|p| {
            p.parse::<i32>().ok().filter(|p| *p >= 0).ok_or_else(|| {
                ApiError::bad_request(format!("partition: `{p}` is not a partition number"))
            })
        })
        .transpose()?;
    let limit = parse_limit(q.limit.as_deref(), 1000, MAX_RANGES)?;
    let query = OffsetsQuery {
        topic: q.topic,
        partition,
        from: time("from", &q.from)?,
        to: time("to", &q.to)?,
        limit,
    };
    Ok(HttpResponse::Ok().json(engine.offsets(query).await?))
}

pub(super) async fn whitelist(engine: Data<Engine>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(engine.whitelist()))
}

/// `POST /v1/whitelist/add|remove` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WhitelistBody {
    user_ids: Vec<String>,
}

async fn change(
    engine: Data<Engine>,
    req: HttpRequest,
    body: Json<WhitelistBody>,
    add: bool,
) -> Result<HttpResponse, ApiError> {
    let by = caller(&req);
    check_len(&engine, "user_ids", body.user_ids.len())?;
    let changed = engine.whitelist_change(add, &body.user_ids, &by).await?;
    Ok(HttpResponse::Ok().json(changed))
}

pub(super) async fn whitelist_add(
    engine: Data<Engine>,
    req: HttpRequest,
    body: Json<WhitelistBody>,
) -> Result<HttpResponse, ApiError> {
    change(engine, req, body, true).await
}

pub(super) async fn whitelist_remove(
    engine: Data<Engine>,
    req: HttpRequest,
    body: Json<WhitelistBody>,
) -> Result<HttpResponse, ApiError> {
    change(engine, req, body, false).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperationsParams {
    limit: Option<String>,
}

/// Most operations one answer lists.
const MAX_OPERATIONS: usize = 1000;

pub(super) async fn operations(
    engine: Data<Engine>,
    q: web::Query<OperationsParams>,
) -> Result<HttpResponse, ApiError> {
    let limit = parse_limit(q.limit.as_deref(), 100, MAX_OPERATIONS)?;
    let ops = engine.operations(limit as u64).await?;
    Ok(HttpResponse::Ok().json(json!({ "operations": ops })))
}
