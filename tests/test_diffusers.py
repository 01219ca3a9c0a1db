"""Import of diffusers autoencoders (AutoencoderKL, AutoencoderTiny, VQModel): tiny random configs
made here and saved with save_pretrained, so no download is needed. Validation compares
onnxruntime with the diffusers module itself."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
os.environ["HF_HUB_OFFLINE"] = "1"

from click.testing import CliRunner  # noqa: E402

import vaeinfer  # noqa: E402
from vaeinfer.export.diffusers import from_diffusers  # noqa: E402
from vaeinfer.export.graphs import ExportError  # noqa: E402
from vaeinfer.export.spatial_vae import smooth_images  # noqa: E402
from vaeinfer.cli import main  # noqa: E402
from vaeinfer.errors import InputError  # noqa: E402

SIZES = ((16, 16), (24, 32))
FP32_TOL = 5e-4  # the export's own tolerance (vaeinfer.export.spatial_vae.TOLERANCE)


def _kl():
    return diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                                   latent_channels=4, sample_size=32)


def _tiny():
    return diffusers.AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                                     num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4)


def _vq():
    return diffusers.VQModel(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                             latent_channels=3, num_vq_embeddings=16, vq_embed_dim=3, sample_size=32)


FAMILIES = {"kl": _kl, "tiny": _tiny, "vq": _vq}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (diffusers module, bundle path); the KL one with fp16 and int8 variants."""
    out = {}
    for name, make in FAMILIES.items():
        torch.manual_seed(0)
        module = make().eval()
        src = tmp_path_factory.mktemp(name) / "model"
        module.save_pretrained(src)
        precisions = ("fp16", "int8") if name == "kl" else ()
        out[name] = (module, from_diffusers(src, src.parent / "bundle", sizes=SIZES, precisions=precisions), src)
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_manifest_records_the_family(exported, family):
    module, path, _ = exported[family]
    m = json.loads((path / "manifest.json").read_text())
    assert m["kind"] == "spatial-vae" and m["image"]["range"] == [-1.0, 1.0]
    assert m["source"]["class"] == type(module).__name__ and len(m["source"]["config_sha256"]) == 64
    lat = m["latent"]
    want = {"kl": (4, 2, True, False, 0.18215), "tiny": (4, 8, False, False, 1.0), "vq": (3, 2, False, True, 0.18215)}
    assert (lat["channels"], lat["downsample"], lat["stochastic"], lat["quantized"], lat["scaling_factor"]) == \
        pytest.approx(want[family])
    parity = m["export"]["parity"]
    assert parity["batches"] == [1, 2, 3] and len(parity["sizes"]) == 2
    for figures in parity["graphs"].values():
        for fig in figures.values():
            assert fig["max_abs_err"] <= FP32_TOL


@pytest.mark.parametrize("family", list(FAMILIES))
def test_python_api_matches_diffusers_at_a_new_size(exported, family):
    """Dynamic H/W: a size neither traced nor validated at export, against the diffusers module."""
    module, path, _ = exported[family]
    vae = vaeinfer.load(path, device="cpu")
    f = vae.downsample
    x = smooth_images(2, 3, 5 * f * (2 if f == 2 else 1), 3 * f * (2 if f == 2 else 1), seed=5)
    post = vae.encode(x)
    with torch.no_grad():
        enc = module.encode(torch.from_numpy(x))
        want_mean = enc.latent_dist.mean if family == "kl" else enc.latents
        want_img = module.decode(torch.from_numpy(post.mean)).sample.numpy()
    assert post.mean.shape == (2, vae.latent_channels, x.shape[2] // f, x.shape[3] // f)
    assert np.abs(post.mean - want_mean.numpy()).max() <= FP32_TOL
    assert (post.logvar is not None) == (family == "kl")
    assert np.abs(vae.decode_params(post.mean) - want_img).max() <= FP32_TOL
    assert np.array_equal(vae.decode(post.mean), np.clip(vae.decode_params(post.mean), -1, 1))
    if post.logvar is None:
        assert np.array_equal(post.sample(seed=0), post.mean)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_scaled_round_trip(exported, family):
    _, path, _ = exported[family]
    vae = vaeinfer.load(path, device="cpu")
    x = smooth_images(1, 3, 32, 32, seed=1)
    raw, scaled = vae.encode(x), vae.encode(x, scaled=True)
    s, t = vae.scaling_factor, vae.shift_factor
    np.testing.assert_allclose(scaled.mean, (raw.mean - t) * s, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(vae.decode(scaled.mean, scaled=True), vae.decode(raw.mean), atol=1e-5)


def test_bad_sizes_are_input_errors(exported):
    vae = vaeinfer.load(exported["tiny"][1], device="cpu")  # 8x downsampling
    with pytest.raises(InputError, match="multiples of 8"):
        vae.encode(np.zeros((1, 3, 30, 32), np.float32))
    with pytest.raises(InputError, match=r"expected shape \(N, 3, H, W\)"):
        vae.encode(np.zeros((1, 4, 32, 32), np.float32))
    with pytest.raises(InputError, match=r"expected shape \(N, 4, h, w\)"):
        vae.decode(np.zeros((1, 3, 4, 4), np.float32))
    with pytest.raises(InputError, match="values in"):
        vae.encode(np.full((1, 3, 32, 32), 2.0, np.float32))
    with pytest.raises(InputError, match="multiples of 8"):
        vae.sample(1, height=20, width=32)
    with pytest.raises(InputError, match="score needs"):
        vae.score(np.zeros((1, 3, 32, 32), np.float32))


def test_sample_is_seeded_and_sized(exported):
    vae = vaeinfer.load(exported["kl"][1], device="cpu")
    a, b = vae.sample(2, seed=3, height=16, width=24), vae.sample(2, seed=3, height=16, width=24)
    assert a.shape == (2, 3, 16, 24) and np.array_equal(a, b)
    assert vae.sample(1, seed=0).shape == (1, 3, 32, 32)  # the config's sample_size


def test_cli_decode_and_encode(exported, tmp_path):
    _, path, _ = exported["kl"]
    x = smooth_images(2, 3, 16, 24, seed=2)
    np.save(tmp_path / "x.npy", x)
    r = CliRunner().invoke(main, ["encode", "-m", str(path), str(tmp_path / "x.npy"), "--scaled", "-o", str(tmp_path / "z.npz")])
    assert r.exit_code == 0, r.output
    z = np.load(tmp_path / "z.npz")
    assert z["mean"].shape == (2, 4, 8, 12) and z["logvar"].shape == (2, 4, 8, 12)
    for out in ("out.png", "out.npy"):
        r = CliRunner().invoke(main, ["decode", "-m", str(path), str(tmp_path / "z.npz"), "--scaled", "-o", str(tmp_path / out)])
        assert r.exit_code == 0, r.output
    vae = vaeinfer.load(path, device="cpu")
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), vae.decode(z["mean"], scaled=True), atol=1e-6)
    from PIL import Image

    assert Image.open(tmp_path / "out.png").size[1] > 16
    bad = CliRunner().invoke(main, ["decode", str(tmp_path / "z.npz"), "--scaled", "-o", str(tmp_path / "o.png")])
    assert bad.exit_code != 0 and "apply to spatial-vae models" in bad.output


def test_cli_export_from_diffusers(exported, tmp_path):
    _, _, src = exported["tiny"]
    r = CliRunner().invoke(main, ["export", "--from-diffusers", str(src), "-o", str(tmp_path / "taesd")])
    assert r.exit_code == 0, r.output
    vae = vaeinfer.load(tmp_path / "taesd", device="cpu")
    assert vae.info.kind == "spatial-vae" and vae.decode(np.zeros((1, 4, 2, 3), np.float32)).shape == (1, 3, 16, 24)


def test_fp16_and_int8_variants(exported):
    _, path, _ = exported["kl"]
    m = json.loads((path / "manifest.json").read_text())
    fp16 = m["variants"]["fp16"]
    assert set(fp16["fp16_safety"]) == {"encoder", "decoder"}
    x = smooth_images(2, 3, 24, 32, seed=9)
    ref = vaeinfer.load(path, device="cpu")
    for precision, tol in (("fp16", 0.02), ("int8", 0.15)):
        var = vaeinfer.load(path, device="cpu", precision=precision)
        # real-looking inputs: encoded smooth images, and random latents at the diffusers scaling
        # (int8 on the first only: its activation ranges were calibrated on encoded images)
        z = [ref.encode(x).mean, np.random.default_rng(0).standard_normal((2, 4, 12, 16)).astype(np.float32) / 0.18215]
        for zz in z[:2 if precision == "fp16" else 1]:
            out = var.decode(zz)
            assert np.isfinite(out).all()
            assert np.abs(out - ref.decode(zz)).mean() <= tol


def test_single_file_checkpoint(exported, tmp_path):
    from safetensors.torch import save_file

    module, _, src = exported["kl"]
    save_file(module.state_dict(), tmp_path / "vae.safetensors")
    with pytest.raises(ExportError, match="needs its diffusers config"):
        from_diffusers(tmp_path / "vae.safetensors", tmp_path / "b")
    path = from_diffusers(tmp_path / "vae.safetensors", tmp_path / "b", config=src, sizes=((16, 16), (16, 24)),
                          batches=(1, 2))
    a = vaeinfer.load(path, device="cpu")
    b = vaeinfer.load(exported["kl"][1], device="cpu")
    z = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(a.decode(z), b.decode(z), atol=1e-6)


def test_not_a_diffusers_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ExportError, match="supported: AutoencoderKL"):
        from_diffusers(tmp_path, tmp_path / "out")
    with pytest.raises(ExportError, match="expected a diffusers model folder"):
        from_diffusers(tmp_path / "out2" if (tmp_path / "out2").mkdir() is None else None, tmp_path / "o")


def test_tiled_decode_and_encode(exported, tmp_path):
    """Tiles are in the input's pixels (latent for decode, image for encode). TAESD's decoder is
    local (no normalisation over the image, no attention): tiled output stays close to untiled.
    AutoencoderKL's GroupNorm and attention see one tile at a time, as in every tiled VAE decode,
    so there only shape, finiteness and progress are checked here (tests/test_tiling.py states
    the seam bounds)."""
    tiny = vaeinfer.load(exported["tiny"][1], device="cpu")
    z = np.random.default_rng(0).standard_normal((2, 4, 20, 12)).astype(np.float32)
    assert np.abs(tiny.decode(z, tile=8, tile_mode="blend") - tiny.decode(z)).max() < 0.1
    with pytest.raises(InputError, match="not of the AutoencoderKL family"):
        tiny.decode(z, tile=8)  # exact is the default: never a silent approximation
    kl = vaeinfer.load(exported["kl"][1], device="cpu")
    z = np.random.default_rng(1).standard_normal((1, 4, 40, 24)).astype(np.float32)
    seen = []
    img = kl.decode(z, tile=16, progress=seen.append, tile_mode="blend")
    assert img.shape == (1, 3, 80, 48) and np.isfinite(img).all()
    assert seen[-1] == kl.tile_count(z.shape, 16) > 1
    post = kl.encode(img, tile=32, tile_mode="blend")
    assert post.mean.shape == (1, 4, 40, 24) and post.logvar.shape == post.mean.shape
    with pytest.raises(InputError, match="tiling"):
        kl.encode(img, tile=31, tile_mode="blend")
    np.save(tmp_path / "z.npy", z)
    r = CliRunner().invoke(main, ["decode", "-m", str(exported["kl"][1]), str(tmp_path / "z.npy"), "--tile", "16",
                                  "--tile-mode", "blend",
                                  "-o", str(tmp_path / "big.npy")])
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(np.load(tmp_path / "big.npy"), img)
