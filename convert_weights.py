"""Convert Stable Diffusion VAE weights between the CompVis/LDM layout and the diffusers layout.

    python convert_weights.py v1-5-pruned-emaonly.ckpt sd15-vae/          # full SD 1.5 checkpoint -> folder
    python convert_weights.py vae-ft-mse-840000-ema-pruned.ckpt ft-mse/   # standalone VAE .ckpt -> folder
    python convert_weights.py my-vae.safetensors my-vae/                  # standalone .safetensors -> folder
    python convert_weights.py ft-mse/ ft-mse-ldm.safetensors              # diffusers folder -> LDM single file

The direction follows the paths: a weights file (.ckpt/.pt/.pth/.bin/.safetensors) becomes a diffusers-format
folder (config.json + diffusion_pytorch_model.safetensors, loadable by `vae.AutoencoderKL.from_pretrained` and
`diffusers.AutoencoderKL.from_pretrained`); a folder becomes one LDM-layout `.safetensors` with unprefixed keys
(`encoder.down.0.block.0.norm1.weight`, ...), the file AUTOMATIC1111 and ComfyUI load as a VAE.
Options: --ema (take the EMA copy of the weights, see `ldm_to_diffusers`), and --norm_num_groups,
--scaling_factor, --sample_size for config values that the weights cannot reveal (defaults: SD 1.5's).

Layouts (CompVis/latent-diffusion ldm/modules/diffusionmodules/model.py vs diffusers
models/autoencoders/vae.py; diffusers' own reader is loaders/single_file_utils.convert_ldm_vae_checkpoint):
  encoder.down.{i}.block.{j}        <-> encoder.down_blocks.{i}.resnets.{j}     (nin_shortcut <-> conv_shortcut)
  encoder.down.{i}.downsample.conv  <-> encoder.down_blocks.{i}.downsamplers.0.conv
  {en,de}coder.mid.block_{1,2}      <-> {en,de}coder.mid_block.resnets.{0,1}
  {en,de}coder.mid.attn_1.{norm,q,k,v,proj_out} <-> ...mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}
  {en,de}coder.norm_out             <-> {en,de}coder.conv_norm_out
  decoder.up.{n-1-i}.block.{j}      <-> decoder.up_blocks.{i}.resnets.{j}
  decoder.up.{n-1-i}.upsample.conv  <-> decoder.up_blocks.{i}.upsamplers.0.conv
LDM builds its decoder from the deepest level up and `insert(0, ...)`s each level, so `up.0` is the full-resolution
level that runs last, while diffusers numbers `up_blocks` in execution order. LDM's attention q/k/v/proj_out are
1x1 Conv2d weights (C, C, 1, 1); diffusers uses Linear (C, C). Conversion is pure renaming/reshaping: bit-exact.
"""
import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

WEIGHT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")
# Keys under the VAE prefix that are not part of the autoencoder are dropped: LDM training leftovers
# (`loss.*` = LPIPS + PatchGAN discriminator, `model_ema.*`), UNet and text encoder of full SD checkpoints.
VAE_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
ANCHOR = "encoder.conv_in.weight"  # present in every VAE, in both layouts
ATTN_LINEAR = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")  # diffusers attention projections
ATTN_CONV = re.compile(r"(en|de)coder\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")  # the same in LDM
SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


class ConversionError(ValueError):
    """Bad input for a conversion; the CLI prints its message as one line."""


# ----------------------------------------------------------------------------------------------- key mapping
def _resnet(ldm, diff):
    names = [("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
             ("nin_shortcut", "conv_shortcut")]  # LDM's 1x1 shortcut when in != out channels
    return [(f"{ldm}.{a}", f"{diff}.{b}") for a, b in names]


def _module_pairs(n_blocks, n_layers):
    """(LDM module, diffusers module) for every module a VAE with `n_blocks` levels may have."""
    pairs = [("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv_in", f"{part}.conv_in"), (f"{part}.conv_out", f"{part}.conv_out"),
                  (f"{part}.norm_out", f"{part}.conv_norm_out")]
        pairs += _resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0")
        pairs += _resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1")
        for a, b in [("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")]:
            pairs.append((f"{part}.mid.attn_1.{a}", f"{part}.mid_block.attentions.0.{b}"))
    for i in range(n_blocks):
        up = n_blocks - 1 - i  # LDM's decoder levels are numbered in reverse execution order
        for j in range(n_layers):
            pairs += _resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}")
            pairs += _resnet(f"decoder.up.{up}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}")
        pairs.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv"))
        pairs.append((f"decoder.up.{up}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv"))
    return pairs


def _count(keys, pattern):
    """1 + the largest integer captured by `pattern` over `keys` (0 if it never matches)."""
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def _key_map(keys, ldm_to_diff):
    keys = list(keys)
    if ldm_to_diff:
        n_enc, n_dec = _count(keys, r"encoder\.down\.(\d+)\."), _count(keys, r"decoder\.up\.(\d+)\.")
        n_layers = _count(keys, r".*\.block\.(\d+)\.")
    else:
        n_enc, n_dec = _count(keys, r"encoder\.down_blocks\.(\d+)\."), _count(keys, r"decoder\.up_blocks\.(\d+)\.")
        n_layers = _count(keys, r".*\.resnets\.(\d+)\.")
    if n_enc != n_dec:
        raise ConversionError(f"encoder has {n_enc} levels but decoder has {n_dec}; not an AutoencoderKL")
    pairs = [(f"{l}.{p}", f"{d}.{p}") for l, d in _module_pairs(n_enc, n_layers) for p in ("weight", "bias")]
    return dict(pairs) if ldm_to_diff else {d: l for l, d in pairs}


def _rename(state_dict, ldm_to_diff):
    mapping = _key_map(state_dict, ldm_to_diff)
    unknown = sorted(k for k in state_dict if k not in mapping)
    if unknown:
        layout = "LDM" if ldm_to_diff else "diffusers"
        raise ConversionError(f"{len(unknown)} key(s) not in the {layout} AutoencoderKL layout, e.g. {unknown[:3]}")
    return {mapping[k]: v for k, v in state_dict.items()}


def _is_diffusers_layout(state_dict):
    return any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block.")) for k in state_dict)


def _find_prefix(state_dict):
    """'first_stage_model.' in full SD checkpoints, '' in standalone VAE files (also accepts e.g. 'vae.')."""
    prefixes = {k[: -len(ANCHOR)] for k in state_dict
                if k.endswith(ANCHOR) and (k == ANCHOR or k[-len(ANCHOR) - 1] == ".")}
    if not prefixes:
        raise ConversionError(f"no VAE weights found (no '{ANCHOR}' or 'first_stage_model.{ANCHOR}' key)")
    if len(prefixes) > 1:
        if "first_stage_model." in prefixes:
            return "first_stage_model."
        raise ConversionError(f"several VAEs found (key prefixes {sorted(prefixes)}); extract one first")
    return prefixes.pop()


# ----------------------------------------------------------------------------------------------- public API
def ldm_to_diffusers(state_dict, prefer_ema=False):
    """LDM-layout VAE weights -> diffusers AutoencoderKL keys (attention weights as Linear (C, C)).

    Accepts a full SD checkpoint's state dict (`first_stage_model.` prefix; UNet, text encoder and `loss.*` keys are
    ignored), a standalone VAE (no prefix), a whole `{"state_dict": ...}` checkpoint, or weights already in
    diffusers layout (returned as they are, so e.g. our own training checkpoints load too).

    EMA: LDM's LitEma stores an EMA copy as `model_ema.<param name without dots>`. By default it is IGNORED, like
    diffusers, AUTOMATIC1111 and ComfyUI do, so a converted model is the one those tools load from the same file
    (released "-ema" VAEs such as vae-ft-mse-840000-ema-pruned already carry the EMA weights in the main keys).
    `prefer_ema=True` takes the EMA copy instead and fails if it does not cover every VAE parameter.
    """
    if isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    prefix = _find_prefix(state_dict)
    vae = {k[len(prefix):]: v for k, v in state_dict.items()
           if k.startswith(prefix) and k[len(prefix):].startswith(VAE_ROOTS)}
    if prefer_ema:
        ema = {k: state_dict.get("model_ema." + (prefix + k).replace(".", "")) for k in vae}
        missing = [k for k, v in ema.items() if v is None]
        if missing:
            raise ConversionError(f"prefer_ema: no EMA copy (model_ema.*) of {len(missing)} VAE weights, "
                                  f"e.g. {missing[0]}")
        vae = ema
    if _is_diffusers_layout(vae):
        return vae
    out = _rename(vae, ldm_to_diff=True)
    for k in out:
        if k.endswith(ATTN_LINEAR) and out[k].dim() > 2:  # 1x1 conv (C,C,1,1) or conv1d (C,C,1) -> Linear (C,C)
            out[k] = out[k].reshape(out[k].shape[:2])
    return out


def diffusers_to_ldm(state_dict):
    """diffusers AutoencoderKL keys (current names) -> standalone LDM keys, attention weights as (C, C, 1, 1)."""
    out = _rename(state_dict, ldm_to_diff=False)
    for k in out:
        if ATTN_CONV.search(k) and out[k].dim() == 2:
            out[k] = out[k].reshape(*out[k].shape, 1, 1)
    return out


def config_from_ldm(state_dict, **overrides):
    """AutoencoderKL config (diffusers keys) inferred from weight shapes, LDM or diffusers layout.

    What shapes cannot show takes SD 1.5's value unless given in `overrides`: norm_num_groups=32 (only checked to
    divide every width), scaling_factor=0.18215 (the v1 inference yaml's scale_factor), sample_size=512.
    """
    sd = state_dict if _is_diffusers_layout(state_dict) else ldm_to_diffusers(state_dict)
    try:
        n = _count(sd, r"encoder\.down_blocks\.(\d+)\.")
        channels = [sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(n)]
        latent = sd["decoder.conv_in.weight"].shape[1]
        config = dict(
            in_channels=sd["encoder.conv_in.weight"].shape[1],
            out_channels=sd["decoder.conv_out.weight"].shape[0],
            down_block_types=["DownEncoderBlock2D"] * n,
            up_block_types=["UpDecoderBlock2D"] * n,
            block_out_channels=channels,
            layers_per_block=_count(sd, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
            act_fn="silu",
            latent_channels=latent,
            norm_num_groups=32,
            sample_size=512,
            scaling_factor=0.18215,
            use_quant_conv="quant_conv.weight" in sd,
            use_post_quant_conv="post_quant_conv.weight" in sd,
            mid_block_add_attention="encoder.mid_block.attentions.0.to_q.weight" in sd,
        )
        if sd["encoder.conv_out.weight"].shape[0] != 2 * latent:  # encoder predicts mean and logvar (double_z)
            raise ConversionError(f"encoder outputs {sd['encoder.conv_out.weight'].shape[0]} channels, "
                                  f"expected 2 x {latent} latent channels")
    except KeyError as e:
        raise ConversionError(f"incomplete VAE weights: missing {e.args[0]}") from None
    config.update(overrides)
    groups = config["norm_num_groups"]
    if any(c % groups for c in channels):
        raise ConversionError(f"norm_num_groups={groups} does not divide block_out_channels={channels}; "
                              "pass the model's value (--norm_num_groups)")
    return config


def load_state_dict_file(path):
    """Raw tensors of a .safetensors or a torch pickle (read with weights_only=True: no code runs on load)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path), device="cpu")
        try:  # mmap: a 4-7 GB full SD checkpoint is not read into memory just to take its 335 MB VAE
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # only the legacy (pre-zip) torch.save format cannot be mmapped
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, or a pickle holding non-tensor objects
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f"{path}: cannot read weights ({msg})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj


def load_ldm_file(path, prefer_ema=False, **overrides):
    """(config, diffusers state dict) from an LDM-layout .ckpt/.pt/.pth/.bin/.safetensors file."""
    try:
        state_dict = ldm_to_diffusers(load_state_dict_file(path), prefer_ema=prefer_ema)
        return config_from_ldm(state_dict, **overrides), state_dict
    except ConversionError as e:
        raise ConversionError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from None


def _common_dtype(dtypes):
    """The one floating dtype of the weights (kept, so fp16 files stay fp16), else float32."""
    dtypes = {d for d in dtypes if d.is_floating_point}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _stored_dtype(folder):
    """dtype of a diffusers folder's safetensors weights (None when it only has a .bin)."""
    path = Path(folder) / "diffusion_pytorch_model.safetensors"
    if not path.is_file():
        return None
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:  # reads the header only
        return _common_dtype(SAFETENSORS_DTYPES.get(f.get_slice(k).get_dtype(), torch.float32) for k in f.keys())


def convert(src, dst, prefer_ema=False, **overrides):
    """What the CLI does: file -> diffusers folder, or diffusers folder -> LDM .safetensors. Atomic output."""
    import vae  # lazy: vae.py imports this module to read LDM single files
    src, dst = Path(src), Path(dst)
    if src.is_dir():
        if dst.suffix != ".safetensors":
            raise ConversionError(f"{dst}: a diffusers folder converts to an LDM '.safetensors' file")
        if not (src / "config.json").is_file():
            raise ConversionError(f"{src}: not a diffusers folder (no config.json)")
        if dst.is_dir():
            raise ConversionError(f"{dst}: is a folder")
        model = vae.AutoencoderKL.from_pretrained(str(src), torch_dtype=_stored_dtype(src))
        ldm = {k: v.contiguous() for k, v in diffusers_to_ldm(model.state_dict()).items()}
        from safetensors.torch import save_file
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
        try:
            save_file(ldm, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
        return
    if src.suffix not in WEIGHT_SUFFIXES:
        raise ConversionError(f"{src}: expected a folder or a {'/'.join(WEIGHT_SUFFIXES)} file")
    if dst.suffix in WEIGHT_SUFFIXES or dst.is_file():
        raise ConversionError(f"{dst}: a weights file converts to a diffusers folder, not a file")
    config, state_dict = load_ldm_file(src, prefer_ema=prefer_ema, **overrides)
    with torch.device("meta"):  # no random init: every parameter is replaced below
        model = vae.AutoencoderKL(**config)
    model.load_state_dict(state_dict, assign=True)  # strict: every key present, every shape right; dtypes kept
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        model.save_pretrained(str(tmp))
        if not dst.exists():
            os.replace(tmp, dst)
        else:  # refresh an existing folder file by file; other files in it are left alone
            for f in tmp.iterdir():
                os.replace(f, dst / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="LDM .ckpt/.pt/.pth/.bin/.safetensors file, or a diffusers folder")
    parser.add_argument("dst", help="diffusers folder (from a file), or an LDM .safetensors file (from a folder)")
    parser.add_argument("--ema", action="store_true", help="use the checkpoint's model_ema.* copy of the VAE")
    parser.add_argument("--norm_num_groups", type=int, help="GroupNorm groups (not visible in shapes; default 32)")
    parser.add_argument("--scaling_factor", type=float, help="latent scaling factor (default 0.18215)")
    parser.add_argument("--sample_size", type=int, help="config sample_size (default 512)")
    args = parser.parse_args(argv)
    overrides = {k: getattr(args, k) for k in ("norm_num_groups", "scaling_factor", "sample_size")
                 if getattr(args, k) is not None}
    try:
        if Path(args.src).is_dir() and (overrides or args.ema):
            raise ConversionError("--ema/--norm_num_groups/--scaling_factor/--sample_size apply to file -> folder")
        convert(args.src, args.dst, prefer_ema=args.ema, **overrides)
    except Exception as e:  # one line, no traceback (bad input is the user's to fix, not a crash)
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
