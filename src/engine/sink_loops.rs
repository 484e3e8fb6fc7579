//! One sink's pair of consumer loops (static and dynamic), each with its
//! own MongoApplier, consumer group and supervisor, started once the broker
//! and the sink are ready.

use super::*;

/// What it takes to start one sink's two consumer loops.
pub(super) struct SinkLoops<'a> {
    pub(super) spec: SinkSpec,
    pub(super) status: Arc<SinkStatus>,
    /// Its group on the dynamic topic (the static one's adds `-static`).
    pub(super) group: String,
    pub(super) config: &'a Config,
    pub(super) shared: &'a Shared,
    pub(super) supervision: &'a Supervision,
    pub(super) mailbox: usize,
    pub(super) dlq: &'a actix::Addr<DlqActor>,
    pub(super) cache: &'a AppliedCache,
    pub(super) profiles: &'a Arc<ProfileReader>,
    pub(super) redis: &'a RedisStore,
    pub(super) ready: &'a crate::backends::Ready,
    pub(super) ranges: &'a Arc<RangeRecorder>,
}

impl SinkLoops<'_> {
    /// The loop's task name: the primary sink's keep the names of the
    /// single sink of earlier releases.
    fn task_name(&self, role: Section) -> &'static str {
        match (self.spec.primary, role) {
            (true, Section::Static) => "static consumer loop",
            (true, Section::Dynamic) => "dynamic consumer loop",
            // Made once per sink and engine.
            (false, r) => Box::leak(
                format!("{} consumer loop (sink {})", r.label(), self.spec.name).into_boxed_str(),
            ),
        }
    }

    /// Starts the static and the dynamic loop; a receiver each that fires
    /// once the loop has stopped.
    pub(super) fn start(self) -> Vec<oneshot::Receiver<()>> {
        let gate = Arc::new(PriorityGate::default());
        let mut done = Vec::new();
        let static_group = crate::sinks::static_group(&self.group);
        for (role, topic, group) in [
            (
                Section::Static,
                &self.config.kafka.static_topic,
                &static_group,
            ),
            (
                Section::Dynamic,
                &self.config.kafka.dynamic_topic,
                &self.group,
            ),
        ] {
            let applier = {
                let (sink, shared, mailbox) =
                    (self.spec.sink.clone(), self.shared.clone(), self.mailbox);
                Supervisor::start_in_arbiter(&Arbiter::new().handle(), move |ctx| {
                    ctx.set_mailbox_capacity(mailbox);
                    MongoApplier::new(sink, shared)
                })
            };
            let mut window = self.config.applier.clone();
            if let Some(n) = self.spec.window_max_events {
                window.window_max_events = n;
            }
            if role == Section::Static {
                window.window_max_events = window.window_max_events.min(500);
                window.window_max_wait = self.config.applier.static_window_wait;
            }
            let (done_tx, done_rx) = oneshot::channel();
            // A fresh consumer at every (re)start, once its topic exists and
            // the sink is ready: it resumes from the group's committed
            // offsets, so a window in flight when the loop died is read
            // again, never skipped.
            let make = {
                let (kafka, group, topic) =
                    (self.config.kafka.clone(), group.clone(), topic.clone());
                let (dlq, cache, profiles, redis, shared, gate, ready) = (
                    self.dlq.clone(),
                    self.cache.clone(),
                    self.profiles.clone(),
                    self.redis.clone(),
                    self.shared.clone(),
                    gate.clone(),
                    self.ready.clone(),
                );
                let ranges = self.spec.primary.then(|| self.ranges.clone());
                let (sink, status, writes_mongo) = (
                    self.spec.sink.clone(),
                    self.status.clone(),
                    self.spec.writes_mongo,
                );
                let retry = self.config.retry.clone();
                move || {
                    let (kafka, group, topic) = (kafka.clone(), group.clone(), topic.clone());
                    let ranges = ranges.clone();
                    let (applier, dlq, cache, profiles, redis, config, shared, gate, ready) = (
                        applier.clone(),
                        dlq.clone(),
                        cache.clone(),
                        profiles.clone(),
                        redis.clone(),
                        window.clone(),
                        shared.clone(),
                        gate.clone(),
                        ready.clone(),
                    );
                    let (sink, status, retry) = (sink.clone(), status.clone(), retry.clone());
                    Ok::<_, Infallible>(async move {
                        if !ready.wait(Backend::Kafka, &shared.cancel).await {
                            return;
                        }
                        let prepared = if writes_mongo {
                            // The engine's bring-up made the index.
                            let up = ready.wait(Backend::Mongo, &shared.cancel).await;
                            if up {
                                status.up();
                            }
                            up
                        } else {
                            prepare(&*sink, &status, &retry, &shared.cancel).await
                        };
                        if !prepared {
                            return;
                        }
                        let context = ApplierContext {
                            recorder: ranges.clone(),
                        };
                        let consumer = match kafka::consumer(
                            &kafka,
                            &group,
                            &shared.instance_id,
                            config.window_max_events,
                            context,
                        )
                        .and_then(|c| {
                            rdkafka::consumer::Consumer::subscribe(&c, &[topic.as_str()])
                                .map(|()| c)
                        }) {
                            Ok(c) => c,
                            Err(e) => {
                                tracing::error!(error = %e, %topic, "cannot create the consumer");
                                return;
                            }
                        };
                        ConsumerLoop {
                            consumer,
                            ranges,
                            applier,
                            dlq,
                            cache,
                            profiles,
                            redis,
                            config,
                            shared,
                            role,
                            gate,
                            sink: status,
                            writes_mongo,
                        }
                        .run()
                        .await
                    })
                }
            };
            let name = self.task_name(role);
            let supervision = self.supervision.clone();
            actix::spawn(async move {
                supervise(name, supervision, make).await;
                let _ = done_tx.send(());
            });
            done.push(done_rx);
        }
        done
    }
}

/// Prepares a sink (tables, indexes), retrying until it answers; false once
/// the engine stops first.
async fn prepare(
    sink: &dyn crate::sinks::Sink,
    status: &SinkStatus,
    retry: &crate::retry::RetryConfig,
    cancel: &tokio_util::sync::CancellationToken,
) -> bool {
    let mut attempt = 0;
    loop {
        match sink.prepare().await {
            Ok(()) => {
                status.up();
                return true;
            }
            Err(e) => {
                let wait = retry.delay(attempt);
                status.failed(&e.to_string());
                tracing::warn!(sink = %status.name, error = %e, retry_in = ?wait, "sink not ready; trying again");
                tokio::select! {
                    _ = cancel.cancelled() => return false,
                    _ = tokio::time::sleep(wait) => {}
                }
                attempt += 1;
            }
        }
    }
}
