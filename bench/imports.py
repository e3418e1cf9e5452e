"""What each import of a module costs in memory (RSS) and time, e.g. of the agent.

``python -X importtime`` gives the time of each import but not its memory, and the
idle agent's RSS target (<= 40 MB) is about memory. This script imports MODULE in
a fresh interpreter with ``builtins.__import__`` wrapped, reads the process's RSS
(/proc/self/statm) before and after every import statement, and charges each
module what its own first import added (its "self" cost: the RSS its import grew
by, minus what the modules it imported in turn added). Figures are summed per
top-level package, and the first import chain that pulled each package in is
shown, so an import that could be made lazy is easy to spot.

RSS grows by pages, and the allocator keeps freed memory, so a single module's
figure is rough (+-100 KB); package totals are steady from run to run.

    python bench/imports.py [MODULE] [--top 25] [--block PKG,PKG] [--lazy MOD,MOD]

``--block`` makes the named packages unimportable first, to see what the whole
process saves without them (httpx, for one, does without ``httpx._main``, its
command line, which pulls in rich, pygments and click); it fails if MODULE truly
needs one. ``--lazy`` replaces the named modules (and their submodules) with
empty stand-ins, to see what importing them lazily would save while unused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

#: Runs in the fresh interpreter: prints one JSON document of per-import records.
PROBE = r"""
import builtins, json, os, sys, time
PAGE = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE
for name in sys.argv[2].split(","):
    if name:
        sys.modules[name] = None  # "import name" now raises ImportError
LAZY = tuple(n for n in sys.argv[3].split(",") if n)
import importlib.abc, importlib.machinery, types
class Stub(types.ModuleType):
    # stands in for a module imported lazily: any attribute is a placeholder class
    __path__ = []
    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return type(attr, (), {"__init__": lambda self, *a, **k: None})
class StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if any(fullname == n or fullname.startswith(n + ".") for n in LAZY):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
    def create_module(self, spec):
        return Stub(spec.name)
    def exec_module(self, module):
        pass
sys.meta_path.insert(0, StubFinder())
records, stack = [], []
real_import = builtins.__import__
def tracing_import(name, globals=None, locals=None, fromlist=(), level=0):
    before = set(sys.modules)
    stack.append([0, 0.0])
    r0, t0 = rss(), time.perf_counter()
    try:
        return real_import(name, globals, locals, fromlist, level)
    finally:
        grew, took = rss() - r0, time.perf_counter() - t0
        child_rss, child_t = stack.pop()
        new = sorted(set(sys.modules) - before)
        if new:
            records.append({"module": min(new, key=len), "new": len(new), "self_rss": grew - child_rss,
                            "self_s": took - child_t, "chain": [f["module"] for f in frames]})
        if stack:
            stack[-1][0] += grew
            stack[-1][1] += took
frames = []
def framed_import(name, globals=None, locals=None, fromlist=(), level=0):
    pkg = (globals or {}).get("__name__", "?")
    frames.append({"module": pkg})
    try:
        return tracing_import(name, globals, locals, fromlist, level)
    finally:
        frames.pop()
start = rss()
builtins.__import__ = framed_import
import importlib
mod = importlib.import_module(sys.argv[1])
builtins.__import__ = real_import
print(json.dumps({"start": start, "end": rss(), "records": records, "modules": len(sys.modules)}))
"""


def probe(module: str, block: list[str], lazy: list[str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", PROBE, module, ",".join(block), ",".join(lazy)], capture_output=True,
                         text=True, check=False, cwd=common.REPO)
    if out.returncode:
        sys.exit(f"importing {module} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)


def top_package(module: str) -> str:
    """``ipdc.x`` stays whole (it is ours); others by top-level name."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "ipdc" else parts[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("module", nargs="?", default="ipdc.agent")
    parser.add_argument("--top", type=int, default=25, help="packages shown (at least 1)")
    parser.add_argument("--block", default="", help="comma-separated packages to make unimportable first")
    parser.add_argument("--lazy", default="", help="comma-separated modules replaced by empty stand-ins, "
                                                   "as if imported lazily and not yet used")
    args = parser.parse_args()
    if args.top < 1:
        parser.error("--top must be at least 1")
    block = [b for b in args.block.split(",") if b]
    lazy = [m for m in args.lazy.split(",") if m]
    data = probe(args.module, block, lazy)
    rss: dict[str, int] = defaultdict(int)
    took: dict[str, float] = defaultdict(float)
    first_chain: dict[str, str] = {}
    for r in data["records"]:
        pkg = top_package(r["module"])
        rss[pkg] += r["self_rss"]
        took[pkg] += r["self_s"]
        if pkg not in first_chain:
            chain = [top_package(m) for m in r["chain"] if m != "?"]
            first_chain[pkg] = " <- ".join(dict.fromkeys(reversed(chain)))
    rows = [[pkg, f"{rss[pkg] / 1e6:.2f}", f"{took[pkg] * 1000:.1f}", first_chain[pkg][:90]]
            for pkg in sorted(rss, key=lambda p: -rss[p])[: args.top]]
    total = data["end"] - data["start"]
    common.print_table(
        f"import {args.module}{' (blocked: ' + ', '.join(block) + ')' if block else ''}"
        f"{' (lazy: ' + ', '.join(lazy) + ')' if lazy else ''}: "
        f"RSS {data['end'] / 1e6:.1f} MB after, {total / 1e6:.1f} MB of it imports, {data['modules']} modules",
        ["package", "self RSS MB", "self ms", "first imported by"], rows)
    print(f"\nthe interpreter alone, before the import: {data['start'] / 1e6:.1f} MB "
          f"(Python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
