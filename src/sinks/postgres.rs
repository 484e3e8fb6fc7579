//! The PostgreSQL sink: one row per user in a table it creates if missing,
//! written newer-wins with one multi-row `INSERT … ON CONFLICT (user_id) DO
//! UPDATE … WHERE` per kind of change in a window (static sections, dynamic
//! sections, deletes), each row's arrays passed as one `unnest` of
//! parameters. A row the `WHERE` leaves alone is stale, exactly as a
//! MongoDB statement that matches nothing: the rules are the same.
//!
//! | column | |
//! |---|---|
//! | `user_id` text primary key | |
//! | `static_profile`, `dynamic_profile` jsonb | null when absent or deleted |
//! | `static_version`, `dynamic_version` bigint | 0 = never written |
//! | `data_version` bigint | +1 for every applied change |
//! | `deleted` boolean, `deleted_version` bigint, `deleted_at` timestamptz | the tombstone |
//! | `updated_at` timestamptz, `last_event_id` text | |
//!
//! A statement refused for its data (SQL classes 22 and 23, e.g. a string
//! with `\u0000`, which jsonb does not take) is written again one row at a
//! time, so only the bad rows are dead-lettered. Connection errors, and
//! every other class, fail the window, which is retried.

use super::{Change, Op, Outcome, Sink, SinkError};
use crate::{config::SinkConfig, model::Section, proto::document_to_json};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures::future::BoxFuture;
use std::{collections::HashSet, time::Duration};
use tokio_postgres::NoTls;

pub struct PostgresSink {
    pool: Pool,
    table: String,
    timeout: Duration,
    sql: Statements,
}

/// The statements, with the table's name in them.
struct Statements {
    create: String,
    set_static: String,
    set_dynamic: String,
    delete: String,
}

/// `schema.table` with each part quoted (the parts are checked plain names).
fn quoted(table: &str) -> String {
    table
        .split('.')
        .map(|p| format!("\"{p}\""))
        .collect::<Vec<_>>()
        .join(".")
}

impl Statements {
    fn new(table: &str) -> Self {
        let t = quoted(table);
        let set = |s: Section| {
            let (p, v) = match s {
                Section::Static => ("static_profile", "static_version"),
                Section::Dynamic => ("dynamic_profile", "dynamic_version"),
            };
            format!(
                "INSERT INTO {t} AS cur (user_id, {p}, {v}, data_version, updated_at, last_event_id) \
                 SELECT u, p, v, 1, now(), e FROM unnest($1::text[], $2::jsonb[], $3::int8[], $4::text[]) AS x(u, p, v, e) \
                 ON CONFLICT (user_id) DO UPDATE SET \
                   {p} = EXCLUDED.{p}, {v} = EXCLUDED.{v}, \
                   data_version = cur.data_version + 1, \
                   updated_at = EXCLUDED.updated_at, last_event_id = EXCLUDED.last_event_id, \
                   deleted = false, deleted_at = NULL \
                 WHERE cur.{v} < EXCLUDED.{v} \
                 RETURNING user_id"
            )
        };
        // Each section older than the delete goes and its version rises to
        // it; a section newer than the delete stays, and with it the user.
        // SET expressions read the row as it was.
        let gone = "(cur.static_version < EXCLUDED.deleted_version OR cur.static_profile IS NULL) \
                    AND (cur.dynamic_version < EXCLUDED.deleted_version OR cur.dynamic_profile IS NULL)";
        let delete = format!(
            "INSERT INTO {t} AS cur (user_id, static_version, dynamic_version, deleted_version, data_version, deleted, deleted_at, updated_at, last_event_id) \
             SELECT u, v, v, v, 1, true, now(), now(), e FROM unnest($1::text[], $2::int8[], $3::text[]) AS x(u, v, e) \
             ON CONFLICT (user_id) DO UPDATE SET \
               static_profile = CASE WHEN cur.static_version < EXCLUDED.deleted_version THEN NULL ELSE cur.static_profile END, \
               dynamic_profile = CASE WHEN cur.dynamic_version < EXCLUDED.deleted_version THEN NULL ELSE cur.dynamic_profile END, \
               static_version = GREATEST(cur.static_version, EXCLUDED.deleted_version), \
               dynamic_version = GREATEST(cur.dynamic_version, EXCLUDED.deleted_version), \
               deleted_version = EXCLUDED.deleted_version, \
               data_version = cur.data_version + 1, \
               deleted = {gone}, \
               deleted_at = CASE WHEN {gone} THEN EXCLUDED.deleted_at ELSE NULL END, \
               updated_at = EXCLUDED.updated_at, last_event_id = EXCLUDED.last_event_id \
             WHERE cur.static_version < EXCLUDED.deleted_version OR cur.dynamic_version < EXCLUDED.deleted_version \
             RETURNING user_id"
        );
        Self {
            // Two sessions running CREATE TABLE IF NOT EXISTS at once can
            // both find no table, and the second then fails on the catalog's
            // unique index (23505); a transaction-scoped advisory lock on the
            // table's name makes them take turns. The statements go as one
            // simple query, so one implicit transaction, which the lock lasts.
            create: format!(
                "SELECT pg_advisory_xact_lock(hashtext('datasync:' || '{t}')); \
                 CREATE TABLE IF NOT EXISTS {t} ( \
                   user_id text PRIMARY KEY, \
                   static_profile jsonb, dynamic_profile jsonb, \
                   static_version bigint NOT NULL DEFAULT 0, \
                   dynamic_version bigint NOT NULL DEFAULT 0, \
                   data_version bigint NOT NULL DEFAULT 0, \
                   deleted boolean NOT NULL DEFAULT false, \
                   deleted_version bigint NOT NULL DEFAULT 0, \
                   deleted_at timestamptz, \
                   updated_at timestamptz NOT NULL DEFAULT now(), \
                   last_event_id text)"
            ),
            set_static: set(Section::Static),
            set_dynamic: set(Section::Dynamic),
            delete,
        }
    }
}

/// Why one statement did not run.
#[derive(Debug)]
enum Failure {
    Db(tokio_postgres::Error),
    /// It took longer than the sink's `timeout`.
    TimedOut(Duration),
}

impl Failure {
    /// The rows themselves are refused (data exceptions, constraint
    /// violations): isolate them. Anything else fails the window, which is
    /// retried.
    fn is_data(&self) -> bool {
        match self {
            Failure::Db(e) => e
                .code()
                .is_some_and(|c| c.code().starts_with("22") || c.code().starts_with("23")),
            Failure::TimedOut(_) => false,
        }
    }

    fn describe(&self) -> String {
        match self {
            Failure::Db(e) => match e.as_db_error() {
                Some(db) => format!("{} ({}): {}", db.severity(), db.code().code(), db.message()),
                None => e.to_string(),
            },
            Failure::TimedOut(t) => format!("a statement took over {t:?}"),
        }
    }
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        Failure::Db(e)
    }
}

/// One kind's rows of a window.
enum Rows<'a> {
    Set {
        section: Section,
        users: Vec<&'a str>,
        profiles: Vec<serde_json::Value>,
        versions: Vec<i64>,
        events: Vec<&'a str>,
    },
    Delete {
        users: Vec<&'a str>,
        versions: Vec<i64>,
        events: Vec<&'a str>,
    },
}

impl<'a> Rows<'a> {
    fn of(changes: &[&'a Change]) -> Self {
        let users = changes.iter().map(|c| c.user_id.as_str()).collect();
        let versions = changes.iter().map(|c| c.version).collect();
        let events = changes.iter().map(|c| c.event_id.as_str()).collect();
        match &changes[0].op {
            Op::Delete => Rows::Delete {
                users,
                versions,
                events,
            },
            Op::Set(_) => Rows::Set {
                section: changes[0].section,
                users,
                profiles: changes
                    .iter()
                    .map(|c| match &c.op {
                        Op::Set(d) => document_to_json(d),
                        Op::Delete => serde_json::Value::Null,
                    })
                    .collect(),
                versions,
                events,
            },
        }
    }
}

impl PostgresSink {
    pub fn new(c: &SinkConfig) -> Result<Self, SinkError> {
        let pg: tokio_postgres::Config = c
            .url
            .expose()
            .parse()
            .map_err(|e| SinkError::new(format!("sink {}: url: {e}", c.name)))?;
        let mut pg = pg;
        pg.connect_timeout(c.timeout());
        pg.application_name("datasync");
        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(c.pool_size.unwrap_or(4))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(c.timeout()))
            .create_timeout(Some(c.timeout()))
            .build()
            .map_err(|e| SinkError::new(format!("sink {}: {e}", c.name)))?;
        Ok(Self {
            pool,
            table: c.table().to_string(),
            timeout: c.timeout(),
            sql: Statements::new(c.table()),
        })
    }

    /// The table written.
    pub fn table(&self) -> &str {
        &self.table
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, SinkError> {
        self.pool
            .get()
            .await
            .map_err(|e| SinkError::new(format!("postgres: {e}")))
    }

    /// Runs one kind's statement within the sink's timeout; the users it
    /// changed.
    async fn run(
        &self,
        client: &deadpool_postgres::Object,
        rows: &Rows<'_>,
    ) -> Result<HashSet<String>, Failure> {
        match tokio::time::timeout(self.timeout, self.query(client, rows)).await {
            Ok(r) => r,
            Err(_) => Err(Failure::TimedOut(self.timeout)),
        }
    }

    async fn query(
        &self,
        client: &deadpool_postgres::Object,
        rows: &Rows<'_>,
    ) -> Result<HashSet<String>, Failure> {
        let (sql, params): (&str, Vec<&(dyn tokio_postgres::types::ToSql + Sync)>) = match rows {
            Rows::Set {
                section,
                users,
                profiles,
                versions,
                events,
            } => (
                match section {
                    Section::Static => &self.sql.set_static,
                    Section::Dynamic => &self.sql.set_dynamic,
                },
                vec![users, profiles, versions, events],
            ),
            Rows::Delete {
                users,
                versions,
                events,
            } => (&self.sql.delete, vec![users, versions, events]),
        };
        let statement = client.prepare_cached(sql).await?;
        let returned = client.query(&statement, &params).await?;
        Ok(returned
            .into_iter()
            .map(|r| r.get::<_, String>(0))
            .collect())
    }

    /// Writes one kind's changes: one statement, or row by row when the
    /// statement is refused for its data.
    async fn write_kind(
        &self,
        client: &deadpool_postgres::Object,
        window: &[Change],
        idx: &[usize],
        outcomes: &mut [Outcome],
    ) -> Result<(), SinkError> {
        let changes: Vec<&Change> = idx.iter().map(|&i| &window[i]).collect();
        match self.run(client, &Rows::of(&changes)).await {
            Ok(changed) => {
                for &i in idx {
                    outcomes[i] = if changed.contains(&window[i].user_id) {
                        Outcome::Applied
                    } else {
                        Outcome::Stale
                    };
                }
                Ok(())
            }
            Err(e) if e.is_data() => {
                tracing::warn!(error = %e.describe(), rows = idx.len(), "postgres refused a statement; writing its rows one by one");
                for &i in idx {
                    outcomes[i] = match self.run(client, &Rows::of(&[&window[i]])).await {
                        Ok(changed) if changed.is_empty() => Outcome::Stale,
                        Ok(_) => Outcome::Applied,
                        Err(e) if e.is_data() => {
                            Outcome::rejected(format!("postgres: {}", e.describe()))
                        }
                        Err(e) => {
                            return Err(SinkError::new(format!("postgres: {}", e.describe())));
                        }
                    };
                }
                Ok(())
            }
            Err(e) => Err(SinkError::new(format!("postgres: {}", e.describe()))),
        }
    }

    async fn apply_window(&self, window: &[Change]) -> Result<Vec<Outcome>, SinkError> {
        let mut outcomes = vec![Outcome::Stale; window.len()];
        // A collapsed window holds at most one change per user and kind, so
        // no statement touches a row twice.
        let mut kinds: [Vec<usize>; 3] = Default::default();
        for (i, c) in window.iter().enumerate() {
            let k = match (&c.op, c.section) {
                (Op::Set(_), Section::Static) => 0,
                (Op::Set(_), Section::Dynamic) => 1,
                (Op::Delete, _) => 2,
            };
            kinds[k].push(i);
        }
        let client = self.client().await?;
        for idx in kinds.iter().filter(|k| !k.is_empty()) {
            self.write_kind(&client, window, idx, &mut outcomes).await?;
        }
        Ok(outcomes)
    }
}

impl Sink for PostgresSink {
    fn kind(&self) -> &str {
        "postgres"
    }

    fn prepare(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            let client = self.client().await?;
            let create = client.batch_execute(&self.sql.create);
            let done = match tokio::time::timeout(self.timeout, create).await {
                Ok(r) => r.map_err(Failure::Db),
                Err(_) => Err(Failure::TimedOut(self.timeout)),
            };
            done.map_err(|e| {
                SinkError::new(format!(
                    "postgres: cannot create table {}: {}",
                    self.table,
                    e.describe()
                ))
            })
        })
    }

    fn apply<'a>(&'a self, window: &'a [Change]) -> BoxFuture<'a, Result<Vec<Outcome>, SinkError>> {
        Box::pin(self.apply_window(window))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_quoted_part_by_part() {
        assert_eq!(quoted("user_profiles"), "\"user_profiles\"");
        assert_eq!(quoted("crm.users"), "\"crm\".\"users\"");
        let s = Statements::new("crm.users");
        assert!(
            s.set_dynamic
                .contains("INSERT INTO \"crm\".\"users\" AS cur")
        );
        assert!(
            s.set_dynamic
                .contains("WHERE cur.dynamic_version < EXCLUDED.dynamic_version")
        );
        assert!(
            s.set_static
                .contains("WHERE cur.static_version < EXCLUDED.static_version")
        );
        assert!(
            s.delete
                .contains("GREATEST(cur.static_version, EXCLUDED.deleted_version)")
        );
    }
}
