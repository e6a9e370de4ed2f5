"""Boots a talkbox disk image under qemu (TCG) and checks it from outside.

One `Box` is one qemu process: UEFI firmware with Debian's test Secure Boot keys enrolled
(OVMF / AAVMF "snakeoil" variables), the disk as virtio, user-mode networking with forwards on
127.0.0.1 (tcp -> setup page 9443, udp -> STUN/TURN 3478), serial console to a log file, and a
QMP socket for an ACPI power-off. Every qemu runs inside a network namespace that the
scenario makes for itself and that holds only a loopback interface (`enter_private_netns`):
that, not qemu's `restrict=on`, keeps the guest off every real network, because libslirp in
restricted mode drops every UDP datagram the guest sends (DHCP and TFTP aside), the replies
of a UDP host forward included, so no STUN answer could ever come back. The image prints marker lines on the
console (talkbox-healthy.service): TALKBOX-HEALTHY slot=.. version=.., TALKBOX-JOURNAL-ERRORS n,
TALKBOX-UNHEALTHY, TALKBOX-UPDATE-INSTALLED.
"""

import json
import os
import re
import shutil
import socket
import ssl
import struct
import subprocess
import time
import sys
import urllib.request

FIRMWARE = {
    "x86_64": ("/usr/share/OVMF/OVMF_CODE_4M.snakeoil.fd", "/usr/share/OVMF/OVMF_VARS_4M.snakeoil.fd"),
    "aarch64": ("/usr/share/AAVMF/AAVMF_CODE.snakeoil.fd", "/usr/share/AAVMF/AAVMF_VARS.snakeoil.fd"),
}


# Another qemu to run: the root of unpacked Debian qemu-system-* packages (usr/bin/qemu-system-*;
# qemu-system-common's modules in usr/lib/x86_64-linux-gnu/qemu), e.g. bookworm's 7.2, which CI
# uses, unpacked with `apt-get download` + `dpkg-deb -x` (docs/image.md). Default: the PATH's qemu.
QEMU_ROOT = os.environ.get("HW_TESTS_QEMU_ROOT", "")
if QEMU_ROOT:
    # Debian builds the TCG accelerator as a module; qemu looks for it here instead of in its own
    # (installed) module path, whose modules belong to the installed qemu.
    os.environ["QEMU_MODULE_DIR"] = os.path.join(QEMU_ROOT, "usr", "lib", "x86_64-linux-gnu", "qemu")


def qemu_binary(arch):
    name = f"qemu-system-{arch}"
    return os.path.join(QEMU_ROOT, "usr", "bin", name) if QEMU_ROOT else name


def free_port(kind):
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


NETNS_MARK = "HW_TESTS_PRIVATE_NETNS"
STUN_COOKIE = 0x2112A442
SLIRP_HOST = "10.0.2.2"  # how qemu's user network presents the host (and its forwards) to the guest


def enter_private_netns():
    """Re-runs this program in a new network namespace with only loopback up, unless it runs in
    one already. qemu's user-mode network then reaches nothing beyond this namespace's loopback
    (where only the test's own forwards listen); the host-side checks run in the same namespace.
    As root: `unshare --net`; otherwise a user namespace maps the caller to root first."""
    if os.environ.get(NETNS_MARK) == "1":
        if subprocess.run(["ip", "link", "set", "lo", "up"]).returncode != 0:
            raise SystemExit("hw-tests: cannot bring up loopback in the private network namespace")
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
        others = [ln.split(":")[1].strip() for ln in links.splitlines() if ":" in ln and ln.split(":")[1].strip() != "lo"]
        if others:
            raise SystemExit(f"hw-tests: the private network namespace has interfaces besides lo: {others}")
        return
    cmd = ["unshare", "--net"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "--net"]
    env = dict(os.environ, **{NETNS_MARK: "1"})
    try:
        os.execvpe(cmd[0], cmd + [sys.executable] + sys.argv, env)
    except OSError as e:
        raise SystemExit(f"hw-tests: cannot start {' '.join(cmd)} for a private network namespace: {e}")


class Box:
    def __init__(self, arch, disk, workdir, name, stick=None, reboot=False, mem=1024, fw_cfg=None):
        """`stick`: a second disk (read-only virtio), e.g. a TALKBOX-UPD or TALKBOX-PROV volume;
        `fw_cfg`: a file handed to the guest as the fw_cfg item opt/talkbox/bundle."""
        self.arch, self.disk, self.workdir, self.name = arch, disk, workdir, name
        os.makedirs(workdir, exist_ok=True)
        self.logfile = os.path.join(workdir, f"{name}.console.log")
        self.qmp_path = os.path.join(workdir, f"{name}.qmp")
        self.vars = os.path.join(workdir, "efivars.fd")
        code, vars_template = FIRMWARE[arch]
        if not os.path.exists(self.vars):
            shutil.copy(vars_template, self.vars)
        self.web_port = free_port(socket.SOCK_STREAM)
        self.stun_port = free_port(socket.SOCK_DGRAM)
        self.stun_tcp_port = free_port(socket.SOCK_STREAM)
        # No restrict=on (see the module comment): the private namespace isolates the guest.
        net = (f"user,id=n0,hostfwd=tcp:127.0.0.1:{self.web_port}-:9443,"
               f"hostfwd=udp:127.0.0.1:{self.stun_port}-:3478,"
               f"hostfwd=tcp:127.0.0.1:{self.stun_tcp_port}-:3478")
        if arch == "x86_64":
            cmd = [qemu_binary("x86_64"), "-accel", "tcg", "-machine", "q35,smm=on",
                   "-global", "driver=cfi.pflash01,property=secure,value=on", "-cpu", "max"]
        else:
            cmd = [qemu_binary("aarch64"), "-accel", "tcg", "-machine", "virt", "-cpu", "cortex-a72"]
        if QEMU_ROOT:
            cmd += ["-L", os.path.join(QEMU_ROOT, "usr", "share", "qemu")]  # its own option ROMs
        cmd += ["-m", str(mem), "-smp", "2", "-nographic", "-nodefaults", "-serial", "stdio",
                "-drive", f"if=pflash,format=raw,readonly=on,file={code}",
                "-drive", f"if=pflash,format=raw,file={self.vars}",
                "-drive", f"file={disk},if=virtio,format=raw,cache=unsafe",
                "-netdev", net, "-device", "virtio-net-pci,netdev=n0,romfile=",
                "-device", "virtio-rng-pci",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if stick:
            cmd += ["-drive", f"file={stick},if=virtio,format=raw,readonly=on"]
        if fw_cfg:
            # read in the guest from /sys/firmware/qemu_fw_cfg/by_name/opt/talkbox/bundle/raw
            cmd += ["-fw_cfg", f"name=opt/talkbox/bundle,file={fw_cfg}"]
        if not reboot:
            cmd += ["-no-reboot"]
        self.cmd = cmd
        self.out = open(self.logfile, "wb")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.out, stderr=subprocess.STDOUT)
        version = subprocess.run([cmd[0], "--version"], capture_output=True, text=True).stdout.split("\n")[0]
        log(f"{name}: {version}")
        log(f"{name}: qemu pid {self.proc.pid} ({arch}, web 127.0.0.1:{self.web_port}, "
            f"stun udp 127.0.0.1:{self.stun_port}), console {self.logfile}")

    def console(self):
        with open(self.logfile, "rb") as f:
            return f.read().decode("utf-8", "replace").replace("\r", "")

    def wait_for(self, pattern, timeout, start=0):
        """Waits for a console line matching `pattern` (regex) after character `start`.
        Returns (match, seconds since qemu started)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = rx.search(self.console(), start)
            if m:
                return m, time.monotonic() - self.t0
            if self.proc.poll() is not None:
                m = rx.search(self.console(), start)
                if m:
                    return m, time.monotonic() - self.t0
                raise AssertionError(f"{self.name}: qemu exited (rc {self.proc.returncode}) before /{pattern}/; "
                                     f"console tail:\n{self.tail()}")
            time.sleep(0.5)
        raise AssertionError(f"{self.name}: no /{pattern}/ within {timeout} s; console tail:\n{self.tail()}")

    def tail(self, n=40):
        return "\n".join(self.console().splitlines()[-n:])

    def wait_exit(self, timeout):
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name}: qemu still running after {timeout} s; tail:\n{self.tail()}")

    def powerdown(self, timeout=30):
        """ACPI power button through QMP; systemd shuts down cleanly (ESP renames are synced)."""
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(self.qmp_path)
            f = s.makefile("rw")
            f.readline()
            for c in ("qmp_capabilities", "system_powerdown"):
                f.write(json.dumps({"execute": c}) + "\n")
                f.flush()
                f.readline()
            s.close()
        except OSError as e:
            log(f"{self.name}: QMP: {e}")
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            # systemd-logind (which acts on the power button) is masked in the image; the guest's
            # writes are already in the disk file, so stopping qemu loses nothing we check.
            log(f"{self.name}: no ACPI shutdown within {timeout} s; stopping qemu")
            self.kill()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if not self.out.closed:
            self.out.close()

    # --- checks from outside ---------------------------------------------------------------
    def setup_page(self):
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the box's certificate is self-signed until claimed
        last = None
        for _ in range(30):
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{self.web_port}/", context=ctx, timeout=20) as r:
                    return r.status, r.read(200)
            except OSError as e:
                last = e
                time.sleep(2)
        raise AssertionError(f"setup page through 127.0.0.1:{self.web_port}: {last}")

    def served_certificate(self):
        """The DER certificate the setup page presents through the tcp forward (no SNI: the
        checks connect to 127.0.0.1)."""
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", self.web_port), timeout=20) as raw:
            with ctx.wrap_socket(raw) as s:
                return s.getpeercert(binary_form=True)

    @staticmethod
    def _stun_request():
        tid = os.urandom(12)
        return tid, struct.pack("!HHI", 0x0001, 0, STUN_COOKIE) + tid

    @staticmethod
    def _stun_mapped(data, tid, transport):
        """Checks a Binding success response (RFC 8489) and returns its XOR-MAPPED-ADDRESS."""
        if len(data) < 20:
            raise AssertionError(f"STUN over {transport}: {len(data)}-byte answer, a STUN header is 20")
        mtype, mlen, cookie = struct.unpack("!HHI", data[:8])
        if mtype != 0x0101 or cookie != STUN_COOKIE or data[8:20] != tid:
            raise AssertionError(f"STUN over {transport}: not a Binding success for our request: {data[:20].hex()}")
        attrs = data[20:20 + mlen]
        while len(attrs) >= 4:
            at, al = struct.unpack("!HH", attrs[:4])
            if at == 0x0020 and al >= 8 and attrs[5] == 0x01:  # XOR-MAPPED-ADDRESS, IPv4
                port = struct.unpack("!H", attrs[6:8])[0] ^ (STUN_COOKIE >> 16)
                ip = bytes(a ^ b for a, b in zip(attrs[8:12], struct.pack("!I", STUN_COOKIE)))
                return socket.inet_ntoa(ip), port
            attrs = attrs[4 + ((al + 3) & ~3):]
        raise AssertionError(f"STUN over {transport}: Binding success without an IPv4 XOR-MAPPED-ADDRESS")

    def stun_binding_tcp(self):
        """The same Binding request over TCP (RFC 8489 needs no extra framing over TCP)."""
        tid, req = self._stun_request()
        with socket.create_connection(("127.0.0.1", self.stun_tcp_port), timeout=20) as s:
            s.sendall(req)
            data = s.recv(2048)
        return self._stun_mapped(data, tid, "tcp")

    def stun_binding(self):
        """RFC 8489 Binding request through the udp forward. The box must answer with the
        address it saw the request come from: qemu's user network presents the host as
        10.0.2.2 and keeps the source port, so the answer names 10.0.2.2 and our port."""
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.settimeout(3)
        own_port = s.getsockname()[1]
        try:
            for _ in range(10):  # UDP: a request or answer may be lost while the guest is busy
                tid, req = self._stun_request()
                s.sendto(req, ("127.0.0.1", self.stun_port))
                try:
                    data, _ = s.recvfrom(2048)
                except socket.timeout:
                    continue
                mapped = self._stun_mapped(data, tid, "udp")
                if mapped != (SLIRP_HOST, own_port):
                    raise AssertionError(f"STUN over udp: XOR-MAPPED-ADDRESS {mapped[0]}:{mapped[1]}, "
                                         f"expected {SLIRP_HOST}:{own_port} (the client as the guest sees it)")
                return f"{mapped[0]}:{mapped[1]}"
            raise AssertionError(f"no STUN answer through udp 127.0.0.1:{self.stun_port} (10 requests, 3 s each)")
        finally:
            s.close()


def esp_listing(disk):
    """File names in EFI/Linux of the disk's ESP (1 MiB offset), read with mtools."""
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    out = subprocess.run(["mdir", "-b", "-i", f"{disk}@@1M", "::/EFI/Linux"], capture_output=True,
                         text=True, env=env).stdout
    return sorted(os.path.basename(line.strip()) for line in out.splitlines() if line.strip())


def make_stick(bundle, path, label="TALKBOX-UPD", files=None, fs="vfat"):
    """A volume labelled `label`, made and filled without mounts: FAT (mkfs.vfat + mtools; labels
    of at most 11 characters) or ext4 (mkfs.ext4 -d). By default an update stick holding `bundle`
    as update.raucb; `files` maps names on the stick to files."""
    files = files if files is not None else {"update.raucb": bundle}
    size_mib = sum(os.path.getsize(f) for f in files.values()) // 1048576 + 16
    if os.path.exists(path):
        os.unlink(path)
    if fs == "ext4":
        src = path + ".d"
        shutil.rmtree(src, ignore_errors=True)
        os.makedirs(src)
        for name, f in files.items():
            shutil.copy(f, os.path.join(src, name))
        subprocess.run(["mkfs.ext4", "-q", "-L", label, "-d", src, path, f"{size_mib}M"], check=True,
                       capture_output=True)
        shutil.rmtree(src)
        return
    subprocess.run(["mkfs.vfat", "-n", label, "-C", path, str(size_mib * 1024)], check=True,
                   capture_output=True)
    for name, src in files.items():
        subprocess.run(["mcopy", "-i", path, src, f"::/{name}"], check=True,
                       env=dict(os.environ, MTOOLS_SKIP_CHECK="1"))


def copy_disk(src, dst):
    subprocess.run(["cp", "--sparse=always", src, dst], check=True)


def partition_offset(disk, name):
    """Byte offset of the GPT partition with this name (sgdisk)."""
    out = subprocess.run(["sgdisk", "-p", disk], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 7 and f[0].isdigit() and f[-1] == name:
            return int(f[1]) * 512
    raise AssertionError(f"no partition {name} in {disk}")


def partition_extent(disk, name):
    """(byte offset, byte size) of the GPT partition with this name (sgdisk)."""
    out = subprocess.run(["sgdisk", "-p", disk], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 7 and f[0].isdigit() and f[-1] == name:
            return int(f[1]) * 512, (int(f[2]) - int(f[1]) + 1) * 512
    raise AssertionError(f"no partition {name} in {disk}")


class DataPartition:
    """A copy of the disk's data partition (ext4, mounted on /var in the box), read with
    e2fsprogs after qemu stopped: no mounts. qemu is stopped without a clean shutdown, so the
    ext4 journal is replayed on the copy first (what the box itself would do at its next boot);
    without that, metadata still only in the journal would be missed."""

    def __init__(self, disk, path):
        off, size = partition_extent(disk, "data")
        mib = 1048576
        subprocess.run(["dd", f"if={disk}", f"of={path}", f"bs={mib}", f"skip={off // mib}",
                        f"count={size // mib}", "conv=sparse", "status=none"], check=True)
        r = subprocess.run(["e2fsck", "-y", "-E", "journal_only", path], capture_output=True, text=True)
        # 0: clean, 1: errors corrected (the journal replay counts as that)
        if r.returncode not in (0, 1):
            raise AssertionError(f"e2fsck of the data partition copy: rc {r.returncode}: {r.stdout}{r.stderr}")
        self.path = path

    def _debugfs(self, request):
        r = subprocess.run(["debugfs", "-R", request, self.path], capture_output=True)
        return r.stdout, r.stderr.decode("utf-8", "replace")

    def read(self, var_path):
        """The content of /var/VAR_PATH in the box, or None if it is not there."""
        out, err = self._debugfs(f"cat /{var_path}")
        if "File not found" in err:
            return None
        return out

    def mode(self, var_path):
        """The permission bits of /var/VAR_PATH (octal string, e.g. '0600'), or None."""
        out, err = self._debugfs(f"stat /{var_path}")
        m = re.search(r"Mode:\s+(\d+)", out.decode("utf-8", "replace"))
        return m.group(1) if m else None
