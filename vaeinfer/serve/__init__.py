"""`vaeinfer serve`: an HTTP API over loaded models, with dynamic micro-batching, Prometheus
metrics and a page at `/` for looking at what a model does.

Needs the `serve` extra (FastAPI, uvicorn, prometheus-client, python-multipart); the runtime
install stays light, so everything here imports them only when a server is built:

    from vaeinfer.serve import ServeConfig, create_app
    app = create_app(ServeConfig(models=("mnist-vae",)))     # an ASGI app: uvicorn.run(app)
"""

from __future__ import annotations

from vaeinfer.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app", "require"]


def require() -> None:
    """Raise BackendError naming the extra to install when a serving dependency is missing."""
    from vaeinfer.errors import BackendError

    missing = []
    for module in ("fastapi", "uvicorn", "prometheus_client", "multipart"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise BackendError(f"vaeinfer serve needs {', '.join(missing)}: pip install \"vaeinfer[serve]\"")


def create_app(config: ServeConfig):
    """The ASGI app (FastAPI) serving `config.models`; see vaeinfer.serve.app."""
    require()
    from vaeinfer.serve.app import create_app as _create

    return _create(config)
