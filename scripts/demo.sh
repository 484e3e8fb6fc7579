#!/usr/bin/env bash
# The main job, end to end: start the local stack, build and start the datasync
# service, drive a workload through its HTTP API the way the upstream profile
# service would, and show the profiles arriving in MongoDB.
#
#   scripts/demo.sh [USERS]      (default 5000)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
users=${1:-5000}
eval "$(scripts/stack.sh up)"
cargo build --locked --bin datasync
port=${DATASYNC_DEMO_PORT:-8080}
run_id=demo-$(date +%s)
config=.stack/$run_id.toml
cat >"$config" <<TOML
[instance]
id = "$run_id"
[redis]
key_prefix = "$run_id"
profile_key = "$run_id:user:{id}:profile"
[mongo]
url = "$DATASYNC_TEST_MONGO_URL"
database = "datasync_demo"
collection = "$run_id"
[kafka]
static_topic = "$run_id-static"
dynamic_topic = "$run_id-dynamic"
dlq_topic = "$run_id-dlq"
consumer_group = "$run_id"
[sync]
interval = "1s"
[http]
bind = "127.0.0.1:$port"
TOML
case "${DATASYNC_MONGO_SERVER:-py}" in
  rs) echo "MongoDB-wire server: SecantusDB's Rust build on $DATASYNC_TEST_MONGO_URL (about 10,000 bulk upserts/s here: a few seconds for 5,000 users)" ;;
  *) echo "MongoDB-wire server: SecantusDB's Python server on $DATASYNC_TEST_MONGO_URL (about 1,600-2,000 bulk upserts/s on an empty store: a few seconds for 5,000 users; it slows down as its history grows, so run scripts/stack.sh reset to start it empty; DATASYNC_MONGO_SERVER=rs scripts/stack.sh reset for the faster Rust build)" ;;
esac
target/debug/datasync config check --config "$config"
target/debug/datasync run --config "$config" 2>".stack/$run_id.log" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true' EXIT
.stack/venv/bin/python scripts/demo_driver.py \
  --api "http://127.0.0.1:$port" --mongo "$DATASYNC_TEST_MONGO_URL" \
  --database datasync_demo --collection "$run_id" --users "$users"
kill -TERM $pid
wait $pid && echo "datasync stopped cleanly (log: .stack/$run_id.log)"
trap - EXIT
