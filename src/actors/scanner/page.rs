//! One page of one shard's flags: load → publish deletes → resolve → publish
//! changes → compare-and-clear.
//!
//! A flag is either a change (its profile is loaded and published on the
//! dynamic topic) or a delete (recorded beside the flag by the delete script;
//! a delete event is published at its version). A user deleted and then
//! flagged again before the scan has both: the delete is published first,
//! and the change only if the delete went out, so the flag is never cleared
//! with a delete unpublished. Both events carry their own versions, and the
//! applier's per-section rules make them commute.

use super::{CycleReport, Pipeline};
use crate::{
    actors::{
        Flag, StageError, ask,
        dlq::{DlqActor, Record},
        loader::{Load, Loaded, ProfileLoader},
        publisher::{KafkaPublisher, Outgoing, Publish, PublishFailure},
        resolver::{Resolve, VersionResolver},
    },
    config::MissingProfile,
    faults::Stage,
    lease::Ticket,
    model::{DeadLetter, DlqStage, ProfileError, Section, now_ms},
    proto::{JsonProfile, SyncType, UserProfileSyncEvent},
};
use prost::Message as _;
use std::collections::HashSet;

/// A delete to publish for one flag.
struct PendingDelete {
    flag: Flag,
    /// The delete's version: the flag's own, or an older recorded delete.
    version: i64,
    /// Recorded in the shard's deleted hash (cleared once published); a
    /// missing profile turned into a delete is not.
    recorded: bool,
}

/// What a page sorted its flags into.
#[derive(Default)]
struct Sorted {
    deletes: Vec<PendingDelete>,
    changes: Vec<(Flag, JsonProfile)>,
    dead: Vec<DeadLetter>,
}

/// Load → resolve → publish → compare-and-clear, for one page of one shard.
/// Users that fail for good go to the dead-letter queue; their flags stay.
pub async fn process_page(
    p: &Pipeline,
    ticket: &Ticket,
    flags: Vec<Flag>,
) -> Result<CycleReport, StageError> {
    let shard = ticket.shard;
    let stats = &p.shared.stats;
    let mut report = CycleReport {
        scanned: flags.len() as u64,
        ..Default::default()
    };
    stats.flags_scanned(report.scanned);
    // The page's versions, oldest first: the clear removes runs of them.
    let read: Vec<i64> = flags.iter().map(|f| f.version).collect();

    let loaded = ask(ProfileLoader::NAME, &p.loader, Load(flags)).await?;
    // A page loaded and not yet published: where an injected panic hurts most.
    p.shared.faults.check(Stage::Scanner);
    let Sorted {
        deletes,
        mut changes,
        mut dead,
    } = sort(p, loaded, &mut report);

    let mut to_clear = Vec::with_capacity(changes.len() + deletes.len());
    let mut deletes_done = Vec::new();
    if !deletes.is_empty() {
        let blocked = publish_deletes(
            p,
            ticket,
            deletes,
            &mut report,
            &mut to_clear,
            &mut deletes_done,
            &mut dead,
        )
        .await?;
        changes.retain(|(f, _)| !blocked.contains(&f.user_id));
    }
    if !changes.is_empty() {
        publish_changes(p, ticket, changes, &mut report, &mut to_clear, &mut dead).await?;
    }

    if !dead.is_empty() {
        // Best effort: if even this fails, the flags still stay and the next
        // cycle records the dead letters again.
        match ask(DlqActor::NAME, &p.dlq, Record(dead)).await {
            Ok(r) => report.dead_lettered = r.recorded,
            Err(e) => tracing::warn!(shard, error = %e, "cannot record dead letters"),
        }
    }

    let shared = &p.shared;
    let fence = ticket.fence.as_deref();
    let cleared = shared
        .retry
        .run("clear flags", &shared.cancel, || {
            p.redis.clear_page(shard, &read, &to_clear, fence)
        })
        .await?;
    report.cleared = cleared;
    stats.flags_cleared(cleared);
    // After the flags: a recorded delete outliving its flag is published
    // again with the user's next flag (a no-op in MongoDB), while a flag
    // outliving its recorded delete would load a profile that is gone.
    if !deletes_done.is_empty() {
        shared
            .retry
            .run("clear recorded deletes", &shared.cancel, || {
                p.redis.clear_deletes(shard, &deletes_done, fence)
            })
            .await?;
    }
    Ok(report)
}

/// Sorts loaded flags into deletes, changes and dead letters.
fn sort(p: &Pipeline, loaded: Vec<Loaded>, report: &mut CycleReport) -> Sorted {
    let stats = &p.shared.stats;
    let mut out = Sorted::default();
    for Loaded {
        flag,
        delete,
        profile,
    } in loaded
    {
        if let Some(version) = delete {
            out.deletes.push(PendingDelete {
                flag: flag.clone(),
                version,
                recorded: true,
            });
        }
        match profile {
            // The flag is the delete itself.
            None => {}
            Some(Ok(doc)) => out.changes.push((flag, doc)),
            Some(Err(ProfileError::Missing { .. }))
                if p.sync.missing_profile == MissingProfile::Delete =>
            {
                out.deletes.push(PendingDelete {
                    version: flag.version,
                    flag,
                    recorded: false,
                });
            }
            Some(Err(e)) => {
                report.failed += 1;
                stats.load_failed(load_reason(&e), &e);
                out.dead.push(load_dead_letter(p, flag, &e));
            }
        }
    }
    out
}

/// Publishes a page's deletes. Returns the users whose delete did not go
/// out: their changes wait with their flags for the next cycle.
async fn publish_deletes(
    p: &Pipeline,
    ticket: &Ticket,
    deletes: Vec<PendingDelete>,
    report: &mut CycleReport,
    to_clear: &mut Vec<(String, i64)>,
    done: &mut Vec<(String, i64)>,
    dead: &mut Vec<DeadLetter>,
) -> Result<HashSet<String>, StageError> {
    let items = deletes
        .iter()
        .map(|d| Outgoing {
            user_id: d.flag.user_id.clone(),
            version: d.version,
            profile: JsonProfile::new(),
            base_version: 0,
            lease_epoch: ticket.epoch,
        })
        .collect();
    let publish = Publish {
        sync_type: SyncType::UserDelete,
        items,
    };
    let results = ask(KafkaPublisher::NAME, &p.publisher, publish).await?;
    let mut blocked = HashSet::new();
    for (d, r) in deletes.into_iter().zip(results) {
        match r {
            Ok(_) => {
                report.published += 1;
                report.deleted += 1;
                if d.recorded {
                    done.push((d.flag.user_id.clone(), d.version));
                }
                if d.version == d.flag.version {
                    to_clear.push((d.flag.user_id, d.flag.version));
                }
            }
            Err(f) => {
                report.failed += 1;
                blocked.insert(d.flag.user_id.clone());
                let flag = Flag {
                    user_id: d.flag.user_id,
                    version: d.version,
                };
                let mut letter = publish_dead_letter(p, flag, f);
                letter.delete = true;
                dead.push(letter);
            }
        }
    }
    Ok(blocked)
}

/// Publishes a page's changes, skipping those MongoDB already has.
async fn publish_changes(
    p: &Pipeline,
    ticket: &Ticket,
    ready: Vec<(Flag, JsonProfile)>,
    report: &mut CycleReport,
    to_clear: &mut Vec<(String, i64)>,
    dead: &mut Vec<DeadLetter>,
) -> Result<(), StageError> {
    let stats = &p.shared.stats;
    let users = ready.iter().map(|(f, _)| f.user_id.clone()).collect();
    let applied = ask(
        VersionResolver::NAME,
        &p.resolver,
        Resolve {
            users,
            section: Section::Dynamic,
        },
    )
    .await?;

    let mut items = Vec::with_capacity(ready.len());
    let mut flags = Vec::with_capacity(ready.len());
    let mut already = 0;
    for (flag, profile) in ready {
        let base = applied.get(&flag.user_id).copied().unwrap_or(0);
        if base >= flag.version {
            // Already in MongoDB (e.g. published before a crash, flag not cleared).
            to_clear.push((flag.user_id, flag.version));
            already += 1;
        } else {
            items.push(Outgoing {
                user_id: flag.user_id.clone(),
                version: flag.version,
                profile,
                base_version: base,
                lease_epoch: ticket.epoch,
            });
            flags.push(flag);
        }
    }
    report.already_applied += already;
    stats.already_applied(already);
    if items.is_empty() {
        return Ok(());
    }
    let publish = Publish {
        sync_type: SyncType::DynamicBatch,
        items,
    };
    let results = ask(KafkaPublisher::NAME, &p.publisher, publish).await?;
    for (flag, r) in flags.into_iter().zip(results) {
        match r {
            Ok(_) => {
                report.published += 1;
                to_clear.push((flag.user_id, flag.version));
            }
            Err(f) => {
                report.failed += 1;
                dead.push(publish_dead_letter(p, flag, f));
            }
        }
    }
    Ok(())
}

fn load_reason(e: &ProfileError) -> &'static str {
    match e {
        ProfileError::Missing { .. } => "missing",
        ProfileError::BadJson { .. } => "bad_json",
        ProfileError::NotAnObject { .. } => "not_an_object",
        ProfileError::WrongType { .. } => "wrong_type",
    }
}

/// The event a flag would have produced, without data: what a dead letter of
/// an unloadable profile carries.
fn bare_event(p: &Pipeline, flag: &Flag) -> Vec<u8> {
    UserProfileSyncEvent {
        user_id: flag.user_id.clone(),
        sync_type: SyncType::DynamicBatch as i32,
        version: flag.version,
        timestamp: now_ms(),
        marked_at_ms: flag.version / 1000,
        source_instance: p.shared.instance_id.clone(),
        ..Default::default()
    }
    .encode_to_vec()
}

fn load_dead_letter(p: &Pipeline, flag: Flag, e: &ProfileError) -> DeadLetter {
    DeadLetter {
        original_event: bare_event(p, &flag),
        error: e.to_string(),
        detail: format!(
            "stage load: {e:?}; version {}; permanent, not retried; the flag stays until the profile is fixed and the user re-flagged or redriven, or the user is deleted (POST /v1/sync/delete, or sync.missing_profile = \"delete\")",
            flag.version
        ),
        user_id: flag.user_id,
        version: flag.version,
        stage: DlqStage::Load,
        section: Section::Dynamic,
        delete: false,
        retry_count: 0,
        topic: p.dynamic_topic.clone(),
        partition: None,
        offset: None,
        sink: None,
    }
}

fn publish_dead_letter(p: &Pipeline, flag: Flag, f: PublishFailure) -> DeadLetter {
    DeadLetter {
        original_event: if f.event.is_empty() {
            bare_event(p, &flag)
        } else {
            f.event
        },
        error: f.error.to_string(),
        detail: format!(
            "stage publish: {:?}; version {}; {} retries; the flag stays for the next cycle",
            f.error, flag.version, f.retries
        ),
        user_id: flag.user_id,
        version: flag.version,
        stage: DlqStage::Publish,
        section: Section::Dynamic,
        delete: false,
        retry_count: f.retries,
        topic: p.dynamic_topic.clone(),
        partition: None,
        offset: None,
        sink: None,
    }
}
