#!/bin/bash
# System calls per short connection of a running proxy.
#
#   bench/scripts/syscalls-per-connection.sh ADDR PID LABEL
#
# Attaches strace -c to PID (all threads) while wrk opens short
# connections (`Connection: close`, 16 at a time, 2 s) to http://ADDR/, then
# divides each system call's count by the number of requests wrk completed.
# ADDR and PID come from `sluice-bench compare --serve-for 60s`.
# Needs strace, wrk and taskset (load on CPU 1, like the bench).
set -euo pipefail
addr=$1 pid=$2 label=${3:-proxy}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
strace -c -f -p "$pid" -o "$out" 2>/dev/null &
st=$!
sleep 0.5
res=$(taskset -c 1 wrk -t1 -c16 -d2s -H 'Connection: close' "http://$addr/" 2>&1)
kill -INT "$st"
wait "$st" 2>/dev/null || true
reqs=$(echo "$res" | awk '/requests in/ {print $1}')
awk -v reqs="$reqs" -v label="$label" '
  $1 ~ /^[0-9.]+$/ && NF >= 5 && $NF != "total" { calls[$NF] = $4; tot += $4 }
  END {
    printf "%s: %d connections, %.1f syscalls/connection:", label, reqs, tot / reqs
    for (c in calls) if (calls[c] / reqs >= 0.01) printf " %s %.2f", c, calls[c] / reqs
    printf "\n"
  }' "$out"
