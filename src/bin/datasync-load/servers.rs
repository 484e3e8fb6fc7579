//! The CPU time of the servers a run talks to, when they run on this
//! machine: Redis, the broker and the MongoDB-wire server, each found by the
//! loopback port it listens on. The two cores are shared by all of them and
//! datasync, so a phase's report gives each one's CPU-µs per change beside
//! datasync's own: what a run is bound by, read off its own figures.

use datasync::{Config, telemetry::process_usage_of};
use std::collections::BTreeMap;

/// The local server processes of a run, by name (`redis`, `kafka`, `mongodb`).
pub struct Servers(Vec<(&'static str, String)>);

/// A figure for each server found, by name.
pub type ByServer = BTreeMap<&'static str, f64>;

impl Servers {
    /// The processes listening on the loopback ports of the run's Redis,
    /// first broker and MongoDB URL; endpoints on other hosts are left out.
    pub fn find(config: &Config) -> Self {
        let endpoints = [
            ("redis", loopback_port(config.redis.url.expose())),
            ("kafka", loopback_port(&config.kafka.brokers)),
            ("mongodb", loopback_port(config.mongo.url.expose())),
        ];
        Servers(
            endpoints
                .into_iter()
                .filter_map(|(name, port)| Some((name, listener_pid(port?)?)))
                .collect(),
        )
    }

    /// CPU seconds of each server found.
    pub fn cpu_seconds(&self) -> ByServer {
        self.0
            .iter()
            .filter_map(|(name, pid)| Some((*name, process_usage_of(pid)?.cpu_seconds)))
            .collect()
    }
}

/// Each server's CPU-µs per change between two readings.
pub fn per_change(before: &ByServer, after: &ByServer, changes: u64) -> ByServer {
    after
        .iter()
        .filter_map(|(name, a)| {
            Some((*name, (a - before.get(name)?) * 1e6 / changes.max(1) as f64))
        })
        .collect()
}

/// `redis 3.0 | kafka 0.7 | mongodb 150`, or `not on this machine`.
pub fn summary(per_change: &ByServer) -> String {
    if per_change.is_empty() {
        return "not on this machine".into();
    }
    per_change
        .iter()
        .map(|(name, us)| format!("{name} {us:.1}"))
        .collect::<Vec<_>>()
        .join(" | ")
}

/// The port of the first host of a URL or broker list (`scheme://user@host:port/…`
/// or `host:port,…`), when that host is this machine's loopback.
fn loopback_port(url: &str) -> Option<u16> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let host_port = rest.split(['/', '?', ',']).next()?;
    let (host, port) = host_port.rsplit_once(':')?;
    matches!(host, "127.0.0.1" | "localhost" | "[::1]")
        .then(|| port.parse().ok())
        .flatten()
}

/// The process holding the listening TCP socket of `port`: its inode from
/// `/proc/net/tcp` (or `tcp6`), then the process with a descriptor on it.
fn listener_pid(port: u16) -> Option<String> {
    let inode = ["/proc/net/tcp", "/proc/net/tcp6"].iter().find_map(|f| {
        let table = std::fs::read_to_string(f).ok()?;
        table.lines().skip(1).find_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let local_port = cols.get(1)?.rsplit_once(':')?.1;
            (u16::from_str_radix(local_port, 16).ok()? == port && *cols.get(3)? == "0A")
                .then(|| cols.get(9).map(|s| s.to_string()))
                .flatten()
        })
    })?;
    let target = format!("socket:[{inode}]");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|p| {
        let pid = p.file_name().into_string().ok()?;
        pid.bytes().all(|b| b.is_ascii_digit()).then_some(())?;
        let fds = std::fs::read_dir(p.path().join("fd")).ok()?;
        fds.flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str()))
            .then_some(pid)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_ports_come_from_urls_and_broker_lists() {
        assert_eq!(loopback_port("redis://127.0.0.1:6379"), Some(6379));
        assert_eq!(
            loopback_port("redis://:secret@localhost:6380/0"),
            Some(6380)
        );
        assert_eq!(
            loopback_port("mongodb://127.0.0.1:27018/?retryWrites=false"),
            Some(27018)
        );
        assert_eq!(loopback_port("127.0.0.1:9092,127.0.0.1:9093"), Some(9092));
        assert_eq!(loopback_port("redis://cache.internal:6379"), None);
        assert_eq!(loopback_port("mongodb://127.0.0.1/?x=1"), None);
    }

    #[test]
    fn a_listening_socket_is_traced_to_its_process() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(listener_pid(port), Some(std::process::id().to_string()));
    }
}
