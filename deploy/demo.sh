#!/usr/bin/env bash
# `make demo`: a simulated fleet of 3 racks x 40 nodes (IPMI, Redfish, virsh), a worker per
# rack, Flower; then query the fleet, cycle rack r2 and print the fleet's status.
# Runs until Ctrl-C; `make demo-stop` (this script with `stop`) cleans up.
set -uo pipefail
cd "$(dirname "$0")/.."
RUN="$PWD/.demo"
PQ="$PWD/.venv/bin/powerq"

stop_all() {
  if [ -f "$RUN/pids" ]; then
    while read -r pid; do kill "$pid" 2>/dev/null; done < "$RUN/pids"
    sleep 1
    while read -r pid; do kill -9 "$pid" 2>/dev/null; done < "$RUN/pids"
    rm -f "$RUN/pids"
  fi
}

if [ "${1:-}" = "stop" ]; then stop_all; echo "demo stopped"; exit 0; fi

stop_all
mkdir -p "$RUN"
: > "$RUN/pids"

# Redis: the one at REDIS_URL, else the local one, else one of our own.
if [ -z "${REDIS_URL:-}" ]; then
  if redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    REDIS_URL="redis://127.0.0.1:6379/0"
  else
    redis-server --port 6390 --bind 127.0.0.1 --save "" --appendonly no --dir "$RUN" \
      >"$RUN/redis.log" 2>&1 &
    echo $! >> "$RUN/pids"
    REDIS_URL="redis://127.0.0.1:6390/0"
    sleep 0.5
  fi
fi
export POWERQ_REDIS_URL="$REDIS_URL"
export POWERQ_KEY_PREFIX="powerq-demo"          # the demo's keys only; nothing else is touched
export POWERQ_SECRET_KEY_FILE="$RUN/secret.key"
export POWERQ_FLOWER_BASIC_AUTH="admin:$(head -c 12 /dev/urandom | base64 | tr -d '/+=')"
echo "Redis: $REDIS_URL (keys under powerq-demo:)"

echo "starting the simulated fleet (3 racks x 40 nodes)..."
rm -rf "$RUN/sim"
"$PQ" sim --dir "$RUN/sim" --racks 3 --mix ipmi=20,redfish=10,virsh=10 --initial on >"$RUN/sim.log" 2>&1 &
echo $! >> "$RUN/pids"
for _ in $(seq 1 120); do [ -f "$RUN/sim/fleet.json" ] && break; sleep 0.5; done
[ -f "$RUN/sim/fleet.json" ] || { echo "the simulated fleet did not start; see $RUN/sim.log"; stop_all; exit 1; }

"$PQ" inventory load "$RUN/sim/inventory.yaml" || { stop_all; exit 1; }

for rack in r1 r2 r3; do
  "$PQ" worker --rack "$rack" --loglevel WARNING >"$RUN/worker-$rack.log" 2>&1 &
  echo $! >> "$RUN/pids"
done
"$PQ" flower >"$RUN/flower.log" 2>&1 &
echo $! >> "$RUN/pids"

for _ in $(seq 1 60); do
  [ "$("$PQ" workers --json 2>/dev/null | grep -c 'powerq.rack')" -ge 3 ] && break
  sleep 0.5
done

echo; echo "== powerq query @all --wait"
"$PQ" query @all --wait
echo; echo "== powerq cycle @rack:r2 --wait --yes"
"$PQ" cycle @rack:r2 --wait --yes
"$PWD/.venv/bin/python" -m tests.peers.fleet --dir "$RUN/sim" --report r2
echo; echo "== powerq off @rack:r3 --wait --yes   (then the fleet has some nodes off)"
"$PQ" off @rack:r3 --wait --yes | tail -1
echo; echo "== powerq status"
"$PQ" status
echo
echo "Flower: http://127.0.0.1:5555/  user/password: ${POWERQ_FLOWER_BASIC_AUTH/:/ \/ }"
echo "Try:    POWERQ_REDIS_URL=$REDIS_URL POWERQ_KEY_PREFIX=powerq-demo POWERQ_SECRET_KEY_FILE=$RUN/secret.key $PQ status @rack:r1"
echo "Running until Ctrl-C (or \`make demo-stop\`)."
trap 'stop_all; echo; echo "demo stopped"; exit 0' INT TERM
while true; do sleep 1; done
