"""One precision table (vaeinfer.precisions): the schema, the manifest parser, the runtime, the
exporter's converters and every --precision choice agree with it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest

import vaeinfer
from vaeinfer import manifest, precisions
from vaeinfer.errors import BundleError

SCHEMA = json.loads((Path(vaeinfer.__file__).parent / "manifest.schema.json").read_text())


def _choices(command: click.Command, flag: str) -> tuple[str, ...]:
    param = next(p for p in command.params if flag in p.opts)
    return tuple(param.type.choices)


def test_table():
    assert precisions.names()[0] == precisions.REFERENCE == "fp32"
    assert [p.name for p in precisions.TABLE if p.reference] == ["fp32"]
    assert precisions.variant_names() == precisions.names()[1:]
    assert precisions.get("int8").calibrated and not precisions.get("fp16").calibrated
    assert precisions.get("fp16").variant_file("decoder") == "decoder.fp16.onnx"
    bf16 = precisions.get("bf16")  # computed: the fp32 graphs in bf16 arithmetic, no files of its own
    assert bf16.variant and not bf16.stored and bf16.graphs == "fp32"
    assert precisions.file_names() == ("fp32", "fp16", "int8")
    assert precisions.load_names() == (*precisions.names(), "auto")


def test_unknown_precision_names_the_known_ones():
    with pytest.raises(precisions.UnknownPrecision, match=r"one of \('fp32', 'fp16', 'int8', 'bf16'\), got 'fp8'"):
        precisions.get("fp8")
    with pytest.raises(ValueError, match=r"one of \('fp16', 'int8', 'bf16'\), got 'fp32'"):
        precisions.get("fp32", variant=True)
    with pytest.raises(precisions.UnknownPrecision, match="no graph files of its own"):
        precisions.get("fp32").variant_file("encoder")
    with pytest.raises(precisions.UnknownPrecision, match="no graph files of its own"):
        precisions.get("bf16").variant_file("encoder")


def test_schema_variants_enum_is_the_table():
    assert tuple(SCHEMA["properties"]["variants"]["propertyNames"]["enum"]) == precisions.variant_names()


def test_manifest_parser_takes_the_table(monkeypatch):
    data = json.loads((Path(vaeinfer.__file__).parent / "models" / "mnist-vae" / "manifest.json").read_text())
    assert set(manifest.parse(data).variants) <= set(precisions.variant_names())
    data["variants"]["fp8"] = data["variants"]["fp16"]
    with pytest.raises(BundleError, match=r"expected variants keyed by \('fp16', 'int8', 'bf16'\), got 'fp8'"):
        manifest.parse(data)
    fake = precisions.Precision("fp8", "8-bit floats")
    monkeypatch.setattr(precisions, "TABLE", (*precisions.TABLE, fake))
    assert "fp8" in manifest.parse(data).variants


def test_exporter_has_one_converter_per_variant():
    variants = pytest.importorskip("vaeinfer.export.variants")
    assert tuple(variants.CONVERTERS) == precisions.variant_names()


def test_cli_and_server_choices_are_the_table():
    from vaeinfer.cli import main

    commands = main.commands
    for name in ("sample", "encode", "decode", "reconstruct", "score", "bench", "serve", "info"):
        assert _choices(commands[name], "--precision") == precisions.load_names(), name
    assert _choices(commands["triton-repo"], "--precision") == precisions.file_names()  # serves graph files
    assert _choices(commands["export"], "--precision") == precisions.variant_names()


def test_runtime_refuses_an_unknown_precision():
    with pytest.raises(precisions.UnknownPrecision, match="got 'fp8'"):
        vaeinfer.load("mnist-vae", device="cpu", precision="fp8")


ADD_A_ROW = r'''
import json, sys
from vaeinfer import precisions
precisions.TABLE = (*precisions.TABLE, precisions.Precision("fp8", "8-bit float weights and arithmetic"))
from vaeinfer.cli import main
choices = {name: list(next(p for p in cmd.params if "--precision" in p.opts).type.choices)
           for name, cmd in main.commands.items() if any("--precision" in p.opts for p in cmd.params)}
print(json.dumps(choices))
'''


def test_a_new_row_is_a_choice_everywhere():
    """Adding a row to the table (before the CLI is imported) makes it a --precision choice of
    every command; the training command's --precision is another thing and stays as it was."""
    done = subprocess.run([sys.executable, "-c", ADD_A_ROW], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    choices = json.loads(done.stdout.strip().splitlines()[-1])
    assert choices.pop("export") == ["fp16", "int8", "bf16", "fp8"]
    assert choices.pop("train") == ["fp32", "bf16"]  # the training precision (autocast dtype), not a variant
    assert choices.pop("triton-repo") == ["fp32", "fp16", "int8", "fp8"]  # graph files only
    assert choices and all(c == ["fp32", "fp16", "int8", "bf16", "fp8", "auto"] for c in choices.values()), choices
