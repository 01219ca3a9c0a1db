"""The diffusers autoencoders the speed benchmarks share: Stable Diffusion's AutoencoderKL config and
AutoencoderTiny's default (TAESD), with torch.manual_seed(0) weights, saved with save_pretrained and
exported with `export.diffusers.from_diffusers` (validated against the module) plus an int8 variant
(calibrated on smooth synthetic images). `--quick` benchmarks use the tiny configs.

    from benchmarks.speed.diffusers_models import build
    m = build("kl", quick=False, workdir=Path("bench-work"))   # {"module", "bundle", "export_s", ...}

A `workdir` keeps what it built: a later call with the same one reloads the saved module and
reuses the bundle (the SD config's export takes minutes)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

SD_CONFIG = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, norm_num_groups=32,
                 sample_size=512, scaling_factor=0.18215)
QUICK_KL = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4, latent_channels=4,
                sample_size=32)
QUICK_TINY = dict(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                  num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4)

# key -> (display name, diffusers class name, full config, quick config)
FAMILIES = {"kl": ("AutoencoderKL (SD)", "AutoencoderKL", SD_CONFIG, QUICK_KL),
            "taesd": ("AutoencoderTiny (TAESD)", "AutoencoderTiny", {}, QUICK_TINY)}
DONE = "built.json"  # written last: a folder without it is rebuilt


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def config(key: str, quick: bool) -> dict:
    """The diffusers config of one family (`FAMILIES`), full or tiny."""
    _, _, full, tiny = FAMILIES[key]
    return tiny if quick else full


def module(key: str, quick: bool):
    """The diffusers module with torch.manual_seed(0) weights, in eval mode."""
    import diffusers
    import torch

    _, cls, _, _ = FAMILIES[key]
    torch.manual_seed(0)
    return getattr(diffusers, cls)(**config(key, quick)).eval()


def build(key: str, quick: bool, workdir: Path, precisions=("int8",), calibration_images: int = 8) -> dict:
    """Module and bundle of one family in WORKDIR/<key>[-quick]/: {"name", "module", "bundle",
    "export_s" (0 when reused), "config", "reused"}. The bundle is validated at 16 (quick) or 64
    pixels, batches 1 and 2 (larger images run the same graph)."""
    import diffusers

    from vaeinfer.export.diffusers import from_diffusers

    name, cls, _, _ = FAMILIES[key]
    cfg = config(key, quick)
    folder = Path(workdir) / (f"{key}-quick" if quick else key)
    src, bundle = folder / "diffusers", folder / "bundle"
    facts = {"precisions": list(precisions), "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}}
    done = folder / DONE
    if done.is_file() and json.loads(done.read_text()).get("facts") == facts:
        log(f"{name}: reusing {bundle}")
        return {"name": name, "module": getattr(diffusers, cls).from_pretrained(src).eval(), "bundle": bundle,
                "export_s": 0.0, "config": facts["config"] or "diffusers default", "reused": True}
    folder.mkdir(parents=True, exist_ok=True)
    done.unlink(missing_ok=True)
    mod = module(key, quick)
    mod.save_pretrained(src)
    log(f"{name}: export + validation against diffusers" + (f", {'/'.join(precisions)} variants" if precisions else ""))
    t0 = time.perf_counter()
    v = 16 if quick else 64
    from_diffusers(src, bundle, sizes=((v, v), (v, v + v // 2)), batches=(1, 2), precisions=tuple(precisions),
                   calibration_images=calibration_images)
    export_s = time.perf_counter() - t0
    done.write_text(json.dumps({"facts": facts, "export_s": export_s}) + "\n")
    return {"name": name, "module": mod, "bundle": bundle, "export_s": export_s,
            "config": facts["config"] or "diffusers default", "reused": False}
