//! MongoDB: the sink. Writes go through the `update` command with many
//! statements (unordered), which every server from 6.0 on understands; the
//! driver's `Client::bulk_write` would need 8.0.
//!
//! Here: errors and their classes, the change types, connecting and the
//! indexes, version lookups. [`write`]: the newer-wins statements (section
//! upserts and deletes) and how replies map to outcomes. [`healing`]: the
//! queries of the consistency check and the tombstone purge.

use crate::{config::MongoConfig, model::fields};
use futures::TryStreamExt;
use mongodb::{
    Client, Collection, Database, IndexModel,
    bson::{Bson, Document, RawDocumentBuf, doc},
    options::{ClientOptions, IndexOptions},
};
use std::collections::HashMap;

mod healing;
mod write;

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

pub use crate::model::{Change, Op};

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
    write_concern: Option<RawDocumentBuf>,
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
        crate::tls::ensure_provider();
        let mut opts = ClientOptions::parse(c.url.expose()).await?;
        opts.app_name = Some(app_name.to_string());
        let write_concern = match &opts.write_concern {
            Some(wc) if *wc != Default::default() => Some(
                mongodb::bson::to_raw_document_buf(wc)
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

    /// The same database and client, writing to another collection (a
    /// replay rebuilding into a collection of its own).
    pub fn with_collection(&self, collection: &str) -> Self {
        Self {
            db: self.db.clone(),
            collection: collection.to_string(),
            write_concern: self.write_concern.clone(),
        }
    }

    /// The collection's name.
    pub fn collection_name(&self) -> &str {
        &self.collection
    }

    /// `database.collection`, for logs.
    pub fn namespace(&self) -> String {
        format!("{}.{}", self.db.name(), self.collection)
    }

    pub fn collection(&self) -> Collection<Document> {
        self.db.collection(&self.collection)
    }

    /// The unique index the newer-wins upserts rely on, and a sparse one on
    /// `deletedAt` for the tombstone purge (only tombstones carry the field).
    pub async fn ensure_index(&self) -> Result<(), MongoError> {
        let model = IndexModel::builder()
            .keys(doc! { fields::USER_ID: 1 })
            .options(IndexOptions::builder().unique(true).build())
            .build();
        self.collection().create_index(model).await?;
        let tombstones = IndexModel::builder()
            .keys(doc! { fields::DELETED_AT: 1 })
            .options(IndexOptions::builder().sparse(true).build())
            .build();
        self.collection().create_index(tombstones).await?;
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

    /// One user's document, for tests and reads.
    pub async fn find_user(&self, user: &str) -> Result<Option<Document>, MongoError> {
        Ok(self.collection().find_one(doc! { "userId": user }).await?)
    }

    pub async fn ping(&self) -> Result<(), MongoError> {
        self.db.run_command(doc! { "ping": 1 }).await?;
        Ok(())
    }
}
