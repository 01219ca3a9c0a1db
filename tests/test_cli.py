"""The `vaeinfer` command line, through click's CliRunner and as a real subprocess."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import vaeinfer
from tests.conftest import REPO, blob_images, write_npz
from vaeinfer.cli import main


def cli(*args) -> "click.testing.Result":  # noqa: F821
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args):
    result = cli(*args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def one_line_error(result, *fragments):
    """Non-zero exit, exactly one line on stderr (`error: ...`), no traceback anywhere."""
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def vae(zoo):
    return vaeinfer.load(zoo.get("mlp").bundle, device="cpu")


@pytest.fixture
def bundle(mlp):
    return mlp.bundle


def test_help_of_every_command():
    result = ok("--help")
    assert "Usage" in result.output
    assert vaeinfer.__version__ in ok("--version").output
    for name in main.commands:
        result = ok(name, "--help")
        assert "Usage: " in result.output and name in result.output, name
    ok("sample", "-h")


def test_sample_png_and_arrays(bundle, vae, tmp_path):
    ok("sample", "-m", bundle, "-n", 4, "--seed", 1, "-o", tmp_path / "s.png", "--device", "cpu")
    with Image.open(tmp_path / "s.png") as im:
        assert im.format == "PNG" and im.mode == "L"
        assert im.size == (2 * (12 + 2) + 2, 2 * (20 + 2) + 2)  # a 2x2 grid of 20x12 images, 2 px padding
    result = ok("sample", "-m", bundle, "-n", 5, "--seed", 1, "-o", tmp_path / "s.npz", "--threads", 1)
    assert "wrote" in result.stderr
    with np.load(tmp_path / "s.npz") as z:
        np.testing.assert_array_equal(z["images"], vae.sample(5, seed=1))
    ok("sample", "-m", bundle, "-n", 3, "--seed", 2, "--temperature", 0.5, "--batch-size", 2, "-o", tmp_path / "s.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), vae.sample(3, seed=2, temperature=0.5))
    ok("sample", "-m", bundle, "-n", 6, "--nrow", 3, "-o", tmp_path / "row.png")
    with Image.open(tmp_path / "row.png") as im:
        assert im.size == (3 * 14 + 2, 2 * 22 + 2)


def test_encode_decode_round_trip(bundle, vae, mlp, tmp_path):
    x = mlp.images[:5]
    np.save(tmp_path / "x.npy", x)
    ok("encode", "-m", bundle, tmp_path / "x.npy", "-o", tmp_path / "lat.npz")
    with np.load(tmp_path / "lat.npz") as z:
        assert sorted(z.files) == ["logvar", "mean"]
        np.testing.assert_array_equal(z["mean"], vae.encode(x).mean)
    ok("decode", "-m", bundle, tmp_path / "lat.npz", "-o", tmp_path / "dec.npz")
    with np.load(tmp_path / "dec.npz") as z:
        np.testing.assert_array_equal(z["images"], vae.reconstruct(x))
    ok("decode", "-m", bundle, tmp_path / "lat.npz", "-o", tmp_path / "dec.png")
    assert (tmp_path / "dec.png").is_file()
    # a bare .npy of latents, and a .npz with images under another key
    np.save(tmp_path / "z.npy", np.zeros((2, 4), np.float32))
    ok("decode", "-m", bundle, tmp_path / "z.npy", "-o", tmp_path / "z.npz")
    np.savez(tmp_path / "xx.npz", x=np.round(x * 255).astype(np.uint8))
    ok("encode", "-m", bundle, tmp_path / "xx.npz", "-o", tmp_path / "lat2.npz")


def test_encode_png_files(bundle, vae, mlp, tmp_path):
    u8 = np.round(mlp.images[:3] * 255).astype(np.uint8)
    paths = []
    for i, img in enumerate(u8):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(img[0]).save(paths[-1])
    ok("encode", "-m", bundle, *paths, "-o", tmp_path / "lat.npz")
    with np.load(tmp_path / "lat.npz") as z:
        np.testing.assert_allclose(z["mean"], vae.encode(u8).mean, atol=1e-6)


def test_reconstruct(bundle, vae, mlp, tmp_path):
    x = mlp.images[:3]
    np.save(tmp_path / "x.npy", x)
    ok("reconstruct", "-m", bundle, tmp_path / "x.npy", "-o", tmp_path / "r.npz")
    with np.load(tmp_path / "r.npz") as z:
        np.testing.assert_array_equal(z["images"], vae.reconstruct(x))
    ok("reconstruct", "-m", bundle, tmp_path / "x.npy", "-o", tmp_path / "r.png")
    with Image.open(tmp_path / "r.png") as im:  # each input beside its reconstruction: 1 row of 6
        assert im.size == (6 * 14 + 2, 22 + 2)


def test_score_csv_and_npz(bundle, vae, mlp, tmp_path):
    x = mlp.images[:4]
    np.save(tmp_path / "x.npy", x)
    result = ok("score", "-m", bundle, tmp_path / "x.npy", "-k", 6, "--seed", 3, "-o", tmp_path / "s.csv")
    summary = json.loads(result.stdout)
    expected = vae.score(x, samples=6, seed=3)
    assert summary["images"] == 4 and summary["samples"] == 6
    assert summary["nll"]["mean"] == pytest.approx(expected.nll.mean())
    with open(tmp_path / "s.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["index"] for r in rows] == ["0", "1", "2", "3"] and set(rows[0]) == {"index", "nll", "elbo", "recon"}
    np.testing.assert_allclose([float(r["nll"]) for r in rows], expected.nll, atol=1e-5)
    ok("score", "-m", bundle, tmp_path / "x.npy", "-k", 6, "--seed", 3, "-o", tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz") as z:
        np.testing.assert_array_equal(z["elbo"], expected.elbo)


def test_info(bundle):
    listing = ok("info").output
    assert "mnist-vae (default)" in listing
    described = json.loads(ok("info", "-m", bundle).stdout)
    assert described["name"] == "tiny-mlp" and described["device"] == "cpu"
    assert described["image_shape"] == [1, 20, 12] and described["latent"] == {"dim": 4}
    assert described["providers"] == ["CPUExecutionProvider"]


def test_train_and_export(tmp_path):
    data = write_npz(tmp_path / "d.npz", blob_images(24, (3, 12, 10), seed=9), np.arange(24) % 2)
    run = tmp_path / "run"
    ok("train", "--data", data, "--arch", "mlp-vae", "--image-size", "10x8", "--channels", 1, "--latent-dim", 3,
       "--hidden", "8", "--epochs", 3, "--batch-size", 8, "--max-steps", 2, "--val-fraction", 0.25, "--seed", 1,
       "--threads", 1, "--lr", 0.01, "--out", run, "--quiet")
    meta = json.loads((run / "checkpoint.json").read_text())
    assert meta["progress"]["global_step"] == 2 and meta["image_shape"] == [1, 10, 8]
    assert meta["arch"] == "mlp-vae" and meta["model_args"] == {"latent_dim": 3, "hidden": [8]}
    assert meta["config"]["max_steps"] == 2 and meta["config"]["lr"] == 0.01 and meta["config"]["seed"] == 1
    ok("train", "--resume", "--max-steps", 4, "--out", run, "--quiet")  # the saved config, a new budget
    assert json.loads((run / "checkpoint.json").read_text())["progress"]["global_step"] == 4
    result = ok("export", run, "--out", tmp_path / "bundle", "--name", "cli-tiny")
    assert "parity" in result.stderr
    vae = vaeinfer.load(tmp_path / "bundle", device="cpu")
    assert vae.info.image_shape == (1, 10, 8) and vae.info.name == "cli-tiny"
    ok("sample", "-m", tmp_path / "bundle", "-n", 2, "-o", tmp_path / "s.png")


def test_train_with_config_file(tmp_path):
    data = write_npz(tmp_path / "d.npz", blob_images(16, (1, 8, 8), seed=2))
    config = tmp_path / "recipe.json"
    config.write_text(json.dumps({"data": str(data), "arch": "conv-vae", "epochs": 5, "batch_size": 8,
                                  "model_args": {"latent_dim": 2, "channels": [4]}, "val_fraction": 0.0}))
    ok("train", "--config", config, "--max-steps", 1, "--epochs", 2, "--out", tmp_path / "run", "--quiet")
    meta = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert meta["config"]["epochs"] == 2 and meta["config"]["batch_size"] == 8  # flags override the file
    assert meta["arch"] == "conv-vae" and meta["model_args"] == {"latent_dim": 2, "channels": [4]}


# ---- bad input: one line, non-zero, no traceback --------------------------------------------------------


def test_wrong_image_size(bundle, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 28, 28), np.float32))
    one_line_error(cli("encode", "-m", bundle, tmp_path / "x.npy"), "(N, 1, 20, 12)", "(2, 1, 28, 28)")
    one_line_error(cli("reconstruct", "-m", bundle, tmp_path / "x.npy", "-o", tmp_path / "r.png"), "(N, 1, 20, 12)")
    one_line_error(cli("score", "-m", bundle, tmp_path / "x.npy"), "(N, 1, 20, 12)")
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "big.png")
    one_line_error(cli("encode", "-m", bundle, tmp_path / "big.png"), "20x12", "28x28")


def test_cuda_device_error(bundle, tmp_path):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")
    one_line_error(cli("sample", "-m", bundle, "--device", "cuda", "-o", tmp_path / "s.png"), "CUDA")
    assert not (tmp_path / "s.png").exists()


def test_other_bad_input(bundle, tmp_path):
    one_line_error(cli("sample", "-m", tmp_path / "nowhere", "-o", tmp_path / "s.png"), "nowhere")
    one_line_error(cli("sample", "-m", bundle, "-o", tmp_path / "s.gif"), ".png")
    one_line_error(cli("sample", "-m", bundle, "--device", "tpu"), "device")
    np.save(tmp_path / "ok.npy", np.zeros((2, 1, 20, 12), np.float32))
    one_line_error(cli("encode", "-m", bundle, tmp_path / "ok.npy", "-o", tmp_path / "l.npy"), ".npz")
    one_line_error(cli("score", "-m", bundle, tmp_path / "ok.npy", "-o", tmp_path / "s.npy"), ".csv")
    one_line_error(cli("reconstruct", "-m", bundle, tmp_path / "ok.npy", "-o", tmp_path / "r.gif"), ".png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.npy"]  # nothing written
    np.save(tmp_path / "x.npy", np.full((2, 1, 20, 12), 2.0, np.float32))
    one_line_error(cli("encode", "-m", bundle, tmp_path / "x.npy"), "[0.0, 1.0]")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    one_line_error(cli("decode", "-m", bundle, tmp_path / "bad.npz"), "bad.npz")
    np.savez(tmp_path / "lat.npz", other=np.zeros((2, 4), np.float32))
    one_line_error(cli("decode", "-m", bundle, tmp_path / "lat.npz"), "mean")
    (tmp_path / "notimage.png").write_bytes(b"not an image")
    one_line_error(cli("encode", "-m", bundle, tmp_path / "notimage.png"), "notimage.png")
    one_line_error(cli("encode", "-m", bundle), "expected at least one input")
    one_line_error(cli("export", tmp_path / "x.npy", "--out", tmp_path / "b"), "x.npy")
    one_line_error(cli("train", "--data", tmp_path / "missing.npz", "--out", tmp_path / "run", "--quiet"),
                   "missing.npz")


def test_missing_input_file(bundle, tmp_path):
    """A path that does not exist is a usage error (click's own message, exit 2), never a traceback."""
    result = cli("encode", "-m", bundle, tmp_path / "missing.png")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "does not exist" in result.stderr.strip().splitlines()[-1]


# ---- as a real process ----------------------------------------------------------------------------------


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _script() -> list[str]:
    """The installed `vaeinfer` console script next to this interpreter, or `python -m vaeinfer.cli`."""
    script = Path(sys.executable).parent / "vaeinfer"
    return [str(script)] if script.exists() else [sys.executable, "-m", "vaeinfer.cli"]


def test_subprocess_sample_and_errors(bundle, tmp_path):
    out = tmp_path / "s.npz"
    done = subprocess.run([sys.executable, "-m", "vaeinfer.cli", "sample", "-m", str(bundle), "-n", "3",
                           "--seed", "5", "-o", str(out)], capture_output=True, text=True, env=_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    with np.load(out) as z:
        np.testing.assert_array_equal(z["images"], vaeinfer.load(bundle, device="cpu").sample(3, seed=5))
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 5, 5), np.float32))
    done = subprocess.run([*_script(), "encode", "-m", str(bundle), str(tmp_path / "x.npy")],
                          capture_output=True, text=True, env=_env(), timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1, done.stderr
    done = subprocess.run([*_script(), "sample", "-m", str(bundle), "--device", "cuda", "-o", str(tmp_path / "c.png")],
                          capture_output=True, text=True, env=_env(), timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


NO_TORCH = textwrap.dedent('''
    import json, sys
    import numpy as np
    import vaeinfer
    after_import = sorted(m for m in ("torch", "onnx", "training", "export") if m in sys.modules)
    from vaeinfer.cli import main
    out, bundle, x = sys.argv[1], sys.argv[2], sys.argv[3]
    main(["sample", "-n", "4", "--seed", "0", "-o", out + "/default.png"], standalone_mode=False)
    main(["info"], standalone_mode=False)
    main(["manifold", "-m", "mnist-vae-2d", "--size", "4", "-o", out + "/manifold.png"], standalone_mode=False)
    np.save(out + "/one.npy", np.load(x)[:1])
    main(["traverse", "-m", bundle, out + "/one.npy", "--steps", "3", "-o", out + "/traverse.png"], standalone_mode=False)
    for args in (["sample", "-o", out + "/s.npz"], ["encode", x, "-o", out + "/l.npz"], ["score", x, "-k", "2"],
                 ["reconstruct", x, "-o", out + "/r.png"], ["decode", out + "/l.npz", "-o", out + "/d.png"],
                 ["info", "-m", bundle]):
        main([args[0], "-m", bundle, *args[1:]], standalone_mode=False)
    vae = vaeinfer.load()
    vae.score(vae.sample(2, seed=0), samples=2)
    heavy = ("torch", "onnx", "onnxscript", "safetensors", "training", "export", "mlxtend", "jsonschema")
    print(json.dumps({"after_import": after_import, "at_exit": sorted(m for m in heavy if m in sys.modules)}))
''')


def test_runtime_never_imports_torch_or_onnx(bundle, mlp, tmp_path):
    np.save(tmp_path / "x.npy", mlp.images[:3])
    done = subprocess.run([sys.executable, "-c", NO_TORCH, str(tmp_path), str(bundle), str(tmp_path / "x.npy")],
                          capture_output=True, text=True, env=_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"after_import": [], "at_exit": []}
    with Image.open(tmp_path / "default.png") as im:  # the bundled default model: 4 MNIST-sized images
        assert im.size == (2 * 30 + 2, 2 * 30 + 2)
