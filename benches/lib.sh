# Shared helpers of the bench scripts (sourced, not run). Loads go only to loopback.

# CPU time (user+system, all threads) of a process in clock ticks.
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
clk_tck() { getconf CLK_TCK; }

# Pins every thread of a process to the given CPU list.
pin_all() {
  local pid=$1 cpus=$2
  for t in /proc/"$pid"/task/*; do taskset -cp "$cpus" "$(basename "$t")" >/dev/null; done
}

# Waits until a UDP port answers a STUN binding request (turnutils_stunclient), up to 20 s.
wait_stun() {
  local port=$1
  for _ in $(seq 1 200); do
    if timeout 2 turnutils_stunclient -p "$port" 127.0.0.1 2>/dev/null | grep -q 'reflexive'; then return 0; fi
    sleep 0.1
  done
  echo "bench: nothing answers STUN on 127.0.0.1:$port" >&2
  return 1
}

# Stops a process and waits until it is gone (coturn takes over a second).
stop_pid() {
  local pid=$1
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}

# Peak resident memory of a process in KiB.
peak_rss_kb() { awk '/^VmHWM:/{print $2}' "/proc/$1/status"; }

require() {
  for p in "$@"; do
    command -v "$p" >/dev/null || { echo "bench: $p is missing (scripts/install-deps bench)" >&2; exit 1; }
  done
}
