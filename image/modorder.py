#!/usr/bin/env python3
"""Print in-image paths of the named kernel modules and their dependencies, dependencies first.
usage: modorder.py ROOT KVER NAME... (names that are built in or absent are skipped)."""
import os
import sys

root, ver, *names = sys.argv[1:]
base = f"{root}/lib/modules/{ver}"
dep = {}
for line in open(f"{base}/modules.dep"):
    mod, _, deps = line.partition(":")
    dep[mod] = deps.split()
byname = {os.path.basename(m).split(".ko")[0].replace("-", "_"): m for m in dep}
out = []


def visit(m):
    if m in out:
        return
    for d in dep[m]:
        visit(d)
    out.append(m)


for n in names:
    key = n.replace("-", "_")
    if key in byname:
        visit(byname[key])
    else:
        print(f"# not a module here (built in or absent): {n}", file=sys.stderr)
for m in out:
    print(f"/lib/modules/{ver}/{m}")
