#!/usr/bin/env bash
# SFU forwarding cost: `talkbox sfu` vs Janus 1.1.2 (VideoRoom), the same loadgen loads in one run.
#
# Everything runs inside a network namespace that holds only loopback addresses (and a veth
# with 127.0.0.2/32, because Janus skips loopback interfaces when gathering candidates and
# libnice then needs its peers on that address). The server under test is pinned to CPU 0 and
# the load generator (benches/loadgen, webrtc-rs peers) to CPU 1. For every scenario talkbox
# and Janus run one after the other with a fresh process each, so the ratio compares the two
# under the same background load of the shared machine. The loadgen reads the server's CPU
# time (user+system, /proc/PID/stat) over the measurement window and divides it by the RTP
# packets its subscribers received there (= forwarded packets that arrived).
#
# usage: benches/sfu/run.sh TALKBOX_BIN OUT_DIR [SCENARIO...]
# Writes OUT_DIR/sfu.md (a markdown section) and OUT_DIR/sfu/*.log.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../lib.sh"
bin=$1; out=$2; shift 2
loadgen=${LOADGEN:-$(dirname "$bin")/loadgen}
require janus taskset ip "$loadgen"
work="$out/sfu"; rm -rf "$work"; mkdir -p "$work"
ns=tbsfu$$
seconds=${SFU_SECONDS:-10}
# fanout:N = 1 publisher -> N subscribers; rooms:M = M rooms of 3; room:K = one room of K.
scenarios=("$@"); [ "${#scenarios[@]}" -gt 0 ] || scenarios=(fanout:10 fanout:40 rooms:4 room:10)
N=(ip netns exec "$ns")

cleanup() {
  for f in "$work"/*.pid; do [ -f "$f" ] && stop_pid "$(cat "$f")"; done
  ip netns del "$ns" 2>/dev/null || true
  return 0
}
trap cleanup EXIT

ip netns add "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" link add jv0 type veth peer name jv1
ip -n "$ns" addr add 127.0.0.2/32 dev jv0
ip -n "$ns" link set jv0 up
ip -n "$ns" link set jv1 up
"${N[@]}" sysctl -q -w net.ipv6.conf.jv0.disable_ipv6=1 net.ipv6.conf.jv1.disable_ipv6=1

wait_tcp() {
  local port=$1
  for _ in $(seq 1 200); do
    "${N[@]}" bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "bench: nothing listens on 127.0.0.1:$port in $ns" >&2
  return 1
}

start_talkbox() {
  local d="$work/talkbox-data"; rm -rf "$d"
  cat > "$work/talkbox.toml" <<CONF
[supervisor]
log_level = "warn"
[signaling]
enabled = false
[web]
enabled = false
[turn]
enabled = false
[sfu]
listen = "127.0.0.1:9544"
workers = 1
media_port_min = 41000
media_port_max = 41000
public_ips = ["127.0.0.1"]
CONF
  "${N[@]}" taskset -c 0 "$bin" run --data-dir "$d" --config "$work/talkbox.toml" >> "$work/talkbox.log" 2>&1 &
  echo $! > "$work/supervisor.pid"
  wait_tcp 9544
  "$bin" status --json --data-dir "$d" \
    | python3 -c 'import json,sys; print(next(s["pid"] for s in json.load(sys.stdin)["services"] if s["name"] == "sfu"))' \
    > "$work/server.pid"
}

start_janus() {
  local c="$work/janus-conf"; mkdir -p "$c"
  cat > "$c/janus.jcfg" <<CONF
general: {
	configs_folder = "$c"
	plugins_folder = "/usr/lib/x86_64-linux-gnu/janus/plugins"
	transports_folder = "/usr/lib/x86_64-linux-gnu/janus/transports"
	events_folder = "/usr/lib/x86_64-linux-gnu/janus/events"
	loggers_folder = "/usr/lib/x86_64-linux-gnu/janus/loggers"
	debug_level = 3
	session_timeout = 0
	admin_secret = "bench-admin"
	server_name = "bench-janus"
}
certificates: {
}
media: {
	ipv6 = false
	rtp_port_range = "42000-43999"
}
nat: {
	nice_debug = false
	ice_enforce_list = "jv0"
	ignore_mdns = true
}
plugins: {
	disable = "libjanus_audiobridge.so,libjanus_duktape.so,libjanus_echotest.so,libjanus_lua.so,libjanus_nosip.so,libjanus_recordplay.so,libjanus_sip.so,libjanus_streaming.so,libjanus_textroom.so,libjanus_videocall.so,libjanus_voicemail.so"
}
transports: {
	disable = "libjanus_mqtt.so,libjanus_nanomsg.so,libjanus_pfunix.so,libjanus_rabbitmq.so,libjanus_http.so"
}
loggers: {
	disable = "libjanus_jsonlog.so"
}
events: {
	broadcast = false
	disable = "libjanus_gelfevh.so,libjanus_mqttevh.so,libjanus_nanomsgevh.so,libjanus_rabbitmqevh.so,libjanus_sampleevh.so,libjanus_wsevh.so"
}
CONF
  cat > "$c/janus.transport.websockets.jcfg" <<CONF
general: {
	json = "compact"
	ws = true
	ws_port = 8188
	ws_ip = "127.0.0.1"
	wss = false
}
admin: {
	admin_ws = false
	admin_wss = false
}
CONF
  cat > "$c/janus.plugin.videoroom.jcfg" <<CONF
general: {
	string_ids = false
}
CONF
  "${N[@]}" taskset -c 0 janus -C "$c/janus.jcfg" -F "$c" -L "$work/janus.log" >> "$work/janus.stdout" 2>&1 &
  echo $! > "$work/server.pid"
  wait_tcp 8188
}

stop_server() {
  for f in supervisor.pid server.pid; do
    [ -f "$work/$f" ] && stop_pid "$(cat "$work/$f")"
    rm -f "$work/$f"
  done
}

results="$work/results.jsonl"; : > "$results"
load0=$(cut -d' ' -f1-3 /proc/loadavg)
# SFU_APPEND=FILE: start from the result lines in FILE (e.g. to redo one scenario).
[ -z "${SFU_APPEND:-}" ] || cp "$SFU_APPEND" "$results"
room=1000
for sc in "${scenarios[@]}"; do
  for server in talkbox janus; do
    log="$work/${server}_${sc/:/-}.log"
    if [ "$server" = talkbox ]; then
      start_talkbox
      args=(--server talkbox --url ws://127.0.0.1:9544/proxy --key "$work/talkbox-data/secrets/proxy-token-key.pem" --ip 127.0.0.1)
    else
      start_janus
      args=(--server janus --url ws://127.0.0.1:8188 --ip 127.0.0.2 --room-base "$room")
    fi
    set +e
    timeout 300 "${N[@]}" taskset -c 1 "$loadgen" "${args[@]}" --scenario "$sc" --seconds "$seconds" \
      --server-pid "$(cat "$work/server.pid")" > "$log.json" 2> "$log"
    rc=$?
    set -e
    if [ "$rc" -eq 0 ]; then cat "$log.json" >> "$results"; tail -1 "$log.json" >&2
    else
      echo "bench: loadgen $server $sc failed (rc $rc): $(tail -3 "$log")" >&2
      printf '{"server":"%s","scenario":"%s","failed":%d}\n' "$server" "$sc" "$rc" >> "$results"
    fi
    stop_server
    room=$((room + 100))
  done
done

# Profile: one more talkbox run of the last fan-out scenario with `perf record` attached to the
# SFU process for the measurement window only (flat profile; the release build has symbols).
profile_sc=""
for sc in "${scenarios[@]}"; do case $sc in fanout:*) profile_sc=$sc;; esac; done
if [ -n "$profile_sc" ] && command -v perf >/dev/null; then
  start_talkbox
  rm -f "$work/ready"
  set +e
  timeout 300 "${N[@]}" taskset -c 1 "$loadgen" --server talkbox --url ws://127.0.0.1:9544/proxy \
    --key "$work/talkbox-data/secrets/proxy-token-key.pem" --ip 127.0.0.1 --scenario "$profile_sc" \
    --seconds "$seconds" --server-pid "$(cat "$work/server.pid")" --ready-file "$work/ready" \
    > "$work/profile-run.json" 2> "$work/profile-run.log" &
  lg=$!
  for _ in $(seq 1 1200); do [ -f "$work/ready" ] || ! kill -0 "$lg" 2>/dev/null && break; sleep 0.1; done
  if [ -f "$work/ready" ]; then
    # Alongside: syscalls and context switches over the same window. Unlike CPU time they do
    # not depend on what else loads the machine, so they compare builds on a busy machine.
    timeout 60 perf stat -x, -o "$work/perf-stat.csv" -p "$(cat "$work/server.pid")" \
      -e raw_syscalls:sys_enter,syscalls:sys_enter_poll,syscalls:sys_enter_epoll_wait \
      -e syscalls:sys_enter_recvmmsg,syscalls:sys_enter_sendmmsg \
      -e context-switches,task-clock -- sleep $((seconds - 1)) > "$work/perf-stat.log" 2>&1 &
    st=$!
    timeout 60 perf record -q -F 999 -p "$(cat "$work/server.pid")" -o "$work/perf.data" -- sleep $((seconds - 1)) \
      > "$work/perf-record.log" 2>&1
    wait "$st"
    perf report -i "$work/perf.data" --stdio --no-children --sort dso,symbol --percent-limit 1 2>/dev/null \
      | grep -v '^#' | grep -v '^$' | sed -E 's/[[:space:]]+-[[:space:]]+-[[:space:]]*$//' | head -40 \
      > "$work/profile.txt"
  fi
  wait "$lg"
  set -e
  stop_server
fi

# Render the section.
python3 - "$results" "$seconds" "$work/profile.txt" "$profile_sc" "$work/perf-stat.csv" "$work/profile-run.json" "$load0" > "$out/sfu.md" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
secs = sys.argv[2]
print("## SFU forwarding: talkbox sfu vs Janus 1.1.2 VideoRoom")
print()
print("Command: `benches/sfu/run.sh target/release/talkbox benches/results` (part of `benches/run-all`).")
print("Load generator: `benches/loadgen` (webrtc-rs `webrtc` 0.21 peers, one peer connection per")
print("publisher and per subscription, no decoding); talkbox is driven through its `/proxy` protocol")
print("(what its signaling server uses), Janus through the VideoRoom API over its WebSocket transport.")
print("Every publisher sends synthetic VP8 (100 packets/s of 1250 bytes = 1 Mbit/s) and Opus-sized")
print("audio (50 packets/s of 120 bytes). Server pinned to CPU 0, loadgen to CPU 1, inside a")
print("loopback-only network namespace; talkbox and Janus run one after the other for each scenario")
print(f"(fresh process each) on the same machine, which other jobs were loading; {secs} s window after")
print("a 2 s warm-up. Scenarios: `fanout:N` = 1 publisher → N subscribers, `rooms:M` = M rooms of 3")
print("(everyone subscribes to the other two), `room:K` = one all-video room of K.")
print(f"Machine load average (1/5/15 min) at the start of this part: {sys.argv[7]}.")
print()
print("forwarded pkt/s = RTP packets the subscribers received per second; CPU = server user+system")
print("time over the window; µs/pkt = CPU per forwarded packet (= CPU s per million); jitter = RFC 3550")
print("interarrival jitter of the send stamps (mean over tracks); delay = one-way, send to receive.")
print()
print("| scenario | server | pubs | subs | forwarded pkt/s | loss % | jitter ms | delay p50 / p99 ms | server CPU s | µs CPU / fwd pkt | peak RSS MiB |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
by = {}
for r in rows:
    if "failed" in r:
        print(f"| {r['scenario']} | {r['server']} | | | failed (rc {r['failed']}) | | | | | | |")
        continue
    by.setdefault(r["scenario"], {})[r["server"]] = r
    print(f"| {r['scenario']} | {r['server']} | {r['publishers']} | {r['subscriptions']} | {r['recv_pps']:.0f} | {r['loss_pct']:.2f} | {r['jitter_ms']:.2f} | {r['delay_p50_ms']:.2f} / {r['delay_p99_ms']:.2f} | {r['server_cpu_s']:.2f} | {r['cpu_s_per_mpkt']:.2f} | {r['peak_rss_kb']/1024:.1f} |")
print()
print("| scenario | talkbox / Janus CPU per fwd pkt | talkbox / Janus peak RSS | talkbox fwd pkt/s per core (at its µs/pkt) |")
print("|---|---|---|---|")
for sc, d in by.items():
    t, j = d.get("talkbox"), d.get("janus")
    if not t or not j or not j["cpu_s_per_mpkt"] or not t["cpu_s_per_mpkt"]:
        continue
    print(f"| {sc} | {t['cpu_s_per_mpkt']/j['cpu_s_per_mpkt']:.2f} | {t['peak_rss_kb']/max(j['peak_rss_kb'],1):.2f} | {1e6/t['cpu_s_per_mpkt']:.0f} |")
import os
if os.path.exists(sys.argv[3]) and os.path.getsize(sys.argv[3]) > 0:
    print()
    print(f"Profile of `talkbox sfu` during the `{sys.argv[4]}` window (`perf record -F 999 -p PID`, then")
    print("`perf report --no-children --sort dso,symbol`, entries of at least 1 %):")
    print()
    print("```")
    print(open(sys.argv[3]).read().rstrip())
    print("```")
# perf stat over the same window: system calls and context switches per forwarded packet.
try:
    pps = json.load(open(sys.argv[6]))["recv_pps"]
    stat = {}
    for line in open(sys.argv[5]):
        f = line.strip().split(",")
        if len(f) > 3 and f[0].replace(".", "").isdigit():
            stat[f[2]] = float(f[0])
    win = stat["task-clock"]  # ms of CPU over (seconds - 1) s of wall time
    wall = float(secs) - 1
except (OSError, KeyError, ValueError, IndexError):
    stat = None
if stat and pps:
    print()
    print(f"System calls and context switches of `talkbox sfu` over {wall:.0f} s of the same window "
          f"(`perf stat -p PID`), {pps:.0f} forwarded packets/s, {win / wall:.0f} ms CPU per second:")
    print()
    print("| event | per second | per forwarded packet |")
    print("|---|---|---|")
    for k in ["raw_syscalls:sys_enter", "syscalls:sys_enter_poll", "syscalls:sys_enter_epoll_wait",
              "syscalls:sys_enter_recvmmsg", "syscalls:sys_enter_sendmmsg",
              "context-switches"]:
        if k in stat:
            name = k.split(":")[-1].replace("sys_enter_", "").replace("sys_enter", "all system calls")
            print(f"| {name} | {stat[k] / wall:.0f} | {stat[k] / wall / pps:.3f} |")
PY
cat "$out/sfu.md"
