#!/usr/bin/env bash
# Runs peerchat-server (release build) with working persistence.
#
# With --mongo-uri or PEERCHAT_MONGO_URI, or --no-persist, it only runs the server. Otherwise, if
# nothing answers on 127.0.0.1:27017, it starts a local SecantusDB there with its data kept in
# ./data/secantusdb (so messages survive restarts) and stops it when the server exits.
# All arguments go to peerchat-server; see `scripts/run-server.sh --help`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

needs_db=1
for arg in "$@"; do
  case "$arg" in
    --mongo-uri|--no-persist|-h|--help|-V|--version) needs_db=0 ;;
  esac
done
[[ -n "${PEERCHAT_MONGO_URI:-}" ]] && needs_db=0

cargo build --release --quiet --bin peerchat-server
server="${CARGO_TARGET_DIR:-$root/target}/release/peerchat-server"

log() { echo "$(date -u +%Y-%m-%dT%H:%M:%S.%3NZ) INFO  run-server: $*" >&2; }

db_pid=""
stop_db() {
  if [[ -n "$db_pid" ]] && kill -0 "$db_pid" 2>/dev/null; then
    log "stopping the local SecantusDB (pid $db_pid)"
    kill "$db_pid" 2>/dev/null || true
    wait "$db_pid" 2>/dev/null || true
  fi
}

if [[ $needs_db -eq 1 ]] && ! (exec 3<>/dev/tcp/127.0.0.1/27017) 2>/dev/null; then
  secantusd="$(scripts/ensure-secantusdb.sh)"
  mkdir -p data/secantusdb
  log "no MongoDB on 127.0.0.1:27017: starting SecantusDB there, data in $root/data/secantusdb"
  # Own session (setsid): a Ctrl-C in this terminal must not stop the database before the
  # server has stored what it accepted; this script stops it after the server has exited.
  setsid "$secantusd" --host 127.0.0.1 --port 27017 --storage-path "$root/data/secantusdb" \
    --log-level WARNING >>data/secantusdb.log 2>&1 &
  db_pid=$!
  trap stop_db EXIT
  for _ in $(seq 1 300); do
    (exec 3<>/dev/tcp/127.0.0.1/27017) 2>/dev/null && break
    kill -0 "$db_pid" 2>/dev/null || { echo "SecantusDB failed to start; see data/secantusdb.log" >&2; exit 1; }
    sleep 0.1
  done
  # The server runs in its own session too, so it gets exactly one stop signal: this script
  # passes Ctrl-C (SIGINT) and SIGTERM on as one SIGTERM (a second would mean "exit now").
  setsid "$server" "$@" &
  server_pid=$!
  trap 'kill -TERM $server_pid 2>/dev/null; wait $server_pid; exit 130' INT
  trap 'kill -TERM $server_pid 2>/dev/null; wait $server_pid; exit 143' TERM
  wait "$server_pid"
else
  exec "$server" "$@"
fi
