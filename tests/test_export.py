"""Export: users' own modules, interface violations, the graphs' structure, parity with PyTorch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import vaeinfer
from vaeinfer.export import ExportError, export_vae
from vaeinfer.export.graphs import IR_VERSION, OPSET
from vaeinfer.export.validate import RANDOM_OPS
from vaeinfer.cli import main

# A user's own tiny VAE, written as a user would. Also written to a file for `vaeinfer export --modules`.
USER_MODULES = textwrap.dedent('''
    import torch
    from torch import nn


    class Encoder(nn.Module):
        def __init__(self, latent=3, pixels=64):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(pixels, 16), nn.Tanh())
            self.mean, self.logvar = nn.Linear(16, latent), nn.Linear(16, latent)

        def forward(self, x):
            h = self.body(x)
            return self.mean(h), self.logvar(h)


    class Decoder(nn.Module):
        def __init__(self, latent=3, shape=(1, 8, 8)):
            super().__init__()
            self.shape = tuple(shape)
            self.net = nn.Sequential(nn.Linear(latent, 16), nn.Tanh(), nn.Linear(16, 64 * shape[0]))

        def forward(self, z):
            return self.net(z).reshape(z.shape[0], *self.shape)


    def build():
        torch.manual_seed(0)
        return Encoder(), Decoder()


    def build_wrong_latent():
        return Encoder(latent=3), Decoder(latent=5)
''')


@pytest.fixture(scope="module")
def user_modules(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user")
    path = folder / "my_vae.py"
    path.write_text(USER_MODULES)
    namespace: dict = {}
    exec(compile(USER_MODULES, str(path), "exec"), namespace)
    return path, namespace


def test_export_user_modules(user_modules, tmp_path):
    _, ns = user_modules
    encoder, decoder = ns["build"]()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = export_vae(encoder, decoder, (1, 8, 8), tmp_path / "mine", name="mine")
    assert not [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]  # torch's internals
    vae = vaeinfer.load(out, device="cpu")
    assert vae.info.latent == {"dim": 3} and vae.info.image_shape == (1, 8, 8) and vae.info.name == "mine"
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    with torch.no_grad():
        mean, logvar = encoder(torch.from_numpy(x))
        params = decoder(mean)
    post = vae.encode(x)
    np.testing.assert_allclose(post.mean, mean.numpy(), atol=1e-5)
    np.testing.assert_allclose(post.logvar, logvar.numpy(), atol=1e-5)
    np.testing.assert_allclose(vae.decode_params(post.mean), params.numpy(), atol=1e-5)
    assert vae.sample(4, seed=0).shape == (4, 1, 8, 8)
    assert json.loads((out / "manifest.json").read_text())["training"] is None


def test_export_user_modules_gaussian(user_modules, tmp_path):
    _, ns = user_modules
    encoder, decoder = ns["Encoder"](pixels=3 * 64), ns["Decoder"](shape=(3, 8, 8))
    out = export_vae(encoder, decoder, (3, 8, 8), tmp_path / "g", likelihood="gaussian", scale=0.05)
    vae = vaeinfer.load(out, device="cpu")
    assert vae.info.likelihood == {"kind": "gaussian", "scale": 0.05}
    s = vae.sample(3, seed=1)
    assert s.shape == (3, 3, 8, 8) and 0.0 <= s.min() and s.max() <= 1.0


def test_cli_export_modules(user_modules, tmp_path):
    path, _ = user_modules
    out = tmp_path / "cli-bundle"
    result = CliRunner().invoke(main, ["export", "--modules", f"{path}:build", "--image-shape", "1x8x8",
                                       "--out", str(out), "--name", "from-cli"])
    assert result.exit_code == 0, result.output
    assert "wrote bundle" in result.stderr and "parity" in result.stderr
    vae = vaeinfer.load(out, device="cpu")
    assert vae.info.name == "from-cli" and vae.info.latent == {"dim": 3}
    # the same weights as the function returns
    _, ns = user_modules
    encoder, _ = ns["build"]()
    x = np.full((1, 1, 8, 8), 0.5, np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(vae.encode(x).mean, encoder(torch.from_numpy(x))[0].numpy(), atol=1e-5)


@pytest.mark.parametrize("args,message", [
    (["--modules", "{path}:nope", "--image-shape", "1x8x8"], "no function nope"),
    (["--modules", "{path}", "--image-shape", "1x8x8"], "FILE.py:FUNC"),
    (["--modules", "{path}:build"], "--image-shape"),
    (["--modules", "{path}:build", "--image-shape", "1x9x9"], "encoder"),
])
def test_cli_export_modules_errors(user_modules, tmp_path, args, message):
    path, _ = user_modules
    args = [a.format(path=path) for a in args]
    result = CliRunner().invoke(main, ["export", *args, "--out", str(tmp_path / "b")])
    assert result.exit_code != 0
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "b").exists()


def test_cli_export_failure_is_one_line(user_modules, tmp_path):
    """torch's own logging of a failed trace (tracebacks at ERROR level) never reaches the terminal."""
    path, _ = user_modules
    script = Path(sys.executable).parent / "vaeinfer"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "vaeinfer.cli"]
    done = subprocess.run([*command, "export", "--modules", f"{path}:build_wrong_latent", "--image-shape", "1x8x8",
                           "--out", str(tmp_path / "b")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: decoder: torch.onnx.export failed"), done.stderr
    assert "same reduction dim" in lines[0]  # the cause, in that one line
    assert not (tmp_path / "b").exists()


class _Enc(nn.Module):
    def __init__(self, latent=3):
        super().__init__()
        self.lin = nn.Linear(64, 2 * latent)

    def forward(self, x):
        mean, logvar = self.lin(x.flatten(1)).chunk(2, dim=1)
        return mean, logvar


class _GoodDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 64)

    def forward(self, z):
        return self.lin(z).reshape(z.shape[0], 1, 8, 8)


class _WrongShapeDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 56)

    def forward(self, z):
        return self.lin(z).reshape(z.shape[0], 1, 7, 8)  # 7x8, not the 8x8 image


class _FlatDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 64)

    def forward(self, z):
        return self.lin(z)  # (N, 64), not (N, C, H, W)


class _NoisyDecoder(nn.Module):
    """Draws its own noise in the graph: the host must own the randomness."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 64)

    def forward(self, z):
        return self.lin(z + torch.randn_like(z)).reshape(z.shape[0], 1, 8, 8)


class _FixedBatchDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 64)

    def forward(self, z):
        return self.lin(z).reshape(2, 1, 8, 8)  # only works for a batch of 2


class _OneOutputEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 3)

    def forward(self, x):
        return self.lin(x.flatten(1))


class _WrongLatentDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 64)

    def forward(self, z):
        return self.lin(z).reshape(z.shape[0], 1, 8, 8)


@pytest.mark.parametrize("encoder,decoder", [
    (_Enc, _WrongShapeDecoder), (_Enc, _FlatDecoder), (_Enc, _NoisyDecoder), (_Enc, _FixedBatchDecoder),
    (_OneOutputEncoder, _WrongLatentDecoder), (_Enc, _WrongLatentDecoder),
], ids=["wrong-shape", "flat", "random-op", "fixed-batch", "one-output", "wrong-latent"])
def test_interface_violation_fails_export(tmp_path, encoder, decoder):
    torch.manual_seed(0)
    with pytest.raises(ExportError):
        export_vae(encoder(), decoder(), (1, 8, 8), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    assert list(tmp_path.iterdir()) == []  # no half-written folder left behind


def test_export_argument_errors(tmp_path):
    with pytest.raises(ExportError, match="C, H, W"):
        export_vae(_Enc(), _GoodDecoder(), (2, 8, 8), tmp_path / "b")
    with pytest.raises(ExportError, match="positive scale"):
        export_vae(_Enc(), _GoodDecoder(), (1, 8, 8), tmp_path / "b", likelihood="gaussian")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "precious.txt").write_text("not a bundle")
    with pytest.raises(ExportError, match="not a bundle"):
        export_vae(_Enc(), _GoodDecoder(), (1, 8, 8), tmp_path / "taken")
    assert (tmp_path / "taken" / "precious.txt").read_text() == "not a bundle"


def test_reexport_replaces_bundle(mlp, tmp_path):
    from vaeinfer.export import export_checkpoint

    out = export_checkpoint(mlp.run, tmp_path / "b")
    before = json.loads((out / "manifest.json").read_text())
    out = export_checkpoint(mlp.run / "checkpoint.json", tmp_path / "b", name="again")  # the JSON path works too
    after = json.loads((out / "manifest.json").read_text())
    assert after["name"] == "again" and before["name"] == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no .new / .old folders left
    vaeinfer.load(out)


# ---- the graphs themselves ------------------------------------------------------------------------------


def _all_nodes(model: onnx.ModelProto):
    yield from model.graph.node
    for f in model.functions:
        yield from f.node


def test_graph_structure(trained):
    manifest = json.loads((trained.bundle / "manifest.json").read_text())
    assert sorted(p.name for p in trained.bundle.iterdir()) == ["decoder.onnx", "encoder.onnx", "manifest.json"]
    for role in ("encoder", "decoder"):
        path = trained.bundle / f"{role}.onnx"
        model = onnx.load(str(path), load_external_data=False)
        assert model.ir_version <= 10 and model.ir_version == IR_VERSION
        opsets = {o.domain: o.version for o in model.opset_import}
        assert opsets.get("", opsets.get("ai.onnx")) == OPSET == 18
        onnx.checker.check_model(model, full_check=True)
        ops = {n.op_type for n in _all_nodes(model)}
        assert not ops & RANDOM_OPS and not any(op.startswith("Random") for op in ops)
        # self-contained: no initializer points at external data
        assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
        assert not any(t.external_data for t in model.graph.initializer)
        # a dynamic (symbolic) batch axis on every input and output, fixed other axes
        for value, spec in zip([*model.graph.input, *model.graph.output],
                               [*manifest["graphs"][role]["inputs"], *manifest["graphs"][role]["outputs"]]):
            dims = value.type.tensor_type.shape.dim
            assert value.name == spec["name"]
            assert dims[0].dim_param and not dims[0].HasField("dim_value")
            assert [d.dim_value for d in dims[1:]] == spec["shape"][1:]
        meta = {p.key: json.loads(p.value) for p in model.metadata_props}
        assert meta["vaeinfer.role"] == role
        assert meta["vaeinfer.kind"] == "vae" and meta["vaeinfer.format_version"] == manifest["format_version"]
        assert meta["vaeinfer.image"] == list(trained.case.shape)
        assert meta["vaeinfer.latent"] == manifest["latent"] and meta["vaeinfer.likelihood"] == manifest["likelihood"]
        assert meta["vaeinfer.name"] == manifest["name"]


def test_graphs_run_at_any_batch(trained):
    vae = vaeinfer.load(trained.bundle, device="cpu", threads=1)
    for n in (1, 3, 37, 600):  # 600: more than one chunk of the default batch
        assert vae.sample(n, seed=0).shape == (n, *trained.case.shape)


def test_manifest_parity_figures(trained):
    parity = json.loads((trained.bundle / "manifest.json").read_text())["export"]["parity"]
    assert parity["batches"] == [1, 2, 37] and parity["tolerance"] == 1e-4
    assert parity["provider"] == "CPUExecutionProvider"
    assert set(parity["graphs"]) == {"encoder", "decoder"}
    assert set(parity["graphs"]["encoder"]) == {"mean", "logvar"} and set(parity["graphs"]["decoder"]) == {"params"}
    for figures in parity["graphs"].values():
        for output in figures.values():
            assert 0.0 <= output["max_abs_err"] <= 1e-4


def _torch_model(run):
    from vaeinfer.training import checkpoint
    from vaeinfer.training.likelihood import Likelihood
    from vaeinfer.training.models import build_model

    tensors, meta = checkpoint.load(run)
    model = build_model(meta["arch"], meta["image_shape"], Likelihood.from_json(meta["likelihood"]), **meta["model_args"])
    model.load_state_dict(checkpoint.model_tensors(tensors))
    return model.eval()


@pytest.mark.parametrize("batch", [1, 2, 37])
def test_onnx_matches_pytorch(trained, batch):
    """The exported graphs and the checkpoint's weights in PyTorch agree on fresh inputs."""
    model = _torch_model(trained.run)
    vae = vaeinfer.load(trained.bundle, device="cpu", threads=1)
    rng = np.random.default_rng(100 + batch)
    x = np.concatenate([trained.images, trained.images])[:batch]
    z = rng.standard_normal((batch, vae.latent_dim), dtype=np.float32) * 2
    with torch.no_grad():
        mean, logvar = model.encoder(torch.from_numpy(x))
        params = model.decoder(torch.from_numpy(z))
        images = model.likelihood.mean(params)
    post = vae.encode(x)
    np.testing.assert_allclose(post.mean, mean.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(post.logvar, logvar.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(vae.decode_params(z), params.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(vae.decode(z), images.numpy(), rtol=0, atol=1e-4)


def test_training_facts_in_manifest(conv):
    manifest = json.loads((conv.bundle / "manifest.json").read_text())
    facts = manifest["training"]
    assert facts["arch"] == "conv-vae" and facts["model_args"] == conv.case.model_args
    assert facts["epochs"] == 2 and facts["steps"] == 2 * 3  # 36 training images / 16 per batch
    assert facts["data"]["train_images"] == 36 and facts["data"]["val_images"] == 12
    assert facts["final_metrics"]["epoch"] == 2 and facts["config"]["seed"] == 0
    # the objective and the precision a run trained with, and what it started from
    assert facts["config"]["iwae_samples"] == 1 and facts["config"]["precision"] == "fp32"
    assert facts["config"]["init_from"] is None
    assert manifest["export"]["torch_version"] == torch.__version__
    assert manifest["export"]["onnx_version"] == onnx.__version__
