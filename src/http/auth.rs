//! Who may call what: named bearer tokens with roles, the loopback-only
//! default when no token is configured, and rate limits per token (per
//! client address without tokens) with 429 and `Retry-After`.
//!
//! Every endpoint but `/health/*` and `/metrics` goes through [`Gate::check`]
//! before its body is read, so a refused request changes nothing.

use super::ApiError;
use crate::config::{HttpConfig, Role};
use crate::telemetry::names;
use actix_web::{HttpMessage, HttpRequest, dev::ServiceRequest, http::StatusCode};
use governor::{
    DefaultKeyedRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};
use metrics::counter;
use std::{net::IpAddr, num::NonZeroU32};

/// The authenticated caller, kept in the request's extensions for handlers
/// that log who acted.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The token's name, or `local` when no token is configured.
    pub name: String,
    pub role: Role,
}

/// The caller's name for the operation log: the token's name, never its
/// secret.
pub(crate) fn caller(req: &HttpRequest) -> String {
    req.extensions()
        .get::<Caller>()
        .map_or_else(|| LOCAL.to_string(), |c| c.name.clone())
}

/// The name of callers when no token is configured.
const LOCAL: &str = "local";

/// Keys kept by each limiter before idle ones are dropped.
const MAX_TRACKED_KEYS: usize = 10_000;

struct Token {
    name: String,
    role: Role,
    secret: Vec<u8>,
}

/// The tokens and the limiters, shared by every worker of one server.
pub struct Gate {
    tokens: Vec<Token>,
    limits: [Option<DefaultKeyedRateLimiter<String>>; 3],
    clock: DefaultClock,
}

impl Gate {
    pub fn new(c: &HttpConfig) -> Self {
        let tokens = c
            .all_tokens()
            .into_iter()
            .map(|(name, t)| Token {
                name,
                role: t.role,
                secret: t.secret.expose().as_bytes().to_vec(),
            })
            .collect();
        let limiter = |role: Role| {
            let l = c.rate_limit.of(role);
            let per_second = NonZeroU32::new(l.per_second)?;
            let burst = NonZeroU32::new(l.burst).unwrap_or(per_second);
            Some(RateLimiter::keyed(
                Quota::per_second(per_second).allow_burst(burst),
            ))
        };
        Self {
            tokens,
            limits: Role::ALL.map(limiter),
            clock: DefaultClock::default(),
        }
    }

    /// Lets the request through to an endpoint that needs `needed`, or
    /// answers 401 (no or unknown token), 403 (a role too low, or a
    /// non-loopback client when no token is configured) or 429.
    pub fn check(&self, needed: Role, req: &ServiceRequest) -> Result<Caller, ApiError> {
        let peer = req.peer_addr().map(|a| a.ip());
        let caller = self.authenticate(needed, req, peer).inspect_err(|e| {
            let reason = if e.status == StatusCode::UNAUTHORIZED {
                "unauthorized"
            } else {
                "forbidden"
            };
            counter!(names::HTTP_REFUSED, "reason" => reason).increment(1);
            tracing::debug!(path = req.path(), ?peer, %e, "request refused");
        })?;
        let key = if self.tokens.is_empty() {
            peer.map_or_else(|| LOCAL.to_string(), |ip| ip.to_string())
        } else {
            caller.name.clone()
        };
        self.limit(needed, key)?;
        tracing::debug!(path = req.path(), token = %caller.name, "request allowed");
        Ok(caller)
    }

    fn authenticate(
        &self,
        needed: Role,
        req: &ServiceRequest,
        peer: Option<IpAddr>,
    ) -> Result<Caller, ApiError> {
        if self.tokens.is_empty() {
            // In-process calls (tests, embedding) have no peer address.
            if peer.is_some_and(|ip| !ip.is_loopback()) {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "no token is configured (http.tokens), so only loopback clients may call",
                ));
            }
            return Ok(Caller {
                name: LOCAL.into(),
                role: Role::Admin,
            });
        }
        let given = req
            .headers()
            .get(actix_web::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("")
            .as_bytes();
        // Every token is compared, each in time independent of where the
        // strings differ.
        let mut found = None;
        for t in &self.tokens {
            if constant_time_eq(given, &t.secret) {
                found = Some(t);
            }
        }
        let Some(t) = found else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or unknown bearer token (Authorization: Bearer <secret>)",
            ));
        };
        if t.role < needed {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "token \"{}\" has the {} role; this endpoint needs {}",
                    t.name,
                    t.role.as_str(),
                    needed.as_str()
                ),
            ));
        }
        Ok(Caller {
            name: t.name.clone(),
            role: t.role,
        })
    }

    /// Counts the request against the endpoint role's quota for `key`.
    fn limit(&self, role: Role, key: String) -> Result<(), ApiError> {
        let Some(limiter) = &self.limits[role as usize] else {
            return Ok(());
        };
        if limiter.len() > MAX_TRACKED_KEYS {
            limiter.retain_recent();
        }
        limiter.check_key(&key).map_err(|not_until| {
            counter!(names::HTTP_REFUSED, "reason" => "rate_limited").increment(1);
            let wait = not_until.wait_time_from(self.clock.now());
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "rate limit of {} requests exceeded; retry in {secs} s",
                    role.as_str()
                ),
            )
            .retry_after(secs.max(1))
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Attaches the caller to the request, for [`caller`].
pub(super) fn admit(req: &ServiceRequest, caller: Caller) {
    req.extensions_mut().insert(caller);
}
