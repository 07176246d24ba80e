#!/usr/bin/env bash
# Counts the instructions a server executes per Authorize call under valgrind's callgrind: a
# figure that does not depend on how busy the machine is, unlike the bench's rates.
#
#   bench/callgrind.sh chargegate      # target/release/chargegate serve, embedded defaults
#   bench/callgrind.sh echo            # the bench's bare tonic echo server
#
# It starts the server under callgrind, drives it with `chargegate-bench --quick --scenario g1
# --target` (closed loop, C=200), stops it, and prints the total, the calls served and the
# instructions per call. Start-up and shutdown are measured in a run without calls and left out.
# Needs valgrind and a release build (`cargo build --release`).
set -euo pipefail

which=${1:?usage: bench/callgrind.sh chargegate|echo}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

case $which in
chargegate)
    printf 'station_id,driver_token\n*,BENCH-TOKEN-0001-allowed\n' >"$work/acl.csv"
    server=("$root/target/release/chargegate" serve --listen 127.0.0.1:0 --metrics-listen off
        --token-hash-key bench-token-hash-key --data-dir "$work/data" --acl-file "$work/acl.csv")
    ;;
echo)
    server=("$root/target/release/chargegate-bench" echo-server)
    ;;
*)
    echo "unknown server: $which" >&2
    exit 64
    ;;
esac

# Runs the server under callgrind, with g1's quick closed loop against it when $1 is "load";
# leaves the profile in $work/$1.
profile() {
    NO_COLOR=1 valgrind --tool=callgrind --callgrind-out-file="$work/$1" "${server[@]}" >"$work/log" 2>&1 &
    local pid=$! addr=
    for _ in $(seq 1 300); do
        addr=$(sed 's/\x1b\[[0-9;]*m//g' "$work/log" | grep -o 'listen=[0-9.:]*' | head -1 | cut -d= -f2 || true)
        [ -n "$addr" ] && break
        sleep 0.2
    done
    [ -n "$addr" ] || { echo "the server did not start:" >&2; cat "$work/log" >&2; exit 1; }
    if [ "$1" = load ]; then
        "$root/target/release/chargegate-bench" --quick --scenario g1 --target "http://$addr" \
            --json "$work/bench.json" >/dev/null 2>&1
    fi
    kill -TERM "$pid"
    wait "$pid" || true
    rm -rf "$work/data"
}

total() {
    callgrind_annotate "$work/$1" 2>/dev/null >"$work/$1.flat"
    grep -m1 'PROGRAM TOTALS' "$work/$1.flat" | awk '{gsub(",", "", $1); print $1}'
}

profile idle
profile load
callgrind_annotate --tree=caller "$work/load" 2>/dev/null >"$work/callers.txt"
idle=$(total idle)
loaded=$(total load)
# Calls served: each request's headers are received once, so the calls h2's `recv_headers` makes
# into its callees are counted per request; the most frequent count is the number of requests.
calls=$(grep -E '< .*DynStreams<B>::recv_headers \(' "$work/callers.txt" |
    grep -oE '\([0-9,]+x\)' | tr -d '(),x' | sort | uniq -c | sort -rn | head -1 | awk '{print $2}')
echo "$which: $loaded instructions serving $calls calls, $idle starting and stopping idle: $(((loaded - idle) / calls)) per call"
