//! The queries of healing: comparing profiles (consistency check), walking
//! users in `userId` order, and purging old tombstones.

use super::{MongoError, MongoStore};
use crate::model::fields;
use futures::TryStreamExt;
use mongodb::bson::{Bson, DateTime, Document, doc};
use std::collections::HashMap;

impl MongoStore {
    /// The dynamic profiles of users, one `$in` query: `Some(None)` for a
    /// document without one (a tombstone, or a static-only document).
    /// Users without a document are absent.
    pub async fn dynamic_profiles(
        &self,
        users: &[String],
    ) -> Result<HashMap<String, Option<Document>>, MongoError> {
        let mut cursor = self
            .collection()
            .find(doc! { fields::USER_ID: { "$in": users } })
            .projection(doc! { "_id": 0, fields::USER_ID: 1, fields::DYNAMIC_PROFILE: 1, fields::DELETED: 1 })
            .await?;
        let mut out = HashMap::with_capacity(users.len());
        while let Some(d) = cursor.try_next().await? {
            let Ok(u) = d.get_str(fields::USER_ID) else {
                continue;
            };
            let deleted = d.get_bool(fields::DELETED).unwrap_or(false);
            let profile = match d.get(fields::DYNAMIC_PROFILE) {
                Some(Bson::Document(p)) if !deleted => Some(p.clone()),
                _ => None,
            };
            out.insert(u.to_string(), profile);
        }
        Ok(out)
    }

    /// Keyset pagination over the users with a dynamic profile (not
    /// tombstones), in `userId` order: up to `limit` ids after `after`.
    pub async fn users_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, MongoError> {
        let mut filter = doc! {
            fields::DYNAMIC_PROFILE: { "$exists": true },
            fields::DELETED: { "$ne": true },
        };
        if let Some(a) = after {
            filter.insert(fields::USER_ID, doc! { "$gt": a });
        }
        let mut cursor = self
            .collection()
            .find(filter)
            .sort(doc! { fields::USER_ID: 1 })
            .limit(limit as i64)
            .projection(doc! { "_id": 0, fields::USER_ID: 1 })
            .await?;
        let mut out = Vec::with_capacity(limit);
        while let Some(d) = cursor.try_next().await? {
            if let Ok(u) = d.get_str(fields::USER_ID) {
                out.push(u.to_string());
            }
        }
        Ok(out)
    }

    /// Purges up to `limit` tombstones that became tombstones before
    /// `cutoff`. The delete filter repeats the condition, so a user brought
    /// back between the find and the delete stays. Returns how many went.
    pub async fn purge_tombstones(
        &self,
        cutoff: DateTime,
        limit: usize,
    ) -> Result<u64, MongoError> {
        let old = doc! { fields::DELETED: true, fields::DELETED_AT: { "$lt": cutoff } };
        let mut cursor = self
            .collection()
            .find(old.clone())
            .limit(limit as i64)
            .projection(doc! { "_id": 1 })
            .await?;
        let mut ids = Vec::new();
        while let Some(d) = cursor.try_next().await? {
            if let Some(id) = d.get("_id") {
                ids.push(id.clone());
            }
        }
        if ids.is_empty() {
            return Ok(0);
        }
        let mut filter = old;
        filter.insert("_id", doc! { "$in": ids });
        Ok(self.collection().delete_many(filter).await?.deleted_count)
    }
}
