"""How many cases of the bad-input catalogue (tests/catalogue.py) a prunetool holds, through the CLI in a fresh
process each, exactly as tests/test_catalogue.py checks them in process.

    python -m benchmarks.catalogue                                  # this checkout
    python -m benchmarks.catalogue --prunetool /path/to/prunetool-0.1 --since 0.1

A case holds when the exit code is the promised one, there is no traceback, nothing was written, left behind or
changed, and (exit 2) stderr is one line; *named* counts those whose line also names the problem as the catalogue
expects. ``--since 0.1`` skips the cases that use options 0.1 did not have.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .common import ROOT

sys.path.insert(0, str(ROOT / "tests"))
from catalogue import CASES  # noqa: E402


def files(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def run(case, prunetool: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        if case.setup:
            case.setup(d)
        before = files(d)
        env = {**os.environ, "PYTHONPATH": f"{prunetool}{os.pathsep}{ROOT}{os.pathsep}{d}"}
        proc = subprocess.run([sys.executable, "-m", "prunetool", *case.args], cwd=d, env=env, capture_output=True,
                              text=True, timeout=600)
        after = files(d)
    lines = proc.stderr.strip().splitlines()
    one_line = case.code != 2 or (len(lines) == 1 and lines[0].startswith("prunetool: error: "))
    held = proc.returncode == case.code and "Traceback" not in proc.stderr + proc.stdout and one_line \
        and after == before
    named = held and (case.code != 2 or all(n in lines[0] for n in case.needles))
    return {"case": case.name, "code": proc.returncode, "held": held, "named": named,
            "written": sorted(set(after) - set(before)), "changed": sorted(k for k in before if after.get(k) != before[k]),
            "stderr": lines[-1][:160] if lines else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prunetool", default=str(ROOT), help="directory holding the prunetool package to test")
    parser.add_argument("--since", help="only the cases that apply to this version (0.1)")
    parser.add_argument("--json")
    args = parser.parse_args()
    cases = [c for c in CASES if args.since is None or c.since <= args.since]
    rows = [run(c, Path(args.prunetool)) for c in cases]
    for r in rows:
        if not r["held"]:
            print(f"✗ {r['case']}: exit {r['code']}, {r['stderr']}, written {r['written']}, changed {r['changed']}")
    held, named = sum(r["held"] for r in rows), sum(r["named"] for r in rows)
    print(f"{held} of {len(rows)} cases held ({named} named the problem)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
