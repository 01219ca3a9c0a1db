"""Tool commands: bench (speed of a bundle) and triton-repo (a Triton Inference Server repository)."""

from __future__ import annotations

import json
from pathlib import Path

import click

import vaeinfer
from vaeinfer import precisions
from vaeinfer.cli.common import load_extras, main, model_option


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
    report = run_bench(model, sizes, names, device=device, threads=threads, precision=precision, **load_extras(),
                       min_time=min_time,
                       min_iters=min_iters, cuda_graph=sizes if cuda_graph else False,
                       progress=lambda op, b: click.echo(f"timing {op} at batch {b}...", err=True))
    click.echo(format_table(report))
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    click.echo(f"wrote {out}", err=True)



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
@click.option("--precision", type=click.Choice(precisions.file_names()), default=precisions.REFERENCE, show_default=True,
              help="Which of the bundle's graph files to serve.")
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
