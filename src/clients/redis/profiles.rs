//! The upstream's profiles: a JSON object string or a hash per user; and
//! walking their keys (resync, consistency checks).

use super::{RedisError, RedisStore};
use crate::model::{ProfileError, RawProfile};
use fred::{prelude::*, types::Value as RValue};

impl RedisStore {
    /// Writes profiles as JSON strings: one MSET on a single Redis, one SET a
    /// profile on a cluster (the keys lie in many slots). fred writes every
    /// command to the socket on its own, so the MSET saves a system call a
    /// profile on both sides.
    ///
    /// Written within 2 s of the call or not at all (see
    /// `RedisStore::now_or_never`): while Redis is away the call fails, and
    /// a profile is never written after its caller gave up, over a newer
    /// one written meanwhile.
    pub async fn write_profiles(&self, profiles: &[(String, String)]) -> Result<(), RedisError> {
        if profiles.is_empty() {
            return Ok(());
        }
        let client = self.now_or_never();
        let pairs: Vec<(String, String)> = profiles
            .iter()
            .map(|(user, json)| (self.keys.profile(user), json.clone()))
            .collect();
        if !self.cluster {
            super::detached(async move { client.mset(pairs).await }).await?;
            return Ok(());
        }
        super::detached(async move {
            let sets = pairs
                .into_iter()
                .map(|(key, json)| client.set::<(), _, _>(key, json, None, None, false));
            futures::future::try_join_all(sets).await
        })
        .await?;
        Ok(())
    }

    /// Loads profiles as Redis holds them: one MGET (a pipeline of GETs on a
    /// Redis Cluster, where the keys lie in many slots), then one pipeline
    /// of HGETALL and TYPE for the keys that held no string (a hash, or
    /// nothing). One result per user, in order; parsing is the caller's.
    pub async fn load_profiles(
        &self,
        users: &[String],
    ) -> Result<Vec<Result<RawProfile, ProfileError>>, RedisError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        // The keys go to the client as they are; the few a problem names are
        // built again.
        let keys: Vec<String> = users.iter().map(|u| self.keys.profile(u)).collect();
        let key = |i: usize| self.keys.profile(&users[i]);
        let replies: Vec<RValue> = if self.cluster {
            self.get_each(&keys).await?
        } else {
            // MGET answers nil for a key of another type, where GET fails
            // with WRONGTYPE: the nils are looked at below.
            match self.client().mget::<RValue, _>(keys).await? {
                RValue::Array(a) => a,
                one => vec![one],
            }
        };
        if replies.len() != users.len() {
            return Err(RedisError::Reply {
                what: "profile load",
                reply: format!("{} values for {} keys", replies.len(), users.len()),
            });
        }
        let mut out = Vec::with_capacity(users.len());
        let mut unknown = Vec::new();
        for (i, r) in replies.into_iter().enumerate() {
            out.push(match r {
                RValue::Bytes(b) => Ok(RawProfile::Json(b)),
                RValue::String(s) => Ok(RawProfile::Json(s.into_inner())),
                RValue::Null => {
                    unknown.push(i);
                    Err(ProfileError::Missing { key: key(i) })
                }
                v => Err(ProfileError::WrongType {
                    key: key(i),
                    kind: format!("{:?}", v.kind()),
                }),
            });
        }
        if !unknown.is_empty() {
            let pipe = self.client().pipeline();
            for &i in &unknown {
                let _: () = pipe.r#type(key(i)).await?;
                let _: () = pipe.hgetall(key(i)).await?;
            }
            let replies: Vec<RValue> = pipe.all().await?;
            for (&i, pair) in unknown.iter().zip(replies.chunks(2)) {
                out[i] = match pair[0].as_string().unwrap_or_default().as_str() {
                    "hash" => Ok(RawProfile::Hash(pair[1].clone().convert()?)),
                    "none" => Err(ProfileError::Missing { key: key(i) }),
                    kind => Err(ProfileError::WrongType {
                        key: key(i),
                        kind: kind.to_string(),
                    }),
                };
            }
        }
        Ok(out)
    }

    /// GET of each key, pipelined (keys of many slots); a key of another
    /// type answers nil, as in MGET.
    async fn get_each(&self, keys: &[String]) -> Result<Vec<RValue>, RedisError> {
        let pipe = self.client().pipeline();
        for k in keys {
            let _: () = pipe.get(k).await?;
        }
        let replies: Vec<Result<RValue, fred::error::Error>> = pipe.try_all().await;
        replies
            .into_iter()
            .map(|r| match r {
                Ok(v) => Ok(v),
                Err(e) if e.details().contains("WRONGTYPE") => Ok(RValue::Null),
                Err(e) => Err(e.into()),
            })
            .collect()
    }
}

/// Where a walk over the profile keys is: the SCAN cursor of one node (a
/// cluster's primaries are walked one after another, in address order).
/// Written as `"<node>:<cursor>"`; `"0:0"` is the start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanCursor {
    pub node: usize,
    pub cursor: String,
}

impl ScanCursor {
    pub fn start() -> Self {
        Self {
            node: 0,
            cursor: "0".into(),
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        let (node, cursor) = s.split_once(':')?;
        let node = node.parse().ok()?;
        cursor.parse::<u64>().ok()?;
        Some(Self {
            node,
            cursor: cursor.to_string(),
        })
    }
}

impl std::fmt::Display for ScanCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.node, self.cursor)
    }
}

impl RedisStore {
    /// One SCAN page of profile keys (`redis.profile_key` with `*` for the
    /// id), from `at`: the users found and where to go on (`None` when the
    /// walk is over). SCAN may return a key twice; callers' work must be
    /// idempotent (flagging again is).
    pub async fn scan_profiles(
        &self,
        at: &ScanCursor,
        count: u32,
    ) -> Result<(Vec<String>, Option<ScanCursor>), RedisError> {
        let pattern = self.keys.profile_pattern();
        let client = self.client();
        let nodes: Vec<Server> = if client.is_clustered() {
            let mut n = client
                .cached_cluster_state()
                .map(|s| s.unique_primary_nodes())
                .unwrap_or_default();
            n.sort_by_key(|s| s.to_string());
            n
        } else {
            Vec::new()
        };
        let (next, keys): (String, Vec<String>) = if nodes.is_empty() {
            client
                .scan_page(at.cursor.as_str(), pattern.as_str(), Some(count), None)
                .await?
        } else {
            let Some(server) = nodes.get(at.node) else {
                return Ok((Vec::new(), None));
            };
            client
                .with_cluster_node(server.clone())
                .scan_page(at.cursor.as_str(), pattern.as_str(), Some(count), None)
                .await?
        };
        let users = keys
            .iter()
            .filter_map(|k| self.keys.user_of_profile_key(k))
            .map(str::to_string)
            .collect();
        let next = if next != "0" {
            Some(ScanCursor {
                node: at.node,
                cursor: next,
            })
        } else if at.node + 1 < nodes.len() {
            Some(ScanCursor {
                node: at.node + 1,
                cursor: "0".into(),
            })
        } else {
            None
        };
        Ok((users, next))
    }

    /// How many keys the Redis node(s) hold: an upper bound of the profile
    /// count, for progress estimates.
    pub async fn key_count(&self) -> Result<u64, RedisError> {
        let client = self.client();
        if !client.is_clustered() {
            return Ok(client.dbsize().await?);
        }
        let nodes = client
            .cached_cluster_state()
            .map(|s| s.unique_primary_nodes())
            .unwrap_or_default();
        let mut total = 0u64;
        for n in nodes {
            let c: u64 = client.with_cluster_node(n).dbsize().await?;
            total += c;
        }
        Ok(total)
    }

    /// Whether each user's profile key exists, pipelined.
    pub async fn profiles_exist(&self, users: &[String]) -> Result<Vec<bool>, RedisError> {
        if users.is_empty() {
            return Ok(vec![]);
        }
        let pipe = self.client().pipeline();
        for u in users {
            let _: () = pipe.exists(self.keys.profile(u)).await?;
        }
        let n: Vec<i64> = pipe.all().await?;
        Ok(n.into_iter().map(|n| n == 1).collect())
    }
}
