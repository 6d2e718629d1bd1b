"""Shared pieces of the benchmarks: the sample models, machine facts, and writing sections of BENCHMARKS.md."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = str(ROOT / "samples" / "mnist_subset.npz")
SAMPLES = {
    "evci_cnn": ("samples.nets:EvciCNN", ROOT / "samples" / "evci_cnn.pt"),
    "lenet_300_100": ("samples.nets:LeNet300100", ROOT / "samples" / "lenet_300_100.pt"),
    "conv2": ("samples.nets:Conv2", ROOT / "samples" / "conv2.pt"),
}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
            f"Python {platform.python_version()}")


def commit() -> str:
    """The short commit of main a row was measured at."""
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return proc.stdout.strip() or "?"


def today() -> str:
    return datetime.date.today().isoformat()


def write_section(path: Path, name: str, body: str) -> None:
    """Replace (or append) the section between ``<!-- name:begin -->`` and ``<!-- name:end -->``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nEvery figure here comes from a script in `benchmarks/`; each section names its command, machine and date.\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def table_args(doc: str, what: str, timeout: int, methods: bool = False) -> argparse.Namespace:
    """The options of a benchmark that writes one table: ``--out`` (its Markdown section), ``--only`` (some of
    its ``what``), ``--timeout`` (seconds per run); with ``methods``, ``--methods`` (some of its rows' methods,
    the others' rows kept from its last results)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="write the table into this Markdown file's section")
    ap.add_argument("--only", nargs="*", help=f"{what} to run (default: all)")
    ap.add_argument("--timeout", type=int, default=timeout)
    if methods:
        ap.add_argument("--methods", nargs="*", help="methods to rerun; the other rows come from the last results "
                                                     "(each row keeps its commit and machine)")
    return ap.parse_args()


def publish(out: Path | None, section: str, body: str) -> None:
    """The table into ``out``'s section ``section``, or on stdout."""
    if out:
        write_section(out, section, body)
    else:
        print(body)
