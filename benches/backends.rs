//! Benchmarks that need the local stack (`scripts/stack.sh up`): the marking
//! script's round trip on Redis and the L1 hit path of the applied-version cache.
//! Without a stack they print why and measure nothing.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use datasync::{
    Config,
    cache::AppliedCache,
    clients::{mongo::MongoStore, redis::RedisStore},
    model::Section,
};
use std::time::Duration;

fn stack_config() -> Config {
    let ns = format!("bench-{}", std::process::id());
    Config::from_layers(
        &[(
            "bench".into(),
            format!("[redis]\nkey_prefix = \"{ns}\"\n[mongo]\ndatabase = \"datasync_bench\"\ncollection = \"{ns}\"\n"),
        )],
        std::env::vars(),
    )
    .expect("bench config")
}

fn backends(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let config = stack_config();
    let connected = rt.block_on(async {
        let redis = tokio::time::timeout(
            Duration::from_secs(5),
            RedisStore::connect(&config.redis, config.sync.shards),
        )
        .await
        .ok()?
        .ok()?;
        let mongo = tokio::time::timeout(
            Duration::from_secs(10),
            MongoStore::connect(&config.mongo, "bench"),
        )
        .await
        .ok()?
        .ok()?;
        Some((redis, mongo))
    });
    let Some((redis, mongo)) = connected else {
        eprintln!(
            "backends bench skipped: the local stack is not reachable (run scripts/stack.sh up)"
        );
        return;
    };

    let users: Vec<String> = (0..1000).map(|i| format!("bench-user-{i}")).collect();
    let mut g = c.benchmark_group("redis");
    g.throughput(Throughput::Elements(users.len() as u64));
    g.sample_size(20);
    g.bench_function("mark_1000_users_across_64_shards", |b| {
        b.iter(|| rt.block_on(redis.mark(&users)).unwrap())
    });
    g.finish();

    let cache = AppliedCache::new(
        1_000_000,
        Duration::from_secs(600),
        redis.clone(),
        mongo.clone(),
        true,
    );
    rt.block_on(cache.resolve(&users, Section::Dynamic))
        .unwrap(); // fills L1
    let mut g = c.benchmark_group("cache");
    g.throughput(Throughput::Elements(users.len() as u64));
    g.bench_function("l1_hits_1000_users", |b| {
        b.iter(|| {
            rt.block_on(cache.resolve(&users, Section::Dynamic))
                .unwrap()
        })
    });
    g.finish();

    rt.block_on(async {
        let _ = mongo.collection().drop().await;
        use fred::prelude::*;
        let raw = Builder::from_config(Config::from_url(config.redis.url.expose()).unwrap())
            .build()
            .unwrap();
        raw.init().await.unwrap();
        for s in 0..config.sync.shards {
            let keys = vec![
                redis.keys().dirty(s),
                redis.keys().clock(s),
                redis.keys().applied(s),
            ];
            let _: Result<i64, _> = raw.del(keys).await;
        }
    });
}

criterion_group!(benches, backends);
criterion_main!(benches);
