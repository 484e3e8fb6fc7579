//! Writing windows: newer-wins `update` commands with many statements, cut
//! by count and size, and their replies read statement by statement.

use super::{
    COMMAND_BYTES, Change, CodeClass, DUPLICATE_KEY, MongoError, MongoStore, Op, Outcome,
    STATEMENTS_PER_COMMAND, classify_code, refused_for_its_data,
};
use crate::model::{Section, fields};
use mongodb::bson::{Bson, DateTime, Document, RawArrayBuf, RawDocumentBuf, doc, rawdoc};

impl MongoStore {
    /// Applies changes newer-wins: each statement updates a user's section only
    /// if its stored version is older (or absent), upserting on `userId`. A
    /// duplicate-key error means another statement inserted the document first,
    /// so those statements are tried once more; a second duplicate means stale.
    pub async fn apply(&self, changes: &[Change]) -> Result<Vec<Outcome>, MongoError> {
        let now = DateTime::now();
        let all: Vec<&Change> = changes.iter().collect();
        let mut outcomes = self.update_many(&all, now).await?;
        let retry: Vec<usize> = outcomes
            .iter()
            .enumerate()
            .filter(|(_, o)| matches!(o, Outcome::Stale))
            .map(|(i, _)| i)
            .collect();
        if !retry.is_empty() {
            let again: Vec<&Change> = retry.iter().map(|&i| &changes[i]).collect();
            for (i, o) in retry.into_iter().zip(self.update_many(&again, now).await?) {
                outcomes[i] = o;
            }
        }
        Ok(outcomes)
    }

    /// Writes the changes in `update` commands cut by statement count and
    /// bytes. The statements are built as raw BSON straight into each
    /// command's array: the profile is encoded once, and the size a statement
    /// takes is its length. A change whose profile cannot be encoded (a key
    /// with a NUL byte) is rejected on its own.
    async fn update_many(
        &self,
        changes: &[&Change],
        now: DateTime,
    ) -> Result<Vec<Outcome>, MongoError> {
        let mut outcomes = vec![Outcome::Applied; changes.len()];
        let mut group = Group::default();
        for (i, c) in changes.iter().enumerate() {
            let s = match statement(c, now) {
                Ok(s) => s,
                Err(e) => {
                    outcomes[i] = Outcome::Rejected(e);
                    continue;
                }
            };
            let size = s.as_bytes().len();
            if group.len() == STATEMENTS_PER_COMMAND
                || (group.len() > 0 && group.bytes + size > COMMAND_BYTES)
            {
                self.run_group(std::mem::take(&mut group), changes, now, &mut outcomes)
                    .await?;
            }
            group.push(i, s);
        }
        if group.len() > 0 {
            self.run_group(group, changes, now, &mut outcomes).await?;
        }
        Ok(outcomes)
    }

    /// One `update` command with a group's statements; its outcomes go to
    /// the group's places. A command refused whole for what it carries (a
    /// statement too large for any command) is written again one statement at
    /// a time, so only the bad statements are rejected.
    async fn run_group(
        &self,
        group: Group,
        changes: &[&Change],
        now: DateTime,
        outcomes: &mut [Outcome],
    ) -> Result<(), MongoError> {
        let Group { indexes, array, .. } = group;
        match self.run_update(array, indexes.len()).await {
            Ok(out) => {
                for (i, o) in indexes.into_iter().zip(out) {
                    outcomes[i] = o;
                }
            }
            Err(e) if refused_for_its_data(&e) => {
                tracing::warn!(error = %e, statements = indexes.len(), "bulk update refused; writing its statements one by one");
                for i in indexes {
                    let mut one = RawArrayBuf::new();
                    // It was built once already, so it builds again.
                    one.push(statement(changes[i], now).map_err(MongoError::Reply)?);
                    outcomes[i] = match self.run_update(one, 1).await {
                        Ok(mut o) => o.remove(0),
                        Err(e) if refused_for_its_data(&e) => Outcome::Rejected(e.to_string()),
                        Err(e) => return Err(e),
                    };
                }
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }

    async fn run_update(
        &self,
        statements: RawArrayBuf,
        n: usize,
    ) -> Result<Vec<Outcome>, MongoError> {
        let mut command = RawDocumentBuf::new();
        command.append("update", self.collection.as_str());
        command.append("updates", statements);
        command.append("ordered", false);
        if let Some(wc) = &self.write_concern {
            command.append_ref("writeConcern", wc.as_ref());
        }
        let reply = self.db.run_raw_command(command).await?;
        outcomes_of_reply(&reply, n)
    }
}

/// The statements of one `update` command as they are built: the raw array,
/// the places of their changes, and the bytes so far.
#[derive(Default)]
struct Group {
    indexes: Vec<usize>,
    array: RawArrayBuf,
    bytes: usize,
}

impl Group {
    fn len(&self) -> usize {
        self.indexes.len()
    }

    fn push(&mut self, index: usize, statement: RawDocumentBuf) {
        self.bytes += statement.as_bytes().len();
        self.indexes.push(index);
        self.array.push(statement);
    }
}

/// The outcome of each of the `n` statements of one `update` command, from its
/// reply. A `writeConcernError` fails the whole command: the statements may be
/// rolled back, and counting them applied would raise the applied-version
/// caches and commit offsets past changes that are then lost.
fn outcomes_of_reply(reply: &Document, n: usize) -> Result<Vec<Outcome>, MongoError> {
    let code_of = |d: &Document| match d.get("code") {
        Some(Bson::Int32(c)) => *c,
        Some(Bson::Int64(c)) => *c as i32,
        _ => 0,
    };
    if let Some(wce) = reply.get("writeConcernError") {
        let Some(wce) = wce.as_document() else {
            return Err(MongoError::Reply(format!("writeConcernError {wce}")));
        };
        return Err(MongoError::WriteConcern {
            code: code_of(wce),
            message: wce.get_str("errmsg").unwrap_or("no message").to_string(),
        });
    }
    let mut outcomes = vec![Outcome::Applied; n];
    if let Ok(errors) = reply.get_array("writeErrors") {
        for e in errors {
            let Some(e) = e.as_document() else {
                return Err(MongoError::Reply(format!("writeErrors entry {e}")));
            };
            let index = match e.get("index") {
                Some(Bson::Int32(i)) => *i as usize,
                Some(Bson::Int64(i)) => *i as usize,
                _ => return Err(MongoError::Reply(format!("writeError without index: {e}"))),
            };
            let Some(slot) = outcomes.get_mut(index) else {
                return Err(MongoError::Reply(format!(
                    "writeError index {index} out of range"
                )));
            };
            let code = code_of(e);
            let message = e.get_str("errmsg").unwrap_or("unknown").to_string();
            *slot = if code == DUPLICATE_KEY {
                Outcome::Stale
            } else if classify_code(code) != CodeClass::Data {
                // Not this statement's fault: the whole window is retried
                // (its applied statements are then stale no-ops).
                return Err(MongoError::Transient { code, message });
            } else {
                Outcome::Rejected(message)
            };
        }
    }
    Ok(outcomes)
}

/// The newer-wins statement of one change, as raw BSON; an error names
/// why the profile cannot be encoded.
fn statement(c: &Change, now: DateTime) -> Result<RawDocumentBuf, String> {
    match &c.op {
        Op::Set(profile) => set_statement(c, profile, now),
        Op::Delete => RawDocumentBuf::from_document(&delete_statement(c, now))
            .map_err(|e| format!("delete of user `{}`: {e}", c.user_id)),
    }
}

/// The newer-wins upsert of one section. Bringing a section back also brings
/// a deleted user back: the tombstone marks go. The profile is encoded once,
/// into the statement's `$set`.
fn set_statement(c: &Change, profile: &Document, now: DateTime) -> Result<RawDocumentBuf, String> {
    let (profile_field, version_field) = c.section.mongo_fields();
    let profile = RawDocumentBuf::from_document(profile)
        .map_err(|e| format!("profile of user `{}` cannot be encoded: {e}", c.user_id))?;
    let mut set = RawDocumentBuf::new();
    set.append(profile_field, profile);
    set.append(version_field, c.version);
    set.append(fields::UPDATED_AT, now);
    set.append(fields::LAST_EVENT_ID, c.event_id.as_str());
    let mut filter = RawDocumentBuf::new();
    filter.append(fields::USER_ID, c.user_id.as_str());
    // "Not at least as new": matches an older version and a missing one.
    // (An `$or` of the two is equivalent but defeats the userId index on
    // some servers.)
    filter.append(version_field, rawdoc! { "$not": { "$gte": c.version } });
    Ok(rawdoc! {
        "q": filter,
        "u": {
            "$set": set,
            "$unset": { (fields::DELETED): "", (fields::DELETED_AT): "" },
            "$inc": { (fields::DATA_VERSION): 1i64 },
        },
        "upsert": true,
    })
}

/// A delete at version v, newer-wins per section: it matches only a document
/// with a section older than v (or none: the upsert writes a tombstone, so a
/// late older change cannot create the user). Each section older than v is
/// removed and its version raised to v, so every older change of either
/// section is stale from then on; a section newer than v stays, and with it
/// the user. An aggregation-pipeline update, so the per-section choice is
/// made inside the one statement.
fn delete_statement(c: &Change, now: DateTime) -> Document {
    let v = c.version;
    let older = |version: &str| doc! { "$lt": [{ "$ifNull": [format!("${version}"), 0i64] }, v] };
    let section = |s: Section| {
        let (profile, version) = s.mongo_fields();
        (
            (
                profile,
                doc! { "$cond": [older(version), "$$REMOVE", format!("${profile}")] },
            ),
            (
                version,
                doc! { "$max": [{ "$ifNull": [format!("${version}"), 0i64] }, v] },
            ),
        )
    };
    let ((sp, sp_expr), (sv, sv_expr)) = section(Section::Static);
    let ((dp, dp_expr), (dv, dv_expr)) = section(Section::Dynamic);
    let gone = |f: &str| doc! { "$eq": [{ "$type": format!("${f}") }, "missing"] };
    doc! {
        "q": {
            fields::USER_ID: &c.user_id,
            "$or": [
                { sv: { "$not": { "$gte": v } } },
                { dv: { "$not": { "$gte": v } } },
            ],
        },
        "u": [
            { "$set": {
                sp: sp_expr,
                dp: dp_expr,
                sv: sv_expr,
                dv: dv_expr,
                fields::DELETED_VERSION: v,
                fields::UPDATED_AT: now,
                fields::LAST_EVENT_ID: &c.event_id,
                fields::DATA_VERSION: { "$add": [{ "$ifNull": [format!("${}", fields::DATA_VERSION), 0i64] }, 1i64] },
            } },
            { "$set": { fields::DELETED: { "$and": [gone(sp), gone(dp)] } } },
            { "$set": { fields::DELETED_AT: {
                "$cond": [format!("${}", fields::DELETED), now, "$$REMOVE"]
            } } },
        ],
        "upsert": true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_section_upsert_is_the_newer_wins_statement_field_for_field() {
        let now = DateTime::from_millis(1_700_000_000_000);
        let change = Change {
            user_id: "u1".into(),
            section: Section::Static,
            version: 42,
            op: Op::Set(doc! { "level": 3, "tags": ["a", "b"], "vip": { "since": 2020 } }),
            event_id: "e1".into(),
            marked_at_ms: 0,
        };
        let expected = doc! {
            "q": { "userId": "u1", "staticVersion": { "$not": { "$gte": 42i64 } } },
            "u": {
                "$set": {
                    "staticProfile": { "level": 3, "tags": ["a", "b"], "vip": { "since": 2020 } },
                    "staticVersion": 42i64,
                    "updatedAt": now,
                    "lastEventId": "e1",
                },
                "$unset": { "deleted": "", "deletedAt": "" },
                "$inc": { "dataVersion": 1i64 },
            },
            "upsert": true,
        };
        let built = statement(&change, now).unwrap().to_document().unwrap();
        assert_eq!(built, expected);
    }

    #[test]
    fn a_write_concern_error_fails_the_window_instead_of_counting_as_applied() {
        // The reply a replica set gives when the primary steps down while
        // waiting for `w: majority`: the command is `ok: 1`, with n and
        // nModified counted, and a writeConcernError beside them.
        let reply = doc! {
            "n": 2, "nModified": 2, "ok": 1.0,
            "writeConcernError": {
                "code": 189,
                "codeName": "PrimarySteppedDown",
                "errmsg": "Primary stepped down while waiting for replication",
            },
        };
        let err = outcomes_of_reply(&reply, 2).unwrap_err();
        assert!(
            matches!(&err, MongoError::WriteConcern { code: 189, .. }),
            "{err}"
        );
        assert!(crate::retry::Retryable::is_retryable(&err));
        assert!(err.to_string().contains("Primary stepped down"), "{err}");
    }

    #[test]
    fn codes_are_classified() {
        for transient in [112, 189, 11600, 11602, 10107, 91, 6, 7, 89, 9001, 262] {
            assert_eq!(
                classify_code(transient),
                CodeClass::Transient,
                "{transient}"
            );
        }
        for config in [13, 18] {
            assert_eq!(classify_code(config), CodeClass::Configuration, "{config}");
        }
        for data in [2, 121, 10334, 17419] {
            assert_eq!(classify_code(data), CodeClass::Data, "{data}");
        }
    }

    #[test]
    fn a_write_conflict_retries_the_window_instead_of_dead_lettering() {
        let reply = doc! {
            "n": 1, "ok": 1.0,
            "writeErrors": [{ "index": 1, "code": 112, "errmsg": "WriteConflict" }],
        };
        let err = outcomes_of_reply(&reply, 2).unwrap_err();
        assert!(
            matches!(err, MongoError::Transient { code: 112, .. }),
            "{err}"
        );
        assert!(crate::retry::Retryable::is_retryable(&err));
        let validation = doc! {
            "n": 1, "ok": 1.0,
            "writeErrors": [{ "index": 1, "code": 121, "errmsg": "Document failed validation" }],
        };
        assert_eq!(
            outcomes_of_reply(&validation, 2).unwrap(),
            vec![
                Outcome::Applied,
                Outcome::Rejected("Document failed validation".into())
            ]
        );
    }

    #[test]
    fn write_errors_map_to_outcomes_by_index() {
        let reply = doc! {
            "n": 1, "ok": 1.0,
            "writeErrors": [
                { "index": 0, "code": 11000, "errmsg": "E11000 duplicate key" },
                { "index": 2, "code": 2, "errmsg": "bad value" },
            ],
        };
        assert_eq!(
            outcomes_of_reply(&reply, 3).unwrap(),
            vec![
                Outcome::Stale,
                Outcome::Applied,
                Outcome::Rejected("bad value".into())
            ]
        );
        let out_of_range = doc! { "ok": 1.0, "writeErrors": [{ "index": 5, "code": 2 }] };
        assert!(outcomes_of_reply(&out_of_range, 3).is_err());
    }
}
