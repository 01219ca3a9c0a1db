"""VQ-VAE export: encoder (x -> codes, z_q), decoder (codes -> params), prior (codes [+ label] -> logits).

Codes come from an ArgMin over codebook distances. PyTorch and onnxruntime round those distances
differently, so a position whose two nearest codebook entries are (almost) equally far may pick
either: validation demands identical codes wherever the two nearest distances differ by more
than 1e-5 (relative), and that such near-ties stay under 0.1% of positions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from vaeinfer import export
from vaeinfer.export.bundle import export_bundle
from vaeinfer.export.graphs import ExportError, example_inputs
from vaeinfer.export.prior_step import cache_check, cache_facts, step_limits, step_modules
from vaeinfer.export.validate import FP32_TOLERANCE, max_abs_error
from vaeinfer.kinds.vqvae import KIND, vq_graphs

TIE_RELATIVE_GAP = 1e-5
MAX_TIE_FRACTION = 1e-3


def near_ties(model, x: np.ndarray) -> np.ndarray:
    """(N, h, w) bool: positions whose two nearest codebook entries differ by <= 1e-5 (relative)."""
    with torch.no_grad():
        z = model.encoder_net(torch.from_numpy(x)).double()  # (N, D, h, w)
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        book = model.quantizer.codebook.double()
        d = (flat ** 2).sum(1, keepdim=True) - 2 * flat @ book.T + (book ** 2).sum(1)
        two = torch.topk(d, 2, dim=1, largest=False).values
    gap = (two[:, 1] - two[:, 0]) / two[:, 1].abs().clamp_min(1e-12)
    return (gap <= TIE_RELATIVE_GAP).numpy().reshape(len(x), *z.shape[2:])


def codes_comparator(model, tolerance: float):
    """Compare encoder outputs, excusing differences at near-tie positions only."""
    plain = max_abs_error(tolerance)

    def compare(name, expected, actual, inputs):
        ties = near_ties(model, inputs[0])
        if name == "codes":
            differ = expected != actual
        else:  # z_q (N, D, h, w): a position differs when its vector does
            differ = np.abs(expected.astype(np.float64) - actual).max(axis=1) > tolerance
        if np.any(differ & ~ties):
            raise ExportError(f"encoder output {name}: {int(np.sum(differ & ~ties))} positions differ from PyTorch "
                              f"where the nearest code is clear (relative gap > {TIE_RELATIVE_GAP:g})")
        if ties.mean() > MAX_TIE_FRACTION:
            raise ExportError(f"encoder: {ties.mean():.3%} of positions are near-ties, more than {MAX_TIE_FRACTION:.1%}: "
                              "the codebook has (nearly) duplicate entries")
        figures = {"mismatch": float(differ.mean()), "near_tie_fraction": float(ties.mean())}
        if name == "z_q":
            keep = ~differ[:, None].repeat(expected.shape[1], axis=1)
            figures.update(plain(name, expected[keep], actual[keep], inputs))
        return figures

    return compare


def round_trip(model, tolerance: float):
    """decode(encode(x)) in onnxruntime vs PyTorch's reconstruction, on images whose codes agree."""

    def check(files: dict[str, bytes]) -> dict:
        x = example_inputs(vq_graphs(model.image_shape, model.grid, model.code_dim, model.codebook_size)["encoder"],
                           37, 11)[0]
        enc = ort.InferenceSession(files["encoder.onnx"], providers=["CPUExecutionProvider"])
        dec = ort.InferenceSession(files["decoder.onnx"], providers=["CPUExecutionProvider"])
        codes = enc.run(["codes"], {"x": x})[0]
        params = dec.run(["params"], {"codes": codes})[0]
        with torch.no_grad():
            torch_codes, _ = model.encoder(torch.from_numpy(x))
            expected = model.decoder(torch_codes).numpy()
        same = (torch_codes.numpy() == codes).reshape(len(x), -1).all(axis=1)
        err = float(np.abs(expected[same] - params[same]).max()) if same.any() else 0.0
        if not err <= tolerance:
            raise ExportError(f"decode(encode(x)) differs from PyTorch's reconstruction by {err:.3g} > {tolerance:g}")
        return {"images": len(x), "identical_code_grids": float(same.mean()), "max_abs_err": err}

    return check


def load_prior(run_dir: Path, vq_weights_sha256: str):
    """The PixelCNN prior saved beside a VQ-VAE run, or None; refuses one trained for other weights."""
    from vaeinfer.training import checkpoint
    from vaeinfer.training.pixelcnn import GatedPixelCNN

    folder = run_dir if run_dir.is_dir() else run_dir.parent
    if not checkpoint.exists(folder, "prior"):
        return None, None
    tensors, meta = checkpoint.load(folder, name="prior")
    if meta["vqvae"]["weights_sha256"] != vq_weights_sha256:
        raise ExportError(f"{folder}: the prior was trained on the codes of other VQ-VAE weights "
                          f"(sha256 {meta['vqvae']['weights_sha256'][:12]}...); retrain it with `vaeinfer train-prior`")
    prior = GatedPixelCNN(**meta["model_args"])
    prior.load_state_dict(checkpoint.model_tensors(tensors))
    return prior.eval(), meta


def export_vqvae(model, run_dir: Path, out_dir, *, name: str | None = None, training: dict | None = None,
                 vq_weights_sha256: str = "", tolerance: float = FP32_TOLERANCE) -> Path:
    """Export a trained `training.vqvae.VQVAE` (and the prior in its run folder, if any)."""
    model = model.cpu().eval()
    prior, prior_meta = load_prior(Path(run_dir), vq_weights_sha256)
    num_classes = None if prior is None else prior.num_classes
    specs = vq_graphs(model.image_shape, model.grid, model.code_dim, model.codebook_size, num_classes)
    modules = {"encoder": model.encoder, "decoder": model.decoder}
    limits = {"codes": model.codebook_size, "label": max(1, num_classes or 1)}
    extra_checks = {"round_trip": round_trip(model, tolerance)}
    cache = None if prior is None else cache_facts(prior)
    if cache is not None:  # the cached sampling graphs (export/prior_step.py)
        specs = vq_graphs(model.image_shape, model.grid, model.code_dim, model.codebook_size, num_classes, cache)
        modules.update(step_modules(prior))
        limits.update(step_limits(model.codebook_size))
        extra_checks["prior_cache"] = cache_check(model.grid, model.codebook_size, num_classes, cache, tolerance)
    if prior is not None:
        modules["prior"] = prior
        history = prior_meta.get("history") or []
        training = {**(training or {}), "prior": {"model_args": prior_meta["model_args"],
                                                  "final_metrics": history[-1] if history else None}}
    return export_bundle(
        out_dir, name=name or Path(out_dir).name, kind=KIND.name, image=model.image_shape,
        latent={"grid": list(model.grid), "codebook_size": model.codebook_size, "code_dim": model.code_dim},
        likelihood=model.likelihood.to_json(), modules=modules, specs=specs,
        prior=None if prior is None else {"num_classes": num_classes, **({"cache": cache} if cache else {})},
        training=training, limits=limits, comparators={"encoder": codes_comparator(model, tolerance)},
        tolerance=tolerance, extra_checks=extra_checks,
    )


def export_run(model, meta: dict, run_dir: Path, out_dir, name: str | None, training: dict) -> Path:
    """kind "vqvae" (see vaeinfer.kinds): a trained run's model, and the prior beside it."""
    return export_vqvae(model, run_dir, out_dir, name=name, training=training, vq_weights_sha256=meta["weights"]["sha256"])


def variant_errors(ref, var, x, labels, nll_images: int, nll_samples: int, seed: int) -> dict:
    """A precision variant `var` against the fp32 model `ref` (both loaded) on images `x`, for
    `vaeinfer.export.variants.evaluate`: the codes, z_q, the decoder and the reconstruction, and
    the prior's NLL of the codes when the bundle has a prior."""
    from vaeinfer.export.variants import abs_errors

    errors = {}
    ca, cb = ref.encode(x), var.encode(x)
    errors["encoder"] = {"codes_mismatch": float(np.mean(ca.codes != cb.codes)), "z_q": abs_errors(ca.z_q, cb.z_q)}
    errors["decoder"] = {"images": abs_errors(ref.decode(ca.codes), var.decode(ca.codes))}
    errors["reconstruction"] = abs_errors(ref.decode(ca.codes), var.decode(cb.codes))
    if ref.info.has_prior and nll_images:
        lab = None
        if ref.info.num_classes:
            lab = labels[:nll_images] if labels is not None else np.zeros(min(nll_images, len(x)), np.int64)
        codes = ca.codes[:nll_images]
        na, nb = ref.prior_nll(codes, label=lab), var.prior_nll(codes, label=lab)
        errors["prior_nll"] = {"images": len(codes), "fp32": float(na.mean()), "variant": float(nb.mean()),
                               "diff": float(nb.mean() - na.mean())}
    return errors


export.register(KIND.name, export_run, variant_errors)
