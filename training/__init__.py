"""The training side (torch): models, data, the training loop, checkpoints."""

# the architectures that `vaeinfer train --arch` offers, here without torch (the CLI's --help must
# not import it); training.models.ARCHITECTURES has a builder for each (tests/test_kind_registry.py
# checks), and "spatial-conv-vae", which `--arch conv-vae --latent spatial` selects
TRAIN_ARCHS = ("mlp-vae", "conv-vae", "vqvae")
