//! Dirty flags: marking (a version per user from the shard's clock), reading a
//! shard's flags oldest-first, and clearing them by compare-and-delete.

use super::{Delivery, RedisError, RedisStore, lua_script};
use crate::shard::shard_of;
use fred::{prelude::*, types::scripts::Script};
use std::sync::LazyLock;

static MARK: LazyLock<Script> = lua_script!("mark.lua", "clock.lua");
static CLEAR: LazyLock<Script> = lua_script!("clear_flags.lua", "close_dead_letter.lua");
static CLEAR_RANGES: LazyLock<Script> = lua_script!("clear_flag_ranges.lua");
static SHARDS_WITH_WORK: LazyLock<Script> = lua_script!("shards_with_work.lua");

/// One stretch of a page, consecutive in score order, whose every flag is
/// to be cleared: its lowest and highest version and how many flags it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub from: i64,
    pub to: i64,
    pub flags: usize,
}

/// The runs of `page` (the versions of a page of one shard's flags, as read:
/// oldest first) made of flags in `cleared`. `None` when the runs cannot
/// stand for the flags: the page's versions are not strictly increasing (so
/// a version would not name one flag), or a cleared flag is not on the page.
pub fn page_runs(page: &[i64], cleared: &[(String, i64)]) -> Option<Vec<Run>> {
    if page.windows(2).any(|w| w[0] >= w[1]) {
        return None;
    }
    let wanted: foldhash::HashSet<i64> = cleared.iter().map(|(_, v)| *v).collect();
    if wanted.len() != cleared.len() {
        return None;
    }
    let mut runs = Vec::new();
    let mut current: Option<Run> = None;
    let mut found = 0;
    for &v in page {
        if wanted.contains(&v) {
            found += 1;
            match &mut current {
                Some(r) => {
                    r.to = v;
                    r.flags += 1;
                }
                None => {
                    current = Some(Run {
                        from: v,
                        to: v,
                        flags: 1,
                    })
                }
            }
        } else if let Some(r) = current.take() {
            runs.push(r);
        }
    }
    runs.extend(current);
    (found == cleared.len()).then_some(runs)
}

impl RedisStore {
    /// Flags users dirty, allocating a version for each; one script per shard,
    /// all shards at once. Returns `(user, version)` in input order.
    pub async fn mark(&self, users: &[String]) -> Result<Vec<(String, i64)>, RedisError> {
        let ids: Vec<&str> = users.iter().map(String::as_str).collect();
        let versions = self
            .allocate_versions(
                Delivery::Queued,
                &MARK,
                &ids,
                |shard| vec![self.keys.dirty(shard)],
                |i| vec![users[i].clone()],
            )
            .await?;
        Ok(users.iter().cloned().zip(versions).collect())
    }

    /// The oldest flags of a shard with a version above `after`.
    pub async fn read_flags(
        &self,
        shard: u32,
        after: Option<i64>,
        limit: usize,
    ) -> Result<Vec<(String, i64)>, RedisError> {
        let min = match after {
            Some(v) => format!("({v}"),
            None => "-inf".to_string(),
        };
        let raw: Vec<(String, f64)> = self
            .client()
            .zrangebyscore(
                self.keys.dirty(shard),
                min.as_str(),
                "+inf",
                true,
                Some((0, limit as i64)),
            )
            .await?;
        Ok(raw.into_iter().map(|(u, s)| (u, s as i64)).collect())
    }

    /// How many flags the given shards hold, in one pipeline.
    pub async fn count_flags(
        &self,
        shards: impl IntoIterator<Item = u32>,
    ) -> Result<u64, RedisError> {
        Ok(self.flag_counts(shards).await?.into_iter().sum())
    }

    /// How many flags each of the given shards holds, in order; one pipeline.
    pub async fn flag_counts(
        &self,
        shards: impl IntoIterator<Item = u32>,
    ) -> Result<Vec<u64>, RedisError> {
        let pipe = self.client().pipeline();
        for shard in shards {
            let _: () = pipe.zcard(self.keys.dirty(shard)).await?;
        }
        Ok(pipe.all().await?)
    }

    /// Which of `shards` hold anything for the scan, in order: a flag, or an
    /// accepted immediate change not yet settled (acknowledged or not). One
    /// script call on a single Redis, one a shard on a cluster
    /// (`scripts/shards_with_work.lua`): pipelined commands would cost a
    /// socket write each, which is what made an idle cycle expensive.
    pub async fn shards_with_work(&self, shards: &[u32]) -> Result<Vec<bool>, RedisError> {
        let groups = self.slot_groups(
            shards
                .iter()
                .map(|&s| vec![self.keys.dirty(s), self.keys.static_pending(s)]),
        );
        let calls = groups.into_iter().map(|keys| async move {
            let c: Vec<i64> = SHARDS_WITH_WORK
                .evalsha_with_reload(self.client(), keys, Vec::<String>::new())
                .await?;
            Ok::<_, RedisError>(c)
        });
        let counts: Vec<i64> = futures::future::try_join_all(calls)
            .await?
            .into_iter()
            .flatten()
            .collect();
        if counts.len() != shards.len() {
            return Err(RedisError::Reply {
                what: "shards with work",
                reply: format!("{} counts for {} shards", counts.len(), shards.len()),
            });
        }
        Ok(counts.into_iter().map(|n| n > 0).collect())
    }

    /// Compare-and-delete of a shard's flags. Returns how many were removed.
    /// With a `fence` (the lease value the caller holds), nothing is removed
    /// unless the caller still holds the shard's lease.
    pub async fn clear_flags(
        &self,
        shard: u32,
        flags: &[(String, i64)],
        fence: Option<&str>,
    ) -> Result<u64, RedisError> {
        if flags.is_empty() {
            return Ok(0);
        }
        let mut args = Vec::with_capacity(flags.len() * 2 + 1);
        args.push(fence.unwrap_or_default().to_string());
        for (u, v) in flags {
            args.push(u.clone());
            args.push(v.to_string());
        }
        let n = self.run_clear(&CLEAR, shard, args).await?;
        if n < 0 {
            return Err(RedisError::Fenced { shard });
        }
        Ok(n as u64)
    }

    /// Runs a clear script over a shard's flags, dead letters and lease.
    async fn run_clear(
        &self,
        script: &Script,
        shard: u32,
        args: Vec<String>,
    ) -> Result<i64, RedisError> {
        Ok(script
            .evalsha_with_reload(
                self.client(),
                vec![
                    self.keys.dirty(shard),
                    self.keys.dlq(shard),
                    self.keys.lease(shard),
                ],
                args,
            )
            .await?)
    }

    /// Clears the published flags of one page: `page` holds the versions of
    /// every flag the page read (oldest first), `flags` those to clear. The
    /// flags of each run of consecutive cleared flags are removed by score
    /// range ([`page_runs`], `scripts/clear_flag_ranges.lua`): on a page
    /// whose flags all went out that is one range, instead of a score read,
    /// a compare and a removal per flag. Where the ranges do not apply (the
    /// shard has dead letters to close, or a range holds a member the page
    /// did not read) it is [`clear_flags`](Self::clear_flags), member by
    /// member. Returns how many flags were removed; fenced like `clear_flags`.
    pub async fn clear_page(
        &self,
        shard: u32,
        page: &[i64],
        flags: &[(String, i64)],
        fence: Option<&str>,
    ) -> Result<u64, RedisError> {
        if flags.is_empty() {
            return Ok(0);
        }
        if let Some(runs) = page_runs(page, flags) {
            let mut args = Vec::with_capacity(runs.len() * 3 + 1);
            args.push(fence.unwrap_or_default().to_string());
            for r in &runs {
                args.extend([r.from.to_string(), r.to.to_string(), r.flags.to_string()]);
            }
            let n = self.run_clear(&CLEAR_RANGES, shard, args).await?;
            match n {
                -1 => return Err(RedisError::Fenced { shard }),
                -2 => {}
                n => return Ok(n as u64),
            }
        }
        self.clear_flags(shard, flags, fence).await
    }

    /// The flag versions of users (any shards), pipelined; `None` where a
    /// user is not flagged.
    pub async fn flags_of(&self, users: &[String]) -> Result<Vec<Option<i64>>, RedisError> {
        if users.is_empty() {
            return Ok(vec![]);
        }
        let pipe = self.client().pipeline();
        for u in users {
            let _: () = pipe
                .zscore(self.keys.dirty(shard_of(u, self.shards)), u.as_str())
                .await?;
        }
        let v: Vec<Option<f64>> = pipe.all().await?;
        Ok(v.into_iter().map(|v| v.map(|v| v as i64)).collect())
    }

    /// Flags of one shard older than `before` (a version): how many, and the
    /// oldest `limit` users.
    pub async fn flags_before(
        &self,
        shard: u32,
        before: i64,
        limit: usize,
    ) -> Result<(u64, Vec<String>), RedisError> {
        let key = self.keys.dirty(shard);
        let max = format!("({before}");
        let n: u64 = self
            .client()
            .zcount(&key, f64::NEG_INFINITY, before as f64 - 1.0)
            .await?;
        let users: Vec<String> = self
            .client()
            .zrangebyscore(&key, "-inf", max.as_str(), false, Some((0, limit as i64)))
            .await?;
        Ok((n, users))
    }

    /// The flag version of a user, if it is flagged.
    pub async fn flag_of(&self, user: &str) -> Result<Option<i64>, RedisError> {
        let shard = shard_of(user, self.shards);
        let v: Option<f64> = self.client().zscore(self.keys.dirty(shard), user).await?;
        Ok(v.map(|v| v as i64))
    }
}

#[cfg(test)]
mod tests {
    use super::{Run, page_runs};

    fn cleared(vs: &[i64]) -> Vec<(String, i64)> {
        vs.iter().map(|v| (format!("u{v}"), *v)).collect()
    }

    #[test]
    fn a_page_cleared_whole_is_one_run() {
        let runs = page_runs(&[3, 5, 9], &cleared(&[9, 3, 5])).unwrap();
        assert_eq!(
            runs,
            vec![Run {
                from: 3,
                to: 9,
                flags: 3
            }]
        );
    }

    #[test]
    fn a_flag_left_on_the_page_splits_the_runs_around_it() {
        let runs = page_runs(&[1, 2, 3, 4, 5, 6], &cleared(&[1, 2, 4, 6])).unwrap();
        assert_eq!(
            runs,
            vec![
                Run {
                    from: 1,
                    to: 2,
                    flags: 2
                },
                Run {
                    from: 4,
                    to: 4,
                    flags: 1
                },
                Run {
                    from: 6,
                    to: 6,
                    flags: 1
                },
            ]
        );
        assert_eq!(page_runs(&[1, 2], &[]).unwrap(), vec![]);
    }

    #[test]
    fn no_runs_when_a_version_would_not_name_one_flag() {
        // Two flags of the page at one version, a flag not on the page, and
        // one flag given twice: each is cleared member by member instead.
        assert_eq!(page_runs(&[1, 2, 2, 3], &cleared(&[1])), None);
        assert_eq!(page_runs(&[3, 1], &cleared(&[1])), None);
        assert_eq!(page_runs(&[1, 2], &cleared(&[7])), None);
        assert_eq!(page_runs(&[1, 2], &cleared(&[1, 1])), None);
    }
}
