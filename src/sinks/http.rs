//! The HTTP sink (seed 003's CRM adapter): POSTs each window as JSON
//! batches to one URL, with a bearer token, an idempotency key per item
//! (its event id, the same on every retry) and the version per item, so
//! the target can apply newer-wins and drop what it has seen.
//!
//! A request:
//!
//! ```json
//! {"sink": "crm", "items": [
//!   {"idempotency_key": "…", "user_id": "u1", "op": "upsert", "section": "dynamic",
//!    "version": 1764000000000000, "profile": {"level": 3}},
//!   {"idempotency_key": "…", "user_id": "u2", "op": "delete", "version": 1764000000000123}
//! ]}
//! ```
//!
//! The answer decides each item:
//! - `2xx` with `{"results": [{"status": 200}, {"status": 409}, …]}`, one
//!   per item in order: `2xx` applied, `409` stale (the target holds a newer
//!   version), `408`, `425`, `429` and `5xx` retried (after the item's
//!   `retry_after` seconds if given), any other `4xx` refused for good (a
//!   dead letter with the item's `error`). A `2xx` without `results`
//!   applies every item.
//! - `400`, `413` or `422` for a request of several items: each item is
//!   sent alone, so only the one the target refuses is dead-lettered (a
//!   single item answered so is).
//! - Any other status for the whole request (`429`, `503`, other `5xx`,
//!   `401`, `403`, `404`, …) and network errors say nothing of the items: the
//!   window is sent again after the `Retry-After` the target gave (seconds
//!   or an HTTP date, at most an hour) or the retry policy's delay, the sink
//!   reported down meanwhile. Nothing is dead-lettered for them.

use super::{Change, Op, Outcome, Sink, SinkError};
use crate::{
    config::{Secret, SinkConfig},
    proto::document_to_json,
};
use futures::future::BoxFuture;
use reqwest::{StatusCode, header};
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime};

pub struct HttpSink {
    name: String,
    client: reqwest::Client,
    url: reqwest::Url,
    token: Secret,
    max_batch: usize,
}

/// One item of a request.
#[derive(Debug, Serialize)]
struct Item<'a> {
    idempotency_key: &'a str,
    user_id: &'a str,
    /// `upsert` or `delete`.
    op: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    section: Option<&'static str>,
    version: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    profile: Option<serde_json::Value>,
}

#[derive(Debug, Serialize)]
struct Batch<'a> {
    sink: &'a str,
    items: Vec<Item<'a>>,
}

/// The answer's body.
#[derive(Debug, Deserialize)]
struct Answer {
    #[serde(default)]
    results: Option<Vec<ItemAnswer>>,
}

#[derive(Debug, Deserialize)]
struct ItemAnswer {
    status: u16,
    #[serde(default)]
    error: Option<String>,
    /// Seconds.
    #[serde(default)]
    retry_after: Option<f64>,
}

fn item(c: &Change) -> Item<'_> {
    match &c.op {
        Op::Set(doc) => Item {
            idempotency_key: &c.event_id,
            user_id: &c.user_id,
            op: "upsert",
            section: Some(c.section.label()),
            version: c.version,
            profile: Some(document_to_json(doc)),
        },
        Op::Delete => Item {
            idempotency_key: &c.event_id,
            user_id: &c.user_id,
            op: "delete",
            section: None,
            version: c.version,
            profile: None,
        },
    }
}

/// The longest wait a target may ask for; more is taken as this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// `Retry-After`: delta seconds or an HTTP date, at most an hour.
fn retry_after(headers: &header::HeaderMap) -> Option<Duration> {
    let v = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    let wait = match v.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => {
            let at = httpdate::parse_http_date(v).ok()?;
            at.duration_since(SystemTime::now()).unwrap_or_default()
        }
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// An item's `retry_after` seconds, at most an hour; nothing for a value
/// that is not a time.
fn item_retry_after(secs: Option<f64>) -> Option<Duration> {
    let secs = secs.filter(|s| *s >= 0.0)?;
    Some(Duration::try_from_secs_f64(secs).map_or(MAX_RETRY_AFTER, |d| d.min(MAX_RETRY_AFTER)))
}

/// One item's answer as an outcome.
fn outcome_of(a: &ItemAnswer) -> Outcome {
    let error = || {
        format!(
            "http {}: {}",
            a.status,
            a.error.as_deref().unwrap_or("no reason given")
        )
    };
    match a.status {
        200..=299 => Outcome::Applied,
        409 => Outcome::Stale,
        408 | 425 | 429 | 500..=599 => Outcome::retry(error(), item_retry_after(a.retry_after)),
        _ => Outcome::rejected(error()),
    }
}

impl HttpSink {
    pub fn new(c: &SinkConfig) -> Result<Self, SinkError> {
        crate::tls::ensure_provider();
        let url = reqwest::Url::parse(c.url.expose())
            .map_err(|e| SinkError::new(format!("sink {}: url: {e}", c.name)))?;
        let client = reqwest::Client::builder()
            .timeout(c.timeout())
            .connect_timeout(c.timeout().min(Duration::from_secs(10)))
            .user_agent(concat!("datasync/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| SinkError::new(format!("sink {}: {e}", c.name)))?;
        Ok(Self {
            name: c.name.clone(),
            client,
            url,
            token: c.token.clone(),
            max_batch: c.max_batch(),
        })
    }

    /// Sends `changes` as one request and answers an outcome each; a
    /// request refused for its content is split into single items.
    fn send<'a>(&'a self, changes: &'a [Change]) -> BoxFuture<'a, Result<Vec<Outcome>, SinkError>> {
        Box::pin(async move {
            let body = Batch {
                sink: &self.name,
                items: changes.iter().map(item).collect(),
            };
            let mut request = self.client.post(self.url.clone()).json(&body);
            if !self.token.is_empty() {
                request = request.bearer_auth(self.token.expose());
            }
            let response = request
                .send()
                .await
                .map_err(|e| SinkError::new(format!("http: {}", without_url(&e))))?;
            let status = response.status();
            let wait = retry_after(response.headers());
            let text = response.text().await.unwrap_or_default();
            let said = || {
                let t = text.trim();
                if t.is_empty() {
                    String::new()
                } else {
                    format!(": {}", t.chars().take(300).collect::<String>())
                }
            };
            if status.is_success() {
                // A 2xx without per-item results (an empty body, or one that
                // says nothing of them) applies every item.
                let results = serde_json::from_str::<Answer>(&text)
                    .ok()
                    .and_then(|a| a.results);
                return match results {
                    None => Ok(vec![Outcome::Applied; changes.len()]),
                    Some(r) if r.len() == changes.len() => Ok(r.iter().map(outcome_of).collect()),
                    Some(r) => Err(SinkError::new(format!(
                        "http: {} results for {} items",
                        r.len(),
                        changes.len()
                    ))),
                };
            }
            match status {
                // The request's content is refused: several items are sent
                // one by one, so the target names the one it refuses; that
                // one alone becomes a dead letter.
                StatusCode::BAD_REQUEST
                | StatusCode::PAYLOAD_TOO_LARGE
                | StatusCode::UNPROCESSABLE_ENTITY => {
                    if changes.len() == 1 {
                        return Ok(vec![Outcome::rejected(format!("http {status}{}", said()))]);
                    }
                    tracing::warn!(sink = %self.name, %status, items = changes.len(), "http sink refused a batch; sending its items one by one");
                    let mut out = Vec::with_capacity(changes.len());
                    for c in changes.chunks(1) {
                        out.extend(self.send(c).await?);
                    }
                    Ok(out)
                }
                // Anything else says nothing of the items (throttling, the
                // target down, a wrong URL or token): the window waits and is
                // sent again, after the target's Retry-After if it gave one.
                s => Err(SinkError::new(format!("http {s}{}", said())).retry_after(wait)),
            }
        })
    }
}

/// reqwest's error without the URL, which may carry a secret in its query.
fn without_url(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let mut source = std::error::Error::source(e);
    let mut detail = String::new();
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if detail.is_empty() {
        kind.to_string()
    } else {
        format!("{kind}: {detail}")
    }
}

impl Sink for HttpSink {
    fn kind(&self) -> &str {
        "http"
    }

    /// Nothing to prepare: the target is reached by the first window.
    fn prepare(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async { Ok(()) })
    }

    fn apply<'a>(&'a self, window: &'a [Change]) -> BoxFuture<'a, Result<Vec<Outcome>, SinkError>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(window.len());
            for batch in window.chunks(self.max_batch) {
                out.extend(self.send(batch).await?);
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_answers_map_to_outcomes() {
        let a = |status, retry_after| ItemAnswer {
            status,
            error: Some("why".into()),
            retry_after,
        };
        assert_eq!(outcome_of(&a(200, None)), Outcome::Applied);
        assert_eq!(outcome_of(&a(204, None)), Outcome::Applied);
        assert_eq!(outcome_of(&a(409, None)), Outcome::Stale);
        assert_eq!(
            outcome_of(&a(429, Some(2.0))),
            Outcome::retry("http 429: why", Some(Duration::from_secs(2)))
        );
        assert_eq!(
            outcome_of(&a(503, None)),
            Outcome::retry("http 503: why", None)
        );
        assert_eq!(
            outcome_of(&a(400, None)),
            Outcome::rejected("http 400: why")
        );
    }

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        let mut h = header::HeaderMap::new();
        h.insert(header::RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        let later = SystemTime::now() + Duration::from_secs(60);
        h.insert(
            header::RETRY_AFTER,
            httpdate::fmt_http_date(later).parse().unwrap(),
        );
        let d = retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(50) && d <= Duration::from_secs(60),
            "{d:?}"
        );
        h.insert(header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }
}
