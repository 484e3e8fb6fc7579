//! Whether Redis keeps what it acknowledged across its own restart.
//!
//! datasync's promise (no acknowledged change is lost) rests on Redis keeping
//! the flags it acknowledged. Redis does that across a restart only with the
//! append-only file on (`appendonly yes`); with snapshots alone, a restart
//! loses every flag written since the last snapshot, and without either it
//! loses them all. The check reads `CONFIG GET appendonly` and `appendfsync`
//! at start and with every backlog sample. Managed Redis services often refuse
//! `CONFIG`; the state is then unknown. On a Redis Cluster the node that
//! answers speaks for itself only.

use crate::{clients::redis::RedisStore, telemetry::names};
use metrics::gauge;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Durability {
    /// The append-only file is on; `fsync` is `appendfsync` (`always`,
    /// `everysec` or `no`: a process crash loses nothing with any of them, a
    /// machine crash up to a second with `everysec`).
    Aof { fsync: String },
    /// The append-only file is off.
    Off,
    /// `CONFIG GET` was refused or failed.
    Unknown { reason: String },
}

impl Durability {
    /// From the two settings as `CONFIG GET` answers them.
    pub fn from_settings(appendonly: Option<&str>, appendfsync: Option<&str>) -> Self {
        match appendonly {
            Some(v) if v.eq_ignore_ascii_case("yes") => Durability::Aof {
                fsync: appendfsync.unwrap_or("unknown").to_string(),
            },
            Some(_) => Durability::Off,
            None => Durability::Unknown {
                reason: "CONFIG GET appendonly answered nothing".into(),
            },
        }
    }

    /// The value of `datasync_redis_durable`: 1 with the append-only file on,
    /// 0 without, -1 when it cannot be read.
    pub fn gauge(&self) -> f64 {
        match self {
            Durability::Aof { .. } => 1.0,
            Durability::Off => 0.0,
            Durability::Unknown { .. } => -1.0,
        }
    }

    /// What readiness says about it; `None` when Redis is durable.
    pub fn warning(&self) -> Option<String> {
        match self {
            Durability::Aof { .. } => None,
            Durability::Off => Some(
                "redis: appendonly is off, so a Redis restart loses the flags of changes not \
                 synced yet (the consistency check finds and re-flags them)"
                    .into(),
            ),
            Durability::Unknown { reason } => Some(format!(
                "redis: whether it keeps acknowledged flags across a restart is unknown ({reason})"
            )),
        }
    }
}

/// Reads the settings from Redis and exports the gauge.
pub async fn check(redis: &RedisStore) -> Durability {
    // One round trip: the pattern answers appendonly and appendfsync (and
    // the file names), on every Redis version.
    let d = match redis.config_get("append*").await {
        Ok(settings) => Durability::from_settings(
            settings.get("appendonly").map(String::as_str),
            settings.get("appendfsync").map(String::as_str),
        ),
        Err(e) => Durability::Unknown {
            reason: format!("CONFIG GET: {e}"),
        },
    };
    gauge!(names::REDIS_DURABLE).set(d.gauge());
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_map_to_states_and_gauge_values() {
        let aof = Durability::from_settings(Some("yes"), Some("everysec"));
        assert_eq!(
            aof,
            Durability::Aof {
                fsync: "everysec".into()
            }
        );
        assert_eq!(aof.gauge(), 1.0);
        assert!(aof.warning().is_none());
        let off = Durability::from_settings(Some("no"), Some("everysec"));
        assert_eq!((off.gauge(), off.clone()), (0.0, Durability::Off));
        assert!(off.warning().unwrap().contains("appendonly is off"));
        let unknown = Durability::from_settings(None, None);
        assert_eq!(unknown.gauge(), -1.0);
        assert!(unknown.warning().unwrap().contains("unknown"));
    }
}
