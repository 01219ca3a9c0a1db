"""export.subpixel: nearest 2x + 3x3 conv traced as four 2x2 convolutions (same values, fewer
multiply-adds), only while exporting; diffusers' eager module unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers.models.upsampling import Upsample2D  # noqa: E402

from vaeinfer.export import subpixel  # noqa: E402
from vaeinfer.export.exact_tiling import _trace_legacy  # noqa: E402
from vaeinfer.spec import BATCH, GraphSpec, TensorSpec  # noqa: E402

C = 12


def _spec():
    return GraphSpec("up", (TensorSpec("x", "float32", (BATCH, C, "height", "width")),),
                     (TensorSpec("y", "float32", (BATCH, C, "out_height", "out_width")),), batch_buckets=False, variants=False)


@pytest.mark.parametrize("make", [
    lambda: Upsample2D(C, use_conv=True, out_channels=C),  # AutoencoderKL, VQModel
    lambda: torch.nn.Sequential(torch.nn.Upsample(scale_factor=2), torch.nn.Conv2d(C, C, 3, padding=1, bias=False)),  # TAESD
    lambda: torch.nn.Sequential(torch.nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),  # Wan, Qwen-Image
                                torch.nn.Conv2d(C, C, 3, padding=1)),
], ids=["Upsample2D", "Upsample+Conv2d", "nearest-exact+Conv2d"])
def test_traced_as_four_2x2_convolutions_with_the_same_values(make):
    import onnxruntime as ort

    torch.manual_seed(0)
    u = make().eval()
    x = torch.randn(2, C, 5, 7) * 3
    with torch.no_grad():
        before = u(x).numpy()
    assert subpixel.install(u) == 1 and subpixel.install(u) == 0  # once
    with torch.no_grad():
        np.testing.assert_array_equal(u(x).numpy(), before)  # eager: diffusers' own computation
    model = _trace_legacy(u, _spec(), {"height": 6, "width": 8})
    ops = [n.op_type for n in model.graph.node]
    assert "Resize" not in ops and "DepthToSpace" in ops
    assert ops.count("Conv") == 4
    weights = [i for i in model.graph.initializer if len(i.dims) == 4 and i.dims[2] > 1]
    assert len(weights) == 4 and all(tuple(w.dims) == (C, C, 2, 2) for w in weights)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for shape in ((2, C, 5, 7), (1, C, 1, 1), (1, C, 2, 9)):  # odd, single pixel, a thin strip: the borders
        xs = torch.randn(*shape) * 3
        with torch.no_grad():
            ref = u(xs).numpy()
        got = session.run(None, {"x": xs.numpy()})[0]
        assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("make", [
    lambda: Upsample2D(C, use_conv=False),  # no conv
    lambda: Upsample2D(C, use_conv_transpose=True),
    lambda: Upsample2D(C, use_conv=True, kernel_size=5, padding=2),  # not 3x3
    lambda: torch.nn.Sequential(torch.nn.Upsample(scale_factor=2, mode="bilinear"), torch.nn.Conv2d(C, C, 3, padding=1)),
    lambda: torch.nn.Sequential(torch.nn.Upsample(scale_factor=2), torch.nn.ReLU(), torch.nn.Conv2d(C, C, 3, padding=1)),
])
def test_other_upsamplers_are_left_as_they_are(make):
    u = make().eval()
    assert subpixel.install(u) == 0 and not any(hasattr(m, "subpixel") for m in u.modules())


def test_the_phase_kernels_sum_the_taps_that_read_one_pixel():
    conv = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.arange(9.0).reshape(1, 1, 3, 3))  # rows [0 1 2] [3 4 5] [6 7 8]
    s = subpixel.SubpixelConv(conv)
    assert s.weight_00[0, 0].tolist() == [[0, 1 + 2], [3 + 6, 4 + 5 + 7 + 8]]
    assert s.weight_11[0, 0].tolist() == [[0 + 1 + 3 + 4, 2 + 5], [6 + 7, 8]]
