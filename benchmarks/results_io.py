"""Where a benchmark's figures go: benchmarks/results/<stem>.json (the data) and <stem>.md (the table)."""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
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


def provenance(argv: list[str]) -> dict:
    """What a report records of where it came from: the command (`argv` with the script first),
    the machine and the UTC time."""
    return {"command": "python " + " ".join(argv), "machine": machine(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def header(title: str, report: dict) -> list[str]:
    """A report's Markdown title and its provenance lines (see `provenance`)."""
    return [f"# {title}", "", f"Command: `{report['command']}`  ", f"Machine: {report['machine']}; {report['date']}", ""]


def write_results(out_dir: str | Path, stem: str, report: dict, markdown: str) -> None:
    """Write the report as JSON and its Markdown table beside it, and print the table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown + "\n")
    print(markdown)
