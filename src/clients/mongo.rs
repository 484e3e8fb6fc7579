//! MongoDB: the sink. Writes go through the `update` command with many
//! statements (unordered), which every server from 6.0 on understands; the
//! driver's `Client::bulk_write` would need 8.0.

use crate::{config::MongoConfig, model::Section};
use futures::TryStreamExt;
use mongodb::{
    Client, Collection, Database, IndexModel,
    bson::{Bson, DateTime, Document, doc},
    options::{ClientOptions, IndexOptions},
};
use std::collections::HashMap;

/// Statements per `update` command (the server accepts up to 100,000 and 48 MB).
const STATEMENTS_PER_COMMAND: usize = 1000;
/// Bytes of statements per `update` command: well under the 16 MB a command
/// document may take on the server.
const COMMAND_BYTES: usize = 8 * 1024 * 1024;
/// MongoDB's duplicate-key error code.
const DUPLICATE_KEY: i32 = 11000;

#[derive(Debug, thiserror::Error)]
pub enum MongoError {
    #[error("mongodb: {0}")]
    Driver(#[from] mongodb::error::Error),
    #[error("mongodb returned an unexpected reply: {0}")]
    Reply(String),
    /// The statements ran but the write concern was not satisfied (e.g. a
    /// primary stepped down while waiting for a majority): the writes may be
    /// rolled back, so nothing of the window counts as applied.
    #[error("mongodb write concern not satisfied (code {code}): {message}")]
    WriteConcern { code: i32, message: String },
    /// A statement failed with an error that passes by itself (a write
    /// conflict, a primary stepping down): the window is retried.
    #[error("mongodb transient error (code {code}): {message}")]
    Transient { code: i32, message: String },
}

/// How a MongoDB server error code is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeClass {
    /// Passes by itself: retry (WriteConflict, not-primary, shutdown,
    /// network and timeout codes: the driver's retryable-write codes).
    Transient,
    /// Will not pass by retrying, and is not the data's fault
    /// (authentication, authorization): retried anyway, so nothing is
    /// dropped, while readiness names it for an operator.
    Configuration,
    /// The data itself is refused (too large, invalid, failed validation):
    /// that change is dead-lettered, the rest go on.
    Data,
}

/// Classifies a server error code (unknown codes count as data errors in a
/// statement's `writeErrors`, where the server has judged that statement).
pub fn classify_code(code: i32) -> CodeClass {
    match code {
        6 | 7 | 89 | 91 | 112 | 134 | 189 | 262 | 9001 | 10107 | 11600 | 11602 | 13435 | 13436
        | 50 | 24 | 46 => CodeClass::Transient,
        13 | 18 | 8000 | 31 | 11 => CodeClass::Configuration,
        _ => CodeClass::Data,
    }
}

/// Whether a driver error may pass by itself.
fn driver_error_is_transient(e: &mongodb::error::Error) -> bool {
    use mongodb::error::ErrorKind;
    if e.contains_label("RetryableWriteError") || e.contains_label("TransientTransactionError") {
        return true;
    }
    match e.kind.as_ref() {
        ErrorKind::Authentication { .. }
        | ErrorKind::InvalidArgument { .. }
        | ErrorKind::BsonSerialization(_) => false,
        ErrorKind::Command(c) => classify_code(c.code) == CodeClass::Transient,
        // Connections, server selection, timeouts, pools.
        _ => true,
    }
}

/// Whether a command failed because of what it carried (a document or a
/// batch too large, a value refused): writing its statements one by one
/// isolates the bad ones.
fn refused_for_its_data(e: &MongoError) -> bool {
    use mongodb::error::ErrorKind;
    match e {
        MongoError::Driver(d) => match d.kind.as_ref() {
            // Too large: a document (10334 BSONObjectTooLarge, 17419/17420
            // document or update too large) or the command itself. Any other
            // code failing a whole command is not the data's fault: the
            // window is retried rather than dead-lettered.
            ErrorKind::Command(c) => matches!(c.code, 10334 | 17419 | 17420),
            // The driver refuses a message over the server's maximum size.
            ErrorKind::InvalidArgument { message, .. } => message.contains("over maximum"),
            ErrorKind::BsonSerialization(_) => true,
            _ => false,
        },
        _ => false,
    }
}

impl crate::retry::Retryable for MongoError {
    /// Driver errors (connection, timeouts, server selection) may pass; a reply
    /// this code cannot read will not.
    fn is_retryable(&self) -> bool {
        match self {
            MongoError::Driver(e) => driver_error_is_transient(e),
            MongoError::WriteConcern { .. } | MongoError::Transient { .. } => true,
            MongoError::Reply(_) => false,
        }
    }
}

/// One change to apply: the newest version of one section of one user.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub user_id: String,
    pub section: Section,
    pub version: i64,
    pub profile: Document,
    pub event_id: String,
    pub marked_at_ms: i64,
}

/// What became of each change of a bulk write.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Applied,
    /// The stored version was already at least as new.
    Stale,
    /// MongoDB rejected the statement itself.
    Rejected(String),
}

#[derive(Clone)]
pub struct MongoStore {
    db: Database,
    collection: String,
    /// The URL's write concern (`w`, `wtimeoutMS`, `journal`), sent with each
    /// `update` command: `run_command` does not add the client's own.
    write_concern: Option<Document>,
}

impl MongoStore {
    /// Connects and makes sure the unique `userId` index exists.
    pub async fn connect(c: &MongoConfig, app_name: &str) -> Result<Self, MongoError> {
        let store = Self::connect_without_index(c, app_name).await?;
        store.ensure_index().await?;
        Ok(store)
    }

    /// Parses the URL and builds the client (which connects lazily), without
    /// touching the collection.
    pub async fn connect_without_index(
        c: &MongoConfig,
        app_name: &str,
    ) -> Result<Self, MongoError> {
        let mut opts = ClientOptions::parse(c.url.expose()).await?;
        opts.app_name = Some(app_name.to_string());
        let write_concern = match &opts.write_concern {
            Some(wc) if *wc != Default::default() => Some(
                mongodb::bson::to_document(wc)
                    .map_err(|e| MongoError::Reply(format!("write concern: {e}")))?,
            ),
            _ => None,
        };
        let client = Client::with_options(opts)?;
        Ok(Self {
            db: client.database(&c.database),
            collection: c.collection.clone(),
            write_concern,
        })
    }

    /// `database.collection`, for logs.
    pub fn namespace(&self) -> String {
        format!("{}.{}", self.db.name(), self.collection)
    }

    pub fn collection(&self) -> Collection<Document> {
        self.db.collection(&self.collection)
    }

    /// The unique index the newer-wins upserts rely on.
    pub async fn ensure_index(&self) -> Result<(), MongoError> {
        let model = IndexModel::builder()
            .keys(doc! { "userId": 1 })
            .options(IndexOptions::builder().unique(true).build())
            .build();
        self.collection().create_index(model).await?;
        Ok(())
    }

    /// Applied versions `(static, dynamic)` of the given users, one `$in` query.
    /// Users without a document are absent.
    pub async fn versions(
        &self,
        users: &[&str],
    ) -> Result<HashMap<String, (i64, i64)>, MongoError> {
        let mut cursor = self
            .collection()
            .find(doc! { "userId": { "$in": users } })
            .projection(doc! { "_id": 0, "userId": 1, "staticVersion": 1, "dynamicVersion": 1 })
            .await?;
        let mut out = HashMap::with_capacity(users.len());
        while let Some(d) = cursor.try_next().await? {
            let Ok(u) = d.get_str("userId") else { continue };
            let v = |f: &str| match d.get(f) {
                Some(Bson::Int64(i)) => *i,
                Some(Bson::Int32(i)) => i64::from(*i),
                _ => 0,
            };
            out.insert(u.to_string(), (v("staticVersion"), v("dynamicVersion")));
        }
        Ok(out)
    }

    /// Applies changes newer-wins: each statement updates a user's section only
    /// if its stored version is older (or absent), upserting on `userId`. A
    /// duplicate-key error means another statement inserted the document first,
    /// so those statements are tried once more; a second duplicate means stale.
    pub async fn apply(&self, changes: &[Change]) -> Result<Vec<Outcome>, MongoError> {
        let now = DateTime::now();
        let mut outcomes = self.update_many(changes, now).await?;
        let retry: Vec<usize> = outcomes
            .iter()
            .enumerate()
            .filter(|(_, o)| matches!(o, Outcome::Stale))
            .map(|(i, _)| i)
            .collect();
        if !retry.is_empty() {
            let again: Vec<Change> = retry.iter().map(|&i| changes[i].clone()).collect();
            for (i, o) in retry.into_iter().zip(self.update_many(&again, now).await?) {
                outcomes[i] = o;
            }
        }
        Ok(outcomes)
    }

    async fn update_many(
        &self,
        changes: &[Change],
        now: DateTime,
    ) -> Result<Vec<Outcome>, MongoError> {
        let mut outcomes = Vec::with_capacity(changes.len());
        let (mut from, mut bytes) = (0, 0);
        let mut statements: Vec<Document> = Vec::new();
        for (i, c) in changes.iter().enumerate() {
            let s = statement(c, now);
            // The size the statement takes in the command (the profile is
            // most of it), so a command stays well under the server's 16 MB.
            let size = mongodb::bson::to_vec(&s).map(|v| v.len()).unwrap_or(0);
            if !statements.is_empty()
                && (statements.len() == STATEMENTS_PER_COMMAND || bytes + size > COMMAND_BYTES)
            {
                let group = std::mem::take(&mut statements);
                outcomes.extend(self.update_command(&changes[from..i], group, now).await?);
                (from, bytes) = (i, 0);
            }
            statements.push(s);
            bytes += size;
        }
        if !statements.is_empty() {
            outcomes.extend(
                self.update_command(&changes[from..], statements, now)
                    .await?,
            );
        }
        Ok(outcomes)
    }

    /// One `update` command with the statements of `changes`; an outcome
    /// each. A command refused whole for what it carries (a statement too
    /// large for any command) is written again one statement at a time, so
    /// only the bad statements are rejected.
    async fn update_command(
        &self,
        changes: &[Change],
        statements: Vec<Document>,
        now: DateTime,
    ) -> Result<Vec<Outcome>, MongoError> {
        match self.run_update(statements).await {
            Err(e) if refused_for_its_data(&e) => {
                tracing::warn!(error = %e, statements = changes.len(), "bulk update refused; writing its statements one by one");
                let mut out = Vec::with_capacity(changes.len());
                for c in changes {
                    out.push(match self.run_update(vec![statement(c, now)]).await {
                        Ok(mut o) => o.remove(0),
                        Err(e) if refused_for_its_data(&e) => Outcome::Rejected(e.to_string()),
                        Err(e) => return Err(e),
                    });
                }
                Ok(out)
            }
            other => other,
        }
    }

    async fn run_update(&self, statements: Vec<Document>) -> Result<Vec<Outcome>, MongoError> {
        let n = statements.len();
        let mut command =
            doc! { "update": &self.collection, "updates": statements, "ordered": false };
        if let Some(wc) = &self.write_concern {
            command.insert("writeConcern", wc.clone());
        }
        let reply = self.db.run_command(command).await?;
        outcomes_of_reply(&reply, n)
    }

    /// One user's document, for tests and reads.
    pub async fn find_user(&self, user: &str) -> Result<Option<Document>, MongoError> {
        Ok(self.collection().find_one(doc! { "userId": user }).await?)
    }

    pub async fn ping(&self) -> Result<(), MongoError> {
        self.db.run_command(doc! { "ping": 1 }).await?;
        Ok(())
    }
}

/// The outcome of each of the `n` statements of one `update` command, from its
/// reply. A `writeConcernError` fails the whole command: the statements may be
/// rolled back, and counting them applied would raise the applied-version
/// caches and commit offsets past changes that are then lost.
fn outcomes_of_reply(reply: &Document, n: usize) -> Result<Vec<Outcome>, MongoError> {
    let code_of = |d: &Document| match d.get("code") {
        Some(Bson::Int32(c)) => *c,
        Some(Bson::Int64(c)) => *c as i32,
        _ => 0,
    };
    if let Some(wce) = reply.get("writeConcernError") {
        let Some(wce) = wce.as_document() else {
            return Err(MongoError::Reply(format!("writeConcernError {wce}")));
        };
        return Err(MongoError::WriteConcern {
            code: code_of(wce),
            message: wce.get_str("errmsg").unwrap_or("no message").to_string(),
        });
    }
    let mut outcomes = vec![Outcome::Applied; n];
    if let Ok(errors) = reply.get_array("writeErrors") {
        for e in errors {
            let Some(e) = e.as_document() else {
                return Err(MongoError::Reply(format!("writeErrors entry {e}")));
            };
            let index = match e.get("index") {
                Some(Bson::Int32(i)) => *i as usize,
                Some(Bson::Int64(i)) => *i as usize,
                _ => return Err(MongoError::Reply(format!("writeError without index: {e}"))),
            };
            let Some(slot) = outcomes.get_mut(index) else {
                return Err(MongoError::Reply(format!(
                    "writeError index {index} out of range"
                )));
            };
            let code = code_of(e);
            let message = e.get_str("errmsg").unwrap_or("unknown").to_string();
            *slot = if code == DUPLICATE_KEY {
                Outcome::Stale
            } else if classify_code(code) != CodeClass::Data {
                // Not this statement's fault: the whole window is retried
                // (its applied statements are then stale no-ops).
                return Err(MongoError::Transient { code, message });
            } else {
                Outcome::Rejected(message)
            };
        }
    }
    Ok(outcomes)
}

/// The newer-wins upsert of one section.
fn statement(c: &Change, now: DateTime) -> Document {
    let (profile_field, version_field) = c.section.mongo_fields();
    doc! {
        "q": {
            "userId": &c.user_id,
            // "Not at least as new": matches an older version and a missing one.
            // (An `$or` of the two is equivalent but defeats the userId index on
            // some servers.)
            version_field: { "$not": { "$gte": c.version } },
        },
        "u": {
            "$set": {
                profile_field: c.profile.clone(),
                version_field: c.version,
                "updatedAt": now,
                "lastEventId": &c.event_id,
            },
            "$inc": { "dataVersion": 1i64 },
        },
        "upsert": true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_concern_error_fails_the_window_instead_of_counting_as_applied() {
        // The reply a replica set gives when the primary steps down while
        // waiting for `w: majority`: the command is `ok: 1`, with n and
        // nModified counted, and a writeConcernError beside them.
        let reply = doc! {
            "n": 2, "nModified": 2, "ok": 1.0,
            "writeConcernError": {
                "code": 189,
                "codeName": "PrimarySteppedDown",
                "errmsg": "Primary stepped down while waiting for replication",
            },
        };
        let err = outcomes_of_reply(&reply, 2).unwrap_err();
        assert!(
            matches!(&err, MongoError::WriteConcern { code: 189, .. }),
            "{err}"
        );
        assert!(crate::retry::Retryable::is_retryable(&err));
        assert!(err.to_string().contains("Primary stepped down"), "{err}");
    }

    #[test]
    fn codes_are_classified() {
        for transient in [112, 189, 11600, 11602, 10107, 91, 6, 7, 89, 9001, 262] {
            assert_eq!(
                classify_code(transient),
                CodeClass::Transient,
                "{transient}"
            );
        }
        for config in [13, 18] {
            assert_eq!(classify_code(config), CodeClass::Configuration, "{config}");
        }
        for data in [2, 121, 10334, 17419] {
            assert_eq!(classify_code(data), CodeClass::Data, "{data}");
        }
    }

    #[test]
    fn a_write_conflict_retries_the_window_instead_of_dead_lettering() {
        let reply = doc! {
            "n": 1, "ok": 1.0,
            "writeErrors": [{ "index": 1, "code": 112, "errmsg": "WriteConflict" }],
        };
        let err = outcomes_of_reply(&reply, 2).unwrap_err();
        assert!(
            matches!(err, MongoError::Transient { code: 112, .. }),
            "{err}"
        );
        assert!(crate::retry::Retryable::is_retryable(&err));
        let validation = doc! {
            "n": 1, "ok": 1.0,
            "writeErrors": [{ "index": 1, "code": 121, "errmsg": "Document failed validation" }],
        };
        assert_eq!(
            outcomes_of_reply(&validation, 2).unwrap(),
            vec![
                Outcome::Applied,
                Outcome::Rejected("Document failed validation".into())
            ]
        );
    }

    #[test]
    fn write_errors_map_to_outcomes_by_index() {
        let reply = doc! {
            "n": 1, "ok": 1.0,
            "writeErrors": [
                { "index": 0, "code": 11000, "errmsg": "E11000 duplicate key" },
                { "index": 2, "code": 2, "errmsg": "bad value" },
            ],
        };
        assert_eq!(
            outcomes_of_reply(&reply, 3).unwrap(),
            vec![
                Outcome::Stale,
                Outcome::Applied,
                Outcome::Rejected("bad value".into())
            ]
        );
        let out_of_range = doc! { "ok": 1.0, "writeErrors": [{ "index": 5, "code": 2 }] };
        assert!(outcomes_of_reply(&out_of_range, 3).is_err());
    }
}
