//! The dead-letter endpoints (admin): list and redrive.

use super::{ApiError, caller, check_len, parse_limit};

/// Most dead letters one answer lists.
const MAX_DEAD_LETTERS: usize = 10_000;
use crate::{actors::dlq::RedriveTarget, engine::Engine};
use actix_web::{
    HttpRequest, HttpResponse,
    web::{self, Data, Json},
};
use serde::Deserialize;
use serde_json::json;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DlqQuery {
    /// Parsed here rather than by serde, so the error names the parameter.
    limit: Option<String>,
}

pub(super) async fn dlq_list(
    engine: Data<Engine>,
    query: web::Query<DlqQuery>,
) -> Result<HttpResponse, ApiError> {
    let limit = parse_limit(
        query.limit.as_deref(),
        engine.config().dlq.list_limit,
        MAX_DEAD_LETTERS,
    )?;
    Ok(HttpResponse::Ok().json(engine.dlq_list(limit).await?))
}

/// `POST /v1/dlq/redrive` body: `{"user_ids": [...]}` or `{"all": true}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedriveRequest {
    #[serde(default)]
    user_ids: Option<Vec<String>>,
    #[serde(default)]
    all: bool,
}

pub(super) async fn dlq_redrive(
    engine: Data<Engine>,
    req: HttpRequest,
    body: Json<RedriveRequest>,
) -> Result<HttpResponse, ApiError> {
    let by = caller(&req);
    let target = match body.into_inner() {
        RedriveRequest {
            user_ids: Some(ids),
            all: false,
        } => {
            check_len(&engine, "user_ids", ids.len())?;
            RedriveTarget::Users(ids)
        }
        RedriveRequest {
            user_ids: None,
            all: true,
        } => RedriveTarget::All,
        _ => {
            return Err(ApiError::bad_request(
                "give exactly one of `user_ids` or `\"all\": true`",
            ));
        }
    };
    let r = engine.dlq_redrive(target, &by).await?;
    Ok(HttpResponse::Ok().json(json!({
        "redriven": r.redriven.len(),
        "versions": r.redriven.iter().map(|(u, v)| json!({"user_id": u, "version": v})).collect::<Vec<_>>(),
        "not_open": r.not_open,
    })))
}
