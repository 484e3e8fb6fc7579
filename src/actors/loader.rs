//! ProfileLoader: reads the profiles of a page of flags from Redis, pipelined,
//! and parses each into the document its event carries; and the deletes
//! recorded for the page's users, which are published as delete events.

use super::{Flag, Shared, StageError, guard, restart_pause};
use crate::{clients::redis::RedisStore, faults::Stage, model::ProfileError, shard::shard_of};
use actix::prelude::*;

pub struct ProfileLoader {
    redis: RedisStore,
    shared: Shared,
    restarts: u32,
}

impl ProfileLoader {
    pub const NAME: &'static str = "ProfileLoader";

    pub fn new(redis: RedisStore, shared: Shared) -> Self {
        Self {
            redis,
            shared,
            restarts: 0,
        }
    }
}

impl Actor for ProfileLoader {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        restart_pause(self.restarts, ctx);
    }
}

impl Supervised for ProfileLoader {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.restarts += 1;
    }
}

/// One flag, loaded.
#[derive(Debug)]
pub struct Loaded {
    pub flag: Flag,
    /// The user's delete recorded and not yet published, at most the flag's
    /// version: the flag's own (the flag is the delete), or an older one a
    /// later mark flagged over (both must be published).
    pub delete: Option<i64>,
    /// The profile; `None` when the flag is the delete itself.
    pub profile: Option<Result<crate::proto::JsonProfile, ProfileError>>,
}

/// Loads one profile per flag, and the deletes recorded for its users. A
/// flag whose user was deleted again after the flag was read is left out:
/// its score moved on, and the next page publishes the delete. Per-user
/// problems come back per user; a Redis failure (after the retry policy)
/// fails the whole page.
#[derive(Message)]
#[rtype(result = "Result<Vec<Loaded>, StageError>")]
pub struct Load(pub Vec<Flag>);

impl Handler<Load> for ProfileLoader {
    type Result = ResponseActFuture<Self, Result<Vec<Loaded>, StageError>>;

    fn handle(&mut self, Load(flags): Load, _: &mut Context<Self>) -> Self::Result {
        let redis = self.redis.clone();
        let shared = self.shared.clone();
        guard(Self::NAME, shared.stats.clone(), async move {
            shared.faults.check(Stage::Loader);
            let Some(first) = flags.first() else {
                return Ok(Vec::new());
            };
            // A page is one shard's.
            let shard = shard_of(&first.user_id, redis.shards());
            let users: Vec<&str> = flags.iter().map(|f| f.user_id.as_str()).collect();
            let ids: Vec<String> = flags.iter().map(|f| f.user_id.clone()).collect();
            // One round trip's wait for both: the deletes and every profile
            // (a delete's profile key is gone; its answer is not used).
            let (deletes, profiles) = tokio::join!(
                shared
                    .retry
                    .run("read recorded deletes", &shared.cancel, || {
                        redis.recorded_deletes(shard, &users)
                    }),
                shared.retry.run("load profiles", &shared.cancel, || {
                    redis.load_profiles(&ids)
                }),
            );
            let (deletes, profiles) = (deletes?, profiles?);
            let mut out = Vec::with_capacity(flags.len());
            for ((flag, delete), raw) in flags.into_iter().zip(deletes).zip(profiles) {
                let profile = match delete {
                    Some(d) if d > flag.version => continue,
                    Some(d) if d == flag.version => None,
                    // Parsing here, not in the Redis client: the client hands
                    // back what Redis holds, the loader decides what a profile is.
                    _ => {
                        let key = redis.keys().profile(&flag.user_id);
                        Some(raw.and_then(|r| r.to_object(&key)))
                    }
                };
                out.push(Loaded {
                    flag,
                    delete,
                    profile,
                });
            }
            Ok(out)
        })
    }
}
