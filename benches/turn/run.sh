#!/usr/bin/env bash
# TURN relay cost: talkbox turn vs coturn 4.6.1, the same turnutils_uclient loads in one run.
#
# Both servers run on loopback with the TURN REST secret scheme, relay ranges below the
# ephemeral range, and loopback peers allowed (bench only). The server under test is pinned to
# CPU 0; turnutils_uclient and turnutils_peer share CPU 1. For each load the server's CPU time
# (user+system, /proc/PID/stat) is divided by the packets it relayed: every echoed message is
# two relays (client -> peer and peer -> client), so relayed = sent + received.
#
# usage: benches/turn/run.sh TALKBOX_BIN OUT_DIR
# Writes OUT_DIR/turn.md (a markdown section) and OUT_DIR/turn/*.log.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../lib.sh"
bin=$1; out=$2
require turnserver turnutils_uclient turnutils_peer turnutils_stunclient taskset
work="$out/turn"; rm -rf "$work"; mkdir -p "$work"
secret=bench-static-secret-0123456789abcdef0123456789
tick=$(clk_tck)

# Loads: clients x messages x bytes, ms between messages per client, channels (-c = ChannelData).
# Rates rise until loss appears; each run is bounded by `timeout`. (m100 and m200 at -z 10 were
# dropped to keep run-all inside 15 minutes: their ratios lay between m50's and m200z5's.)
loads=(
  "m50  -n 1000 -m 50  -l 1200 -z 10 -c"
  "m200z5 -n 1000 -m 200 -l 1200 -z 5 -c"
  "m300z5 -n 800 -m 300 -l 1200 -z 5 -c"
)

start_talkbox() {
  local d="$work/talkbox-data"
  cat > "$work/talkbox.toml" <<CONF
[supervisor]
log_level = "warn"
[signaling]
enabled = false
[web]
enabled = false
[sfu]
enabled = false
[turn]
listen_address = "127.0.0.1"
port = 3578
tls_port = 5449
relay_port_min = 22000
relay_port_max = 25999
allowed_peers = ["127.0.0.0/8"]
max_allocations_per_user = 1000
CONF
  # The supervisor prepares secrets and certificate; only the turn service runs.
  "$bin" run --data-dir "$d" --config "$work/talkbox.toml" > "$work/talkbox.log" 2>&1 &
  echo $! > "$work/supervisor.pid"
  wait_stun 3578
  "$bin" status --json --data-dir "$d" \
    | python3 -c 'import json,sys; print(next(s["pid"] for s in json.load(sys.stdin)["services"] if s["name"] == "turn"))' \
    > "$work/server.pid"
  printf '%s' "$(cat "$d/secrets/turn-secret")"
}

start_coturn() {
  cat > "$work/turnserver.conf" <<CONF
listening-ip=127.0.0.1
relay-ip=127.0.0.1
listening-port=3678
min-port=26000
max-port=29999
use-auth-secret
static-auth-secret=$secret
realm=bench.local
fingerprint
no-tls
no-dtls
no-cli
allow-loopback-peers
no-multicast-peers
userdb=$work/turndb
pidfile=$work/turnserver.pid
log-file=$work/coturn.log
simple-log
CONF
  turnserver -c "$work/turnserver.conf" > "$work/coturn.stdout" 2>&1 &
  echo $! > "$work/server.pid"
  wait_stun 3678
  printf '%s' "$secret"
}

# run_load NAME PORT SECRET LABEL ARGS... -> one result line
run_load() {
  local server=$1 port=$2 sec=$3 label=$4; shift 4
  local pid; pid=$(cat "$work/server.pid")
  pin_all "$pid" 0
  local c0 t0 c1 t1 rc log="$work/${server}_${label}.log"
  c0=$(cpu_ticks "$pid"); t0=$(date +%s.%N)
  set +e
  timeout 120 taskset -c 1 turnutils_uclient -W "$sec" -e 127.0.0.1 -r 3480 -X -p "$port" "$@" 127.0.0.1 > "$log" 2>&1
  rc=$?
  set -e
  c1=$(cpu_ticks "$pid"); t1=$(date +%s.%N)
  local sent recv lost
  # A failed run prints none of these; it is then reported with rc and 100 % loss.
  sent=$( { grep -o 'tot_send_msgs=[0-9]*' "$log" || true; } | tail -1 | cut -d= -f2)
  recv=$( { grep -o 'tot_recv_msgs=[0-9]*' "$log" || true; } | tail -1 | cut -d= -f2)
  lost=$( { grep -o 'Total lost packets [0-9]* ([0-9.]*%)' "$log" || true; } | tail -1 | sed 's/.*(\(.*\)%)/\1/')
  awk -v s="$server" -v l="$label" -v rc="$rc" -v c0="$c0" -v c1="$c1" -v tk="$tick" -v t0="$t0" -v t1="$t1" \
      -v sent="${sent:-0}" -v recv="${recv:-0}" -v lost="${lost:-100}" -v args="$*" 'BEGIN {
    cpu = (c1 - c0) / tk; relayed = sent + recv; wall = t1 - t0
    us = relayed > 0 ? cpu * 1e6 / relayed : 0
    printf "%s|%s|%s|%d|%d|%s|%.2f|%.2f|%.1f|%d\n", s, l, args, sent, recv, lost, wall, cpu, us, rc
  }'
}

turnutils_peer -L 127.0.0.1 -p 3480 > "$work/peer.log" 2>&1 &
peer=$!
cleanup() {
  stop_pid "$peer"
  for f in supervisor.pid server.pid; do [ -f "$work/$f" ] && stop_pid "$(cat "$work/$f")"; done
  return 0
}
trap cleanup EXIT
taskset -cp 1 "$peer" >/dev/null

load0=$(cut -d' ' -f1-3 /proc/loadavg)
results="$work/results.txt"; : > "$results"; : > "$work/rss.txt"
# A fresh server for every load: uclient reuses local ports, and allocations a finished run
# leaves behind (they live 600 s) would answer the next run's clients with 437.
for l in "${loads[@]}"; do
  for server in talkbox coturn; do
    rm -rf "$work/talkbox-data"
    if [ "$server" = talkbox ]; then sec=$(start_talkbox); port=3578; else sec=$(start_coturn); port=3678; fi
    # shellcheck disable=SC2086
    run_load "$server" "$port" "$sec" $l >> "$results"
    tail -1 "$results" >&2
    echo "$server|${l%% *}|$(peak_rss_kb "$(cat "$work/server.pid")")" >> "$work/rss.txt"
    if [ "$server" = talkbox ]; then stop_pid "$(cat "$work/supervisor.pid")"; else stop_pid "$(cat "$work/server.pid")"; fi
    rm -f "$work/server.pid" "$work/supervisor.pid"
  done
done

# Profile: one more run of the first load per server with `perf stat` (system calls and context
# switches per relayed packet: unlike CPU time they do not depend on what else loads the
# machine) and, for talkbox, `perf record` (flat profile; the release build has symbols).
: > "$work/stat.txt"
if command -v perf >/dev/null; then
  pl=${loads[0]}
  for server in talkbox coturn; do
    rm -rf "$work/talkbox-data"
    if [ "$server" = talkbox ]; then sec=$(start_talkbox); port=3578; else sec=$(start_coturn); port=3678; fi
    # shellcheck disable=SC2086
    run_load "$server" "$port" "$sec" profile ${pl#* } > "$work/profile-$server.txt" &
    lp=$!
    sleep 1
    pid=$(cat "$work/server.pid")
    timeout 30 perf stat -x, -o "$work/stat-$server.csv" -p "$pid" \
      -e raw_syscalls:sys_enter,context-switches -- sleep 8 > /dev/null 2>&1 &
    st=$!
    if [ "$server" = talkbox ]; then
      timeout 30 perf record -q -F 999 -p "$pid" -o "$work/perf.data" -- sleep 8 > "$work/perf-record.log" 2>&1 || true
    fi
    wait "$st" || true
    wait "$lp" || true
    # Packets relayed over the 8 s window: the load's rate (messages/s both ways) times 8.
    awk -F, -v s="$server" -v r="$(awk -F'|' '{ printf "%.0f", ($4 + $5) / ($7 > 0 ? $7 : 1) }' "$work/profile-$server.txt")" '
      $3 == "raw_syscalls:sys_enter" { sc = $1 } $3 == "context-switches" { cs = $1 }
      END { if (r > 0) printf "%s|%.2f|%.3f\n", s, sc / (r * 8), cs / (r * 8) }' "$work/stat-$server.csv" >> "$work/stat.txt"
    if [ "$server" = talkbox ]; then stop_pid "$(cat "$work/supervisor.pid")"; else stop_pid "$(cat "$work/server.pid")"; fi
    rm -f "$work/server.pid" "$work/supervisor.pid"
  done
  [ ! -f "$work/perf.data" ] || perf report -i "$work/perf.data" --stdio --no-children --sort dso,symbol --percent-limit 1 2>/dev/null \
    | grep -v '^#' | grep -v '^$' | sed -E 's/[[:space:]]+-[[:space:]]+-[[:space:]]*$//' | head -30 > "$work/profile.txt"
fi

# Render the section.
{
  echo "## TURN relay: talkbox vs coturn"
  echo
  echo "Command: \`benches/turn/run.sh target/release/talkbox benches/results\` (part of \`benches/run-all\`)."
  echo "Server pinned to CPU 0; \`turnutils_uclient\` and \`turnutils_peer\` on CPU 1; 1200-byte messages over"
  echo "ChannelData (\`-c\`), echoed by \`turnutils_peer\`; CPU = user+system time of the server process;"
  echo "relayed packets = sent + received messages. Machine load average (1/5/15 min) at the start of"
  echo "this part: $load0 (other jobs shared the two CPUs: compare the two servers' rows, not absolute numbers)."
  echo
  echo "| load | uclient args | server | sent | received | loss % | server CPU s | µs CPU / relayed packet |"
  echo "|---|---|---|---|---|---|---|---|"
  awk -F'|' '{printf "| %s | `%s` | %s | %s | %s | %s | %s | %s |\n", $2, $3, $1, $4, $5, $6, $8, $9}' "$results" | sort -t'|' -k2,2 -s
  echo
  awk -F'|' '
    { key=$2; if ($1=="talkbox") t[key]=$9; else c[key]=$9; if ($6+0 < 0.1 && $10==0) ok[$1]=$2 }
    END {
      print "| load | talkbox µs/pkt | coturn µs/pkt | talkbox / coturn |"
      print "|---|---|---|---|"
      n = 0
      for (k in t) if (k in c && c[k] > 0) { printf "| %s | %.1f | %.1f | %.2f |\n", k, t[k], c[k], t[k]/c[k] }
      print ""
      printf "Highest load with < 0.1 %% loss: talkbox `%s`, coturn `%s`.\n", ok["talkbox"], ok["coturn"]
    }' "$results"
  echo
  awk -F'|' '{ if ($3 > peak[$1]) peak[$1] = $3 } END { printf "Peak RSS of the server process over the loads: talkbox turn %d KiB, coturn %d KiB.\n", peak["talkbox"], peak["coturn"] }' "$work/rss.txt"
  if [ -s "$work/stat.txt" ]; then
    echo
    echo "System calls and context switches of the server per relayed packet over 8 s of one more \`${loads[0]%% *}\`"
    echo "run each (\`perf stat -p PID\`; rate from the whole run):"
    echo
    echo "| server | system calls / packet | context switches / packet |"
    echo "|---|---|---|"
    awk -F'|' '{ printf "| %s | %s | %s |\n", $1, $2, $3 }' "$work/stat.txt"
  fi
  if [ -s "$work/profile.txt" ]; then
    echo
    echo "Profile of \`talkbox turn\` during that run (\`perf record -F 999 -p PID\`, then"
    echo "\`perf report --no-children --sort dso,symbol\`, entries of at least 1 %):"
    echo
    echo '```'
    cat "$work/profile.txt"
    echo '```'
  fi
} > "$out/turn.md"
cat "$out/turn.md"
