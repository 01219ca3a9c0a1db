"""The numeric precisions a bundle's graphs come in: one table, every list of them derives from it.

fp32 is the reference: the graphs the export writes (manifest `graphs`) and validates against
PyTorch. Every other row is a *variant*: its own graph files in the manifest's `variants` slot,
made from the fp32 graphs by export/variants.py (one converter per variant) and validated
against fp32. The manifest parser, the runtime, `vaeinfer.load`, the CLI's and the server's
--precision choices all read this table; tests/test_precisions.py keeps manifest.schema.json's
enum equal to it.

Adding a precision (e.g. bf16): one row here, its converter in export/variants.py
(`CONVERTERS`), and its name in manifest.schema.json's `variants.propertyNames.enum`.

Not to be confused with the *training* precision (`vaeinfer train --precision fp32|bf16`, the
autocast dtype of a training run: vaeinfer.training.config.TRAINING_PRECISIONS).
"""

from __future__ import annotations

from dataclasses import dataclass

from vaeinfer.errors import VaeinferError


class UnknownPrecision(VaeinferError, ValueError):
    """A precision name that is not in the table (or not a variant where a variant is asked for)."""


@dataclass(frozen=True)
class Precision:
    name: str  # as written in manifests, file names, APIs and flags
    meaning: str  # the numeric format of the graph's weights and arithmetic (one line, for help texts)
    reference: bool = False  # True: the exported graphs themselves; False: a variant stored beside them
    calibrated: bool = False  # making the variant needs calibration data (static quantization ranges)

    @property
    def variant(self) -> bool:
        return not self.reference

    def variant_file(self, role: str) -> str:
        """The file name of this variant's graph for `role` in a bundle (e.g. encoder.fp16.onnx)."""
        if self.reference:
            raise UnknownPrecision(f"{self.name} is the reference precision; expected a variant, one of {variant_names()}")
        return f"{role}.{self.name}.onnx"


TABLE: tuple[Precision, ...] = (
    Precision("fp32", "32-bit float weights and arithmetic: the exported graphs, the reference", reference=True),
    Precision("fp16", "16-bit float weights and arithmetic, fp32 inputs/outputs; for GPUs"),
    Precision("int8", "static QDQ: int8 per-channel weights, uint8 activations, calibrated on the training "
                      "images; for CPUs with VNNI", calibrated=True),
)
REFERENCE = next(p.name for p in TABLE if p.reference)  # "fp32"


def names() -> tuple[str, ...]:
    """Every precision, the reference first: ("fp32", "fp16", "int8")."""
    return tuple(p.name for p in TABLE)


def variant_names() -> tuple[str, ...]:
    """The precisions a bundle can carry as variants: ("fp16", "int8")."""
    return tuple(p.name for p in TABLE if p.variant)


def get(name: str, variant: bool = False) -> Precision:
    """The row named `name`; UnknownPrecision naming the known ones otherwise (only the variants
    when `variant`)."""
    known = variant_names() if variant else names()
    for p in TABLE:
        if p.name == name and p.name in known:
            return p
    raise UnknownPrecision(f"precision must be one of {known}, got {name!r:.40}")
