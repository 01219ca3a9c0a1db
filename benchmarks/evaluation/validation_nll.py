"""Model selection without the test set: the IWAE bound of training runs on their own validation split.

Each run's checkpoint names its data, validation fraction and seed, so the held-out images are
exactly the ones that run never trained on. They get one fixed binarization (seed 0) and the
same importance noise for every run (training.evaluate.iwae_score, float32 PyTorch), so two
runs trained from the same data are compared on identical inputs.

    python -m benchmarks.evaluation.validation_nll runs/vamp-elbo runs/vamp-iwae5 --images 1000 --samples 100 \
        --stem validation-nll

With --stem the rows also go to benchmarks/results/<stem>.json and .md, with the machine and command.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from benchmarks.harness import report
from benchmarks.harness.cli import description
from vaeinfer.training import checkpoint
from vaeinfer.training.data import load_data, split
from vaeinfer.training.evaluate import binarize, iwae_score
from vaeinfer.training.likelihood import Likelihood
from vaeinfer.training.models import build_model

TITLE = "Validation NLL (IWAE bound on each run's own validation split; model selection, not the test set)"


def validation_images(config: dict, count: int) -> np.ndarray:
    data = load_data(config["data"], config.get("image_size"), config.get("channels"))
    _, val = split(data, config["val_fraction"], config["seed"])
    images = val.images[:count]
    return binarize(images, seed=0) if config.get("binarize") == "dynamic" else images


def score_run(run: str, count: int, samples: int) -> dict:
    tensors, meta = checkpoint.load(run)
    model = build_model(meta["arch"], meta["image_shape"], Likelihood.from_json(meta["likelihood"]),
                        **meta["model_args"])
    model.load_state_dict(checkpoint.model_tensors(tensors))
    images = validation_images(meta["config"], count)
    started = time.perf_counter()
    s = iwae_score(model, images, samples=samples, seed=0)
    return {"run": run, "step": meta["progress"]["global_step"], "images": len(images), "samples": samples,
            "nll": float(s["nll"].mean()), "nll_sem": float(s["nll"].std(ddof=1) / np.sqrt(len(images))),
            "neg_elbo": float(s["elbo"].mean()), "seconds": round(time.perf_counter() - started, 1)}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("runs", nargs="+", help="run folders or checkpoint JSON files")
    parser.add_argument("--images", type=int, default=1000, help="the first N validation images")
    parser.add_argument("--samples", type=int, default=200, help="importance samples K")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stem", default=None, help="also write benchmarks/results/<stem>.json and .md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for run in args.runs:
        rows.append(score_run(run, args.images, args.samples))
        print(json.dumps(rows[-1]), flush=True)
    if args.stem:
        results = {**report.provenance(__spec__.name, argv), "runs": rows}
        report.write(args.stem, TITLE, results, markdown(results))
    return rows


def markdown(results: dict) -> list[str]:
    lines = ["| run | step | images | K | NLL (nats) | -ELBO (nats) |", "| --- | --- | --- | --- | --- | --- |"]
    for r in results["runs"]:
        lines.append(f"| {r['run']} | {r['step']} | {r['images']} | {r['samples']} | "
                     f"{r['nll']:.2f} ± {r['nll_sem']:.2f} | {r['neg_elbo']:.2f} |")
    return lines


if __name__ == "__main__":
    main()
