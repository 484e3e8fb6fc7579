//! ProfileLoader: reads the profiles of a page of flags from Redis, pipelined.

use super::Flag;
use crate::clients::redis::{ProfileError, RedisError, RedisStore};
use actix::prelude::*;
use mongodb::bson::Document;

pub struct ProfileLoader {
    redis: RedisStore,
}

impl ProfileLoader {
    pub fn new(redis: RedisStore) -> Self {
        Self { redis }
    }
}

impl Actor for ProfileLoader {
    type Context = Context<Self>;
}

impl Supervised for ProfileLoader {}

/// Loads one profile per flag. Per-user problems come back per user; a Redis
/// failure fails the whole page.
#[derive(Message)]
#[rtype(result = "Result<Vec<(Flag, Result<Document, ProfileError>)>, RedisError>")]
pub struct Load(pub Vec<Flag>);

impl Handler<Load> for ProfileLoader {
    type Result = ResponseFuture<Result<Vec<(Flag, Result<Document, ProfileError>)>, RedisError>>;

    fn handle(&mut self, Load(flags): Load, _: &mut Context<Self>) -> Self::Result {
        let redis = self.redis.clone();
        Box::pin(async move {
            let users: Vec<String> = flags.iter().map(|f| f.user_id.clone()).collect();
            let profiles = redis.load_profiles(&users).await?;
            Ok(flags.into_iter().zip(profiles).collect())
        })
    }
}
