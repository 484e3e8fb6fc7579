//! Unit tests of the configuration: layering, validation, secrets.
use super::*;

fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::from_layers(
        &[("test.toml".into(), text.into())],
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
}

#[test]
fn defaults_are_valid() {
    let c = Config::default_config();
    assert_eq!(c.sync.shards, 64);
    assert_eq!(c.sync.interval, Duration::from_secs(60));
    assert_eq!(c.kafka.static_topic, "profile-static-sync");
}

#[test]
fn file_then_env_override_in_order() {
    let c = load(
        "[sync]\ninterval = \"5s\"\npage_size = 10\n",
        &[
            ("DATASYNC__SYNC__PAGE_SIZE", "20"),
            ("DATASYNC__KAFKA__BROKERS", "h:1"),
        ],
    )
    .unwrap();
    assert_eq!(c.sync.interval, Duration::from_secs(5));
    assert_eq!(c.sync.page_size, 20);
    assert_eq!(c.kafka.brokers, "h:1");
}

#[test]
fn every_problem_is_reported_at_once() {
    let err = load(
        "[sync]\nshards = 0\nbogus = 1\n[nope]\nx = 1\n",
        &[("DATASYNC__REDIS__PROFILE_KEY", "no-placeholder")],
    )
    .unwrap_err();
    let all = err.problems.join("\n");
    assert!(all.contains("unknown key `sync.bogus`"), "{all}");
    assert!(all.contains("unknown key `nope`"), "{all}");
    assert!(all.contains("sync.shards"), "{all}");
    assert!(all.contains("redis.profile_key"), "{all}");
}

#[test]
fn wrong_type_names_the_key() {
    let err = load("[sync]\npage_size = \"many\"\n", &[]).unwrap_err();
    let all = err.problems.join("\n");
    assert!(all.contains("page_size"), "{all}");
}

#[test]
fn urls_are_masked() {
    assert_eq!(mask_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    assert_eq!(
        mask_url("rediss://app:s3cret@cache:6380/0"),
        "rediss://app:***@cache:6380/0"
    );
    assert_eq!(
        mask_url("mongodb://u:p@db:27017/?authSource=admin"),
        "mongodb://u:***@db:27017/?authSource=admin"
    );
    assert_eq!(mask_url("127.0.0.1:9092"), "127.0.0.1:9092");
}

#[test]
fn secrets_do_not_print() {
    let c = load("[http]\nadmin_token = \"hunter2\"\n", &[]).unwrap();
    assert!(!format!("{c:?}").contains("hunter2"));
}

#[test]
fn the_consumers_fetch_wait_has_a_key_of_its_own() {
    let c = Config::default_config();
    assert_eq!(c.kafka.fetch_max_wait, Duration::from_millis(10));
    let err = load("[kafka]\nfetch_max_wait = \"0s\"\n", &[]).unwrap_err();
    let all = err.problems.join("\n");
    assert!(
        all.contains("kafka.fetch_max_wait: must be between 1ms and 30s"),
        "{all}"
    );
    let err = load("[kafka.client]\n\"fetch.wait.max.ms\" = \"5\"\n", &[]).unwrap_err();
    let all = err.problems.join("\n");
    assert!(
        all.contains("kafka.client.\"fetch.wait.max.ms\": datasync sets this itself (set kafka.fetch_max_wait)"),
        "{all}"
    );
}
