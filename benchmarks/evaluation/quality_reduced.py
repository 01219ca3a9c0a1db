"""Reduced quality protocol for the CPU budget: test NLL of one bundle on part of the test set.

    python -m benchmarks.evaluation.quality_reduced BUNDLE first500

`firstN`: K=500 on the first N official test digits (first2000 is the issue's protocol);
`subset200`: K=5000 on the first 200 of quality's seeded 1,000-image subset. Fixed binarization
seed 0 and noise seed 0 as in benchmarks.evaluation.quality, so two models scored on the same
images see the same noise. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np

from benchmarks.evaluation.quality import ROOT, SUBSET_SEED, load_test
from benchmarks.harness.cli import description


def protocol(text: str) -> tuple[str, int | None]:
    """'first2000' -> ('first', 2000); 'subset200' -> ('subset', None); anything else: an argparse error."""
    if m := re.fullmatch(r"first([1-9][0-9]*)", text):
        return "first", int(m.group(1))
    if text == "subset200":
        return "subset", None
    raise argparse.ArgumentTypeError(f"expected firstN (e.g. first2000) or subset200, got {text!r}")


def main(argv=None) -> dict:
    import vaeinfer

    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("bundle", help="a bundled model's name or a bundle folder")
    ap.add_argument("which", type=protocol, help="firstN or subset200")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "mnist"))
    args = ap.parse_args(argv)
    kind, count = args.which
    _, test_bin, _ = load_test(Path(args.data))
    m = vaeinfer.load(args.bundle, device="cpu", threads=1)
    if kind == "first":
        x, k = test_bin[:count], 500
    else:
        subset = np.sort(np.random.default_rng(SUBSET_SEED).permutation(len(test_bin))[:1000])
        x, k = test_bin[subset[:200]], 5000
    t = time.time()
    s = m.score(x, samples=k, seed=0, batch_size=2048)
    out = {"bundle": args.bundle, "images": len(x), "samples": k, "which": kind + (str(count) if count else "200"),
           "nll": float(s.nll.mean()), "nll_sem": float(s.nll.std(ddof=1) / np.sqrt(len(x))),
           "neg_elbo": float(s.elbo.mean()), "seconds": round(time.time() - t, 1)}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
