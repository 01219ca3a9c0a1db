"""Exact tiling (vaeinfer.exact_tiling, export.exact_tiling): tiled decode/encode equal to untiled.

A tiny AutoencoderKL (2 levels, 4 groups, one resnet per block, mid-block attention) is imported
with its stage graphs; the exact tiled result must match the untiled graph within 1e-3 at several
tile sizes, a non-square size, a budget that spills activations to disk, and for a 16-channel
latent. The memory planner's estimate is checked against the peak RSS of a fresh process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

import vaeinfer  # noqa: E402
from vaeinfer import exact_tiling as et  # noqa: E402
from vaeinfer.errors import BundleError, InputError  # noqa: E402
from vaeinfer.exact_tiling import MemoryBudgetError, parse_bytes  # noqa: E402
from vaeinfer.export.diffusers import from_diffusers  # noqa: E402

TOL = 1e-3


def _kl(latent_channels=4, seed=0, **extra):
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                                   latent_channels=latent_channels, sample_size=32, **extra).eval()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("exact")
    src = root / "kl"
    _kl().save_pretrained(src)
    exact = from_diffusers(src, root / "exact", sizes=((16, 16), (24, 32)), batches=(1, 2))
    return {"src": src, "exact": exact, "root": root}


@pytest.fixture(scope="module")
def model(bundles):
    return vaeinfer.load(bundles["exact"], device="cpu")


def _smooth(n, h, w, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    x = np.stack([[np.sin((5 + c) * yy + i) * np.cos((4 + c) * xx - i) for c in range(3)] for i in range(n)])
    return (0.9 * x + 0.1 * rng.standard_normal(x.shape)).clip(-1, 1).astype(np.float32)


def test_manifest_records_stages_and_validation(model):
    slot = model.manifest.raw["exact_tiling"]
    assert model.manifest.format_version == "1.3"
    for direction in ("decoder", "encoder"):
        runs = slot["validation"][direction]
        assert runs and all(r["max_abs_error"] <= TOL for r in runs)
    steps = model.manifest.exact_tiling["decoder"].steps
    assert [s.type for s in steps].count("attention") == 1
    assert {s.resample for s in steps} == {"none", "up"} and max(s.halo for s in steps) == 2
    assert all(s.file in model.info.files for s in model.manifest.exact_tiling["encoder"].steps if s.graph)
    assert model.exact_tiling_info() == {"decoder": True, "encoder": True, "why": None}


@pytest.mark.parametrize("tile", [3, (4, 6), (5, 20), 7])
def test_decode_equals_untiled(model, tile):
    z = np.random.default_rng(1).standard_normal((2, 4, 12, 20)).astype(np.float32)  # 24x40 (384x640 at 16x)
    ref = model.decode(z)
    seen = []
    got = model.decode(z, tile=tile, progress=seen.append)
    assert np.abs(got - ref).max() <= TOL
    assert seen[-1] == model.exact_plan(z.shape, "decode", tile).total > 2 * len(model.manifest.exact_tiling["decoder"].steps)


@pytest.mark.parametrize("tile", [8, (6, 16), 14])
def test_encode_equals_untiled(model, tile):
    x = _smooth(2, 24, 40)
    ref = model.encode(x)
    got = model.encode(x, tile=tile)
    assert np.abs(got.mean - ref.mean).max() <= TOL and np.abs(got.logvar - ref.logvar).max() <= TOL
    scaled = model.encode(x, tile=tile, scaled=True)
    np.testing.assert_allclose(scaled.mean, model.encode(x, scaled=True).mean, atol=TOL)


def test_budget_spills_to_disk_and_stays_exact(model):
    z = np.random.default_rng(2).standard_normal((1, 4, 24, 16)).astype(np.float32)
    ref = model.decode(z)
    roomy = model.exact_plan(z.shape, max_memory="1GiB")
    assert not roomy.disk and all(s.tiles == 1 for s in roomy.steps)
    with pytest.raises(MemoryBudgetError) as info:
        model.exact_plan(z.shape, max_memory=1000)
    smallest = info.value.smallest
    assert f"max_memory={smallest}" in str(info.value) and "smallest budget that works" in str(info.value)
    tight = model.exact_plan(z.shape, max_memory=smallest)
    assert tight.disk and tight.peak <= smallest and max(s.tiles for s in tight.steps) > 1
    steps = model.manifest.exact_tiling["decoder"].steps
    assert any(s.out in tight.disk and p.tile[1] < tight.sizes[s.out][3] for s, p in zip(steps, tight.steps))  # bands
    fresh = vaeinfer.load(model.bundle.path, device="cpu")  # stage graphs not loaded yet: they count
    streamed = fresh.exact_plan(z.shape, max_memory="16MiB")
    assert streamed.stream and streamed.resident < fresh._stage_resident("decoder")  # loaded step by step
    assert np.abs(fresh.decode(z, max_memory="16MiB") - ref).max() <= TOL and not getattr(fresh, "_stages", {})
    got = model.decode(z, max_memory=smallest)
    assert np.abs(got - ref).max() <= TOL
    x = _smooth(1, 48, 32)
    with pytest.raises(MemoryBudgetError) as info:
        model.encode(x, max_memory=100)
    e = model.encode(x, max_memory=info.value.smallest)
    assert np.abs(e.mean - model.encode(x).mean).max() <= TOL


def test_spill_file_gathers_narrow_tiles_in_bands(tmp_path):
    a = np.random.default_rng(0).standard_normal((2, 3, 7, 10)).astype(np.float32)
    disk = et._Disk(a.shape, tmp_path)
    try:
        for n in range(2):
            for y0, y1 in ((0, 4), (4, 7)):
                for x0, x1 in ((0, 3), (3, 8), (8, 10)):
                    et._store(None, disk, None, n, y0, x0, a[n, :, y0:y1, x0:x1])
                    assert (disk.band is None) == (x1 == 10)  # a band goes to the file once complete
        np.testing.assert_array_equal(disk.read(1, 0, 7, 0, 10), a[1])
        np.testing.assert_array_equal(disk.read(0, 2, 6, 1, 9, 1, 3), a[0, 1:3, 2:6, 1:9])
        et._store(None, disk, None, 0, 0, 0, a[0, :, 0:2, 0:5])
        with pytest.raises(RuntimeError, match="before the band"):
            et._store(None, disk, None, 0, 2, 5, a[0, :, 2:4, 5:10])
        with pytest.raises(RuntimeError, match="before its band"):
            disk.read(0, 0, 2, 0, 10)
    finally:
        disk.close()
    assert not list(tmp_path.iterdir())


def test_tiles_are_stored_and_summed_group_by_group_on_threads(tmp_path, monkeypatch):
    """_store: channel groups copied then summed while in cache, split between threads; the
    statistics are those of the whole activation, in memory and in a spill file alike."""
    monkeypatch.setattr(et, "GROUP_BYTES", 4 * 2 * 3)  # a channel or two per group
    a = (np.random.default_rng(1).standard_normal((2, 7, 6, 10)) * 3 + 5).astype(np.float32)
    ref = a.astype(np.float64)
    with et._Pool(2) as pool:
        for dst in (et._Memory(a.shape), et._Disk(a.shape, tmp_path, pool)):
            acc = et._Stats(2, 7)
            try:
                for n in range(2):
                    for y0, y1 in ((0, 4), (4, 6)):
                        for x0, x1 in ((0, 3), (3, 10)):
                            et._store(pool, dst, acc, n, y0, x0, a[n, :, y0:y1, x0:x1])
                np.testing.assert_array_equal(dst.read(1, 0, 6, 0, 10), a[1])
                np.testing.assert_allclose(acc.mean, ref.mean(axis=(2, 3)), rtol=1e-6)
                np.testing.assert_allclose(acc.m2, ref.var(axis=(2, 3)) * 60, rtol=1e-5)
                assert (acc.count == 60).all()
            finally:
                dst.close()
    assert not list(tmp_path.iterdir())


def test_bundle_without_stages_says_so(bundles, tmp_path):
    """A bundle of format 1.2 (before exact tiling): the stage graphs and the slot removed."""
    plain = tmp_path / "plain"
    shutil.copytree(bundles["exact"], plain)
    manifest = json.loads((plain / "manifest.json").read_text())
    slot = manifest.pop("exact_tiling")
    for step in (s for d in ("decoder", "encoder") for s in slot[d]["steps"] if "file" in s):
        (plain / step["file"]).unlink()
    manifest["format_version"] = "1.2"
    (plain / "manifest.json").write_text(json.dumps(manifest))
    m = vaeinfer.load(plain, device="cpu")
    z = np.random.default_rng(3).standard_normal((1, 4, 12, 12)).astype(np.float32)
    with pytest.raises(InputError, match="re-export it with --exact-tiling"):
        m.decode(z, max_memory="1GiB")
    with pytest.raises(InputError, match="tile_mode='blend'"):
        m.decode(z, tile=4)
    assert m.decode(z, tile=8, tile_mode="blend").shape == (1, 3, 24, 24)
    assert not m.exact_tiling_info()["decoder"]


def test_sixteen_latent_channels_non_square():
    """SD3 / Flux.1's layout: 16 latent channels, no quant_conv / post_quant_conv."""
    from vaeinfer.export.exact_tiling import export_exact_tiling

    vae = _kl(16, seed=4, use_quant_conv=False, use_post_quant_conv=False)
    assert vae.quant_conv is None and vae.post_quant_conv is None
    files, slot = export_exact_tiling(vae, 2, sizes=((24, 40), (32, 16)), tiles=((8, 12), (6, 10)))
    for direction in ("decoder", "encoder"):
        assert all(r["max_abs_error"] <= TOL for r in slot["validation"][direction])
    assert slot["decoder"]["input_channels"] == 16 and slot["encoder"]["outputs"] == [["mean", 16], ["logvar", 16]]
    assert len(files) == sum(len(slot[d]["steps"]) for d in ("decoder", "encoder"))  # a graph per step


def test_sample_and_reconstruct_take_max_memory(model):
    ref = model.sample(1, seed=3, height=32, width=48)
    assert np.abs(model.sample(1, seed=3, height=32, width=48, max_memory="24MiB") - ref).max() <= TOL
    x = _smooth(1, 32, 48)
    assert np.abs(model.reconstruct(x, tile=16) - model.reconstruct(x)).max() <= TOL


def test_parse_bytes_and_bad_slots(model):
    assert parse_bytes("2GiB") == 2 << 30 and parse_bytes("512MiB") == 512 << 20 and parse_bytes("1.5G") == 3 << 29
    assert parse_bytes("800MB") == 800 * 10 ** 6 and parse_bytes(4096) == 4096
    for bad in ("lots", "-1", "2 parsecs", 0, 1.5, True):
        with pytest.raises(InputError):
            parse_bytes(bad)
    raw = json.loads(json.dumps(model.manifest.raw["exact_tiling"]))
    raw["decoder"]["steps"][1]["halo"] = -1
    with pytest.raises(BundleError, match="halo"):
        et.parse_slot(raw)
    raw = json.loads(json.dumps(model.manifest.raw["exact_tiling"]))
    raw["decoder"]["steps"][2]["x"] = "nowhere"
    with pytest.raises(BundleError, match="nowhere"):
        et.parse_slot(raw)
    raw = json.loads(json.dumps(model.manifest.raw["exact_tiling"]))
    attention = next(s for s in raw["decoder"]["steps"] if s["type"] == "attention")
    for key in ("graph", "file", "sha256"):  # as an earlier vaeinfer wrote it: the attention ran in numpy
        del attention[key]
    with pytest.raises(BundleError, match="re-export"):
        et.parse_slot(raw)
    with pytest.raises(InputError, match="tile_mode"):
        model.decode(np.zeros((1, 4, 8, 8), np.float32), tile=4, tile_mode="seamless")


def test_cli_max_memory(bundles, tmp_path):
    from click.testing import CliRunner

    from vaeinfer.cli import main

    z = np.random.default_rng(5).standard_normal((1, 4, 16, 12)).astype(np.float32)
    np.save(tmp_path / "z.npy", z)
    r = CliRunner().invoke(main, ["decode", "-m", str(bundles["exact"]), str(tmp_path / "z.npy"), "--max-memory",
                                  "24MiB", "-o", str(tmp_path / "img.npy")])
    assert r.exit_code == 0, r.output
    assert "exact tiling:" in r.output
    ref = vaeinfer.load(bundles["exact"], device="cpu").decode(z)
    assert np.abs(np.load(tmp_path / "img.npy") - ref).max() <= TOL
    r = CliRunner().invoke(main, ["decode", "-m", str(bundles["exact"]), str(tmp_path / "z.npy"), "--max-memory",
                                  "1KiB", "-o", str(tmp_path / "img2.npy")])
    assert r.exit_code != 0 and "smallest budget that works" in r.output
    r = CliRunner().invoke(main, ["decode", "-m", str(bundles["exact"]), str(tmp_path / "z.npy"), "--max-memory",
                                  "many", "-o", str(tmp_path / "img3.npy")])
    assert r.exit_code != 0 and "2GiB" in r.output
    r = CliRunner().invoke(main, ["info", "-m", str(bundles["exact"])])
    assert r.exit_code == 0 and json.loads(r.output)["exact_tiling"] == {"decoder": True, "encoder": True, "why": None}


_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import vaeinfer

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    bundle, side, budget = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    m = vaeinfer.load(bundle, device="cpu", threads=1)
    z = np.random.default_rng(0).standard_normal((1, 4, side, side)).astype(np.float32)
    m.decode(np.zeros((1, 4, 4, 4), np.float32))  # warm the untiled path's one-off allocations
    after = status("VmRSS")
    plan = m.exact_plan(z.shape, max_memory=budget)
    img = m.decode(z, max_memory=budget)
    print(json.dumps({"peak": status("VmHWM") - after, "estimate": plan.peak, "output": img.nbytes,
                      "disk": len(plan.disk)}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_estimate_against_measured_peak(bundles):
    """Peak RSS of a fresh process minus its RSS after loading stays within max_memory plus the
    output array (the first call loads the stage graphs: counted in the budget), up to 2 MiB of
    measurement noise. Measured when written (peak minus budget minus output, MiB): -6.0 / -2.4 /
    -3.4 for budgets of 20 / 24 / 32 MiB on a 256x256 latent, -5.9 / -10.6 / -12.1 on this 160x160 one."""
    slack = 2 << 20
    budget = 20 << 20
    out = subprocess.run([sys.executable, "-c", _CHILD, str(bundles["exact"]), "160", str(budget)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["disk"] > 0  # the 320x320 image's 8-channel activations (3 MiB each) do not all fit
    assert r["estimate"] <= budget
    assert r["peak"] <= budget + r["output"] + slack, r


def test_serve_max_memory(bundles):
    pytest.importorskip("fastapi")
    import io

    from fastapi.testclient import TestClient

    from vaeinfer.serve import ServeConfig, create_app

    with pytest.raises(InputError, match="2GiB"):
        ServeConfig(models=(str(bundles["exact"]),), max_memory="lots")
    app = create_app(ServeConfig(models=(str(bundles["exact"]),), max_memory="24MiB", max_body_bytes=1 << 22))
    name = next(iter(app.state.served))
    z = np.random.default_rng(6).standard_normal((1, 4, 16, 24)).astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, z)
    headers = {"Content-Type": "application/x-npy", "Accept": "application/x-npy"}
    with TestClient(app) as client:
        r = client.post(f"/v1/models/{name}/decode", content=buf.getvalue(), headers=headers)
    assert r.status_code == 200, r.text
    model = app.state.served[name].model
    assert np.abs(np.load(io.BytesIO(r.content)) - model.decode(z)).max() <= TOL
    assert model._stages.get("decoder")  # the request ran through the stage graphs
