//! PostgreSQL for the sink tests: the stack's server, a server of a test's
//! own, and reading a sink's table.

use super::*;

/// The stack's PostgreSQL (`scripts/stack.sh up`), database `datasync`.
pub fn postgres_url() -> String {
    std::env::var("DATASYNC_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:55432/datasync".into())
}

/// The test's own PostgreSQL table: its namespace with `_` for `-`.
pub fn pg_table(ns: &str) -> String {
    ns.replace('-', "_")
}

/// A PostgreSQL client of the test's own, at `url`.
pub async fn pg_client(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("postgres (run scripts/stack.sh up first)");
    tokio::spawn(connection);
    client
}

/// One row of a sink's table: `(static_version, dynamic_version,
/// data_version, deleted, dynamic_profile)`.
pub type PgRow = (i64, i64, i64, bool, Option<serde_json::Value>);

/// Every row of `table`, by user.
pub async fn pg_rows(
    client: &tokio_postgres::Client,
    table: &str,
) -> std::collections::HashMap<String, PgRow> {
    let sql = format!(
        "SELECT user_id, static_version, dynamic_version, data_version, deleted, dynamic_profile FROM \"{table}\""
    );
    match client.query(&sql, &[]).await {
        Ok(rows) => rows
            .into_iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3), r.get(4), r.get(5))))
            .collect(),
        // Not created yet.
        Err(_) => Default::default(),
    }
}

/// Rows in `table` (0 while it does not exist).
pub async fn pg_count(client: &tokio_postgres::Client, table: &str) -> i64 {
    client
        .query_one(&format!("SELECT count(*) FROM \"{table}\""), &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(0)
}

/// A PostgreSQL server of the test's own (Debian's binaries, which
/// `scripts/stack.sh up` installs), on a free port, in a temporary folder;
/// stopped and started at will, stopped when dropped. As root it runs as
/// the `postgres` user, since PostgreSQL refuses root.
pub struct PgServer {
    pub port: u16,
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
}

fn as_postgres(cmd: &std::path::Path) -> std::process::Command {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    if root {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(cmd);
        c
    } else {
        std::process::Command::new(cmd)
    }
}

impl PgServer {
    pub fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL's server (run scripts/stack.sh up first)")
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .filter(|p| p.join("initdb").exists())
            .max()
            .expect("initdb under /usr/lib/postgresql/*/bin");
        let dir = tempfile::tempdir().unwrap();
        let _ = std::process::Command::new("chown")
            .arg("postgres:")
            .arg(dir.path())
            .status();
        let ok = as_postgres(&bin.join("initdb"))
            .arg("-D")
            .arg(dir.path().join("data"))
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "--no-locale",
                "-E",
                "UTF8",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(ok, "initdb failed");
        let server = Self {
            port: free_port(),
            dir,
            bin,
        };
        server.resume();
        server
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn pg_ctl(&self, args: &[&str]) -> bool {
        as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success()
    }

    /// Starts it (again), waiting until it accepts connections.
    pub fn resume(&self) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''",
            self.port
        );
        let log = self.dir.path().join("server.log");
        let log = log.to_str().unwrap();
        assert!(
            self.pg_ctl(&["-l", log, "-w", "-t", "60", "-o", &opts, "start"]),
            "postgres did not start"
        );
    }

    /// Stops it (fast shutdown: connections are closed).
    pub fn stop(&self) {
        assert!(
            self.pg_ctl(&["-m", "fast", "-w", "stop"]),
            "postgres did not stop"
        );
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
    }
}
