#!/usr/bin/env python3
"""The qemu scenarios of hw-tests. Each takes images built by image/build and proves one
must-show point from outside the box; every qemu it starts is stopped before it returns.

  scenarios.py boot     --arch A --image IMG               healthy, setup page, STUN, no journal errors, blessed
  scenarios.py update   --arch A --image IMG --bundle B    the boot checks on slot A, then install B from a
                                                           stick, reboot into slot B, healthy, marked good
  scenarios.py rollback --arch A --image IMG --bundle B    B never gets healthy: back on slot A by itself
  scenarios.py verity   --arch A --image IMG               one flipped byte in root A: refused, slot B boots
  scenarios.py provision --arch A --image IMG --engineer-key K
                                                           IMG trusts K.pub (image/build --engineer-key): a
                                                           bundle by fw_cfg is applied (its certificate served
                                                           on 9443), one by another key on a TALKBOX-PROV stick
                                                           refused; next boot a stick bundle is applied

Timings go to stdout as `TIMING name seconds` lines (docs/image.md records them).
"""

import argparse
import hashlib
import json
import os
import re
import ssl
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qemu_box import (Box, DataPartition, copy_disk, enter_private_netns, esp_listing, log,  # noqa: E402
                      make_stick, partition_offset)

BOOT_TIMEOUT = {"x86_64": 600, "aarch64": 900}


# Journal error lines that are facts of the emulated machine, not of the box, each with why.
# Everything else at priority err or above fails the scenario.
KNOWN_ERRORS = {
    # qemu's arm virt board describes no caches (no PPTT cache entries; qemu 10.0 has no
    # smp-cache support for it), so the arm64 kernel reports at err level that it found none.
    "aarch64": [r"Early cacheinfo failed, ret = -2"],
}


def healthy(box, timeout, slot=None, start=0):
    """Waits for the boot assessment's healthy line; checks the journal of that boot (every error
    line, failed units). Returns (match, seconds since qemu start)."""
    m, t = box.wait_for(r"TALKBOX-HEALTHY slot=(\w+) version=(\S+) uptime=(\S+)", timeout, start)
    got_slot, version = m.group(1), m.group(2)
    log(f"{box.name}: supervisor healthy on slot {got_slot} (version {version}) {t:.1f} s after qemu start, "
        f"guest uptime {m.group(3)}")
    if slot:
        assert got_slot == slot, f"expected slot {slot}, booted {got_slot}"
    e, _ = box.wait_for(r"TALKBOX-JOURNAL-ERRORS (\d+)", 60, m.end())
    done, _ = box.wait_for(r"TALKBOX-CHECK-DONE", 60, e.end())
    check_journal(box, int(e.group(1)), box.console()[e.end():done.start()])
    box.journal_checked = done.end()
    return m, t


# journald forwards every line at priority err or above to the console (ForwardToConsole=yes,
# MaxLevelConsole=err in the image) as "[  uptime] identifier[pid]: message"; systemd's own
# status lines mark failed units with "FAILED".
LATE_ERROR = re.compile(r"^\[\s*\d+\.\d+\] \S+: |FAILED")


def no_late_errors(box):
    """Errors logged after the boot's journal check (while the checks from outside ran) fail too."""
    late = [ln for ln in box.console()[box.journal_checked:].splitlines()
            if LATE_ERROR.search(ln) and not any(re.search(k, ln) for k in KNOWN_ERRORS.get(box.arch, []))]
    if late:
        raise AssertionError(f"{box.name}: error lines on the console after the journal check: {late}")
    log(f"{box.name}: no error lines after the journal check either")


def check_journal(box, count, report):
    """Strict: every error line of the boot (the check prints them all) must be a known fact of
    the emulated machine, and no unit may have failed."""
    lines = [ln.split("TALKBOX-JOURNAL-ERROR ", 1)[1] for ln in report.splitlines() if "TALKBOX-JOURNAL-ERROR " in ln]
    failed = [ln.split("TALKBOX-FAILED-UNIT ", 1)[1] for ln in report.splitlines() if "TALKBOX-FAILED-UNIT " in ln]
    known = [ln for ln in lines if any(re.search(k, ln) for k in KNOWN_ERRORS.get(box.arch, []))]
    unknown = [ln for ln in lines if ln not in known]
    if len(lines) != count:
        raise AssertionError(f"{box.name}: the journal has {count} error lines but the check printed {len(lines)}")
    if unknown or failed:
        raise AssertionError(f"{box.name}: journal error lines: {unknown}; failed units: {failed}")
    log(f"{box.name}: journal: no error lines" + (f" besides {len(known)} known of the emulated machine: {known}"
                                                   if known else "") + "; no failed units")


def boot_count(box):
    """The boot-counting line check-healthy prints (what systemd-boot told the OS, whether
    systemd-bless-boot ran): why a slot was not marked good."""
    m = re.search(r"TALKBOX-BOOT-COUNT [^\r\n]*", box.console())
    return m.group(0) if m else "no TALKBOX-BOOT-COUNT line on the console"


def outside_checks(box):
    """The setup page through the tcp forward, STUN through the udp and tcp forwards."""
    status, body = box.setup_page()
    log(f"setup page through the tcp forward: HTTP {status}, {body[:60]!r}")
    assert status == 200
    mapped = box.stun_binding()
    log(f"STUN Binding through the udp forward answered: XOR-MAPPED-ADDRESS {mapped}")
    ip, port = box.stun_binding_tcp()
    log(f"STUN Binding through the tcp forward to 3478 answered: XOR-MAPPED-ADDRESS {ip}:{port}")


def scenario_boot(a, work):
    disk = os.path.join(work, "disk.img")
    copy_disk(a.image, disk)
    box = Box(a.arch, disk, work, "boot")
    try:
        m, t = healthy(box, BOOT_TIMEOUT[a.arch], "A")
        print(f"TIMING boot-to-healthy-{a.arch} {t:.1f}")
        outside_checks(box)
        no_late_errors(box)
        box.powerdown()
    finally:
        box.kill()
    names = esp_listing(disk)
    log(f"ESP after the healthy boot: {names}")
    assert any(n.endswith("-slotA.efi") for n in names), f"slot A was not marked good (blessed): {boot_count(box)}"
    return disk


def scenario_update(a, work, checks=False):
    disk = os.path.join(work, "disk.img")
    copy_disk(a.image, disk)
    stick = os.path.join(work, "stick.img")
    make_stick(a.bundle, stick)
    box = Box(a.arch, disk, work, "install", stick=stick)
    try:
        m, t = healthy(box, BOOT_TIMEOUT[a.arch], "A")
        print(f"TIMING boot-to-healthy-{a.arch} {t:.1f}")
        if checks:
            outside_checks(box)
        i, ti = box.wait_for(r"TALKBOX-UPDATE-INSTALLED version=([^;\s]+)", 600, m.end())
        log(f"bundle version {i.group(1)} installed into the other slot at {ti:.1f} s; rebooting")
        no_late_errors(box)
        box.wait_exit(180)
        # Until the reboot: the shutdown's own last lines (dm-verity root not detachable) aside.
        box.journal_checked = i.end()
        cut = box.console().find("systemd-shutdown[1]", i.end())
        late = box.console()[i.end():cut if cut >= 0 else None]
        if any(LATE_ERROR.search(ln) for ln in late.splitlines()):
            raise AssertionError(f"{box.name}: error lines while installing/rebooting: "
                                 f"{[ln for ln in late.splitlines() if LATE_ERROR.search(ln)]}")
    finally:
        box.kill()
    names = esp_listing(disk)
    log(f"ESP after install: {names}")
    assert any(n.endswith("-slotA.efi") for n in names), f"slot A was not marked good before the update: {boot_count(box)}"
    return disk, i.group(1), ti


def run_update(a, work):
    t0 = time.monotonic()
    disk, version, _ = scenario_update(a, work, checks=True)
    assert any(n.endswith(f"{version}-slotB+3.efi") for n in esp_listing(disk)), "slot B not armed with 3 tries"
    box = Box(a.arch, disk, work, "slotB")
    try:
        m, t = healthy(box, BOOT_TIMEOUT[a.arch], "B")
        assert m.group(2) == version, f"slot B runs version {m.group(2)}, expected {version}"
        print(f"TIMING update-boot-to-healthy-{a.arch} {t:.1f}")
        no_late_errors(box)
        box.powerdown()
    finally:
        box.kill()
    names = esp_listing(disk)
    log(f"ESP after the first healthy boot of slot B: {names}")
    assert f"talkbox-{version}-slotB.efi" in names, f"slot B was not marked good: {boot_count(box)}"
    print(f"TIMING update-scenario-{a.arch} {time.monotonic() - t0:.1f}")


def run_rollback(a, work):
    t0 = time.monotonic()
    disk, version, _ = scenario_update(a, work)
    # The guest reboots by itself now (no -no-reboot): 3 unhealthy tries of B, then A.
    box = Box(a.arch, disk, work, "rollback", reboot=True)
    try:
        pos = 0
        # Each try of slot B shows as its stage-1 line; each ends in a reboot (the check reports
        # TALKBOX-UNHEALTHY, or systemd's timeout stops it first under heavy load).
        for n in range(1, 4):
            u, t = box.wait_for(r"\[stage1\] slot root rootB", BOOT_TIMEOUT[a.arch], pos)
            log(f"try {n} of slot B started ({t:.1f} s)")
            pos = u.end()
        m, t = healthy(box, BOOT_TIMEOUT[a.arch], "A", pos)
        print(f"TIMING rollback-to-healthy-A-{a.arch} {t:.1f}")
        no_late_errors(box)
        box.powerdown()
    finally:
        box.kill()
    names = esp_listing(disk)
    log(f"ESP after rollback: {names}")
    assert any("-slotB+0-3.efi" in n for n in names), "slot B not marked bad by systemd-boot"
    print(f"TIMING rollback-scenario-{a.arch} {time.monotonic() - t0:.1f}")


def run_verity(a, work):
    t0 = time.monotonic()
    disk = os.path.join(work, "disk.img")
    copy_disk(a.image, disk)
    off = partition_offset(disk, "rootA") + 1024 + 7  # inside the erofs superblock (block 0)
    with open(disk, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x01]))
    log(f"flipped one bit of the byte at disk offset {off} (root A, erofs superblock)")
    box = Box(a.arch, disk, work, "verity", reboot=True)
    try:
        m, t = healthy(box, BOOT_TIMEOUT[a.arch] + 300, "B")
        refusals = box.console().count("verity")
        log(f"slot B healthy after {t:.1f} s; console lines naming verity: {refusals}")
        assert "dm-verity" in box.console() or "corrupted" in box.console() or "refused" in box.console()
        print(f"TIMING verity-fallback-to-healthy-B-{a.arch} {t:.1f}")
        no_late_errors(box)
        box.powerdown()
    finally:
        box.kill()
    names = esp_listing(disk)
    log(f"ESP after the tampered boots: {names}")
    assert any("-slotA+0-3.efi" in n for n in names), "slot A not marked bad"
    print(f"TIMING verity-scenario-{a.arch} {time.monotonic() - t0:.1f}")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The box's config as the image ships it; a bundle carries a whole config file.
IMAGE_CONFIG = os.path.join(REPO, "image", "rootfs", "usr", "share", "talkbox", "talkbox.toml")


def run(cmd, what):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"{what}: {' '.join(cmd)}: rc {r.returncode}: {r.stdout}{r.stderr}")
    return r.stdout


def make_cert(work, stem, names):
    """A self-signed P-256 certificate and key for `names` (what a site's certificate stands in
    for); returns (cert path, key path, DER bytes)."""
    cert, key = os.path.join(work, f"{stem}.cert.pem"), os.path.join(work, f"{stem}.key.pem")
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", key, "-out", cert, "-days", "30", "-subj", f"/CN={names[0]}",
         "-addext", "subjectAltName=" + ",".join(f"DNS:{n}" for n in names)], "openssl req")
    with open(cert) as f:
        der = ssl.PEM_cert_to_DER_cert(f.read())
    return cert, key, der


def make_bundle(a, work, stem, key, serial, names, secret=None):
    """A bundle for any box: the image's config with `supervisor.names`, a certificate for those
    names, optionally a secret. Returns (bundle path, certificate DER, config text)."""
    cert, ckey, der = make_cert(work, stem, names)
    with open(IMAGE_CONFIG) as f:
        config = "[supervisor]\nnames = [" + ", ".join(f'"{n}"' for n in names) + "]\n\n" + f.read()
    conf = os.path.join(work, f"{stem}.toml")
    with open(conf, "w") as f:
        f.write(config)
    out = os.path.join(work, f"{stem}.bundle")
    cmd = [a.tool, "bundle", "create", "--key", key, "--config", conf, "--serial", str(serial),
           "--target", "any", "--valid-for", "1d", "--tls-cert", cert, "--tls-key", ckey,
           "--comment", f"hw-tests {stem}", "--out", out]
    if secret:
        cmd += ["--secret", f"hwtest={secret}"]
    run(cmd, f"bundle {stem}")
    return out, der, config


def wait_certificate(box, want, refused, timeout):
    """Polls the certificate served on 9443 until it is `want`; fails at once if it is one of
    `refused` (a bundle that must not be applied)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = box.served_certificate()
        except OSError as e:
            last = e
        if last == want:
            return time.monotonic() - box.t0
        if last in refused:
            raise AssertionError(f"{box.name}: the setup page serves the certificate of a bundle that must be refused")
        time.sleep(2)
    got = f"a certificate with SHA-256 {hashlib.sha256(last).hexdigest()[:16]}" if isinstance(last, bytes) else last
    raise AssertionError(f"{box.name}: the setup page did not serve the bundle's certificate within {timeout} s; "
                         f"it served {got}")


def audit_entries(data):
    text = data.read("lib/talkbox/provisioning/audit.jsonl")
    if text is None:
        raise AssertionError("no provisioning audit log (/var/lib/talkbox/provisioning/audit.jsonl) on the data partition")
    return [json.loads(ln) for ln in text.decode().splitlines() if ln.strip()]


def expect_audit(entries, source, serial, result, why=""):
    hits = [e for e in entries if e.get("source") == source and e.get("serial") == serial
            and e.get("result") == result and why in e.get("message", "")]
    if not hits:
        raise AssertionError(f"the audit log has no '{result}' entry for {source} serial {serial}"
                             f"{' naming ' + repr(why) if why else ''}; it has: {entries}")
    log(f"audit log: {source} serial {serial} {result}: {hits[0]['message'][:110]}")


def run_provision(a, work):
    """fw_cfg and TALKBOX-PROV delivery in a real boot. Boot 1: the fw_cfg item carries a bundle
    by the trusted key (serial 1, certificate for box.example.test); a TALKBOX-PROV stick carries
    one by another key (serial 7). The stick is read first, so if its bundle were accepted it would
    be the one applied (and the fw_cfg one refused as busy): the setup page must serve the fw_cfg
    bundle's certificate. Boot 2 (same disk, no fw_cfg): a stick with a trusted bundle (serial 2,
    two names, a secret) is applied. Afterwards the data partition shows the audit entries, the
    config and the secret."""
    t0 = time.monotonic()
    if not a.engineer_key or not os.path.exists(a.engineer_key):
        raise AssertionError("provision needs --engineer-key FILE: the secret key whose .pub the image was built with")
    disk = os.path.join(work, "disk.img")
    copy_disk(a.image, disk)
    rogue = os.path.join(work, "rogue")
    run([a.tool, "keygen", "--out", rogue, "--comment", "hw-tests: a key the box does not trust"], "keygen")
    b1, cert1, _ = make_bundle(a, work, "fw-cfg-1", a.engineer_key, 1, ["box.example.test"])
    bad, cert_bad, _ = make_bundle(a, work, "rogue-7", rogue, 7, ["box.example.test"])
    secret = os.path.join(work, "hwtest.secret")
    with open(secret, "w") as f:
        f.write(os.urandom(16).hex())
    b2, cert2, config2 = make_bundle(a, work, "stick-2", a.engineer_key, 2,
                                     ["box.example.test", "talk.example.test"], secret)

    # FAT labels have at most 11 characters: a FAT stick is labelled TALKBOXPROV.
    stick1 = os.path.join(work, "prov-stick-1.img")
    make_stick(None, stick1, "TALKBOXPROV", {"site.bundle": bad}, fs="vfat")
    box = Box(a.arch, disk, work, "fwcfg", stick=stick1, fw_cfg=b1)
    try:
        staged, _ = box.wait_for(r"TALKBOX-PROVISION-MEDIA TALKBOXPROV \(\S+\): (\d+) bundle", BOOT_TIMEOUT[a.arch])
        assert staged.group(1) == "1", f"the FAT stick has 1 bundle, {staged.group(1)} staged"
        m, t = healthy(box, BOOT_TIMEOUT[a.arch], "A")
        print(f"TIMING provision-boot-to-healthy-{a.arch} {t:.1f}")
        tc = wait_certificate(box, cert1, [cert_bad], 180)
        log(f"fwcfg: the setup page serves the fw_cfg bundle's certificate (box.example.test) {tc:.1f} s after qemu start")
        print(f"TIMING provision-fw-cfg-certificate-served-{a.arch} {tc:.1f}")
        no_late_errors(box)
        box.powerdown()
    finally:
        box.kill()
    entries = audit_entries(DataPartition(disk, os.path.join(work, "data-1.img")))
    expect_audit(entries, "usb", 7, "refused", "untrusted key")
    expect_audit(entries, "fw_cfg", 1, "applied")

    stick2 = os.path.join(work, "prov-stick-2.img")
    make_stick(None, stick2, "TALKBOX-PROV", {"site.bundle": b2}, fs="ext4")
    box = Box(a.arch, disk, work, "stick", stick=stick2)
    try:
        staged, _ = box.wait_for(r"TALKBOX-PROVISION-MEDIA TALKBOX-PROV \(\S+\): (\d+) bundle", BOOT_TIMEOUT[a.arch])
        assert staged.group(1) == "1", f"the ext4 stick has 1 bundle, {staged.group(1)} staged"
        m, t = healthy(box, BOOT_TIMEOUT[a.arch], "A")
        tc = wait_certificate(box, cert2, [], 180)
        log(f"stick: the setup page serves the TALKBOX-PROV bundle's certificate {tc:.1f} s after qemu start")
        print(f"TIMING provision-stick-certificate-served-{a.arch} {tc:.1f}")
        no_late_errors(box)
        box.powerdown()
    finally:
        box.kill()
    data = DataPartition(disk, os.path.join(work, "data-2.img"))
    entries = audit_entries(data)
    expect_audit(entries, "usb", 2, "applied")
    got = data.read("lib/talkbox/talkbox.toml")
    assert got is not None and got.decode() == config2, "the box's config is not the stick bundle's"
    with open(secret, "rb") as f:
        assert data.read("lib/talkbox/secrets/hwtest") == f.read(), "the bundle's secret is not on the box"
    mode = data.mode("lib/talkbox/secrets/hwtest")
    assert mode == "0600", f"the bundle's secret has mode {mode}, expected 0600"
    log("data partition: config is the stick bundle's; secret hwtest installed with mode 0600")
    print(f"TIMING provision-scenario-{a.arch} {time.monotonic() - t0:.1f}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("scenario", choices=["boot", "update", "rollback", "verity", "provision"])
    p.add_argument("--arch", default="x86_64")
    p.add_argument("--image", required=True)
    p.add_argument("--bundle")
    p.add_argument("--work", default=None)
    p.add_argument("--engineer-key", help="provision: the engineer's secret key (its .pub is baked into the image)")
    p.add_argument("--tool", default=os.path.join(REPO, "target", "debug", "talkbox-provision"),
                   help="provision: the talkbox-provision binary")
    a = p.parse_args()
    enter_private_netns()
    work = a.work or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", f"{a.scenario}-{a.arch}")
    os.makedirs(work, exist_ok=True)
    for f in os.listdir(work):
        os.unlink(os.path.join(work, f))
    t0 = time.monotonic()
    try:
        {"boot": scenario_boot, "update": run_update, "rollback": run_rollback, "verity": run_verity,
         "provision": run_provision}[a.scenario](a, work)
    except AssertionError as e:
        print(f"FAIL {a.scenario} {a.arch}: {e}", flush=True)
        return 1
    print(f"PASS {a.scenario} {a.arch} ({time.monotonic() - t0:.0f} s)", flush=True)
    for f in ("disk.img", "stick.img", "data-1.img", "data-2.img", "prov-stick-1.img", "prov-stick-2.img"):
        path = os.path.join(work, f)
        if os.path.exists(path) and not os.environ.get("HW_TESTS_KEEP"):
            os.unlink(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
