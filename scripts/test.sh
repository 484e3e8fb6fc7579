#!/usr/bin/env bash
# The full test suite: brings the local stack up (installing what is missing),
# then runs every unit, integration and bench-smoke test against it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
eval "$(scripts/stack.sh up)"
scripts/stack.sh tools
export RUST_BACKTRACE=1
# The benches run once each as smoke tests first, so the suite's last lines are
# the integration tests' results (the library has no doc tests).
cargo test --benches --locked "$@"
cargo test --lib --bins --tests --locked "$@"
