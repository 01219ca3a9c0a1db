"""The `vaeinfer` command line (console script `vaeinfer.cli:main`, or `python -m vaeinfer.cli`).

Runtime commands import no torch; `train`, `train-prior` and `export` import the training side
lazily and say which extra to install when it is missing. Each module here holds one group of
commands, registered on `main` (vaeinfer.cli.common) when imported: a new group is one module
and one name in the import below.
"""

from vaeinfer.cli.common import main
from vaeinfer.cli import latent, make, run, tools  # noqa: E402,F401  (each registers its commands on `main`)
from vaeinfer.serve import cli as serve_cli  # noqa: E402,F401  (`vaeinfer serve`; its web stack loads lazily)

__all__ = ["main"]
