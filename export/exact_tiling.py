"""The stage graphs of exact tiling (see `vaeinfer.exact_tiling`) for diffusers' AutoencoderKL.

diffusers' `Decoder` and `Encoder` are cut at every GroupNorm into stages, each a small torch
module made of the model's own submodules (so its weights and operators are the model's):

    decoder: [post_quant_conv, conv_in] | mid: resnet | attention | resnet | up blocks: resnets
             (the last one's tail: Upsample2D) | conv_norm_out, SiLU, conv_out
    encoder: conv_in | down blocks: resnets (the last one's tail: Downsample2D) | mid | conv_norm_out,
             SiLU, conv_out, quant_conv, (mean, clamped logvar)

A ResnetBlock2D is two stages: A = conv1(act(norm1(x))), B = (shortcut(x) + conv2(act(norm2(h)))) /
output_scale_factor [then the block's up/downsampler]. The attention is three: the q/k/v
projections after its GroupNorm (per pixel), the softmax over all pixels (a weightless graph the
runtime runs per chunk of queries and keys, `vaeinfer.exact_tiling.attention_spec`), and the
output projection plus residual (per pixel). Each stage graph takes its GroupNorm's
statistics (per channel mean and 1/std) as inputs; its halo is the receptive radius of its
convolutions measured at its input resolution. Anything else (another normalisation, a temb,
spatial norm, cross attention, other kernels or paddings) is refused with the reason: the model
is then not of this family and exact tiling is not offered for it.

`export_exact_tiling` traces every stage graph, then runs the runtime's plan with small tiles on
random inputs at two sizes and compares it with the untiled module (error recorded in the slot).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import nn
from torch.export import Dim

from vaeinfer import exact_tiling as et
from vaeinfer.export.graphs import IR_VERSION, OPSET, ExportError, _check_io, _name_axes, strip_unused_initializers, trace
from vaeinfer.export.validate import check_structure
from vaeinfer.spec import BATCH
from vaeinfer.export.writer import sha256

TOLERANCE = 1e-3  # max abs error of the tiled plan against the untiled module (fp32, outputs ~[-1, 1])


class Unsupported(ExportError):
    """The module is not of the family exact tiling handles; the message says why."""


def _need(ok, why: str) -> None:
    if not ok:
        raise Unsupported(f"exact tiling: {why}")


def _conv_radius(conv, what: str) -> int:
    _need(isinstance(conv, nn.Conv2d), f"{what} is {type(conv).__name__}, expected a Conv2d")
    k = conv.kernel_size
    _need(k[0] == k[1] and k[0] % 2 == 1 and conv.stride == (1, 1) and conv.dilation == (1, 1)
          and conv.groups == 1 and conv.padding_mode == "zeros" and conv.padding == ((k[0] - 1) // 2,) * 2,
          f"{what}: expected a 'same' convolution (odd square kernel, stride 1, zero padding), got {conv}")
    return (k[0] - 1) // 2


def _halo(ops, resample: str) -> int:
    """The input halo of a stage: its convolutions' reach from a tile edge that is not the image's,
    carried through the resampling, measured back at the stage's input resolution."""
    d = 0
    for op in ops:
        if op == "up":
            d *= 2
        elif op == "down":
            d = d // 2 + 1
        else:
            d += op
    f = et.RESAMPLES[resample]
    halo = math.ceil(d / f)
    return halo + halo % 2 if resample == "down" else halo


class _Norm(nn.Module):
    """GroupNorm with its statistics given: (x - mean) * rstd * weight + bias, per channel."""

    def __init__(self, gn):
        super().__init__()
        _need(isinstance(gn, nn.GroupNorm), f"expected a GroupNorm, got {type(gn).__name__}")
        self.weight = gn.weight if gn.affine else None
        self.bias = gn.bias if gn.affine else None

    def forward(self, x, mean, rstd):
        # one multiply-add over the activation (per-channel scale and shift first), as torch's
        # own GroupNorm kernel computes it
        scale = rstd if self.weight is None else rstd * self.weight[None, :]
        shift = -mean * scale if self.bias is None else self.bias[None, :] - mean * scale
        return x * scale[:, :, None, None] + shift[:, :, None, None]


class _Chain(nn.Module):
    def __init__(self, *mods):
        super().__init__()
        self.mods = nn.ModuleList([m for m in mods if m is not None])

    def forward(self, x):
        for m in self.mods:
            x = m(x)
        return x


class _ResA(nn.Module):
    def __init__(self, r):
        super().__init__()
        self.norm, self.act, self.conv = _Norm(r.norm1), r.nonlinearity, r.conv1

    def forward(self, x, mean, rstd):
        return self.conv(self.act(self.norm(x, mean, rstd)))


class _ResB(nn.Module):
    def __init__(self, r, tail=None):
        super().__init__()
        self.norm, self.act, self.conv, self.short = _Norm(r.norm2), r.nonlinearity, r.conv2, r.conv_shortcut
        self.osf = float(r.output_scale_factor)
        self.tail = tail

    def forward(self, x, skip, mean, rstd):
        h = self.conv(self.act(self.norm(x, mean, rstd)))
        s = skip if self.short is None else self.short(skip)
        y = (s + h) / self.osf
        return y if self.tail is None else self.tail(y)


def _pointwise(x, linear):
    w = linear.weight[:, :, None, None]
    return nn.functional.conv2d(x, w, linear.bias)


class _QKV(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.norm, self.q, self.k, self.v = _Norm(attn.group_norm), attn.to_q, attn.to_k, attn.to_v

    def forward(self, x, mean, rstd):
        n = self.norm(x, mean, rstd)
        return torch.cat([_pointwise(n, self.q), _pointwise(n, self.k), _pointwise(n, self.v)], dim=1)


class _AttnOut(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.proj, self.residual = attn.to_out[0], bool(attn.residual_connection)
        self.rescale = float(attn.rescale_output_factor)

    def forward(self, o, skip):
        y = _pointwise(o, self.proj)
        if self.residual:
            y = y + skip
        return y / self.rescale


class _AttentionChunk(nn.Module):
    """q (heads, d, queries), k and v (heads, d, keys) -> (o, m, l): see `et.attention_spec`. The
    scores are laid out (queries, keys), so that the row maxima and sums reduce along contiguous
    rows (2.4x faster in onnxruntime than the same graph with the scores laid out (keys, queries),
    measured with 2048 queries and 16384 keys of 512 channels); onnxruntime folds the transposed
    exponentials of the second product into its matrix multiplication (no score-sized copy)."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, q, k, v):
        s = torch.matmul((q * self.scale).transpose(1, 2), k)  # (heads, queries, keys)
        m = s.amax(dim=2)
        e = torch.exp(s - m[:, :, None])
        return torch.matmul(v, e.transpose(1, 2)), m, e.sum(dim=2)


class _Out(nn.Module):
    def __init__(self, coder, quant=None, split: int | None = None):
        super().__init__()
        self.norm, self.act, self.conv, self.quant, self.split = (_Norm(coder.conv_norm_out), coder.conv_act,
                                                                  coder.conv_out, quant, split)

    def forward(self, x, mean, rstd):
        y = self.conv(self.act(self.norm(x, mean, rstd)))
        if self.quant is not None:
            y = self.quant(y)
        if self.split is not None:  # DiagonalGaussianDistribution: logvar clamped to [-30, 20]
            y = torch.cat([y[:, :self.split], torch.clamp(y[:, self.split:], -30.0, 20.0)], dim=1)
        return y


class _Plan:
    """Collects the steps and their modules while walking the model."""

    def __init__(self, prefix: str, inp: str, channels: int):
        self.prefix, self.steps, self.modules = prefix, [], {}
        self.cur, self.ch = inp, channels
        self.input = (inp, channels)

    def conv(self, module, out_ch, ops, norm=None, skip=None, resample="none"):
        i = len(self.steps)
        graph, out = f"exact_{self.prefix}_{i:02d}", f"{self.prefix[0]}{i}"
        norm_t = None if norm is None else (int(norm.num_groups), float(norm.eps))
        step = et.Step("conv", self.cur, self.ch, out, int(out_ch), graph=graph, file=f"{graph}.onnx",
                       sha256="0" * 64, skip=None if skip is None else skip[0],
                       skip_channels=0 if skip is None else skip[1], norm=norm_t, resample=resample,
                       halo=_halo(ops, resample))
        self.steps.append(step)
        self.modules[graph] = module.eval()
        prev = (self.cur, self.ch)
        self.cur, self.ch = out, int(out_ch)
        return prev

    def attention(self, out_ch, heads, scale):
        i = len(self.steps)
        graph, out = f"exact_{self.prefix}_{i:02d}", f"{self.prefix[0]}{i}"
        self.steps.append(et.Step("attention", self.cur, self.ch, out, out_ch, graph=graph, file=f"{graph}.onnx",
                                  sha256="0" * 64, heads=heads, scale=scale))
        self.modules[graph] = _AttentionChunk(scale).eval()
        self.cur, self.ch = out, out_ch

    def resnet(self, r, tail=None, tail_ops=(), resample="none"):
        _need(type(r).__name__ == "ResnetBlock2D", f"expected a ResnetBlock2D, got {type(r).__name__}")
        _need(r.time_emb_proj is None and r.upsample is None and r.downsample is None
              and r.time_embedding_norm in ("default", "group"), "a ResnetBlock2D with a time embedding or resampling")
        if r.conv_shortcut is not None:
            _need(isinstance(r.conv_shortcut, nn.Conv2d) and r.conv_shortcut.kernel_size == (1, 1)
                  and r.conv_shortcut.stride == (1, 1), "a resnet shortcut other than a 1x1 convolution")
        x = self.conv(_ResA(r), r.conv1.out_channels, [_conv_radius(r.conv1, "conv1")], r.norm1)
        out_ch = tail_ops and tail.conv.out_channels or r.conv2.out_channels
        self.conv(_ResB(r, tail), out_ch, [_conv_radius(r.conv2, "conv2"), *tail_ops], r.norm2, skip=x,
                  resample=resample)

    def mid(self, mid):
        _need(type(mid).__name__ == "UNetMidBlock2D", f"expected a UNetMidBlock2D, got {type(mid).__name__}")
        self.resnet(mid.resnets[0])
        for attn, r in zip(mid.attentions, mid.resnets[1:]):
            if attn is not None:
                self.attn(attn)
            self.resnet(r)

    def attn(self, a):
        _need(type(a).__name__ == "Attention" and a.group_norm is not None and a.spatial_norm is None
              and getattr(a, "norm_q", None) is None and getattr(a, "norm_k", None) is None
              and not a.is_cross_attention and type(a.processor).__name__ in ("AttnProcessor2_0", "AttnProcessor"),
              "the mid-block attention is not a self-attention with a GroupNorm and the default processor")
        c = self.ch
        inner, heads = a.to_q.out_features, a.heads
        _need(a.to_q.in_features == c and a.to_k.out_features == inner and a.to_v.out_features == inner
              and a.to_out[0].out_features == c and inner % heads == 0, "attention projections of other sizes")
        head_dim = inner // heads
        _need(abs(float(a.scale) - head_dim ** -0.5) < 1e-9, "an attention scale other than 1/sqrt(head_dim)")
        skip = self.conv(_QKV(a), 3 * inner, [0], a.group_norm)
        self.attention(inner, heads, head_dim ** -0.5)
        self.conv(_AttnOut(a), c, [0], skip=skip)


def _upsampler(block):
    ups = getattr(block, "upsamplers", None)
    if not ups:
        return None
    _need(len(ups) == 1 and type(ups[0]).__name__ == "Upsample2D", "an up block with other upsamplers")
    u = ups[0]
    _need(u.use_conv and not u.use_conv_transpose and u.interpolate and u.norm is None
          and getattr(u, "name", "conv") == "conv", "an Upsample2D other than nearest 2x + conv")
    return u


def _downsampler(block):
    downs = getattr(block, "downsamplers", None)
    if not downs:
        return None
    _need(len(downs) == 1 and type(downs[0]).__name__ == "Downsample2D", "a down block with other downsamplers")
    d = downs[0]
    conv = d.conv
    _need(d.use_conv and d.padding == 0 and d.norm is None and isinstance(conv, nn.Conv2d)
          and conv.kernel_size == (3, 3) and conv.stride == (2, 2) and conv.padding == (0, 0),
          "a Downsample2D other than pad (0, 1, 0, 1) + 3x3 stride-2 conv")
    return d


def _check_coder(coder, name: str):
    _need(type(coder).__name__ == name, f"expected diffusers' {name}, got {type(coder).__name__}")
    _need(isinstance(coder.conv_norm_out, nn.GroupNorm), f"the {name}'s output norm is not a GroupNorm "
          "(a spatial norm, as in MoVQ)")


def decoder_plan(vae) -> _Plan:
    """The decoder's steps (z -> params) of an AutoencoderKL."""
    dec = vae.decoder
    _check_coder(dec, "Decoder")
    pq = getattr(vae, "post_quant_conv", None)
    p = _Plan("decoder", "z", int(vae.config.latent_channels))
    ops = [_conv_radius(dec.conv_in, "conv_in")]
    if pq is not None:
        _need(pq.kernel_size == (1, 1), "a post_quant_conv other than 1x1")
    p.conv(_Chain(pq, dec.conv_in), dec.conv_in.out_channels, ops)
    p.mid(dec.mid_block)
    for block in dec.up_blocks:
        _need(type(block).__name__ == "UpDecoderBlock2D", f"an up block {type(block).__name__}")
        up = _upsampler(block)
        for j, r in enumerate(block.resnets):
            last = j == len(block.resnets) - 1
            if last and up is not None:
                p.resnet(r, up, ["up", _conv_radius(up.conv, "upsampler conv")], "up")
            else:
                p.resnet(r)
    p.conv(_Out(dec), dec.conv_out.out_channels, [_conv_radius(dec.conv_out, "conv_out")], dec.conv_norm_out)
    return p


def encoder_plan(vae) -> _Plan:
    """The encoder's steps (x -> mean, logvar) of an AutoencoderKL."""
    enc = vae.encoder
    _check_coder(enc, "Encoder")
    q = getattr(vae, "quant_conv", None)
    if q is not None:
        _need(q.kernel_size == (1, 1), "a quant_conv other than 1x1")
    c = int(vae.config.latent_channels)
    _need(enc.conv_out.out_channels == 2 * c, "an encoder without double_z (a deterministic encoder)")
    p = _Plan("encoder", "x", int(vae.config.in_channels))
    p.conv(enc.conv_in, enc.conv_in.out_channels, [_conv_radius(enc.conv_in, "conv_in")])
    for block in enc.down_blocks:
        _need(type(block).__name__ == "DownEncoderBlock2D", f"a down block {type(block).__name__}")
        down = _downsampler(block)
        for j, r in enumerate(block.resnets):
            if j == len(block.resnets) - 1 and down is not None:
                p.resnet(r, down, ["down"], "down")
            else:
                p.resnet(r)
    p.mid(enc.mid_block)
    p.conv(_Out(enc, q, c), 2 * c, [_conv_radius(enc.conv_out, "conv_out")], enc.conv_norm_out)
    return p


def _trace_stage(module, step: et.Step) -> bytes:
    """One stage graph's ONNX bytes, checked like every bundle graph. The TorchScript exporter is
    used where this torch has it (a stage is a few plain layers; it traces them some 20x faster
    than the dynamo exporter, which matters for the ~60 stages of an SD-sized model); the dynamo
    exporter otherwise. Either way the graph is validated below, in the plan, against the module."""
    spec = et.stage_spec(step)
    unit = 2 if step.resample == "down" else 1  # "down" stages take even sizes
    sizes = {"height": 6 * unit, "width": 8 * unit, "queries": 6, "keys": 10}
    model = _trace_legacy(module, spec, sizes)
    if model is None:
        if step.type == "attention":
            dims = {a: Dim(f"{step.graph}_{a}", min=1, max=1 << 26) for a in ("queries", "keys")}
        else:
            h, w = Dim(f"{step.graph}_h", min=2, max=8192), Dim(f"{step.graph}_w", min=2, max=8192)
            dims = {"height": unit * h, "width": unit * w} if unit > 1 else {"height": h, "width": w}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the exporter's notes on axis names
            model = trace(module, spec, dims=dims, sizes=sizes)
    strip_unused_initializers(model)
    check_structure(model, spec.role)
    return model.SerializeToString()


def _trace_legacy(module, spec, sizes: dict):
    """The TorchScript exporter's graph with the spec's names and dynamic axes (traced at `sizes`
    of them), or None when this torch has no such exporter."""
    import io

    import onnx

    def example(t):
        shape = [2 if d == BATCH else sizes.get(d, d) for d in t.shape]
        return torch.rand(*shape) + 0.5 if t.name in ("mean", "rstd") else torch.randn(*shape)

    args = tuple(example(t) for t in spec.inputs)
    axes = {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in (*spec.inputs, *spec.outputs)}
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module.eval(), args, buf, dynamo=False, input_names=[t.name for t in spec.inputs],
                              output_names=[t.name for t in spec.outputs], dynamic_axes=axes, opset_version=OPSET,
                              do_constant_folding=True)
    except (TypeError, ImportError, AttributeError, NotImplementedError):
        return None  # no TorchScript exporter here
    except Exception as e:
        raise ExportError(f"{spec.role}: torch.onnx.export failed: {type(e).__name__}: {str(e)[:500]}") from e
    model = onnx.load_from_string(buf.getvalue())
    model.ir_version = min(model.ir_version, IR_VERSION)
    _name_axes(model, spec)
    _check_io(model, spec)
    return model


def export_exact_tiling(vae, downsample: int, progress=None, sizes=((48, 80), (64, 64)),
                        tiles=((16, 24), (24, 16)), tolerance: float = TOLERANCE) -> tuple[dict, dict]:
    """(files, manifest slot) of the exact tiling of a diffusers AutoencoderKL: every stage graph
    traced, then the runtime's plan validated against the untiled module at `sizes` (image pixels)
    with tiles of `tiles` image pixels; Unsupported (an ExportError) when the model is not of the
    family, ExportError when the validation fails."""
    say = progress or (lambda _m: None)
    vae = vae.eval()
    files, slot, validation = {}, {}, {}
    plans = {"decoder": decoder_plan(vae), "encoder": encoder_plan(vae)}
    for direction, p in plans.items():
        say(f"exact tiling: tracing {len(p.steps)} {direction} stage graphs")
        steps = []
        for s in p.steps:
            data = _trace_stage(p.modules[s.graph], s)
            files[s.file] = data
            steps.append(et.Step(**{**s.__dict__, "sha256": sha256(data)}))
        outputs = [["params", steps[-1].out_channels]] if direction == "decoder" else \
            [["mean", steps[-1].out_channels // 2], ["logvar", steps[-1].out_channels // 2]]
        slot[direction] = {"input": p.input[0], "input_channels": p.input[1], "outputs": outputs,
                           "steps": [et.step_json(s) for s in steps]}
    parsed = et.parse_slot(slot)
    for direction in plans:
        validation[direction] = _validate(vae, parsed[direction], files, downsample, direction, sizes, tiles, tolerance)
    slot["validation"] = {"reference": "the diffusers module, untiled", "tolerance": tolerance, **validation}
    return files, slot


def _validate(vae, d: et.Direction, files: dict, f: int, direction: str, sizes, tiles, tolerance) -> list:
    import onnxruntime as ort

    sessions = {}

    def runner(graph):
        if graph not in sessions:
            opts = ort.SessionOptions()
            opts.log_severity_level = 4
            step = d.graphs()[graph]
            sess = ort.InferenceSession(files[step.file], opts, providers=["CPUExecutionProvider"])
            sessions[graph] = lambda feeds, last=False, sess=sess: sess.run(None, feeds)
        return sessions[graph]

    rng = np.random.default_rng(0)
    out = []
    for (h, w), tile in zip(sizes, tiles):
        if direction == "decoder":
            a = rng.standard_normal((1, d.input_channels, h // f, w // f), dtype=np.float32)
            t = (max(1, tile[0] // f), max(1, tile[1] // f))
            with torch.no_grad():
                ref = [vae.decode(torch.from_numpy(a)).sample.numpy()]
        else:
            yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
            a = np.stack([np.sin(6 * yy + c) * np.cos(5 * xx - c) for c in range(d.input_channels)])[None]
            a = (a + 0.1 * rng.standard_normal(a.shape)).clip(-1, 1).astype(np.float32)
            t = tile
            with torch.no_grad():
                dist = vae.encode(torch.from_numpy(a)).latent_dist
                ref = [dist.mean.numpy(), dist.logvar.numpy()]
        got = et.run(d, et.plan(d, a.shape, tile=t), a, runner)
        err = max(float(np.abs(g - r).max()) for g, r in zip(got, ref))
        if not err <= tolerance:
            raise ExportError(f"exact tiling: the {direction}'s tiled plan differs from the untiled module by "
                              f"{err:.2e} at {h}x{w} with tiles {t}, more than {tolerance}")
        out.append({"size": [h, w], "tile": list(t), "max_abs_error": err})
    return out
