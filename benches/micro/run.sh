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
opts=(--warm-up-time 1 --measurement-time 3 --noplot)
cargo bench -q -p media-core --bench forward -- "${opts[@]}" 2>&1 | tee "$work/forward.log"
cargo bench -q -p appliance --bench turn_relay -- "${opts[@]}" 2>&1 | tee "$work/turn_relay.log"
cargo bench -q -p appliance --bench signaling_fanout -- "${opts[@]}" 2>&1 | tee "$work/signaling_fanout.log"
{
  echo "## Micro-benchmarks (criterion)"
  echo
  echo "Command: \`benches/micro/run.sh target/release/talkbox benches/results\` (part of \`benches/run-all\`),"
  echo "i.e. \`cargo bench -p media-core --bench forward\`, \`cargo bench -p appliance --bench turn_relay\` and"
  echo "\`cargo bench -p appliance --bench signaling_fanout\` with 1 s warm-up and 3 s measurement. Single"
  echo "thread, no sockets: the cost of our code and the libraries it calls per packet or message."
  echo
  echo "| benchmark | time per iteration (criterion low / estimate / high) | per core per second |"
  echo "|---|---|---|"
  cat "$work"/*.log | python3 -c '
import re, sys
name = None
unit = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
for line in sys.stdin:
    m = re.match(r"^(\S.*?)\s*time:\s*\[(\S+) (\S+) (\S+) (\S+) (\S+) (\S+)\]", line)
    if not m:
        n = re.match(r"^(\S.*\S)\s*$", line)
        if n and "time:" not in line and not line.startswith(("Benchmarking", "Found", "  ", "change", "Warning")):
            name = n.group(1)
        continue
    label = m.group(1) or name
    est = float(m.group(4)) * unit[m.group(5)]
    print(f"| {label} | {m.group(2)} {m.group(3)} / **{m.group(4)} {m.group(5)}** / {m.group(6)} {m.group(7)} | {1/est:,.0f} |")
'
} > "$out/micro.md"
cat "$out/micro.md"
