"""Where a benchmark's figures go: benchmarks/results/<stem>.json (the data) and <stem>.md (the table)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def machine() -> str:
    """The CPU model and the cores this process may use, e.g. 'Intel(R) Xeon(R) ..., 2 cores'."""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), platform.machine())
    except OSError:
        cpu = platform.processor() or platform.machine()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores"


def write_results(out_dir: str | Path, stem: str, report: dict, markdown: str) -> None:
    """Write the report as JSON and its Markdown table beside it, and print the table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown + "\n")
    print(markdown)
