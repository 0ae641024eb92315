#!/bin/sh
# Make sure a redis-server binary exists: medkd starts and owns a local one when the job spec
# gives no cache.redis_url.
set -e
if command -v redis-server >/dev/null 2>&1; then
    exit 0
fi
echo "redis-server not found: installing Debian's redis-server package"
if [ "$(id -u)" = "0" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
else
    echo "error: redis-server is not installed and this user cannot install packages." >&2
    echo "  Ask an administrator to run:  apt-get install -y redis-server" >&2
    echo "  or point the job at an existing server with cache.redis_url (redis:// or rediss://)." >&2
    exit 1
fi
# The Debian package starts a system-wide server on port 6379; medkd does not use it
# (it runs its own, on a free port with a password), so leave it as the package set it up.
command -v redis-server >/dev/null 2>&1 || { echo "error: redis-server still not found after install" >&2; exit 1; }
