"""Convert Stable Diffusion VAE weights between the CompVis/LDM layout and the diffusers layout.

    python convert_weights.py v1-5-pruned-emaonly.ckpt sd15-vae/          # full SD 1.5 checkpoint -> folder
    python convert_weights.py vae-ft-mse-840000-ema-pruned.ckpt ft-mse/   # standalone VAE .ckpt -> folder
    python convert_weights.py my-vae.safetensors my-vae/                  # standalone .safetensors -> folder
    python convert_weights.py ft-mse/ ft-mse-ldm.safetensors              # diffusers folder -> LDM file

The direction follows the paths: a weights file (.ckpt/.pt/.pth/.bin/.safetensors) becomes a diffusers-format
folder (config.json + diffusion_pytorch_model.safetensors, loadable by `vae.AutoencoderKL.from_pretrained` and
`diffusers.AutoencoderKL.from_pretrained`); a folder becomes one LDM-layout `.safetensors` with unprefixed
keys (`encoder.down.0.block.0.norm1.weight`, ...), the file AUTOMATIC1111 and ComfyUI load as a VAE. Options:
--ema (take the EMA copy of the weights, see `ldm_to_diffusers`), and --norm_num_groups, --scaling_factor,
--sample_size for config values that the weights cannot reveal (defaults: SD 1.5's).

The key map itself lives in vae.py (`vae.ldm_key_map`, one table for both directions; vae.py reads LDM files
on its own); this file adds the command line, the EMA copy, the export and the checks with one-line errors.
Conversion is pure renaming and reshaping (attention q/k/v/proj_out: LDM's 1x1 convs <-> diffusers' Linear):
bit-exact. Layouts: CompVis/latent-diffusion ldm/modules/diffusionmodules/model.py and diffusers
models/autoencoders/vae.py; diffusers' own reader is loaders/single_file_utils.convert_ldm_vae_checkpoint.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

import vae
from data import UserError, one_line

WEIGHT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")
# diffusers attention projections
ATTN_LINEAR = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")
UNSEEN_KEYS = ("norm_num_groups", "sample_size", "scaling_factor")  # config the weights' shapes cannot show
SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                      "F64": torch.float64}


class ConversionError(UserError, ValueError):
    """Bad input for a conversion; the CLI prints its message as one line."""


def ldm_to_diffusers(state_dict, prefer_ema=False):
    """LDM-layout VAE weights -> diffusers AutoencoderKL keys (vae.ldm_to_diffusers: a full SD checkpoint's
    `first_stage_model.*`, a standalone VAE, `{"state_dict": ...}`, or weights already in diffusers' layout).

    EMA: LDM's LitEma stores an EMA copy as `model_ema.<param name without dots>`. By default it is IGNORED,
    like diffusers, AUTOMATIC1111 and ComfyUI do, so a converted model is the one those tools load from the
    same file (released "-ema" VAEs such as vae-ft-mse-840000-ema-pruned already carry the EMA weights in the
    main keys). `prefer_ema=True` takes the EMA copy instead and fails if it does not cover every VAE
    parameter.
    """
    if prefer_ema:
        if isinstance(state_dict.get("state_dict"), dict):
            state_dict = state_dict["state_dict"]
        prefix, weights = vae.ldm_vae_weights(state_dict)
        ema = {k: state_dict.get("model_ema." + (prefix + k).replace(".", "")) for k in weights}
        missing = [k for k, v in ema.items() if v is None]
        if missing:
            raise ConversionError(f"prefer_ema: no EMA copy (model_ema.*) of {len(missing)} VAE weights, "
                                  f"e.g. {missing[0]}")
        state_dict = ema
    return vae.ldm_to_diffusers(state_dict)


def diffusers_to_ldm(state_dict):
    """diffusers AutoencoderKL keys (current names) -> standalone LDM keys, attention weights as (C, C, 1,
    1)."""
    mapping = {diffusers: ldm for ldm, diffusers in vae.ldm_key_map(state_dict).items()}
    unknown = sorted(k for k in state_dict if k not in mapping)
    if unknown:
        raise ConversionError(f"{len(unknown)} key(s) not in the diffusers AutoencoderKL layout, "
                              f"e.g. {unknown[:3]}")
    return {mapping[k]: v.reshape(*v.shape[:2], 1, 1) if k.endswith(ATTN_LINEAR) else v
            for k, v in state_dict.items()}


def load_ldm_file(path, prefer_ema=False, **overrides):
    """(config, diffusers state dict) from an LDM-layout .ckpt/.pt/.pth/.bin/.safetensors file; `overrides`
    for the config values the weights cannot show (vae.config_from_weights)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    try:
        obj = vae.read_weights(str(path))
    except ValueError as e:  # vae.read_weights names the file and what it is (an image, text, ...)
        raise ConversionError(f"cannot read weights: {e}") from None
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a state dict, found {type(obj).__name__}")
    try:
        state_dict = ldm_to_diffusers(obj, prefer_ema=prefer_ema)
        config = vae.config_from_weights(state_dict, **{**vae.stored_config(str(path)), **overrides})
        return config, state_dict
    except ValueError as e:
        raise ConversionError(f"{path}: {' '.join(str(e).split())}") from None


def _stored_dtype(folder):
    """dtype of a diffusers folder's safetensors weights (its one floating dtype, so fp16 files stay fp16;
    None when it only has a .bin)."""
    path = Path(folder) / "diffusion_pytorch_model.safetensors"
    if not path.is_file():
        return None
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:  # reads the header only
        dtypes = {SAFETENSORS_DTYPES.get(f.get_slice(k).get_dtype(), torch.float32) for k in f.keys()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def convert(src, dst, prefer_ema=False, **overrides):
    """What the CLI does: file -> diffusers folder, or diffusers folder -> LDM .safetensors. Atomic output
    files, written only once the input has loaded and checked."""
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
        # The config rides along in the header (vae.stored_config reads it back): what shapes cannot show
        # (norm_num_groups, sample_size, scaling_factor, ...) survives the round trip. A1111/ComfyUI ignore
        # it.
        meta = {"format": "pt", "diffusers_config": json.dumps(model.config)}
        vae.atomic_write(str(dst), lambda tmp: save_file(ldm, tmp, metadata=meta))
        return
    if src.suffix not in WEIGHT_SUFFIXES:
        raise ConversionError(f"{src}: expected a folder or a {'/'.join(WEIGHT_SUFFIXES)} file")
    if dst.suffix in WEIGHT_SUFFIXES or dst.is_file():
        raise ConversionError(f"{dst}: a weights file converts to a diffusers folder, not a file")
    config, state_dict = load_ldm_file(src, prefer_ema=prefer_ema, **overrides)
    with torch.device("meta"):  # no random init: every parameter is replaced below
        model = vae.AutoencoderKL(**config)
    # strict: every key present, every shape right; dtypes kept
    model.load_state_dict(state_dict, assign=True)
    model.save_pretrained(str(dst))  # each file atomically; other files in an existing folder are left alone
    guessed = [k for k in UNSEEN_KEYS if k not in overrides and k not in vae.stored_config(str(src))]
    if guessed:  # not recorded in the file, not visible in the weights: say what was assumed
        print(f"note: {src.name} records no {', '.join(guessed)}: took SD 1.5's ("
              f"{', '.join(f'{k}={config[k]}' for k in guessed)}); if this VAE differs, "
              f"pass --{' --'.join(guessed)}", file=sys.stderr)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="LDM .ckpt/.pt/.pth/.bin/.safetensors file, or a diffusers folder")
    parser.add_argument("dst", help="diffusers folder (from a file), or an LDM .safetensors (from a folder)")
    parser.add_argument("--ema", action="store_true", help="use the checkpoint's model_ema.* copy of the VAE")
    parser.add_argument("--norm_num_groups", type=int, help="GroupNorm groups (shapes hide it; default 32)")
    parser.add_argument("--scaling_factor", type=float, help="latent scaling factor (default 0.18215)")
    parser.add_argument("--sample_size", type=int, help="config sample_size (default 512)")
    args = parser.parse_args(argv)
    overrides = {k: getattr(args, k) for k in ("norm_num_groups", "scaling_factor", "sample_size")
                 if getattr(args, k) is not None}
    try:
        if Path(args.src).is_dir() and (overrides or args.ema):
            raise ConversionError("--ema/--norm_num_groups/--scaling_factor/--sample_size apply to file -> "
                                  "folder")
        convert(args.src, args.dst, prefer_ema=args.ema, **overrides)
    except Exception as e:  # one line, no traceback (bad input is the user's to fix, not a crash)
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
