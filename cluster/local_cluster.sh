#!/usr/bin/env bash
# A local multi-node Ray cluster on this machine: one head node and N worker nodes, each its own
# `ray start` (own raylet, own object store), all on 127.0.0.1, with token authentication.
# Use it to try `medkd submit` and multi-node behaviour (placement, node failure) without a cloud.
#
#   cluster/local_cluster.sh start [N_WORKERS]   # default 2 workers
#   cluster/local_cluster.sh status
#   cluster/local_cluster.sh stop                # stops only the nodes this script started
#
# Then, in the shell that submits:
#
#   export RAY_AUTH_TOKEN_PATH=<state dir>/auth_token   # printed by `start`
#   medkd submit examples/quickstart.yaml --address http://127.0.0.1:28265
#
# Settings (environment variables):
#   MEDKD_CLUSTER_DIR        state dir: pids, token, logs, Ray's temp dir
#                            (default /tmp/medkd-local-cluster; keep it short, Ray's unix sockets
#                            live below it and their paths are limited to ~107 bytes)
#   MEDKD_CLUSTER_PORT       the head's GCS port (default 26379)
#   MEDKD_DASHBOARD_PORT     the dashboard / Jobs API port (default 28265)
#   MEDKD_CLUSTER_BASE_PORT  first of the per-node service ports (default 26400; node i uses
#                            BASE+10*i .. BASE+10*i+6)
#   MEDKD_HEAD_CPUS          CPUs of the head node (default 0: the head only runs drivers)
#   MEDKD_WORKER_CPUS        CPUs per worker node (default 1)
#   MEDKD_OBJECT_STORE_BYTES object store per node (default 200000000)
#   MEDKD_AUTH               token (default) or disabled
#   RAY                      the ray executable (default: `ray` next to this repo's .venv python,
#                            else the one on PATH)
#
# Every port is explicit and outside Ray's worker port range (10002-19999), so this cluster can
# run beside another Ray cluster on the machine. Stopping never uses `ray stop` (which would kill
# every Ray process of the user): `stop` signals the process sessions this script recorded.
set -euo pipefail

STATE_DIR="${MEDKD_CLUSTER_DIR:-/tmp/medkd-local-cluster}"
GCS_PORT="${MEDKD_CLUSTER_PORT:-26379}"
DASHBOARD_PORT="${MEDKD_DASHBOARD_PORT:-28265}"
BASE_PORT="${MEDKD_CLUSTER_BASE_PORT:-26400}"
HEAD_CPUS="${MEDKD_HEAD_CPUS:-0}"
WORKER_CPUS="${MEDKD_WORKER_CPUS:-1}"
OBJECT_STORE_BYTES="${MEDKD_OBJECT_STORE_BYTES:-200000000}"
AUTH_MODE="${MEDKD_AUTH:-token}"

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${RAY:-}" ]]; then
  if [[ -x "$REPO_DIR/.venv/bin/ray" ]]; then RAY="$REPO_DIR/.venv/bin/ray"; else RAY="$(command -v ray || true)"; fi
fi
PIDS_FILE="$STATE_DIR/pids"
TOKEN_FILE="$STATE_DIR/auth_token"
RAY_TEMP_DIR="$STATE_DIR/ray"
DASHBOARD_URL="http://127.0.0.1:$DASHBOARD_PORT"

die() { echo "local_cluster: $*" >&2; exit 1; }

check_port() {  # check_port NAME PORT
  local name="$1" port="$2"
  [[ "$port" =~ ^[0-9]+$ ]] || die "$name=$port is not a port number"
  if (( port >= 10002 && port <= 19999 )); then
    die "$name=$port lies in Ray's worker port range 10002-19999; choose another"
  fi
  (( port > 0 && port < 65536 )) || die "$name=$port is not a valid port"
}

# node_ports INDEX -> the ray start flags of that node's own services (index 0 = head)
node_ports() {
  local base=$(( BASE_PORT + 10 * $1 ))
  echo "--node-manager-port=$base --object-manager-port=$(( base + 1 ))" \
       "--dashboard-agent-listen-port=$(( base + 2 )) --dashboard-agent-grpc-port=$(( base + 3 ))" \
       "--metrics-export-port=$(( base + 4 )) --runtime-env-agent-port=$(( base + 5 ))"
}

# alive PID -> true if PID is one of ours (a `ray start` using our temp dir) and still running
alive() {
  local pid="$1"
  [[ -r "/proc/$pid/cmdline" ]] || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q -- "ray start.*--temp-dir=$RAY_TEMP_DIR"
}

# session_processes LEADER -> every process in LEADER's session plus all their descendants
# (job drivers start sessions of their own, so the session alone is not enough)
session_processes() {
  ps -e -o pid=,ppid=,sid= | awk -v leader="$1" -v self="$$" '
    { pid[NR] = $1; ppid[NR] = $2; sid[NR] = $3; if ($3 == leader || $1 == leader) mine[$1] = 1 }
    END {
      do {
        grew = 0
        for (i = 1; i <= NR; i++) if (!(pid[i] in mine) && (ppid[i] in mine)) { mine[pid[i]] = 1; grew = 1 }
      } while (grew)
      for (p in mine) if (p != self) print p
    }'
}

python_bin() {
  if [[ -x "$(dirname "$RAY")/python" ]]; then echo "$(dirname "$RAY")/python"; else command -v python3; fi
}

wait_for_nodes() {  # wait_for_nodes N: until the dashboard reports N alive nodes
  "$(python_bin)" - "$DASHBOARD_URL" "$1" "$TOKEN_FILE" "$AUTH_MODE" <<'PY'
import json, sys, time, urllib.error, urllib.request
url, wanted, token_file, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
headers = {"Authorization": "Bearer " + open(token_file).read().strip()} if mode == "token" else {}
deadline, alive = time.monotonic() + 180, 0
while time.monotonic() < deadline:
    try:
        request = urllib.request.Request(url + "/api/v0/nodes?detail=false&limit=1000", headers=headers)
        with urllib.request.urlopen(request, timeout=5) as response:
            nodes = json.load(response)["data"]["result"]["result"]
        alive = sum(node["state"] == "ALIVE" for node in nodes)
        if alive >= wanted:
            sys.exit(0)
    except (OSError, ValueError, KeyError):
        pass
    time.sleep(1)
sys.exit(f"only {alive} of {wanted} nodes alive after 180 s")
PY
}

start_node() {  # start_node INDEX ROLE ARGS... ; records "ROLE PID" in the pids file
  local index="$1" role="$2"; shift 2
  # setsid: the node gets a session of its own, so `stop` can find all of its processes.
  # Each node gets its own temp dir: nodes sharing one would share runtime_env folders, and one
  # node's clean-up would delete a job's working directory under another node's feet.
  env -u RAY_ADDRESS -u RAY_API_SERVER_ADDRESS "${NODE_ENV[@]}" \
    setsid "$RAY" start --block --temp-dir="$RAY_TEMP_DIR/n$index" --disable-usage-stats "$@" \
    > "$STATE_DIR/$role.log" 2>&1 < /dev/null &
  echo "$role $!" >> "$PIDS_FILE"
}

cmd_start() {
  local workers="${1:-2}"
  [[ "$workers" =~ ^[0-9]+$ ]] || die "N_WORKERS must be a number, got '$workers'"
  [[ -n "$RAY" && -x "$RAY" ]] || die "ray not found: install the project (make setup) or set RAY=/path/to/ray"
  case "$AUTH_MODE" in token|disabled) ;; *) die "MEDKD_AUTH must be token or disabled, got '$AUTH_MODE'";; esac
  check_port MEDKD_CLUSTER_PORT "$GCS_PORT"
  check_port MEDKD_DASHBOARD_PORT "$DASHBOARD_PORT"
  check_port MEDKD_CLUSTER_BASE_PORT "$BASE_PORT"
  check_port "the last node port" $(( BASE_PORT + 10 * workers + 6 ))
  if (( BASE_PORT < 20000 && BASE_PORT + 10 * workers + 6 >= 10002 )); then
    die "node ports $BASE_PORT..$(( BASE_PORT + 10 * workers + 6 )) overlap Ray's worker port range 10002-19999"
  fi
  if [[ -s "$PIDS_FILE" ]]; then
    while read -r _ pid; do
      alive "$pid" && die "already running (pids in $PIDS_FILE); run '$0 stop' first"
    done < "$PIDS_FILE"
  fi

  mkdir -p "$STATE_DIR"
  : > "$PIDS_FILE"
  # PATH: a job's `python` must be the interpreter Ray (and medkd) are installed in.
  NODE_ENV=(RAY_AUTH_MODE="$AUTH_MODE" RAY_USAGE_STATS_ENABLED=0 PATH="$(dirname "$RAY"):$PATH")
  if [[ "$AUTH_MODE" == token ]]; then
    if [[ ! -s "$TOKEN_FILE" ]]; then
      (umask 077; "$(python_bin)" -c 'import secrets; print(secrets.token_hex(32))' > "$TOKEN_FILE")
    fi
    NODE_ENV+=(RAY_AUTH_TOKEN_PATH="$TOKEN_FILE")
  fi

  echo "starting head node: GCS 127.0.0.1:$GCS_PORT, dashboard $DASHBOARD_URL"
  # shellcheck disable=SC2046  # node_ports prints separate flags on purpose
  start_node 0 head --head --node-ip-address=127.0.0.1 --port="$GCS_PORT" \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --ray-client-server-port=$(( BASE_PORT + 9 )) \
    --num-cpus="$HEAD_CPUS" --num-gpus=0 --object-store-memory="$OBJECT_STORE_BYTES" $(node_ports 0)
  if ! wait_for_nodes 1; then
    tail -n 30 "$STATE_DIR/head.log" >&2
    cmd_stop
    die "the head node did not come up (log: $STATE_DIR/head.log)"
  fi

  local i
  for (( i = 1; i <= workers; i++ )); do
    echo "starting worker node $i ($WORKER_CPUS CPU)"
    # shellcheck disable=SC2046
    start_node "$i" "worker$i" --address="127.0.0.1:$GCS_PORT" \
      --node-ip-address=127.0.0.1 --num-cpus="$WORKER_CPUS" --num-gpus=0 \
      --object-store-memory="$OBJECT_STORE_BYTES" $(node_ports "$i")
  done

  if ! wait_for_nodes $(( workers + 1 )); then
    cmd_stop
    die "not every worker node joined (logs: $STATE_DIR/worker*.log)"
  fi

  echo
  echo "local Ray cluster up: 1 head + $workers worker node(s); state in $STATE_DIR"
  echo "  dashboard / Jobs API: $DASHBOARD_URL"
  [[ "$AUTH_MODE" == token ]] && echo "  export RAY_AUTH_TOKEN_PATH=$TOKEN_FILE"
  echo "  medkd submit examples/quickstart.yaml --address $DASHBOARD_URL"
  echo "  $0 status | stop"
}

cmd_status() {
  [[ -s "$PIDS_FILE" ]] || { echo "not running (no $PIDS_FILE)"; return 0; }
  local role pid
  while read -r role pid; do
    if alive "$pid"; then echo "$role: running (session $pid)"; else echo "$role: not running"; fi
  done < "$PIDS_FILE"
  echo "dashboard: $DASHBOARD_URL"
  if [[ -s "$TOKEN_FILE" ]]; then
    RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN_FILE" "$RAY" status --address="127.0.0.1:$GCS_PORT" 2>/dev/null || true
  else
    RAY_AUTH_MODE=disabled "$RAY" status --address="127.0.0.1:$GCS_PORT" 2>/dev/null || true
  fi
}

cmd_stop() {
  [[ -s "$PIDS_FILE" ]] || { echo "not running (no $PIDS_FILE)"; return 0; }
  local role pid targets=()
  # Workers first, then the head (reverse start order).
  while read -r role pid; do
    if alive "$pid"; then
      mapfile -t -O "${#targets[@]}" targets < <(session_processes "$pid")
      echo "stopping $role (session $pid)"
    fi
  done < <(tac "$PIDS_FILE")
  if (( ${#targets[@]} )); then
    kill -TERM "${targets[@]}" 2>/dev/null || true
    local waited=0
    while (( waited < 5 )); do
      local left=()
      for pid in "${targets[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then left+=("$pid"); fi
      done
      (( ${#left[@]} )) || break
      sleep 1; waited=$(( waited + 1 ))
    done
    for pid in "${targets[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
    done
  fi
  rm -f "$PIDS_FILE"
  rm -rf "$RAY_TEMP_DIR"
  echo "stopped; logs kept in $STATE_DIR (*.log)"
}

case "${1:-}" in
  start) shift; cmd_start "$@" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start [N_WORKERS] | status | stop" >&2; exit 2 ;;
esac
