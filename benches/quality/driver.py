#!/usr/bin/env python3
"""One run of the quality-under-shaping bench (started by benches/quality/run.sh, which sets up
the network namespaces, the server under test and the two chromedrivers).

A publisher Chromium (unshaped) sends its fake camera as three simulcast layers; a subscriber
Chromium, whose downlink `tc ... tbf` shapes, shows it. Both pages keep samplers that read
getStats every 250 ms (subscriber: inbound video frameWidth/Height, framesDecoded, bytes,
Chromium's freeze counters; publisher: each layer's rid and frameWidth). Phases:

1. unshaped until the subscriber shows the top layer for 5 s (at most WARM s);
2. shaped to RATE for SHAPED s (`tc qdisc add dev DEV root tbf ...`);
3. unshaped again until the top layer is back and has held 3 s (at most RECOVER s).

"Top layer" = a received width at least 90 % of the widest layer the publisher sends at that
moment (Chromium scales layers down under CPU load, so this compares with what is sent, not
with 640); "low layer" = at most 110 % of its narrowest layer, and only when it sends more than
one layer. Prints one JSON line with the figures and writes the raw samples next to it.

Talks to chromedriver over plain WebDriver HTTP (standard library only, nothing to build).
"""

import argparse
import json
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request

# Flags of every bench browser, as in appliance/tests/common/browser.rs (loopback ICE allowed,
# host candidates not hidden behind mDNS, fake camera and microphone).
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
    "--disable-dev-shm-usage", "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns", "--ignore-certificate-errors",
    "--autoplay-policy=no-user-gesture-required",
]

# Where each target's pages keep their peer connections.
TARGETS = {
    "talkbox": {
        "pub_pc": "(typeof call !== 'undefined' && call.pubs && call.pubs.video)",
        # The first remote camera tile's subscription (as the test reads it).
        "sub_pc": "(() => { if (typeof call === 'undefined') return null;"
                  " const t = [...document.querySelectorAll('#grid .tile:not(.self)')]"
                  ".find(x => x.dataset.roomType === 'video');"
                  " const p = t && call.peers.get(t.dataset.session);"
                  " return (p && p.subs && p.subs.video) || null; })()",
    },
    "janus": {"pub_pc": "window.pubPc", "sub_pc": "window.subPc"},
    # Janus with an application that knows the link: the subscriber asks for substream 0 the
    # moment the shaping starts and for substream 2 the moment it ends (Janus's best case; no
    # client can know this in practice).
    "janus-oracle": {"pub_pc": "window.pubPc", "sub_pc": "window.subPc"},
}

SUB_SAMPLER = """
window.qs = [];
setInterval(async () => {
  const pc = %s;
  if (!pc) return;
  const now = Date.now();
  (await pc.getStats()).forEach(r => {
    if (r.type === 'inbound-rtp' && r.kind === 'video') {
      window.qs.push([now, r.frameWidth || 0, r.frameHeight || 0, r.framesDecoded || 0,
        r.bytesReceived || 0, r.freezeCount || 0, r.totalFreezesDuration || 0,
        r.packetsLost || 0, r.pliCount || 0]);
    }
  });
}, 250);
return true;
"""

PUB_SAMPLER = """
window.ps = [];
setInterval(async () => {
  const pc = %s;
  if (!pc) return;
  const now = Date.now(), out = [];
  let bwe = 0;
  (await pc.getStats()).forEach(r => {
    if (r.type === 'outbound-rtp' && r.kind === 'video' && (r.frameWidth || 0) > 0) {
      out.push([r.rid || '', r.frameWidth, r.qualityLimitationReason || '']);
    }
    if (r.type === 'candidate-pair' && r.nominated && r.availableOutgoingBitrate) {
      bwe = r.availableOutgoingBitrate;
    }
  });
  window.ps.push([now, out, bwe]);
}, 250);
return true;
"""


# The publisher's video layers in full (inactive ones too) and the SDP answer it got, kept with
# the raw samples to show what the server accepted.
PUB_DETAIL = """
const done = arguments[arguments.length - 1];
const pc = %s;
pc.getStats().then(st => {
  const out = [];
  st.forEach(r => {
    if (r.type === 'outbound-rtp' && r.kind === 'video') {
      out.push({rid: r.rid, active: r.active, width: r.frameWidth, bytes: r.bytesSent,
        limitation: r.qualityLimitationReason, target: r.targetBitrate});
    }
  });
  done({layers: out, answer: pc.remoteDescription ? pc.remoteDescription.sdp : ''});
}, e => done(String(e)));
"""


class WebDriver:
    """A chromedriver session (W3C WebDriver over HTTP)."""

    def __init__(self, url, extra_flags):
        self.url = url.rstrip("/")
        caps = {"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
            "binary": "/usr/bin/chromium", "args": CHROMIUM_FLAGS + extra_flags}}}}
        last = None
        for _ in range(100):
            try:
                self.sid = self._call("POST", "/session", caps)["sessionId"]
                return
            except (urllib.error.URLError, OSError, KeyError) as e:
                last = e
                time.sleep(0.2)
        raise RuntimeError(f"no WebDriver session at {self.url}: {last}")

    def _call(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())["value"]
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"WebDriver {method} {path}: {e.code} {e.read()[:500]!r}") from e

    def goto(self, url):
        self._call("POST", f"/session/{self.sid}/url", {"url": url})

    def js(self, script):
        return self._call("POST", f"/session/{self.sid}/execute/sync",
                          {"script": script, "args": []})

    def js_async(self, script):
        return self._call("POST", f"/session/{self.sid}/execute/async",
                          {"script": script, "args": []})

    def wait(self, expr, ok, limit, what):
        end = time.time() + limit
        last = None
        while time.time() < end:
            last = self.js(f"return {expr};")
            if ok(last):
                return last
            time.sleep(0.25)
        raise RuntimeError(f"{what}: `{expr}` was {last!r} after {limit} s")

    def quit(self):
        try:
            self._call("DELETE", f"/session/{self.sid}")
        except (RuntimeError, urllib.error.URLError, OSError):
            pass


def join_talkbox(b, url, name):
    b.goto(url)
    b.wait("document.body.dataset.state", lambda s: s == "join", 40, f"{name}: join form")
    b.js(f"document.getElementById('join-name').value = {json.dumps(name)};"
         " document.getElementById('join-button').click(); return true;")
    b.wait("document.body.dataset.state", lambda s: s == "joined", 40, f"{name}: joined")


def join_janus(b, url, name):
    b.goto(url)
    b.wait("document.body.dataset.state",
           lambda s: s == "joined" or str(s).startswith("error"), 40, f"{name}: joined")
    state = b.js("return document.body.dataset.state;")
    if state != "joined":
        raise RuntimeError(f"{name}: {state}")


def shape(dev, rate, on):
    argv = ["tc", "qdisc", "add" if on else "del", "dev", dev, "root"]
    if on:
        # As in the test: a burst of a few packets and at most 100 ms of queue, as a
        # slow DSL or mobile downlink would have.
        argv += ["tbf", "rate", rate, "burst", "6kb", "latency", "100ms"]
    subprocess.run(argv, check=True)


def now_ms():
    return int(time.time() * 1000)


class Run:
    def __init__(self, sub, pub):
        self.sub, self.pub = sub, pub
        self.samples = []   # [t, w, h, decoded, bytes, freezeCount, freezeDur, lost, pli, top?, low?, decoding?]
        self.layers = []    # [t, [[rid, width, limitation], ...]]

    def drain(self):
        self.layers += self.pub.js("return window.ps.splice(0);") or []
        for s in self.sub.js("return window.qs.splice(0);") or []:
            widths = self.widths_at(s[0])
            top = bool(widths) and s[1] * 10 >= max(widths) * 9
            low = len(widths) > 1 and 0 < s[1] * 10 <= min(widths) * 11
            # Decoding: framesDecoded rose since the previous sample.
            decoding = bool(self.samples) and s[3] > self.samples[-1][3]
            self.samples.append(s + [top, low, decoding])

    def widths_at(self, t):
        """The publisher's layer widths in its last sample before t."""
        best = None
        for lt, ls, _ in self.layers:
            if lt <= t:
                best = ls
        if best is None and self.layers:
            best = self.layers[0][1]
        return [w for _, w, _ in (best or [])]

    def until(self, limit, done):
        """Samples until done(samples) holds or limit seconds pass; True when it held."""
        end = time.time() + limit
        while time.time() < end:
            time.sleep(0.25)
            self.drain()
            if done(self.samples):
                return True
        return False

    def first(self, after, pred):
        return next((s[0] for s in self.samples if s[0] >= after and pred(s)), None)


def held(samples, idx, secs):
    """The last `secs` seconds of samples all have flag idx (and cover that long)."""
    if not samples:
        return False
    end = samples[-1][0]
    recent = [s for s in samples if s[0] >= end - secs * 1000]
    return bool(recent) and recent[0][0] <= end - secs * 1000 + 300 and all(s[idx] for s in recent)


def steady(samples, after, pred):
    """Time of the first sample after `after` from which pred holds for every sample of the next
    second while at least 10 frames are decoded in it (a picture, not one stray frame)."""
    for i, s in enumerate(samples):
        if s[0] < after or not pred(s):
            continue
        nxt = [x for x in samples[i:] if x[0] <= s[0] + 1000]
        if nxt[-1][0] >= s[0] + 900 and all(pred(x) for x in nxt) and nxt[-1][3] - s[3] >= 10:
            return s[0]
    return None


def longest_freeze(samples, start, end):
    """Longest time between two samples with rising framesDecoded (a freeze still going at the
    end counts too), over samples in [start, end]; with when it ended."""
    worst, worst_end, last = 0, None, None
    window = [s for s in samples if start <= s[0] <= end]
    for s in window:
        if last is None:
            last = (s[0], s[3])
        elif s[3] > last[1]:
            if s[0] - last[0] > worst:
                worst, worst_end = s[0] - last[0], s[0]
            last = (s[0], s[3])
    if last and window and window[-1][0] - last[0] > worst:
        worst, worst_end = window[-1][0] - last[0], window[-1][0]
    return worst, worst_end


def delta(samples, start, end, idx):
    w = [s for s in samples if start <= s[0] <= end]
    return (w[-1][idx] - w[0][idx], (w[-1][0] - w[0][0]) / 1000) if len(w) > 1 else (0, 0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", choices=sorted(TARGETS), required=True)
    ap.add_argument("--pub-driver", required=True, help="chromedriver URL of the publisher")
    ap.add_argument("--sub-driver", required=True, help="chromedriver URL of the subscriber")
    ap.add_argument("--pub-url", required=True)
    ap.add_argument("--sub-url", required=True)
    ap.add_argument("--sub-flag", action="append", default=[], help="extra subscriber flag")
    ap.add_argument("--dev", required=True, help="the interface whose egress is the downlink")
    ap.add_argument("--rate", default="300kbit")
    ap.add_argument("--warm", type=float, default=40)
    ap.add_argument("--shaped", type=float, default=25)
    ap.add_argument("--recover", type=float, default=40)
    ap.add_argument("--samples", help="write the raw samples here (JSON)")
    a = ap.parse_args()
    t = TARGETS[a.target]
    join = join_talkbox if a.target == "talkbox" else join_janus
    pub = sub = None
    started = time.time()
    try:
        # Chromium sends only two VP8 simulcast layers of a 640x480 camera (its legacy limit by
        # resolution drops the last listed encoding); the field trial lifts the limit so that
        # both servers get the same three layers.
        pub = WebDriver(a.pub_driver, ["--force-fieldtrials=WebRTC-LegacySimulcastLayerLimit/Disabled/"])
        join(pub, a.pub_url, "Pub")
        sub = WebDriver(a.sub_driver, a.sub_flag)
        join(sub, a.sub_url, "Sub")
        pub.js(PUB_SAMPLER % t["pub_pc"])
        sub.js(SUB_SAMPLER % t["sub_pc"])
        r = Run(sub, pub)
        warm_start = now_ms()
        top_held = r.until(a.warm, lambda s: held(s, 9, 5))
        first_top = r.first(warm_start, lambda s: s[9])
        layers_before = r.layers[-1][1] if r.layers else []
        pub_bwe_before = r.layers[-1][2] if r.layers else 0

        oracle = a.target == "janus-oracle"
        shape(a.dev, a.rate, True)
        dropped = now_ms()
        try:
            if oracle:
                sub.js("window.setSubstream(0); return true;")
            r.until(a.shaped, lambda s: False)
        finally:
            shape(a.dev, a.rate, False)
        lifted = now_ms()
        if oracle:
            sub.js("window.setSubstream(2); return true;")
        layers_shaped = r.layers[-1][1] if r.layers else []
        # Until the top layer is back and decoding, then 3 s more (a freeze right after the
        # last switch shows).
        def recovered(s):
            back = steady(s, lifted, lambda x: x[9])
            return back is not None and s[-1][0] >= back + 3000
        r.until(a.recover, recovered)
        end = now_ms()

        to_lower = steady(r.samples, dropped, lambda s: 0 < s[1] and not s[9])
        to_low = steady(r.samples, dropped, lambda s: s[10])
        # Back at the top and decoding again (the width alone stays at the top when a server
        # keeps forwarding the top layer into the shaped link and the picture just stops).
        to_top = steady(r.samples, lifted, lambda s: s[9])
        freeze, freeze_end = longest_freeze(r.samples, dropped - 1000, end)
        # The second half of the shaped phase: what the subscriber settled on.
        half = dropped + int(a.shaped * 500)
        frames, secs = delta(r.samples, half, lifted, 3)
        rx, _ = delta(r.samples, half, lifted, 4)
        fz_dur, _ = delta(r.samples, dropped - 1000, end, 6)
        fz_cnt, _ = delta(r.samples, dropped - 1000, end, 5)
        settled = [s[1] for s in r.samples if half <= s[0] <= lifted]
        events = sub.js("return (window.janusEvents || []).map(e => e[1]);") or []
        out = {
            "target": a.target,
            "layers_before": layers_before,
            "layers_shaped": layers_shaped,
            "publisher_bwe_kbps": round(pub_bwe_before / 1000),
            "top_reached_unshaped_s": None if first_top is None else (first_top - warm_start) / 1000,
            "top_held_5s_before_drop": top_held,
            "drop_to_lower_s": None if to_lower is None else (to_lower - dropped) / 1000,
            "drop_to_low_s": None if to_low is None else (to_low - dropped) / 1000,
            "recovery_to_top_s": None if to_top is None else (to_top - lifted) / 1000,
            "longest_freeze_s": freeze / 1000,
            "longest_freeze_ended_after_drop_s": None if freeze_end is None else (freeze_end - dropped) / 1000,
            "chromium_freezes": fz_cnt,
            "chromium_freeze_s": round(fz_dur, 2),
            "shaped_fps": round(frames / secs, 1) if secs else 0,
            "shaped_kbps": round(rx * 8 / secs / 1000) if secs else 0,
            "shaped_widths": sorted(set(settled)),
            "janus_events": {e: events.count(e) for e in set(events)},
            "rate": a.rate,
            "phases_s": [a.warm, a.shaped, a.recover],
            "wall_s": round(time.time() - started, 1),
        }
        pub_detail = pub.js_async(PUB_DETAIL % t["pub_pc"])
        if a.samples:
            with open(a.samples, "w") as f:
                json.dump({"dropped": dropped, "lifted": lifted, "publisher": pub_detail, "samples": r.samples,
                           "layers": r.layers}, f)
        print(json.dumps(out), flush=True)
    finally:
        for b in (sub, pub):
            if b:
                b.quit()


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 — what failed, for run.sh's log
        traceback.print_exc()
        print(f"quality driver: {e}", file=sys.stderr)
        sys.exit(1)
