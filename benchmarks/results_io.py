"""Where a benchmark's figures go: benchmarks/results/<stem>.json (the data) and <stem>.md (the table)."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(out_dir: str | Path, stem: str, report: dict, markdown: str) -> None:
    """Write the report as JSON and its Markdown table beside it, and print the table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown + "\n")
    print(markdown)
