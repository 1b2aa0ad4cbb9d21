"""Tiled encode/decode for vae.py's AutoencoderKL (model.enable_tiling() imports this file; it imports torch).

mode="exact" (the default): seam-free. Tiled VAEs leave seams because GroupNorm normalises with the mean and
variance of the whole image, which one tile does not know (and the mid-block attention looks at the whole
latent). Blending overlapping tiles (diffusers, mode="blend") softens the step but not the colour/contrast
shift. Here the network runs layer by layer over the whole image, and only the local operations run tile by
tile:
 - each conv (with the GroupNorm-apply and activation before it) is computed per output tile from an input
   window one receptive field larger (1 pixel each side for a 3x3 conv); where the window leaves the image it
   is padded with zeros *after* the norm and activation, which is what the untiled conv's padding sees. The
   output tile is written into the full-size activation as is: nothing blended, nothing recomputed but the
   1-pixel halos;
 - as a conv's output tiles are written, their per-(image, group) means and variances are merged exactly
   (GroupStats), so the next GroupNorm normalises every tile with whole-image statistics, applied as
   x * scale + shift in fp32 (safe for fp16/bf16 activations);
 - a resnet is two sweeps over the tiles (conv1; then conv2 + shortcut) and keeps two full-size activations,
   its input and conv1's output; its output overwrites its input, since each output tile reads the input only
   at its own pixels (the halo comes from conv1's output);
 - the mid-block attention runs on the whole latent (1/64 of the image's pixels).
The result equals the untiled model up to float rounding, at ~1x its time. Memory grows with the image (about
two full-size activations, against the untiled forward's several); on a GPU the full-size activations over 1
GiB are "parked" in CPU memory, so GPU memory is bounded by the tile and latent sizes. Inference only.

mode="blend": diffusers' scheme, each tile through the whole network and overlapping tiles blended linearly:
constant memory whatever the image size, but tiles show seams and colour shifts.
"""
import math

import torch
import torch.nn.functional as F


def check_options(tile, overlap, mode, offload, downsample_factor):
    """enable_tiling()'s arguments, checked before the model takes them."""
    if mode not in ("exact", "blend"):
        raise ValueError(f"tiling mode must be 'exact' or 'blend', got {mode!r}")
    if offload not in (None, True, False):
        raise ValueError(f"offload must be None (auto), True or False, got {offload!r}")
    if not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile_sample_size must be a positive number of pixels, got {tile!r}")
    if mode == "blend" and tile % (2 * downsample_factor):
        raise ValueError(f"blended tiling needs tile_sample_size a multiple of {2 * downsample_factor}")
    if overlap is not None and not 0.0 <= overlap < 1.0:
        raise ValueError("tile_overlap must be in [0, 1)")


def encode(model, x):  # (B, 3, H, W) -> (B, 2 * latent, H/8, W/8) moments
    if model.tile_mode == "blend":
        return blend(model._encode, x, model.tile_sample_size, 1 / model.downsample_factor,
                     model.tile_overlap)
    return _exact(model, x, ExactTiler.encode)


def decode(model, z):  # (B, latent, h, w) -> (B, 3, 8h, 8w)
    if model.tile_mode == "blend":
        tile = model.tile_sample_size // model.downsample_factor
        return blend(model._decode, z, tile, model.downsample_factor, model.tile_overlap)
    return _exact(model, z, ExactTiler.decode)


def _exact(model, x, run):
    if x.requires_grad and torch.is_grad_enabled():
        raise ValueError("exact tiling is for inference (it overwrites activations in place): use "
                         "enable_tiling(mode='blend') or disable_tiling() to backpropagate through the VAE")
    with torch.no_grad():
        return run(ExactTiler(model, x), x)


# ----------------------------------------------------------------------------------------------------------
# mode="blend"


def blend(fn, x, tile, scale, overlap):
    """Run `fn` (the untiled encode or decode: each tile fits) on overlapping `tile`-sized windows of x and
    blend the outputs with linear ramps. `scale` is output size / input size (8 for decoding, 1/8 for
    encoding). Tiles start every tile * (1 - overlap) pixels and the last one is aligned to the border, so
    every tile is full-sized."""
    B, _, H, W = x.shape
    stride = max(int(tile * (1 - overlap)), 1)
    out = weight = None
    for y0 in _tile_starts(H, tile, stride):
        for x0 in _tile_starts(W, tile, stride):
            t = fn(x[:, :, y0:y0 + tile, x0:x0 + tile]).float()
            if out is None:
                out = x.new_zeros((B, t.shape[1], round(H * scale), round(W * scale)), dtype=torch.float32)
                weight = x.new_zeros((1, 1) + out.shape[2:], dtype=torch.float32)
            oy, ox, th, tw = round(y0 * scale), round(x0 * scale), t.shape[2], t.shape[3]
            ramp = round((tile - stride) * scale)
            w = _ramp(th, ramp, y0 > 0, y0 + tile < H, t.device)[:, None] * \
                _ramp(tw, ramp, x0 > 0, x0 + tile < W, t.device)[None, :]
            out[:, :, oy:oy + th, ox:ox + tw] += t * w
            weight[:, :, oy:oy + th, ox:ox + tw] += w
    return (out / weight).to(x.dtype)


def _tile_starts(size, tile, stride):
    if size <= tile:
        return [0]
    return list(range(0, size - tile, stride)) + [size - tile]


def _ramp(n, ramp, fade_in, fade_out, device):
    """Blend weights along one tile axis: rising over `ramp` pixels where a neighbour overlaps, else flat
    1."""
    w = torch.ones(n, device=device)
    if ramp > 0:
        r = (torch.arange(ramp, device=device, dtype=torch.float32) + 0.5) / ramp
        if fade_in:
            w[:ramp] = torch.minimum(w[:ramp], r)
        if fade_out:
            w[-ramp:] = torch.minimum(w[-ramp:], r.flip(0))
    return w


# ----------------------------------------------------------------------------------------------------------
# mode="exact" (see the module docstring)


class GroupStats:
    """Mean and variance per (image, group) of a tensor seen tile by tile: per-tile moments merged exactly
    with Chan et al.'s parallel update (including the between-tile term), in float64."""

    def __init__(self, groups):
        self.groups, self.n, self.mean, self.m2 = groups, 0, None, None

    def add(self, t):  # t: (B, C, h, w), any dtype; the tile's moments are taken in fp32 (or fp64)
        t = t.to(torch.promote_types(t.dtype, torch.float32))
        B, C, h, w = t.shape
        # GroupNorm's own kernel gives the tile's per-group mean and 1/std (one vectorised Welford pass,
        # faster than torch.var_mean on CPU: BENCHMARKS.md); its normalised output is discarded. eps=0: var =
        # rstd^-2.
        _, mean, rstd = torch.native_group_norm(t, None, None, B, C, h * w, self.groups, 0.0)
        n = C // self.groups * h * w
        mean, m2 = mean.double().view(B, self.groups), rstd.double().pow(-2).view(B, self.groups) * n
        if self.n == 0:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total, delta = self.n + n, mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.n * n / total)
        self.n = total

    def affine(self, norm):
        """(scale, shift), (B, C, 1, 1) fp32 (fp64 for a fp64 model) each, such that norm(x) == x * scale +
        shift."""
        per_group = norm.num_channels // self.groups
        rstd = torch.rsqrt(self.m2 / self.n + norm.eps).repeat_interleave(per_group, 1)
        scale = rstd * norm.weight.double()
        shift = norm.bias.double() - self.mean.repeat_interleave(per_group, 1) * scale
        dtype = torch.promote_types(norm.weight.dtype, torch.float32)
        return scale.to(dtype)[:, :, None, None], shift.to(dtype)[:, :, None, None]


class ExactTiler:
    """Runs the encoder or the decoder layer by layer, each conv tile by tile (see the module docstring)."""

    def __init__(self, model, x):
        self.model, self.device, self.dtype, self.batch = model, x.device, x.dtype, x.shape[0]
        self.groups, self.width = model.config["norm_num_groups"], model.config["block_out_channels"][0]
        self.tile, self.offload = model.tile_sample_size, model.tile_offload

    def empty(self, channels, h, w):
        """A full-size activation: on the model's device, or parked in CPU memory (GPU: see enable_tiling)."""
        nbytes = self.batch * channels * h * w * self.dtype.itemsize
        park = self.device.type != "cpu" and (self.offload or (self.offload is None and nbytes > 2 ** 30))
        device = "cpu" if park else self.device
        return torch.empty(self.batch, channels, h, w, dtype=self.dtype, device=device)

    def conv(self, conv, src, in_hw, out_hw, pad=1, add=None, out=None, stats=True):
        """conv's output (and its GroupStats), computed tile by tile. src(dst, y0, y1, x0, x1) writes the
        conv's input at rows y0:y1, columns x0:x1 (inside the image) into dst; add(y0, y1, x0, x1) returns
        what to add to an output tile (the shortcut)."""
        (H, W), (oh, ow) = in_hw, out_hw
        k, s = conv.kernel_size[0], conv.stride[0]
        out = self.empty(conv.out_channels, oh, ow) if out is None else out
        st = GroupStats(self.groups) if stats else None
        # Tiles of n^2 pixels, n^2 * (input + output channels) = tile_sample_size^2 * `width` (128 for SD)
        # values: e.g. 362^2 for a 128 -> 128 conv when tile_sample_size is 512. Wider, low-resolution layers
        # get tiles of fewer pixels (still covering more of the image); the memory of a tile is the same at
        # every layer.
        n = max(1, int(self.tile * math.sqrt(self.width / (conv.in_channels + conv.out_channels))))
        for y0 in range(0, oh, n):
            for x0 in range(0, ow, n):
                y1, x1 = min(y0 + n, oh), min(x0 + n, ow)
                iy0, iy1 = y0 * s - pad, (y1 - 1) * s - pad + k
                ix0, ix1 = x0 * s - pad, (x1 - 1) * s - pad + k
                top, bottom, left, right = max(-iy0, 0), max(iy1 - H, 0), max(-ix0, 0), max(ix1 - W, 0)
                h, w = iy1 - iy0, ix1 - ix0
                a = torch.empty(self.batch, conv.in_channels, h, w, dtype=self.dtype, device=self.device)
                for edge in (a[:, :, :top], a[:, :, h - bottom:], a[:, :, :, :left], a[:, :, :, w - right:]):
                    edge.zero_()  # the conv's zero padding, where the window leaves the image
                src(a[:, :, top:h - bottom, left:w - right], iy0 + top, iy1 - bottom, ix0 + left, ix1 - right)
                # The layer's conv on the window padded here: its fast kernel's (vae_fast.Conv2d) if it has
                # one
                t = conv.conv2d(a, (0, 0)) if hasattr(conv, "conv2d") else \
                    F.conv2d(a, conv.weight, conv.bias, conv.stride)
                if add is not None:
                    t += add(y0, y1, x0, x1)
                if st is not None:
                    st.add(t)
                out[:, :, y0:y1, x0:x1] = t
        return out, st

    # Conv inputs, one window at a time, written into the (padded) window buffer
    def window(self, x):
        return lambda dst, y0, y1, x0, x1: dst.copy_(x[:, :, y0:y1, x0:x1])

    def normed(self, x, norm, stats, act):  # act(GroupNorm(x)) with whole-image statistics, computed in fp32
        scale, shift = stats.affine(norm)

        def src(dst, y0, y1, x0, x1):
            v = x[:, :, y0:y1, x0:x1].to(self.device, scale.dtype)
            v = torch.addcmul(shift, v, scale, out=dst if dst.dtype == scale.dtype else None)
            dst.copy_(act(v))  # a no-op when both steps ran in place in dst
        return src

    def upsampled(self, x):  # x upsampled 2x (nearest), never materialised whole
        def src(dst, y0, y1, x0, x1):
            a = x[:, :, y0 // 2:(y1 + 1) // 2, x0 // 2:(x1 + 1) // 2].to(self.device)
            a = F.interpolate(a, scale_factor=2.0, mode="nearest")
            dst.copy_(a[:, :, y0 % 2:y0 % 2 + y1 - y0, x0 % 2:x0 % 2 + x1 - x0])
        return src

    # Layers
    def resnet(self, r, x, stats):
        _, c, H, W = x.shape
        h, h_stats = self.conv(r.conv1, self.normed(x, r.norm1, stats, r.act), (H, W), (H, W))

        def shortcut(y0, y1, x0, x1):
            t = x[:, :, y0:y1, x0:x1].to(self.device)
            return r.conv_shortcut(t) if r.conv_shortcut is not None else t
        co = r.conv2.out_channels
        out = x[:, :co] if co <= c else None  # overwrite x in place: nothing reads it again (see above)
        src = self.normed(h, r.norm2, h_stats, r.act)
        return self.conv(r.conv2, src, (H, W), (H, W), add=shortcut, out=out)

    def mid(self, mid, x, stats):
        x, stats = self.resnet(mid.resnets[0], x, stats)
        for attention in mid.attentions:  # the whole latent at once: attention is global
            x = attention(x.to(self.device))
            stats = GroupStats(self.groups)
            stats.add(x)
        return self.resnet(mid.resnets[1], x, stats)

    # GroupNorm -> act -> conv_out, into a tensor on the device
    def out_conv(self, conv, x, norm, stats, act):
        out = torch.empty(self.batch, conv.out_channels, *x.shape[2:], dtype=self.dtype, device=self.device)
        src = self.normed(x, norm, stats, act)
        return self.conv(conv, src, x.shape[2:], x.shape[2:], out=out, stats=False)[0]

    def encode(self, x):  # (B, 3, H, W) -> moments (B, 2 * latent, H/8, W/8)
        enc = self.model.encoder
        h, stats = self.conv(enc.conv_in, self.window(x), x.shape[2:], x.shape[2:])
        for block in enc.down_blocks:
            for r in block.resnets:
                h, stats = self.resnet(r, h, stats)
            # stride 2 after (0, 1, 0, 1) padding: pad=0, the window adds the rest
            for down in block.downsamplers:
                H, W = h.shape[2:]
                h, stats = self.conv(down.conv, self.window(h), (H, W), (H // 2, W // 2), pad=0)
        h, stats = self.mid(enc.mid_block, h, stats)
        moments = self.out_conv(enc.conv_out, h, enc.conv_norm_out, stats, enc.act)
        return self.model.quant_conv(moments) if self.model.quant_conv is not None else moments

    def decode(self, z):  # (B, latent, h, w) -> (B, 3, 8h, 8w)
        dec = self.model.decoder
        if self.model.post_quant_conv is not None:
            z = self.model.post_quant_conv(z)
        x, stats = self.conv(dec.conv_in, self.window(z), z.shape[2:], z.shape[2:])
        x, stats = self.mid(dec.mid_block, x, stats)
        for block in dec.up_blocks:
            for r in block.resnets:
                x, stats = self.resnet(r, x, stats)
            for up in block.upsamplers:
                H, W = x.shape[2:]
                x, stats = self.conv(up.conv, self.upsampled(x), (2 * H, 2 * W), (2 * H, 2 * W))
        return self.out_conv(dec.conv_out, x, dec.conv_norm_out, stats, dec.act)
