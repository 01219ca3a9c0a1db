#!/usr/bin/env python
"""Reduced protocol for the CPU budget: K=500 on the first N official test digits (firstN; first2000
is the issue's protocol; fixed binarization seed 0, noise seed 0 as in quality.py, so two models
scored on the same images see the same noise), or K=5000 on the first 200 of quality.py's seeded
subset (subset200).

    python benchmarks/quality_reduced.py BUNDLE first500
"""
import json, sys, time
from pathlib import Path
import numpy as np
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.quality import load_test, SUBSET_SEED
import vaeinfer
bundle, which = sys.argv[1], sys.argv[2]
_, test_bin, _ = load_test(Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist")
m = vaeinfer.load(bundle, device="cpu", threads=1)
if which.startswith("first"):  # e.g. first2000: K=500 on the first 2,000
    x, k = test_bin[:int(which[5:])], 500
else:
    subset = np.sort(np.random.default_rng(SUBSET_SEED).permutation(len(test_bin))[:1000])
    x, k = test_bin[subset[:200]], 5000
t = time.time()
s = m.score(x, samples=k, seed=0, batch_size=2048)
out = {"bundle": bundle, "images": len(x), "samples": k, "which": which, "nll": float(s.nll.mean()),
       "nll_sem": float(s.nll.std(ddof=1) / np.sqrt(len(x))), "neg_elbo": float(s.elbo.mean()),
       "seconds": round(time.time() - t, 1)}
print(json.dumps(out), flush=True)
