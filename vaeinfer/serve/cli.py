"""`vaeinfer serve`: registers itself on the CLI's `main` group when imported (vaeinfer/cli/__init__.py)."""

from __future__ import annotations

import os

import click

from vaeinfer.cli.common import load_extras, main, runtime_options


@main.command("serve")
@click.option("-m", "--model", "models", multiple=True, default=("mnist-vae",), show_default=True,
              help="A bundled model's name or a bundle directory; repeat to serve several (the first is the page's default).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Server processes (each loads the models and batches on its own).")
@runtime_options
@click.option("--max-batch", type=click.IntRange(min=1), default=32, show_default=True,
              help="Rows merged into one onnxruntime call (1: no micro-batching).")
@click.option("--max-wait-ms", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="How long a batch that is not full waits for more requests.")
@click.option("--max-queue", type=click.IntRange(min=1), default=256, show_default=True,
              help="Requests admitted at once (per worker); more are answered 503.")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=16 << 20, show_default=True,
              help="Largest request body (413 above).")
@click.option("--max-rows", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Most images / latents (or n for sample) per request (413 above).")
@click.option("--graceful-timeout", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="On SIGTERM/SIGINT: seconds to finish in-flight requests before stopping.")
@click.option("--access-log/--no-access-log", default=True, show_default=True)
@click.option("--max-memory", default=None, metavar="SIZE",
              help="Spatial VAEs: decode and encode each batch with exact tiling within this much memory "
                   "(2GiB, 512MiB, bytes); the result equals the untiled one.")
def serve(models, host, port, workers, device, threads, precision, max_batch, max_wait_ms, max_queue, max_body_bytes,
          max_rows, graceful_timeout, access_log, max_memory):
    """Serve models over HTTP (needs the serve extra: pip install "vaeinfer[serve]").

    POST /v1/models/MODEL/{sample,encode,decode,reconstruct,score,interpolate}, GET /v1/models,
    /healthz, /readyz, /metrics, /docs (OpenAPI), and a page at / to explore a model.
    """
    from vaeinfer.serve import ServeConfig, create_app, require

    require()
    import uvicorn

    from vaeinfer.serve.config import ENV

    config = ServeConfig(models=models, device=device, threads=threads, precision=precision, **load_extras(),
                         max_batch=max_batch,
                         max_wait_ms=max_wait_ms, max_queue=max_queue, max_body_bytes=max_body_bytes, max_rows=max_rows,
                         max_memory=max_memory)
    options = dict(host=host, port=port, timeout_graceful_shutdown=graceful_timeout, access_log=access_log,
                   log_level="info")
    if workers == 1:
        app = create_app(config)  # models load here: a bad model fails before the port opens
        click.echo(f"serving {', '.join(app.state.served)} on http://{host}:{port}/", err=True)
        uvicorn.run(app, **options)
    else:
        create_app(config)  # fail here, once, on a bad model, rather than in every worker
        os.environ[ENV] = config.to_env()
        uvicorn.run("vaeinfer.serve.app:app_from_env", factory=True, workers=workers, **options)
