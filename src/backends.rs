//! Bringing the backends up at start.
//!
//! Redis is required: without it no flag can be accepted safely, so the
//! engine keeps trying it for `startup.redis_timeout` and then fails with the
//! address and the cause. Kafka and MongoDB are not: the engine starts
//! degraded (readiness names them, the scanner pulls no work, the appliers
//! wait) and brings each up in the background with the retry policy —
//! creating the topics, and the unique `userId` index — logging one line per
//! attempt with the address (credentials masked) and the operation. Each one
//! answering flips its [`Ready`] flag and marks it up.

use crate::{
    clients::{kafka, mongo::MongoStore, redis::RedisStore},
    config::{Config, KafkaConfig, mask_url},
    error::{EngineError, report},
    health::{Backend, Health},
    retry::RetryConfig,
};
use rdkafka::producer::FutureProducer;
use std::{sync::Arc, time::Duration};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Whether Kafka (topics there) and MongoDB (index created) have answered.
#[derive(Clone)]
pub struct Ready {
    pub kafka: watch::Receiver<bool>,
    pub mongo: watch::Receiver<bool>,
}

impl Ready {
    /// Waits until `backend` answered; false if the engine stopped first.
    pub async fn wait(&self, backend: Backend, cancel: &CancellationToken) -> bool {
        let mut rx = match backend {
            Backend::Mongo => self.mongo.clone(),
            _ => self.kafka.clone(),
        };
        tokio::select! {
            r = rx.wait_for(|up| *up) => r.is_ok(),
            _ = cancel.cancelled() => false,
        }
    }

    pub fn is_up(&self, backend: Backend) -> bool {
        match backend {
            Backend::Mongo => *self.mongo.borrow(),
            _ => *self.kafka.borrow(),
        }
    }
}

/// Connects to Redis, retrying until `startup.redis_timeout`; the error names
/// the address and the last cause.
pub async fn connect_redis(config: &Config) -> Result<RedisStore, EngineError> {
    let url = mask_url(config.redis.url.expose());
    let waited = config.startup.redis_timeout;
    let deadline = tokio::time::Instant::now() + waited;
    tracing::info!(%url, "connecting to redis");
    let mut last = String::from("no answer");
    loop {
        match tokio::time::timeout_at(
            deadline,
            RedisStore::connect(&config.redis, config.sync.shards),
        )
        .await
        {
            Ok(Ok(r)) => {
                tracing::info!(%url, "redis answered");
                return Ok(r);
            }
            Ok(Err(e)) => last = report(&e),
            Err(_) => {}
        }
        let next = tokio::time::Instant::now() + Duration::from_millis(500);
        if next >= deadline {
            return Err(EngineError::RedisUnreachable {
                url,
                waited,
                cause: last,
            });
        }
        tracing::warn!(%url, error = %last, "redis does not answer yet; retrying");
        tokio::time::sleep_until(next).await;
    }
}

/// What the background bring-up needs.
pub struct BringUp {
    pub kafka: KafkaConfig,
    pub producer: FutureProducer,
    pub mongo: MongoStore,
    pub mongo_url: String,
    pub health: Arc<Health>,
    pub retry: RetryConfig,
    pub cancel: CancellationToken,
}

impl BringUp {
    /// Marks both backends down ("not reached yet"), starts bringing each up
    /// in the background, and returns their readiness flags.
    pub fn start(self) -> Ready {
        let (kafka_tx, kafka_rx) = watch::channel(false);
        let (mongo_tx, mongo_rx) = watch::channel(false);
        // Marked down before anything runs, so the scanner pulls no work until
        // each has answered.
        let (kafka_what, mongo_what) = (self.kafka_what(), self.mongo_what());
        self.health
            .set_starting(Backend::Kafka, format!("{kafka_what}: no answer yet"));
        self.health
            .set_starting(Backend::Mongo, format!("{mongo_what}: no answer yet"));
        let this = Arc::new(self);
        let k = this.clone();
        actix::spawn(async move { k.bring_up_kafka(&kafka_what, kafka_tx).await });
        let m = this;
        actix::spawn(async move { m.bring_up_mongo(&mongo_what, mongo_tx).await });
        Ready {
            kafka: kafka_rx,
            mongo: mongo_rx,
        }
    }

    fn topics(&self) -> String {
        let k = &self.kafka;
        format!("{}, {}, {}", k.static_topic, k.dynamic_topic, k.dlq_topic)
    }

    fn kafka_what(&self) -> String {
        let k = &self.kafka;
        if k.create_topics {
            format!("creating topics {} on {}", self.topics(), k.brokers)
        } else {
            format!("looking up topic {} on {}", k.dynamic_topic, k.brokers)
        }
    }

    fn mongo_what(&self) -> String {
        format!(
            "creating the unique userId index on {} at {}",
            self.mongo.namespace(),
            self.mongo_url
        )
    }

    async fn bring_up_kafka(&self, what: &str, ready: watch::Sender<bool>) {
        let k = &self.kafka;
        let topics = self.topics();
        let done = self
            .attempt(Backend::Kafka, what, || async {
                if k.create_topics {
                    kafka::ensure_topics(k).await.map_err(|e| {
                        format!(
                            "cannot create topics {topics} on {}: {}",
                            k.brokers,
                            kafka::describe(&e)
                        )
                    })
                } else {
                    kafka::probe(&self.producer, &k.dynamic_topic)
                        .await
                        .map_err(|e| {
                            format!(
                                "topic {} not available on {}: {}",
                                k.dynamic_topic,
                                k.brokers,
                                kafka::describe(&e)
                            )
                        })
                }
            })
            .await;
        if done {
            let _ = ready.send(true);
        }
    }

    async fn bring_up_mongo(&self, what: &str, ready: watch::Sender<bool>) {
        let done = self
            .attempt(Backend::Mongo, what, || async {
                self.mongo
                    .ensure_index()
                    .await
                    .map_err(|e| format!("{what}: {}", report(&e)))
            })
            .await;
        if done {
            let _ = ready.send(true);
        }
    }

    /// Runs `op` until it succeeds (then marks `backend` up and returns true)
    /// or the engine stops (false), pausing per the retry policy in between.
    async fn attempt<F, Fut>(&self, backend: Backend, what: &str, op: F) -> bool
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        let name = backend.name();
        tracing::info!(backend = name, "{what}");
        let mut attempt = 0;
        loop {
            match op().await {
                Ok(()) => {
                    tracing::info!(backend = name, "{name} answered; {what}: done");
                    self.health.set_up(backend);
                    return true;
                }
                Err(e) => {
                    let wait = self.retry.delay(attempt).max(Duration::from_millis(200));
                    tracing::warn!(backend = name, error = %e, retry_in = ?wait, "{name} does not answer yet");
                    self.health.replace_reason(backend, &e);
                    tokio::select! {
                        _ = self.cancel.cancelled() => return false,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    attempt += 1;
                }
            }
        }
    }
}

/// With `startup.require_backends`: waits up to `startup.backends_timeout`
/// for both, and names every one that did not answer, with why.
pub async fn require(ready: &Ready, health: &Health, config: &Config) -> Result<(), EngineError> {
    let waited = config.startup.backends_timeout;
    let never = CancellationToken::new();
    let both = async {
        ready.wait(Backend::Kafka, &never).await;
        ready.wait(Backend::Mongo, &never).await;
    };
    if tokio::time::timeout(waited, both).await.is_ok() {
        return Ok(());
    }
    let mut missing = Vec::new();
    if !ready.is_up(Backend::Kafka) {
        missing.push(format!(
            "kafka at {} did not answer within {waited:?} ({})",
            config.kafka.brokers,
            health.reason(Backend::Kafka).unwrap_or_default()
        ));
    }
    if !ready.is_up(Backend::Mongo) {
        missing.push(format!(
            "mongodb at {} did not answer within {waited:?} ({})",
            mask_url(config.mongo.url.expose()),
            health.reason(Backend::Mongo).unwrap_or_default()
        ));
    }
    Err(EngineError::BackendsUnavailable(missing))
}
