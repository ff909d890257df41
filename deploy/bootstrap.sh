#!/usr/bin/env bash
# Install the Debian packages powerq's workers, tests and demo need, only those missing.
# Idempotent; run as root or with sudo available. Used by `make venv`.
set -euo pipefail

packages=(
  python3-venv python3-dev gcc pkg-config   # virtual environment; libvirt-python builds from source
  libvirt-dev                               # libvirt-python's headers
  libvirt-daemon libvirt-clients            # libvirtd serving the test driver (simulated hypervisors)
  ipmitool freeipmi-tools                   # IPMI cross-check clients and benchmark references
)
command -v redis-server >/dev/null 2>&1 || packages+=(redis-server)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "bootstrap: apt-get not found; install these yourself: ${missing[*]}" >&2
  exit 1
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "bootstrap: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
