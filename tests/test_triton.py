"""Triton model repositories: each config.pbtxt, parsed into tritonclient's ModelConfig protobuf,
must describe its model.onnx exactly as the graph describes itself in onnxruntime."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

import vaeinfer
from vaeinfer.export import export_checkpoint
from tests.conftest import blob_images, write_npz
from vaeinfer.training.pixelcnn_prior import PriorConfig, train_prior
from vaeinfer.training.train import TrainConfig, train
from vaeinfer.cli import main
from vaeinfer.errors import InputError
from vaeinfer.triton import write_model_repository

ORT_TO_TRITON = {"tensor(float)": mc.TYPE_FP32, "tensor(int64)": mc.TYPE_INT64}
NUMPY = {mc.TYPE_FP32: np.float32, mc.TYPE_INT64: np.int64}


@pytest.fixture(scope="module")
def vq_bundle(tmp_path_factory) -> Path:
    """A tiny VQ-VAE with a class-conditional prior: three graphs, one input that is only the batch axis."""
    tmp = tmp_path_factory.mktemp("triton-vq")
    data = write_npz(tmp / "data.npz", blob_images(48, (1, 12, 12), seed=5), np.arange(48) % 3)
    run = tmp / "run"
    train(TrainConfig(data=str(data), arch="vqvae", model_args={"codebook_size": 8, "code_dim": 4, "channels": [4, 4],
                                                                "blocks": 0},
                      epochs=1, max_steps=3, batch_size=16, seed=0, threads=1), run, progress_bar=False)
    train_prior(run, PriorConfig(epochs=1, max_steps=2, batch_size=16, layers=2, channels=8, threads=1),
                progress_bar=False)
    return export_checkpoint(run, tmp / "bundle", name="tiny-vq")


def read_config(folder: Path) -> mc.ModelConfig:
    return text_format.Parse((folder / "config.pbtxt").read_text(), mc.ModelConfig())


def check_against_graph(config: mc.ModelConfig, folder: Path, bundle: Path, role: str) -> None:
    """The config's names, dtypes and dims are the ONNX graph's own; the file is the bundle's."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    model_file = folder / "1" / "model.onnx"
    assert hashlib.sha256(model_file.read_bytes()).hexdigest() == manifest["graphs"][role]["sha256"]
    assert config.platform == "onnxruntime_onnx"
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    batched = config.max_batch_size > 0
    feeds = {}
    for entries, actual in ((config.input, session.get_inputs()), (config.output, session.get_outputs())):
        assert [e.name for e in entries] == [a.name for a in actual]
        for e, a in zip(entries, actual):
            assert e.data_type == ORT_TO_TRITON[a.type], e.name
            assert isinstance(a.shape[0], str), f"{e.name}: the graph's batch axis must be dynamic, got {a.shape}"
            if batched:
                # Triton's dims leave the batch axis out; a (batch,) tensor is dims [1] reshaped to []
                dims = list(e.reshape.shape) if e.HasField("reshape") else list(e.dims)
                assert dims == list(a.shape[1:]), e.name
                if e.HasField("reshape"):
                    assert list(e.dims) == [1]
            else:
                assert list(e.dims) == [-1, *a.shape[1:]], e.name
    # what a client would send, shaped by the config alone, runs and gives the config's output shapes
    batch = 3
    for e in config.input:
        shape = [batch, *(e.reshape.shape if e.HasField("reshape") else e.dims)] if batched else [batch, *e.dims[1:]]
        feeds[e.name] = np.zeros(shape, NUMPY[e.data_type])
    outs = session.run([e.name for e in config.output], feeds)
    for e, out in zip(config.output, outs):
        assert list(out.shape) == [batch, *(e.dims if batched else e.dims[1:])]
        assert out.dtype == NUMPY[e.data_type]


def test_vae_repository_matches_the_graphs(mlp, tmp_path):
    written = write_model_repository(mlp.bundle, tmp_path / "repo", max_batch_size=64)
    assert {r: p.name for r, p in written.items()} == {"encoder": "tiny-mlp_encoder", "decoder": "tiny-mlp_decoder"}
    for role, folder in written.items():
        config = read_config(folder)
        assert config.name == folder.name
        assert config.max_batch_size == 64
        assert list(config.dynamic_batching.preferred_batch_size) == [32, 64]
        assert config.dynamic_batching.max_queue_delay_microseconds == 100
        assert [(g.kind, g.count) for g in config.instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, 1)]
        check_against_graph(config, folder, mlp.bundle, role)
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["tiny-mlp_decoder", "tiny-mlp_encoder"]


def test_vq_repository_with_a_conditional_prior(vq_bundle, tmp_path):
    written = write_model_repository(vq_bundle, tmp_path / "repo", kind="gpu", instances=2, gpus=[0],
                                     preferred_batch_sizes=[8, 32], max_queue_delay_us=500, max_batch_size=32)
    # every graph of the bundle, the cached prior graphs (prior_row, prior_step) included
    assert set(written) == {"encoder", "decoder", "prior", "prior_row", "prior_step"}
    for role, folder in written.items():
        config = read_config(folder)
        assert [(g.kind, g.count, list(g.gpus)) for g in config.instance_group] == \
            [(mc.ModelInstanceGroup.KIND_GPU, 2, [0])]
        assert list(config.dynamic_batching.preferred_batch_size) == [8, 32]
        assert config.dynamic_batching.max_queue_delay_microseconds == 500
        check_against_graph(config, folder, vq_bundle, role)
    prior = read_config(written["prior"])
    assert [e.name for e in prior.input] == ["codes", "label"]
    assert prior.input[1].HasField("reshape") and list(prior.input[1].reshape.shape) == []
    assert prior.input[0].data_type == mc.TYPE_INT64


def test_without_batching_the_dims_carry_the_batch_axis(vq_bundle, tmp_path):
    written = write_model_repository(vq_bundle, tmp_path / "repo", max_batch_size=0)
    for role, folder in written.items():
        config = read_config(folder)
        assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
        check_against_graph(config, folder, vq_bundle, role)


def test_cli_writes_the_bundled_default_and_keeps_other_models(tmp_path):
    repo = tmp_path / "repo"
    (repo / "someone_else" / "1").mkdir(parents=True)
    result = CliRunner().invoke(main, ["triton-repo", "--out", str(repo), "--max-batch-size", "16",
                                       "--instances", "3", "--preferred-batch-size", "4", "--preferred-batch-size", "16"])
    assert result.exit_code == 0, result.output
    bundle = vaeinfer.load(vaeinfer.DEFAULT_MODEL, device="cpu").bundle.path
    for role in ("encoder", "decoder"):
        folder = repo / f"{vaeinfer.DEFAULT_MODEL}_{role}"
        config = read_config(folder)
        assert config.max_batch_size == 16 and config.instance_group[0].count == 3
        assert list(config.dynamic_batching.preferred_batch_size) == [4, 16]
        check_against_graph(config, folder, bundle, role)
    assert (repo / "someone_else" / "1").is_dir()
    assert not [p for p in repo.iterdir() if p.name.startswith(".")]  # no temporary folders left behind

    again = CliRunner().invoke(main, ["triton-repo", "--out", str(repo)])
    assert again.exit_code == 1 and "already exists" in again.output
    again = CliRunner().invoke(main, ["triton-repo", "--out", str(repo), "--overwrite", "--max-batch-size", "8"])
    assert again.exit_code == 0, again.output
    assert read_config(repo / f"{vaeinfer.DEFAULT_MODEL}_encoder").max_batch_size == 8
    assert not [p for p in repo.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("kwargs", [{"max_batch_size": -1}, {"instances": 0}, {"kind": "tpu"},
                                    {"preferred_batch_sizes": [512]}, {"max_queue_delay_us": -5}])
def test_bad_settings_are_input_errors(mlp, tmp_path, kwargs):
    with pytest.raises(InputError):
        write_model_repository(mlp.bundle, tmp_path / "repo", **kwargs)
    assert not (tmp_path / "repo").exists()
