#!/usr/bin/env bash
# Video quality under downlink shaping: talkbox (its meeting page, the whole box) vs Janus 1.1.2
# VideoRoom (a minimal page of ours, pages/janus.html), one Chromium publisher with three simulcast
# layers and one Chromium subscriber whose downlink is shaped to 300 kbit/s and then freed.
#
# Two network namespaces joined by a veth pair hold everything: the server namespace (the server
# under test, the publisher's browser, the page server, the driver) has 10.231.0.1 on its end, the
# client namespace (the subscriber's browser) 10.231.0.2 on the other. The subscriber's downlink
# is the server end's egress, which the driver shapes with `tc qdisc ... tbf`; the publisher talks
# to the server over the server namespace's loopback and is never shaped. No traffic leaves the
# two namespaces; both are removed at the end with whatever still runs in them.
#
# benches/quality/driver.py does one run (phases: unshaped until the top layer holds 5 s, at most
# 40 s; shaped 25 s; unshaped until the top layer is back and holds 3 s, at most 40 s; about two
# minutes with the joins) and prints one JSON line.
#
# usage: benches/quality/run.sh TALKBOX_BIN OUT_DIR [TARGET...]   (targets: talkbox janus
#   janus-oracle; the last is Janus with a subscriber page that requests substream 0 / 2 the
#   moment the shaping starts / ends, the best an application could do with Janus 1.1.2)
# QUALITY_RUNS=N runs each target N times (default 1), alternating the targets.
# Writes OUT_DIR/quality.md (a markdown section) and OUT_DIR/quality/* (logs, raw samples).
# Needs root, iproute2, chromium, chromium-driver, janus.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../lib.sh"
bin=$(realpath "$1"); out=$(realpath "$2"); shift 2
require janus chromium chromedriver tc ip python3 "$bin"
targets=("$@"); [ "${#targets[@]}" -gt 0 ] || targets=(talkbox janus janus-oracle)
runs=${QUALITY_RUNS:-1}
work="$out/quality"; rm -rf "$work"; mkdir -p "$work"
S=qbsrv$$; C=qbsub$$
NS=(ip netns exec "$S"); NC=(ip netns exec "$C")
srv=10.231.0.1; cli=10.231.0.2

cleanup() {
  for f in "$work"/*.pid; do [ -f "$f" ] && stop_pid "$(cat "$f")"; rm -f "$f"; done
  # What still runs in the two namespaces was started by this script (browsers the drivers
  # spawned); end it by pid before removing the namespaces.
  for n in "$S" "$C"; do
    for p in $(ip netns pids "$n" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
    ip netns del "$n" 2>/dev/null || true
  done
  return 0
}
trap cleanup EXIT

ip netns add "$S"; ip netns add "$C"
ip -n "$S" link set lo up; ip -n "$C" link set lo up
ip -n "$S" link add qs0 type veth peer name qc0 netns "$C"
ip -n "$S" addr add "$srv/24" dev qs0; ip -n "$C" addr add "$cli/24" dev qc0
ip -n "$S" link set qs0 up; ip -n "$C" link set qc0 up
for n in "$S" "$C"; do ip netns exec "$n" sysctl -q -w net.ipv6.conf.all.disable_ipv6=1; done

wait_tcp() {
  local host=$1 port=$2
  for _ in $(seq 1 300); do
    "${NS[@]}" bash -c "exec 3<>/dev/tcp/$host/$port" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "bench: nothing listens on $host:$port in $S" >&2
  return 1
}

# The drivers run in their own process groups (setsid) so that stop_pid on the group leader and
# the namespace sweep above end the browsers they start.
start_drivers() {
  "${NS[@]}" setsid chromedriver --port=9515 > "$work/chromedriver-pub.log" 2>&1 &
  echo $! > "$work/cd-pub.pid"
  "${NC[@]}" setsid chromedriver --port=9515 --allowed-ips="$srv" --allowed-origins='*' \
    > "$work/chromedriver-sub.log" 2>&1 &
  echo $! > "$work/cd-sub.pid"
  wait_tcp 127.0.0.1 9515; wait_tcp "$cli" 9515
}

start_talkbox() {
  local d="$work/talkbox-data"; rm -rf "$d"; mkdir -p "$d"
  cat > "$d/talkbox.toml" <<CONF
[supervisor]
log_level = "info"
[signaling]
listen = "$srv:8443"
[sfu]
workers = 1
media_port_min = 41000
media_port_max = 41000
public_ips = ["$srv"]
CONF
  "${NS[@]}" "$bin" run --data-dir "$d" >> "$work/talkbox.log" 2>&1 &
  echo $! > "$work/server.pid"
  wait_tcp "$srv" 8443
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
	debug_level = 4
	session_timeout = 0
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
	ice_enforce_list = "qs0"
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
  "${NS[@]}" janus -C "$c/janus.jcfg" -F "$c" -L "$work/janus.log" >> "$work/janus.stdout" 2>&1 &
  echo $! > "$work/server.pid"
  "${NS[@]}" python3 -m http.server 8000 --bind 0.0.0.0 --directory "$here/pages" \
    > "$work/pages.log" 2>&1 &
  echo $! > "$work/pages.pid"
  wait_tcp "$srv" 8188; wait_tcp "$srv" 8000
}

stop_all() {
  for f in "$work"/*.pid; do [ -f "$f" ] && stop_pid "$(cat "$f")"; rm -f "$f"; done
  for n in "$S" "$C"; do
    for p in $(ip netns pids "$n" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
  done
  "${NS[@]}" tc qdisc del dev qs0 root 2>/dev/null || true
}

results="$work/results.jsonl"; : > "$results"
# QUALITY_APPEND=FILE: start from the result lines in FILE (e.g. runs of another talkbox build).
[ -z "${QUALITY_APPEND:-}" ] || cp "$QUALITY_APPEND" "$results"
# The last commit that changed talkbox's code (bench-only commits do not change what is measured).
commit=$(git -C "$here/../.." log -1 --format=%h -- appliance media-core Cargo.lock 2>/dev/null || echo '?')
[ -n "$commit" ] || commit='?'
git -C "$here/../.." diff --quiet HEAD -- appliance media-core 2>/dev/null || commit="$commit+changes"
build=$(basename "$(dirname "$bin")")
# The Janus page captures the camera at the size talkbox's meeting page asks for.
read -r cam_w cam_h < <(python3 - "$here/../../appliance/src/signaling/meeting/meeting.js" <<'PY'
import re, sys
s = open(sys.argv[1]).read()
m = re.search(r"getUserMedia\(\{ audio: true, video: \{ width: (?:\{ ideal: )?(\d+)[^,]*, height: (?:\{ ideal: )?(\d+)", s)
print(*(m.groups() if m else (640, 480)))
PY
)
room=4242
for i in $(seq 1 "$runs"); do
  for target in "${targets[@]}"; do
    log="$work/${target}-$i"
    label="$target, ${cam_w}×$cam_h"; [ "$target" = talkbox ] && label="talkbox $commit ($build), ${cam_w}×$cam_h"
    echo "== quality: $target run $i" >&2
    if [ "$target" = talkbox ]; then
      start_talkbox
      urls=(--pub-url "https://$srv:8443/r/qbench$i" --sub-url "https://$srv:8443/r/qbench$i")
    else
      start_janus
      urls=(--pub-url "http://127.0.0.1:8000/janus.html?role=pub&room=$room&w=$cam_w&h=$cam_h&janus=ws://$srv:8188"
            --sub-url "http://$srv:8000/janus.html?role=sub&room=$room"
            "--sub-flag=--unsafely-treat-insecure-origin-as-secure=http://$srv:8000")
    fi
    start_drivers
    set +e
    timeout 240 "${NS[@]}" python3 "$here/driver.py" --target "$target" \
      --pub-driver http://127.0.0.1:9515 --sub-driver "http://$cli:9515" "${urls[@]}" \
      --dev qs0 --samples "$log.samples.json" > "$log.json" 2> "$log.log"
    rc=$?
    set -e
    if [ "$rc" -eq 0 ]; then python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); r["run"]=int(sys.argv[2]); r["label"]=sys.argv[3]; print(json.dumps(r))' "$log.json" "$i" "$label" >> "$results"; cat "$log.json" >&2
    else
      echo "bench: quality $target run $i failed (rc $rc): $(tail -3 "$log.log")" >&2
      printf '{"target":"%s","label":"%s","run":%d,"failed":%d}\n' "$target" "$label" "$i" "$rc" >> "$results"
    fi
    stop_all
    room=$((room + 1))
  done
done

# Render the section.
python3 - "$results" > "$out/quality.md" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def s(v):
    return "never" if v is None else f"{v:.1f} s"
print("## Quality under shaping: talkbox vs Janus 1.1.2 VideoRoom")
print()
print("Command: `benches/quality/run.sh target/release/talkbox benches/results [talkbox janus janus-oracle]`")
print("(`benches/run-all quality`; not in run-all's default parts: about two minutes per run and")
print("target, `QUALITY_RUNS=N` for more runs). The talkbox rows name the commit and build measured")
print("(the last commit that changed its code).")
print()
print("One headless Chromium publishes its fake camera (at the size talkbox's meeting page asks for;")
print("the label of each row names it) as three simulcast layers")
print("(q/h/f = 1/4, 1/2, full resolution, at most 100/300/900 kbit/s; started with")
print("`--force-fieldtrials=WebRTC-LegacySimulcastLayerLimit/Disabled/`, without which Chromium sends")
print("only two layers of a 640×480 camera), a second one subscribes;")
print("talkbox through its own meeting page (signaling, SFU and TURN of `talkbox run`), Janus through")
print("`benches/quality/pages/janus.html`, a minimal VideoRoom client over its WebSocket API that")
print("publishes the same layers (listed highest first, the order Janus takes for its substreams 2, 1, 0)")
print("and subscribes with Janus's default (the top substream). In the `janus` rows the page never")
print("sends a `substream` request: Janus 1.1.2 has no per-subscriber bandwidth estimate, so what is")
print("measured is its own behaviour, as under a Talk client that does not pick layers by bandwidth.")
print("In the `janus-oracle` rows the subscriber page sends `configure` with")
print("`streams: [{mid, substream: 0}]` the moment the shaping starts and `substream: 2` the moment it")
print("ends: Janus told by an application that knows the link exactly (no real client does), i.e. how")
print("fast Janus switches when asked, the best case for it, not adaptation.")
print("The subscriber sits in its own network namespace; its downlink (the server end of the veth)")
print("is shaped with `tc qdisc add dev qs0 root tbf rate 300kbit burst 6kb latency 100ms` for 25 s")
print("once it has shown the top layer for 5 s, then the shaping is removed. Its page samples")
print("`getStats` every 250 ms.")
print()
print("drop → lower / low = time from adding the shaping to the first sample whose frameWidth is")
print("below the publisher's widest layer / at most 110 % of its narrowest layer (\"never\" with one")
print("layer or when it did not happen in the 25 s); recovery → top = from removing the shaping to the")
print("first sample at ≥ 90 % of the widest layer (within 40 s). Each counts only once the picture")
print("holds: every sample of the following second qualifies and at least 10 frames are decoded in it")
print("(a server that keeps forwarding the top layer into the shaped link keeps the width and stops")
print("the picture, and one stray frame is no recovery). Longest freeze = longest time without")
print("framesDecoded rising, from 1 s before the drop to the end; Chromium freezes = its own")
print("`freezeCount` / `totalFreezesDuration` over the same span; shaped fps, kbit/s and widths = the")
print("second half of the shaped phase. For a target that never leaves the top layer, recovery → top")
print("is the time until its picture resumes.")
print()
# Summary per target: medians over the runs ("never" counts as worse than any time), and how
# many runs met the issue's bounds (low layer within 15 s, top within 30 s, no freeze over 1 s).
def med(vals):
    if not vals:
        return "—"
    k = sorted(float("inf") if v is None else v for v in vals)
    n = len(k)
    m = k[n // 2] if n % 2 else (k[n // 2 - 1] + k[n // 2]) / 2
    return "never" if m == float("inf") else f"{m:.1f} s"
def rng(vals):
    nums = [v for v in vals if v is not None]
    never = len(vals) - len(nums)
    txt = f"{min(nums):.1f}–{max(nums):.1f}" if nums else ""
    return (txt + (f", never ×{never}" if never else "")).strip(", ")
print("| target | runs | drop → low (median; range) | recovery → top (median; range) | longest freeze (median; range) | runs within the issue's bounds (15 s / 30 s / 1 s) |")
print("|---|---|---|---|---|---|")
labels = []
for r in rows:
    if r.get("label", r["target"]) not in labels:
        labels.append(r.get("label", r["target"]))
for label in labels:
    ok = [r for r in rows if r.get("label", r["target"]) == label and "failed" not in r]
    failed = sum(1 for r in rows if r.get("label", r["target"]) == label and "failed" in r)
    if not ok:
        print(f"| {label} | 0 (+{failed} failed) | | | | |")
        continue
    low = [r["drop_to_low_s"] for r in ok]
    top = [r["recovery_to_top_s"] for r in ok]
    fz = [r["longest_freeze_s"] for r in ok]
    met = sum(1 for r in ok if r["drop_to_low_s"] is not None and r["drop_to_low_s"] <= 15
              and r["recovery_to_top_s"] is not None and r["recovery_to_top_s"] <= 30
              and r["longest_freeze_s"] <= 1.0)
    runs = f"{len(ok)}" + (f" (+{failed} failed)" if failed else "")
    print(f"| {label} | {runs} | {med(low)}; {rng(low)} | {med(top)}; {rng(top)} | {med(fz)}; {rng(fz)} | {met} of {len(ok)} |")
print()
print("Each run:")
print()
print("| target | run | publisher layers (widths) | drop → lower | drop → low | recovery → top | longest freeze | Chromium freezes (count, s) | shaped fps | shaped kbit/s | shaped widths |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    if "failed" in r:
        print(f"| {r.get('label', r['target'])} | {r['run']} | failed (rc {r['failed']}) | | | | | | | | |")
        continue
    layers = "/".join(str(w) for _, w, _ in sorted(r["layers_before"], key=lambda l: l[1])) or "?"
    print(f"| {r.get('label', r['target'])} | {r['run']} | {len(r['layers_before'])} ({layers}) | {s(r['drop_to_lower_s'])} | {s(r['drop_to_low_s'])} | {s(r['recovery_to_top_s'])} | {r['longest_freeze_s']:.2f} s | {r['chromium_freezes']}, {r['chromium_freeze_s']:.1f} | {r['shaped_fps']} | {r['shaped_kbps']} | {'/'.join(str(w) for w in r['shaped_widths'])} |")
PY
cat "$out/quality.md"
