//! The HTTP API (actix-web). Every error answers JSON `{"error": "...", "field": ...}`
//! with a 4xx for bad input and a 5xx/503 for a backend problem.

mod auth;
mod dlq;
mod jobs;
mod ops;
mod sync;

pub(crate) use auth::caller;
pub use auth::{Caller, Gate};

use crate::{
    config::Role,
    engine::{Engine, EngineError},
};
use actix_web::{
    App, HttpRequest, HttpResponse, HttpServer, ResponseError, Route,
    dev::{Server, Service},
    error::JsonPayloadError,
    http::{StatusCode, header},
    web::{self, Data, JsonConfig},
};
use futures::future::{self, Either};
use serde_json::json;

/// An API error with its status and a message naming the problem.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    status: StatusCode,
    message: String,
    /// Seconds for a `Retry-After` header.
    retry_after: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

/// A `limit` query parameter: `default` when absent, else a whole number
/// in `1..=max`; the error names the parameter.
pub(crate) fn parse_limit(v: Option<&str>, default: usize, max: usize) -> Result<usize, ApiError> {
    let Some(l) = v else {
        return Ok(default);
    };
    l.parse::<usize>()
        .ok()
        .filter(|n| (1..=max).contains(n))
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "limit: `{l}` must be a whole number from 1 to {max}"
            ))
        })
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
        let mut r = HttpResponse::build(self.status);
        if let Some(secs) = self.retry_after {
            r.insert_header((header::RETRY_AFTER, secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
        }
        r.json(json!({ "error": self.message }))
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Invalid(m) => Self::bad_request(m),
            e @ EngineError::JobBusy { .. } => Self::new(StatusCode::CONFLICT, e.to_string()),
            e @ EngineError::NoSuchJob { .. } => Self::new(StatusCode::NOT_FOUND, e.to_string()),
            other => Self::new(StatusCode::SERVICE_UNAVAILABLE, other.to_string()),
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
    ApiError::new(status, format!("invalid request body: {err}")).into()
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
    use crate::telemetry::Latency;
    let immediate = json!({
        "to_broker_ack": Latency::summarize(&ack),
        "to_applied": Latency::summarize(&applied),
    });
    HttpResponse::Ok().json(json!({
        "engine": engine.stats(),
        "cache": engine.cache_stats(),
        "latency": Latency::summarize(&engine.latency_histogram()),
        "immediate": immediate,
        "process": crate::telemetry::process_usage(),
        "outages": engine.outages(),
        "backlog": engine.backlog(),
        "histograms": {
            "latency": Latency::encode(&engine.latency_histogram()),
            "immediate_to_applied": Latency::encode(&applied),
        },
    }))
}

/// Each sink of this instance: state, counters, last error, lag.
async fn sinks(engine: Data<Engine>) -> HttpResponse {
    HttpResponse::Ok().json(json!({ "instance": engine.instance_id(), "sinks": engine.sinks() }))
}

async fn shards(engine: Data<Engine>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(engine.shards().await?))
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::new(StatusCode::NOT_FOUND, "no such endpoint"))
}

/// The routes with a gate of their own, for in-process tests and embedding.
pub fn configure(engine: Engine) -> impl FnOnce(&mut web::ServiceConfig) {
    let gate = Data::new(Gate::new(&engine.config().http));
    routes(engine, gate)
}

/// Every endpoint and the role it needs; `/health/*` and `/metrics` are open.
fn routes(engine: Engine, gate: Data<Gate>) -> impl FnOnce(&mut web::ServiceConfig) {
    use Role::{Admin, Read, Write};
    move |cfg: &mut web::ServiceConfig| {
        let limit = engine.config().http.max_body_bytes;
        cfg.app_data(Data::new(engine))
            .app_data(JsonConfig::default().limit(limit).error_handler(json_error))
            .app_data(web::QueryConfig::default().error_handler(query_error));
        let (get, post, delete) = (web::get, web::post, web::delete);
        let table: Vec<(&str, Role, Vec<Route>)> = vec![
            ("/v1/sync/dirty", Write, vec![post().to(sync::mark_dirty)]),
            (
                "/v1/sync/immediate",
                Write,
                vec![post().to(sync::sync_immediate)],
            ),
            ("/v1/sync/delete", Write, vec![post().to(sync::delete)]),
            (
                "/v1/profiles/{user_id}",
                Read,
                vec![get().to(sync::profile)],
            ),
            ("/v1/cache/stats", Read, vec![get().to(sync::cache_stats)]),
            ("/v1/stats", Read, vec![get().to(stats)]),
            ("/v1/shards", Read, vec![get().to(shards)]),
            ("/v1/sinks", Read, vec![get().to(sinks)]),
            ("/v1/dlq", Admin, vec![get().to(dlq::dlq_list)]),
            ("/v1/dlq/redrive", Admin, vec![post().to(dlq::dlq_redrive)]),
            ("/v1/resync", Admin, vec![post().to(jobs::start_resync)]),
            (
                "/v1/resync/{id}",
                Admin,
                vec![
                    get().to(jobs::resync_status),
                    delete().to(jobs::cancel_resync),
                ],
            ),
            (
                "/v1/consistency/check",
                Admin,
                vec![post().to(jobs::start_check)],
            ),
            (
                "/v1/consistency/check/{id}",
                Admin,
                vec![get().to(jobs::check_status)],
            ),
            (
                "/v1/consistency/report",
                Admin,
                vec![get().to(jobs::report)],
            ),
            ("/v1/replay", Admin, vec![post().to(ops::start_replay)]),
            (
                "/v1/replay/{id}",
                Admin,
                vec![
                    get().to(ops::replay_status),
                    delete().to(ops::cancel_replay),
                ],
            ),
            ("/v1/offsets", Admin, vec![get().to(ops::offsets)]),
            ("/v1/whitelist", Admin, vec![get().to(ops::whitelist)]),
            (
                "/v1/whitelist/add",
                Admin,
                vec![post().to(ops::whitelist_add)],
            ),
            (
                "/v1/whitelist/remove",
                Admin,
                vec![post().to(ops::whitelist_remove)],
            ),
            ("/v1/operations", Admin, vec![get().to(ops::operations)]),
        ];
        for (path, role, methods) in table {
            let gate = gate.clone();
            let resource = methods
                .into_iter()
                .fold(web::resource(path), |r, m| r.route(m))
                .wrap_fn(move |req, srv| match gate.check(role, &req) {
                    Ok(caller) => {
                        auth::admit(&req, caller);
                        Either::Left(srv.call(req))
                    }
                    Err(e) => {
                        Either::Right(future::ready(Ok(req.into_response(e.error_response()))))
                    }
                });
            cfg.service(resource);
        }
        cfg.route("/health/live", get().to(live))
            .route("/health/ready", get().to(ready))
            .route("/metrics", get().to(metrics))
            .default_service(web::to(not_found));
    }
}

/// Binds the HTTP server (HTTPS when `http.tls_cert` is set). Refuses a
/// non-loopback bind that no token guards. Runs until the returned server
/// is stopped.
pub fn serve(engine: Engine) -> anyhow::Result<Server> {
    let http = engine.config().http.clone();
    http.check_exposure().map_err(anyhow::Error::msg)?;
    let gate = Data::new(Gate::new(&http));
    let server =
        HttpServer::new(move || App::new().configure(routes(engine.clone(), gate.clone())))
            .workers(2)
            .disable_signals();
    let server = if http.tls() {
        let tls = crate::tls::server_config(&http.tls_cert, &http.tls_key)?;
        server.bind_rustls_0_23(&http.bind, tls)
    } else {
        server.bind(&http.bind)
    }
    .map_err(|e| anyhow::anyhow!("http.bind = {}: {e}", http.bind))?;
    let scheme = if http.tls() { "https" } else { "http" };
    tracing::info!(bind = %http.bind, scheme, "http api listening");
    Ok(server.run())
}
