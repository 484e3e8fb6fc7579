//! VersionResolver: the last applied version per user, through the L1 → L2 →
//! MongoDB cache.

use super::{Shared, StageError, guard, restart_pause};
use crate::{cache::AppliedCache, faults::Stage, model::Section};
use actix::prelude::*;
use foldhash::HashMap;

pub struct VersionResolver {
    cache: AppliedCache,
    shared: Shared,
    restarts: u32,
}

impl VersionResolver {
    pub const NAME: &'static str = "VersionResolver";

    pub fn new(cache: AppliedCache, shared: Shared) -> Self {
        Self {
            cache,
            shared,
            restarts: 0,
        }
    }
}

impl Actor for VersionResolver {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        restart_pause(self.restarts, ctx);
    }
}

impl Supervised for VersionResolver {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.restarts += 1;
    }
}

/// The applied version of `section` for each user (0 = never applied).
#[derive(Message)]
#[rtype(result = "Result<HashMap<String, i64>, StageError>")]
pub struct Resolve {
    pub users: Vec<String>,
    pub section: Section,
}

impl Handler<Resolve> for VersionResolver {
    type Result = ResponseActFuture<Self, Result<HashMap<String, i64>, StageError>>;

    fn handle(&mut self, msg: Resolve, _: &mut Context<Self>) -> Self::Result {
        let cache = self.cache.clone();
        let shared = self.shared.clone();
        guard(Self::NAME, shared.stats.clone(), async move {
            shared.faults.check(Stage::Resolver);
            Ok(shared
                .retry
                .run("resolve applied versions", &shared.cancel, || {
                    cache.resolve(&msg.users, msg.section)
                })
                .await?)
        })
    }
}
