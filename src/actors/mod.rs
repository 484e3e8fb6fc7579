//! The actors of the sync pipeline, in the order data flows through them.
//!
//! Each lives on its own arbiter (thread), under an actix `Supervisor`, with a
//! mailbox bounded from `[mailbox]` in the config. Every data-path send is
//! `Addr::send().await`, so a full mailbox slows the sender instead of growing
//! memory.
//!
//! Supervision: every handler runs inside [`guard`], which turns a panic into a
//! [`StageError::Panicked`] answer for the sender (whose batch is then retried,
//! its flags untouched) and stops the actor, which its `Supervisor` restarts
//! after a growing pause ([`restart_pause`]). Restarts are counted in
//! `datasync_actor_restarts_total{actor}`.

pub mod applier;
pub mod dlq;
pub mod loader;
pub mod publisher;
pub mod resolver;
pub mod scanner;
pub mod static_path;

use crate::{
    cache::CacheError,
    clients::{mongo::MongoError, redis::RedisError},
    retry::{GaveUp, Retryable},
    telemetry::Stats,
};
use actix::prelude::*;
use futures::FutureExt;
use std::{future::Future, panic::AssertUnwindSafe, sync::Arc, time::Duration};

/// A dirty flag: a user and the version of its latest flagged change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flag {
    pub user_id: String,
    pub version: i64,
}

/// Why a stage could not do its job for a whole batch. The batch's flags stay,
/// so a later cycle retries it.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    Redis(#[from] RedisError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Mongo(#[from] MongoError),
    /// A sink could not take a window.
    #[error("{0}")]
    Sink(#[from] crate::sinks::SinkError),
    /// A mailbox closed under a sender: the engine is stopping or the actor is
    /// restarting.
    #[error("actor {0} is not running: {1}")]
    Mailbox(&'static str, actix::MailboxError),
    #[error("actor {actor} panicked ({message}); it is restarted and the batch retried")]
    Panicked {
        actor: &'static str,
        message: String,
    },
    #[error("{0}")]
    GaveUp(String),
}

impl<E: std::fmt::Display + Into<StageError>> From<GaveUp<E>> for StageError {
    fn from(g: GaveUp<E>) -> Self {
        if g.retries == 0 {
            g.error.into()
        } else {
            StageError::GaveUp(g.to_string())
        }
    }
}

impl Retryable for StageError {
    fn is_retryable(&self) -> bool {
        match self {
            StageError::Redis(e) => e.is_retryable(),
            StageError::Cache(e) => e.is_retryable(),
            StageError::Mongo(e) => e.is_retryable(),
            StageError::Sink(_) => true,
            StageError::Mailbox(..) | StageError::Panicked { .. } | StageError::GaveUp(_) => false,
        }
    }
}

/// `Addr::send(..).await` with the actor's name on a closed mailbox.
pub async fn ask<A, M, T>(actor: &'static str, addr: &Addr<A>, msg: M) -> Result<T, StageError>
where
    A: Actor + Handler<M>,
    A::Context: actix::dev::ToEnvelope<A, M>,
    M: Message<Result = Result<T, StageError>> + Send + 'static,
    T: Send + 'static,
{
    addr.send(msg)
        .await
        .map_err(|e| StageError::Mailbox(actor, e))?
}

/// Runs a handler's work; a panic inside becomes [`StageError::Panicked`], is
/// counted, and stops the actor so that its Supervisor restarts it.
pub fn guard<A, T>(
    actor: &'static str,
    stats: Arc<Stats>,
    work: impl Future<Output = Result<T, StageError>> + 'static,
) -> ResponseActFuture<A, Result<T, StageError>>
where
    A: Actor<Context = Context<A>> + Supervised,
    T: 'static,
{
    let fut = AssertUnwindSafe(work).catch_unwind();
    Box::pin(actix::fut::wrap_future::<_, A>(fut).map(
        move |r, _act, ctx: &mut Context<A>| match r {
            Ok(r) => r,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic".into());
                tracing::error!(actor, %message, "actor panicked; restarting it");
                stats.actor_restarted(actor);
                ctx.stop();
                Err(StageError::Panicked { actor, message })
            }
        },
    ))
}

/// Called from an actor's `started`: after a restart, holds the mailbox for a
/// pause that doubles with each restart (100 ms up to 5 s), so a handler that
/// panics on every message cannot spin.
pub fn restart_pause<A>(restarts: u32, ctx: &mut Context<A>)
where
    A: Actor<Context = Context<A>>,
{
    if restarts == 0 {
        return;
    }
    let pause = Duration::from_millis(100 << (restarts - 1).min(6)).min(Duration::from_secs(5));
    ctx.wait(actix::fut::wrap_future::<_, A>(tokio::time::sleep(pause)));
}

/// What every actor shares: counters, backend health, the retry policy, the
/// engine's stop signal and the fault switches.
#[derive(Clone)]
pub struct Shared {
    pub stats: Arc<Stats>,
    pub health: Arc<crate::health::Health>,
    pub retry: crate::retry::RetryConfig,
    pub cancel: tokio_util::sync::CancellationToken,
    pub faults: Arc<crate::faults::Faults>,
    pub instance_id: String,
}
