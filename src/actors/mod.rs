//! The actors of the sync pipeline, in the order data flows through them.
//!
//! Each lives on its own arbiter (thread), under an actix `Supervisor`, with a
//! mailbox bounded from `[mailbox]` in the config. Every data-path send is
//! `Addr::send().await`, so a full mailbox slows the sender instead of growing
//! memory.

pub mod applier;
pub mod loader;
pub mod publisher;
pub mod resolver;
pub mod scanner;

/// A dirty flag: a user and the version of its latest flagged change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flag {
    pub user_id: String,
    pub version: i64,
}

/// An actor mailbox closed under a sender: the engine is stopping or the actor
/// died; the batch is retried on a later cycle.
#[derive(Debug, thiserror::Error)]
#[error("actor {0} is not running: {1}")]
pub struct MailboxError(pub &'static str, pub actix::MailboxError);
