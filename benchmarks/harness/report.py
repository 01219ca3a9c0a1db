"""The one results writer: benchmarks/results/<stem>.json (the data) and <stem>.md (the table),
both headed by where they came from: the command that regenerates them, the machine, the date."""

from __future__ import annotations

import json
import os
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.harness import machine

RESULTS = Path(__file__).resolve().parents[1] / "results"


def command(module: str, argv: list[str] | None = None) -> str:
    """`python -m MODULE ARGS`: what reruns a benchmark (`argv`: its arguments, default sys.argv[1:])."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def provenance(module: str, argv: list[str] | None = None) -> dict:
    """What a report records of where it came from: its command, the machine (harness.machine) and the UTC time."""
    return {"command": command(module, argv), "machine": machine.describe(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def header(title: str, report: dict) -> list[str]:
    """A report's Markdown title and its provenance lines (see `provenance`)."""
    return [f"# {title}", "", f"Command: `{report['command']}`  ",
            f"Machine: {machine.summary(report['machine'])}  ", f"Date: {report['date']}", ""]


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write(stem: str, title: str, report: dict, body: list[str] | str, out_dir: str | Path = RESULTS) -> tuple[Path, Path]:
    """Write `report` (with its provenance keys) as OUT_DIR/STEM.json and, headed by `header`, the
    Markdown `body` as STEM.md, each atomically; print the Markdown; return both paths."""
    missing = {"command", "machine", "date"} - set(report)
    if missing:
        raise ValueError(f"report {stem}: no {sorted(missing)} (start it from provenance())")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = "\n".join([*header(title, report), *([body] if isinstance(body, str) else body)]) + "\n"
    paths = out / f"{stem}.json", out / f"{stem}.md"
    _write_atomically(paths[0], json.dumps(report, indent=2, default=str) + "\n")
    _write_atomically(paths[1], text)
    print(text)
    return paths
