//! Shard hashing and the names of every Redis key datasync touches.
//!
//! `shard = crc32(utf8(user_id)) % shards`, with the IEEE CRC-32 (the one of zlib,
//! PNG and Ethernet), so any language can compute it. Test vectors:
//! `crc32("123456789") = 0xCBF43926`, so with 64 shards that id lands in shard 38;
//! `crc32("user-1") = 0x7E264614` → shard 20.
//!
//! Every per-shard key carries the shard as a Redis Cluster hash tag (`{7}`), so
//! a shard's flags, clock and applied-version cache live in one slot and every
//! script stays single-slot.

/// The virtual shard of a user.
pub fn shard_of(user_id: &str, shards: u32) -> u32 {
    crc32fast::hash(user_id.as_bytes()) % shards
}

/// Key names, built from the configured prefix and templates.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    profile_template: String,
    /// The profile template around its first `{id}`, split once here: a
    /// profile key is built for every flag of every page.
    profile_head: String,
    profile_tail: String,
    legacy_set: String,
}

impl Keys {
    pub fn new(prefix: &str, profile_template: &str, legacy_set: &str) -> Self {
        let (head, tail) = profile_template
            .split_once("{id}")
            .unwrap_or((profile_template, ""));
        Self {
            prefix: prefix.to_string(),
            profile_template: profile_template.to_string(),
            profile_head: head.to_string(),
            profile_tail: tail.to_string(),
            legacy_set: legacy_set.to_string(),
        }
    }

    pub fn from_config(c: &crate::config::RedisConfig) -> Self {
        Self::new(&c.key_prefix, &c.profile_key, &c.legacy_dirty_set)
    }

    /// Sorted set of a shard's dirty flags: member = user id, score = version.
    pub fn dirty(&self, shard: u32) -> String {
        format!("{}:dirty:{{{shard}}}", self.prefix)
    }

    /// A shard's hybrid logical clock (the last version allocated).
    pub fn clock(&self, shard: u32) -> String {
        format!("{}:clock:{{{shard}}}", self.prefix)
    }

    /// Hash of the last applied version per `user|section` (the L2 cache).
    pub fn applied(&self, shard: u32) -> String {
        format!("{}:applied:{{{shard}}}", self.prefix)
    }

    /// Hash of a shard's open dead letters: user id → JSON entry. An entry goes
    /// away when the user syncs or is redriven.
    pub fn dlq(&self, shard: u32) -> String {
        format!("{}:dlq:{{{shard}}}", self.prefix)
    }

    /// Hash of each instance's sink reports: instance id → JSON array,
    /// written with every backlog sample (`datasync sinks` reads it).
    pub fn sinks(&self) -> String {
        format!("{}:sinks", self.prefix)
    }

    /// Stream of dead-letter records waiting for Kafka to come back.
    pub fn dlq_outbox(&self) -> String {
        format!("{}:dlq-outbox", self.prefix)
    }

    /// A shard's lease: `"<owner token>|<epoch>"`, with a TTL.
    pub fn lease(&self, shard: u32) -> String {
        format!("{}:lease:{{{shard}}}", self.prefix)
    }

    /// A shard's fencing epoch counter, raised by every acquisition.
    pub fn epoch(&self, shard: u32) -> String {
        format!("{}:epoch:{{{shard}}}", self.prefix)
    }

    /// Sorted set of live instances: member = instance id, score = heartbeat
    /// expiry (Unix ms).
    pub fn members(&self) -> String {
        format!("{}:members", self.prefix)
    }

    /// Hash of a shard's accepted immediate (static) changes not yet confirmed
    /// by the broker: user id → `"<version>|<profile JSON>"`.
    pub fn static_pending(&self, shard: u32) -> String {
        format!("{}:static:{{{shard}}}", self.prefix)
    }

    /// The cached composed profile of a user (L2 of `GET /v1/profiles/{id}`).
    pub fn profile_cache(&self, shard: u32, user_id: &str) -> String {
        format!("{}:pcache:{{{shard}}}:{user_id}", self.prefix)
    }

    /// Hash of a shard's deletes not yet published: user id → the delete's
    /// version. Written with the flag by the delete script; removed (compare
    /// and delete) once the delete event is on the broker.
    pub fn deleted(&self, shard: u32) -> String {
        format!("{}:deleted:{{{shard}}}", self.prefix)
    }

    /// A background job's record (JSON): resync or consistency check. Every
    /// job key carries the `{jobs}` hash tag, so a job's scripts stay in one
    /// cluster slot.
    pub fn job(&self, kind: &str, id: &str) -> String {
        format!("{}:{{jobs}}:{kind}:{id}", self.prefix)
    }

    /// Sorted set of a kind's jobs: member = job id, score = creation (Unix ms).
    pub fn jobs(&self, kind: &str) -> String {
        format!("{}:{{jobs}}:{kind}", self.prefix)
    }

    /// The id of the job of a kind that is running (one at a time per prefix
    /// unless forced).
    pub fn job_lock(&self, kind: &str) -> String {
        format!("{}:{{jobs}}:{kind}:active", self.prefix)
    }

    /// Set of a kind's jobs not finished (the keeper looks for orphans
    /// among them).
    pub fn jobs_running(&self, kind: &str) -> String {
        format!("{}:{{jobs}}:{kind}:running", self.prefix)
    }

    /// The lease of the instance running a job: its instance id, with a TTL
    /// renewed at each checkpoint. A running job whose lease expired is taken
    /// over and resumed from its checkpoint.
    pub fn job_lease(&self, kind: &str, id: &str) -> String {
        format!("{}:{{jobs}}:{kind}:{id}:lease", self.prefix)
    }

    /// Set when a job is asked to stop; its runner sees it at the next
    /// checkpoint.
    pub fn job_cancel(&self, kind: &str, id: &str) -> String {
        format!("{}:{{jobs}}:{kind}:{id}:cancel", self.prefix)
    }

    /// Sorted set of the applied offset ranges of one topic partition:
    /// member = `"<start>:<end>:<first ms>:<last ms>"` (offsets inclusive,
    /// the oldest and newest record times), score = start offset. Every
    /// offsets key carries the `{offsets}` hash tag.
    pub fn offsets(&self, topic: &str, partition: i32) -> String {
        format!("{}:{{offsets}}:{topic}:{partition}", self.prefix)
    }

    /// Set of the `"<topic>:<partition>"` that have offset ranges.
    pub fn offsets_index(&self) -> String {
        format!("{}:{{offsets}}:partitions", self.prefix)
    }

    /// Set of the whitelisted user ids (empty = no restriction).
    pub fn whitelist(&self) -> String {
        format!("{}:{{whitelist}}", self.prefix)
    }

    /// Counter raised by every whitelist change; instances poll it.
    pub fn whitelist_version(&self) -> String {
        format!("{}:{{whitelist}}:version", self.prefix)
    }

    /// Stream of the operation log: one entry per admin action.
    pub fn operations(&self) -> String {
        format!("{}:operations", self.prefix)
    }

    /// The profile the upstream wrote.
    pub fn profile(&self, user_id: &str) -> String {
        let (head, tail) = self.template_parts();
        if tail.contains("{id}") {
            // A template naming `{id}` more than once.
            return self.profile_template.replace("{id}", user_id);
        }
        [head, user_id, tail].concat()
    }

    /// A SCAN `MATCH` pattern for every profile key: the template with `{id}`
    /// as `*` and glob characters of the rest escaped.
    pub fn profile_pattern(&self) -> String {
        let (head, tail) = self.template_parts();
        let escape = |s: &str| {
            s.chars().fold(String::new(), |mut out, c| {
                if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                    out.push('\\');
                }
                out.push(c);
                out
            })
        };
        format!("{}*{}", escape(head), escape(tail))
    }

    /// The user id a profile key holds, if the key matches the template.
    pub fn user_of_profile_key<'a>(&self, key: &'a str) -> Option<&'a str> {
        let (head, tail) = self.template_parts();
        let id = key.strip_prefix(head)?.strip_suffix(tail)?;
        (!id.is_empty()).then_some(id)
    }

    fn template_parts(&self) -> (&str, &str) {
        (&self.profile_head, &self.profile_tail)
    }

    /// The seed's legacy flag set.
    pub fn legacy(&self) -> &str {
        &self.legacy_set
    }

    /// Members popped from the legacy set and not yet acknowledged: a sorted
    /// set, member = user id, score = the id of the pop that moved it. Its hash
    /// tag is the legacy key's whole name, so it shares the legacy set's
    /// cluster slot.
    pub fn legacy_popped(&self) -> String {
        format!("{{{}}}:popped", self.legacy_set)
    }

    /// The pop clock: the last pop id handed out (`max(now_µs, last + 1)`).
    pub fn legacy_pop_clock(&self) -> String {
        format!("{{{}}}:popclock", self.legacy_set)
    }

    /// The set-typed draining set of earlier releases; its members are moved
    /// into [`legacy_popped`](Self::legacy_popped) and recovered.
    pub fn legacy_draining(&self) -> String {
        format!("{{{}}}:draining", self.legacy_set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_test_vectors() {
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
        assert_eq!(shard_of("123456789", 64), 0xCBF4_3926 % 64);
        assert_eq!(shard_of("123456789", 64), 38);
        assert_eq!(crc32fast::hash(b"user-1"), 0x7E26_4614);
        assert_eq!(shard_of("user-1", 64), 20);
    }

    #[test]
    fn shards_spread_evenly() {
        let mut counts = vec![0u32; 64];
        for i in 0..64_000 {
            counts[shard_of(&format!("user-{i}"), 64) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn profile_keys_map_back_to_users() {
        let k = Keys::new("datasync", "user:{id}:profile", "flags");
        assert_eq!(k.profile_pattern(), "user:*:profile");
        assert_eq!(k.user_of_profile_key("user:42:profile"), Some("42"));
        assert_eq!(k.user_of_profile_key("user::profile"), None);
        assert_eq!(k.user_of_profile_key("session:42"), None);
        let odd = Keys::new("d", "p[1]*{id}", "flags");
        assert_eq!(odd.profile_pattern(), "p\\[1\\]\\**");
        assert_eq!(odd.user_of_profile_key("p[1]*u-7"), Some("u-7"));
    }

    #[test]
    fn a_profile_key_puts_the_id_where_the_template_says() {
        assert_eq!(Keys::new("d", "{id}", "f").profile("u1"), "u1");
        assert_eq!(Keys::new("d", "p:{id}", "f").profile("u1"), "p:u1");
        assert_eq!(Keys::new("d", "{id}:p", "f").profile("u1"), "u1:p");
        assert_eq!(Keys::new("d", "a{id}b{id}", "f").profile("u1"), "au1bu1");
    }

    #[test]
    fn keys_carry_the_shard_hash_tag() {
        let k = Keys::new("ds", "user:{id}:profile", "profile:dirty_flags");
        assert_eq!(k.dirty(7), "ds:dirty:{7}");
        assert_eq!(k.clock(7), "ds:clock:{7}");
        assert_eq!(k.applied(7), "ds:applied:{7}");
        assert_eq!(k.profile("42"), "user:42:profile");
        assert_eq!(k.legacy_draining(), "{profile:dirty_flags}:draining");
        assert_eq!(k.legacy_popped(), "{profile:dirty_flags}:popped");
    }
}
