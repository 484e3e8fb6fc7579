//! The HTTP API (actix-web). Every error answers JSON `{"error": "...", "field": ...}`
//! with a 4xx for bad input and a 5xx/503 for a backend problem.

use crate::{
    actors::dlq::RedriveTarget,
    engine::{Engine, EngineError, ProfileWrite},
};
use actix_web::{
    App, HttpRequest, HttpResponse, HttpServer, ResponseError,
    dev::Server,
    error::JsonPayloadError,
    http::StatusCode,
    web::{self, Data, Json, JsonConfig},
};
use serde::Deserialize;
use serde_json::json;

/// An API error with its status and a message naming the problem.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }
    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status).json(json!({ "error": self.message }))
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Invalid(m) => Self::bad_request(m),
            e @ EngineError::NotPublished { .. } => Self {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: e.to_string(),
            },
            other => Self {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: other.to_string(),
            },
        }
    }
}

fn json_error(err: JsonPayloadError, _: &HttpRequest) -> actix_web::Error {
    let status = match &err {
        JsonPayloadError::Overflow { .. } | JsonPayloadError::OverflowKnownLength { .. } => {
            StatusCode::PAYLOAD_TOO_LARGE
        }
        JsonPayloadError::ContentType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        _ => StatusCode::BAD_REQUEST,
    };
    ApiError {
        status,
        message: format!("invalid request body: {err}"),
    }
    .into()
}

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

async fn mark_dirty(
    engine: Data<Engine>,
    body: Json<DirtyRequest>,
) -> Result<HttpResponse, ApiError> {
    let max = engine.config().http.max_users_per_request;
    let marked = match body.into_inner() {
        DirtyRequest {
            user_ids: Some(ids),
            users: None,
        } => {
            if ids.len() > max {
                return Err(ApiError::bad_request(format!(
                    "user_ids: more than {max} entries"
                )));
            }
            engine.mark_dirty(&ids).await?
        }
        DirtyRequest {
            user_ids: None,
            users: Some(users),
        } => {
            if users.len() > max {
                return Err(ApiError::bad_request(format!(
                    "users: more than {max} entries"
                )));
            }
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

async fn sync_immediate(
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

async fn profile(engine: Data<Engine>, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let user_id = path.into_inner();
    match engine.profile(&user_id).await {
        Ok(Some(p)) => Ok(HttpResponse::Ok().json(&*p)),
        Ok(None) => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("user `{user_id}`: no profile in MongoDB or Redis"),
        }),
        Err(EngineError::Invalid(m)) => {
            Err(ApiError::bad_request(m.replace("user_ids[0]", "user_id")))
        }
        Err(e) => Err(e.into()),
    }
}

async fn cache_stats(engine: Data<Engine>) -> HttpResponse {
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

async fn live() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "live" }))
}

/// 200 when ready or degraded (flags are still accepted; the reasons say what
/// is paused), 503 when unavailable.
async fn ready(engine: Data<Engine>) -> HttpResponse {
    let r = engine.readiness().await;
    if r.status == "unavailable" {
        HttpResponse::ServiceUnavailable().json(r)
    } else {
        HttpResponse::Ok().json(r)
    }
}

/// Checks `Authorization: Bearer <http.admin_token>`.
fn require_admin(engine: &Engine, req: &HttpRequest) -> Result<(), ApiError> {
    let token = engine.config().http.admin_token.expose();
    if token.is_empty() {
        return Err(ApiError {
            status: StatusCode::FORBIDDEN,
            message: "admin endpoints are disabled: set http.admin_token".into(),
        });
    }
    let given = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compare in time independent of where the strings differ.
    let same = given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "missing or wrong bearer token".into(),
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DlqQuery {
    /// Parsed here rather than by serde, so the error names the parameter.
    limit: Option<String>,
}

async fn dlq_list(
    engine: Data<Engine>,
    req: HttpRequest,
    query: web::Query<DlqQuery>,
) -> Result<HttpResponse, ApiError> {
    require_admin(&engine, &req)?;
    let limit = match &query.limit {
        None => engine.config().dlq.list_limit,
        Some(l) => l
            .parse::<usize>()
            .map_err(|_| ApiError::bad_request(format!("limit: `{l}` is not a whole number")))?,
    };
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::bad_request("limit: must be between 1 and 10000"));
    }
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

async fn dlq_redrive(
    engine: Data<Engine>,
    req: HttpRequest,
    body: Json<RedriveRequest>,
) -> Result<HttpResponse, ApiError> {
    require_admin(&engine, &req)?;
    let target = match body.into_inner() {
        RedriveRequest {
            user_ids: Some(ids),
            all: false,
        } => {
            let max = engine.config().http.max_users_per_request;
            if ids.len() > max {
                return Err(ApiError::bad_request(format!(
                    "user_ids: more than {max} entries"
                )));
            }
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
    let r = engine.dlq_redrive(target).await?;
    Ok(HttpResponse::Ok().json(json!({
        "redriven": r.redriven.len(),
        "versions": r.redriven.iter().map(|(u, v)| json!({"user_id": u, "version": v})).collect::<Vec<_>>(),
        "not_open": r.not_open,
    })))
}

fn query_error(err: actix_web::error::QueryPayloadError, _: &HttpRequest) -> actix_web::Error {
    ApiError::bad_request(format!("invalid query string: {err}")).into()
}

async fn metrics() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(crate::telemetry::prometheus().render())
}

async fn stats(engine: Data<Engine>) -> HttpResponse {
    let (ack, applied) = engine.immediate_latency_histograms();
    let immediate = json!({
        "to_broker_ack": crate::telemetry::Latency::summarize(&ack),
        "to_applied": crate::telemetry::Latency::summarize(&applied),
    });
    HttpResponse::Ok().json(json!({
        "engine": engine.stats(),
        "cache": engine.cache_stats(),
        "latency": crate::telemetry::Latency::summarize(&engine.latency_histogram()),
        "immediate": immediate,
        "process": crate::telemetry::process_usage(),
        "outages": engine.outages(),
    }))
}

async fn shards(engine: Data<Engine>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(engine.shards().await?))
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError {
        status: StatusCode::NOT_FOUND,
        message: "no such endpoint".into(),
    })
}

/// The routes, for the server and for in-process tests.
pub fn configure(engine: Engine) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg: &mut web::ServiceConfig| {
        let limit = engine.config().http.max_body_bytes;
        cfg.app_data(Data::new(engine))
            .app_data(JsonConfig::default().limit(limit).error_handler(json_error))
            .route("/v1/sync/dirty", web::post().to(mark_dirty))
            .route("/v1/sync/immediate", web::post().to(sync_immediate))
            .route("/v1/profiles/{user_id}", web::get().to(profile))
            .route("/v1/cache/stats", web::get().to(cache_stats))
            .app_data(web::QueryConfig::default().error_handler(query_error))
            .route("/v1/stats", web::get().to(stats))
            .route("/v1/shards", web::get().to(shards))
            .route("/v1/dlq", web::get().to(dlq_list))
            .route("/v1/dlq/redrive", web::post().to(dlq_redrive))
            .route("/health/live", web::get().to(live))
            .route("/health/ready", web::get().to(ready))
            .route("/metrics", web::get().to(metrics))
            .default_service(web::to(not_found));
    }
}

/// Binds the HTTP server. Runs until the returned server is stopped.
pub fn serve(engine: Engine) -> std::io::Result<Server> {
    let bind = engine.config().http.bind.clone();
    let server = HttpServer::new(move || App::new().configure(configure(engine.clone())))
        .workers(2)
        .disable_signals()
        .bind(&bind)?
        .run();
    tracing::info!(%bind, "http api listening");
    Ok(server)
}
