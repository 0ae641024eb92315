#!/bin/sh
# Make sure the `ip` command (iproute2) exists: `medkd cluster local up --netns` and the tests in
# tests/cluster/ (test_netns_cluster.py, test_submit_netns.py) build network namespaces with it.
set -e
if command -v ip >/dev/null 2>&1; then
    exit 0
fi
echo "ip not found: installing Debian's iproute2 package"
if [ "$(id -u)" = "0" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null
else
    echo "error: iproute2 is not installed and this user cannot install packages." >&2
    echo "  Ask an administrator to run:  apt-get install -y iproute2" >&2
    exit 1
fi
command -v ip >/dev/null 2>&1 || { echo "error: ip still not found after install" >&2; exit 1; }
