#!/usr/bin/env bash
# Signaling: talkbox signaling vs Debian's nextcloud-spreed-signaling 0.4.1, same loads, same run.
#
# Both servers run in one network namespace that has only loopback (the Debian load client
# starts its fake Talk endpoint on "the first non-loopback address", which then is none, and
# binds all of the namespace's loopback). Each server is started pinned to CPU 0 (so Go's
# GOMAXPROCS and tokio's worker count both see one CPU); the load clients run on CPU 1.
#
# 1. Throughput: Debian's `nextcloud-spreed-signaling-client`, 100 clients sending `message`s
#    to random sessions (1 ms pause after each) for RUN_SECS; messages/s from its own stats
#    line, server CPU (user+system from /proc/PID/stat) per message received.
# 2. Latency at fixed rates: `sigbench load` (benches/sigbench), 100 hello'd sessions sending
#    messages stamped with their send time to random sessions at a fixed total rate; p50/p90/
#    p99/max from the receivers' own clocks, server CPU per message.
# 3. Idle sessions: `sigbench idle` opens hello'd WebSocket sessions from 8 source addresses in
#    steps (IDLE_STEPS) and holds them; the server's RSS (VmRSS) is read at each step, minus its
#    RSS before the first session.
#
# usage: benches/signaling/run.sh TALKBOX_BIN OUT_DIR [SIGBENCH_BIN]
# Writes OUT_DIR/signaling.md (a markdown section) and OUT_DIR/signaling/*.log.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../lib.sh"
bin=$1; out=$2
sigbench=${3:-}
if [ -z "$sigbench" ]; then
  (cd "$here/../.." && cargo build --release -p sigbench)
  sigbench="$here/../../target/release/sigbench"
fi
client=/usr/bin/nextcloud-spreed-signaling-client
server=/usr/bin/nextcloud-spreed-signaling-server
require ip taskset "$client" "$server" "$sigbench"
work="$out/signaling"; rm -rf "$work"; mkdir -p "$work"
tick=$(clk_tck)
RUN_SECS=${RUN_SECS:-25}            # the client reports every 10 s: two reports
LAT_RATES=${LAT_RATES:-"2000 10000"}
LAT_SECS=${LAT_SECS:-10}
ns=tbsig-$$
N=(ip netns exec "$ns")
# Every session is a descriptor in the server and in sigbench; the limit is inherited by what
# we start. Raising the hard limit needs CAP_SYS_RESOURCE, which some containers lack: then the
# idle steps stop below the hard limit and the table projects to 100 000.
ulimit -Hn 1048576 2>/dev/null || true
ulimit -n "$(ulimit -Hn)"
nofile=$(ulimit -n)
if [ "$nofile" -ge 110000 ]; then default_steps=10000,50000,100000
else m=$(( (nofile - 1000) / 1000 * 1000 )); default_steps=$((m / 4)),$((m / 2)),$m; fi
IDLE_STEPS=${IDLE_STEPS:-$default_steps}

ip netns add "$ns"
"${N[@]}" ip link set lo up
# Per-namespace: a wider ephemeral range (8 source addresses x 64k ports covers 200k sessions).
"${N[@]}" sysctl -qw net.ipv4.ip_local_port_range="1024 65535"
"${N[@]}" sysctl -qw net.core.somaxconn=4096

pids=()
cleanup() {
  for p in "${pids[@]}"; do stop_pid "$p"; done
  for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
  ip netns del "$ns" 2>/dev/null || true
  return 0
}
trap cleanup EXIT

wait_port() {
  local port=$1
  for _ in $(seq 1 200); do
    if "${N[@]}" bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "bench: nothing listens on 127.0.0.1:$port in $ns" >&2
  return 1
}

# --- talkbox: the supervisor prepares data dir and secrets; only signaling runs -------------
tb_data="$work/talkbox-data"
cat > "$work/talkbox.toml" <<CONF
[supervisor]
log_level = "warn"
[signaling]
listen = "127.0.0.1:18443"
http_listen = "127.0.0.1:18080"
allow_all = true
sfu_url = ""
max_sessions = 300000
builtin_backend = false
[turn]
enabled = false
[sfu]
enabled = false
[web]
enabled = false
CONF
start_talkbox() {
  "${N[@]}" taskset -c 0 "$bin" run --data-dir "$tb_data" --config "$work/talkbox.toml" >> "$work/talkbox.log" 2>&1 &
  echo $! > "$work/supervisor.pid"
  wait_port 18080
  "$bin" status --json --data-dir "$tb_data" \
    | python3 -c 'import json,sys; print(next(s["pid"] for s in json.load(sys.stdin)["services"] if s["name"] == "signaling"))'
}
stop_talkbox() { stop_pid "$(cat "$work/supervisor.pid")"; }

# --- Debian nextcloud-spreed-signaling 0.4.1 -------------------------------------------------
rnd() { head -c 64 /dev/urandom | od -An -tx1 | tr -d ' \n' | head -c "$1"; }
nss_secret=$(rnd 48); nss_hash=$(rnd 32); nss_block=$(rnd 32)
cat > "$work/nss-server.conf" <<CONF
[http]
listen = 127.0.0.1:28080
[app]
debug = false
[sessions]
hashkey = $nss_hash
blockkey = $nss_block
[clients]
internalsecret = $(rnd 32)
[backend]
allowall = true
secret = $nss_secret
timeout = 10
[nats]
url = :loopback:
[mcu]
[turn]
CONF
start_nss() {
  "${N[@]}" taskset -c 0 "$server" -config "$work/nss-server.conf" >> "$work/nss.log" 2>&1 &
  local p=$!
  wait_port 28080
  echo "$p"
}

# The Debian client checks the servers' request checksums with [backend] secret and decodes
# session ids with the [sessions] keys (talkbox: the first 32 bytes of its block key).
client_conf() { # NAME SECRET HASH BLOCK
  printf '[backend]\nsecret = %s\n[sessions]\nhashkey = %s\nblockkey = %s\n' "$2" "$3" "$4" > "$work/client-$1.conf"
}

# throughput NAME PORT PID -> name|sent/s|recv/s|recv|cpu s|µs/msg|slow|errors|rc
throughput() {
  local name=$1 port=$2 pid=$3 log="$work/client-$1.log" c0 c1 rc
  c0=$(cpu_ticks "$pid")
  set +e
  # System calls and context switches of the server over the run: unlike CPU time they do not
  # depend on what else loads the machine.
  local st_pid=""
  if command -v perf >/dev/null; then
    timeout $((RUN_SECS + 20)) perf stat -x, -o "$work/stat-$name.csv" -p "$pid" \
      -e raw_syscalls:sys_enter,context-switches -- sleep "$RUN_SECS" > /dev/null 2>&1 &
    st_pid=$!
  fi
  "${N[@]}" taskset -c 1 timeout -s INT -k 10 "$RUN_SECS" "$client" -addr "127.0.0.1:$port" \
    -config "$work/client-$name.conf" -maxClients 100 > "$log" 2>&1
  rc=$?
  [ -z "$st_pid" ] || wait "$st_pid"
  set -e
  c1=$(cpu_ticks "$pid")
  local sys cs
  sys=$(awk -F, '$3 == "raw_syscalls:sys_enter" {print $1}' "$work/stat-$name.csv" 2>/dev/null || true)
  cs=$(awk -F, '$3 == "context-switches" {print $1}' "$work/stat-$name.csv" 2>/dev/null || true)
  # "Stats: sent=S (s/sec), recv=R (r/sec), delta=D"; the last line covers the whole run.
  local st; st=$( { grep -o 'Stats: .*' "$log" || true; } | tail -1)
  local slow errs
  slow=$(grep -c 'Message took' "$log" || true)
  # Lines are "DATE TIME I | text"; "Unsupported message type: …Error:<nil>…" (the welcome,
  # unknown to 0.4.1's client) is not an error.
  errs=$(grep -cE '\| (Received error|Received bye|Error|Could not send)' "$log" || true)
  awk -v n="$name" -v st="$st" -v c0="$c0" -v c1="$c1" -v tk="$tick" -v slow="$slow" -v errs="$errs" -v rc="$rc" \
      -v sys="${sys:-0}" -v cs="${cs:-0}" 'BEGIN {
    split(st, a, /[=( ,)]+/)
    # a: Stats: sent S s/sec recv R r/sec delta D
    sent = a[3]; srate = a[4]; recv = a[6]; rrate = a[7]
    sub(/\/sec/, "", srate); sub(/\/sec/, "", rrate)
    cpu = (c1 - c0) / tk
    printf "%s|%d|%d|%d|%.2f|%.1f|%d|%d|%d|%.2f|%.2f\n", n, srate, rrate, recv, cpu, (recv > 0 ? cpu * 1e6 / recv : 0), slow, errs, rc, (recv > 0 ? sys / recv : 0), (recv > 0 ? cs / recv : 0)
  }'
}

# latency NAME PORT PID RATE -> name|rate|sent|recv|lost|recv/s|p50|p90|p99|max|cpu s|µs/msg
latency() {
  local name=$1 port=$2 pid=$3 rate=$4 log="$work/lat-$1-$4.log" c0 c1
  c0=$(cpu_ticks "$pid")
  "${N[@]}" taskset -c 1 timeout 120 "$sigbench" --server "127.0.0.1:$port" load \
    --clients 100 --rate "$rate" --secs "$LAT_SECS" > "$log" 2>&1 || true
  c1=$(cpu_ticks "$pid")
  local r; r=$( { grep '^RESULT' "$log" || true; } | tail -1)
  awk -v n="$name" -v rate="$rate" -v r="$r" -v c0="$c0" -v c1="$c1" -v tk="$tick" 'BEGIN {
    m = split(r, kv, " "); for (i = 2; i <= m; i++) { split(kv[i], p, "="); v[p[1]] = p[2] }
    cpu = (c1 - c0) / tk
    printf "%s|%d|%d|%d|%d|%d|%d|%d|%d|%d|%.2f|%.1f\n", n, rate, v["sent"], v["recv"], v["lost"], v["rate"],
      v["p50_us"], v["p90_us"], v["p99_us"], v["max_us"], cpu, (v["recv"] > 0 ? cpu * 1e6 / v["recv"] : 0)
  }'
}

rss_kb() { awk '/^VmRSS:/{print $2}' "/proc/$1/status"; }

# idle NAME PORT PID -> lines name|sessions|failed|rss KiB|rss0 KiB|secs
idle() {
  local name=$1 port=$2 pid=$3 rss0 line
  rss0=$(rss_kb "$pid")
  coproc SB { "${N[@]}" taskset -c 1 timeout 600 "$sigbench" --server "127.0.0.1:$port" --concurrency 128 \
      idle --steps "$IDLE_STEPS" 2> "$work/idle-$name.err"; }
  local sb_pid=$SB_PID
  while read -r -u "${SB[0]}" line; do
    echo "$line" >> "$work/idle-$name.log"
    case "$line" in READY*) ;; *) continue ;; esac
    local n f s
    n=$(sed 's/.*sessions=\([0-9]*\).*/\1/' <<<"$line")
    f=$(sed 's/.*failed=\([0-9]*\).*/\1/' <<<"$line")
    s=$(sed 's/.*secs=\([0-9.]*\).*/\1/' <<<"$line")
    echo "$name|$n|$f|$(rss_kb "$pid")|$rss0|$s|$(rss_kb "$sb_pid" 2>/dev/null || echo 0)"
    echo next >&"${SB[1]}" || break
  done
  wait "$sb_pid" 2>/dev/null || true
}

load_start=$(cut -d' ' -f1-3 /proc/loadavg)
results="$work/results.txt"; lat="$work/latency.txt"; idl="$work/idle.txt"
: > "$results"; : > "$lat"; : > "$idl"
for s in talkbox nss; do
  if [ "$s" = talkbox ]; then
    pid=$(start_talkbox); port=18080
    client_conf talkbox "$(cat "$tb_data/secrets/backend-secret")" "$(cat "$tb_data/secrets/session-hash-key")" \
      "$(head -c 32 "$tb_data/secrets/session-block-key")"
  else
    pid=$(start_nss); port=28080; pids+=("$pid")
    client_conf nss "$nss_secret" "$nss_hash" "$nss_block"
  fi
  echo "== $s (pid $pid)" >&2
  throughput "$s" "$port" "$pid" | tee -a "$results" >&2
  for r in $LAT_RATES; do latency "$s" "$port" "$pid" "$r" | tee -a "$lat" >&2; done
  # Where talkbox's time goes: one more short run of the Debian client with `perf record`
  # attached (flat profile; the release build has symbols).
  if [ "$s" = talkbox ] && command -v perf >/dev/null; then
    set +e
    "${N[@]}" taskset -c 1 timeout -s INT -k 10 12 "$client" -addr "127.0.0.1:$port" \
      -config "$work/client-$s.conf" -maxClients 100 > "$work/profile-client.log" 2>&1 &
    cp=$!
    sleep 2
    timeout 30 perf record -q -F 999 -p "$pid" -o "$work/perf.data" -- sleep 8 > "$work/perf-record.log" 2>&1
    wait "$cp"
    perf report -i "$work/perf.data" --stdio --no-children --sort dso,symbol --percent-limit 1 2>/dev/null \
      | grep -v '^#' | grep -v '^$' | sed -E 's/[[:space:]]+-[[:space:]]+-[[:space:]]*$//' | head -30 > "$work/profile.txt"
    set -e
  fi
  # A fresh server for the idle test, so that its RSS starts from the same point.
  if [ "$s" = talkbox ]; then stop_talkbox; pid=$(start_talkbox); else stop_pid "$pid"; pid=$(start_nss); pids+=("$pid"); fi
  sleep 1
  idle "$s" "$port" "$pid" | tee -a "$idl" >&2
  echo "$s|$(peak_rss_kb "$pid")" >> "$work/peak.txt"
  if [ "$s" = talkbox ]; then stop_talkbox; else stop_pid "$pid"; fi
done

# Render the section.
label() { case "$1" in talkbox) echo "talkbox";; nss) echo "spreed-signaling 0.4.1";; esac; }
{
  echo "## Signaling: talkbox vs nextcloud-spreed-signaling"
  echo
  echo "Command: \`benches/signaling/run.sh target/release/talkbox benches/results\` (part of \`benches/run-all\`)."
  echo "Both servers in one loopback-only network namespace, each started pinned to CPU 0 (one tokio"
  echo "worker, \`GOMAXPROCS=1\`), hello v1 through a fake Talk endpoint, \"allow all backends\"; clients"
  echo "pinned to CPU 1. CPU = user+system time of the server process over the load."
  echo "Debian \`nextcloud-spreed-signaling\` $(dpkg-query -W -f='${Version}' nextcloud-spreed-signaling 2>/dev/null || echo '?');"
  echo "machine load average (1/5/15 min) at the start of this part: ${load_start}, at its end: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "(other jobs shared the two CPUs: compare the two servers' rows, not absolute numbers)."
  echo "Targets, profile and where time and memory go: docs/signaling.md, \"Performance\"."
  echo
  echo "### Throughput: Debian's \`nextcloud-spreed-signaling-client\`"
  echo
  echo "100 clients, each sends a \`message\` to a random session and sleeps 1 ms, ${RUN_SECS} s; rates from"
  echo "the client's last stats line (its last 10 s); CPU per message over the whole run."
  echo
  echo "| server | sent/s | received/s | received | server CPU s | µs CPU / message | messages per CPU-second | > 1 s | errors |"
  echo "|---|---|---|---|---|---|---|---|---|"
  while IFS='|' read -r n sr rr rc cpu us slow errs _; do
    awk -v l="$(label "$n")" -v sr="$sr" -v rr="$rr" -v rc="$rc" -v cpu="$cpu" -v us="$us" -v slow="$slow" -v e="$errs" \
      'BEGIN { printf "| %s | %d | %d | %d | %.2f | %.1f | %d | %d | %d |\n", l, sr, rr, rc, cpu, us, (us > 0 ? 1e6 / us : 0), slow, e }'
  done < "$results"
  echo
  awk -F'|' '{ us[$1] = $6; rr[$1] = $3 } END {
    if (us["talkbox"] > 0 && us["nss"] > 0)
      printf "talkbox handles %.2f× the messages per server CPU-second of spreed-signaling (%.2f× the messages/s delivered in this run).\n", us["nss"] / us["talkbox"], (rr["nss"] > 0 ? rr["talkbox"] / rr["nss"] : 0)
  }' "$results"
  echo
  echo "Server system calls and context switches per message received, over the same run (\`perf stat -p PID\`;"
  echo "independent of machine load, unlike CPU time):"
  echo
  echo "| server | system calls / message | context switches / message |"
  echo "|---|---|---|"
  while IFS='|' read -r n _ _ _ _ _ _ _ _ sys cs; do
    echo "| $(label "$n") | ${sys:-?} | ${cs:-?} |"
  done < "$results"
  echo
  if [ -s "$work/profile.txt" ]; then
    echo "Profile of talkbox's signaling process under the same client (one more 12 s run, \`perf record -F 999 -p PID\`"
    echo "over 8 s of it, then \`perf report --no-children --sort dso,symbol\`, entries of at least 1 %):"
    echo
    echo '```'
    cat "$work/profile.txt"
    echo '```'
    echo
  fi
  echo "### Latency at fixed rates: \`sigbench load\`"
  echo
  echo "100 sessions, messages stamped with their send time to random sessions at a fixed total rate"
  echo "for ${LAT_SECS} s; latency = receive time − send time on the client's clock (one process)."
  echo
  echo "| server | offered msg/s | sent | received | lost | received/s | p50 µs | p90 µs | p99 µs | max µs | server CPU s | µs CPU / message |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
  while IFS='|' read -r n rate s r l rr p50 p90 p99 mx cpu us; do
    echo "| $(label "$n") | $rate | $s | $r | $l | $rr | $p50 | $p90 | $p99 | $mx | $cpu | $us |"
  done < "$lat"
  echo
  echo "### Idle sessions: \`sigbench idle\`"
  echo
  echo "Hello'd WebSocket sessions held open (from 8 source addresses 127.0.1.x), opened 128 at a time;"
  echo "server RSS read 2 s after each step; per session = (RSS − RSS before the first session) / sessions."
  echo "Kernel socket buffers are not in RSS. Descriptor limit in this run: ${nofile} per process"
  echo "(the steps stop below it; 100 000 sessions need a hard RLIMIT_NOFILE above 100 000)."
  echo
  echo "| server | sessions | failed | open time s | server RSS MiB | KiB / session | projected RSS for 100 000 MiB |"
  echo "|---|---|---|---|---|---|---|"
  while IFS='|' read -r n cnt f rss rss0 secs _; do
    awk -v l="$(label "$n")" -v c="$cnt" -v f="$f" -v rss="$rss" -v r0="$rss0" -v s="$secs" 'BEGIN {
      per = c > 0 ? (rss - r0) / c : 0
      printf "| %s | %d | %d | %s | %.0f | %.2f | %.0f |\n", l, c, f, s, rss / 1024, per, (r0 + per * 100000) / 1024 }'
  done < "$idl"
  echo
  awk -F'|' '{ printf "Peak RSS (VmHWM) over the idle run: %s %d MiB. ", $1 == "nss" ? "spreed-signaling" : "talkbox", $2 / 1024 } END { print "" }' "$work/peak.txt"
} > "$out/signaling.md"
cat "$out/signaling.md"
