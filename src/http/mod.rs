//! The HTTP API (actix-web). Every error answers JSON `{"error": "...", "field": ...}`
//! with a 4xx for bad input and a 5xx/503 for a backend problem.

mod dlq;
mod jobs;
mod ops;
mod sync;

use crate::engine::{Engine, EngineError};
use actix_web::{
    App, HttpRequest, HttpResponse, HttpServer, ResponseError,
    dev::Server,
    error::JsonPayloadError,
    http::StatusCode,
    web::{self, Data, JsonConfig},
};
use serde_json::json;

/// An API error with its status and a message naming the problem.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

/// Refuses a list longer than `http.max_users_per_request`, naming `field`.
pub(crate) fn check_len(engine: &Engine, field: &str, len: usize) -> Result<(), ApiError> {
    let max = engine.config().http.max_users_per_request;
    if len > max {
        return Err(ApiError::bad_request(format!(
            "{field}: more than {max} entries"
        )));
    }
    Ok(())
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
            e @ EngineError::JobBusy { .. } => Self {
                status: StatusCode::CONFLICT,
                message: e.to_string(),
            },
            e @ EngineError::NoSuchJob { .. } => Self {
                status: StatusCode::NOT_FOUND,
                message: e.to_string(),
            },
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

/// The name the admin token goes by in logs and the operation log.
pub(crate) const ADMIN_TOKEN_NAME: &str = "admin";

/// Checks `Authorization: Bearer <http.admin_token>`; answers the token's
/// name (never the secret), for the operation log.
pub(crate) fn require_admin(engine: &Engine, req: &HttpRequest) -> Result<&'static str, ApiError> {
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
        Ok(ADMIN_TOKEN_NAME)
    } else {
        Err(ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "missing or wrong bearer token".into(),
        })
    }
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
            .app_data(web::QueryConfig::default().error_handler(query_error))
            .route("/v1/sync/dirty", web::post().to(sync::mark_dirty))
            .route("/v1/sync/immediate", web::post().to(sync::sync_immediate))
            .route("/v1/sync/delete", web::post().to(sync::delete))
            .route("/v1/profiles/{user_id}", web::get().to(sync::profile))
            .route("/v1/cache/stats", web::get().to(sync::cache_stats))
            .route("/v1/stats", web::get().to(stats))
            .route("/v1/shards", web::get().to(shards))
            .route("/v1/dlq", web::get().to(dlq::dlq_list))
            .route("/v1/dlq/redrive", web::post().to(dlq::dlq_redrive))
            .route("/v1/resync", web::post().to(jobs::start_resync))
            .route("/v1/resync/{id}", web::get().to(jobs::resync_status))
            .route("/v1/resync/{id}", web::delete().to(jobs::cancel_resync))
            .route("/v1/consistency/check", web::post().to(jobs::start_check))
            .route(
                "/v1/consistency/check/{id}",
                web::get().to(jobs::check_status),
            )
            .route("/v1/consistency/report", web::get().to(jobs::report))
            .route("/v1/replay", web::post().to(ops::start_replay))
            .route("/v1/replay/{id}", web::get().to(ops::replay_status))
            .route("/v1/replay/{id}", web::delete().to(ops::cancel_replay))
            .route("/v1/offsets", web::get().to(ops::offsets))
            .route("/v1/whitelist", web::get().to(ops::whitelist))
            .route("/v1/whitelist/add", web::post().to(ops::whitelist_add))
            .route(
                "/v1/whitelist/remove",
                web::post().to(ops::whitelist_remove),
            )
            .route("/v1/operations", web::get().to(ops::operations))
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
