#!/usr/bin/env bash
# Criterion micro-benchmarks of the per-packet / per-message hot paths (no sockets):
#   media-core/benches/forward.rs          one RTP packet forwarded (rewrite + write_rtp + SRTP)
#   appliance/benches/turn_relay.rs        one ChannelData packet relayed, each direction
#   appliance/benches/signaling_fanout.rs  one room message parsed and fanned out to 9 sessions
# Short runs (1 s warm-up, 3 s measurement each) to stay inside the benchmark time budget.
#
# usage: benches/micro/run.sh TALKBOX_BIN OUT_DIR   (TALKBOX_BIN unused; same shape as the others)
# Writes OUT_DIR/micro.md and OUT_DIR/micro/*.log.
set -euo pipefail
out=$2
cd "$(dirname "$0")/../.."
work="$out/micro"; rm -rf "$work"; mkdir -p "$work"
load0=$(cut -d" " -f1-3 /proc/loadavg)
opts=(--bench --warm-up-time 1 --measurement-time 3 --noplot)
# run-all builds everything in one cargo invocation and passes the list of bench executables
# ("NAME PATH" lines) in BENCH_BINS; run alone, this script builds them the same way.
bins=${BENCH_BINS:-}
if [ -z "$bins" ]; then
  bins="$work/bins.txt"
  cargo build --release --locked -p appliance -p media-core \
    --bench forward --bench turn_relay --bench signaling_fanout \
    --message-format=json-render-diagnostics \
    | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "bench" in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])
' > "$bins"
fi
for b in forward turn_relay signaling_fanout; do
  exe=$(awk -v b="$b" '$1 == b {print $2}' "$bins" | tail -1)
  [ -x "$exe" ] || { echo "bench: no executable for the criterion bench $b in $bins" >&2; exit 1; }
  # Criterion keeps its baselines under the target directory, as under `cargo bench`.
  CARGO_TARGET_DIR="$PWD/target" "$exe" "${opts[@]}" 2>&1 | tee "$work/$b.log"
done
{
  echo "## Micro-benchmarks (criterion)"
  echo
  echo "Command: \`benches/micro/run.sh target/release/talkbox benches/results\` (part of \`benches/run-all\`):"
  echo "the criterion benches \`media-core/benches/forward.rs\`, \`appliance/benches/turn_relay.rs\` and"
  echo "\`appliance/benches/signaling_fanout.rs\` (release build, what \`cargo bench\` runs) with 1 s warm-up and"
  echo "3 s measurement. Single thread, no sockets: the cost of our code and the libraries it calls per"
  echo "packet or message. Machine load average (1/5/15 min) at the start of this part: $load0."
  echo
  echo "| benchmark | time per iteration (criterion low / estimate / high) | per core per second |"
  echo "|---|---|---|"
  # Criterion prints "NAME time: [LOW EST HIGH]" on one line for short names and puts the
  # "time:" line, indented, under the name for long ones; both are read here.
  cat "$work"/forward.log "$work"/turn_relay.log "$work"/signaling_fanout.log | python3 -c '
import re, sys
unit = {"ps": 1e-12, "ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
name = None
rows = 0
for raw in sys.stdin:
    line = raw.rstrip("\n")
    m = re.match(r"^\s*(.*?)\s*time:\s*\[(\S+) (\S+) (\S+) (\S+) (\S+) (\S+)\]", line)
    if m:
        label = m.group(1) or name
        if not label or m.group(5) not in unit:
            sys.exit(f"micro: cannot read the criterion line {line!r}")
        est = float(m.group(4)) * unit[m.group(5)]
        print(f"| {label} | {m.group(2)} {m.group(3)} / **{m.group(4)} {m.group(5)}** / {m.group(6)} {m.group(7)} | {1/est:,.0f} |")
        rows += 1
        name = None
        continue
    if line and not line[0].isspace() and not line.startswith(("Benchmarking", "Found", "Warning", "WARNING", "Gnuplot")):
        name = line.strip()
if rows == 0:
    sys.exit("micro: no criterion results in the logs (benches/results/micro/*.log)")
'
} > "$out/micro.md"
cat "$out/micro.md"
