//! The data endpoints: flag users (`/v1/sync/dirty`), immediate changes,
//! deletes, profile reads and cache statistics.

use super::{ApiError, check_len};
use crate::engine::{Engine, EngineError, ProfileWrite};
use actix_web::{
    HttpResponse,
    http::StatusCode,
    web::{self, Data, Json},
};
use serde::Deserialize;
use serde_json::json;

/// `POST /v1/sync/dirty` body: either user ids whose profiles are already in
/// Redis, or users with the profile to write first.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirtyRequest {
    #[serde(default)]
    user_ids: Option<Vec<String>>,
    #[serde(default)]
    users: Option<Vec<UserProfile>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserProfile {
    user_id: String,
    profile: serde_json::Value,
}

pub(super) async fn mark_dirty(
    engine: Data<Engine>,
    body: Json<DirtyRequest>,
) -> Result<HttpResponse, ApiError> {
    let marked = match body.into_inner() {
        DirtyRequest {
            user_ids: Some(ids),
            users: None,
        } => {
            check_len(&engine, "user_ids", ids.len())?;
            engine.mark_dirty(&ids).await?
        }
        DirtyRequest {
            user_ids: None,
            users: Some(users),
        } => {
            check_len(&engine, "users", users.len())?;
            let writes: Vec<ProfileWrite> = users
                .into_iter()
                .map(|u| ProfileWrite {
                    user_id: u.user_id,
                    profile: u.profile,
                })
                .collect();
            engine.write_and_mark(&writes).await?
        }
        _ => {
            return Err(ApiError::bad_request(
                "give exactly one of `user_ids` or `users`",
            ));
        }
    };
    Ok(HttpResponse::Ok().json(json!({ "marked": marked.len(), "versions": marked })))
}

/// `POST /v1/sync/immediate` body: one user's complete static profile.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImmediateRequest {
    user_id: String,
    profile: serde_json::Value,
}

pub(super) async fn sync_immediate(
    engine: Data<Engine>,
    body: Json<ImmediateRequest>,
) -> Result<HttpResponse, ApiError> {
    let ImmediateRequest { user_id, profile } = body.into_inner();
    if !profile.is_object() {
        return Err(ApiError::bad_request("profile: must be a JSON object"));
    }
    match engine.sync_immediate(&user_id, profile).await {
        Ok(receipt) => Ok(HttpResponse::Ok().json(receipt)),
        Err(EngineError::Invalid(m)) => {
            Err(ApiError::bad_request(m.replace("user_ids[0]", "user_id")))
        }
        Err(e @ EngineError::NotPublished { version, .. }) => {
            Ok(HttpResponse::ServiceUnavailable()
                .json(json!({ "error": e.to_string(), "version": version, "accepted": true })))
        }
        Err(e) => Err(e.into()),
    }
}

/// `POST /v1/sync/delete` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteRequest {
    user_ids: Vec<String>,
}

/// Deletes users: their Redis profiles go and a versioned delete is flagged;
/// MongoDB keeps a tombstone. Answers the delete versions.
pub(super) async fn delete(
    engine: Data<Engine>,
    body: Json<DeleteRequest>,
) -> Result<HttpResponse, ApiError> {
    let ids = body.into_inner().user_ids;
    check_len(&engine, "user_ids", ids.len())?;
    let deleted = engine.delete(&ids).await?;
    Ok(HttpResponse::Ok().json(json!({ "deleted": deleted.len(), "versions": deleted })))
}

pub(super) async fn profile(
    engine: Data<Engine>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let user_id = path.into_inner();
    match engine.profile(&user_id).await {
        Ok(Some(p)) => Ok(HttpResponse::Ok().json(&*p)),
        Ok(None) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("user `{user_id}`: no profile in MongoDB or Redis (unknown or deleted)"),
        )),
        Err(EngineError::Invalid(m)) => {
            Err(ApiError::bad_request(m.replace("user_ids[0]", "user_id")))
        }
        Err(e) => Err(e.into()),
    }
}

pub(super) async fn cache_stats(engine: Data<Engine>) -> HttpResponse {
    let a = engine.cache_stats();
    let lookups = a.l1_hits + a.l2_hits + a.mongo_lookups;
    HttpResponse::Ok().json(json!({
        "applied_versions": {
            "l1_hits": a.l1_hits,
            "l2_hits": a.l2_hits,
            "mongo_lookups": a.mongo_lookups,
            "hit_rate": if lookups == 0 { 0.0 } else { (a.l1_hits + a.l2_hits) as f64 / lookups as f64 },
        },
        "profiles": engine.profile_cache_stats(),
    }))
}
