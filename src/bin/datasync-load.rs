//! `datasync-load`: the load-test harness. Not implemented yet; it says so and
//! exits non-zero rather than pretending to measure anything.

fn main() -> std::process::ExitCode {
    eprintln!(
        "datasync-load: not implemented yet (scenarios, throughput and latency reports are planned)"
    );
    std::process::ExitCode::from(2)
}
