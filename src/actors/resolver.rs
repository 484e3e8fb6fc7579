//! VersionResolver: the last applied version per user, through the L1 → L2 →
//! MongoDB cache.

use crate::{
    cache::{AppliedCache, CacheError},
    clients::redis::Section,
};
use actix::prelude::*;
use std::collections::HashMap;

pub struct VersionResolver {
    cache: AppliedCache,
}

impl VersionResolver {
    pub fn new(cache: AppliedCache) -> Self {
        Self { cache }
    }
}

impl Actor for VersionResolver {
    type Context = Context<Self>;
}

impl Supervised for VersionResolver {}

/// The applied version of `section` for each user (0 = never applied).
#[derive(Message)]
#[rtype(result = "Result<HashMap<String, i64>, CacheError>")]
pub struct Resolve {
    pub users: Vec<String>,
    pub section: Section,
}

impl Handler<Resolve> for VersionResolver {
    type Result = ResponseFuture<Result<HashMap<String, i64>, CacheError>>;

    fn handle(&mut self, msg: Resolve, _: &mut Context<Self>) -> Self::Result {
        let cache = self.cache.clone();
        Box::pin(async move { cache.resolve(&msg.users, msg.section).await })
    }
}
