//! The domain: the words every layer shares, with no I/O.
//!
//! - [`Section`]: the two halves of a profile, static (immediate path) and
//!   dynamic (batch path), with their labels, Redis tags, protobuf sync types
//!   and MongoDB fields.
//! - [`ProfileWrite`], [`Marked`], [`Receipt`]: a change coming in, and what
//!   became of it.
//! - [`Change`] and [`Op`]: a change on its way out, as every sink applies it.
//! - [`DeadLetter`] and [`DlqStage`]: a change that could not be synced.
//! - The clock: [`now_ms`], [`now_us`].
//! - [`fields`]: the MongoDB document's field names.

use crate::proto::SyncType;
use mongodb::bson::Document;
use serde::Serialize;
use std::collections::BTreeMap;

/// Which half of a profile a change or a version belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Section {
    /// Critical data (VIP status, bans, permissions): the immediate path.
    Static,
    /// Changing data (behaviour, counters, tags): the batch path.
    Dynamic,
}

impl Section {
    /// `static` or `dynamic`: metrics labels, logs, JSON.
    pub fn label(self) -> &'static str {
        match self {
            Section::Static => "static",
            Section::Dynamic => "dynamic",
        }
    }

    /// `s` or `d`: the suffix of per-section Redis hash fields.
    pub fn tag(self) -> &'static str {
        match self {
            Section::Static => "s",
            Section::Dynamic => "d",
        }
    }

    /// The protobuf sync type of this section's events.
    pub fn sync_type(self) -> SyncType {
        match self {
            Section::Static => SyncType::StaticImmediate,
            Section::Dynamic => SyncType::DynamicBatch,
        }
    }

    /// The section a label names (`static`; anything else is dynamic, which
    /// is what entries written before labels existed were).
    pub fn of_label(label: &str) -> Section {
        if label == "static" {
            Section::Static
        } else {
            Section::Dynamic
        }
    }

    /// The MongoDB fields of this section: (profile, version).
    pub fn mongo_fields(self) -> (&'static str, &'static str) {
        match self {
            Section::Static => (fields::STATIC_PROFILE, fields::STATIC_VERSION),
            Section::Dynamic => (fields::DYNAMIC_PROFILE, fields::DYNAMIC_VERSION),
        }
    }
}

/// The MongoDB document (collection `userProfiles`, DESIGN §2).
pub mod fields {
    pub const USER_ID: &str = "userId";
    pub const STATIC_PROFILE: &str = "staticProfile";
    pub const DYNAMIC_PROFILE: &str = "dynamicProfile";
    pub const STATIC_VERSION: &str = "staticVersion";
    pub const DYNAMIC_VERSION: &str = "dynamicVersion";
    pub const DATA_VERSION: &str = "dataVersion";
    pub const UPDATED_AT: &str = "updatedAt";
    pub const LAST_EVENT_ID: &str = "lastEventId";
    /// A tombstone: the user was deleted and no section newer than the
    /// delete exists.
    pub const DELETED: &str = "deleted";
    /// The version of the newest delete applied.
    pub const DELETED_VERSION: &str = "deletedVersion";
    /// When the document became a tombstone (purged after
    /// `sync.tombstone_retention`).
    pub const DELETED_AT: &str = "deletedAt";
}

/// One change to apply: the newest version of one section of one user, or
/// the newest delete of one user.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub user_id: String,
    /// The section a profile change is for; a delete travels the dynamic
    /// path and is dead-lettered as dynamic.
    pub section: Section,
    pub version: i64,
    pub op: Op,
    pub event_id: String,
    pub marked_at_ms: i64,
}

/// What a change does to the document.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Replace the section's profile.
    Set(Document),
    /// Delete the user: every section older than the version goes, and the
    /// document becomes a tombstone if none is left.
    Delete,
}

impl Change {
    /// `static`, `dynamic` or `delete`: metrics labels and logs.
    pub fn label(&self) -> &'static str {
        match self.op {
            Op::Set(_) => self.section.label(),
            Op::Delete => "delete",
        }
    }
}

/// A user's profile to write and flag.
#[derive(Debug, Clone)]
pub struct ProfileWrite {
    pub user_id: String,
    /// A JSON object.
    pub profile: serde_json::Value,
}

/// The version allocated for a flagged user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Marked {
    pub user_id: String,
    pub version: i64,
}

/// What became of one accepted change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Receipt {
    pub user_id: String,
    pub version: i64,
    /// Where the broker stored it (immediate strategy only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<i64>,
}

/// Where a change failed for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DlqStage {
    /// Its profile could not be read from Redis.
    Load,
    /// Kafka refused the dynamic event after every retry.
    Publish,
    /// A consumed record could not be decoded.
    Decode,
    /// MongoDB rejected the change.
    Apply,
    /// Kafka refused the immediate change after every retry.
    Immediate,
}

impl DlqStage {
    pub const ALL: [DlqStage; 5] = [
        DlqStage::Load,
        DlqStage::Publish,
        DlqStage::Decode,
        DlqStage::Apply,
        DlqStage::Immediate,
    ];

    pub fn label(self) -> &'static str {
        match self {
            DlqStage::Load => "load",
            DlqStage::Publish => "publish",
            DlqStage::Decode => "decode",
            DlqStage::Apply => "apply",
            DlqStage::Immediate => "immediate",
        }
    }
}

/// One change that could not be synced.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Empty when the record could not even be decoded.
    pub user_id: String,
    /// The change's version (0 when unknown).
    pub version: i64,
    pub stage: DlqStage,
    /// The section the change was for (a delete's is dynamic).
    pub section: Section,
    /// The change was a delete.
    pub delete: bool,
    /// The encoded event, or the raw bytes that failed to decode.
    pub original_event: Vec<u8>,
    pub error: String,
    /// Context beyond the message: the error chain and where the record was.
    pub detail: String,
    pub retry_count: u32,
    /// The Kafka topic the event was bound for or read from.
    pub topic: String,
    pub partition: Option<i32>,
    pub offset: Option<i64>,
    /// The sink that refused the change (apply stage), by name.
    pub sink: Option<String>,
}

/// Why one user's profile could not be loaded. Permanent: retrying cannot help
/// until the upstream writes the profile again.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum ProfileError {
    #[error("profile key `{key}` does not exist")]
    Missing { key: String },
    #[error("profile key `{key}` is not valid JSON: {reason}")]
    BadJson { key: String, reason: String },
    #[error("profile key `{key}` holds JSON that is not an object")]
    NotAnObject { key: String },
    #[error("profile key `{key}` has Redis type `{kind}`; expected a string or a hash")]
    WrongType { key: String, kind: String },
}

/// A profile as Redis holds it, before it is parsed.
#[derive(Debug, Clone, PartialEq)]
pub enum RawProfile {
    /// A string value: JSON (seed 000).
    Json(bytes::Bytes),
    /// A hash: field → string value.
    Hash(BTreeMap<String, String>),
}

impl RawProfile {
    /// The profile as a JSON object map (what an event carries); `key`
    /// names the Redis key in errors. A hash's values are strings.
    pub fn to_object(&self, key: &str) -> Result<crate::proto::JsonProfile, ProfileError> {
        match self {
            RawProfile::Json(bytes) => {
                let v: serde_json::Value =
                    serde_json::from_slice(bytes).map_err(|e| ProfileError::BadJson {
                        key: key.to_string(),
                        reason: e.to_string(),
                    })?;
                match v {
                    serde_json::Value::Object(o) => Ok(o),
                    _ => Err(ProfileError::NotAnObject {
                        key: key.to_string(),
                    }),
                }
            }
            RawProfile::Hash(map) => Ok(map
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect()),
        }
    }

    /// The profile as a JSON object (what reads answer).
    pub fn to_json(&self, key: &str) -> Result<serde_json::Value, ProfileError> {
        self.to_object(key).map(serde_json::Value::Object)
    }

    /// The profile as a BSON document (what the consistency check compares
    /// with MongoDB).
    pub fn to_document(&self, key: &str) -> Result<Document, ProfileError> {
        Ok(self
            .to_object(key)?
            .iter()
            .map(|(k, v)| (k.clone(), crate::proto::json_to_bson(v)))
            .collect())
    }
}

/// Checks user ids, naming the first problem (`user_ids[i]: …`).
pub fn validate_user_ids<'a>(ids: impl IntoIterator<Item = &'a str>) -> Result<(), String> {
    let mut n = 0;
    for (i, id) in ids.into_iter().enumerate() {
        n += 1;
        if id.is_empty() {
            return Err(format!("user_ids[{i}]: must not be empty"));
        }
        if id.len() > 256 {
            return Err(format!("user_ids[{i}]: longer than 256 bytes"));
        }
        if id.chars().any(char::is_control) {
            return Err(format!("user_ids[{i}]: contains control characters"));
        }
    }
    if n == 0 {
        return Err("user_ids: must not be empty".into());
    }
    Ok(())
}

/// Checks the ids, and that every profile is a JSON object, naming the first
/// problem.
pub fn validate_writes(users: &[ProfileWrite]) -> Result<(), String> {
    validate_user_ids(users.iter().map(|u| u.user_id.as_str()))?;
    for (i, u) in users.iter().enumerate() {
        if !u.profile.is_object() {
            return Err(format!("users[{i}].profile: must be a JSON object"));
        }
    }
    Ok(())
}

/// Milliseconds since the Unix epoch, by this process's clock.
pub fn now_ms() -> i64 {
    now_us() / 1000
}

/// A time given in a request: epoch milliseconds (an integer) or an RFC 3339
/// string; answers epoch milliseconds, or an error naming what is wrong.
pub fn parse_time(s: &str) -> Result<i64, String> {
    let s = s.trim();
    if let Ok(ms) = s.parse::<i64>() {
        return if ms >= 0 {
            Ok(ms)
        } else {
            Err(format!("`{s}` is before 1970"))
        };
    }
    humantime::parse_rfc3339_weak(s)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as i64)
        .ok_or_else(|| {
            format!(
                "`{s}` is neither epoch milliseconds nor an RFC 3339 time (2026-11-24T10:00:00Z)"
            )
        })
}

/// Epoch milliseconds as RFC 3339 with milliseconds, as answers give times.
pub fn rfc3339_ms(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Microseconds since the Unix epoch, by this process's clock.
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_epoch_milliseconds_or_rfc3339() {
        assert_eq!(parse_time("1700000000123"), Ok(1_700_000_000_123));
        assert_eq!(
            parse_time("2023-11-14T22:13:20.123Z"),
            Ok(1_700_000_000_123)
        );
        assert_eq!(rfc3339_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert!(parse_time("-5").unwrap_err().contains("before 1970"));
        assert!(parse_time("yesterday").unwrap_err().contains("RFC 3339"));
    }

    #[test]
    fn profiles_parse_or_name_the_problem() {
        let json = |s: &str| RawProfile::Json(bytes::Bytes::copy_from_slice(s.as_bytes()));
        assert!(json(r#"{"a":1}"#).to_document("k").is_ok());
        assert_eq!(
            json("[1]").to_document("k"),
            Err(ProfileError::NotAnObject { key: "k".into() })
        );
        let err = json("{oops").to_document("user:1:profile").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("profile key `user:1:profile` is not valid JSON"),
            "{err}"
        );
        let hash = RawProfile::Hash([("a".to_string(), "1".to_string())].into());
        assert_eq!(hash.to_json("k").unwrap(), serde_json::json!({ "a": "1" }));
        assert_eq!(
            json("[1]").to_json("k"),
            Err(ProfileError::NotAnObject { key: "k".into() })
        );
    }

    #[test]
    fn sections_map_both_ways() {
        for s in [Section::Static, Section::Dynamic] {
            assert_eq!(Section::of_label(s.label()), s);
        }
        assert_eq!(
            Section::Static.mongo_fields(),
            ("staticProfile", "staticVersion")
        );
    }
}
