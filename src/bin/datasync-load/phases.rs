//! The two timed phases: the publish stage alone (flags → Kafka ack → flags
//! cleared, no applier) and the end-to-end run (flag → applied), with the
//! warm-up, the load generator, the immediate requests beside it, and the
//! verification of the sink's documents at the end.

use super::*;

/// The publish stage alone: engines without an applier and with no scheduled
/// scan are started, the flags are set up, then one on-demand scan cycle per
/// engine is timed until no flag is left.
pub async fn publish_only(sc: &Scenario, ns: &str) -> anyhow::Result<PublishOnly> {
    let ns = format!("{ns}-pub");
    let mut sc = sc.clone();
    sc.engine
        .entry("sync")
        .or_insert_with(|| toml::Value::Table(Default::default()));
    if let Some(t) = sc
        .engine
        .get_mut("sync")
        .and_then(toml::Value::as_table_mut)
    {
        t.insert("interval".into(), toml::Value::String("1h".into()));
    }
    let engines = start_engines(&sc, &ns, false).await?;
    // Each engine's scheduled loop runs cycles until one finds its backends
    // up, then sleeps for the hour. Flags written before that cycle would be
    // drained by it, outside the measurement.
    let deadline = Instant::now() + Duration::from_secs(120);
    while engines.iter().any(|e| e.stats().scan_cycles == 0) {
        if Instant::now() > deadline {
            bail!("the publish-only engines ran no scan cycle within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let redis = engines[0].redis().clone();
    let flags = sc.publish_only_users;
    write_and_flag(&redis, "p", flags, sc.profile_bytes).await?;
    let config = engine_config(&sc, &ns, 0)?;
    settle_persistence(&config.redis).await?;
    let scanned_before: u64 = engines.iter().map(|e| e.stats().flags_scanned).sum();
    anyhow::ensure!(
        scanned_before == 0,
        "{scanned_before} flags were scanned while the publish-only phase was being set up"
    );
    let servers = crate::servers::Servers::find(&config);
    let servers_before = servers.cpu_seconds();
    let before = datasync::telemetry::process_usage();
    let rss_before = before.rss_mb;
    let started = Instant::now();
    let scans = futures::future::try_join_all(engines.iter().map(|e| e.scan_now()));
    let watch = async {
        let mut peak = rss_before;
        let deadline = started + Duration::from_secs(sc.timeout_secs);
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        while pending(&redis).await? > 0 {
            peak = peak.max(datasync::telemetry::process_usage().rss_mb);
            if Instant::now() > deadline {
                bail!(
                    "publish-only phase did not drain within {}s",
                    sc.timeout_secs
                );
            }
            tick.tick().await;
        }
        anyhow::Ok(peak)
    };
    let (scanned, peak) = tokio::join!(scans, watch);
    let peak_rss_mb = peak?;
    scanned?;
    let seconds = started.elapsed().as_secs_f64();
    let published: u64 = engines.iter().map(|e| e.stats().events_published).sum();
    anyhow::ensure!(
        published >= flags as u64,
        "the publish-only phase published {published} events for {flags} flags"
    );
    let cpu = datasync::telemetry::process_usage().cpu_seconds - before.cpu_seconds;
    let servers_cpu_us_per_flag =
        crate::servers::per_change(&servers_before, &servers.cpu_seconds(), flags as u64);
    for e in &engines {
        e.shutdown(Duration::from_secs(30)).await;
    }
    Ok(PublishOnly {
        cpu_us_per_flag: cpu * 1e6 / flags.max(1) as f64,
        servers_cpu_us_per_flag,
        users: flags,
        seconds,
        flags_per_s: flags as f64 / seconds,
        rss_before_mb: rss_before,
        peak_rss_mb,
    })
}

/// Lets Redis finish the background persistence the set-up's writes cause,
/// so the timed publish stage does not share the two cores with it. With the
/// append-only file on, writing a phase's profiles (hundreds of MB) grows the
/// file past Redis' automatic rewrite threshold, and the rewrite's forked
/// child took a whole core during the timed phase. One rewrite is started
/// here and waited for; the timed phase's own writes (the flag clears) stay
/// far below the next threshold. A Redis without the append-only file is
/// only waited for, if a snapshot is being written.
async fn settle_persistence(c: &datasync::config::RedisConfig) -> anyhow::Result<()> {
    let raw = raw_redis(c).await?;
    let field = |info: &str, name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(|v| v.trim() == "1")
            .unwrap_or(false)
    };
    let busy = |info: &str| {
        [
            "aof_rewrite_in_progress",
            "aof_rewrite_scheduled",
            "rdb_bgsave_in_progress",
        ]
        .iter()
        .any(|f| field(info, f))
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut rewrite = true;
    loop {
        let info: String = raw.info(Some(fred::types::InfoKind::Persistence)).await?;
        if !busy(&info) {
            if !(rewrite && field(&info, "aof_enabled")) {
                break;
            }
            let _: String = raw.bgrewriteaof().await?;
            rewrite = false;
        }
        if Instant::now() > deadline {
            bail!("redis was still rewriting its append-only file or saving after 300 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    raw.quit().await?;
    Ok(())
}

/// The end-to-end run.
pub async fn end_to_end(sc: &Scenario, ns: &str, config: &Config) -> anyhow::Result<Run> {
    let target = match &sc.external {
        Some(ext) if sc.mode == "external" => Target::External {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()?,
            apis: ext
                .apis
                .iter()
                .map(|a| a.trim_end_matches('/').to_string())
                .collect(),
        },
        _ => Target::Embedded(start_engines(sc, ns, true).await?),
    };
    if let Target::External { http, apis } = &target {
        for api in apis {
            wait_ready(http, api).await?;
        }
    }
    let redis = RedisStore::connect(&config.redis, config.sync.shards).await?;
    let mongo = MongoStore::connect(&config.mongo, "datasync-load").await?;

    // Warm-up: the consumer group's first join is not part of the measurement.
    let applied_at_start = target.observe().await?.stats.events_applied;
    let warm: Vec<ProfileWrite> = (0..64)
        .map(|i| ProfileWrite {
            user_id: format!("warm{i}-{ns}"),
            profile: serde_json::json!({}),
        })
        .collect();
    target.mark(0, warm).await?;
    let warm_deadline = Instant::now() + Duration::from_secs(120);
    while target.observe().await?.stats.events_applied < applied_at_start + 64 {
        if Instant::now() > warm_deadline {
            bail!("warm-up changes were not applied within 120s; is the stack up?");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = target.observe().await?.stats;
    let (hist_before, latency_before) = target.latency().await?;

    let total = (sc.users * sc.rounds) as u64;
    let bar = ProgressBar::new(total);
    bar.set_style(ProgressStyle::with_template(
        "{elapsed_precise} [{bar:40}] {pos}/{len} applied {msg}",
    )?);
    let servers = crate::servers::Servers::find(config);
    let servers_before = servers.cpu_seconds();
    let started = Instant::now();
    let cpu0 = target.observe().await?.cpu_seconds;
    let mut rng = StdRng::seed_from_u64(sc.seed);
    let pad = padding(sc.profile_bytes, sc.seed);
    let user_id = |u: usize| format!("u{u}-{ns}");

    let mut plan = Vec::with_capacity(sc.rounds);
    let mut order: Vec<usize> = (0..sc.users).collect();
    for _ in 0..sc.rounds {
        order.shuffle(&mut rng);
        let legacy: Vec<bool> = order
            .iter()
            .map(|_| rng.random_bool(sc.legacy_share))
            .collect();
        plan.push((order.clone(), legacy));
    }
    let driver_done = std::sync::atomic::AtomicBool::new(false);
    // At a fixed rate, about 20 batches a second, so the marked rate is smooth
    // (a 500-user batch every 0.7 s makes any short-window rate jump).
    let batch = match sc.rate.per_s() {
        0 => 500,
        r => (r as usize / 20).clamp(1, 500),
    };
    let driver = async {
        let mut sent = 0u64;
        let mut batch_no = 0;
        for (round, (order, legacy)) in plan.into_iter().enumerate() {
            for (chunk, flags) in order.chunks(batch).zip(legacy.chunks(batch)) {
                if sc.rate.per_s() > 0 {
                    let due =
                        started + Duration::from_secs_f64(sent as f64 / sc.rate.per_s() as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
                let mut api = Vec::new();
                let mut old = Vec::new();
                for (&u, &is_legacy) in chunk.iter().zip(flags) {
                    let p =
                        serde_json::json!({ "round": round as i64 + 1, "user": u, "pad": &pad });
                    if is_legacy {
                        old.push((user_id(u), p.to_string()));
                    } else {
                        api.push(ProfileWrite {
                            user_id: user_id(u),
                            profile: p,
                        });
                    }
                }
                if !api.is_empty() {
                    target.mark(batch_no, api).await?;
                    batch_no += 1;
                }
                if !old.is_empty() {
                    redis.write_profiles(&old).await?;
                    let ids: Vec<String> = old.into_iter().map(|(u, _)| u).collect();
                    redis.legacy_add(&ids).await?;
                }
                sent += chunk.len() as u64;
            }
        }
        anyhow::Ok(())
    };
    // When the last change was flagged, and what was applied by then.
    let mut marking: Option<(f64, u64)> = None;
    let driver = async {
        let r = driver.await;
        driver_done.store(true, std::sync::atomic::Ordering::SeqCst);
        let t_s = started.elapsed().as_secs_f64();
        let applied = target.observe().await?.stats.events_applied;
        marking = Some((t_s, applied - before.events_applied));
        r
    };
    // Immediate changes of the same users' static section, at their own rate,
    // while the dynamic changes are being sent.
    let immediates = async {
        let mut ack = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000, 3)?;
        let (mut requests, mut failed) = (0u64, 0u64);
        if sc.immediate_rate == 0 {
            return anyhow::Ok(None);
        }
        let every = Duration::from_secs_f64(1.0 / sc.immediate_rate as f64);
        let t0 = Instant::now();
        while !driver_done.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep_until((t0 + every * requests as u32).into()).await;
            let n = requests as usize;
            let profile = serde_json::json!({ "vip": n.is_multiple_of(2), "level": n as i64 });
            match target.immediate(n, user_id(n % sc.users), profile).await {
                Ok(d) => ack.saturating_record((d.as_micros() as u64).div_ceil(1000).max(1)),
                Err(e) => {
                    failed += 1;
                    tracing::warn!(error = %e, "immediate change failed");
                }
            }
            requests += 1;
        }
        Ok(Some((requests, failed, Latency::summarize(&ack))))
    };

    // Completion is checked every WATCH_TICK, so the run's time is not
    // rounded up by much; a sample is kept every SAMPLE_EVERY ticks, and the
    // last one always.
    const WATCH_TICK: Duration = Duration::from_millis(100);
    const SAMPLE_EVERY: usize = 5;
    let watcher = async {
        let mut samples = Vec::new();
        let deadline = started + Duration::from_secs(sc.timeout_secs);
        let mut tick = tokio::time::interval(WATCH_TICK);
        let mut ticks = 0usize;
        loop {
            tick.tick().await;
            ticks += 1;
            let o = target.observe().await?;
            let s = o.stats;
            let applied = s.events_applied - before.events_applied;
            bar.set_position(applied.min(total));
            bar.set_message(format!(
                "| published {}",
                s.events_published - before.events_published
            ));
            let sample = Sample {
                t_s: started.elapsed().as_secs_f64(),
                marked: s.flags_marked - before.flags_marked,
                scanned: s.flags_scanned - before.flags_scanned,
                published: s.events_published - before.events_published,
                applied,
                rss_mb: o.rss_mb,
                cpu_percent: 0.0,
            };
            let consumed = s.events_applied + s.stale_skipped + s.poison_events + s.apply_failures;
            // Every sink, not only the primary one, consumed what was published.
            let consumed = o
                .slowest_sink
                .map_or(consumed, |slowest| consumed.min(slowest + s.poison_events));
            // Done once the driver has flagged everything, no flag is left, and
            // every published event was consumed (applied, stale, or failed).
            let marked_all = driver_done.load(std::sync::atomic::Ordering::SeqCst);
            if marked_all && consumed >= s.events_published && pending(&redis).await? == 0 {
                let again = target.observe().await?.stats;
                if again.events_published == s.events_published {
                    let done = sample.t_s;
                    samples.push(sample);
                    return anyhow::Ok((samples, done, None));
                }
            }
            let t_s = sample.t_s;
            if ticks % SAMPLE_EVERY == 1 {
                samples.push(sample);
            }
            if Instant::now() > deadline {
                return Ok((
                    samples,
                    t_s,
                    Some(format!("did not drain within {}s", sc.timeout_secs)),
                ));
            }
        }
    };
    let (driven, watched, immediate) = tokio::join!(driver, watcher, immediates);
    let (samples, seconds, timeout) = watched?;
    let immediate = match immediate? {
        Some((requests, failed, to_ack)) => Some(ImmediateRun {
            requests,
            failed,
            to_ack,
            to_applied: target.immediate_applied().await?,
        }),
        None => None,
    };
    let servers_cpu_us_per_change =
        crate::servers::per_change(&servers_before, &servers.cpu_seconds(), total);
    bar.finish_and_clear();
    let mut failures: Vec<String> = timeout.into_iter().collect();
    if let Err(e) = driven {
        failures.push(format!("driver: {e}"));
    }
    let end = target.observe().await?;
    let after = end.stats;

    let (hist, mut latency) = target.latency().await?;
    let mut latency_buckets = Vec::new();
    match (hist, hist_before) {
        (Some(mut h), Some(b)) => {
            h.subtract(&b)?;
            latency = Latency::summarize(&h);
            let step = (h.max() / 50).max(1);
            latency_buckets = h
                .iter_linear(step)
                .map(|v| (v.value_iterated_to(), v.count_since_last_iteration()))
                .collect();
        }
        _ => latency.count -= latency_before.count.min(latency.count),
    }

    // Every user at its last round in every sink the run writes.
    let ours = format!("^u[0-9]+-{ns}$");
    let (mut documents, mut last_round) = (u64::MAX, u64::MAX);
    for sink in datasync::sinks::configured(config) {
        let (docs, last) = match sink.kind {
            datasync::config::SinkKind::Mongodb => {
                let docs = mongo
                    .collection()
                    .count_documents(doc! { "userId": { "$regex": &ours } })
                    .await?;
                let last = mongo
                    .collection()
                    .count_documents(
                        doc! { "userId": { "$regex": &ours }, "dynamicProfile.round": sc.rounds as i64 },
                    )
                    .await?;
                (docs, last)
            }
            datasync::config::SinkKind::Postgres => {
                pg_verify(&sink, &ours, sc.rounds as i64).await?
            }
            datasync::config::SinkKind::Http => continue,
        };
        documents = documents.min(docs);
        last_round = last_round.min(last);
    }
    for (what, n) in [
        ("load failures", after.load_failures - before.load_failures),
        (
            "publish failures",
            after.publish_failures - before.publish_failures,
        ),
        ("poison events", after.poison_events - before.poison_events),
        (
            "apply failures",
            after.apply_failures - before.apply_failures,
        ),
    ] {
        if n > 0 {
            failures.push(format!("{n} {what}"));
        }
    }
    target.stop().await;
    Ok(Run {
        changes: total,
        seconds,
        changes_per_s: total as f64 / seconds,
        marking: marking.map(|(t_s, applied)| Marking {
            seconds: t_s,
            applied,
        }),
        events_published: after.events_published - before.events_published,
        events_applied: after.events_applied - before.events_applied,
        stale_or_superseded: after.stale_skipped - before.stale_skipped,
        already_applied_skips: after.already_applied - before.already_applied,
        failures,
        latency,
        latency_buckets,
        peak_rss_mb: samples.iter().map(|s| s.rss_mb).fold(end.rss_mb, f64::max),
        mean_cpu_percent: (end.cpu_seconds - cpu0) / seconds * 100.0,
        cpu_us_per_change: (end.cpu_seconds - cpu0) * 1e6 / total.max(1) as f64,
        servers_cpu_us_per_change,
        documents,
        verified: documents == sc.users as u64 && last_round == sc.users as u64,
        samples,
        immediate,
    })
}
