//! The upstream's profiles: a JSON object string or a hash per user.

use super::{RedisError, RedisStore};
use crate::model::{ProfileError, RawProfile};
use fred::{prelude::*, types::Value as RValue};

impl RedisStore {
    /// Writes profiles as JSON strings, pipelined.
    pub async fn write_profiles(&self, profiles: &[(String, String)]) -> Result<(), RedisError> {
        let pipe = self.client().pipeline();
        for (user, json) in profiles {
            let _: () = pipe
                .set(self.keys.profile(user), json.as_str(), None, None, false)
                .await?;
        }
        let _: Vec<RValue> = pipe.all().await?;
        Ok(())
    }

    /// Loads profiles as Redis holds them: one pipeline of GETs, then one of
    /// HGETALLs for the keys that hold hashes. One result per user, in order;
    /// parsing is the caller's.
    pub async fn load_profiles(
        &self,
        users: &[String],
    ) -> Result<Vec<Result<RawProfile, ProfileError>>, RedisError> {
        let pipe = self.client().pipeline();
        for u in users {
            let _: () = pipe.get(self.keys.profile(u)).await?;
        }
        let replies: Vec<Result<RValue, fred::error::Error>> = pipe.try_all().await;
        let mut out = Vec::with_capacity(users.len());
        let mut hashes = Vec::new();
        for (i, (u, r)) in users.iter().zip(replies).enumerate() {
            let key = self.keys.profile(u);
            out.push(match r {
                Ok(RValue::Null) => Err(ProfileError::Missing { key }),
                Ok(RValue::Bytes(b)) => Ok(RawProfile::Json(b)),
                Ok(RValue::String(s)) => Ok(RawProfile::Json(s.into_inner())),
                Ok(v) => Err(ProfileError::WrongType {
                    key,
                    kind: format!("{:?}", v.kind()),
                }),
                Err(e) if e.details().contains("WRONGTYPE") => {
                    hashes.push(i);
                    Err(ProfileError::WrongType {
                        key,
                        kind: "unknown".into(),
                    })
                }
                Err(e) => return Err(e.into()),
            });
        }
        if !hashes.is_empty() {
            let pipe = self.client().pipeline();
            for &i in &hashes {
                let _: () = pipe.hgetall(self.keys.profile(&users[i])).await?;
                let _: () = pipe.r#type(self.keys.profile(&users[i])).await?;
            }
            let replies: Vec<RValue> = pipe.all().await?;
            for (&i, pair) in hashes.iter().zip(replies.chunks(2)) {
                let key = self.keys.profile(&users[i]);
                let kind = pair[1].as_string().unwrap_or_default();
                out[i] = if kind == "hash" {
                    Ok(RawProfile::Hash(pair[0].clone().convert()?))
                } else {
                    Err(ProfileError::WrongType { key, kind })
                };
            }
        }
        Ok(out)
    }
}
