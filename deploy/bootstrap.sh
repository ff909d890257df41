#!/usr/bin/env bash
# Install the Debian packages powerq's workers, tests and demo need, only those missing.
# Idempotent; run as root or with sudo available. Used by `make venv`.
set -euo pipefail

packages=(
  python3-venv python3-dev gcc pkg-config   # virtual environment; libvirt-python builds from source
  libvirt-dev                               # libvirt-python's headers
  libvirt-daemon libvirt-clients            # libvirtd serving the test driver (simulated hypervisors)
  sasl2-bin libsasl2-modules                # saslpasswd2 and DIGEST-MD5: the libvirt peer's password-checked TCP listener
  ipmitool freeipmi-tools                   # IPMI cross-check clients and benchmark references
  golang-go golang-github-vmware-govmomi-dev # vCenter simulator (tests/peers/vcsim), built offline
  chromium                                  # headless browser for the fleet page test (CDP)
  systemd                                   # systemd-analyze verify of deploy/systemd/ units (tests/test_deploy.py)
)
command -v redis-server >/dev/null 2>&1 || packages+=(redis-server)
# The RabbitMQ broker test (tests/test_broker_amqp.py) needs one on 127.0.0.1:5672.
amqp_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
amqp_up || command -v rabbitmq-server >/dev/null 2>&1 || packages+=(rabbitmq-server)

start_rabbitmq() {
  amqp_up && return 0
  echo "bootstrap: starting rabbitmq-server (nothing answers on 127.0.0.1:5672)"
  rabbitmq-server -detached >/dev/null 2>&1 || true
  for _ in $(seq 1 60); do amqp_up && return 0; sleep 1; done
  echo "bootstrap: RabbitMQ did not come up on 127.0.0.1:5672" >&2
  return 1
}

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then start_rabbitmq; exit $?; fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "bootstrap: apt-get not found; install these yourself: ${missing[*]}" >&2
  exit 1
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "bootstrap: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
start_rabbitmq
