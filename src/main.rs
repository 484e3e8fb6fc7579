//! The `datasync` service binary: parses the command line, starts logging, loads
//! the configuration and calls [`datasync::run`].

use clap::{Parser, Subcommand};
use datasync::{
    Config,
    actors::dlq::{self, RedriveTarget},
};
use std::{path::PathBuf, process::ExitCode};

/// mimalloc instead of glibc's malloc: the publish stage allocates and frees
/// many small buffers per flag, and glibc's trimming and consolidation made
/// its CPU cost per flag vary by a third from run to run. The library sets
/// no allocator; an application embedding it chooses its own.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "datasync",
    version,
    about = "Keeps user profiles in sync from Redis through Kafka into MongoDB"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service: the sync engine and the HTTP API.
    Run {
        /// A TOML file overriding config/default.toml.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Exit with an error unless Kafka and MongoDB answer within
        /// `startup.backends_timeout`, instead of starting degraded (the same
        /// as `startup.require_backends = true`).
        #[arg(long)]
        require_backends: bool,
    },
    /// Inspect the configuration.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Flag users again so their Redis profiles are synced anew: every
    /// profile key (--all), a file of ids, or the ids given. Checkpointed in
    /// Redis: an interrupted run continues with --resume ID. Talks to Redis
    /// only; a running service publishes what it flags.
    Resync {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Every profile key matching redis.profile_key (SCAN).
        #[arg(long, conflicts_with_all = ["file", "user_ids", "resume"])]
        all: bool,
        /// A file of user ids, one per line.
        #[arg(long, conflicts_with_all = ["user_ids", "resume"])]
        file: Option<PathBuf>,
        /// Users flagged per second at most.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        rate: Option<u64>,
        /// Continue an interrupted job.
        #[arg(long, conflicts_with = "user_ids")]
        resume: Option<String>,
        /// Run even if another resync job is running.
        #[arg(long)]
        force: bool,
        /// The users to flag.
        user_ids: Vec<String>,
    },
    /// Re-apply a window of a sync topic to MongoDB (by time or offset),
    /// with a consumer of its own that never commits. Newer data is never
    /// overwritten: older events come back stale. Checkpointed in Redis: an
    /// interrupted run continues with --resume ID.
    Replay {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// `dynamic`, `static` or a topic name.
        #[arg(long, default_value = "dynamic")]
        topic: String,
        /// Start at records this new (epoch ms or RFC 3339).
        #[arg(long, conflicts_with = "from_offset")]
        from_time: Option<String>,
        /// Stop after records this old (epoch ms or RFC 3339).
        #[arg(long, conflicts_with = "to_offset")]
        to_time: Option<String>,
        /// First offset (needs --partition).
        #[arg(long, requires = "partition")]
        from_offset: Option<i64>,
        /// Last offset, inclusive (needs --partition).
        #[arg(long, requires = "partition")]
        to_offset: Option<i64>,
        #[arg(long)]
        partition: Option<i32>,
        /// Only these users (repeat the flag); else the whitelist's, if any.
        #[arg(long = "user-id")]
        user_ids: Vec<String>,
        /// Count what would be applied; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Rebuild into this collection instead of the live one.
        #[arg(long)]
        target_collection: Option<String>,
        /// Events read per second at most.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        rate: Option<u64>,
        /// Continue an interrupted replay.
        #[arg(long)]
        resume: Option<String>,
        /// Run even if another replay is running.
        #[arg(long)]
        force: bool,
    },
    /// Print the operation log: every admin action with its caller and
    /// result, newest first.
    Operations {
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=10000))]
        limit: u64,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List the sinks: each one's consumer groups' lag (from the broker) and
    /// what every running instance last reported of it (from Redis).
    Sinks {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Inspect and redrive the dead-letter queue (talks to Redis directly).
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
}

#[derive(Subcommand)]
enum DlqAction {
    /// Print the open dead letters as JSON.
    List {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Most entries to print.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Re-flag the users of open dead letters so they sync again.
    Redrive {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Every open dead letter.
        #[arg(long, conflicts_with = "user_ids")]
        all: bool,
        /// The users to redrive.
        #[arg(required_unless_present = "all")]
        user_ids: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Report every problem in the layered configuration; non-zero exit if any.
    Check {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Print the effective configuration (secrets masked).
    Print {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

mod cli_jobs;
mod ops_cli;
mod resync_cli;

fn load(path: Option<&PathBuf>) -> Result<Config, ExitCode> {
    Config::load(path.map(PathBuf::as_path)).map_err(|e| {
        eprint!("{e}");
        ExitCode::from(2)
    })
}

/// Resolves on the first SIGINT or SIGTERM; a second one exits at once.
async fn shutdown_signal() {
    wait_signal().await;
    tokio::spawn(async {
        wait_signal().await;
        eprintln!("second signal: exiting now");
        std::process::exit(130);
    });
}

async fn wait_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("can install a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Loads the configuration and runs a command on a runtime of its own,
/// printing its answer.
fn run_command<F>(config: Option<&PathBuf>, command: impl FnOnce(Config) -> F) -> ExitCode
where
    F: std::future::Future<Output = anyhow::Result<String>>,
{
    let config = match load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    print_outcome(rt.block_on(command(config)))
}

/// Prints a command's answer, or its error with each cause once.
fn print_outcome(result: anyhow::Result<String>) -> ExitCode {
    match result {
        Ok(out) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", datasync::error::report(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Config {
            action: ConfigAction::Check { config },
        } => match load(config.as_ref()) {
            Ok(_) => {
                println!("configuration is valid");
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Config {
            action: ConfigAction::Print { config },
        } => match load(config.as_ref()) {
            Ok(c) => {
                println!("{c:#?}");
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Dlq { action } => {
            let (config, job) = match action {
                DlqAction::List { config, limit } => (config, Err(limit)),
                DlqAction::Redrive {
                    config,
                    all,
                    user_ids,
                } => (
                    config,
                    Ok(if all {
                        RedriveTarget::All
                    } else {
                        RedriveTarget::Users(user_ids)
                    }),
                ),
            };
            let config = match load(config.as_ref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
            let result = rt.block_on(async move {
                let redis = datasync::clients::redis::RedisStore::connect(
                    &config.redis,
                    config.sync.shards,
                )
                .await?;
                let out = match job {
                    Err(limit) => serde_json::to_string_pretty(&dlq::list(&redis, limit).await?)?,
                    Ok(target) => {
                        let by = datasync::operations::cli_caller();
                        let action = datasync::operations::Action::begin(
                            "dlq_redrive",
                            &by,
                            target.params(),
                        );
                        let r = dlq::redrive(&redis, target).await;
                        let log = datasync::operations::OperationLog::new(
                            redis.clone(),
                            config.operations.max_entries,
                            &config.instance_id(),
                        );
                        action.end(&log, &r).await;
                        serde_json::to_string_pretty(&r?)?
                    }
                };
                anyhow::Ok(out)
            });
            print_outcome(result)
        }
        Command::Replay {
            config,
            topic,
            from_time,
            to_time,
            from_offset,
            to_offset,
            partition,
            user_ids,
            dry_run,
            target_collection,
            rate,
            resume,
            force,
        } => {
            let request = datasync::jobs::replay::ReplayRequest {
                topic,
                from_time,
                to_time,
                from_offset,
                to_offset,
                partition,
                user_ids: (!user_ids.is_empty()).then_some(user_ids),
                dry_run,
                target_collection,
                rate,
            };
            let args = ops_cli::ReplayArgs {
                request,
                resume,
                force,
            };
            run_command(config.as_ref(), |c| ops_cli::replay(c, args))
        }
        Command::Operations {
            config,
            limit,
            json,
        } => run_command(config.as_ref(), |c| ops_cli::operations(c, limit, json)),
        Command::Sinks { config, json } => {
            run_command(config.as_ref(), |c| ops_cli::sinks(c, json))
        }
        Command::Resync {
            config,
            all,
            file,
            rate,
            resume,
            force,
            user_ids,
        } => {
            let args = resync_cli::Args {
                all,
                user_ids,
                file,
                rate,
                resume,
                force,
            };
            run_command(config.as_ref(), |c| resync_cli::run(c, args))
        }
        Command::Run {
            config,
            require_backends,
        } => {
            let mut config = match load(config.as_ref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            config.startup.require_backends |= require_backends;
            datasync::telemetry::init_logging(
                &config.telemetry.log_format,
                &config.telemetry.log_filter,
            );
            let result =
                actix_web::rt::System::new().block_on(datasync::run(config, shutdown_signal()));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    let e = datasync::error::report(e.as_ref());
                    tracing::error!(error = %e, "datasync stopped with an error");
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
