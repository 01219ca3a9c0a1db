"""What every `vaeinfer` command shares: the click group (one line per expected error), the
model options, loading, progress bars and image/array files in and out."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np

import vaeinfer
from vaeinfer import backends, images as image_io, precisions
from vaeinfer.op_params import Param
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
            if type(e).__module__.startswith(("vaeinfer.training.", "vaeinfer.export.")):
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

    Runtime commands (sample, encode, decode, reconstruct, score, info, manifold, traverse) need
    only the runtime install; train, train-prior and export need the `train` extra.
    """


def _remember(ctx, param, value):
    """Options that every command passes straight to vaeinfer.load (see `_load`) ride in ctx.meta."""
    ctx.meta[f"vaeinfer.load.{param.name}"] = value
    return value


def runtime_options(f):
    """--device, --backend, --threads, --precision and --max-error: how `vaeinfer.load` runs a
    model, declared once for every runtime command and the server."""
    f = click.option("--max-error", type=click.FloatRange(0, 1), default=None, expose_value=False, callback=_remember,
                     help="--precision auto's error budget: mean abs difference from fp32 as a fraction of the "
                          "output's range (default 0.01 = 1%).")(f)
    f = click.option("--precision", type=click.Choice(precisions.load_names()), default=precisions.REFERENCE,
                     show_default=True,
                     help="fp32, a variant the bundle carries (fp16, int8), bf16 (the fp32 graphs in bf16 on a backend "
                          "that has it: OpenVINO), or auto: the fastest measured path within --max-error.")(f)
    f = click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="Intra-op threads per graph (default: one per core).")(f)
    f = click.option("--backend", type=click.Choice(backends.names()), default=None, expose_value=False,
                     callback=_remember,
                     help="What runs the graphs on the device (default: the device's own; bf16 picks one that has it).")(f)
    f = click.option("--device", default="auto", show_default=True,
                     help="auto, cpu, cuda or cuda:N. Asking for CUDA where it cannot run is an error.")(f)
    return f


def model_option(f):
    f = runtime_options(f)
    f = click.option("-m", "--model", default=vaeinfer.DEFAULT_MODEL, show_default=True,
                     help="A bundled model's name (see `vaeinfer info`) or a bundle directory.")(f)
    return f


def load_extras() -> dict:
    """The --backend and --max-error values of the running command (None when not given)."""
    meta = click.get_current_context().meta
    return {"backend": meta.get("vaeinfer.load.backend"), "max_error": meta.get("vaeinfer.load.max_error")}


def op_options(*params: Param):
    """Decorator: a click option per op parameter (vaeinfer.op_params), in the order given."""

    def option(p: Param):
        ranged = click.IntRange if p.type is int else click.FloatRange
        kind = ranged(p.min, p.max, min_open=p.min_open) if (p.min, p.max) != (None, None) else p.type
        flags = p.flags or ("--" + p.name.replace("_", "-"),)
        return click.option(*flags, p.name, type=kind, default=p.default, show_default=True, help=p.help)

    def decorate(f):
        for p in reversed(params):
            f = option(p)(f)
        return f

    return decorate


def _load(model, device, threads, precision, roles=None):
    """vaeinfer.load with the command's runtime options; `roles`: the graphs the command runs
    (None: all; `encode` and `decode` load only their own half, in half the memory)."""
    return vaeinfer.load(model, device=device, threads=threads, precision=precision, roles=roles, **load_extras())


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
    # a spatial VAE takes any size its downsampling allows (checked by the model); files are 0..1
    size = None if "multiple_of" in model.info.latent else (h, w)
    lo, hi = model.info.value_range
    return image_io.load_images(list(paths), c, size) * np.float32(hi - lo) + np.float32(lo)


def _unit(model, images: np.ndarray) -> np.ndarray:
    """Images in the model's value range -> 0..1, for PNG files."""
    lo, hi = model.info.value_range
    return images if (lo, hi) == (0.0, 1.0) else (images - np.float32(lo)) / np.float32(hi - lo)


def _spatial_options(model, **options) -> dict:
    """The options only a spatial VAE takes (tile, scaled), when given; an error for other kinds."""
    given = {k: v for k, v in options.items() if v not in (None, False)}
    if given and "multiple_of" not in model.info.latent:
        flags = ", ".join(f"--{k}" for k in given)
        raise InputError(f"{flags} apply to spatial-vae models; {model.info.name} is a {model.info.kind}")
    return given


def _check_out(out: str, suffixes: tuple[str, ...] = (*image_io.GRID_SUFFIXES, *ARRAY_SUFFIXES)) -> None:
    """Refuse an output name that cannot be written before doing the work, not after it."""
    if Path(out).suffix.lower() not in suffixes:
        raise InputError(f"{out}: expected an output ending in {' or '.join(suffixes)}")


def _write_images(images: np.ndarray, out: str, nrow: int | None = None, model=None, **extra) -> None:
    """.npy/.npz: the images as they are (the model's value range); PNG: mapped to 0..1 first."""
    _check_out(out)
    if Path(out).suffix.lower() in ARRAY_SUFFIXES:
        image_io.save_arrays(out, images=images, **extra)
    else:
        image_io.save_grid(images if model is None else _unit(model, images), out, nrow)
    click.echo(f"wrote {out} ({len(images)} images)", err=True)
