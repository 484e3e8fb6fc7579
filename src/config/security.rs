//! The HTTP API's access (named tokens with roles, HTTPS, rate limits) and the
//! librdkafka properties passed through to every Kafka client.

use super::Secret;
use serde::{Deserialize, Serialize};
use std::{collections::BTreeMap, fmt, net::SocketAddr};

/// What a token may do; each role may do everything the roles below it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Profiles, shards, stats, cache stats.
    Read,
    /// Marking, the immediate path, deletes.
    Write,
    /// Everything: DLQ, replay, resync, consistency, whitelist, operations.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Read, Role::Write, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
        }
    }
}

/// One named bearer token: `[http.tokens.<name>] role = "write", secret = "…"`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct TokenConfig {
    pub role: Role,
    pub secret: Secret,
}

/// Requests per second and burst for one role, counted per token (per client
/// address when no tokens are configured). `per_second = 0` turns it off.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RateLimits {
    pub read: RateLimit,
    pub write: RateLimit,
    pub admin: RateLimit,
}

impl RateLimits {
    pub fn of(&self, role: Role) -> RateLimit {
        match role {
            Role::Read => self.read,
            Role::Write => self.write,
            Role::Admin => self.admin,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct HttpConfig {
    /// Serve the HTTP API.
    pub enabled: bool,
    /// Address to bind.
    pub bind: String,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Most users in one mark request.
    pub max_users_per_request: usize,
    /// Shorthand for `[http.tokens.admin] role = "admin"`; empty = none.
    pub admin_token: Secret,
    /// Named bearer tokens and their roles.
    pub tokens: BTreeMap<String, TokenConfig>,
    /// PEM certificate chain and private key: both set = serve HTTPS.
    pub tls_cert: String,
    pub tls_key: String,
    pub rate_limit: RateLimits,
}

/// The name `http.admin_token` goes by in logs and the operation log.
pub const ADMIN_TOKEN_NAME: &str = "admin";

impl HttpConfig {
    /// Every token by name, `admin_token` included.
    pub fn all_tokens(&self) -> Vec<(String, TokenConfig)> {
        let mut all: Vec<_> = self
            .tokens
            .iter()
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect();
        if !self.admin_token.is_empty() {
            all.push((
                ADMIN_TOKEN_NAME.to_string(),
                TokenConfig {
                    role: Role::Admin,
                    secret: self.admin_token.clone(),
                },
            ));
        }
        all
    }

    pub fn tls(&self) -> bool {
        !self.tls_cert.is_empty()
    }

    /// Refuses to expose an API nobody has to authenticate to: a bind that is
    /// not loopback needs a token that may write (Redis' protected mode).
    pub fn check_exposure(&self) -> Result<(), String> {
        if is_loopback(&self.bind) || self.all_tokens().iter().any(|(_, t)| t.role >= Role::Write) {
            return Ok(());
        }
        Err(format!(
            "http.bind = {} is not a loopback address and no token may write: anyone who \
             reaches the port could write profiles. Set [http.tokens.<name>] with role = \
             \"write\" (or \"admin\") and a secret, or bind 127.0.0.1",
            self.bind
        ))
    }

    pub(super) fn validate(&self, p: &mut Vec<String>) {
        if self.bind.parse::<SocketAddr>().is_err() {
            p.push("http.bind: must be an address like 127.0.0.1:8080".into());
        }
        if self.max_body_bytes < 1024 {
            p.push("http.max_body_bytes: must be at least 1024".into());
        }
        if self.max_users_per_request < 1 {
            p.push("http.max_users_per_request: must be at least 1".into());
        }
        if !self.admin_token.is_empty() && self.tokens.contains_key(ADMIN_TOKEN_NAME) {
            p.push(format!(
                "http.admin_token: a token named \"{ADMIN_TOKEN_NAME}\" is also in \
                 http.tokens; keep one"
            ));
        }
        let mut seen = BTreeMap::new();
        for (name, t) in &self.tokens {
            if t.secret.is_empty() {
                p.push(format!("http.tokens.{name}.secret: must not be empty"));
            }
            if let Some(other) = seen.insert(t.secret.expose(), name) {
                p.push(format!(
                    "http.tokens.{name}.secret: the same secret as http.tokens.{other}"
                ));
            }
        }
        if self.tls_cert.is_empty() != self.tls_key.is_empty() {
            p.push("http.tls_cert, http.tls_key: set both (HTTPS) or neither".into());
        }
        for role in Role::ALL {
            let l = self.rate_limit.of(role);
            if l.per_second > 0 && l.burst < 1 {
                p.push(format!(
                    "http.rate_limit.{}.burst: must be at least 1",
                    role.as_str()
                ));
            }
        }
    }
}

/// True for `127.x`, `::1` and `localhost`.
pub fn is_loopback(bind: &str) -> bool {
    match bind.parse::<SocketAddr>() {
        Ok(a) => a.ip().is_loopback(),
        Err(_) => bind.starts_with("localhost:"),
    }
}

/// librdkafka properties set on every producer and consumer
/// (`[kafka.client]`: `security.protocol`, `sasl.*`, `ssl.*`…). Values of
/// keys that look secret never print.
#[derive(Clone, Default, Deserialize, Serialize)]
#[serde(transparent)]
pub struct KafkaClientProperties(pub BTreeMap<String, String>);

/// Properties datasync sets itself: its correctness depends on them, or a
/// config key of its own sets them.
const RESERVED: [(&str, &str); 11] = [
    ("bootstrap.servers", "set kafka.brokers"),
    ("group.id", "set kafka.consumer_group"),
    ("client.id", "datasync names its clients"),
    (
        "enable.auto.commit",
        "the applier commits only applied windows",
    ),
    (
        "enable.auto.offset.store",
        "the applier stores only applied offsets",
    ),
    ("enable.idempotence", "the producer must be idempotent"),
    ("acks", "the producer waits for all replicas"),
    ("message.timeout.ms", "set kafka.message_timeout"),
    ("linger.ms", "set kafka.linger"),
    ("fetch.wait.max.ms", "set kafka.fetch_max_wait"),
    ("session.timeout.ms", "set kafka.session_timeout"),
];

impl KafkaClientProperties {
    /// Whether a property's value must not be printed.
    pub fn is_secret(key: &str) -> bool {
        ["password", "secret", "jaas", "token", "key.pem", "ssl.key"]
            .iter()
            .any(|s| key.contains(s))
    }

    /// A value as it may be printed.
    fn shown<'a>(key: &str, value: &'a str) -> &'a str {
        if Self::is_secret(key) { "***" } else { value }
    }

    /// `text` with every secret value replaced by `***`.
    fn masked(&self, text: &str) -> String {
        self.iter()
            .filter(|(k, v)| Self::is_secret(k) && !v.is_empty())
            .fold(text.to_string(), |t, (_, v)| t.replace(v, "***"))
    }

    /// Sets every property on a librdkafka configuration.
    pub fn apply_to(&self, cfg: &mut rdkafka::ClientConfig) {
        for (k, v) in self.iter() {
            cfg.set(k, v);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// One problem per reserved or unknown key, or value librdkafka refuses;
    /// secret values are masked in the message.
    pub(super) fn validate(&self, p: &mut Vec<String>) {
        let before = p.len();
        self.validate_each(p);
        if p.len() > before || self.0.is_empty() {
            return;
        }
        // Some values are only checked together, when a client is made
        // (the SASL mechanism, certificate files): make one and drop it.
        let mut all = rdkafka::ClientConfig::new();
        self.apply_to(&mut all);
        all.set("bootstrap.servers", "127.0.0.1:9");
        if let Err(e) = all.create::<rdkafka::producer::BaseProducer>() {
            p.push(format!(
                "kafka.client: librdkafka refuses these properties together: {}",
                self.masked(&e.to_string())
            ));
        }
    }

    fn validate_each(&self, p: &mut Vec<String>) {
        for (key, value) in self.iter() {
            if let Some((_, why)) = RESERVED.iter().find(|(k, _)| *k == key) {
                p.push(format!(
                    "kafka.client.\"{key}\": datasync sets this itself ({why})"
                ));
                continue;
            }
            let mut one = rdkafka::ClientConfig::new();
            one.set(key, value);
            if let Err(e) = one.create_native_config() {
                p.push(format!(
                    "kafka.client.\"{key}\" = \"{}\": librdkafka refuses it: {}",
                    Self::shown(key, value),
                    self.masked(&e.to_string())
                ));
            }
        }
    }
}

impl fmt::Debug for KafkaClientProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut m = f.debug_map();
        for (k, v) in self.iter() {
            m.entry(&k, &Self::shown(k, v));
        }
        m.finish()
    }
}
