"""The numeric precisions a bundle's graphs come in: one table, every list of them derives from it.

fp32 is the reference: the graphs the export writes (manifest `graphs`) and validates against
PyTorch. Every other row is a *variant*, of one of two sorts:
- stored (fp16, int8): its own graph files in the manifest's `variants` slot, made from the fp32
  graphs by export/variants.py (one converter per variant) and validated against fp32;
- computed (bf16): the fp32 graphs themselves, run by a backend in that arithmetic (OpenVINO's
  inference precision bf16); no files of its own. Its manifest `variants` entry, when export
  validated it, holds only the measured errors and speed-up. The manifest parser, the runtime, `vaeinfer.load`, the CLI's and the server's
--precision choices all read this table; tests/test_precisions.py keeps manifest.schema.json's
enum equal to it.

Adding a precision: one row here, its converter in export/variants.py (`CONVERTERS`; a computed
precision's converter makes no graph), its name in manifest.schema.json's
`variants.propertyNames.enum`, and the backends that run it list it in their `precisions`.

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
    computed_from: str | None = None  # a computed precision: the precision whose graphs it runs (no files)

    @property
    def variant(self) -> bool:
        return not self.reference

    @property
    def stored(self) -> bool:
        """A variant with graph files of its own in the bundle."""
        return self.variant and self.computed_from is None

    @property
    def graphs(self) -> str:
        """The precision whose graph files this one runs: itself, or the one it is computed from."""
        return self.computed_from or self.name

    def variant_file(self, role: str) -> str:
        """The file name of this variant's graph for `role` in a bundle (e.g. encoder.fp16.onnx)."""
        if not self.stored:
            raise UnknownPrecision(f"{self.name} has no graph files of its own; expected one of "
                                   f"{tuple(p.name for p in TABLE if p.stored)}")
        return f"{role}.{self.name}.onnx"


TABLE: tuple[Precision, ...] = (
    Precision("fp32", "32-bit float weights and arithmetic: the exported graphs, the reference", reference=True),
    Precision("fp16", "16-bit float weights and arithmetic, fp32 inputs/outputs; for GPUs"),
    Precision("int8", "static QDQ: int8 per-channel weights, uint8 activations, calibrated on the training "
                      "images; for CPUs with VNNI", calibrated=True),
    Precision("bf16", "bfloat16 arithmetic (fp32 accumulation) on the fp32 graphs, by a backend that has it: "
                      "OpenVINO on CPUs with AMX or AVX-512 BF16", computed_from="fp32"),
)
REFERENCE = next(p.name for p in TABLE if p.reference)  # "fp32"


def names() -> tuple[str, ...]:
    """Every precision, the reference first: ("fp32", "fp16", "int8")."""
    return tuple(p.name for p in TABLE)


def variant_names() -> tuple[str, ...]:
    """The precisions a bundle can carry as variants: ("fp16", "int8")."""
    return tuple(p.name for p in TABLE if p.variant)


AUTO = "auto"  # load(precision=AUTO): the fastest path within an error budget (vaeinfer.auto_precision)


def load_names() -> tuple[str, ...]:
    """What `vaeinfer.load(precision=...)`, the CLI's and the server's --precision take: every row and "auto"."""
    return (*names(), AUTO)


def file_names() -> tuple[str, ...]:
    """The precisions with graph files of their own (the reference and the stored variants)."""
    return tuple(p.name for p in TABLE if p.graphs == p.name)


def get(name: str, variant: bool = False) -> Precision:
    """The row named `name`; UnknownPrecision naming the known ones otherwise (only the variants
    when `variant`)."""
    known = variant_names() if variant else names()
    for p in TABLE:
        if p.name == name and p.name in known:
            return p
    raise UnknownPrecision(f"precision must be one of {known}, got {name!r:.40}")
