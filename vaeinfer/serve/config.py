"""The server's settings: one frozen dataclass, passed to worker processes as JSON."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

ENV = "VAEINFER_SERVE_CONFIG"  # how `--workers N` hands the settings to uvicorn's worker processes


@dataclass(frozen=True)
class ServeConfig:
    """models: names of bundled models or bundle directories; the first is the page's default.
    max_batch: rows merged into one onnxruntime call (1: every request is its own call).
    max_wait_ms: how long a batch that is not full waits for more requests.
    max_queue: requests admitted at once (running or waiting); more get 503.
    max_body_bytes: request body limit (413 above); also bounds an .npz's unpacked size.
    max_rows: rows (images, latents, or n for sample) one request may ask for (413 above).
    max_memory: spatial VAEs decode and encode (each merged batch) with exact tiling within this
    much memory ("2GiB", bytes; vaeinfer.exact_tiling); a spatial model without the stage graphs
    is refused at load. None: untiled."""

    models: tuple[str, ...] = ("mnist-vae",)
    device: str = "auto"
    threads: int | None = None
    precision: str = "fp32"
    backend: str | None = None
    max_error: float | None = None  # precision "auto"'s budget (vaeinfer.load's max_error)
    max_batch: int = 32
    max_wait_ms: float = 2.0
    max_queue: int = 256
    max_body_bytes: int = 16 << 20
    max_rows: int = 1024
    max_memory: str | int | None = None

    def __post_init__(self):
        object.__setattr__(self, "models", tuple(self.models))
        if not self.models:
            raise ValueError("serve: expected at least one model")
        for name in ("max_batch", "max_queue", "max_body_bytes", "max_rows"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"serve: {name} must be >= 1, got {getattr(self, name)!r}")
        if self.max_memory is not None:
            from vaeinfer.exact_tiling import parse_bytes

            parse_bytes(self.max_memory, "serve: max_memory")
        if not self.max_wait_ms >= 0:
            raise ValueError(f"serve: max_wait_ms must be >= 0, got {self.max_wait_ms!r}")

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> ServeConfig:
        return cls(**json.loads(os.environ[ENV]))
