"""Model quality against the papers, measured through the exported graphs.

    python -m benchmarks.evaluation.quality           # the full protocol (about an hour on 2 cores)
    python -m benchmarks.evaluation.quality --quick   # a smoke run: small subsets, small K

Protocol (MNIST, binarized): models train on dynamically binarized training images; evaluation
uses ONE fixed binarization of the official 10k test set (numpy seed 0). Test NLL is the IWAE
estimate computed by `vaeinfer`'s `score` from the exported encoder and decoder in onnxruntime:
K = 5000 importance samples on a seeded 1,000-image subset, and K = 500 on all 10,000. A
PyTorch-side estimate from the training checkpoint, with the same noise, checks the ONNX one.
The test set is used for these numbers only; nothing is tuned on it.

Sample quality: a small CNN digit classifier trained by this benchmark on the MNIST training set
(never the test set; cached under runs/digit-classifier/, see benchmarks/evaluation/digit_classifier.py)
labels 1,000 samples (seed 0) per model at each temperature: the share classified with
probability >= 0.9, and the entropy of the predicted-class histogram over log(10) (1: all ten
digits equally often). The real test digits are the reference row.

Writes benchmarks/results/quality.json, quality.md and sample grids in benchmarks/results/quality/.
The parts can run as separate processes (one core each, e.g. --k-full 0 in one, --k-subset 0 in
another, --stem to keep them apart) and be merged afterwards:

    python -m benchmarks.evaluation.quality --merge quality-k5000,quality-k500,quality-samples
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import vaeinfer
from benchmarks.harness import report
from benchmarks.harness.cli import description
from vaeinfer.images import save_grid

ROOT = Path(__file__).resolve().parents[2]
RESULTS = report.RESULTS
TITLE = "Model quality (MNIST, binarized test set)"
REFERENCES = [
    ("VAE, Burda et al. 2015 Table 1 (784-200-200-50, 1 stochastic layer, 3280 epochs)", 86.76),
    ("IWAE k=50, same table", 84.78),
    ("IWAE k=50, 2 stochastic layers, same table", 82.90),
    ("pythae reproduction of VAE", 89.78),
]
TEST_BINARIZATION_SEED = 0
SUBSET_SEED = 0


def load_test(data_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The official test set: (intensities, fixed binarization, labels)."""
    from vaeinfer.training.data import read_idx, to_nchw
    from vaeinfer.training.evaluate import binarize

    images = to_nchw(read_idx(next(data_dir.glob("t10k-images-idx3-ubyte*"))), "t10k")
    labels = read_idx(next(data_dir.glob("t10k-labels-idx1-ubyte*"))).astype(np.int64)
    return images, binarize(images, TEST_BINARIZATION_SEED), labels


def torch_check(name: str, x: np.ndarray, samples: int, onnx_nll: np.ndarray) -> dict | None:
    """The PyTorch estimate from the committed checkpoint, same noise: |difference| in nats."""
    ckpt = ROOT / "training" / "checkpoints" / name
    if not (ckpt / "checkpoint.json").exists():
        return None
    from vaeinfer.training import checkpoint
    from vaeinfer.training.evaluate import iwae_score
    from vaeinfer.training.likelihood import Likelihood
    from vaeinfer.training.models import build_model

    tensors, meta = checkpoint.load(ckpt)
    model = build_model(meta["arch"], meta["image_shape"], Likelihood.from_json(meta["likelihood"]), **meta["model_args"])
    model.load_state_dict(checkpoint.model_tensors(tensors))
    torch_nll = iwae_score(model, x, samples)["nll"]
    diff = np.abs(torch_nll - onnx_nll)
    return {"images": len(x), "samples": samples, "max_abs_diff_nats": float(diff.max()),
            "mean_torch_nll": float(torch_nll.mean()), "mean_onnx_nll": float(onnx_nll.mean())}


def evaluate_vae(model, test_bin: np.ndarray, quick: bool, k_subset: int, k_full: int) -> dict:
    rng = np.random.default_rng(SUBSET_SEED)
    subset = np.sort(rng.permutation(len(test_bin))[: (100 if quick else 1000)])
    plan = [("subset", test_bin[subset], 50 if quick else k_subset)] if k_subset else []
    if k_full:
        plan.append(("full", test_bin[: 500] if quick else test_bin, 20 if quick else k_full))
    out = {}
    for label, x, k in plan:
        start = time.perf_counter()
        s = model.score(x, samples=k, seed=0, batch_size=2048)
        out[label] = {"images": len(x), "samples": k, "nll": float(s.nll.mean()), "neg_elbo": float(s.elbo.mean()),
                      "recon": float(s.recon.mean()), "nll_sem": float(s.nll.std(ddof=1) / np.sqrt(len(x))),
                      "seconds": round(time.perf_counter() - start, 1)}
        print(f"  {label}: K={k} on {len(x)} images: NLL {out[label]['nll']:.2f} nats "
              f"(-ELBO {out[label]['neg_elbo']:.2f}) in {out[label]['seconds']} s", flush=True)
    check_x = test_bin[subset[:20]]
    out["torch_check"] = torch_check(model.info.name, check_x, 100, model.score(check_x, samples=100, seed=0).nll)
    return out


def evaluate_vq(model, test: np.ndarray, labels: np.ndarray, quick: bool) -> dict:
    x = test[:1000] if quick else test
    codes = model.encode(x, batch_size=512)
    rec = model.decode(codes, batch_size=512)
    mse = float(np.mean((rec - x) ** 2))
    counts = np.bincount(codes.codes.ravel(), minlength=model.codebook_size)
    p = counts / counts.sum()
    out = {"images": len(x), "mse": mse, "psnr_db": float(10 * np.log10(1.0 / mse)),
           "codebook_perplexity": float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum())),
           "codes_used": int((counts > 0).sum()), "codebook_size": model.codebook_size}
    if model.info.has_prior:
        lab = labels[: len(x)] if model.info.num_classes else None
        out["prior_bits_per_code"] = float(model.prior_nll(codes.codes, label=lab, batch_size=512).mean())
    return out


def sample_grids(model, out_dir: Path, temperatures: list[float]) -> list[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for t in temperatures:
        path = out_dir / f"{model.info.name}-samples-T{t:g}.png"
        save_grid(model.sample(64, seed=0, temperature=t), path, nrow=8)
        written.append(path.name)
    if model.info.kind == "vae":
        a, b = model.sample(4, seed=1, temperature=0.7), model.sample(4, seed=2, temperature=0.7)
        strip = model.interpolate(a, b, steps=10)
        path = out_dir / f"{model.info.name}-interpolation.png"
        save_grid(strip.reshape(-1, *strip.shape[2:]), path, nrow=10)
        written.append(path.name)
    return written


def sample_quality_rows(classifier, model, temperatures: list[float], n: int) -> dict:
    from benchmarks.evaluation.digit_classifier import sample_quality

    return {f"T{t:g}": sample_quality(classifier, model.sample(n, seed=0, temperature=t, batch_size=500))
            for t in temperatures}


def merge(stems: list[str]) -> dict:
    """One results dict from the results files of parts run separately (same protocol and
    machine): per-model entries are combined, later parts win on the same key."""
    parts = [json.loads((RESULTS / f"{stem}.json").read_text()) for stem in stems]
    if len({p["quick"] for p in parts}) != 1:
        raise SystemExit("--merge: quick and full runs cannot be merged")
    out = {**parts[0], "command": " && ".join(p["command"] for p in parts), "merged_from": stems,
           "date": max(p["date"] for p in parts), "vae": {}, "vq": {}, "images": []}
    for part in parts:
        for section in ("vae", "vq"):
            for name, entry in part[section].items():
                out[section].setdefault(name, {}).update({k: v for k, v in entry.items() if v is not None})
        out["images"] += [i for i in part["images"] if i not in out["images"]]
        if part.get("samples"):
            out.setdefault("samples", {}).update(part["samples"])
            out["classifier"], out["sample_count"] = part["classifier"], part["sample_count"]
    return out


def markdown(results: dict) -> list[str]:
    lines = ["| model | test NLL (nats) | protocol |", "| --- | --- | --- |"]
    for ref, nll in REFERENCES:
        lines.append(f"| {ref} | {nll:.2f} | paper |")
    for name, r in results["vae"].items():
        for key in [k for k in ("subset", "full") if k in r]:
            e = r[key]
            lines.append(f"| **{name}** (vaeinfer, ONNX) | **{e['nll']:.2f}** ± {e['nll_sem']:.2f} | K={e['samples']}, "
                         f"{e['images']} test images; -ELBO {e['neg_elbo']:.2f} |")
    lines += ["", "PyTorch vs ONNX (same checkpoint, same noise): " + "; ".join(
        f"{n}: max |diff| {r['torch_check']['max_abs_diff_nats']:.2e} nats over {r['torch_check']['images']} images"
        for n, r in results["vae"].items() if r.get("torch_check"))]
    if results["vq"]:
        lines += ["", "| VQ model | test MSE | PSNR (dB) | codebook perplexity | codes used | prior bits/code |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, r in results["vq"].items():
            lines.append(f"| {name} | {r['mse']:.4f} | {r['psnr_db']:.2f} | {r['codebook_perplexity']:.1f} | "
                         f"{r['codes_used']}/{r['codebook_size']} | {r.get('prior_bits_per_code', float('nan')):.3f} |")
    if results.get("samples"):
        facts = results["classifier"]
        lines += ["", f"Sample quality: a small CNN trained on {facts['trained_on']} (held-out training accuracy "
                      f"{facts['held_out_accuracy']:.4f}) labels {results['sample_count']} samples (seed 0) per model.", "",
                  "| samples | temperature | classified with p >= 0.9 | class-histogram entropy (0-1) |",
                  "| --- | --- | --- | --- |"]
        for name, rows in results["samples"].items():
            for t, r in rows.items():
                lines.append(f"| {name} | {'-' if t == 'Treal' else t[1:]} | {r['confident']:.3f} | {r['entropy']:.3f} |")
    lines += ["", "Sample grids (seed 0) and interpolations: " + ", ".join(
        f"[{p}](quality/{p})" for p in results["images"])]
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "mnist"))
    parser.add_argument("--models", default=",".join(vaeinfer.available_models()),
                        help="bundled model names or bundle paths, comma-separated")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    parser.add_argument("--temperatures", default="1.0,0.8")
    parser.add_argument("--out", default=str(RESULTS / "quality"))
    parser.add_argument("--k-subset", type=int, default=5000, help="importance samples on the 1,000-image subset")
    parser.add_argument("--k-full", type=int, default=500, help="importance samples on all 10,000 (0: skip)")
    parser.add_argument("--stem", default="quality", help="results file name: benchmarks/results/<stem>.json/.md")
    parser.add_argument("--sample-count", type=int, default=1000, help="samples per model for the digit classifier (0: no sample-quality rows)")
    parser.add_argument("--merge", default=None, help="comma-separated result stems of parts run separately: "
                                                      "write their union as <stem>.json/.md and exit")
    args = parser.parse_args(argv)
    if args.merge:
        results = merge([s for s in args.merge.split(",") if s])
        report.write(args.stem, TITLE, results, markdown(results), RESULTS)
        return

    test, test_bin, labels = load_test(Path(args.data))
    results = {**report.provenance(__spec__.name, argv), "quick": args.quick,
               "protocol": __doc__.split("Protocol")[1].split("Writes")[0].strip(), "references": REFERENCES,
               "vae": {}, "vq": {}, "images": [], "sample_count": args.sample_count}
    from benchmarks.evaluation.digit_classifier import load_or_train, sample_quality  # torch: only when run

    classifier = None
    if args.sample_count:  # 0: skip the sample-quality rows
        classifier, results["classifier"] = load_or_train(Path(args.data))
        results["samples"] = {"real test digits": {"Treal": sample_quality(classifier, test[:args.sample_count])}}
    temperatures = [float(t) for t in args.temperatures.split(",")]
    for name in [m for m in args.models.split(",") if m]:
        model = vaeinfer.load(name, device="cpu", threads=args.threads)
        print(f"{name} ({model.info.kind})", flush=True)
        if model.info.kind == "vae":
            results["vae"][model.info.name] = evaluate_vae(model, test_bin, args.quick, args.k_subset, args.k_full)
        else:
            results["vq"][model.info.name] = evaluate_vq(model, test, labels, args.quick)
        if model.info.kind == "vae" or model.info.has_prior:
            results["images"] += sample_grids(model, Path(args.out), temperatures)
            if classifier is not None:
                results["samples"][model.info.name] = sample_quality_rows(classifier, model, temperatures,
                                                                         args.sample_count)
                print(f"  samples: {results['samples'][model.info.name]}", flush=True)
    report.write(args.stem + ("-quick" if args.quick else ""), TITLE, results, markdown(results), RESULTS)


if __name__ == "__main__":
    main()
