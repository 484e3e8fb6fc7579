//! Benchmarks of the CPU-side hot paths: protobuf encode/decode with the `Any`
//! packing, shard hashing, and window collapse. Run: `cargo bench`.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use datasync::{
    actors::{
        applier::{Record, collapse},
        publisher::{Outgoing, build_event},
    },
    proto::{JsonProfile, SyncType, UserProfileSyncEvent, unpack_profile},
    shard::shard_of,
};
use prost::Message;
use std::hint::black_box;

fn profile() -> JsonProfile {
    let json = serde_json::json!({
        "name": "Ann Example", "age": 31, "score": 0.87, "vip": false,
        "tags": ["sports", "music", "travel"], "address": { "city": "Lyon", "zip": "69001" },
        "last_login_ms": 1_732_390_000_000i64, "clicks": 1234
    });
    match json {
        serde_json::Value::Object(o) => o,
        _ => unreachable!(),
    }
}

fn protobuf(c: &mut Criterion) {
    let item = Outgoing {
        user_id: "user-12345".into(),
        version: 1,
        profile: profile(),
        base_version: 0,
        lease_epoch: 0,
    };
    let bytes = build_event(SyncType::DynamicBatch, &item, "bench").encode_to_vec();
    let mut g = c.benchmark_group("protobuf");
    g.throughput(Throughput::Elements(1));
    g.bench_function("build_and_encode_event", |b| {
        b.iter(|| build_event(SyncType::DynamicBatch, black_box(&item), "bench").encode_to_vec())
    });
    g.bench_function("decode_and_unpack_event", |b| {
        b.iter(|| {
            let e = UserProfileSyncEvent::decode_bytes(black_box(&bytes)).unwrap();
            unpack_profile(&e.profile_data).unwrap()
        })
    });
    g.finish();
}

fn sharding(c: &mut Criterion) {
    let ids: Vec<String> = (0..1000).map(|i| format!("user-{i}")).collect();
    let mut g = c.benchmark_group("shard");
    g.throughput(Throughput::Elements(ids.len() as u64));
    g.bench_function("crc32_shard_of_1000_ids", |b| {
        b.iter(|| ids.iter().map(|u| shard_of(u, 64)).sum::<u32>())
    });
    g.finish();
}

fn window_collapse(c: &mut Criterion) {
    let mut g = c.benchmark_group("collapse");
    for n in [1000usize, 5000] {
        let records: Vec<Record> = (0..n)
            .map(|i| {
                let item = Outgoing {
                    user_id: format!("user-{}", i % (n / 2)),
                    version: i as i64,
                    profile: profile(),
                    base_version: 0,
                    lease_epoch: 0,
                };
                Record {
                    topic: "t".into(),
                    partition: 0,
                    offset: i as i64,
                    timestamp_ms: 0,
                    payload: build_event(SyncType::DynamicBatch, &item, "bench").encode_to_vec(),
                }
            })
            .collect();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &records, |b, r| {
            b.iter(|| collapse(black_box(r)))
        });
    }
    g.finish();
}

criterion_group!(benches, protobuf, sharding, window_collapse);
criterion_main!(benches);
