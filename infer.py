"""Encode, decode, reconstruct and evaluate images with the SD 1.5 VAE from the command line.

    # reconstruct (encode + decode) one image, or every image under a folder (relative paths mirrored)
    python infer.py --model_path stabilityai/sd-vae-ft-mse --input image.jpg --output reconstructed.jpg
    python infer.py --model_path stabilityai/sd-vae-ft-mse --input photos/ --output recon/ --batch_size 8
    # latents for diffusion training (.pt or .safetensors by the output's extension; --ext in folder mode)
    python infer.py --model_path ... --input image.jpg --output latent.pt --encode [--sample --seed 0]
    python infer.py --model_path ... --input photos/ --output latents/ --encode --ext .safetensors
    python infer.py --model_path ... --input latent.pt --output decoded.png --decode
    # every GPU, resumable (README: "Caching latents on many GPUs"); shards: latents.py; OUT/index.json decodes
    torchrun --nproc_per_node=8 infer.py ... --input photos/ --output latents/ --encode [--latent_format
        safetensors-shards --shard_size 1000]  # then: --input latents/index.json --output decoded/ --decode
    # quality table: PSNR / SSIM / LPIPS (mean ± std), OUT/metrics.csv, OUT/grid.png, OUT/reconstructions/
    python infer.py --model_path ... --input photos/ --output OUT/ --eval
    # is the latent scale right? std of the latents over 1000 images -> scaling_factor = 1/std (LDM's)
    python infer.py --model_path my_vae/ --input photos/ --latent_stats [--write_config] [--batch_size 16]

--model_path: a diffusers folder, a hub id (--subfolder vae for a whole SD repository) or an LDM single file.
Any image size and mode (data.load_image): images are padded by reflection to a multiple of the downsampling
factor and cropped back, so a reconstruction has the input's size; same-size images are batched. Tiling turns
on above AUTO_TILING_SIDE px (an untiled decode's memory grows with the pixels; vae.py's "exact" tiles are
seam-free); --tile_size is in pixels, DEFAULT_TILE_SIZE whatever the model's sample_size (each tile has a
fixed cost, so small tiles are slow). With --dtype fp16/bf16 a non-finite result is redone in fp32. Folder mode
mirrors relative paths; latent files, shards and index.json: latents.py. --eval: PSNR/SSIM/LPIPS (losses.py)
and rFID (biased upwards at small N: compare at equal N) of the 8-bit reconstructions, OUT/metrics.csv,
OUT/grid.png (fid.py's Evaluator). README "Inference" and "Is my VAE ready?" say more.

Errors: one line on stderr, exit code 1, no traceback, no partial file (outputs are written to a temporary
file and renamed). In folder mode a bad file is reported and skipped, the others are processed, and the
summary lists every failure (exit code 1 if any). Usage errors exit with 2.
"""
import argparse
import contextlib
import copy
import os
import sys
import tempfile
import time
import zlib

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.overrides import TorchFunctionMode

import latents
import losses
from data import BadImageError, DataError, UserError, find_images, load_image, one_line
from fid import Evaluator
from latents import LATENT_EXTENSIONS, read_latent
from vae import atomic_write

SAVE_FORMATS = {".png": ("PNG", {}), ".jpg": ("JPEG", {"quality": 95}), ".jpeg": ("JPEG", {"quality": 95}),
                ".webp": ("WEBP", {"quality": 95}), ".bmp": ("BMP", {}), ".tif": ("TIFF", {}), ".tiff": ("TIFF", {})}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
AUTO_TILING_SIDE = 1024
DEFAULT_TILE_SIZE = 512
MAX_PENDING_BATCHES = 4  # images of many different sizes wait at most this many batches' worth in memory


class CLIError(UserError):
    """A problem the user must fix; main() prints it as one line and exits with 1."""


# ------------------------------------------------------------------------------------------ files
def save_image(path, pixels):
    """(3, H, W) uint8 tensor -> image file, format by extension."""
    fmt, options = SAVE_FORMATS[os.path.splitext(path)[1].lower()]
    img = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    atomic_write(path, lambda tmp: img.save(tmp, format=fmt, **options))


def output_name(rel, mode, ext):
    stem, in_ext = os.path.splitext(rel)
    if ext:
        return stem + ext
    if mode == "encode":
        return stem + ".pt"
    if mode == "reconstruct" and in_ext.lower() in SAVE_FORMATS:
        return rel
    return stem + ".png"  # decode, eval (lossless, so metrics describe the file), GIF input


def plan(args, mode):
    """[(source, name for messages/seeds, destination)] and whether --input is a folder."""
    allowed = LATENT_EXTENSIONS if mode == "encode" else tuple(SAVE_FORMATS)
    if args.ext:
        args.ext = args.ext if args.ext.startswith(".") else "." + args.ext
        if args.ext.lower() not in allowed:
            raise CLIError(f"--ext {args.ext}: unknown extension for {mode}; use one of {', '.join(allowed)}")
    src, out = args.input, args.output
    if not os.path.exists(src):
        raise CLIError(f"input {src!r} does not exist")
    out_root = os.path.join(out, "reconstructions") if mode == "eval" else out
    if mode == "eval" and os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"--eval writes a folder (metrics.csv, grid.png, reconstructions/), but {out!r} is a file")
    shards = mode == "encode" and args.latent_format == "safetensors-shards"
    index = mode == "decode" and src.lower().endswith(".json")  # the index of latent shards
    if os.path.isdir(src) or index:
        if os.path.exists(out_root) and not os.path.isdir(out_root):
            raise CLIError(f"--input is a folder or index, so --output must be a folder, but {out_root!r} is a file")
        if index:  # sources: (shard, key, meta) for read_latent
            sources = latents.read_index(src)
        else:
            try:
                files = latents.find_latents(src) if mode == "decode" else find_images(src)
            except DataError as e:
                raise CLIError(str(e)) from None
            sources = [(os.path.relpath(p, src), p) for p in files]
        jobs = [(p, r, os.path.join(out_root, output_name(r, mode, args.ext))) for r, p in sources]
    else:
        name = os.path.basename(src)
        dst = out_root
        if mode == "eval" or shards or os.path.isdir(out) or out.endswith(("/", os.sep)):
            dst = os.path.join(out_root, output_name(name, mode, args.ext))
        elif os.path.splitext(dst)[1].lower() not in allowed:
            raise CLIError(f"output {dst!r}: unknown extension for {mode}; use one of {', '.join(allowed)}")
        jobs = [(src, name, dst)]
    if shards:  # one tensor per input in a shard, named by the input's relative path: no file per input
        return [(s, name, name) for s, name, _ in jobs], True
    for s, _, d in jobs:
        if not index and os.path.exists(d) and os.path.samefile(s, d):
            raise CLIError(f"output {d!r} would overwrite its input; choose another --output")
    return jobs, os.path.isdir(src) or index or shards


def check_writable(folder):
    """Fail before loading the model if outputs cannot be written (missing permission, a file in the path)."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise CLIError(f"cannot write to {folder!r}: {e.strerror or one_line(e)}") from None


# ------------------------------------------------------------------------------------------ model
def noise_seed(seed, name):
    """The --sample seed of one file: independent of batching and order, different for each file."""
    return zlib.crc32(f"{seed}:{name}".encode())


class Runner:
    """The model on its device and dtype, padding, tiling policy and the fp32 retry of non-finite results."""

    def __init__(self, model, device, dtype, tiling=None, tile_size=DEFAULT_TILE_SIZE, slicing=False,
                 tile_mode="exact"):
        self.master = model.eval().requires_grad_(False)  # fp32 weights, kept for the fp32 retry
        self.model = (copy.deepcopy(model) if dtype != torch.float32 else model).to(device, dtype)
        self.device, self.dtype, self.tiling, self.fp32_on_device = device, dtype, tiling, None
        self.conv_counts = {}  # (input shapes, tiling on) -> count_convs' result
        self.factor, self.tile_args = model.downsample_factor, dict(tile_sample_size=tile_size, mode=tile_mode)
        with torch.device("meta"):  # the same model without weights, for count_convs
            self.meta = type(model)(**model.config)
        for m in {id(m): m for m in (self.master, self.model, self.meta)}.values():
            m.enable_tiling(**self.tile_args)  # validates the arguments now; switched per batch below
            if slicing:
                m.enable_slicing()

    def set_tiling(self, height, width):
        on = self.tiling if self.tiling is not None else max(height, width) > AUTO_TILING_SIDE
        for m in (self.master, self.model, self.meta):
            m.enable_tiling(**self.tile_args) if on else m.disable_tiling()

    def pad(self, x):
        """Pad (B, 3, H, W) on the bottom/right to a multiple of the downsampling factor. Reflection keeps image
        statistics at the border (zeros would darken it); it needs the image to be larger than the pad, so
        tiny images are padded by repeating the edge instead."""
        H, W = x.shape[-2:]
        ph, pw = -H % self.factor, -W % self.factor
        if ph == pw == 0:
            return x
        return F.pad(x, (0, pw, 0, ph), mode="reflect" if ph < H and pw < W else "replicate")

    def count_convs(self, fn, inputs):
        """How many convolutions fn(model, *inputs) runs (the progress bar's total): the same call on the
        "meta" device, which computes shapes only, in fp32 (the calls do not depend on the dtype; half precision
        asks for autocast state, which "meta" has none of). None if it cannot run there. Kept per input shapes and
        tiling switch: a run calls one fn (its mode), and same-size batches need not be counted again."""
        key = (tuple(tuple(t.shape) for t in inputs), self.meta.use_tiling)
        if key not in self.conv_counts:
            try:
                with torch.no_grad(), ConvProgress() as counter:
                    fn(self.meta, *[t.to("meta", torch.float32) for t in inputs])
                self.conv_counts[key] = counter.count
            except Exception:  # an operation without a meta kernel: the bar then shows a count without a total
                self.conv_counts[key] = None
        return self.conv_counts[key]

    def guarded(self, fn, inputs, names, warn, progress=contextlib.nullcontext()):
        """fn(model, *inputs) on the batch in self.dtype; each image whose result is not finite is redone in fp32."""
        with torch.no_grad():
            with progress:
                out = fn(self.model, *[t.to(self.device, self.dtype) for t in inputs]).float()
            if self.dtype == torch.float32:
                return out.cpu()
            for i in range(len(out)):
                if not torch.isfinite(out[i]).all():
                    warn(f"warning: {names[i]}: non-finite result in {self.dtype}, redone in fp32")
                    if self.fp32_on_device is None:
                        self.fp32_on_device = self.master.to(self.device)
                    out[i] = fn(self.fp32_on_device, *[t[i:i + 1].to(self.device, torch.float32) for t in inputs])[0]
            return out.cpu()


class ConvProgress(TorchFunctionMode):
    """Counts the convolutions run inside `with ConvProgress(bar):` and advances `bar` by one per convolution.
    A torch function mode sees every conv call, including those vae.py's exact tiler makes per tile (they
    bypass the modules, so module hooks would miss them), whatever the model, with no change to vae.py."""

    CONVS = (F.conv2d, torch.conv2d, torch._nnpack_spatial_convolution,  # NNPACK: vae.py's CPU fp32 inference
             F.conv_transpose2d, torch.conv_transpose2d)  # vae.py's sub-pixel upsampler

    def __init__(self, bar=None):
        super().__init__()
        self.bar, self.count = bar, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.CONVS:
            self.count += 1
            if self.bar is not None and (self.bar.total is None or self.bar.n < self.bar.total):
                self.bar.update(1)
        return out


def image_fn(encode, sample):
    """Images -> diffusion-ready latents (encode_to_latent) or -> reconstructions (decode of the raw z)."""
    def fn(model, x, noise):
        if encode:
            return model.encode_to_latent(x, sample=sample, noise=noise)
        dist = model.encode(x).latent_dist
        return model.decode(dist.mean + dist.std * noise if sample else dist.mode()).sample
    return fn


def decode_fn(model, latent, scale_shift):  # scale_shift: (B, 2) per-file factors
    return model.decode_from_latent(latent, scale_shift[:, 0], scale_shift[:, 1])


def to_uint8(x):
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


# ------------------------------------------------------------------------------------------ driver
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True, help="diffusers folder, hub id, or LDM .ckpt/.safetensors")
    p.add_argument("--subfolder", default=None, help="e.g. vae, for a whole SD repository")
    p.add_argument("--input", required=True, help="image, latent file, or folder (searched recursively)")
    p.add_argument("--output", help="file or folder (a folder when --input is one, or with --eval)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--encode", action="store_true", help="write latents (.pt or .safetensors)")
    mode.add_argument("--decode", action="store_true", help="latent files -> images")
    mode.add_argument("--eval", action="store_true", help="reconstruct and measure PSNR/SSIM/LPIPS/rFID")
    mode.add_argument("--latent_stats", action="store_true", help="latent mean/std -> scaling_factor")
    p.add_argument("--sample", action="store_true", help="posterior sample instead of its mode")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample (combined with each file's name)")
    tiling = p.add_mutually_exclusive_group()
    tiling.add_argument("--tiling", dest="tiling", action="store_const", const=True, default=None,
                        help=f"always tile (default: when an image's larger side > {AUTO_TILING_SIDE} px)")
    tiling.add_argument("--no_tiling", dest="tiling", action="store_const", const=False, help="never tile")
    p.add_argument("--tile_size", type=int, default=DEFAULT_TILE_SIZE,
                   help=f"tile side in pixels, whatever the model's sample_size (default {DEFAULT_TILE_SIZE}): "
                        "smaller saves memory, larger saves time")
    p.add_argument("--tile_mode", choices=["exact", "blend"], default="exact",
                   help="exact: seam-free, equal to untiled up to rounding; blend: constant memory, visible seams")
    p.add_argument("--slicing", action="store_true", help="one image of a batch at a time (less memory)")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps ... (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--ext", default=None, help="output extension in folder mode (.pt/.safetensors, .png, .jpg ...)")
    p.add_argument("--latent_format", choices=["files", "safetensors-shards"], default="files",
                   help="--encode: one file per image, or shards of --shard_size latents with OUT/index.json")
    p.add_argument("--shard_size", type=int, default=1000, help="latents per shard (safetensors-shards)")
    p.add_argument("--allow_nonfinite", action="store_true",
                   help="write results holding NaN/inf (a warning) instead of failing those files")
    p.add_argument("--lpips", choices=["auto", "on", "off"], default="auto", help="LPIPS in --eval")
    p.add_argument("--rfid", choices=["auto", "on", "off"], default="auto", help="rFID in --eval (biased at small N)")
    p.add_argument("--grid_images", type=int, default=8, help="images in --eval's grid.png")
    p.add_argument("--num_images", type=int, default=1000, help="--latent_stats: images to encode")
    p.add_argument("--resolution", type=int, help="--latent_stats: image side (default: the model's sample_size)")
    p.add_argument("--write_config", action="store_true", help="--latent_stats: scaling_factor -> config.json")
    p.add_argument("--shift_factor", action="store_true", help="--write_config: also shift_factor (SD3/FLUX)")
    args = p.parse_args(argv)
    if args.output is None and not args.latent_stats:
        p.error("--output is required (except with --latent_stats)")
    return args


def load_model(args):
    from vae import AutoencoderKL
    try:
        return AutoencoderKL.from_pretrained(args.model_path, subfolder=args.subfolder)
    except Exception as e:  # missing path, offline hub, corrupt or mismatched weights, bad config
        raise CLIError(f"cannot load model {args.model_path!r}: {one_line(e)}") from None


def pick_device(name):
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.empty(1, device=device)
    except Exception as e:
        raise CLIError(f"device {name!r} is not usable: {one_line(e)}") from None
    return device


def latent_stats(args):
    """--latent_stats: the latents' mean/std over --num_images images of --input (fid.py); --write_config."""
    import fid
    folder = os.path.join(args.model_path, args.subfolder or "")
    if args.write_config and not os.path.isfile(os.path.join(folder, "config.json")):
        raise CLIError(f"--write_config needs a local diffusers folder (with config.json), not {args.model_path!r}")
    device = pick_device(args.device)
    model = load_model(args).to(device, DTYPES[args.dtype])
    try:
        stats = fid.dataset_latent_statistics(model, fid.image_dataset(args.input, args.resolution or model.config[
            "sample_size"]), args.num_images, args.batch_size, args.seed, 4 if device.type == "cuda" else 0, True)
        print(stats.summary())
        if args.write_config:
            updates = stats.config_updates(shift=args.shift_factor)
            print(f"wrote {updates} into {folder}; before: {fid.write_latent_config(folder, updates)}")
    except (UserError, ValueError) as e:
        raise CLIError(one_line(e)) from None
    return 0


def run(args):
    mode = "encode" if args.encode else "decode" if args.decode else "eval" if args.eval else "reconstruct"
    if args.batch_size < 1 or args.grid_images < 0 or args.shard_size < 1:
        raise CLIError("--batch_size and --shard_size must be >= 1 and --grid_images >= 0")
    if args.latent_stats:
        return latent_stats(args)
    shards, torchrun = args.latent_format == "safetensors-shards", "WORLD_SIZE" in os.environ
    if (shards or torchrun) and mode != "encode":
        raise CLIError("torchrun and --latent_format safetensors-shards are for --encode (--decode reads index.json)")
    if torchrun and args.device:  # train.init_distributed below picks it
        raise CLIError("under torchrun each process uses cuda:LOCAL_RANK (the CPU without CUDA): leave out --device")
    jobs, folder_mode = plan(args, mode)
    check_writable(args.output if folder_mode or mode == "eval" else os.path.dirname(os.path.abspath(jobs[0][2])))
    if torchrun:  # train.py's set-up: RANK, WORLD_SIZE, LOCAL_RANK; nccl on GPU, gloo on CPU
        from train import init_distributed
    rank, world, device = init_distributed() if torchrun else (0, 1, pick_device(args.device))
    # each process adds its finished files in torchrun's key-value store: rank 0's bar shows the sum, no collective
    # (which would make every process wait for the slowest every few batches)
    store = world > 1 and dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    model = load_model(args)
    try:
        runner = Runner(model, device, DTYPES[args.dtype], args.tiling, args.tile_size, args.slicing, args.tile_mode)
    except ValueError as e:
        raise CLIError(one_line(e)) from None
    evaluator = Evaluator(args.lpips, args.rfid, device, args.grid_images) if mode == "eval" else None
    cfg = model.config
    settings = {"scaling_factor": cfg["scaling_factor"], "shift_factor": cfg["shift_factor"],
                "model": args.model_path + (f"/{args.subfolder}" if args.subfolder else ""), "sampled": args.sample}
    # Each process takes every world-th of the same sorted inputs: the same split on every rerun, without talking,
    # and a fair share of each subfolder (contiguous blocks could give one a whole folder of large images).
    total, mine = len(jobs), jobs[rank::world]
    jobs = latents.not_done(mine, args.output, settings, shards) if torchrun or shards else mine
    skipped = len(mine) - len(jobs)
    writer = latents.ShardWriter(args.output, rank, args.shard_size, settings) if shards else None

    from tqdm import tqdm
    bar = tqdm(total=total, unit="file", disable=total < 2 or rank > 0, file=sys.stderr, dynamic_ncols=True,
               desc=f"{world} processes" if world > 1 else None)
    failed, written, pending, claimed = [], [], {}, {}

    def tick(n):  # n more files finished here (written, failed or skipped); under torchrun the sum over processes
        bar.update(store.add("infer.py/files", n) - bar.n if store else n)

    def warn(message):
        bar.write(message, file=sys.stderr)

    def flush(key):
        items = pending.pop(key)
        names = [it["name"] for it in items]
        try:
            if mode == "decode":
                runner.set_tiling(*items[0]["size_hint"])
                factors = torch.tensor([[it["scale"], it["shift"]] for it in items])
                fn, inputs = decode_fn, [torch.stack([it["latent"] for it in items]), factors]
            else:
                x = runner.pad(losses.from_uint8(torch.stack([it["pixels"] for it in items])))
                runner.set_tiling(*x.shape[-2:])
                lat = (cfg["latent_channels"], x.shape[2] // runner.factor, x.shape[3] // runner.factor)
                noise = torch.stack([torch.randn(lat, generator=torch.Generator().manual_seed(
                    noise_seed(args.seed, n))) if args.sample else torch.zeros(lat) for n in names])
                fn, inputs = image_fn(mode == "encode", args.sample), [x, noise]
            desc = names[0] if len(names) == 1 else f"{len(names)} images"
            # shown once a batch has run for a second, so a folder of small images does not flicker
            with tqdm(total=runner.count_convs(fn, inputs), unit="conv", desc=desc, leave=False, delay=1,
                      file=sys.stderr, dynamic_ncols=True) as convs:
                out = runner.guarded(fn, inputs, names, warn, progress=ConvProgress(convs))
        except (RuntimeError, ValueError) as e:  # e.g. out of memory: say how to avoid it
            hint = " (try --tiling, --slicing or a smaller --batch_size)" if "memory" in str(e).lower() else ""
            failed.extend(f"{n}: {one_line(e)}{hint}" for n in names)
            tick(len(items))
            return
        for it, result in zip(items, out):
            if not torch.isfinite(result).all():  # e.g. a NaN latent, or an fp16 overflow that fp32 did not cure
                if not args.allow_nonfinite:
                    failed.append(f"{it['name']}: non-finite values (NaN/inf) in the result; nothing written "
                                  "(--allow_nonfinite writes it anyway)")
                    tick(1)
                    continue
                warn(f"warning: {it['name']}: non-finite values (NaN/inf) in the result, written anyway")
            try:
                if writer is not None:  # a failure to write a shard stops the run (UserError)
                    writer.add(it["name"], result, it["size"])
                elif mode == "encode":
                    latents.save_latent(it["dst"], result, {**settings, "image_size": it["size"]})
                else:
                    pixels = to_uint8(result[:, :it["size"][0], :it["size"][1]])
                    save_image(it["dst"], pixels)
                    if evaluator is not None:
                        evaluator.add(it["index"], it["name"], it["pixels"], pixels)
                written.append(it["dst"])
            except (OSError, ValueError, RuntimeError) as e:
                failed.append(f"{it['name']}: cannot write {it['dst']}: {one_line(e)}")
            tick(1)

    tick(skipped)
    start = time.perf_counter()
    for index, (src, name, dst) in enumerate(jobs):
        if dst in claimed:
            failed.append(f"{name}: skipped, its output {dst} is also the output of {claimed[dst]}")
            tick(1)
            continue
        claimed[dst] = name
        item = {"index": index, "name": name, "dst": dst}
        try:
            if mode == "decode":
                item["latent"], item["size"], item["scale"], item["shift"] = read_latent(src, model)
                h, w = item["latent"].shape[1:]
                item["size_hint"] = (h * runner.factor, w * runner.factor)
                key = (h, w)
            else:
                hint = " (a latent file: use --decode)" if src.lower().endswith(LATENT_EXTENSIONS) else ""
                try:
                    img = load_image(src)
                except BadImageError as e:
                    raise CLIError(f"{e}{hint}") from None
                item["pixels"] = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
                item["size"] = key = (img.height, img.width)
        except UserError as e:  # the message names the file
            failed.append(str(e))
            tick(1)
            continue
        pending.setdefault(key, []).append(item)
        if len(pending[key]) >= args.batch_size:
            flush(key)
        elif sum(map(len, pending.values())) > MAX_PENDING_BATCHES * args.batch_size:
            flush(max(pending, key=lambda k: len(pending[k])))
    for key in list(pending):
        flush(key)
    if writer is not None:
        writer.flush()
    while store and rank == 0 and bar.n < total:  # the others' files, on the bar as they finish
        time.sleep(0.2)
        tick(0)
    bar.close()

    if evaluator is not None and evaluator.rows:
        evaluator.finish(args.output)
    if not folder_mode and world == 1:
        if failed:
            raise CLIError(failed[0])
        print(f"wrote {written[0]}")
        return 0
    for message in failed:
        print(f"  failed: {message}", file=sys.stderr)
    counts = torch.tensor([len(written), skipped, len(failed)], device=device)
    if world > 1:
        dist.all_reduce(counts)  # also waits for every process (and its last shard) before the index is made
    n_written, n_skipped, n_failed = counts.tolist()
    if rank == 0:
        where = " ({1} latents in {0})".format(*latents.write_index(args.output)) if shards else ""
        skip = f", {n_skipped} skipped (done before)" if torchrun or shards else ""
        print(f"done: {n_written} written to {args.output}{where}{skip}, {n_failed} failed, "
              f"{n_written / (time.perf_counter() - start):.1f} images/s")
    return 1 if n_failed else 0


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory (try --tiling, --slicing or a smaller --batch_size)", file=sys.stderr)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 1


if __name__ == "__main__":
    sys.exit(main())
