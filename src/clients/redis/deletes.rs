//! Deletes: a user deleted upstream is removed from Redis and flagged with a
//! version from its shard clock, like a mark, with the delete recorded beside
//! the flag. The scanner publishes a delete event at that version; the
//! applier turns the document into a tombstone (see `clients::mongo`).

use super::{Delivery, RedisError, RedisStore, lua_script};
use crate::shard::shard_of;
use fred::{prelude::*, types::scripts::Script};
use std::sync::LazyLock;

static DELETE: LazyLock<Script> = lua_script!("delete.lua", "clock.lua");
static CLEAR_DELETES: LazyLock<Script> = lua_script!("clear_deletes.lua");

impl RedisStore {
    /// Deletes users: removes their profile keys, records the deletes and
    /// flags them, one script per shard. Returns `(user, version)` in input
    /// order. Sent within 2 s of the call or not at all (see
    /// `RedisStore::now_or_never`): while Redis is away the call fails, and
    /// a delete never lands after its caller gave up, over a newer write.
    ///
    /// On a single Redis the script removes the profile keys itself, so a
    /// delete happens whole or not at all: a delete whose caller gave up
    /// half-way (a timeout) can never leave the profile gone with nothing
    /// recorded, which would strand the user's pending change on a missing
    /// profile. On a Redis Cluster the profile keys lie in other slots than
    /// the shard's, so they are removed first, in a pipeline: if the script
    /// then fails, the call fails and must be retried, and a user is never
    /// left recorded as deleted with its profile still in Redis (a consistency
    /// check would bring it back).
    pub async fn delete(&self, users: &[String]) -> Result<Vec<(String, i64)>, RedisError> {
        if self.cluster {
            // Now or never, like the script (see `now_or_never`): one DEL a
            // key, as a pipeline would drop the client's options.
            let client = self.now_or_never();
            let keys: Vec<String> = users.iter().map(|u| self.keys.profile(u)).collect();
            super::detached(async move {
                futures::future::try_join_all(keys.into_iter().map(|k| client.del::<(), _>(k)))
                    .await
            })
            .await?;
        }
        let ids: Vec<&str> = users.iter().map(String::as_str).collect();
        let versions = self
            .allocate_versions(
                Delivery::NowOrNever,
                &DELETE,
                &ids,
                |shard| vec![self.keys.dirty(shard), self.keys.deleted(shard)],
                |i| {
                    let profile = match self.cluster {
                        true => String::new(),
                        false => self.keys.profile(&users[i]),
                    };
                    vec![users[i].clone(), profile]
                },
            )
            .await?;
        Ok(users.iter().cloned().zip(versions).collect())
    }

    /// The recorded (not yet published) delete versions of users of one shard.
    /// For many users, the shard's hash is sized first: it is almost always
    /// empty, and an HMGET of a page's users would send every id and read a
    /// nil for each. (A delete recorded between the two reads is the same as
    /// one recorded after an HMGET: it flags the user again, at a new version.)
    pub async fn recorded_deletes(
        &self,
        shard: u32,
        users: &[&str],
    ) -> Result<Vec<Option<i64>>, RedisError> {
        if users.is_empty() {
            return Ok(vec![]);
        }
        let key = self.keys.deleted(shard);
        if users.len() == 1 {
            return Ok(vec![self.client().hget(key, users[0]).await?]);
        }
        let recorded: u64 = self.client().hlen(&key).await?;
        if recorded == 0 {
            return Ok(vec![None; users.len()]);
        }
        Ok(self.client().hmget(key, users.to_vec()).await?)
    }

    /// The recorded delete of one user, if its event is not yet published.
    pub async fn recorded_delete_of(&self, user: &str) -> Result<Option<i64>, RedisError> {
        let shard = shard_of(user, self.shards);
        Ok(self.recorded_deletes(shard, &[user]).await?.pop().flatten())
    }

    /// Compare-and-delete of recorded deletes whose events were published.
    /// Fenced like [`clear_flags`](Self::clear_flags).
    pub async fn clear_deletes(
        &self,
        shard: u32,
        deletes: &[(String, i64)],
        fence: Option<&str>,
    ) -> Result<u64, RedisError> {
        if deletes.is_empty() {
            return Ok(0);
        }
        let mut args = Vec::with_capacity(deletes.len() * 2 + 1);
        args.push(fence.unwrap_or_default().to_string());
        for (u, v) in deletes {
            args.push(u.clone());
            args.push(v.to_string());
        }
        let n: i64 = CLEAR_DELETES
            .evalsha_with_reload(
                self.client(),
                vec![self.keys.deleted(shard), self.keys.lease(shard)],
                args,
            )
            .await?;
        if n < 0 {
            return Err(RedisError::Fenced { shard });
        }
        Ok(n as u64)
    }
}
