//! The error the engine's public calls answer with.

use crate::{
    actors::StageError,
    clients::{mongo::MongoError, redis::RedisError},
    profiles::ProfileReadError,
};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot connect to redis: {0}")]
    Redis(#[from] RedisError),
    #[error("cannot connect to mongodb: {0}")]
    Mongo(#[from] MongoError),
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
}
