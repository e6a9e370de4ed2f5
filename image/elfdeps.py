#!/usr/bin/env python3
"""Print the in-image paths of the shared libraries (and the dynamic loader) an ELF program of
the target root needs, for any architecture (reads ELF headers with readelf; no ldd, no chroot).
usage: elfdeps.py ROOT /usr/sbin/program"""
import os
import re
import subprocess
import sys

root, prog = sys.argv[1:]
dirs = []
for d in os.listdir(f"{root}/usr/lib"):
    if d.endswith("-linux-gnu"):
        dirs += [f"/usr/lib/{d}", f"/lib/{d}"]
dirs += ["/usr/lib", "/lib"]


def readelf(path, flag):
    return subprocess.run(["readelf", flag, "-W", root + path], capture_output=True, text=True).stdout


seen, todo = [], [prog]
interp = re.search(r"interpreter: ([^\]]+)\]", readelf(prog, "-l"))
if interp:
    seen.append(interp.group(1))
while todo:
    p = todo.pop()
    for lib in re.findall(r"\(NEEDED\).*\[(.+)\]", readelf(p, "-d")):
        for d in dirs:
            cand = f"{d}/{lib}"
            if os.path.exists(root + cand):
                if cand not in seen:
                    seen.append(cand)
                    todo.append(cand)
                break
        else:
            sys.exit(f"elfdeps: {lib} (needed by {p}) not found under {root}")
for p in seen:
    print(p)
