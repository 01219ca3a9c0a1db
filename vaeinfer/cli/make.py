"""Commands that make models: train, train-prior, export. They import the training side lazily
and say which extra to install when it is missing."""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from pathlib import Path

import click

from vaeinfer import precisions
from vaeinfer.cli.common import main
from vaeinfer.training.config import LR_SCHEDULES, TrainConfig  # no torch: the flags of `train` are its fields
from vaeinfer.training import TRAIN_ARCHS


def _training_side():
    try:
        import torch  # noqa: F401
        import vaeinfer.training.train  # noqa: F401
        import vaeinfer.export  # noqa: F401
    except ImportError as e:
        raise click.ClickException(f"this command needs the training side ({e.name} is missing): "
                                   "pip install 'vaeinfer[train,cpu]' (torch==2.13.0 first on CPU-only machines)")


def _flag_fields(config_cls) -> dict[str, dict]:
    """The fields of a config that are flags (vaeinfer.training.config.flag) -> their flag metadata."""
    return {f.name: f.metadata["flag"] for f in dataclasses.fields(config_cls) if "flag" in f.metadata}


def config_options(config_cls):
    """Decorator: a click option per flag field of `config_cls`, in field order, its value under
    the field's name; type and default from the field, help / name / min / choices / path from
    its metadata."""
    hints = typing.get_type_hints(config_cls)
    defaults = {f.name: f.default for f in dataclasses.fields(config_cls)}

    def option(name: str, spec: dict):
        base = next(t for t in typing.get_args(hints[name]) or (hints[name],) if t is not type(None))
        if "choices" in spec:
            kind = click.Choice(spec["choices"])
        elif spec.get("path"):
            kind = click.Path(exists=True)
        elif "min" in spec:
            kind = click.IntRange(min=spec["min"]) if base is int else click.FloatRange(min=spec["min"])
        else:
            kind = base
        flag = "--" + spec.get("name", name.replace("_", "-"))
        return click.option(flag, name, type=kind, default=defaults[name], show_default=True, help=spec.get("help"))

    def decorate(f):
        for name, spec in reversed(_flag_fields(config_cls).items()):
            f = option(name, spec)(f)
        return f

    return decorate


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
@config_options(TrainConfig)
@click.option("--arch", type=click.Choice(TRAIN_ARCHS), default="conv-vae", show_default=True)
@click.option("--image-size", default=None, help="Resize to H or HxW (default: the data's size).")
@click.option("--channels", type=click.Choice(["1", "3"]), default=None, help="Convert to 1 or 3 channels.")
@click.option("--latent", type=click.Choice(["flat", "spatial"]), default="flat", show_default=True,
              help="conv-vae: a latent vector (N, Z), or a spatial latent (N, C, H/f, W/f) like latent-diffusion "
                   "autoencoders (fully convolutional, images in [-1, 1], any H, W multiple of f at run time).")
@click.option("--downsample", type=click.Choice(["2", "4", "8", "16"]), default=None,
              help="--latent spatial: the downsampling factor f (default 8); --conv-channels takes log2 f widths.")
@click.option("--latent-channels", type=click.IntRange(min=1), default=None,
              help="--latent spatial: latent channels C (default 4).")
@click.option("--latent-dim", type=click.IntRange(min=1), default=None, help="VAE latent size (default 32).")
@click.option("--hidden", default=None, help="mlp-vae hidden widths, e.g. 512,256.")
@click.option("--conv-channels", default=None, help="conv-vae / vqvae widths per stride-2 stage, e.g. 32,64.")
@click.option("--blocks", type=click.IntRange(min=0), default=None, help="Residual blocks at the lowest resolution.")
@click.option("--codebook-size", type=click.IntRange(min=2), default=None, help="vqvae: codebook size K.")
@click.option("--code-dim", type=click.IntRange(min=1), default=None, help="vqvae: code dimension D.")
@click.option("--prior", type=click.Choice(["normal", "vamp", "mog"]), default=None,
              help="VAE prior p(z): normal (N(0, I), the default), vamp (VampPrior: learned pseudo-inputs "
                   "through the encoder) or mog (learned mixture of Gaussians).")
@click.option("--prior-components", type=click.IntRange(min=1), default=None,
              help="Components K of a vamp or mog prior (default 100).")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A JSON TrainConfig (e.g. training/recipes/mnist-vae.json); flags given explicitly override it.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The run folder.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def train(ctx, config_file, resume, out, quiet, **flags):
    """Train a VAE, beta-VAE, spatial-latent VAE or VQ-VAE into a run folder (checkpoint, metrics, loss
    curve, samples)."""
    _training_side()
    from vaeinfer.training.train import train as run

    explicit = {k for k in flags if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
    base = json.loads(Path(config_file).read_text()) if config_file else {}
    arch = flags["arch"] if "arch" in explicit or not base else base.get("arch", flags["arch"])
    model_args = dict(base.get("model_args", {}))
    if flags["latent"] == "spatial":
        if arch != "conv-vae":
            raise click.UsageError(f"--latent spatial takes --arch conv-vae, got --arch {arch}")
        arch = "spatial-conv-vae"
        for flag in ("latent_dim", "hidden", "codebook_size", "code_dim"):
            if flags[flag] is not None:
                raise click.UsageError(f"--{flag.replace('_', '-')} does not apply to --latent spatial "
                                       "(its options: --downsample, --latent-channels, --conv-channels, --blocks)")
        if "likelihood" not in explicit:  # bernoulli's default does not fit images in [-1, 1]
            flags["likelihood"] = "gaussian"
    elif arch != "spatial-conv-vae" and (flags["downsample"] or flags["latent_channels"]):
        raise click.UsageError("--downsample and --latent-channels take --latent spatial")
    if flags["downsample"]:
        model_args["downsample"] = int(flags["downsample"])
    for flag, key in (("latent_dim", "latent_dim"), ("blocks", "blocks"), ("codebook_size", "codebook_size"),
                      ("code_dim", "code_dim"), ("latent_channels", "latent_channels")):
        if flags[flag] is not None:
            model_args[key] = flags[flag]
    if flags["prior"] is not None:
        model_args["prior"] = flags["prior"]
    if model_args.get("prior", "normal") != "normal":
        model_args["prior_components"] = flags["prior_components"] or model_args.get("prior_components", 100)
    if flags["hidden"]:
        model_args["hidden"] = _ints(flags["hidden"])
    if flags["conv_channels"]:
        model_args["channels"] = _ints(flags["conv_channels"])
    values = dict(base)
    for key in _flag_fields(TrainConfig):  # a flag given explicitly, or the config file lacks it
        if key in explicit or key not in base:
            values[key] = flags[key]
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
@click.option("--lr-schedule", type=click.Choice(LR_SCHEDULES), default=None)
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
    from vaeinfer.training.pixelcnn_prior import PriorConfig, train_prior

    config = PriorConfig(**{k: v for k, v in flags.items() if v is not None})
    path = train_prior(run_dir, config, resume=resume, progress_bar=not quiet)
    click.echo(f"prior checkpoint: {path}", err=True)


@main.command("export")
@click.argument("checkpoint", required=False, type=click.Path(exists=True))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="The bundle directory to write.")
@click.option("--name", default=None, help="The model's name in the manifest (default: the folder name).")
@click.option("--modules", default=None,
              help="Export your own modules instead: FILE.py:FUNC or package.module:FUNC, a function returning "
                   "(encoder, decoder) with loaded weights; encoder(x) -> (mean, logvar), decoder(z) -> params.")
@click.option("--image-shape", default=None, help="With --modules: CxHxW, e.g. 1x28x28.")
@click.option("--likelihood", type=click.Choice(["bernoulli", "gaussian"]), default="bernoulli", show_default=True,
              help="With --modules: what the decoder's output parameterises.")
@click.option("--scale", type=float, default=None, help="With --modules and gaussian: the fixed std.")
@click.option("--precision", "variants", multiple=True, type=click.Choice(precisions.variant_names()),
              help="Also write this precision variant into the bundle (repeatable): "
                   + "; ".join(f"{p.name}: {p.meaning}" for p in precisions.TABLE if p.variant)
                   + ". Each is validated against fp32 on held-out images; its errors and speed-up go into the "
                     "manifest.")
@click.option("--calibration-data", default=None, type=click.Path(exists=True),
              help="With --modules and --precision: training images to calibrate on (.npy/.npz, IDX, image folder).")
@click.option("--from-diffusers", "diffusers_src", default=None, type=click.Path(exists=True),
              help="Import a diffusers AutoencoderKL / AutoencoderTiny / VQModel (image) or AutoencoderKLWan / "
                   "AutoencoderKLQwenImage (video): a save_pretrained folder "
                   "(config.json + safetensors) or a single .safetensors file (with --config). Local files only; "
                   f"needs the diffusers extra. --precision {'/'.join(precisions.variant_names())} calibrate on "
                   "synthetic smooth images (clips for a video VAE).")
@click.option("--config", "diffusers_config", default=None, type=click.Path(exists=True),
              help="With --from-diffusers FILE.safetensors: its diffusers config folder or config.json.")
@click.option("--exact-tiling/--no-exact-tiling", default=None,
              help="With --from-diffusers: add (or leave out) the stage graphs of exact tiled decode/encode "
                   "(decode --max-memory). Default: added for an AutoencoderKL of the supported family.")
def export_cmd(checkpoint, out, name, modules, image_shape, likelihood, scale, variants, calibration_data,
               diffusers_src, diffusers_config, exact_tiling):
    """Export a run folder (or its checkpoint.json), your own modules, or a diffusers autoencoder
    (--from-diffusers) to a validated ONNX bundle."""
    _training_side()
    from vaeinfer.export import export_checkpoint, export_vae

    if exact_tiling is not None and not diffusers_src:
        raise click.UsageError("--exact-tiling applies to --from-diffusers")
    if diffusers_src:
        if checkpoint or modules:
            raise click.UsageError("--from-diffusers takes no CHECKPOINT argument and no --modules")
        from vaeinfer.export.diffusers import from_diffusers

        path = from_diffusers(diffusers_src, out, name=name, config=diffusers_config, precisions=variants,
                              exact_tiling=exact_tiling, progress=lambda message: click.echo(message, err=True))
        variants = ()  # made and validated by from_diffusers
    elif modules:
        if checkpoint or not image_shape:
            raise click.UsageError("--modules takes --image-shape CxHxW and no CHECKPOINT argument")
        encoder, decoder = _import_function(modules)()
        shape = [int(p) for p in image_shape.lower().split("x")]
        path = export_vae(encoder, decoder, shape, out, likelihood=likelihood, scale=scale, name=name)
    elif checkpoint:
        path = export_checkpoint(checkpoint, out, name=name)
    else:
        raise click.UsageError("give a CHECKPOINT (run folder or checkpoint.json) or --modules")
    if variants:
        _export_variants(path, checkpoint, variants, calibration_data, None if not modules else shape)
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


def _export_variants(path, checkpoint, variants, calibration_data, shape) -> None:
    from vaeinfer.export.variants import add_variants, add_variants_from_run

    def say(message):
        click.echo(message, err=True)

    if checkpoint:
        add_variants_from_run(path, checkpoint, list(variants), progress=say)
        return
    if not calibration_data:
        raise click.UsageError("--precision with --modules needs --calibration-data (training images to calibrate on)")
    from vaeinfer.training.data import load_data

    data = load_data(calibration_data, image_size=shape[1:], channels=shape[0])
    add_variants(path, list(variants), data.images, calibration_labels=data.labels,
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
