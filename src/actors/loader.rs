//! ProfileLoader: reads the profiles of a page of flags from Redis, pipelined,
//! and parses each into the document its event carries.

use super::{Flag, Shared, StageError, guard, restart_pause};
use crate::{clients::redis::RedisStore, faults::Stage, model::ProfileError};
use actix::prelude::*;
use mongodb::bson::Document;

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

/// Loads one profile per flag. Per-user problems come back per user; a Redis
/// failure (after the retry policy) fails the whole page.
#[derive(Message)]
#[rtype(result = "Result<Vec<(Flag, Result<Document, ProfileError>)>, StageError>")]
pub struct Load(pub Vec<Flag>);

impl Handler<Load> for ProfileLoader {
    type Result =
        ResponseActFuture<Self, Result<Vec<(Flag, Result<Document, ProfileError>)>, StageError>>;

    fn handle(&mut self, Load(flags): Load, _: &mut Context<Self>) -> Self::Result {
        let redis = self.redis.clone();
        let shared = self.shared.clone();
        guard(Self::NAME, shared.stats.clone(), async move {
            shared.faults.check(Stage::Loader);
            let users: Vec<String> = flags.iter().map(|f| f.user_id.clone()).collect();
            let profiles = shared
                .retry
                .run("load profiles", &shared.cancel, || {
                    redis.load_profiles(&users)
                })
                .await?;
            // Parsing here, not in the Redis client: the client hands back what
            // Redis holds, the loader decides what a profile is.
            Ok(flags
                .into_iter()
                .zip(profiles)
                .map(|(flag, raw)| {
                    let doc = raw.and_then(|r| r.to_document(&redis.keys().profile(&flag.user_id)));
                    (flag, doc)
                })
                .collect())
        })
    }
}
