"""vaeinfer.tiling: tiled == untiled away from the seams, bounded and smooth at the seams.

Bounds checked here (and quoted in the README):
- a local function whose tile outputs are wrong only within r output pixels of a tile's edge
  (where the tile cuts its receptive field): bit-identical outside the overlaps; in overlaps of
  o >= 2 r output pixels, |tiled - untiled| <= ramp((r - 0.5) / o) * (max - min of the output),
  ramp(t) = sin^2(pi t / 2) for the cosine blend (at most one tile is wrong at a pixel there,
  and it weighs at most that much).
- a global function (each tile adds its own mean m_i): the error is a blend of the m_i - m, so
  no worse than max |m_i - m|, and continuous: neighbouring output pixels' errors differ by at
  most (max m_i - min m_i) * pi / (2 o), against the full max m_i - min m_i of a hard seam.
- a real ONNX conv decoder (4x upsampling, three 3x3 convs, random weights): max |tiled -
  untiled| < 1e-5 of the output's spread (max - min) outside the overlaps (float rounding of
  convolutions run on other sizes) and < 5% of it in them
  (measured 3.8%; hard seams without overlap: more than twice that).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from vaeinfer.errors import InputError, OutputError
from vaeinfer.tiling import axis_starts, axis_weights, check_tile, tile_count, tiled_apply, tiled_decode, tiled_encode


def blur3(a: np.ndarray) -> np.ndarray:
    """3x3 box blur over the last two axes, edge-padded: a local function of radius 1."""
    p = np.pad(a, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = a.shape[2:]
    return sum(p[:, :, i:i + h, j:j + w] for i in range(3) for j in range(3)) / np.float32(9)


def fake_decoder(z: np.ndarray) -> np.ndarray:
    """A local 'decoder': 3x3 blur of the latents, nearest 8x upsampling, 3x3 blur of the pixels;
    3 output channels. On a tile, the edge padding makes the first blurred latent (8 pixels) wrong,
    and the pixel blur one pixel more: r = 9 wrong output pixels along each cut edge."""
    up = np.repeat(np.repeat(blur3(z), 8, axis=2), 8, axis=3)
    return np.ascontiguousarray(blur3(up)[:, :3])


def overlap_mask(starts, tile, length, factor):
    """True on output pixels that more than one tile covers (the seams), along one axis."""
    cover = np.zeros(length * factor, int)
    for s in starts:
        cover[s * factor:(s + tile) * factor] += 1
    return cover > 1


def seam_mask(shape, tile, overlap, factor):
    h, w = shape
    my = overlap_mask(axis_starts(h, tile, overlap), tile, h, factor)
    mx = overlap_mask(axis_starts(w, tile, overlap), tile, w, factor)
    return my[:, None] | mx[None, :]


def test_local_function_exact_away_from_seams_and_bounded_in_them():
    z = np.random.default_rng(0).standard_normal((2, 4, 40, 29)).astype(np.float32)
    tile, overlap = 12, 4
    full = fake_decoder(z)
    tiled = tiled_decode(fake_decoder, z, tile, overlap, scale=8, max_batch=3)
    assert tiled.shape == full.shape == (2, 3, 320, 232) and tiled.dtype == np.float32
    seams = seam_mask((40, 29), tile, overlap, 8)
    assert seams.any() and (~seams).any()
    np.testing.assert_array_equal(tiled[..., ~seams], full[..., ~seams])
    r, o = 9, overlap * 8
    assert o >= 2 * r
    bound = math.sin(0.5 * math.pi * (r - 0.5) / o) ** 2 * float(full.max() - full.min())
    err = np.abs(tiled - full)[..., seams].max()
    assert 0 < err <= bound


def test_global_function_error_bounded_and_smooth_at_seams():
    z = np.random.default_rng(1).standard_normal((1, 2, 36, 36)).astype(np.float32)
    z += np.linspace(0, 3, 36, dtype=np.float32)  # tiles' means differ along x
    tile, overlap = 12, 4  # 36 = 12 + 3 * 8: a regular layout, every overlap 4 wide

    def add_mean(a):
        up = np.repeat(np.repeat(a, 2, axis=2), 2, axis=3)
        return up + a.mean(axis=(1, 2, 3), keepdims=True)

    means = [z[:, :, y:y + tile, x:x + tile].mean() for y in axis_starts(36, tile, overlap)
             for x in axis_starts(36, tile, overlap)]
    err = tiled_apply(add_mean, z, tile, overlap, 2) - add_mean(z)
    spread = max(means) - min(means)
    assert np.abs(err).max() <= max(abs(m - z.mean()) for m in means) + 1e-5
    jump = max(np.abs(np.diff(err, axis=2)).max(), np.abs(np.diff(err, axis=3)).max())
    assert jump <= spread * math.pi / (2 * overlap * 2) + 1e-5
    hard = tiled_apply(add_mean, z, tile, 0, 2) - add_mean(z)  # no overlap: hard seams
    assert np.abs(np.diff(hard, axis=3)).max() > 3 * jump


@pytest.mark.parametrize("blend", ["cosine", "linear"])
@pytest.mark.parametrize("length,tile,overlap,factor", [(40, 12, 4, 8), (29, 12, 4, 8), (100, 16, 0, 1),
                                                          (64, 32, 8, Fraction(1, 8)), (13, 5, 2, 3)])
def test_weights_sum_to_one_and_have_no_ramp_on_the_border(length, tile, overlap, factor, blend):
    align = Fraction(factor).denominator
    starts = axis_starts(length, tile, overlap, align)
    weights = axis_weights(starts, tile, length, factor, blend)
    size = int(tile * factor)
    total = np.zeros(int(length * factor))
    for s, w in zip(starts, weights):
        assert w.shape == (size,) and (w > 0).all() and (w <= 1).all()
        total[int(s * factor):int(s * factor) + size] += w
    np.testing.assert_allclose(total, 1.0, rtol=0, atol=1e-12)
    assert weights[0][0] == 1.0 and weights[-1][-1] == 1.0  # the image border keeps full weight


def test_edge_tiles_shift_inward_with_the_same_size_and_overlaps_are_spread():
    assert axis_starts(29, 12, 4) == [0, 6, 11, 17]  # 3 tiles cover at most 28 with overlaps >= 4
    assert axis_starts(28, 12, 4) == [0, 8, 16]
    assert axis_starts(12, 12, 4) == [0]
    assert axis_starts(5, 12, 4) == [0]
    assert axis_starts(64, 16, 8, 8) == [0, 8, 16, 24, 32, 40, 48]
    assert axis_starts(21, 12, 4) == [0, 4, 9]  # 2 tiles cover at most 20
    for length in range(13, 80):
        s = axis_starts(length, 12, 4)
        assert s[0] == 0 and s[-1] == length - 12 and all(4 <= s[k] - s[k + 1] + 12 for k in range(len(s) - 1))
    seen = []
    tiled_apply(lambda a: seen.append(a.shape) or a, np.zeros((1, 1, 29, 7), np.float32), 12, 4, 1)
    assert seen == [(1, 1, 12, 7)] * 4  # the narrow axis is one tile of its own length


def test_small_input_is_one_untiled_call():
    calls = []
    x = np.ones((3, 2, 8, 8), np.float32)
    out = tiled_apply(lambda a: calls.append(a) or a * 2, x, 8, 2, 1, max_batch=1)
    assert len(calls) == 1 and calls[0] is x and (out == 2).all()


def test_encoder_tiles_with_two_outputs():
    x = np.random.default_rng(2).random((1, 3, 64, 48), dtype=np.float32)

    def encoder(a):
        assert a.shape[2] % 8 == 0 and a.shape[3] % 8 == 0
        down = a.reshape(a.shape[0], 3, a.shape[2] // 8, 8, a.shape[3] // 8, 8).mean(axis=(3, 5))
        return down, -down

    seen = []
    mean, logvar = tiled_encode(encoder, x, 32, 8, scale=8, progress=lambda d, t: seen.append((d, t)))
    ref_mean, _ = encoder(x)
    np.testing.assert_allclose(mean, ref_mean, atol=1e-6)  # a per-block function is exact under any blend
    np.testing.assert_allclose(logvar, -ref_mean, atol=1e-6)
    assert seen == [(k, 6) for k in range(1, 7)]  # 3 x 2 tiles, starts [0, 16, 32] x [0, 16]


def test_progress_counts_each_tile_and_batches_respect_max_batch():
    z = np.zeros((2, 1, 20, 20), np.float32)
    batches, seen = [], []
    tiled_apply(lambda a: batches.append(len(a)) or a, z, 8, 2, 1, max_batch=4,
                progress=lambda d, t: seen.append((d, t)))
    n = tile_count(z.shape, 8, 2)
    assert n == 2 * 3 * 3
    assert seen == [(k, n) for k in range(1, n + 1)]
    assert sum(batches) == n and max(batches) == 4


@pytest.mark.parametrize("tile,overlap,factor,match", [
    (0, 0, 8, "tile must be a positive multiple of 1"),
    (12, 6, 8, "less than half the tile"),
    (12, -1, 8, "overlap must be a multiple"),
    (36, 8, Fraction(1, 8), "tile must be a positive multiple of 8"),
    (32, 4, Fraction(1, 8), "overlap must be a multiple of 8"),
    (2.5, 0, 1, "tile must be an int"),
    ((8, 8, 8), 0, 1, "tile must be an int"),
    (8, 0, -2, "factor must be a positive number"),
    (8, 0, "x", "factor must be a positive number"),
])
def test_bad_arguments_say_what_was_expected(tile, overlap, factor, match):
    with pytest.raises(InputError, match=match):
        tiled_apply(lambda a: a, np.zeros((1, 1, 64, 64), np.float32), tile, overlap, factor)


def test_bad_inputs_and_bad_function_outputs():
    with pytest.raises(InputError, match=r"expected an array \(N, C, H, W\)"):
        tiled_apply(lambda a: a, np.zeros((64, 64), np.float32), 8, 0, 1)
    with pytest.raises(InputError, match="height must be a positive multiple of 8"):
        tiled_encode(lambda a: a, np.zeros((1, 3, 60, 64), np.float32), 32, 8)
    with pytest.raises(InputError, match="max_batch"):
        tiled_apply(lambda a: a, np.zeros((1, 1, 64, 64), np.float32), 8, 0, 1, max_batch=0)
    with pytest.raises(InputError, match="blend"):
        tiled_apply(lambda a: a, np.zeros((1, 1, 64, 64), np.float32), 8, 0, 1, blend="hann")
    with pytest.raises(OutputError, match=r"expected \(2, C, 16, 16\)"):
        tiled_apply(lambda a: a, np.zeros((1, 1, 64, 64), np.float32), 8, 0, 2, max_batch=2)
    assert check_tile((16, 8), (4, 2)) == ((16, 8), (4, 2))


def test_onnx_conv_decoder_tiled_matches_untiled(tmp_path):
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    from torch import nn
    from torch.export import Dim

    torch.manual_seed(0)
    decoder = nn.Sequential(
        nn.Conv2d(4, 16, 3, padding=1), nn.SiLU(), nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(16, 8, 3, padding=1), nn.SiLU(), nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(8, 3, 3, padding=1)).eval()
    path = tmp_path / "decoder.onnx"
    h, w = Dim("h", min=2, max=256), Dim("w", min=2, max=256)
    torch.onnx.export(decoder, (torch.zeros(2, 4, 8, 8),), str(path), dynamo=True, input_names=["z"],
                      output_names=["x"], dynamic_shapes=({0: Dim("batch"), 2: h, 3: w},),
                      external_data=False, verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(a):
        return session.run(None, {"z": a})[0]

    z = np.random.default_rng(3).standard_normal((1, 4, 40, 30)).astype(np.float32)
    full = run(z)
    tiled = tiled_decode(run, z, 16, 4, scale=4, max_batch=2)
    seams = seam_mask((40, 30), 16, 4, 4)
    spread = float(full.max() - full.min())
    err = np.abs(tiled - full) / spread
    assert seams.any() and (~seams).any()
    assert err[..., ~seams].max() < 1e-5
    assert 0 < err[..., seams].max() < 0.05
    hard = np.abs(tiled_decode(run, z, 16, 0, scale=4) - full) / spread  # no overlap: hard seams
    assert hard.max() > 2 * err.max()
