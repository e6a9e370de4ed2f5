#!/bin/sh
# Runs the TURN message fuzz target for a short while (default 30 s); exits non-zero on a crash.
# Needs cargo-fuzz (`cargo install cargo-fuzz`). Only stable Rust is installed here, so nightly
# features are unlocked with RUSTC_BOOTSTRAP=1 (sanitizer flags cargo fuzz passes to rustc).
set -eu
cd "$(dirname "$0")"
SECS="${1:-30}"
mkdir -p corpus/turn_message
RUSTC_BOOTSTRAP=1 exec cargo fuzz run turn_message corpus/turn_message -- \
    -max_total_time="$SECS" -max_len=4096 -rss_limit_mb=2048
