#!/usr/bin/env bash
# Installs everything the testbed needs on a Debian 12 / Ubuntu 22.04+ machine, as root:
# system packages, a running Docker daemon, the Python virtualenv and the agent image.
# Idempotent: a second run only checks, and takes a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '==> %s\n' "$*"; }
die() { printf 'setup: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (the testbed creates namespaces, links and qdiscs)"
command -v apt-get >/dev/null || die "needs a Debian or Ubuntu machine (apt-get not found)"

# --- system packages -------------------------------------------------------------------
# command -> Debian package that provides it
declare -A NEED=(
  [mn]=mininet [mnexec]=mininet [brctl]=bridge-utils [ip]=iproute2 [tc]=iproute2
  [ifconfig]=net-tools [iperf3]=iperf3 [ping]=iputils-ping [debootstrap]=debootstrap
  [prometheus]=prometheus
)
missing=()
for cmd in "${!NEED[@]}"; do command -v "$cmd" >/dev/null || missing+=("${NEED[$cmd]}"); done
command -v dockerd >/dev/null || missing+=(docker.io)
/usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  say "installing system packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  say "system packages present"
fi

# --- Docker daemon -----------------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    say "starting docker through systemd"
    systemctl start docker
  else
    # No systemd: run the daemon ourselves. --iptables=false keeps Docker from setting the
    # FORWARD policy to DROP, which would drop every packet crossing the emulated bridges.
    say "starting dockerd (log: /var/log/dualpath-dockerd.log)"
    nohup dockerd --iptables=false --bridge=none >/var/log/dualpath-dockerd.log 2>&1 &
  fi
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || die "the Docker daemon did not come up; see /var/log/dualpath-dockerd.log"
else
  say "docker daemon running"
fi

# --- Python virtualenv -------------------------------------------------------------------
# Debian's interpreter, so that Debian's Mininet package is importable; a .pth file exposes
# only the mininet package, not the rest of dist-packages.
VENV=.venv
stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  say "creating the virtualenv in $VENV"
  /usr/bin/python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e '.[test,report,annotations]'
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  mnpkg=$(/usr/bin/python3 -c 'import mininet, os; print(os.path.dirname(os.path.dirname(mininet.__file__)))')
  mkdir -p "$VENV/debian-mininet"
  ln -sfn "$mnpkg/mininet" "$VENV/debian-mininet/mininet"
  echo "$(pwd)/$VENV/debian-mininet" > "$site/debian-mininet.pth"
  "$VENV/bin/python" -c 'import mininet.net, pyroute2, docker, pydantic, prometheus_client' \
    || die "the virtualenv cannot import its dependencies"
  rm -f "$VENV"/.installed-* && touch "$stamp"
else
  say "virtualenv up to date"
fi

# --- agent image -------------------------------------------------------------------------
"$VENV/bin/testbed" image build
say "setup complete"
