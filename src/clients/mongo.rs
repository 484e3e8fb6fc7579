//! MongoDB: the sink. Writes go through the `update` command with many
//! statements (unordered), which every server from 6.0 on understands; the
//! driver's `Client::bulk_write` would need 8.0.

use crate::{clients::redis::Section, config::MongoConfig};
use futures::TryStreamExt;
use mongodb::{
    Client, Collection, Database, IndexModel,
    bson::{Bson, DateTime, Document, doc},
    options::{ClientOptions, IndexOptions},
};
use std::collections::HashMap;

/// Statements per `update` command (the server accepts up to 100,000 and 48 MB).
const STATEMENTS_PER_COMMAND: usize = 1000;
/// MongoDB's duplicate-key error code.
const DUPLICATE_KEY: i32 = 11000;

#[derive(Debug, thiserror::Error)]
pub enum MongoError {
    #[error("mongodb: {0}")]
    Driver(#[from] mongodb::error::Error),
    #[error("mongodb returned an unexpected reply: {0}")]
    Reply(String),
}

impl crate::retry::Retryable for MongoError {
    /// Driver errors (connection, timeouts, server selection) may pass; a reply
    /// this code cannot read will not.
    fn is_retryable(&self) -> bool {
        matches!(self, MongoError::Driver(_))
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
}

fn fields(section: Section) -> (&'static str, &'static str) {
    match section {
        Section::Static => ("staticProfile", "staticVersion"),
        Section::Dynamic => ("dynamicProfile", "dynamicVersion"),
    }
}

impl MongoStore {
    pub async fn connect(c: &MongoConfig, app_name: &str) -> Result<Self, MongoError> {
        let mut opts = ClientOptions::parse(c.url.expose()).await?;
        opts.app_name = Some(app_name.to_string());
        let client = Client::with_options(opts)?;
        let store = Self {
            db: client.database(&c.database),
            collection: c.collection.clone(),
        };
        store.ensure_index().await?;
        Ok(store)
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
        for chunk in changes.chunks(STATEMENTS_PER_COMMAND) {
            let statements: Vec<Document> = chunk.iter().map(|c| statement(c, now)).collect();
            let reply = self
                .db
                .run_command(
                    doc! { "update": &self.collection, "updates": statements, "ordered": false },
                )
                .await?;
            let mut chunk_outcomes = vec![Outcome::Applied; chunk.len()];
            if let Ok(errors) = reply.get_array("writeErrors") {
                for e in errors {
                    let Some(e) = e.as_document() else {
                        return Err(MongoError::Reply(format!("writeErrors entry {e}")));
                    };
                    let index = match e.get("index") {
                        Some(Bson::Int32(i)) => *i as usize,
                        Some(Bson::Int64(i)) => *i as usize,
                        _ => {
                            return Err(MongoError::Reply(format!(
                                "writeError without index: {e}"
                            )));
                        }
                    };
                    let code = match e.get("code") {
                        Some(Bson::Int32(c)) => *c,
                        Some(Bson::Int64(c)) => *c as i32,
                        _ => 0,
                    };
                    let Some(slot) = chunk_outcomes.get_mut(index) else {
                        return Err(MongoError::Reply(format!(
                            "writeError index {index} out of range"
                        )));
                    };
                    *slot = if code == DUPLICATE_KEY {
                        Outcome::Stale
                    } else {
                        Outcome::Rejected(e.get_str("errmsg").unwrap_or("unknown").to_string())
                    };
                }
            }
            outcomes.extend(chunk_outcomes);
        }
        Ok(outcomes)
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

/// The newer-wins upsert of one section.
fn statement(c: &Change, now: DateTime) -> Document {
    let (profile_field, version_field) = fields(c.section);
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
