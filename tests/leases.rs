//! Shard leases: several engines and processes sharing the shards, a killed
//! process's shards taken over, a joining one rebalanced, and a stalled
//! ("zombie") instance that publishes after losing its lease.

mod common;

use common::*;
use datasync::{Config, Engine, clients::redis::RedisStore, lease::parse_lease};
use mongodb::bson::doc;
use std::{
    collections::{BTreeMap, HashMap},
    process::{Child, Command},
    time::{Duration, Instant},
};

const LONG: Duration = Duration::from_secs(180);

fn engine_config(ns: &str, instance: &str, ttl: &str) -> Config {
    Config::from_layers(
        &[
            ("test".into(), config_toml(ns)),
            (
                "instance".into(),
                format!("[instance]\nid = \"{instance}\"\n[lease]\nttl = \"{ttl}\"\n"),
            ),
        ],
        std::iter::empty(),
    )
    .unwrap()
}

async fn held(e: &Engine) -> usize {
    e.shards().await.unwrap().held.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_that_publishes_after_losing_its_lease_cannot_regress_anything() {
    let ns = Namespace::new("zombie");
    let a = start_with(engine_config(&ns, &format!("{ns}-a"), "1500ms")).await;
    wait_until("a holds every shard", LONG, || async {
        held(&a).await == 8
    })
    .await;
    let hold = a.hold_publishing().await;
    let v1 = a.write_and_mark(&[profile("z", 1)]).await.unwrap()[0].version;
    wait_until("a's page of z waits at its publisher", LONG, || async {
        a.stats().publish_held >= 1
    })
    .await;
    let shard = datasync::shard::shard_of("z", 8);
    let a_epoch = a
        .shards()
        .await
        .unwrap()
        .held
        .iter()
        .find(|h| h.shard == shard)
        .unwrap()
        .epoch;

    // `a` stalls: no heartbeat, no renewal. `b` takes over and syncs z twice.
    a.faults().pause_leases(true);
    let b = start_with(engine_config(&ns, &format!("{ns}-b"), "1500ms")).await;
    wait_until("b holds every shard", LONG, || async {
        held(&b).await == 8
    })
    .await;
    let report = b.shards().await.unwrap();
    let info = &report.shards[shard as usize];
    assert_eq!(info.owner.as_deref(), Some(format!("{ns}-b").as_str()));
    assert!(
        info.epoch.unwrap() > a_epoch,
        "a new epoch for the new owner"
    );
    let mongo = mongo(&ns).await;
    wait_until("z at v1 through b", LONG, || async {
        matches!(mongo.find_user("z").await.unwrap(), Some(d) if d.get_i64("dynamicVersion").unwrap() == v1)
    })
    .await;
    let v2 = b.write_and_mark(&[profile("z", 2)]).await.unwrap()[0].version;
    wait_until("z at v2 through b", LONG, || async {
        matches!(mongo.find_user("z").await.unwrap(), Some(d) if d.get_i64("dynamicVersion").unwrap() == v2)
    })
    .await;

    // The zombie wakes up and publishes its old page.
    drop(hold);
    wait_until("a's flag clear refused by the fence", LONG, || async {
        a.stats().fenced_pages >= 1
    })
    .await;
    assert!(a.stats().events_published >= 1, "the zombie did publish");
    wait_until("its late event skipped as stale", LONG, || async {
        a.stats().stale_skipped + b.stats().stale_skipped >= 1
    })
    .await;
    let d = mongo.find_user("z").await.unwrap().unwrap();
    assert_eq!(d.get_i64("dynamicVersion").unwrap(), v2);
    assert_eq!(
        d.get_document("dynamicProfile")
            .unwrap()
            .get_i64("gen")
            .unwrap(),
        2
    );
    assert_eq!(d.get_i64("dataVersion").unwrap(), 2);
    a.faults().pause_leases(false);
    a.shutdown(Duration::from_secs(20)).await;
    finish(b, &ns).await;
}

fn spawn(config: &std::path::Path, instance: &str, port: u16, log: &std::path::Path) -> Child {
    spawn_service(
        config,
        log,
        &[
            ("DATASYNC__INSTANCE__ID", instance.to_string()),
            ("DATASYNC__HTTP__ENABLED", "true".into()),
            ("DATASYNC__HTTP__BIND", format!("127.0.0.1:{port}")),
        ],
    )
}

/// Owner and epoch of every shard, from Redis.
async fn owners(r: &RedisStore) -> Vec<Option<(String, i64)>> {
    r.leases()
        .await
        .unwrap()
        .into_iter()
        .map(|(v, _)| v.as_deref().and_then(parse_lease))
        .collect()
}

fn counts(o: &[Option<(String, i64)>]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for (owner, _) in o.iter().flatten() {
        *m.entry(owner.clone()).or_default() += 1;
    }
    m
}

/// Every shard owned, by exactly `names`, evenly (±1).
fn balanced(o: &[Option<(String, i64)>], names: &[String]) -> bool {
    let c = counts(o);
    o.iter().all(Option::is_some)
        && c.keys().cloned().collect::<Vec<_>>() == names
        && c.values().max().unwrap() - c.values().min().unwrap() <= 1
}

/// Records every (shard, epoch) → owner seen, and fails if an epoch ever had
/// two owners or a shard's epoch went down.
#[derive(Default)]
struct EpochLedger {
    owner_of: HashMap<(usize, i64), String>,
    last: HashMap<usize, i64>,
    /// Shards seen passing from one owner to another.
    handovers: usize,
}

impl EpochLedger {
    fn record(&mut self, o: &[Option<(String, i64)>]) {
        for (shard, entry) in o.iter().enumerate() {
            let Some((owner, epoch)) = entry else {
                continue;
            };
            let prev = self
                .owner_of
                .entry((shard, *epoch))
                .or_insert_with(|| owner.clone());
            assert_eq!(prev, owner, "shard {shard} epoch {epoch} had two owners");
            let last = self.last.entry(shard).or_insert(*epoch);
            assert!(
                *epoch >= *last,
                "shard {shard}: epoch went from {last} to {epoch}"
            );
            if *epoch > *last {
                self.handovers += 1;
            }
            *last = *epoch;
        }
    }
}

/// `GET /v1/shards` (`Engine::shards`) names the live members, and a member
/// that stops leaves the list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shards_report_lists_the_live_members() {
    let ns = Namespace::new("members");
    let a = start_with(engine_config(&ns, &format!("{ns}-a"), "3s")).await;
    let b = start_with(engine_config(&ns, &format!("{ns}-b"), "3s")).await;
    let both = vec![format!("{ns}-a"), format!("{ns}-b")];
    for e in [&a, &b] {
        wait_until("both members listed", LONG, || async {
            e.shards().await.unwrap().members == both
        })
        .await;
    }
    b.shutdown(Duration::from_secs(20)).await;
    wait_until("the stopped member gone", LONG, || async {
        a.shards().await.unwrap().members == vec![format!("{ns}-a")]
    })
    .await;
    finish(a, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_share_shards_take_over_a_killed_one_and_rebalance_on_join() {
    let ns = Namespace::new("leases");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("datasync.toml");
    let log = dir.path().join("datasync.log");
    std::fs::write(
        &config,
        config_toml(&ns).replace("shards = 8", "shards = 64"),
    )
    .unwrap();
    let r = RedisStore::connect(&engine_config(&ns, "t", "3s").redis, 64)
        .await
        .unwrap();
    let mongo = mongo(&ns).await;
    let name = |i: usize| format!("{ns}-p{i}");
    let ports: Vec<u16> = (0..=4).map(|_| free_port()).collect();
    let mut ledger = EpochLedger::default();

    let mut procs: BTreeMap<usize, Child> = (1..=3)
        .map(|i| (i, spawn(&config, &name(i), ports[i], &log)))
        .collect();
    let three: Vec<String> = (1..=3).map(name).collect();
    wait_until("three processes share 64 shards evenly", LONG, || async {
        let o = owners(&r).await;
        balanced(&o, &three)
    })
    .await;
    let o = owners(&r).await;
    ledger.record(&o);
    eprintln!("three processes: {:?}", counts(&o));

    // 30,000 users; SIGKILL one process mid-run.
    let users: Vec<String> = (0..30_000).map(|i| format!("l{i}")).collect();
    let mut latest = HashMap::new();
    for chunk in users.chunks(1000) {
        r.write_profiles(&generation_profiles(chunk, 1))
            .await
            .unwrap();
        latest.extend(r.mark(chunk).await.unwrap());
    }
    wait_until("some users applied", LONG, || async {
        count_docs(&mongo, doc! {}).await >= 2000
    })
    .await;
    let held_by_p1 = counts(&owners(&r).await)
        .get(&name(1))
        .copied()
        .unwrap_or(0);
    let handovers_before = ledger.handovers;
    let mut p1 = procs.remove(&1).unwrap();
    p1.kill().unwrap();
    p1.wait().unwrap();
    let killed_at = Instant::now();
    let two: Vec<String> = (2..=3).map(name).collect();
    let mut poll = tokio::time::interval(Duration::from_millis(50));
    loop {
        poll.tick().await;
        let o = owners(&r).await;
        ledger.record(&o);
        if balanced(&o, &two) {
            break;
        }
        assert!(killed_at.elapsed() < LONG, "no takeover: {:?}", counts(&o));
    }
    let takeover = killed_at.elapsed();
    // Every shard of the killed process was seen changing hands, each new epoch
    // with one owner (the ledger asserts that on every poll).
    assert!(
        ledger.handovers - handovers_before >= held_by_p1,
        "saw {} handovers of the {held_by_p1} shards the killed process held",
        ledger.handovers - handovers_before
    );
    // README's promise: the survivors hold every shard within the TTL plus one
    // renewal round (3 s + 1 s here), plus 1.5 s for polling and scheduling on
    // a loaded 2-core machine.
    assert!(
        takeover < Duration::from_millis(3000 + 1000 + 1500),
        "takeover took {takeover:?}, over TTL + one round"
    );
    wait_until("all 30,000 users at their version", LONG, || {
        all_at_dynamic(&mongo, &latest)
    })
    .await;

    // A fourth process joins (and so does a restarted first one).
    let joined_at = Instant::now();
    procs.insert(4, spawn(&config, &name(4), ports[4], &log));
    let three: Vec<String> = (2..=4).map(name).collect();
    loop {
        poll.tick().await;
        let o = owners(&r).await;
        ledger.record(&o);
        if balanced(&o, &three) {
            break;
        }
        assert!(joined_at.elapsed() < LONG, "no rebalance: {:?}", counts(&o));
    }
    let rebalance = joined_at.elapsed();
    // Each process's own view agrees: disjoint, and together every shard.
    let client = http_client();
    let mut seen = vec![0; 64];
    for i in 2..=4 {
        let report: serde_json::Value = client
            .get(format!("http://127.0.0.1:{}/v1/shards", ports[i]))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for h in report["held"].as_array().unwrap() {
            seen[h["shard"].as_u64().unwrap() as usize] += 1;
        }
    }
    assert!(
        seen.iter().all(|&n| n == 1),
        "each shard held by exactly one process: {seen:?}"
    );

    // Changes after the rebalance still sync.
    let again: Vec<String> = users.iter().step_by(10).cloned().collect();
    r.write_profiles(&generation_profiles(&again, 2))
        .await
        .unwrap();
    r.mark(&again).await.unwrap();
    wait_until("the changes after the rebalance applied", LONG, || async {
        count_docs(&mongo, doc! { "dynamicProfile.gen": 2i64 }).await == again.len() as u64
    })
    .await;
    eprintln!(
        "takeover after SIGKILL: {takeover:?} (lease ttl 3s); rebalance after a join: {rebalance:?}"
    );
    for (_, mut p) in procs {
        let _ = Command::new("kill")
            .args(["-TERM", &p.id().to_string()])
            .status();
        let _ = p.wait();
    }
    cleanup(&ns).await;
}

/// The seed's fixed split still works, and each shard stays guarded by its
/// lease: a second instance started with the same index waits instead of
/// scanning the same shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_mode_splits_shards_and_guards_each_with_its_lease() {
    let ns = Namespace::new("fixed");
    let fixed = |id: &str, index: u32| {
        Config::from_layers(
            &[
                ("test".into(), config_toml(&ns)),
                (
                    "fixed".into(),
                    format!(
                        "[instance]\nid = \"{id}\"\nmode = \"fixed\"\nindex = {index}\ntotal = 2\n"
                    ),
                ),
            ],
            std::iter::empty(),
        )
        .unwrap()
    };
    let a = start_with(fixed(&format!("{ns}-a"), 0)).await;
    let b = start_with(fixed(&format!("{ns}-b"), 1)).await;
    wait_until("each holds its half", LONG, || async {
        held(&a).await == 4 && held(&b).await == 4
    })
    .await;
    let shards: Vec<u32> = a
        .shards()
        .await
        .unwrap()
        .held
        .iter()
        .map(|h| h.shard)
        .collect();
    assert_eq!(shards, vec![0, 2, 4, 6]);
    // A duplicate of index 0 gets nothing while `a` lives...
    let dup = start_with(fixed(&format!("{ns}-dup"), 0)).await;
    let users: Vec<_> = (0..500).map(|i| profile(&format!("f{i}"), 1)).collect();
    a.write_and_mark(&users).await.unwrap();
    let mongo = mongo(&ns).await;
    wait_until("all 500 synced by a and b", LONG, || async {
        count_docs(&mongo, doc! {}).await == 500
    })
    .await;
    assert_eq!(held(&dup).await, 0);
    assert_eq!(
        dup.stats().flags_scanned,
        0,
        "the duplicate scanned nothing"
    );
    // ...and takes over when it stops.
    a.shutdown(Duration::from_secs(20)).await;
    wait_until("the duplicate takes index 0", LONG, || async {
        held(&dup).await == 4
    })
    .await;
    dup.shutdown(Duration::from_secs(20)).await;
    finish(b, &ns).await;
}
