#!/bin/bash
# Measures the paths of `sluice-bench compare` with wrk and iperf3 instead
# of the bench's own load, to check that both agree.
#
#   bench/scripts/crosscheck-wrk-iperf3.sh [PATHS]   (default direct,sluice,haproxy,nginx)
#
# Run from the repository root after `cargo build --release -p sluice -p sluice-bench`.
# Needs wrk, iperf3 and taskset. Everything listens on loopback and is
# stopped at the end.
set -euo pipefail
paths=${1:-direct,sluice,haproxy,nginx}
serve=$(mktemp)
taskset -c 1 iperf3 -s -B 127.0.5.3 -p 25202 -1 >/dev/null 2>&1 &
iperf=$!
target/release/sluice-bench compare --paths "$paths" --serve-for 120s \
    --bulk-backend 127.0.5.3:25202 >"$serve" 2>&1 &
bench=$!
trap 'kill $bench $iperf 2>/dev/null; rm -f "$serve"' EXIT
for _ in $(seq 50); do grep -q '^backends' "$serve" && break; sleep 0.2; done
for p in ${paths//,/ }; do
  if [ "$p" = direct ]; then
    http=$(awk '/^backends/ {print $3}' "$serve"); bulk=127.0.5.3:25202
  else
    http=$(awk -v p="$p" '$1 == p {print $3}' "$serve"); bulk=$(awk -v p="$p" '$1 == p {print $5}' "$serve")
  fi
  s=$(taskset -c 1 wrk -t1 -c64 -d3s -H 'Connection: close' "http://$http/" | awk '/Requests\/sec/ {print $2}')
  k=$(taskset -c 1 wrk -t1 -c64 -d3s "http://$http/" | awk '/Requests\/sec/ {print $2}')
  # iperf3 -s -1 serves one test: start a fresh one per path.
  kill $iperf 2>/dev/null || true; wait $iperf 2>/dev/null || true
  taskset -c 1 iperf3 -s -B 127.0.5.3 -p 25202 -1 >/dev/null 2>&1 & iperf=$!
  sleep 0.3
  i=$(taskset -c 1 iperf3 -c "${bulk%:*}" -p "${bulk#*:}" -t 3 | awk '/receiver/ {print $7" "$8}')
  echo "$p wrk-short $s/s wrk-keepalive $k/s iperf3 $i"
done
