"""`vaeinfer train`'s flags come from TrainConfig's fields (vaeinfer.training.config), which
import no torch."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import click

from vaeinfer.cli import main
from vaeinfer.training.config import TRAINING_PRECISIONS, TrainConfig


def _params() -> dict[str, click.Parameter]:
    return {p.name: p for p in main.commands["train"].params}


def test_every_flag_field_is_a_train_option_with_its_default():
    params = _params()
    flagged = [f for f in dataclasses.fields(TrainConfig) if "flag" in f.metadata]
    assert len(flagged) == 20
    for f in flagged:
        spec = f.metadata["flag"]
        p = params[f.name]
        assert p.opts == ["--" + spec.get("name", f.name.replace("_", "-"))]
        assert p.default == f.default and p.help == spec.get("help")
        if "choices" in spec:
            assert tuple(p.type.choices) == spec["choices"]
        if "min" in spec:
            assert p.type.min == spec["min"]
    assert params["kl_warmup_epochs"].opts == ["--kl-warmup"]
    assert tuple(params["precision"].type.choices) == TRAINING_PRECISIONS  # the training autocast dtype


def test_config_flag_values_reach_the_config():
    """What the command line gives converts to what TrainConfig takes (types and bounds)."""
    ctx = main.commands["train"].make_context(
        "train", ["--out", "run", "--kl-warmup", "2.5", "--checkpoint-every", "0", "--threads", "3",
                  "--lr-schedule", "cosine", "--precision", "bf16"])
    flags = {k: v for k, v in ctx.params.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    config = TrainConfig.from_json(flags)
    assert (config.kl_warmup_epochs, config.checkpoint_every, config.threads, config.lr_schedule, config.precision) \
        == (2.5, 0, 3, "cosine", "bf16")


def test_config_module_imports_no_torch():
    code = "import sys, vaeinfer.training.config; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr
