#!/bin/sh
# Make sure Debian's haproxy exists: `medkd serve` runs Ray Serve behind it by default (medkd.serve.ha_proxy) with
# RAY_SERVE_ENABLE_HA_PROXY=1, which needs an haproxy binary (RAY_SERVE_HAPROXY_BINARY_PATH).
set -e
PATH="$PATH:/usr/sbin:/sbin"  # where Debian installs it; medkd looks there too
if command -v haproxy >/dev/null 2>&1; then
    exit 0
fi
echo "haproxy not found: installing Debian's haproxy package"
if [ "$(id -u)" = "0" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null
else
    echo "error: haproxy is not installed and this user cannot install packages." >&2
    echo "  Ask an administrator to run:  apt-get install -y haproxy" >&2
    exit 1
fi
command -v haproxy >/dev/null 2>&1 || { echo "error: haproxy still not found after install" >&2; exit 1; }
