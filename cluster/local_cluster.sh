#!/usr/bin/env bash
# A local multi-node Ray cluster on this machine: a thin wrapper around
# `medkd cluster local up | status | down` (medkd/cli/cluster.py holds the one implementation).
#
#   cluster/local_cluster.sh start [N_WORKERS] [--netns]   # default 2 workers, 1 CPU each
#   cluster/local_cluster.sh status
#   cluster/local_cluster.sh stop                          # stops only what `start` started
#
# Loopback mode puts every node on 127.0.0.1; --netns (root) gives the head and each worker a
# network namespace and an address of their own on a private bridge (10.213.X.0/24), plus the
# shared soft-label Redis bound to the head's address. `start` prints the dashboard URL, the
# RAY_AUTH_TOKEN_PATH to export and the cache.redis_url / cache.password_env to use.
#
# Settings (environment variables, read by medkd/cli/cluster.py):
#   MEDKD_CLUSTER_DIR        state dir: pids, token, logs, Ray's temp dirs (default /tmp/medkd-local-cluster;
#                            keep it short, Ray's unix sockets live below it)
#   MEDKD_CLUSTER_PORT       the head's GCS port (default 26379)
#   MEDKD_DASHBOARD_PORT     the dashboard / Jobs API port (default 28265)
#   MEDKD_CLUSTER_BASE_PORT  first of the per-node service ports (default 26400)
#   MEDKD_REDIS_PORT         the cluster's Redis (default 26390)
#   MEDKD_HEAD_CPUS          CPUs of the head node (default 0: the head only runs drivers)
#   MEDKD_WORKER_CPUS        CPUs per worker node (default 1)
#   MEDKD_OBJECT_STORE_BYTES object store per node (default 200000000)
#   MEDKD_AUTH               token (default) or disabled
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -x "$REPO_DIR/.venv/bin/python" ]]; then PYTHON="$REPO_DIR/.venv/bin/python"; else PYTHON="$(command -v python3)"; fi
medkd_cluster() { PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m medkd.cli.main cluster local "$@"; }

case "${1:-}" in
  start)
    shift
    args=()
    for arg in "$@"; do
      case "$arg" in
        --netns) args+=(--netns) ;;
        *[!0-9]*|'') echo "local_cluster: N_WORKERS must be a number, got '$arg'" >&2; exit 1 ;;
        *) args+=(--workers "$arg") ;;
      esac
    done
    medkd_cluster up "${args[@]}" ;;
  stop) medkd_cluster down ;;
  status) medkd_cluster status ;;
  *) echo "usage: $0 start [N_WORKERS] [--netns] | status | stop" >&2; exit 2 ;;
esac
