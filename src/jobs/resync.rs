//! Full resync / backfill: flag users again so the normal pipeline carries
//! their current Redis profiles to MongoDB (profiles written before datasync
//! ran, a lost collection, a restore).
//!
//! `all` walks every profile key by SCAN cursor (seed 004 §4's keyset
//! pagination, applied to Redis); `user_ids` and `file` walk a list. Each
//! page goes through the marking script, so every user gets a new version
//! from its shard clock: a live change racing with the resync is either
//! older (and superseded by what the resync publishes, which is loaded after
//! the flag) or newer (and wins). The cursor is checkpointed in the job's
//! record after each page, so a killed job resumes where it was; a page
//! flagged twice is harmless.

use super::{JobState, Next, Pacer, Runner, pause, seconds_since};
use crate::{
    clients::redis::{RedisError, RedisStore, ScanCursor},
    telemetry::Stats,
};
use serde::{Deserialize, Serialize};
use std::{path::PathBuf, sync::Arc};
use tokio_util::sync::CancellationToken;

pub const KIND: &str = "resync";

/// What a resync walks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Every profile key in Redis.
    All,
    /// These users.
    UserIds(Vec<String>),
    /// A file of user ids, one per line (blank lines and `#` comments
    /// skipped): the CLI's `--file`.
    File(PathBuf),
}

impl Target {
    /// The target as the operation log's parameter.
    pub fn param(&self) -> serde_json::Value {
        match self {
            Self::All => serde_json::json!("all"),
            Self::UserIds(ids) => {
                serde_json::json!({ "user_ids": crate::operations::ids_param(ids) })
            }
            Self::File(f) => serde_json::json!({ "file": f }),
        }
    }
}

/// A resync's parameters and progress (the job record's body).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Resync {
    pub target: Target,
    /// Users flagged per second at most; `None` = no limit.
    #[serde(default)]
    pub rate: Option<u64>,
    pub force: bool,
    /// Users seen so far (keys scanned, or list entries read).
    pub scanned: u64,
    /// Users flagged so far.
    pub flagged: u64,
    /// Whether the whitelist narrows the walk (`all` and `file`; a list of
    /// user ids is taken as given).
    #[serde(default)]
    pub whitelist: bool,
    /// Users the whitelist left out.
    #[serde(default)]
    pub filtered: u64,
    /// Where to go on: `"<node>:<SCAN cursor>"` for `all`, the next list
    /// index otherwise.
    pub cursor: String,
    /// The users to walk: the list's length, or for `all` the number of keys
    /// Redis held at the start (an upper bound).
    #[serde(default)]
    pub estimated_total: Option<u64>,
    /// Users flagged per second since the job was created.
    #[serde(default)]
    pub rate_per_s: f64,
    /// Seconds left at that rate, from `estimated_total`.
    #[serde(default)]
    pub eta_seconds: Option<f64>,
}

impl Resync {
    pub fn new(target: Target, rate: Option<u64>, force: bool) -> Self {
        let cursor = match target {
            Target::All => ScanCursor::start().to_string(),
            _ => "0".into(),
        };
        Self {
            whitelist: !matches!(target, Target::UserIds(_)),
            target,
            rate,
            force,
            scanned: 0,
            flagged: 0,
            filtered: 0,
            cursor,
            estimated_total: None,
            rate_per_s: 0.0,
            eta_seconds: None,
        }
    }
}

/// Why a page could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ResyncError {
    #[error(transparent)]
    Redis(#[from] RedisError),
    #[error("cannot read {path}: {error}")]
    File { path: String, error: String },
    #[error("bad cursor `{0}` in the job record")]
    Cursor(String),
}

/// The next page: users, and the cursor after them (`None` at the end).
async fn next_page(
    redis: &RedisStore,
    r: &Resync,
    page: usize,
) -> Result<(Vec<String>, Option<String>), ResyncError> {
    let index = || {
        r.cursor
            .parse::<usize>()
            .map_err(|_| ResyncError::Cursor(r.cursor.clone()))
    };
    match &r.target {
        Target::All => {
            let at = ScanCursor::parse(&r.cursor)
                .ok_or_else(|| ResyncError::Cursor(r.cursor.clone()))?;
            let (users, next) = redis.scan_profiles(&at, page as u32).await?;
            Ok((users, next.map(|c| c.to_string())))
        }
        Target::UserIds(ids) => {
            let from = index()?.min(ids.len());
            let to = (from + page).min(ids.len());
            let next = (to < ids.len()).then(|| to.to_string());
            Ok((ids[from..to].to_vec(), next))
        }
        Target::File(path) => {
            let from = index()?;
            let (users, end) = read_ids(path, from, page).map_err(|e| ResyncError::File {
                path: path.display().to_string(),
                error: e.to_string(),
            })?;
            let next = (!end).then(|| (from + page).to_string());
            Ok((users, next))
        }
    }
}

/// Up to `n` ids from line `from` of a file (0-based, counting every line);
/// true when the file ends within them.
fn read_ids(path: &std::path::Path, from: usize, n: usize) -> std::io::Result<(Vec<String>, bool)> {
    use std::io::BufRead;
    let file = std::io::BufReader::new(std::fs::File::open(path)?);
    let mut lines = file.lines().skip(from);
    let mut out = Vec::new();
    for _ in 0..n {
        match lines.next() {
            Some(line) => {
                let line = line?;
                let id = line.trim();
                if !id.is_empty() && !id.starts_with('#') {
                    out.push(id.to_string());
                }
            }
            None => return Ok((out, true)),
        }
    }
    Ok((out, lines.next().is_none()))
}

/// Counts the ids of a file (for the progress estimate).
pub fn count_ids(path: &std::path::Path) -> std::io::Result<u64> {
    use std::io::BufRead;
    let file = std::io::BufReader::new(std::fs::File::open(path)?);
    let mut n = 0;
    for line in file.lines() {
        let line = line?;
        let id = line.trim();
        if !id.is_empty() && !id.starts_with('#') {
            n += 1;
        }
    }
    Ok(n)
}

/// Fills `estimated_total` at the start of a job.
pub async fn estimate(redis: &RedisStore, r: &mut Resync) -> Result<(), ResyncError> {
    r.estimated_total = Some(match &r.target {
        Target::All => redis.key_count().await?,
        Target::UserIds(ids) => ids.len() as u64,
        Target::File(path) => count_ids(path).map_err(|e| ResyncError::File {
            path: path.display().to_string(),
            error: e.to_string(),
        })?,
    });
    Ok(())
}

/// What a resync run needs besides its record.
pub struct Context {
    pub redis: RedisStore,
    pub stats: Option<Arc<Stats>>,
    pub cancel: CancellationToken,
    pub page_size: usize,
    /// The whitelist, for jobs it narrows.
    pub whitelist: Option<Arc<crate::whitelist::Whitelist>>,
}

/// Runs (or resumes) a resync until it is done, cancelled, taken over, or
/// the engine stops (then it stays `running`: its lease expires and it is
/// resumed). `progress` sees the record after every page.
pub async fn run(
    mut runner: Runner<Resync>,
    cx: Context,
    mut progress: impl FnMut(&Resync),
) -> Option<super::Job<Resync>> {
    let rate = runner.job.body.rate.unwrap_or(0);
    // A page takes about a second at low rates, so the lease is renewed.
    let page = match rate {
        0 => cx.page_size,
        r => cx.page_size.min(r as usize).max(1),
    };
    let pacer = Pacer::new(rate);
    let flagged_at_start = runner.job.body.flagged;
    loop {
        if cx.cancel.is_cancelled() {
            return None;
        }
        let (mut users, next) = match next_page(&cx.redis, &runner.job.body, page).await {
            Ok(p) => p,
            Err(e @ ResyncError::Redis(_)) => {
                tracing::warn!(id = %runner.job.id, error = %e, "resync page failed; retrying");
                if !pause(&cx.cancel, std::time::Duration::from_secs(1)).await {
                    return None;
                }
                continue;
            }
            Err(e) => return finish(runner, JobState::Failed, Some(e.to_string())).await,
        };
        let r = &mut runner.job.body;
        let seen = users.len() as u64;
        r.scanned += seen;
        if r.whitelist
            && let Some(w) = &cx.whitelist
        {
            users.retain(|u| w.allows(u));
            r.filtered += seen - users.len() as u64;
        }
        if !users.is_empty() {
            match cx.redis.mark(&users).await {
                Ok(marked) => {
                    r.flagged += marked.len() as u64;
                    if let Some(s) = &cx.stats {
                        s.resync_flagged(marked.len() as u64);
                        s.flags_marked(marked.len() as u64);
                    }
                }
                Err(e) => {
                    // The page is read again from the same cursor.
                    r.scanned -= seen;
                    r.filtered -= seen - users.len() as u64;
                    tracing::warn!(id = %runner.job.id, error = %e, "resync cannot flag a page; retrying");
                    if !pause(&cx.cancel, std::time::Duration::from_secs(1)).await {
                        return None;
                    }
                    continue;
                }
            }
        }
        let done = next.is_none();
        if let Some(c) = next {
            r.cursor = c;
        }
        let elapsed = seconds_since(&runner.job.created_at).max(0.001);
        r.rate_per_s = r.flagged as f64 / elapsed;
        r.eta_seconds = match (r.estimated_total, done) {
            (_, true) => Some(0.0),
            (Some(total), false) if r.rate_per_s > 0.0 => {
                Some(total.saturating_sub(r.scanned) as f64 / r.rate_per_s)
            }
            _ => None,
        };
        progress(r);
        if done {
            return finish(runner, JobState::Done, None).await;
        }
        match runner.checkpoint().await {
            Next::GoOn => {}
            Next::Cancel => return finish(runner, JobState::Cancelled, None).await,
            Next::Stop => return None,
        }
        let wait = pacer.wait_for(runner.job.body.flagged - flagged_at_start);
        if !pause(&cx.cancel, wait).await {
            return None;
        }
    }
}

async fn finish(
    runner: Runner<Resync>,
    state: JobState,
    error: Option<String>,
) -> Option<super::Job<Resync>> {
    let id = runner.job.id.clone();
    match runner.finish(state, error).await {
        Ok(job) => {
            tracing::info!(%id, state = ?job.state, scanned = job.body.scanned, flagged = job.body.flagged, "resync finished");
            Some(job)
        }
        Err(e) => {
            tracing::warn!(%id, error = %e, "cannot record the end of a resync");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_read_in_pages_by_line() {
        let dir = std::env::temp_dir().join(format!("resync-{}", uuid::Uuid::new_v4()));
        std::fs::write(&dir, "a\n\n# comment\nb\nc\n").unwrap();
        assert_eq!(
            read_ids(&dir, 0, 2).unwrap(),
            (vec!["a".to_string()], false)
        );
        assert_eq!(
            read_ids(&dir, 2, 2).unwrap(),
            (vec!["b".to_string()], false)
        );
        assert_eq!(read_ids(&dir, 4, 2).unwrap(), (vec!["c".to_string()], true));
        assert_eq!(count_ids(&dir).unwrap(), 3);
        std::fs::remove_file(&dir).unwrap();
    }

    #[test]
    fn records_name_the_target() {
        let r = Resync::new(Target::All, Some(10), false);
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["target"], "all");
        assert_eq!(v["cursor"], "0:0");
        let r = Resync::new(Target::UserIds(vec!["u".into()]), None, false);
        assert_eq!(
            serde_json::to_value(&r).unwrap()["target"]["user_ids"][0],
            "u"
        );
    }
}
