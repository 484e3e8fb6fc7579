//! The error the engine's public calls answer with, and how errors are shown
//! to people.

use crate::{
    actors::StageError,
    clients::{mongo::MongoError, redis::RedisError},
    profiles::ProfileReadError,
};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Redis(#[from] RedisError),
    #[error(transparent)]
    Mongo(#[from] MongoError),
    /// Redis did not answer at start within `startup.redis_timeout`.
    #[error("cannot reach redis at {url} within {waited:?}: {cause}")]
    RedisUnreachable {
        url: String,
        waited: std::time::Duration,
        cause: String,
    },
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("cannot start the actor thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("the actor system stopped while starting")]
    Aborted,
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error(transparent)]
    Stage(#[from] StageError),
    #[error(transparent)]
    ProfileRead(#[from] ProfileReadError),
    /// An immediate change was accepted (and is kept) but Kafka did not take it.
    #[error(
        "{reason}; the change (version {version}) is kept and will be published when Kafka answers"
    )]
    NotPublished { version: i64, reason: String },
    /// Another job of the same kind is running (one at a time per key
    /// prefix unless forced).
    #[error("a {kind} job is already running: {id} (pass \"force\": true to run another)")]
    JobBusy { kind: &'static str, id: String },
    /// No job of that kind with that id (or it expired after its retention).
    #[error("no {kind} job `{id}`")]
    NoSuchJob { kind: &'static str, id: String },
    /// `startup.require_backends`: Kafka or MongoDB did not answer in time.
    #[error("backends did not answer at start: {}", .0.join("; "))]
    BackendsUnavailable(Vec<String>),
}

/// An error and its causes on one line, each cause once: a cause whose text
/// the line already holds (messages that embed their source, as
/// `#[error("…: {0}")]` does) is not repeated.
pub fn report(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("io: disk on fire")]
    struct Io;

    #[derive(Debug, thiserror::Error)]
    enum Inner {
        #[error("redis: {0}")]
        Command(#[from] Io),
    }

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("cannot connect to redis: {0}")]
        Redis(#[from] Inner),
        #[error("cannot start")]
        Start(#[source] Inner),
    }

    #[test]
    fn every_cause_is_shown_once() {
        let e = Outer::Redis(Inner::Command(Io));
        assert_eq!(
            report(&e),
            "cannot connect to redis: redis: io: disk on fire"
        );
        let e = Outer::Start(Inner::Command(Io));
        assert_eq!(report(&e), "cannot start: redis: io: disk on fire");
    }
}
