"""The Stable Diffusion 1.5 VAE (AutoencoderKL, "kl-f8") in plain PyTorch, with diffusers' state-dict keys.

Loads diffusers folders, hub repositories and CompVis/LDM single files. Imports only torch (safetensors and
huggingface_hub where those formats need them): copy this file alone (and vae_tiling.py for enable_tiling(),
vae_fast.py for set_fast_kernels()). Built or loaded, a model is plain: bit-identical to diffusers on CPU.

    vae = AutoencoderKL.from_pretrained("stabilityai/sd-vae-ft-mse").eval()
    latents = vae.encode_to_latent(images)          # images in [-1, 1], (B, 3, H, W) -> (B, 4, H/8, W/8)
    images = vae.decode_from_latent(latents)         # back to (B, 3, H, W) in about [-1, 1]

Architecture (LDM's ldm/modules/diffusionmodules/model.py, as re-organised by diffusers), built bottom-up:
  Encoder: conv_in -> down blocks (resnets, stride-2 conv except the last) -> mid (resnet, attention, resnet)
           -> GroupNorm -> SiLU -> conv_out to 2 x latent channels (mean and log-variance)
  Decoder: conv_in -> mid -> up blocks (layers_per_block + 1 resnets, nearest-2x + conv except the last)
           -> GroupNorm -> SiLU -> conv_out
"""
import contextlib
import functools
import importlib
import json
import math
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# SD 1.5's VAE config (runwayml/stable-diffusion-v1-5 vae/config.json): AutoencoderKL's defaults.
DEFAULT_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
    act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512,
    scaling_factor=0.18215,  # LDM's scale_factor for SD 1.x: 1 / std of the latents over the training set
    shift_factor=None, latents_mean=None, latents_std=None, force_upcast=True, use_quant_conv=True,
    use_post_quant_conv=True, mid_block_add_attention=True)
GN_EPS = 1e-6  # every GroupNorm in the LDM autoencoder uses eps=1e-6 (Normalize() in model.py)
ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu, "mish": F.mish}

# --- Leaf blocks --------------------------------------------------------------------------------------------
class ResnetBlock(nn.Module):
    """GroupNorm -> act -> conv3x3 -> GroupNorm -> act -> (dropout) -> conv3x3, plus a (1x1-conv) shortcut."""
    def __init__(self, in_ch, out_ch, groups, act_fn="silu", dropout=0.0):
        super().__init__()
        self.act = ACTIVATIONS[act_fn]
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=GN_EPS)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=GN_EPS)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None
    def forward(self, x):  # (B, Cin, H, W) -> (B, Cout, H, W)
        h = self.conv1(self.act(self.norm1(x)))
        h = self.act(self.norm2(h))  # rebinding h frees conv1's output before conv2 runs: a lower peak
        h = self.conv2(self.dropout(h))
        return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h

class Attention(nn.Module):
    """Single-head self-attention over all H*W positions (the VAE's mid block), with a residual connection.
    Linear q/k/v/out layers as diffusers stores them (LDM used 1x1 convs: same weights, reshaped)."""
    def __init__(self, channels, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=GN_EPS)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])  # keys "to_out.0.*"
    def forward(self, x):  # (B, C, H, W) -> (B, C, H, W)
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.to_q(h).unsqueeze(1), self.to_k(h).unsqueeze(1), self.to_v(h).unsqueeze(1)  # one head
        h = F.scaled_dot_product_attention(q, k, v)  # fused: on GPU the (HW)^2 scores are never held whole
        h = self.to_out[1](self.to_out[0](h.squeeze(1)))  # (B, HW, C)
        return x + h.transpose(1, 2).reshape(B, C, H, W)

class Downsample(nn.Module):
    """Stride-2 3x3 conv after asymmetric (0, 1, 0, 1) padding: LDM's choice, which diffusers keeps."""
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)
    def forward(self, x):  # (B, C, H, W) -> (B, C, H/2, W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))

class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
    def forward(self, x):  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

# --- Blocks (diffusers' DownEncoderBlock2D, UpDecoderBlock2D, UNetMidBlock2D without time embedding) --------
# An absent resampler or attention is an empty ModuleList (diffusers: None): same keys, one code path.
class DownBlock(nn.Module):
    resampler, key = Downsample, "downsamplers"
    def __init__(self, in_ch, out_ch, num_layers, groups, act_fn, resample):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups, act_fn) for i in range(num_layers)])
        setattr(self, self.key, nn.ModuleList([self.resampler(out_ch)] if resample else []))
    def forward(self, x):  # (B, Cin, H, W) -> (B, Cout, H/2, W/2) (UpBlock: 2H, 2W; the last block: H, W)
        for layer in [*self.resnets, *getattr(self, self.key)]:
            x = layer(x)
        return x

class UpBlock(DownBlock):  # the same with nearest-2x upsampling and diffusers' key for it
    resampler, key = Upsample, "upsamplers"

class MidBlock(nn.Module):
    def __init__(self, channels, groups, act_fn, add_attention=True):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups, act_fn) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(channels, groups)] if add_attention else [])
    def forward(self, x):  # (B, C, H, W) -> (B, C, H, W)
        for layer in [self.resnets[0], *self.attentions, self.resnets[1]]:
            x = layer(x)
        return x

class Coder(nn.Module):  # Encoder and Decoder: conv_in -> their blocks -> GroupNorm -> act -> conv_out
    def forward(self, x):  # Encoder: (B, 3, H, W) -> (B, 2 * latent, H / 2^(n-1), W / 2^(n-1)); Decoder: back
        x = self.conv_in(x)
        for block in self.blocks:  # recomputed in backward with gradient checkpointing (non-reentrant, so
            use_checkpoint = self.gradient_checkpointing and torch.is_grad_enabled()  # autograd.grad works)
            x = checkpoint(block, x, use_reentrant=False) if use_checkpoint else block(x)
        return self.conv_out(self.act(self.conv_norm_out(x)))

class Encoder(Coder):
    blocks = property(lambda self: [*self.down_blocks, self.mid_block])  # in the order they run
    def __init__(self, in_channels, latent_channels, channels, layers_per_block, groups, act_fn, mid_attn):
        super().__init__()
        self.act, self.gradient_checkpointing, ch = ACTIVATIONS[act_fn], False, channels
        self.conv_in = nn.Conv2d(in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownBlock(ch[max(i - 1, 0)], ch[i], layers_per_block, groups, act_fn, i < len(ch) - 1)
            for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], groups, act_fn, mid_attn)
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=GN_EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * latent_channels, 3, padding=1)  # "double_z": mean and logvar

class Decoder(Coder):
    blocks = property(lambda self: [self.mid_block, *self.up_blocks])
    def __init__(self, latent_channels, out_channels, channels, layers_per_block, groups, act_fn, mid_attn):
        super().__init__()
        self.act, self.gradient_checkpointing, ch = ACTIVATIONS[act_fn], False, channels[::-1]
        self.conv_in = nn.Conv2d(latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], groups, act_fn, mid_attn)
        self.up_blocks = nn.ModuleList([
            UpBlock(ch[max(i - 1, 0)], ch[i], layers_per_block + 1, groups, act_fn, i < len(ch) - 1)
            for i in range(len(ch))])
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=GN_EPS)
        self.conv_out = nn.Conv2d(ch[-1], out_channels, 3, padding=1)

# --- Posterior and outputs ----------------------------------------------------------------------------------
class DiagonalGaussianDistribution:
    """N(mean, diag(exp(logvar))) from the encoder's 2C channels (LDM's distributions.py)."""
    def __init__(self, parameters, deterministic=False):
        self.parameters, self.deterministic = parameters, deterministic
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        # The clamp keeps exp() finite for untrained or diverging encoders (LDM's and diffusers' bounds).
        self.logvar = torch.zeros_like(self.mean) if deterministic else torch.clamp(logvar, -30.0, 20.0)
        self.std, self.var = torch.exp(0.5 * self.logvar), torch.exp(self.logvar)
    def sample(self, generator=None):
        # On the generator's device (as diffusers' randn_tensor): a CPU generator reproduces on any device.
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)
    def mode(self): return self.mean  # the posterior mean
    def kl(self, other=None):  # (B,): KL summed over C, H, W
        if self.deterministic: return torch.zeros(self.mean.shape[0], device=self.mean.device)
        if other is None:  # against N(0, I)
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum((self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0
                               - self.logvar + other.logvar, dim=[1, 2, 3])
    def nll(self, sample, dims=(1, 2, 3)):  # (B,): negative log-likelihood of `sample`
        if self.deterministic: return torch.zeros(sample.shape[0], device=sample.device)
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var,
                               dim=list(dims))

@dataclass
class EncoderOutput:
    latent_dist: DiagonalGaussianDistribution
@dataclass
class DecoderOutput:
    sample: torch.Tensor
    latent_dist: DiagonalGaussianDistribution = None  # set by forward(), so training needs one forward only

# --- The model ----------------------------------------------------------------------------------------------
class AutoencoderKL(nn.Module):
    """SD 1.5's KL-regularised autoencoder. Takes diffusers' AutoencoderKL config keys (defaults: SD 1.5)."""
    def __init__(self, **config):
        super().__init__()
        unknown = sorted(set(config) - set(DEFAULT_CONFIG))
        if unknown:
            raise ValueError(f"unknown AutoencoderKL config keys: {', '.join(unknown)}")
        cfg = {**DEFAULT_CONFIG, **config}
        cfg.update({k: list(cfg[k]) for k in ("down_block_types", "up_block_types", "block_out_channels")})
        n = len(cfg["block_out_channels"])
        blocks = cfg["down_block_types"], cfg["up_block_types"]
        if blocks != (["DownEncoderBlock2D"] * n, ["UpDecoderBlock2D"] * n):
            raise ValueError("only DownEncoderBlock2D/UpDecoderBlock2D blocks, one per block_out_channels "
                             f"entry, are supported (got {blocks[0]} / {blocks[1]})")
        if cfg["act_fn"] not in ACTIVATIONS:
            raise ValueError(f"act_fn must be one of {sorted(ACTIVATIONS)}, got {cfg['act_fn']!r}")
        self.config, c = cfg, cfg["latent_channels"]
        common = dict(channels=cfg["block_out_channels"], layers_per_block=cfg["layers_per_block"],
                      groups=cfg["norm_num_groups"], act_fn=cfg["act_fn"],
                      mid_attn=cfg["mid_block_add_attention"])
        self.encoder = Encoder(cfg["in_channels"], c, **common)
        self.decoder = Decoder(c, cfg["out_channels"], **common)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if cfg["use_quant_conv"] else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if cfg["use_post_quant_conv"] else None
        # Tiling defaults follow diffusers: tiles of `sample_size` pixels (a quarter overlapping if blended).
        size = cfg["sample_size"]
        self.use_slicing, self.use_tiling, self.tile_mode, self.tile_offload = False, False, "exact", None
        self.tile_sample_size, self.tile_overlap = size if isinstance(size, int) else size[0], 0.25
        self.fast_kernels = {}  # none: the plain modules above (set_fast_kernels)

    downsample_factor = property(lambda self: 2 ** (len(self.config["block_out_channels"]) - 1))
    dtype = property(lambda self: next(self.parameters()).dtype)
    device = property(lambda self: next(self.parameters()).device)
    def set_fast_kernels(self, enabled=True, **kernels):
        """Faster kernels for this model alone (vae_fast.py, imported on first use, says what each does): the
        same computation, rounded differently. Each kernel is `enabled` unless given: nnpack, subpixel,
        half_norm, inplace_act, attention_chunk (True, False, or for nnpack the most torch threads to use it
        at, default 2, for attention_chunk the most scores per call, default 2**26). None on: plain."""
        if enabled or any(kernels.values()) or self.fast_kernels:  # plain stays plain without vae_fast.py
            self.fast_kernels = _companion("vae_fast").set_fast_kernels(self, enabled, **kernels)
        return self
    def enable_slicing(self, enabled=True): self.use_slicing = enabled  # one image at a time: a lower peak
    disable_slicing = functools.partialmethod(enable_slicing, False)
    def enable_tiling(self, tile_sample_size=None, tile_overlap=None, mode="exact", offload=None):
        """Encode/decode images larger than `tile_sample_size` pixels (default: sample_size) in tiles, for
        inference: mode="exact" is seam-free, "blend" diffusers' blended tiles (see vae_tiling.py)."""
        tile = self.tile_sample_size if tile_sample_size is None else tile_sample_size
        _companion("vae_tiling").check_options(tile, tile_overlap, mode, offload, self.downsample_factor)
        self.use_tiling, self.tile_mode, self.tile_offload, self.tile_sample_size = True, mode, offload, tile
        self.tile_overlap = self.tile_overlap if tile_overlap is None else tile_overlap
    def disable_tiling(self): self.use_tiling = False
    def enable_gradient_checkpointing(self, enabled=True):  # recompute each block in backward, not store it
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = enabled
    disable_gradient_checkpointing = functools.partialmethod(enable_gradient_checkpointing, False)
    def _encode(self, x):  # (B, 3, H, W) -> (B, 2 * latent, H/8, W/8) moments
        if self.use_tiling and max(x.shape[-2:]) > self.tile_sample_size:
            return _companion("vae_tiling").encode(self, x)
        h = self.encoder(x)
        return self.quant_conv(h) if self.quant_conv is not None else h
    def _decode(self, z):  # (B, latent, h, w) -> (B, 3, 8h, 8w)
        if self.use_tiling and max(z.shape[-2:]) > self.tile_sample_size // self.downsample_factor:
            return _companion("vae_tiling").decode(self, z)
        return self.decoder(self.post_quant_conv(z) if self.post_quant_conv is not None else z)
    def _sliced(self, fn, x):
        return torch.cat([fn(xi) for xi in x.split(1)]) if self.use_slicing and x.shape[0] > 1 else fn(x)
    def encode(self, x):  # images in [-1, 1], (B, 3, H, W) -> EncoderOutput with .latent_dist (the posterior)
        return EncoderOutput(DiagonalGaussianDistribution(self._sliced(self._encode, x)))
    def decode(self, z):  # latents as sampled from latent_dist (unscaled), (B, 4, h, w) -> DecoderOutput
        return DecoderOutput(self._sliced(self._decode, z))
    def forward(self, x, sample_posterior=False, generator=None):
        posterior = self.encode(x).latent_dist
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return DecoderOutput(self.decode(z).sample, posterior)
    def encode_to_latent(self, x, sample=False, generator=None, noise=None):
        """Diffusion-ready latents: (z - shift_factor) * scaling_factor, with z the posterior mode or a sample
        (drawn with `generator`, or mean + std * `noise` for noise of the latent's shape the caller drew)."""
        dist = self.encode(x).latent_dist
        z = dist.mode() if not sample else dist.sample(generator) if noise is None else \
            dist.mean + dist.std * noise
        return (z - (self.config["shift_factor"] or 0.0)) * self.config["scaling_factor"]
    def decode_from_latent(self, latents, scaling_factor=None, shift_factor=None):
        """Inverse of encode_to_latent's scaling, then decode: (B, 4, h, w) -> (B, 3, 8h, 8w). The factors
        default to the model's; numbers or (B,) tensors override them (latents scaled by another model's)."""
        scale = self.config["scaling_factor"] if scaling_factor is None else scaling_factor
        shift = (self.config["shift_factor"] or 0.0) if shift_factor is None else shift_factor
        scale, shift = (t.to(latents).view(-1, 1, 1, 1) if torch.is_tensor(t) else t for t in (scale, shift))
        return self.decode(latents / scale + shift).sample
    def load_state_dict(self, state_dict, strict=True, assign=False):
        """diffusers-format weights (legacy attention names too); strict: an error naming any wrong key."""
        state_dict, own = _rename_legacy_keys(state_dict), self.state_dict()
        problems = {"missing keys": sorted(set(own) - set(state_dict)),
                    "unexpected keys": sorted(set(state_dict) - set(own)),
                    "shape mismatches": sorted(f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}"
                                               for k, v in state_dict.items()
                                               if k in own and v.shape != own[k].shape)}
        if strict and any(problems.values()):
            raise ValueError("weights do not match the AutoencoderKL config: " + "; ".join(
                f"{what} ({len(k)}): {', '.join(k[:8])}{' ...' * (len(k) > 8)}"
                for what, k in problems.items() if k))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
    @classmethod
    def from_pretrained(cls, name_or_path, subfolder=None, torch_dtype=None, revision=None, cache_dir=None,
                        local_files_only=False):
        """Load from a diffusers-format folder, a hub repo id (e.g. "stabilityai/sd-vae-ft-mse", or an SD 1.5
        repo with subfolder="vae"), or a CompVis/LDM single file (.ckpt/.safetensors, full SD ones too)."""
        name_or_path = os.fspath(name_or_path)
        if os.path.isfile(name_or_path):
            state_dict = ldm_to_diffusers(read_weights(name_or_path))
            config = config_from_weights(state_dict, **stored_config(name_or_path))
        else:
            config_path, weights = _resolve(name_or_path, subfolder, revision, cache_dir, local_files_only)
            config = json.loads(Path(config_path).read_text())
            if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
                raise ValueError(f"{config_path}: is a {config['_class_name']}, not an AutoencoderKL")
            config = {k: v for k, v in config.items() if not k.startswith("_")}  # _class_name, _version
            state_dict = read_weights(weights)
        with torch.device("meta"):  # no random init: the weights replace every parameter
            model = cls(**config)
        model.load_state_dict(state_dict, assign=True)
        return model.to(torch_dtype or torch.float32)
    def save_pretrained(self, folder):
        """Write config.json + diffusion_pytorch_model.safetensors (diffusers' layout), each atomically."""
        from safetensors.torch import save_file
        config = json.dumps({"_class_name": "AutoencoderKL", **self.config}, indent=2)
        atomic_write(os.path.join(folder, "config.json"), lambda tmp: Path(tmp).write_text(config))
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write(os.path.join(folder, "diffusion_pytorch_model.safetensors"),
                     lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))

def _companion(name):  # vae_tiling.py or vae_fast.py, beside this file: imported on first use, so the model
    return importlib.import_module(f"{__package__}.{name}" if __package__ else name)  # works without them

def atomic_write(path, write):
    """write(tmp_path), then rename onto `path`: a failure or interruption never leaves a partial file under
    `path`; an existing file stays as it was until the new one is complete (checkpoints, exports, outputs)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        write(tmp)
        umask = os.umask(0o022)  # (set and restored: no call only reads it)
        os.umask(umask)  # the mode open() gives (0644 under umask 022): safetensors creates its files 0600
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise

# --- Weight files: diffusers folders, hub repositories, CompVis/LDM single files ----------------------------
def read_weights(path, what="weights"):
    """The tensors of a .safetensors file or a torch pickle (weights_only: no code runs; memory-mapped, so a
    4-7 GB SD checkpoint is not read whole for its VAE, unless in the pre-1.6 non-zip format)."""
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except ImportError:  # vae.py needs only torch, but this format its own reader
        raise ImportError(f"{path}: reading .safetensors needs `pip install safetensors`") from None
    except Exception as e:  # one line saying what the file is, not torch's paragraph on weights_only=False
        with open(path, "rb") as f:
            head = f.read(8)
        text = all(32 <= c < 127 or c in b"\t\r\n" for c in head)
        kind = next((f"{k} image" for m, k in FILE_KINDS if head.startswith(m)), None) or \
            ("text" if text else f"{type(e).__name__}: {str(e).split('. ')[0][:80]}")
        raise ValueError(f"{path}: not a readable {what} file ({kind})") from None

FILE_KINDS = ((b"\x89PNG", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"), (b"RIFF", "WebP"))

def stored_config(path):  # the config that convert_weights.py records in an LDM .safetensors header, else {}
    if not str(path).endswith(".safetensors"): return {}
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        return json.loads((f.metadata() or {}).get("diffusers_config", "{}"))

def _resolve(name_or_path, subfolder, revision, cache_dir, local_files_only):  # -> (config, weights) paths
    folder = os.path.join(name_or_path, subfolder) if subfolder else name_or_path
    if os.path.isdir(folder):
        config = os.path.join(folder, "config.json")
        for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
            if os.path.isfile(os.path.join(folder, name)):
                if not os.path.isfile(config):
                    raise FileNotFoundError(f"{folder}: has weights but no config.json")
                return config, os.path.join(folder, name)
        raise FileNotFoundError(f"{folder}: no diffusion_pytorch_model.safetensors or .bin in this folder")
    if os.path.exists(name_or_path) or name_or_path.startswith((".", "/", "~")) or \
            name_or_path.count("/") > 1:
        raise FileNotFoundError(f"{folder}: no such model folder")
    kw = dict(subfolder=subfolder, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    try:  # (an ImportError, without huggingface_hub, says so in the message)
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError
        config = hf_hub_download(name_or_path, "config.json", **kw)
        try:
            weights = hf_hub_download(name_or_path, "diffusion_pytorch_model.safetensors", **kw)
        except EntryNotFoundError:
            weights = hf_hub_download(name_or_path, "diffusion_pytorch_model.bin", **kw)
    except Exception as e:  # offline, not cached, no such repo/revision/file, or a network error
        raise OSError(f"could not load '{name_or_path}'{f' (subfolder {subfolder!r})' if subfolder else ''} "
                      "from the Hugging Face Hub or its local cache: "
                      f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    return config, weights

# diffusers' names for the mid-block attention before 0.14, still in older hub repositories
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# LDM's module names (CompVis/latent-diffusion ldm/modules/diffusionmodules/model.py) against diffusers'. LDM
# builds its decoder deepest level first and insert(0)s each, so its `up.0` is the full-resolution level that
# runs last, diffusers' `up_blocks.{n-1}`; its attention q/k/v/proj_out are 1x1 convs, diffusers' Linear.
LDM_RESNET = {**{k: k for k in ("norm1", "conv1", "norm2", "conv2")}, "nin_shortcut": "conv_shortcut"}
LDM_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
LDM_OUTER = {"conv_in": "conv_in", "conv_out": "conv_out", "norm_out": "conv_norm_out",  # encoder, decoder
             **{f"mid.attn_1.{a}": f"mid_block.attentions.0.{b}" for a, b in LDM_ATTENTION.items()}}
LDM_VAE_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")  # not LDM's loss.*, the UNet, ...
LDM_ANCHOR = "encoder.conv_in.weight"  # in every VAE, in both layouts

def _rename_legacy_keys(state_dict):
    out = {}
    for key, value in state_dict.items():
        *mod, name, param = key.split(".")
        if "attentions" in mod and name in LEGACY_ATTENTION_NAMES:  # 1x1 conv -> Linear
            key, value = ".".join([*mod, LEGACY_ATTENTION_NAMES[name], param]), value.reshape(value.shape[:2])
        out[key] = value
    return out

def ldm_key_map(keys):
    """{LDM key: diffusers key} for a VAE with these keys (either layout): one table, read both ways."""
    def count(pattern):  # 1 + the largest level / layer index in the keys
        return max([int(m.group(1)) + 1 for k in keys if (m := re.search(pattern, k))], default=0)
    n, n_dec = count(r"^encoder\.down(?:_blocks)?\.(\d+)\."), count(r"^decoder\.up(?:_blocks)?\.(\d+)\.")
    if n != n_dec:
        raise ValueError(f"encoder has {n} levels but decoder has {n_dec}; not an AutoencoderKL")
    layers = range(count(r"\.(?:block|resnets)\.(\d+)\."))
    modules = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv",
               **{f"{p}.{a}": f"{p}.{b}" for p in ("encoder", "decoder") for a, b in LDM_OUTER.items()}}
    resnets = [(f"{p}.mid.block_{j + 1}", f"{p}.mid_block.resnets.{j}")
               for p in ("encoder", "decoder") for j in (0, 1)]
    for i in range(n):
        for ldm, diff, kind in ((f"encoder.down.{i}", f"encoder.down_blocks.{i}", "down"),
                                (f"decoder.up.{n - 1 - i}", f"decoder.up_blocks.{i}", "up")):
            modules[f"{ldm}.{kind}sample.conv"] = f"{diff}.{kind}samplers.0.conv"
            resnets += [(f"{ldm}.block.{j}", f"{diff}.resnets.{j}") for j in layers]
    modules |= {f"{a}.{x}": f"{b}.{y}" for a, b in resnets for x, y in LDM_RESNET.items()}
    return {f"{a}.{s}": f"{b}.{s}" for a, b in modules.items() for s in ("weight", "bias")}

def ldm_vae_weights(state_dict):
    """(prefix, the VAE's weights without it) from a checkpoint, `{"state_dict": ...}` or not: the prefix is
    `first_stage_model.` in full SD ones, none in VAE files (or `vae.`...); LDM's loss.* is dropped."""
    state_dict = state_dict["state_dict"] if isinstance(state_dict.get("state_dict"), dict) else state_dict
    prefixes = {k[:-len(LDM_ANCHOR)] for k in state_dict if k == LDM_ANCHOR or k.endswith("." + LDM_ANCHOR)}
    if len(prefixes) != 1 and "first_stage_model." not in prefixes:
        raise ValueError(f"several VAEs found (key prefixes {sorted(prefixes)}): extract one" if prefixes
                         else f"no VAE weights found (no '{LDM_ANCHOR}' key, prefixed or not)")
    prefix = "first_stage_model." if len(prefixes) > 1 else prefixes.pop()
    return prefix, {k[len(prefix):]: v for k, v in state_dict.items()
                    if k.startswith(prefix) and k[len(prefix):].startswith(LDM_VAE_ROOTS)}

def ldm_to_diffusers(state_dict):
    """A checkpoint's VAE (ldm_vae_weights) -> diffusers keys; weights in diffusers' layout pass through."""
    vae = ldm_vae_weights(state_dict)[1]
    if any(k.startswith(("encoder.down_blocks.", "encoder.mid_block.")) for k in vae):
        return vae
    mapping = ldm_key_map(vae)
    unknown = sorted(k for k in vae if k not in mapping)
    if unknown:
        raise ValueError(f"{len(unknown)} key(s) not in the LDM AutoencoderKL layout, e.g. {unknown[:3]}")
    return {mapping[k]: v.reshape(v.shape[:2]) if ".attentions.0.to_" in mapping[k] else v
            for k, v in vae.items()}

def config_from_weights(sd, **overrides):
    """AutoencoderKL config from diffusers-layout weight shapes (a wrong latent width fails the strict load);
    what shapes cannot show (norm_num_groups, sample_size, scaling_factor) is SD 1.5's unless overridden."""
    n = len({k.split(".")[2] for k in sd if k.startswith("encoder.down_blocks.")})
    try:
        channels = [sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(n)]
        (_, c_in, *_), (c_out, *_), (_, latent, *_) = (
            sd[f"{k}.weight"].shape for k in ("encoder.conv_in", "decoder.conv_out", "decoder.conv_in"))
    except KeyError as e:
        raise ValueError(f"incomplete VAE weights: missing {e.args[0]}") from None
    config = dict(dict(DEFAULT_CONFIG, in_channels=c_in, out_channels=c_out, latent_channels=latent,
                  block_out_channels=channels, down_block_types=["DownEncoderBlock2D"] * n,
                  up_block_types=["UpDecoderBlock2D"] * n, use_quant_conv="quant_conv.weight" in sd,
                  layers_per_block=len({k.split(".")[4] for k in sd
                                        if k.startswith("encoder.down_blocks.0.resnets.")}),
                  use_post_quant_conv="post_quant_conv.weight" in sd,
                  mid_block_add_attention="encoder.mid_block.attentions.0.to_q.weight" in sd), **overrides)
    if any(c % config["norm_num_groups"] for c in channels):
        raise ValueError(f"norm_num_groups={config['norm_num_groups']} does not divide block_out_channels="
                         f"{channels}; give the model's norm_num_groups")
    return config
