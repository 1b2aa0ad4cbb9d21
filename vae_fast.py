"""Fast kernels for vae.py's AutoencoderKL: `model.set_fast_kernels(True)` imports this file (only torch) and
gives that model's modules the classes below, which keep their parameters, state-dict keys and hooks, and
compute what the plain modules compute, rounded differently. `set_fast_kernels(False)` gives the plain ones
back. The kernels (BENCHMARKS.md "Fast kernels" measures each):
 - nnpack: CPU fp32 inference runs the 3x3 stride-1 convs through NNPACK's Winograd kernels, fewer multiplies
   than oneDNN's direct convolution but a thread pool that scales worse: only up to `nnpack` torch threads
   (True: 2). NNPACK sizes its pool at its first call in the process and keeps it (ATen's native/NNPACK.cpp),
   so a model takes NNPACK only at the thread count it was switched on at, if the pool has that many threads
   (the first switch in the process makes the pool).
 - subpixel: nearest-2x upsampling + 3x3 conv as one stride-2 transposed conv with summed taps, 4 instead of 9
   multiply-adds per output (kept as nearest + conv where NNPACK takes the conv: as fast there).
 - half_norm: under autocast, GroupNorm in the input's bf16/fp16 (fp32 statistics inside) rather than in
   autocast's fp32 (CUDA): less activation memory kept for backward.
 - attention_chunk: CPU attention over at most this many query-key scores per call (True: 2**26, 256 MB in
   fp32), so that even a non-fused SDPA kernel never holds the whole (HW)^2 score matrix.
 - inplace_act: SiLU in place where autograd does not need its input (inference): a lower peak memory.
"""
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULTS = dict(nnpack=2, subpixel=True, half_norm=True, attention_chunk=2 ** 26, inplace_act=True)


class Conv2d(nn.Conv2d):
    """nn.Conv2d through NNPACK for CPU fp32 inference at `nnpack_threads` torch threads (0: never)."""
    nnpack_threads = 0

    def forward(self, x):
        return self.conv2d(x, self.padding)

    def conv2d(self, x, padding):  # also vae_tiling's call, with padding (0, 0) on windows it padded itself
        if self.uses_nnpack(x):
            return torch._nnpack_spatial_convolution(x.contiguous(), self.weight, self.bias, list(padding))
        return F.conv2d(x, self.weight, self.bias, self.stride, padding)

    def uses_nnpack(self, x):  # not under autograd or torch.compile (inductor has its own CPU convolutions)
        return (self.nnpack_threads == torch.get_num_threads() and x.device.type == "cpu"
                and self.kernel_size == (3, 3) and self.stride == (1, 1)
                and x.dtype == self.weight.dtype == torch.float32 and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling())


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that stays in the input's half dtype under autocast."""

    def forward(self, x):
        dev, w, b = x.device.type, self.weight, self.bias
        if x.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(dev):
            if dev != "cpu":  # CUDA's kernel wants the affine parameters in x's dtype (CPU's takes fp32)
                w, b = w.to(x.dtype), b.to(x.dtype)
            with torch.autocast(dev, enabled=False):
                return F.group_norm(x, self.num_groups, w, b, self.eps)
        return F.group_norm(x, self.num_groups, w, b, self.eps)


class Upsample(nn.Module):
    """vae.Upsample (its `conv`) with nearest-2x + 3x3 conv computed as one sub-pixel transposed conv."""

    def forward(self, x):  # (B, C, H, W) -> (B, C, 2H, 2W)
        conv = self.conv
        if isinstance(conv, Conv2d) and conv.uses_nnpack(x):
            return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return F.conv_transpose2d(x, subpixel_weight(conv.weight), conv.bias, stride=2, padding=1)


def subpixel_weight(w):
    """(Cout, Cin, 3, 3) weight of a 3x3 conv after nearest-2x upsampling -> (Cin, Cout, 4, 4) weight of the
    same conv_transpose2d(stride=2, padding=1). Per axis, taps t0, t1, t2: output row 2i = t0 x[i-1] +
    (t1 + t2) x[i], row 2i+1 = (t0 + t1) x[i] + t2 x[i+1]; conv_transpose2d sums k[o + 1 - 2i] x[i] into
    row o, so k = [t2, t1 + t2, t0 + t1, t0]. Sums in (at least) fp32, rounded once to w's dtype."""
    def taps(t, dim):
        t0, t1, t2 = t.unbind(dim)
        return torch.stack([t2, t1 + t2, t0 + t1, t0], dim)
    return taps(taps(w.to(torch.promote_types(w.dtype, torch.float32)), 2), 3).transpose(0, 1).to(w.dtype)


class Attention(nn.Module):
    """vae.Attention (same layers) with CPU queries in chunks of at most `chunk` scores: each query's row is
    computed on its own, so the result is the same as one call."""
    chunk = 2 ** 26

    def forward(self, x):  # (B, C, H, W) -> (B, C, H, W)
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.to_q(h).unsqueeze(1), self.to_k(h).unsqueeze(1), self.to_v(h).unsqueeze(1)  # one head
        n = q.shape[2]
        step = max(1, self.chunk // n) if x.device.type == "cpu" else n
        h = torch.cat([F.scaled_dot_product_attention(q[:, :, i:i + step], k, v) for i in range(0, n, step)],
                      dim=2)
        h = self.to_out[1](self.to_out[0](h.squeeze(1)))  # (B, HW, C)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


def silu(x):  # in place where autograd does not need the input (inference): a lower peak memory
    return F.silu(x, inplace=not x.requires_grad)


# vae.py's modules by class name (nn.Conv2d, nn.GroupNorm, vae.Upsample, vae.Attention): fast class, kernel
FAST = {"Conv2d": (Conv2d, "nnpack"), "GroupNorm": (GroupNorm, "half_norm"),
        "Upsample": (Upsample, "subpixel"), "Attention": (Attention, "attention_chunk")}


def set_fast_kernels(model, enabled=True, **kernels):
    """Give `model`'s modules the fast classes of the kernels on (each `enabled` unless given; True or a
    number, see above), the plain classes back for the others. Returns {kernel: setting} of those on."""
    unknown = sorted(set(kernels) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown fast kernel(s) {', '.join(unknown)}; known: {', '.join(DEFAULTS)}")
    on = {k: DEFAULTS[k] if v is True else v for k in DEFAULTS if (v := kernels.get(k, enabled))}
    threads = nnpack_threads(on.get("nnpack", 0))
    settings = {"nnpack": dict(nnpack_threads=threads),  # what the fast classes read
                "attention_chunk": dict(chunk=on.get("attention_chunk"))}
    for m in model.modules():
        if "plain_class" in vars(m):  # plain first
            m.__class__ = vars(m).pop("plain_class")
            for name in ("nnpack_threads", "chunk"):
                vars(m).pop(name, None)
        fast, kernel = FAST.get(type(m).__name__, (None, None))
        if kernel in on and (kernel != "nnpack" or (m.kernel_size, m.stride) == ((3, 3), (1, 1))):
            m.plain_class, m.__class__ = type(m), fast
            vars(m).update(settings.get(kernel, {}))
        if getattr(m, "act", None) in (F.silu, silu):
            m.act = silu if "inplace_act" in on else F.silu
    return on


def nnpack_threads(max_threads):
    """The torch thread count at which NNPACK serves a model switched on now: the present one, if NNPACK is
    available, that count is at most `max_threads` and NNPACK's pool has that many threads; else 0 (never)."""
    threads = torch.get_num_threads()
    ok = max_threads and threads <= max_threads and torch._nnpack_available() and pool_threads() == threads
    return threads if ok else 0


@functools.cache
def pool_threads():
    """The size of NNPACK's thread pool, made by this first call (a tiny convolution) at torch's thread
    count."""
    torch._nnpack_spatial_convolution(torch.zeros(1, 1, 3, 3), torch.zeros(1, 1, 3, 3), None, [0, 0])
    return torch.get_num_threads()
