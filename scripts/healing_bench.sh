#!/usr/bin/env bash
# Measures healing on the local stack: a resync of USERS profiles written to
# Redis without flags (flagging rate, and the time until all are in MongoDB);
# a replay of the dynamic topic into another collection (events/s), and the
# live applier's rate alone and during a replay; then one consistency check,
# idle and while a writer changes 1,000 users a second.
#
#   scripts/healing_bench.sh [USERS]      (default 100000)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
users=${1:-100000}
eval "$(scripts/stack.sh up)"
cargo build --release --locked --bin datasync
port=${DATASYNC_BENCH_PORT:-8091}
run_id=heal-$(date +%s)
config=.stack/$run_id.toml
cat >"$config" <<TOML
[instance]
id = "$run_id"
[redis]
key_prefix = "$run_id"
profile_key = "$run_id:user:{id}:profile"
[mongo]
url = "$DATASYNC_TEST_MONGO_URL"
database = "datasync_bench"
collection = "$run_id"
[kafka]
static_topic = "$run_id-static"
dynamic_topic = "$run_id-dynamic"
dlq_topic = "$run_id-dlq"
consumer_group = "$run_id"
[sync]
interval = "0s"
[http]
bind = "127.0.0.1:$port"
admin_token = "bench"
[consistency]
interval = "0s"
rate = 0
TOML
target/release/datasync run --config "$config" 2>".stack/$run_id.log" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true' EXIT
.stack/venv/bin/python scripts/healing_bench.py \
  --api "http://127.0.0.1:$port" --token bench --mongo "$DATASYNC_TEST_MONGO_URL" \
  --redis "$DATASYNC_TEST_REDIS_URL" --prefix "$run_id" \
  --database datasync_bench --collection "$run_id" --users "$users"
kill -TERM $pid
wait $pid || true
trap - EXIT
