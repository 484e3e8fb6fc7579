//! The operation log (seed 003): every admin action — a DLQ redrive, a
//! replay, a resync, a consistency check asked for, a whitelist change, a
//! job cancelled — once, with its id, kind, parameters, the caller's token
//! name (never the secret), start, end and result, in a Redis stream
//! trimmed to about `operations.max_entries`.
//!
//! An action that answers at once is logged when it answers; a job is
//! logged when it ends, by whichever instance ends it (the caller and the
//! parameters travel in its record).

use crate::{
    clients::redis::{RedisError, RedisStore},
    jobs::rfc3339,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::{collections::HashMap, time::SystemTime};

/// Most user ids an entry's parameters list; longer lists are cut, with
/// their length.
const IDS_LOGGED: usize = 100;

/// A list of user ids as an entry's parameter: the list, or its first
/// [`IDS_LOGGED`] ids and its length.
pub fn ids_param(ids: &[String]) -> Value {
    if ids.len() <= IDS_LOGGED {
        serde_json::json!(ids)
    } else {
        serde_json::json!({ "count": ids.len(), "first": &ids[..IDS_LOGGED] })
    }
}

/// The caller name of the command line: `cli:<login>`.
pub fn cli_caller() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    format!("cli:{user}")
}

/// Who asked for a job, and with what: kept in the job's record until the
/// job ends and is logged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Requested {
    /// The caller's token name (`cli:<user>` from the command line,
    /// `library` from an embedding application).
    pub by: String,
    pub params: Value,
}

/// One logged action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Operation {
    /// The job id, or `op-<uuid>` for an action that answers at once.
    pub id: String,
    pub kind: String,
    pub params: Value,
    /// The caller's token name.
    pub token: String,
    pub instance_id: String,
    pub started_at: String,
    pub ended_at: String,
    /// `{"status": "done" | "failed" | "cancelled", …}`.
    pub result: Value,
}

/// Where operations are logged.
#[derive(Clone)]
pub struct OperationLog {
    redis: RedisStore,
    max_entries: usize,
    instance_id: String,
}

/// An action under way: logged by [`Action::end`].
pub struct Action {
    id: String,
    kind: String,
    by: String,
    params: Value,
    started: SystemTime,
}

impl Action {
    pub fn begin(kind: impl Into<String>, by: &str, params: Value) -> Self {
        Self {
            id: format!("op-{}", uuid::Uuid::new_v4().simple()),
            kind: kind.into(),
            by: by.to_string(),
            params,
            started: SystemTime::now(),
        }
    }

    /// Logs the action with its outcome (a failure to log is only warned
    /// about: the action itself happened).
    pub async fn end<T: Serialize, E: std::fmt::Display>(
        self,
        log: &OperationLog,
        outcome: &Result<T, E>,
    ) {
        let result = match outcome {
            Ok(v) => result("done", None, v),
            Err(e) => result("failed", Some(&e.to_string()), &()),
        };
        log.write(Operation {
            id: self.id,
            kind: self.kind,
            params: self.params,
            token: self.by,
            instance_id: log.instance_id.clone(),
            started_at: rfc3339(self.started),
            ended_at: rfc3339(SystemTime::now()),
            result,
        })
        .await;
    }
}

/// An entry's result: `{"status", "error"?}` and the fields of `details`
/// (when it serializes to an object).
pub fn result<T: Serialize>(status: &str, error: Option<&str>, details: &T) -> Value {
    let mut r = serde_json::json!({ "status": status });
    if let Some(e) = error {
        r["error"] = e.into();
    }
    if let Ok(Value::Object(m)) = serde_json::to_value(details) {
        r.as_object_mut().expect("an object").extend(m);
    }
    r
}

impl OperationLog {
    pub fn new(redis: RedisStore, max_entries: usize, instance_id: &str) -> Self {
        Self {
            redis,
            max_entries,
            instance_id: instance_id.to_string(),
        }
    }

    /// Appends an entry; a failure is logged, not returned.
    pub async fn write(&self, op: Operation) {
        let fields = vec![
            ("id", op.id.clone()),
            ("kind", op.kind.clone()),
            ("params", op.params.to_string()),
            ("token", op.token.clone()),
            ("instance_id", op.instance_id.clone()),
            ("started_at", op.started_at.clone()),
            ("ended_at", op.ended_at.clone()),
            ("result", op.result.to_string()),
        ];
        match self.redis.operation_append(fields, self.max_entries).await {
            Ok(_) => {
                tracing::info!(id = %op.id, kind = %op.kind, token = %op.token, result = %op.result, "operation")
            }
            Err(e) => {
                tracing::warn!(id = %op.id, kind = %op.kind, error = %e, "cannot write the operation log")
            }
        }
    }

    /// The newest `limit` operations, newest first.
    pub async fn recent(&self, limit: u64) -> Result<Vec<Operation>, RedisError> {
        recent(&self.redis, limit).await
    }
}

/// The newest `limit` operations of a key prefix, newest first.
pub async fn recent(redis: &RedisStore, limit: u64) -> Result<Vec<Operation>, RedisError> {
    Ok(redis
        .operations_recent(limit)
        .await?
        .into_iter()
        .map(|(_, f)| from_fields(f))
        .collect())
}

fn from_fields(mut f: HashMap<String, String>) -> Operation {
    let mut take = |k: &str| f.remove(k).unwrap_or_default();
    let json = |s: String| serde_json::from_str(&s).unwrap_or(Value::String(s));
    Operation {
        id: take("id"),
        kind: take("kind"),
        params: json(take("params")),
        token: take("token"),
        instance_id: take("instance_id"),
        started_at: take("started_at"),
        ended_at: take("ended_at"),
        result: json(take("result")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_read_back_with_their_json() {
        let f: HashMap<String, String> = [
            ("id", "op-1"),
            ("kind", "whitelist_add"),
            ("params", r#"{"user_ids":["a"]}"#),
            ("token", "admin"),
            ("result", r#"{"status":"done"}"#),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let op = from_fields(f);
        assert_eq!(op.params["user_ids"][0], "a");
        assert_eq!(op.result["status"], "done");
        assert_eq!(op.started_at, "");
    }
}
