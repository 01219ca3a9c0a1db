"""Video VAEs (kind "video-vae"): tiny random Wan 2.1, Wan 2.2 (patch_size 2, is_residual) and
Qwen-Image configs saved with save_pretrained, exported through `from_diffusers` (which validates
the step graphs against diffusers' own whole-clip decode / encode) with precision variants (fp16
for each, int8 and bf16 for Wan 2.1; Qwen-Image through the CLI's `export --precision`), then run
through the Python API, the CLI and the server against the diffusers module and against fp32."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
os.environ["HF_HUB_OFFLINE"] = "1"

from click.testing import CliRunner  # noqa: E402

import vaeinfer  # noqa: E402
from vaeinfer.cli import main  # noqa: E402
from vaeinfer.errors import BundleError, InputError  # noqa: E402
from vaeinfer.export.diffusers import VARIANT_MAX_MAE, from_diffusers  # noqa: E402
from vaeinfer.export.graphs import ExportError  # noqa: E402
from vaeinfer.export.video_vae import clips, variant_clips  # noqa: E402

TOL = 1e-3  # whole clips against diffusers (the export's CLIP_TOLERANCE)
STATS = {"latents_mean": [0.1, -0.2, 0.3, 0.0], "latents_std": [1.5, 0.5, 2.0, 1.0]}


def _wan21():
    return diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1,
                                      temperal_downsample=[True, True], **STATS)


def _wan22():
    return diffusers.AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1,
                                      temperal_downsample=[True, True], is_residual=True, patch_size=2,
                                      in_channels=12, out_channels=12, scale_factor_spatial=8, **STATS)


def _qwen():
    return diffusers.AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1,
                                            temperal_downsample=[True, True], **STATS)


FAMILIES = {"wan21": _wan21, "wan22": _wan22, "qwen": _qwen}


def _has_bf16() -> bool:
    from vaeinfer.backends import openvino as ov

    return ov.is_available() and "BF16" in ov.capabilities()


HAS_BF16 = _has_bf16()
VARIANTS = {"wan21": ("fp16", "int8", *(("bf16",) if HAS_BF16 else ())), "wan22": ("fp16",), "qwen": ("fp16",)}
DECODER_ROLES = ("decoder_first", "decoder", "decoder_first_up", "decoder_up")
ENCODER_ROLES = ("encoder_first", "encoder", "encoder_first_mid", "encoder_mid")
ROLES = {*DECODER_ROLES, *ENCODER_ROLES}
HALOS = {"decoder": 8, "encoder": 5}  # the tiny configs' receptive fields (latent pixels), as measured at export
FP16_TOL = 1e-2  # fp16 whole clips against fp32 (max abs, frames in [-1, 1]); measured about 2e-3


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (diffusers module, bundle path), each bundle with its VARIANTS."""
    out = {}
    for name, make in FAMILIES.items():
        torch.manual_seed(0)
        module = make().eval()
        src = tmp_path_factory.mktemp(name) / "model"
        module.save_pretrained(src)
        bundle = src.parent / "bundle"
        if name == "qwen":  # the CLI's export --precision, once
            args = ["export", "--from-diffusers", str(src), "-o", str(bundle)]
            r = CliRunner().invoke(main, args + [a for p in VARIANTS[name] for a in ("--precision", p)])
            assert r.exit_code == 0, r.output
            assert "fp16: speed-up at batch 2" in r.output and "reconstruction mean abs error" in r.output
        else:
            from_diffusers(src, bundle, height=32, width=32, precisions=VARIANTS[name])
        out[name] = (module, bundle)
    return out


def _latents(module, n, t, h, w, seed=0):
    return np.random.default_rng(seed).standard_normal((n, module.config.z_dim, t, h, w), dtype=np.float32)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_records_the_facts_and_the_whole_clip_checks(exported, family):
    module, path = exported[family]
    manifest = json.loads((path / "manifest.json").read_text())
    lat = manifest["latent"]
    assert manifest["kind"] == vaeinfer.load(path).info.kind
    assert lat["temporal_downsample"] == 4 and lat["latents_std"] == STATS["latents_std"]
    assert lat["downsample"] == (8 if family == "wan22" else 4) and lat["patch_size"] == (2 if family == "wan22" else 1)
    assert set(manifest["graphs"]) == ROLES
    assert {k: lat[f"{k}_halo"] for k in HALOS} == HALOS and lat["decoder_hidden"] == lat["encoder_hidden"] == 8
    clips_check = manifest["export"]["parity"]["clips"]
    assert clips_check["frames"] == [1, 5, 9]
    for key in ("decode", "encode_mean", "encode_logvar"):
        assert clips_check[f"{key}_max_abs_err"] <= TOL
    tiles_check = manifest["export"]["parity"]["tiles"]  # the halos' safety check: tiled against untiled
    for direction, halo in HALOS.items():
        assert tiles_check[f"{direction}_halo"] == halo and tiles_check[f"{direction}_max_abs_err"] <= 1e-5


@pytest.mark.parametrize("family", list(FAMILIES))
def test_decode_and_encode_match_diffusers(exported, family):
    module, path = exported[family]
    m = vaeinfer.load(path)
    f = m.downsample
    for n, t, (h, w) in ((1, 1, (2, 2)), (2, 4, (3, 2))):  # 1 and 13 frames, a size the export did not check
        z = _latents(module, n, t, h, w, seed=t)
        with torch.no_grad():
            ref = module.decode(torch.from_numpy(z)).sample.numpy()
        got = m.decode(z)
        assert got.shape == ref.shape == (n, 3, 1 + 4 * (t - 1), h * f, w * f)
        assert np.abs(got - ref).max() <= TOL
        x = clips(n, 1 + 4 * (t - 1), h * f, w * f, seed=t)
        with torch.no_grad():
            dist = module.encode(torch.from_numpy(x)).latent_dist
        post = m.encode(x)
        assert post.mean.shape == tuple(dist.mean.shape) == (n, 4, t, h, w)
        assert np.abs(post.mean - dist.mean.numpy()).max() <= TOL
        assert np.abs(post.logvar - dist.logvar.numpy()).max() <= TOL


def test_stream_equals_whole_bit_for_bit_and_scaled_latents(exported):
    module, path = exported["wan21"]
    m = vaeinfer.load(path)
    z = _latents(module, 2, 3, 2, 3)
    whole = m.decode(z)
    parts = list(m.decode_stream(z))
    assert [p.shape[2] for p in parts] == [1, 4, 4]
    assert np.array_equal(np.concatenate(parts, axis=2), whole)
    x = clips(1, 9, 8, 12, seed=3)
    post = m.encode(x)
    frames = (x[:, :, i] for i in range(x.shape[2]))  # an iterable of single frames, read as consumed
    streamed = list(m.encode_stream(frames))
    assert np.array_equal(np.concatenate([p.mean for p in streamed], axis=2), post.mean)
    # diffusion latents: (mean - latents_mean) / latents_std, decoded back as z * std + mean
    mean, std = (np.asarray(STATS[k], np.float32).reshape(1, -1, 1, 1, 1) for k in ("latents_mean", "latents_std"))
    scaled = m.encode(x, scaled=True)
    np.testing.assert_allclose(scaled.mean, (post.mean - mean) / std, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m.decode(scaled.mean, scaled=True), m.decode(post.mean), atol=1e-5)


def test_frame_count_and_shape_errors_say_what_to_do(exported):
    _, path = exported["wan21"]
    m = vaeinfer.load(path)
    with pytest.raises(InputError, match=r"1 \+ 4 k frames.*got 7: pad to 9 frames"):
        m.encode(clips(1, 7, 8, 8, seed=0))
    with pytest.raises(InputError, match="pad to 5 frames"):
        list(m.encode_stream(iter([clips(1, 3, 8, 8, seed=0)])))
    with pytest.raises(InputError, match="multiples of 4"):
        m.encode(clips(1, 5, 10, 8, seed=0))
    with pytest.raises(InputError, match=r"\(N, 4, T, h, w\)"):
        m.decode(np.zeros((1, 4, 2, 2), np.float32))


def test_cli_decodes_to_gif_mp4_and_pngs_and_encodes_a_video(exported, tmp_path):
    av = pytest.importorskip("av")
    module, path = exported["wan21"]
    z = _latents(module, 1, 3, 4, 4)
    np.save(tmp_path / "z.npy", z)
    runner = CliRunner()
    for out in ("clip.gif", "clip.mp4", "frames/"):
        r = runner.invoke(main, ["decode", "-m", str(path), str(tmp_path / "z.npy"), "-o", str(tmp_path / out)])
        assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "frames").glob("*.png"))) == 9
    with av.open(str(tmp_path / "clip.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 9
    r = runner.invoke(main, ["encode", "-m", str(path), str(tmp_path / "clip.mp4"), "-o", str(tmp_path / "z2.npy")])
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "z2.npy").shape == (1, 4, 3, 4, 4)
    r = runner.invoke(main, ["encode", "-m", str(path), str(tmp_path / "frames"), "-o", str(tmp_path / "z3.npz")])
    assert r.exit_code == 0, r.output
    # the PNG frames are the decoded clip rounded to 8 bits: their latents are close to the mp4's
    assert np.load(tmp_path / "z3.npz")["mean"].shape == (1, 4, 3, 4, 4)
    # --tile: exact tiles of that many latent pixels, as tile= does
    m = vaeinfer.load(path)
    r = runner.invoke(main, ["decode", "-m", str(path), str(tmp_path / "z.npy"), "--tile", "3", "-o", str(tmp_path / "t.npy")])
    assert r.exit_code == 0, r.output
    assert np.array_equal(np.load(tmp_path / "t.npy"), m.decode(z, tile=3))
    np.save(tmp_path / "clip.npy", m.decode(z))
    r = runner.invoke(main, ["encode", "-m", str(path), str(tmp_path / "clip.npy"), "--tile", "3", "-o", str(tmp_path / "t.npz")])
    assert r.exit_code == 0, r.output
    assert np.array_equal(np.load(tmp_path / "t.npz")["mean"], m.encode(np.load(tmp_path / "clip.npy"), tile=3).mean)
    for verb in ("decode", "encode"):
        assert "Video model:" in " ".join(runner.invoke(main, [verb, "--help"]).output.split())
    # flags that do not apply to a video model are refused, never ignored
    r = runner.invoke(main, ["decode", "-m", str(path), str(tmp_path / "z.npy"), "--max-memory", "1GiB",
                             "-o", str(tmp_path / "x.mp4")])
    assert r.exit_code != 0 and "--max-memory: applies to spatial VAEs" in r.output and "--tile N" in r.output
    r = runner.invoke(main, ["encode", "-m", str(path), str(tmp_path / "clip.mp4"), "--tile-mode", "blend",
                             "-o", str(tmp_path / "x.npy")])
    assert r.exit_code != 0 and "--tile-mode: applies to spatial VAEs" in r.output
    r = runner.invoke(main, ["sample", "-m", str(path), "-o", str(tmp_path / "s.png")])
    assert r.exit_code != 0 and "vaeinfer decode -m MODEL z.npy -o clip.mp4" in r.output


def test_server_decodes_a_clip(exported):
    pytest.importorskip("fastapi")
    import io

    from fastapi.testclient import TestClient

    from vaeinfer.serve.app import create_app
    from vaeinfer.serve.config import ServeConfig

    module, path = exported["qwen"]
    z = _latents(module, 1, 2, 2, 2)
    buf = io.BytesIO()
    np.save(buf, z)
    with TestClient(create_app(ServeConfig(models=(str(path),)))) as client:
        name = next(iter(client.app.state.served))
        r = client.post(f"/v1/models/{name}/decode", content=buf.getvalue(),
                        headers={"content-type": "application/x-npy", "accept": "application/x-npy"})
        assert r.status_code == 200, r.text
    np.testing.assert_array_equal(np.load(io.BytesIO(r.content)), vaeinfer.load(path).decode(z))


def test_every_cpu_backend_and_precision_streams_a_clip(exported, tmp_path, monkeypatch):
    """The speed issue's backends and precisions apply to video too: OpenVINO fp32 equals
    onnxruntime's, bf16 (where the CPU has it) stays close, and precision="auto" chooses per step
    graph within its budget; streaming stays equal to the whole-clip decode on each."""
    from vaeinfer.backends import openvino as ov

    if not ov.is_available():
        pytest.skip("OpenVINO is not installed: pip install 'vaeinfer[openvino]'")
    module, path = exported["wan21"]
    ref = vaeinfer.load(path, device="cpu")
    z = _latents(module, 1, 3, 2, 2, seed=7)
    want = ref.decode(z)
    np.testing.assert_allclose(vaeinfer.load(path, device="cpu", backend="openvino").decode(z), want, atol=1e-4)
    if "BF16" in ov.capabilities():
        bf = vaeinfer.load(path, device="cpu", precision="bf16")
        got = bf.decode(z)
        assert 0 < float(np.abs(got - want).mean()) < 0.02
        assert np.array_equal(np.concatenate(list(bf.decode_stream(z)), axis=2), got)
    monkeypatch.setenv("VAEINFER_CACHE_DIR", str(tmp_path / "cache"))
    auto = vaeinfer.load(path, device="cpu", precision="auto")
    assert set(auto.info.auto) == ROLES
    got = auto.decode(z)
    assert float(np.abs(got - want).mean()) <= 0.01 * float(want.max() - want.min())
    assert np.array_equal(np.concatenate(list(auto.decode_stream(z)), axis=2), got)
    dec = vaeinfer.load(path, device="cpu", precision="auto", roles=("decoder",))  # the cached choice, decoder only
    assert set(dec.info.auto) == set(DECODER_ROLES) and dec.info.roles == DECODER_ROLES
    assert np.array_equal(dec.decode(z), got)


def test_bf16_decodes_frames_over_128_pixels(exported):
    """Wan's upsamplers, exported as gathers at int((arange(2w) + 0.5) * 0.5) computed in float from
    the input's shape, picked wrong or out-of-bounds pixels in OpenVINO bf16 once a frame side passed
    128 (bf16 holds 8 significant bits): NaN/Inf (refused by the finite check) or columns copied
    from the wrong place. The backend keeps that index arithmetic f32: bf16 rounding only, on
    either axis."""
    from vaeinfer.backends import openvino as ov

    if "BF16" not in ov.capabilities():
        pytest.skip("needs OpenVINO on a CPU with AMX or AVX-512 BF16 (OpenVINO's CPU plugin lists no BF16)")
    module, path = exported["wan21"]
    ref = vaeinfer.load(path, device="cpu")
    bf = vaeinfer.load(path, device="cpu", precision="bf16")
    for h, w in ((2, 34), (34, 2)):  # frames 8x136 and 136x8
        z = _latents(module, 1, 2, h, w, seed=7)
        want, got = ref.decode(z), bf.decode(z)
        assert got.shape == (1, 3, 5, 4 * h, 4 * w)
        err = np.abs(got - want) / float(want.max() - want.min())
        assert 0 < err.mean() < 2e-3 and err.max() < 0.05, (h, w, err.mean(), err.max())


# --- tiles --------------------------------------------------------------------------------------

TILE_TOL = 1e-5  # tiled against untiled (fp32: only rounding differs)
TILES = (3, 7)  # smaller than the halos (7: than the decoder's), neither dividing the frame
TILED_LATENT = (17, 10)  # non-square; every tile size leaves tiles whose crops are cut inside the frame


def _max_err(a, b) -> float:
    return float(np.abs(a - b).max())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiles_equal_the_whole_frame_and_stream_bit_for_bit(exported, family):
    module, path = exported[family]
    m = vaeinfer.load(path)
    f = m.downsample
    z = _latents(module, 2, 3, *TILED_LATENT, seed=11)
    x = clips(1, 9, TILED_LATENT[0] * f, TILED_LATENT[1] * f, seed=11)
    whole, post = m.decode(z), m.encode(x)
    for tile in TILES:
        got = m.decode(z, tile=tile)
        assert _max_err(got, whole) <= TILE_TOL, tile
        tiled = m.encode(x, tile=tile)
        assert _max_err(tiled.mean, post.mean) <= TILE_TOL and _max_err(tiled.logvar, post.logvar) <= TILE_TOL, tile
        if tile == TILES[-1]:  # streaming in tiles equals the whole clip in tiles, bit for bit
            assert np.array_equal(np.concatenate(list(m.decode_stream(z, tile=tile)), axis=2), got)
            streamed = list(m.encode_stream((x[:, :, i] for i in range(x.shape[2])), tile=tile))
            assert np.array_equal(np.concatenate([p.mean for p in streamed], axis=2), tiled.mean)
    assert np.array_equal(m.decode(z, tile=max(TILED_LATENT)), whole)  # one tile: the untiled run itself


def test_a_halo_one_pixel_smaller_shows(exported, monkeypatch):
    """The recorded halos are needed: one latent pixel less and the tiles' borders leak into their cores."""
    module, path = exported["wan21"]
    m = vaeinfer.load(path)
    z = _latents(module, 1, 3, *TILED_LATENT, seed=3)
    x = clips(1, 9, TILED_LATENT[0] * 4, TILED_LATENT[1] * 4, seed=3)
    runs = {"decoder": lambda tile: m.decode(z, tile=tile), "encoder": lambda tile: m.encode(x, tile=tile).mean}
    for direction, run in runs.items():
        whole = run(None)
        exact = _max_err(run(1), whole)
        monkeypatch.setitem(m.manifest.latent, f"{direction}_halo", HALOS[direction] - 1)
        short = _max_err(run(1), whole)
        monkeypatch.setitem(m.manifest.latent, f"{direction}_halo", HALOS[direction])
        assert exact <= TILE_TOL and short > max(1e-4, 100 * exact), (direction, exact, short)


def test_tile_values_are_checked(exported):
    module, path = exported["wan21"]
    m = vaeinfer.load(path, roles=("decoder",))
    z = _latents(module, 1, 1, 3, 3)
    for bad in (0, -2, True, 1.5, "4", (2, 2)):
        with pytest.raises(InputError, match=r"tile \(the side of a tile's core in latent pixels.*positive integer"):
            m.decode(z, tile=bad)
    assert np.array_equal(m.decode(z, tile=np.int64(2)), m.decode(z, tile=2))


def test_the_latent_slot_checks_the_split_fields():
    from vaeinfer.kinds.video_vae import SPLIT_KEYS, is_split, parse_latent

    lat = {"channels": 1, "downsample": 4, "temporal_downsample": 4, "stochastic": True, "latents_mean": [0.0],
           "latents_std": [1.0], "decoder_cache": [[1, 2, 1]], "encoder_cache": [[3, 2, 4]]}
    split = {**lat, "decoder_up_cache": [[8, 2, 2]], "encoder_mid_cache": [], "decoder_hidden": 8, "encoder_hidden": 8,
             "decoder_halo": 8, "encoder_halo": 0}
    assert not is_split(parse_latent(lat)) and is_split(parse_latent(split))
    with pytest.raises(BundleError, match=r"split step graphs need all of"):
        parse_latent({k: v for k, v in split.items() if k != "encoder_halo"})
    for key, bad in (("decoder_halo", -1), ("encoder_halo", 1.5), ("decoder_halo", True), ("decoder_hidden", 0),
                     ("decoder_up_cache", [[8, 2, 3]])):
        assert key in SPLIT_KEYS
        with pytest.raises(BundleError, match=f"latent.{key}"):
            parse_latent({**split, key: bad})


def _merge_pair(first_part: bytes, second_part: bytes, hidden: str, split: int) -> bytes:
    """One step graph as bundles before the split had it: the two parts joined at `hidden`, the
    second part's caches numbered after the first part's `split` ones, the outputs in the old
    order (the frames or statistics, then the caches)."""
    import onnx
    from onnx import compose

    a, b = onnx.load_from_string(first_part), onnx.load_from_string(second_part)
    b.ClearField("metadata_props")  # the first part's (its role's) stay
    merged = compose.merge_models(a, b, io_map=[(hidden, hidden)], prefix1="a/", prefix2="b/")
    names = {}
    for v in (*merged.graph.input, *merged.graph.output):
        name = v.name[2:]
        stem = "next_cache_" if name.startswith("next_cache_") else "cache_" if name.startswith("cache_") else None
        if stem is not None and v.name.startswith("b/"):
            name = f"{stem}{int(name[len(stem):]) + split}"
        names[v.name] = name
    for v in (*merged.graph.input, *merged.graph.output):
        v.name = names[v.name]
    for node in merged.graph.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]
    outputs = sorted(merged.graph.output, key=lambda o: (o.name.startswith("next_cache_"),
                                                         int(o.name.rsplit("_", 1)[1]) if "cache" in o.name else 0))
    outputs = [onnx.ValueInfoProto.FromString(o.SerializeToString()) for o in outputs]
    merged.graph.ClearField("output")
    merged.graph.output.extend(outputs)
    return merged.SerializeToString()


def _old_format(path, out):
    """The bundle at `path` as exported before the split (four step graphs, no halos): its parts
    joined back, the latent slot without the split's fields, no variants."""
    import hashlib

    from vaeinfer.kinds.video_vae import SPLIT_KEYS, parse_latent, video_vae_graphs

    manifest = json.loads((path / "manifest.json").read_text())
    lat = manifest["latent"]
    out.mkdir()
    pairs = {"decoder_first": ("decoder_first_up", "decoder_hidden"), "decoder": ("decoder_up", "decoder_hidden"),
             "encoder_first": ("encoder_first_mid", "encoder_hidden"), "encoder": ("encoder_mid", "encoder_hidden")}
    files = {role: _merge_pair((path / f"{role}.onnx").read_bytes(), (path / f"{second}.onnx").read_bytes(), hidden,
                               len(lat[f"{role.split('_')[0]}_cache"]))
             for role, (second, hidden) in pairs.items()}
    old = {k: v for k, v in lat.items() if k not in SPLIT_KEYS}
    old["decoder_cache"] = lat["decoder_cache"] + lat["decoder_up_cache"]
    old["encoder_cache"] = lat["encoder_cache"] + lat["encoder_mid_cache"]
    specs = video_vae_graphs(3, parse_latent(old))
    for role, data in files.items():
        (out / f"{role}.onnx").write_bytes(data)
    manifest.update(latent=old, variants={}, graphs={role: {"file": f"{role}.onnx", "sha256": hashlib.sha256(
        data).hexdigest(), **specs[role].io_json()} for role, data in files.items()})
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_a_bundle_from_before_the_split_runs_untiled_and_refuses_tiles(exported, tmp_path):
    module, path = exported["wan21"]
    old = vaeinfer.load(_old_format(path, tmp_path / "old"))
    assert old.info.roles == ("decoder_first", "decoder", "encoder_first", "encoder")
    new = vaeinfer.load(path)
    z = _latents(module, 1, 3, 3, 2)
    x = clips(1, 9, 12, 8, seed=1)
    assert _max_err(old.decode(z), new.decode(z)) <= TILE_TOL
    assert _max_err(old.encode(x).mean, new.encode(x).mean) <= TILE_TOL
    assert vaeinfer.load(tmp_path / "old", roles=("decoder",)).info.roles == ("decoder_first", "decoder")
    for call in (lambda: old.decode(z, tile=2), lambda: list(old.encode_stream(x, tile=2))):
        with pytest.raises(BundleError, match=r"exported before video frames could be tiled.*re-export it"):
            call()


_TILE_PEAKS = textwrap.dedent("""
    import json, sys
    import numpy as np
    import vaeinfer
    from vaeinfer.video_vae import decode_steps

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024

    class Hidden:  # the whole-frame graphs, giving a hidden tensor of the right shape
        def __init__(self, shape):
            self.shape = shape

        def run(self, feeds, batch_size=None):
            return [np.random.default_rng(0).standard_normal(self.shape, dtype=np.float32)]

    m = vaeinfer.load(sys.argv[1], device="cpu", threads=1, roles=("decoder",))
    lat = m.manifest.latent
    head = Hidden((1, lat["decoder_hidden"], 1, 96, 96))
    graphs = {"decoder_first": head, "decoder": head, **{r: m._graphs[r] for r in ("decoder_first_up", "decoder_up")}}
    z = np.zeros((1, 4, 3, 96, 96), np.float32)
    loaded = hwm()
    peaks = []
    for tile in ((32, 32), None):  # the high-water mark only grows: the tiled run first
        for _ in decode_steps(graphs, lat, z, tile=tile):
            pass
        peaks.append(hwm() - loaded)
    print(json.dumps(peaks))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_tiles_lower_a_decoder_steps_peak(exported):
    """A fresh process decodes a 384x384 clip of 9 frames in tiles of 32 latent pixels, then
    whole: the tiled steps peak lower (a tile's activations, though the tiles' caches overlap by
    the halo). Measured when written: 154 and 220 MiB above the loaded model. The steps'
    full-resolution graphs only: the tiny config's mid-block attention, on the whole 96x96 latent
    either way, would hide them (0.7 GiB of scores for its 8 channels, where a real model's
    full-resolution activations have 96 or more)."""
    _, path = exported["wan21"]
    out = subprocess.run([sys.executable, "-c", _TILE_PEAKS, str(path)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    tiled, whole = json.loads(out.stdout.strip().splitlines()[-1])
    assert tiled < 0.8 * whole, (tiled, whole)


# --- precision variants -----------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_fp16_variant_is_made_from_real_streams_and_validated_on_whole_clips(exported, family):
    _, path = exported[family]
    entry = json.loads((path / "manifest.json").read_text())["variants"]["fp16"]
    assert set(entry["graphs"]) == set(entry["fp16_safety"]) == ROLES
    for report in entry["fp16_safety"].values():  # the overflow check ran on each step graph
        assert report["overflow_threshold"] > 0 and "fp32_overflow" in report
    err = entry["error"]
    assert err["evaluated_on"]["clips"] == 2 and err["evaluated_on"]["frames"] == 9
    for key in (("encoder", "mean"), ("encoder", "logvar"), ("decoder", "frames"), ("decoder", "diffusion_latents"),
                ("reconstruction",)):
        e = err
        for k in key:
            e = e[k]
        assert 0 < e["max_abs_err"] <= FP16_TOL and e["mean_abs_err"] <= FP16_TOL / 5, (key, e)
    assert set(entry["speedup"]["graphs"]) == ROLES


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fp16_runs_every_step_graph_and_streams_bit_for_bit(exported, family):
    import onnx

    module, path = exported[family]
    ref, half = vaeinfer.load(path, device="cpu"), vaeinfer.load(path, device="cpu", precision="fp16")
    assert half.info.precision == "fp16" and set(half.info.files) == {f"{r}.fp16.onnx" for r in ROLES}
    for role in ROLES:  # fp16 inside, the caches (like every input and output) fp32 at the boundary
        graph = onnx.load_from_string(half.bundle.read_graph(role, "fp16"))
        assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.graph.initializer)
        assert {v.type.tensor_type.elem_type for v in (*graph.graph.input, *graph.graph.output)} == {onnx.TensorProto.FLOAT}
    z = _latents(module, 2, 3, 2, 3, seed=5)
    got = half.decode(z)
    d = np.abs(got - ref.decode(z))
    assert 0 < d.max() <= FP16_TOL
    assert np.array_equal(np.concatenate(list(half.decode_stream(z)), axis=2), got)
    x = clips(1, 9, 2 * half.downsample, 3 * half.downsample, seed=4)
    post = half.encode(x)
    assert np.abs(post.mean - ref.encode(x).mean).max() <= FP16_TOL
    streamed = list(half.encode_stream(x[:, :, i] for i in range(x.shape[2])))
    assert np.array_equal(np.concatenate([p.mean for p in streamed], axis=2), post.mean)


def test_a_variant_over_its_bound_is_refused_and_nothing_is_written(exported, tmp_path):
    from vaeinfer.export.variants import add_variants

    _, path = exported["wan21"]
    m = vaeinfer.open_bundle(path).manifest
    before = (path / "manifest.json").read_bytes()
    with pytest.raises(ExportError, match=r"fp16 variant's reconstructions differ from fp32's by .* more than the 0.0 allowed"):
        add_variants(path, ["fp16"], variant_clips(m, 2, 1), variant_clips(m, 1, 2), nll_images=0, speed_batch=2,
                     calibration_batch=4, max_image_mae=0.0, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists() and (path / "manifest.json").read_bytes() == before
    with pytest.raises(ExportError, match=r"clips \(N, 3, 1 \+ 4 k, H, W\) with k >= 1"):  # one frame: no later step
        add_variants(path, ["fp16"], variant_clips(m, 2, 1)[:, :, :1], nll_images=0, out_dir=tmp_path / "out")


def test_int8_variant_calibrated_on_real_streams_within_its_bound(exported):
    """int8 (static QDQ, caches quantized inside each step graph, fp32 at its boundary) passes the
    export's bound on whole clips; its errors are recorded like fp16's."""
    module, path = exported["wan21"]
    entry = json.loads((path / "manifest.json").read_text())["variants"]["int8"]
    assert set(entry["graphs"]) == ROLES and entry["calibration"]["clips"] == 4
    assert 0 < entry["error"]["reconstruction"]["mean_abs_err"] <= VARIANT_MAX_MAE
    q = vaeinfer.load(path, device="cpu", precision="int8")
    z = _latents(module, 1, 3, 2, 2, seed=2)
    got, want = q.decode(z), vaeinfer.load(path, device="cpu").decode(z)
    assert 0 < float(np.abs(got - want).mean()) <= VARIANT_MAX_MAE
    assert np.array_equal(np.concatenate(list(q.decode_stream(z)), axis=2), got)


@pytest.mark.skipif(not HAS_BF16, reason="bf16 needs OpenVINO on a CPU with AMX or AVX-512 BF16; "
                                         "the export refuses to record an entry it cannot validate")
def test_bf16_entry_is_validated_on_whole_clips(exported):
    _, path = exported["wan21"]
    entry = json.loads((path / "manifest.json").read_text())["variants"]["bf16"]
    assert entry["computed_from"] == "fp32" and "graphs" not in entry
    assert 0 < entry["error"]["reconstruction"]["mean_abs_err"] <= VARIANT_MAX_MAE
    assert entry["speedup"]["backend"] == "openvino" and set(entry["speedup"]["graphs"]) == ROLES


def test_auto_considers_fp16_and_int8_for_each_step_graph(exported, tmp_path, monkeypatch):
    """precision="auto" on onnxruntime alone: fp32, fp16 and int8 are candidates of every step
    graph, fp16 within the default budget; whatever it picks streams bit for bit."""
    from vaeinfer.auto_precision import within_budget

    module, path = exported["wan21"]
    monkeypatch.setenv("VAEINFER_CACHE_DIR", str(tmp_path / "cache"))
    auto = vaeinfer.load(path, device="cpu", backend="cpu", precision="auto")
    assert set(auto.info.auto) == ROLES
    for role, d in auto.info.auto.items():
        assert set(d["errors"]) == {"cpu/fp32", "cpu/fp16", "cpu/int8"}, role
        assert within_budget(d["errors"]["cpu/fp16"], d["peaks"]["cpu/fp16"], d["max_error"]), (role, d["why"])
    z = _latents(module, 1, 3, 2, 2, seed=7)
    got = auto.decode(z)
    assert np.array_equal(np.concatenate(list(auto.decode_stream(z)), axis=2), got)


def test_no_parallel_chunks_so_no_graph_bytes_kept(exported):
    """Parallel single-threaded chunks would keep every graph's bytes (to make their sessions) and
    hold several chunks' working memory at once: a video model runs each step as one call."""
    _, path = exported["wan21"]
    m = vaeinfer.load(path, device="cpu", threads=2)
    assert m.execution_modes() == {role: "intra" for role in ROLES}
    assert all(g._serial_factory is None for g in m._graphs.values())


def test_roles_load_one_half_and_still_check_every_file(exported, tmp_path):
    """load(roles=("decoder",)): the decoder's four graphs only (decoding as the whole model does),
    encoding says how to load the encoder; every file is still checked at load."""
    module, path = exported["wan21"]
    full = vaeinfer.load(path, device="cpu")
    assert full.info.roles == (*DECODER_ROLES, *ENCODER_ROLES)
    dec = vaeinfer.load(path, device="cpu", roles=("decoder",))
    assert dec.info.roles == tuple(dec._graphs) == DECODER_ROLES
    z = _latents(module, 1, 3, 2, 2)
    assert np.array_equal(dec.decode(z), full.decode(z))
    x = clips(1, 5, 8, 8, seed=0)
    with pytest.raises(ValueError, match=r"its encoder_first_mid graph is not loaded .*roles including 'encoder'"):
        dec.encode(x)
    enc = vaeinfer.load(path, device="cpu", roles="encoder")
    assert enc.info.roles == ENCODER_ROLES
    assert np.array_equal(enc.encode(x).mean, full.encode(x).mean)
    with pytest.raises(ValueError, match="roles including 'decoder'"):
        enc.decode(z)
    with pytest.raises(ValueError, match=r"roles: expected some of .*got \['prior'\]"):
        vaeinfer.load(path, roles=("prior",))
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    data = bytearray((bad / "encoder.onnx").read_bytes())
    data[-1] ^= 1
    (bad / "encoder.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        vaeinfer.load(bad, device="cpu", roles=("decoder",))


def test_first_and_step_graphs_share_their_weights_bit_for_bit(exported, monkeypatch):
    """Each first-step graph holds its step graph's weights: loaded once, used by both sessions
    in place (onnxruntime's add_initializer), with results equal to separate copies. The tiny
    model's weights are below the size threshold: lowered here so that all of them are shared."""
    import onnx

    from vaeinfer import onnx_scan, runtime

    module, path = exported["wan21"]
    data = (path / "decoder.onnx").read_bytes()
    want = {t.name: (t.data_type, tuple(t.dims), t.raw_data) for t in onnx.load_from_string(data).graph.initializer}
    got = {t.name: (t.data_type, t.dims, data[t.start:t.end]) for t in onnx_scan.initializers(data)}
    assert got == want and len(got) > 10
    monkeypatch.setattr(runtime, "SHARED_MIN_BYTES", 1)
    shared = vaeinfer.load(path, device="cpu", threads=1)
    for first, step in zip(DECODER_ROLES[::2] + ENCODER_ROLES[::2], DECODER_ROLES[1::2] + ENCODER_ROLES[1::2]):
        ptrs = [{v.data_ptr() for v in shared._graphs[r].runner.session.shared_weights} for r in (first, step)]
        assert len(ptrs[0]) > 10 and ptrs[0] == ptrs[1]
    monkeypatch.setattr(runtime, "shared_weights", lambda *_: {})
    separate = vaeinfer.load(path, device="cpu", threads=1)
    assert not any(g.runner.session.shared_weights for g in separate._graphs.values())
    z = _latents(module, 2, 3, 3, 2)
    x = clips(2, 9, 8, 12, seed=5)
    assert np.array_equal(shared.decode(z), separate.decode(z))
    a, b = shared.encode(x), separate.encode(x)
    assert np.array_equal(a.mean, b.mean) and np.array_equal(a.logvar, b.logvar)


_STEP_PEAKS = textwrap.dedent("""
    import json, sys
    import numpy as np
    import vaeinfer

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024

    m = vaeinfer.load(sys.argv[1], device="cpu", threads=1)
    z = np.random.default_rng(0).standard_normal((1, 4, 5, 64, 64), dtype=np.float32)
    print(json.dumps([hwm() for _ in m.decode_stream(z)]))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_every_decoder_step_peaks_alike(exported):
    """The peak RSS of a fresh process (MiB) after each step of a 256x256 clip of 17 frames: the
    later steps peak no higher than the first decoder step. Measured when written: 2.8 MiB higher
    (160 MiB above the loaded model); 30 MiB higher with onnxruntime's memory pattern, which lays
    a run's tensors out in one block with gaps from a graph's second run on."""
    _, path = exported["wan21"]
    out = subprocess.run([sys.executable, "-c", _STEP_PEAKS, str(path)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    peaks = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(peaks) == 5 and peaks[-1] - peaks[1] <= 10, peaks
