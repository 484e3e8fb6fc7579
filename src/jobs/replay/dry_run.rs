//! A dry run: what a window would do, by MongoDB's newer-wins rules,
//! without writing.

use crate::{
    clients::mongo::{Change, MongoError, MongoStore, Op, Outcome},
    model::Section,
};
use std::collections::{HashMap, HashSet};

/// What a write of `changes` would do, by MongoDB's newer-wins rules, from
/// the stored versions and those earlier windows of the dry run would have
/// written (`overlay`, updated).
pub(super) async fn predict(
    target: &MongoStore,
    changes: &[Change],
    overlay: &mut HashMap<String, (i64, i64)>,
) -> Result<Vec<Outcome>, MongoError> {
    let missing: Vec<&str> = changes
        .iter()
        .map(|c| c.user_id.as_str())
        .filter(|u| !overlay.contains_key(*u))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    if !missing.is_empty() {
        let stored = target.versions(&missing).await?;
        for u in missing {
            overlay.insert(u.to_string(), stored.get(u).copied().unwrap_or((0, 0)));
        }
    }
    Ok(changes
        .iter()
        .map(|c| {
            let v = overlay.get_mut(&c.user_id).expect("filled above");
            if would_apply(v, c) {
                Outcome::Applied
            } else {
                Outcome::Stale
            }
        })
        .collect())
}

/// Whether `c` changes a document whose versions are `(static, dynamic)`,
/// and the versions after it: a section change applies over an older
/// section; a delete over any older section, raising both.
fn would_apply(v: &mut (i64, i64), c: &Change) -> bool {
    match (&c.op, c.section) {
        (Op::Set(_), Section::Static) if v.0 < c.version => v.0 = c.version,
        (Op::Set(_), Section::Dynamic) if v.1 < c.version => v.1 = c.version,
        (Op::Delete, _) if v.0 < c.version || v.1 < c.version => {
            *v = (v.0.max(c.version), v.1.max(c.version));
        }
        _ => return false,
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::doc;

    fn change(section: Section, version: i64, op: Op) -> Change {
        Change {
            user_id: "u".into(),
            section,
            version,
            op,
            event_id: String::new(),
            marked_at_ms: 0,
        }
    }

    #[test]
    fn predictions_follow_the_newer_wins_rules() {
        let set = || Op::Set(doc! {});
        let mut v = (0, 0);
        assert!(would_apply(&mut v, &change(Section::Dynamic, 5, set())));
        assert!(!would_apply(&mut v, &change(Section::Dynamic, 5, set())));
        assert!(would_apply(&mut v, &change(Section::Static, 3, set())));
        assert_eq!(v, (3, 5));
        // A delete at 4 beats the static section only, and raises it.
        assert!(would_apply(
            &mut v,
            &change(Section::Dynamic, 4, Op::Delete)
        ));
        assert_eq!(v, (4, 5));
        assert!(!would_apply(&mut v, &change(Section::Static, 4, set())));
        assert!(!would_apply(
            &mut v,
            &change(Section::Dynamic, 4, Op::Delete)
        ));
        assert!(would_apply(
            &mut v,
            &change(Section::Dynamic, 5, Op::Delete)
        ));
        assert_eq!(v, (5, 5));
    }
}
