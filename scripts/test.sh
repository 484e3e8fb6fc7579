#!/usr/bin/env bash
# The full test suite: brings the local stack up (installing what is missing),
# then runs every unit, integration and bench-smoke test against it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
eval "$(scripts/stack.sh up)"
export RUST_BACKTRACE=1
cargo test --all-targets --locked "$@"
