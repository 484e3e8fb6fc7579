//! Removes what a run made on the shared stack: every Redis key, topic,
//! MongoDB collection and PostgreSQL table (of the run's PostgreSQL sinks)
//! whose name starts with the run's namespace (the
//! publish-only, peak and ceiling phases name theirs after it too), and its
//! consumer groups. Skipped with `--cleanup false`, to look at
//! a run's data afterwards; never done in external mode, whose names belong
//! to the running services.

use datasync::Config;
use rdkafka::{
    admin::{AdminClient, AdminOptions},
    client::DefaultClientContext,
    consumer::{BaseConsumer, Consumer},
};
use std::time::Duration;

/// What was removed.
#[derive(Debug, Default)]
pub struct Removed {
    pub keys: u64,
    pub topics: usize,
    pub collections: usize,
    pub tables: usize,
}

pub async fn run(config: &Config, ns: &str) -> anyhow::Result<Removed> {
    let mut removed = Removed::default();
    // Redis: SCAN and DEL inside one script per pattern, so no key list
    // travels; the patterns cover the prefix and hash-tagged keys.
    let redis = crate::raw_redis(&config.redis).await?;
    for pattern in [format!("{ns}*"), format!("{{{ns}*")] {
        let n: i64 = fred::interfaces::LuaInterface::eval(
            &redis,
            "local n=0 local c='0' repeat local r=redis.call('SCAN',c,'MATCH',ARGV[1],'COUNT',1000) \
             c=r[1] for _,k in ipairs(r[2]) do redis.call('DEL',k) n=n+1 end until c=='0' return n",
            Vec::<String>::new(),
            vec![pattern],
        )
        .await?;
        removed.keys += n as u64;
    }

    let mongo = mongodb::Client::with_uri_str(config.mongo.url.expose()).await?;
    let db = mongo.database(&config.mongo.database);
    for name in db.list_collection_names().await? {
        if name.starts_with(ns) {
            db.collection::<mongodb::bson::Document>(&name)
                .drop()
                .await?;
            removed.collections += 1;
        }
    }

    let mut client = rdkafka::ClientConfig::new();
    config.kafka.client.apply_to(&mut client);
    client.set("bootstrap.servers", &config.kafka.brokers);
    let lister: BaseConsumer = client.create()?;
    let (topics, groups) = tokio::task::spawn_blocking(move || {
        let timeout = Duration::from_secs(10);
        let topics: Vec<String> = (lister.fetch_metadata(None, timeout)?.topics().iter())
            .map(|t| t.name().to_string())
            .collect();
        let groups: Vec<String> = (lister.fetch_group_list(None, timeout)?.groups().iter())
            .map(|g| g.name().to_string())
            .collect();
        anyhow::Ok((topics, groups))
    })
    .await??;
    let ours = |names: &[String]| -> Vec<String> {
        names
            .iter()
            .filter(|n| n.starts_with(ns))
            .cloned()
            .collect()
    };
    let (topics, groups) = (ours(&topics), ours(&groups));
    let admin: AdminClient<DefaultClientContext> = client.create()?;
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    if !groups.is_empty() {
        let names: Vec<&str> = groups.iter().map(String::as_str).collect();
        admin.delete_groups(&names, &opts).await?;
    }
    if !topics.is_empty() {
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        removed.topics = (admin.delete_topics(&names, &opts).await?.iter())
            .filter(|r| r.is_ok())
            .count();
    }
    removed.tables = drop_tables(config, ns).await?;
    Ok(removed)
}

/// Drops the run's tables in each PostgreSQL sink's database.
async fn drop_tables(config: &Config, ns: &str) -> anyhow::Result<usize> {
    let prefix = crate::pg_table(ns, "");
    let mut n = 0;
    let urls: std::collections::BTreeSet<&str> = config
        .sinks
        .iter()
        .filter(|s| s.kind == datasync::config::SinkKind::Postgres)
        .map(|s| s.url.expose())
        .collect();
    for url in urls {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        let rows = client
            .query(
                "SELECT schemaname, tablename FROM pg_tables WHERE starts_with(tablename, $1)",
                &[&prefix],
            )
            .await?;
        for r in rows {
            let (schema, table): (String, String) = (r.get(0), r.get(1));
            client
                .batch_execute(&format!("DROP TABLE IF EXISTS \"{schema}\".\"{table}\""))
                .await?;
            n += 1;
        }
    }
    Ok(n)
}
