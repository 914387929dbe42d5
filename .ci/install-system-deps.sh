#!/usr/bin/env bash
# Installs the system tools the test suite drives as real components: `promtool` / `prometheus`
# (Prometheus config, rules and a live scrape), `docker-compose` (compose file validation) and
# `node` / `npm` (a Node.js gRPC client built from the .proto files alone), `nginx` (the gRPC
# load balancer in front of replicas), `redis-server` (the shared state tier) and `chromium`
# (the playground page, driven headless by Playwright; nothing downloads a browser of its own).
#
# Idempotent: does nothing when every tool is already on PATH. As root it installs the missing
# Debian packages (one `apt-get update`, no recommends); otherwise it names what to install and
# exits non-zero so CI fails loudly instead of skipping tests.
set -euo pipefail

# tool -> Debian package that provides it
declare -A PACKAGE_FOR=(
    [promtool]=prometheus
    [prometheus]=prometheus
    [docker-compose]=docker-compose
    [node]=nodejs
    [npm]=npm
    [nginx]=nginx
    [redis-server]=redis-server
    [chromium]=chromium
)

missing_packages=()
for tool in "${!PACKAGE_FOR[@]}"; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        pkg="${PACKAGE_FOR[$tool]}"
        if [[ ! " ${missing_packages[*]-} " =~ " ${pkg} " ]]; then
            missing_packages+=("$pkg")
        fi
    fi
done

if [[ ${#missing_packages[@]} -eq 0 ]]; then
    echo "install-system-deps: promtool, prometheus, docker-compose, node, npm, nginx, redis-server and chromium already present"
    exit 0
fi

if [[ "$(id -u)" -ne 0 ]]; then
    echo "install-system-deps: missing system packages: ${missing_packages[*]}" >&2
    echo "install-system-deps: as root run: apt-get install -y --no-install-recommends ${missing_packages[*]}" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive

# The Debian prometheus, nginx and redis-server packages enable and start daemons (:9090 and :80
# on every interface, :6379). Tests start their own on 127.0.0.1, so forbid service starts during
# the install (policy-rc.d exit 101 = "action forbidden"), restoring any existing policy after.
policy=/usr/sbin/policy-rc.d
saved_policy=""
if [[ -e "$policy" ]]; then
    saved_policy="$(mktemp)"
    cp -p "$policy" "$saved_policy"
fi
restore_policy() {
    if [[ -n "$saved_policy" ]]; then
        mv -f "$saved_policy" "$policy"
    else
        rm -f "$policy"
    fi
}
trap restore_policy EXIT
printf '#!/bin/sh\nexit 101\n' >"$policy"
chmod 0755 "$policy"

apt-get update
apt-get install -y --no-install-recommends "${missing_packages[@]}"

# Belt and braces: if an init system started the daemon anyway (e.g. systemd ignores
# policy-rc.d in some setups), stop it so nothing listens on a non-loopback address, and
# disable the unit (works offline too) so a reboot does not start it either.
if command -v systemctl >/dev/null 2>&1; then
    for unit in prometheus nginx redis-server; do
        systemctl disable "$unit" >/dev/null 2>&1 || true
        if [[ -d /run/systemd/system ]]; then
            systemctl stop "$unit" >/dev/null 2>&1 || true
        fi
    done
fi
if command -v service >/dev/null 2>&1; then
    for unit in prometheus nginx redis-server; do
        service "$unit" stop >/dev/null 2>&1 || true
    done
fi

for tool in "${!PACKAGE_FOR[@]}"; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "install-system-deps: $tool still missing after install" >&2
        exit 1
    fi
done
echo "install-system-deps: installed ${missing_packages[*]}"
