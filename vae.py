"""The Stable Diffusion 1.5 VAE (AutoencoderKL, "kl-f8") in plain PyTorch.

Numerically identical to `diffusers.AutoencoderKL` on the same weights, with the same state-dict keys, so
diffusers-format folders and hub repositories load directly. (Two faster computations round differently, within
~3e-5 of diffusers' output: NNPACK's convolutions for CPU fp32 inference and the upsamplers as one transposed conv;
`vae.CPU_NNPACK = vae.SUBPIXEL_UPSAMPLE = False` makes ours bit-identical on CPU: see the comments on them.)
This file imports only torch at module level (safetensors / huggingface_hub are imported inside the functions
that need them): copy it alone into your project if you like.

    from vae import AutoencoderKL
    vae = AutoencoderKL.from_pretrained("stabilityai/sd-vae-ft-mse").eval()
    latents = vae.encode_to_latent(images)          # images in [-1, 1], (B, 3, H, W) -> (B, 4, H/8, W/8)
    images = vae.decode_from_latent(latents)         # back to (B, 3, H, W) in about [-1, 1]

Architecture (LDM's `ldm/modules/diffusionmodules/model.py`, as re-organised by diffusers):
  Encoder: conv_in -> down blocks (resnets, stride-2 conv except the last) -> mid (resnet, attention, resnet)
           -> GroupNorm -> SiLU -> conv_out to 2 x latent channels (mean and log-variance)
  Decoder: conv_in -> mid -> up blocks (layers_per_block + 1 resnets, nearest-2x + conv except the last)
           -> GroupNorm -> SiLU -> conv_out
The blocks are built bottom-up: ResnetBlock, Attention, Downsample, Upsample, then the blocks, then the model.
"""
import contextlib
import json
import math
import os
import tempfile
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# SD 1.5's VAE config (runwayml/stable-diffusion-v1-5 vae/config.json, stabilityai/sd-vae-ft-mse).
DEFAULT_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,  # LDM's scale_factor for SD 1.x: 1 / std of the latents over the training set
    shift_factor=None,
    latents_mean=None,
    latents_std=None,
    force_upcast=True,
    use_quant_conv=True,
    use_post_quant_conv=True,
    mid_block_add_attention=True,
)
GN_EPS = 1e-6  # every GroupNorm in the LDM autoencoder uses eps=1e-6 (Normalize() in model.py)
ATTENTION_CHUNK = 2 ** 26  # CPU attention: at most this many query-key scores per call (256 MB in fp32)
ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu, "mish": F.mish}
# CPU fp32 inference runs the 3x3 stride-1 convolutions (55 of SD's 66) through NNPACK's Winograd kernels instead
# of oneDNN's direct ones: far fewer multiplies; encode+decode 256^2 on 2 cores in 0.62-0.68x the time (0.56-0.58x
# diffusers', BENCHMARKS.md).
# The price is rounding: ~1e-4 relative per conv, ~3e-5 max on SD's decoded images in [-1, 1], far below what
# fp16/bf16 inference changes, and workspace outside PyTorch's allocator (+1.9 GB for an untiled 1024^2 decode;
# tiling bounds it). Set vae.CPU_NNPACK = False (and SUBPIXEL_UPSAMPLE, below) for bit-for-bit equality with
# diffusers on CPU.
# (Training, GPUs, other dtypes and torch.compile take F.conv2d.)
CPU_NNPACK = True
# Nearest-2x upsampling followed by a 3x3 conv (the decoder's three Upsample layers, 28% of its FLOPs) equals one
# stride-2 transposed conv with a 4x4 kernel whose taps are sums of the 3x3 taps (_subpixel_weight): each output
# pixel then costs 4 multiply-adds per channel pair instead of 9, and the 4x larger upsampled activation is never
# written. Decoder FLOPs at 512^2: 2.51 -> 2.13 TFLOP. On 2 CPU cores: decode 256^2 1.13x faster in bf16 (1.16x fp32
# with NNPACK off), a bf16 256^2 training step 1.08x (BENCHMARKS.md). Exact in real arithmetic; in floats the sums
# round differently (fp32: 3.7e-6 max abs from diffusers' decoded image). Where CPU_NNPACK applies, nearest +
# NNPACK's Winograd 3x3 is about as fast (measured per layer) and is kept.
# Set vae.SUBPIXEL_UPSAMPLE = False (and CPU_NNPACK = False) for diffusers' exact sequence of operations.
SUBPIXEL_UPSAMPLE = True
# Under CUDA autocast torch runs GroupNorm in fp32 (it is on autocast's fp32 list): a cast of the bf16/fp16 input to
# fp32, an fp32 output, an fp32 SiLU and a cast back for the next conv -- on the largest activations, with fp32
# copies kept for backward. The GroupNorm kernels accumulate half inputs' statistics in fp32 anyway, so ours runs in
# the input's dtype, as CPU autocast and a bf16 model already do: the normalised output is rounded to bf16/fp16
# before the activation rather than after it (what guided-diffusion's GroupNorm32 does too). Kept for backward per
# normalised element (GroupNorm's, SiLU's and the next conv's inputs): 2+2+2 bytes instead of 4+4+2. CPU autocast
# already leaves GroupNorm in bf16 (ours computes exactly that there), so this changes CUDA only. Set False for
# autocast's fp32 GroupNorm. Its CUDA speed is not measured yet: bench.py's train section times both on a GPU.
HALF_NORM_UNDER_AUTOCAST = True


def _nnpack(x, weight, stride=1):
    """Whether CPU_NNPACK's convolution serves this conv: CPU fp32 inference, 3x3, stride 1, torch.compile not
    tracing (inductor has its own CPU convolutions), NNPACK compiled into this torch build."""
    return (CPU_NNPACK and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and
            weight.shape[-2:] == (3, 3) and stride in (1, (1, 1)) and not torch.is_grad_enabled() and
            not torch.compiler.is_compiling() and torch._nnpack_available())


def _conv2d(x, weight, bias, stride=1, padding=0):
    """F.conv2d, or NNPACK's convolution where CPU_NNPACK says so (the tiler calls this too)."""
    if _nnpack(x, weight, stride):
        pad = [padding] * 2 if isinstance(padding, int) else list(padding)
        return torch._nnpack_spatial_convolution(x.contiguous(), weight, bias, pad)
    return F.conv2d(x, weight, bias, stride, padding)


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, same state-dict keys) computed by _conv2d. This model never sets groups or
    dilation, so they are not passed on."""

    def forward(self, x):
        return _conv2d(x, self.weight, self.bias, self.stride, self.padding)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters and keys) that stays in the input's dtype under autocast:
    see HALF_NORM_UNDER_AUTOCAST."""

    def forward(self, x):
        if (HALF_NORM_UNDER_AUTOCAST and x.dtype in (torch.float16, torch.bfloat16)
                and torch.is_autocast_enabled(x.device.type)):
            w, b = self.weight, self.bias
            if x.device.type != "cpu":  # CUDA's kernel wants the affine parameters in x's dtype (CPU's takes fp32)
                w, b = w.to(x.dtype), b.to(x.dtype)
            with torch.autocast(x.device.type, enabled=False):
                return F.group_norm(x, self.num_groups, w, b, self.eps)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def _act(name, x):
    # In-place activation halves peak memory at inference; under autograd the input is still needed.
    if name in ("silu", "swish") and not x.requires_grad:
        return F.silu(x, inplace=True)
    return ACTIVATIONS[name](x)


# ----------------------------------------------------------------------------------------------------------
# Leaf blocks


class ResnetBlock(nn.Module):
    """GroupNorm -> act -> conv3x3 -> GroupNorm -> act -> (dropout) -> conv3x3, plus a (1x1-conv) shortcut."""

    def __init__(self, in_ch, out_ch, groups, act_fn="silu", dropout=0.0):
        super().__init__()
        self.act_fn = act_fn
        self.norm1 = GroupNorm(groups, in_ch, eps=GN_EPS)
        self.conv1 = Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = GroupNorm(groups, out_ch, eps=GN_EPS)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x):  # (B, Cin, H, W) -> (B, Cout, H, W)
        h = self.conv1(_act(self.act_fn, self.norm1(x)))
        h = _act(self.act_fn, self.norm2(h))  # rebinding h frees conv1's output before conv2 runs: a lower peak
        h = self.conv2(self.dropout(h))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Module):
    """Single-head self-attention over all H*W positions (the VAE's mid block), with a residual connection.

    Linear q/k/v/out layers as diffusers stores them (LDM used 1x1 convs: same weights, reshaped)."""

    def __init__(self, channels, groups):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels, eps=GN_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])  # keys "to_out.0.*"

    def forward(self, x):  # (B, C, H, W) -> (B, C, H, W)
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.to_q(h).unsqueeze(1), self.to_k(h).unsqueeze(1), self.to_v(h).unsqueeze(1)  # one head
        # Fused attention: on GPU the flash / memory-efficient kernels never hold the (HW)^2 score matrix and keep
        # the softmax in fp32. On CPU the queries go in chunks of at most ATTENTION_CHUNK scores, so that even a
        # non-fused kernel (torch < 2.2) stays small on a large latent; each query's row is computed on its own,
        # so chunking does not change the result.
        n = q.shape[2]
        step = max(1, ATTENTION_CHUNK // n) if x.device.type == "cpu" else n
        h = torch.cat([F.scaled_dot_product_attention(q[:, :, i:i + step], k, v) for i in range(0, n, step)], 2)
        h = h.squeeze(1)
        h = self.to_out[1](self.to_out[0](h))  # (B, HW, C)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after asymmetric (0, 1, 0, 1) padding: LDM's choice, which diffusers keeps."""

    def __init__(self, channels):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):  # (B, C, H, W) -> (B, C, H/2, W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv: one transposed conv (SUBPIXEL_UPSAMPLE)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):  # (B, C, H, W) -> (B, C, 2H, 2W)
        if SUBPIXEL_UPSAMPLE and not _nnpack(x, self.conv.weight):
            return F.conv_transpose2d(x, _subpixel_weight(self.conv.weight), self.conv.bias, stride=2, padding=1)
        return self.conv(_nearest2x(x))


def _subpixel_weight(w):
    """(Cout, Cin, 3, 3) weight of a 3x3 conv after nearest-2x upsampling -> (Cin, Cout, 4, 4) weight of the
    equivalent conv_transpose2d(stride=2, padding=1).

    Along one axis with taps t0, t1, t2 (offsets -1, 0, +1): output row 2i reads upsampled rows 2i-1, 2i, 2i+1, i.e.
    input rows i-1, i, i, so it is t0 * x[i-1] + (t1 + t2) * x[i]; output row 2i+1 is (t0 + t1) * x[i] + t2 * x[i+1].
    conv_transpose2d gives output row o the sum of k[o + 1 - 2i] * x[i], so k = [t2, t1 + t2, t0 + t1, t0]; the same
    along columns. The sums are taken in (at least) fp32 and rounded once to the weight's dtype."""
    def taps(t, dim):
        t0, t1, t2 = t.unbind(dim)
        return torch.stack([t2, t1 + t2, t0 + t1, t0], dim)
    w32 = w.to(torch.promote_types(w.dtype, torch.float32))
    return taps(taps(w32, 2), 3).transpose(0, 1).to(w.dtype)


def _nearest2x(x):
    if x.dtype == torch.bfloat16 and x.shape[0] >= 64:
        # upsample_nearest2d has no bf16 kernel for large batches on some builds (as diffusers notes)
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(x.dtype)
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


# ----------------------------------------------------------------------------------------------------------
# Blocks (diffusers' DownEncoderBlock2D, UpDecoderBlock2D, UNetMidBlock2D without time embedding)


class DownBlock(nn.Module):
    def __init__(self, in_ch, out_ch, num_layers, groups, act_fn, add_downsample):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups, act_fn) for i in range(num_layers)])
        self.downsamplers = nn.ModuleList([Downsample(out_ch)]) if add_downsample else None

    def forward(self, x):  # (B, Cin, H, W) -> (B, Cout, H/2, W/2), or (B, Cout, H, W) for the last block
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpBlock(nn.Module):
    def __init__(self, in_ch, out_ch, num_layers, groups, act_fn, add_upsample):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups, act_fn) for i in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if add_upsample else None

    def forward(self, x):  # (B, Cin, H, W) -> (B, Cout, 2H, 2W), or (B, Cout, H, W) for the last block
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    def __init__(self, channels, groups, act_fn, add_attention=True):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups, act_fn) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(channels, groups)]) if add_attention else None

    def forward(self, x):  # (B, C, H, W) -> (B, C, H, W)
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


def _run(module, x, use_checkpoint):
    # Non-reentrant checkpointing: recompute the block in backward, keep only its input (works with autograd.grad,
    # which the adaptive GAN weight uses).
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(module, x, use_reentrant=False)
    return module(x)


class Encoder(nn.Module):
    def __init__(self, in_channels, latent_channels, block_out_channels, layers_per_block, groups, act_fn,
                 mid_attention=True):
        super().__init__()
        self.act_fn = act_fn
        self.gradient_checkpointing = False
        ch = block_out_channels
        self.conv_in = Conv2d(in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownBlock(ch[max(i - 1, 0)], ch[i], layers_per_block, groups, act_fn, add_downsample=i < len(ch) - 1)
            for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], groups, act_fn, mid_attention)
        self.conv_norm_out = GroupNorm(groups, ch[-1], eps=GN_EPS)
        self.conv_out = Conv2d(ch[-1], 2 * latent_channels, 3, padding=1)  # "double_z": mean and logvar

    def forward(self, x):  # (B, 3, H, W) -> (B, 2 * latent, H / 2^(n-1), W / 2^(n-1))
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = _run(block, x, self.gradient_checkpointing)
        x = _run(self.mid_block, x, self.gradient_checkpointing)
        return self.conv_out(_act(self.act_fn, self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, latent_channels, out_channels, block_out_channels, layers_per_block, groups, act_fn,
                 mid_attention=True):
        super().__init__()
        self.act_fn = act_fn
        self.gradient_checkpointing = False
        ch = list(reversed(block_out_channels))
        self.conv_in = Conv2d(latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], groups, act_fn, mid_attention)
        self.up_blocks = nn.ModuleList([
            UpBlock(ch[max(i - 1, 0)], ch[i], layers_per_block + 1, groups, act_fn, add_upsample=i < len(ch) - 1)
            for i in range(len(ch))])
        self.conv_norm_out = GroupNorm(groups, ch[-1], eps=GN_EPS)
        self.conv_out = Conv2d(ch[-1], out_channels, 3, padding=1)

    def forward(self, z):  # (B, latent, h, w) -> (B, 3, h * 2^(n-1), w * 2^(n-1))
        x = self.conv_in(z)
        x = _run(self.mid_block, x, self.gradient_checkpointing)
        for block in self.up_blocks:
            x = _run(block, x, self.gradient_checkpointing)
        return self.conv_out(_act(self.act_fn, self.conv_norm_out(x)))


# ----------------------------------------------------------------------------------------------------------
# Posterior and outputs


class DiagonalGaussianDistribution:
    """N(mean, diag(exp(logvar))) from the encoder's 2C channels (LDM's distributions.py)."""

    def __init__(self, parameters, deterministic=False):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        # The clamp keeps exp() finite for untrained or diverging encoders (LDM and diffusers use the same bounds).
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.logvar = torch.zeros_like(self.mean)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator=None):
        # Draw on the generator's device (as diffusers' randn_tensor does) so a CPU generator reproduces on any device.
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self):
        return self.mean

    def kl(self, other=None):  # (B,): KL summed over C, H, W
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        if other is None:  # against N(0, I)
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum((self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0
                               - self.logvar + other.logvar, dim=[1, 2, 3])

    def nll(self, sample, dims=(1, 2, 3)):  # (B,): negative log-likelihood of `sample`
        if self.deterministic:
            return torch.zeros(sample.shape[0], device=sample.device)
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var,
                               dim=list(dims))


@dataclass
class EncoderOutput:
    latent_dist: DiagonalGaussianDistribution


@dataclass
class DecoderOutput:
    sample: torch.Tensor
    latent_dist: DiagonalGaussianDistribution = None  # set by forward(), so training needs one forward only


# ----------------------------------------------------------------------------------------------------------
# Weight files


LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _rename_legacy_keys(state_dict):
    """Older hub repositories store the mid-block attention as query/key/value/proj_attn (diffusers < 0.14)."""
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if "attentions" in parts and len(parts) >= 2 and parts[-2] in LEGACY_ATTENTION_NAMES:
            key = ".".join(parts[:-2] + [LEGACY_ATTENTION_NAMES[parts[-2]], parts[-1]])
            if value.ndim == 4:  # 1x1-conv shaped (C, C, 1, 1) -> linear (C, C)
                value = value[:, :, 0, 0]
        out[key] = value
    return out


def _read_weights(path):
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def hub_offline():
    """True when the Hugging Face Hub is not to be used: HF_HUB_OFFLINE is set, or one quick connection to the hub
    (or its proxy) fails, which then sets HF_HUB_OFFLINE for this process: offline, the hub clients otherwise
    retry with back-off for every file before they look in the cache."""
    import socket
    import urllib.parse
    import urllib.request

    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return True
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    proxy = urllib.request.getproxies().get(url.scheme)
    to = urllib.parse.urlsplit(proxy) if proxy and not urllib.request.proxy_bypass(url.hostname or "") else url
    port = to.port or (443 if to.scheme == "https" else 80)
    try:
        socket.create_connection((to.hostname, port), timeout=5).close()
        return False
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = "1"  # read by `datasets` when it is imported
        constants.HF_HUB_OFFLINE = True  # read by huggingface_hub at each call
        return True


def _resolve(name_or_path, subfolder, revision, cache_dir, local_files_only):
    """Return (config.json path, weights path) for a local folder or a hub repo id (through the hub cache)."""
    folder = os.path.join(name_or_path, subfolder) if subfolder else name_or_path
    if os.path.isdir(folder):
        config = os.path.join(folder, "config.json")
        for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
            if os.path.isfile(os.path.join(folder, name)):
                if not os.path.isfile(config):
                    raise FileNotFoundError(f"{folder}: has weights but no config.json")
                return config, os.path.join(folder, name)
        raise FileNotFoundError(f"{folder}: no diffusion_pytorch_model.safetensors or .bin in this folder")
    if os.path.exists(name_or_path) or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise FileNotFoundError(f"{folder}: no such model folder")
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError as e:
        raise ImportError(f"loading '{name_or_path}' from the hub needs huggingface_hub: pip install huggingface_hub") from e
    offline = local_files_only or hub_offline()
    kw = dict(subfolder=subfolder, revision=revision, cache_dir=cache_dir, local_files_only=offline)
    try:
        config = hf_hub_download(name_or_path, "config.json", **kw)
        try:
            weights = hf_hub_download(name_or_path, "diffusion_pytorch_model.safetensors", **kw)
        except EntryNotFoundError:
            weights = hf_hub_download(name_or_path, "diffusion_pytorch_model.bin", **kw)
    except Exception as e:  # offline, not cached, no such repo/revision/file, or a network error
        where = f"{name_or_path}" + (f" (subfolder '{subfolder}')" if subfolder else "")
        if offline and not local_files_only:
            raise OSError(f"cannot load '{where}': offline (the Hugging Face Hub is unreachable or HF_HUB_OFFLINE "
                          "is set) and it is not in the local Hugging Face cache") from e
        raise OSError(f"could not load '{where}' from the Hugging Face Hub or its local cache: "
                      f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    return config, weights


# ----------------------------------------------------------------------------------------------------------
# The model


class AutoencoderKL(nn.Module):
    """SD 1.5's KL-regularised autoencoder. Takes diffusers' AutoencoderKL config keys (defaults: SD 1.5)."""

    def __init__(self, **config):
        super().__init__()
        unknown = sorted(set(config) - set(DEFAULT_CONFIG))
        if unknown:
            raise ValueError(f"unknown AutoencoderKL config keys: {', '.join(unknown)}")
        cfg = {**DEFAULT_CONFIG, **config}
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            cfg[key] = list(cfg[key])
        n = len(cfg["block_out_channels"])
        if cfg["down_block_types"] != ["DownEncoderBlock2D"] * n or cfg["up_block_types"] != ["UpDecoderBlock2D"] * n:
            raise ValueError("only DownEncoderBlock2D/UpDecoderBlock2D blocks, one per block_out_channels entry, "
                             f"are supported (got {cfg['down_block_types']} / {cfg['up_block_types']})")
        if cfg["act_fn"] not in ACTIVATIONS:
            raise ValueError(f"act_fn must be one of {sorted(ACTIVATIONS)}, got {cfg['act_fn']!r}")
        self.config = cfg
        common = dict(block_out_channels=cfg["block_out_channels"], layers_per_block=cfg["layers_per_block"],
                      groups=cfg["norm_num_groups"], act_fn=cfg["act_fn"], mid_attention=cfg["mid_block_add_attention"])
        self.encoder = Encoder(cfg["in_channels"], cfg["latent_channels"], **common)
        self.decoder = Decoder(cfg["latent_channels"], cfg["out_channels"], **common)
        c = cfg["latent_channels"]
        self.quant_conv = Conv2d(2 * c, 2 * c, 1) if cfg["use_quant_conv"] else None
        self.post_quant_conv = Conv2d(c, c, 1) if cfg["use_post_quant_conv"] else None
        self.use_slicing = False
        self.use_tiling = False
        # Tiling defaults follow diffusers: tiles of `sample_size` pixels (overlapping by a quarter when blended).
        self.tile_sample_size = cfg["sample_size"] if isinstance(cfg["sample_size"], int) else cfg["sample_size"][0]
        self.tile_overlap = 0.25
        self.tile_mode = "exact"
        self.tile_offload = None

    @property
    def downsample_factor(self):
        return 2 ** (len(self.config["block_out_channels"]) - 1)

    @property
    def dtype(self):
        return next(self.parameters()).dtype

    @property
    def device(self):
        return next(self.parameters()).device

    # --- switches -------------------------------------------------------------------------------------------
    def enable_slicing(self):
        """Encode/decode a batch one image at a time (identical results, lower peak memory)."""
        self.use_slicing = True

    def disable_slicing(self):
        self.use_slicing = False

    def enable_tiling(self, tile_sample_size=None, tile_overlap=None, mode="exact", offload=None):
        """Encode/decode images larger than `tile_sample_size` pixels in tiles (inference only).

        mode="exact" (default): seam-free; equal to the untiled model up to float rounding (see _ExactTiler).
          The tile size only trades speed for memory. Memory still grows with the image (about two full-size
          activations, far below the untiled forward); on a GPU, activations over 1 GiB are parked in CPU memory
          (offload=None), or all of them (offload=True), or none (offload=False).
        mode="blend": diffusers' scheme: each tile runs through the whole network and overlapping tiles
          (`tile_overlap`) are blended linearly. Memory is constant in the image size, but GroupNorm statistics
          and attention see one tile, so tiles differ visibly (seams, colour shifts): the low-memory last resort."""
        if mode not in ("exact", "blend"):
            raise ValueError(f"tiling mode must be 'exact' or 'blend', got {mode!r}")
        if offload not in (None, True, False):
            raise ValueError(f"offload must be None (auto), True or False, got {offload!r}")
        tile = self.tile_sample_size if tile_sample_size is None else tile_sample_size
        if not isinstance(tile, int) or tile < 1:
            raise ValueError(f"tile_sample_size must be a positive number of pixels, got {tile!r}")
        if mode == "blend" and tile % (2 * self.downsample_factor):
            raise ValueError(f"blended tiling needs tile_sample_size a multiple of {2 * self.downsample_factor}")
        if tile_overlap is not None and not 0.0 <= tile_overlap < 1.0:
            raise ValueError("tile_overlap must be in [0, 1)")
        self.use_tiling, self.tile_mode, self.tile_offload, self.tile_sample_size = True, mode, offload, tile
        if tile_overlap is not None:
            self.tile_overlap = tile_overlap

    def disable_tiling(self):
        self.use_tiling = False

    def enable_gradient_checkpointing(self):
        """Recompute each down/mid/up block during backward instead of storing its activations."""
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = True

    def disable_gradient_checkpointing(self):
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = False

    # --- encode / decode -------------------------------------------------------------------------------------
    def _encode(self, x):  # (B, 3, H, W) -> (B, 2 * latent, H/8, W/8) moments
        if self.use_tiling and max(x.shape[-2:]) > self.tile_sample_size:
            if self.tile_mode == "exact":
                return self._exact(x, _ExactTiler.encode)
            return self._tiled(self._encode_tile, x, self.tile_sample_size, 1 / self.downsample_factor)
        return self._encode_tile(x)

    def _encode_tile(self, x):
        h = self.encoder(x)
        return self.quant_conv(h) if self.quant_conv is not None else h

    def _decode(self, z):  # (B, latent, h, w) -> (B, 3, 8h, 8w)
        tile = self.tile_sample_size // self.downsample_factor
        if self.use_tiling and max(z.shape[-2:]) > tile:
            if self.tile_mode == "exact":
                return self._exact(z, _ExactTiler.decode)
            return self._tiled(self._decode_tile, z, tile, self.downsample_factor)
        return self._decode_tile(z)

    def _decode_tile(self, z):
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def _sliced(self, fn, x):
        if self.use_slicing and x.shape[0] > 1:
            return torch.cat([fn(xi) for xi in x.split(1)])
        return fn(x)

    def encode(self, x):
        """Images in [-1, 1], (B, 3, H, W) -> EncoderOutput with `.latent_dist` (the posterior)."""
        return EncoderOutput(DiagonalGaussianDistribution(self._sliced(self._encode, x)))

    def decode(self, z):
        """Latents (unscaled, as sampled from latent_dist), (B, 4, h, w) -> DecoderOutput with `.sample`."""
        return DecoderOutput(self._sliced(self._decode, z))

    def forward(self, x, sample_posterior=False, generator=None):
        posterior = self.encode(x).latent_dist
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return DecoderOutput(self.decode(z).sample, posterior)

    def encode_to_latent(self, x, sample=False, generator=None, noise=None):
        """Diffusion-ready latents: (z - shift_factor) * scaling_factor, with z the posterior mode or a sample
        (drawn with `generator`, or mean + std * `noise` for noise of the latent's shape the caller drew)."""
        dist = self.encode(x).latent_dist
        z = dist.mode() if not sample else dist.sample(generator) if noise is None else dist.mean + dist.std * noise
        return (z - (self.config["shift_factor"] or 0.0)) * self.config["scaling_factor"]

    def decode_from_latent(self, latents, scaling_factor=None, shift_factor=None):
        """Inverse of encode_to_latent's scaling, then decode: (B, 4, h, w) -> (B, 3, 8h, 8w). The factors default
        to the model's; numbers or (B,) tensors override them (latents scaled by another model's factors)."""
        scale = self.config["scaling_factor"] if scaling_factor is None else scaling_factor
        shift = (self.config["shift_factor"] or 0.0) if shift_factor is None else shift_factor
        if torch.is_tensor(scale):
            scale = scale.to(latents).view(-1, 1, 1, 1)
        if torch.is_tensor(shift):
            shift = shift.to(latents).view(-1, 1, 1, 1)
        return self.decode(latents / scale + shift).sample

    # --- tiles -------------------------------------------------------------------------------------------------
    def _exact(self, x, run):
        if x.requires_grad and torch.is_grad_enabled():
            raise ValueError("exact tiling is for inference (it overwrites activations in place): use "
                             "enable_tiling(mode='blend') or disable_tiling() to backpropagate through the VAE")
        with torch.no_grad():
            return run(_ExactTiler(self, x), x)

    def _tiled(self, fn, x, tile, scale):  # mode="blend"
        """Run `fn` on overlapping `tile`-sized windows of x and blend the outputs with linear ramps.

        `scale` is output size / input size (8 for decoding, 1/8 for encoding). Tiles start every
        tile * (1 - overlap) pixels and the last one is aligned to the border, so every tile is full-sized."""
        B, _, H, W = x.shape
        stride = max(int(tile * (1 - self.tile_overlap)), 1)
        ys = _tile_starts(H, tile, stride)
        xs = _tile_starts(W, tile, stride)
        out = weight = None
        for y0 in ys:
            for x0 in xs:
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

    # --- weights ---------------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Load diffusers-format weights (legacy attention names accepted). Strict: a missing, unexpected or
        mis-shaped key raises an error naming the keys."""
        state_dict = _rename_legacy_keys(state_dict)
        if strict:
            own = self.state_dict()
            missing = sorted(set(own) - set(state_dict))
            unexpected = sorted(set(state_dict) - set(own))
            shapes = sorted(f"{k} {tuple(state_dict[k].shape)} != {tuple(own[k].shape)}"
                            for k in set(own) & set(state_dict) if state_dict[k].shape != own[k].shape)
            problems = [f"{name} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                        for name, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                           ("shape mismatches", shapes)) if keys]
            if problems:
                raise ValueError("weights do not match the AutoencoderKL config: " + "; ".join(problems))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @classmethod
    def from_pretrained(cls, name_or_path, subfolder=None, torch_dtype=None, revision=None, cache_dir=None,
                        local_files_only=False):
        """Load from a diffusers-format folder, a hub repo id (e.g. "stabilityai/sd-vae-ft-mse", or an SD 1.5
        repo with subfolder="vae"), or a CompVis/LDM single file (.ckpt/.safetensors, via convert_weights.py)."""
        name_or_path = os.fspath(name_or_path)
        if os.path.isfile(name_or_path):
            import convert_weights  # an LDM single file; convert_weights.py lives beside this file
            config, state_dict = convert_weights.load_ldm_file(name_or_path)
        else:
            config_path, weights_path = _resolve(name_or_path, subfolder, revision, cache_dir, local_files_only)
            with open(config_path) as f:
                config = json.load(f)
            if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
                raise ValueError(f"{config_path}: is a {config['_class_name']}, not an AutoencoderKL")
            config = {k: v for k, v in config.items() if not k.startswith("_")}  # _class_name, _diffusers_version, ...
            state_dict = _read_weights(weights_path)
        with torch.device("meta"):  # no random init: the weights replace every parameter
            model = cls(**config)
        model.load_state_dict(state_dict, assign=True)
        return model.to(torch_dtype or torch.float32)

    def save_pretrained(self, folder):
        """Write config.json + diffusion_pytorch_model.safetensors (diffusers' layout), each atomically."""
        from safetensors.torch import save_file
        config = {"_class_name": "AutoencoderKL", **self.config}
        atomic_write(os.path.join(folder, "config.json"), lambda tmp: _write_json(config, tmp))
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write(os.path.join(folder, "diffusion_pytorch_model.safetensors"),
                     lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def _write_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def atomic_write(path, write):
    """write(tmp_path), then rename onto `path`: a failure or interruption never leaves a partial file under
    `path`, and an existing file stays as it was until the new one is complete. (The project's one such helper:
    checkpoints, exports and infer.py's outputs all go through it.)"""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make outputs private
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _tile_starts(size, tile, stride):
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _ramp(n, ramp, fade_in, fade_out, device):
    """Blend weights along one tile axis: rising over `ramp` pixels where a neighbour overlaps, else flat 1."""
    w = torch.ones(n, device=device)
    if ramp > 0:
        r = (torch.arange(ramp, device=device, dtype=torch.float32) + 0.5) / ramp
        if fade_in:
            w[:ramp] = torch.minimum(w[:ramp], r)
        if fade_out:
            w[-ramp:] = torch.minimum(w[-ramp:], r.flip(0))
    return w


# ----------------------------------------------------------------------------------------------------------
# Seam-free tiles (enable_tiling(mode="exact"))
#
# Tiled VAEs leave seams because GroupNorm normalises with the mean and variance of the whole image, which one tile
# does not know (and the mid-block attention looks at the whole latent). Blending overlapping tiles (diffusers,
# mode="blend") softens the step but not the colour/contrast shift. Here the network runs layer by layer over the
# whole image, and only the local operations run tile by tile:
#  - each conv (with the GroupNorm-apply and activation before it) is computed per output tile from an input window
#    one receptive field larger (1 pixel each side for a 3x3 conv); where the window leaves the image it is padded
#    with zeros *after* the norm and activation, which is what the untiled conv's padding sees. The output tile is
#    written into the full-size activation as is: nothing blended, nothing recomputed but the 1-pixel halos;
#  - as a conv's output tiles are written, their per-(image, group) means and variances are merged exactly
#    (_GroupStats), so the next GroupNorm normalises every tile with whole-image statistics, applied as
#    x * scale + shift in fp32 (safe for fp16/bf16 activations);
#  - a resnet is two sweeps over the tiles (conv1; then conv2 + shortcut) and keeps two full-size activations, its
#    input and conv1's output; its output overwrites its input, since each output tile reads the input only at its
#    own pixels (the halo comes from conv1's output);
#  - the mid-block attention runs on the whole latent (1/64 of the image's pixels).
# The result equals the untiled model up to float rounding, at ~1x its time. Memory grows with the image (about two
# full-size activations, against the untiled forward's several); on a GPU the full-size activations over 1 GiB are
# "parked" in CPU memory, so GPU memory is bounded by the tile and latent sizes.


class _GroupStats:
    """Mean and variance per (image, group) of a tensor seen tile by tile: per-tile moments merged exactly with
    Chan et al.'s parallel update (including the between-tile term), in float64."""

    def __init__(self, groups):
        self.groups, self.n, self.mean, self.m2 = groups, 0, None, None

    def add(self, t):  # t: (B, C, h, w), any dtype; the tile's moments are taken in fp32 (or fp64)
        t = t.to(torch.promote_types(t.dtype, torch.float32))
        B, C, h, w = t.shape
        # GroupNorm's own kernel gives the tile's per-group mean and 1/std (one vectorised Welford pass, ~2.5x faster
        # than torch.var_mean on CPU); its normalised output is discarded. eps=0: var = rstd^-2 (0 if rstd is inf).
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
        """(scale, shift), (B, C, 1, 1) fp32 (fp64 for a fp64 model) each, such that norm(x) == x * scale + shift."""
        per_group = norm.num_channels // self.groups
        scale = torch.rsqrt(self.m2 / self.n + norm.eps).repeat_interleave(per_group, 1) * norm.weight.double()
        shift = norm.bias.double() - self.mean.repeat_interleave(per_group, 1) * scale
        dtype = torch.promote_types(norm.weight.dtype, torch.float32)
        return scale.to(dtype)[:, :, None, None], shift.to(dtype)[:, :, None, None]


class _ExactTiler:
    """Runs the encoder or the decoder layer by layer, each conv tile by tile (see the comment above)."""

    def __init__(self, model, x):
        self.model, self.device, self.dtype, self.batch = model, x.device, x.dtype, x.shape[0]
        self.groups, self.width = model.config["norm_num_groups"], model.config["block_out_channels"][0]
        self.tile, self.offload = model.tile_sample_size, model.tile_offload

    def empty(self, channels, h, w):
        """A full-size activation: on the model's device, or parked in CPU memory (GPU: see enable_tiling)."""
        nbytes = self.batch * channels * h * w * self.dtype.itemsize
        park = self.device.type != "cpu" and (self.offload or (self.offload is None and nbytes > 2 ** 30))
        return torch.empty(self.batch, channels, h, w, dtype=self.dtype, device="cpu" if park else self.device)

    def conv(self, conv, src, in_hw, out_hw, pad=1, add=None, out=None, stats=True):
        """conv's output (and its _GroupStats), computed tile by tile. src(dst, y0, y1, x0, x1) writes the conv's
        input at rows y0:y1, columns x0:x1 (inside the image) into dst; add(y0, y1, x0, x1) returns what to add
        to an output tile (the shortcut)."""
        (H, W), (oh, ow) = in_hw, out_hw
        k, s = conv.kernel_size[0], conv.stride[0]
        out = self.empty(conv.out_channels, oh, ow) if out is None else out
        st = _GroupStats(self.groups) if stats else None
        # Tiles of n^2 pixels, n^2 * (input + output channels) = tile_sample_size^2 * `width` (128 for SD) values:
        # e.g. 362^2 for a 128 -> 128 conv when tile_sample_size is 512. Wider, low-resolution layers get tiles of
        # fewer pixels (still covering more of the image); the memory of a tile is the same at every layer.
        n = max(1, int(self.tile * math.sqrt(self.width / (conv.in_channels + conv.out_channels))))
        for y0 in range(0, oh, n):
            for x0 in range(0, ow, n):
                y1, x1 = min(y0 + n, oh), min(x0 + n, ow)
                iy0, iy1, ix0, ix1 = y0 * s - pad, (y1 - 1) * s - pad + k, x0 * s - pad, (x1 - 1) * s - pad + k
                top, bottom, left, right = max(-iy0, 0), max(iy1 - H, 0), max(-ix0, 0), max(ix1 - W, 0)
                h, w = iy1 - iy0, ix1 - ix0
                a = torch.empty(self.batch, conv.in_channels, h, w, dtype=self.dtype, device=self.device)
                for edge in (a[:, :, :top], a[:, :, h - bottom:], a[:, :, :, :left], a[:, :, :, w - right:]):
                    edge.zero_()  # the conv's zero padding, where the window leaves the image
                src(a[:, :, top:h - bottom, left:w - right], iy0 + top, iy1 - bottom, ix0 + left, ix1 - right)
                t = _conv2d(a, conv.weight, conv.bias, stride=s)
                if add is not None:
                    t += add(y0, y1, x0, x1)
                if st is not None:
                    st.add(t)
                out[:, :, y0:y1, x0:x1] = t
        return out, st

    # Conv inputs, one window at a time, written into the (padded) window buffer
    def window(self, x):
        return lambda dst, y0, y1, x0, x1: dst.copy_(x[:, :, y0:y1, x0:x1])

    def normed(self, x, norm, stats, act_fn):  # act(GroupNorm(x)) with whole-image statistics, computed in fp32
        scale, shift = stats.affine(norm)

        def src(dst, y0, y1, x0, x1):
            v = x[:, :, y0:y1, x0:x1].to(self.device, scale.dtype)
            v = torch.addcmul(shift, v, scale, out=dst if dst.dtype == scale.dtype else None)
            dst.copy_(_act(act_fn, v))  # a no-op when both steps ran in place in dst
        return src

    def upsampled(self, x):  # x upsampled 2x (nearest), never materialised whole
        def src(dst, y0, y1, x0, x1):
            a = _nearest2x(x[:, :, y0 // 2:(y1 + 1) // 2, x0 // 2:(x1 + 1) // 2].to(self.device))
            dst.copy_(a[:, :, y0 % 2:y0 % 2 + y1 - y0, x0 % 2:x0 % 2 + x1 - x0])
        return src

    # Layers
    def resnet(self, r, x, stats):
        _, c, H, W = x.shape
        h, h_stats = self.conv(r.conv1, self.normed(x, r.norm1, stats, r.act_fn), (H, W), (H, W))

        def shortcut(y0, y1, x0, x1):
            t = x[:, :, y0:y1, x0:x1].to(self.device)
            return r.conv_shortcut(t) if r.conv_shortcut is not None else t
        co = r.conv2.out_channels
        out = x[:, :co] if co <= c else None  # overwrite x in place: nothing reads it again (see above)
        return self.conv(r.conv2, self.normed(h, r.norm2, h_stats, r.act_fn), (H, W), (H, W), add=shortcut, out=out)

    def mid(self, mid, x, stats):
        x, stats = self.resnet(mid.resnets[0], x, stats)
        if mid.attentions is not None:  # the whole latent at once: attention is global
            x = mid.attentions[0](x.to(self.device))
            stats = _GroupStats(self.groups)
            stats.add(x)
        return self.resnet(mid.resnets[1], x, stats)

    def out_conv(self, conv, x, norm, stats, act_fn):  # GroupNorm -> act -> conv_out, into a tensor on the device
        out = torch.empty(self.batch, conv.out_channels, *x.shape[2:], dtype=self.dtype, device=self.device)
        return self.conv(conv, self.normed(x, norm, stats, act_fn), x.shape[2:], x.shape[2:], out=out, stats=False)[0]

    def encode(self, x):  # (B, 3, H, W) -> moments (B, 2 * latent, H/8, W/8)
        enc = self.model.encoder
        h, stats = self.conv(enc.conv_in, self.window(x), x.shape[2:], x.shape[2:])
        for block in enc.down_blocks:
            for r in block.resnets:
                h, stats = self.resnet(r, h, stats)
            if block.downsamplers is not None:  # stride 2 after (0, 1, 0, 1) padding: pad=0, the window adds the rest
                H, W = h.shape[2:]
                h, stats = self.conv(block.downsamplers[0].conv, self.window(h), (H, W), (H // 2, W // 2), pad=0)
        h, stats = self.mid(enc.mid_block, h, stats)
        moments = self.out_conv(enc.conv_out, h, enc.conv_norm_out, stats, enc.act_fn)
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
            if block.upsamplers is not None:
                H, W = x.shape[2:]
                x, stats = self.conv(block.upsamplers[0].conv, self.upsampled(x), (2 * H, 2 * W), (2 * H, 2 * W))
        return self.out_conv(dec.conv_out, x, dec.conv_norm_out, stats, dec.act_fn)
