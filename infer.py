"""Encode, decode, reconstruct and evaluate images with the SD 1.5 VAE from the command line.

    # reconstruct (encode + decode) one image, or every image under a folder (relative paths mirrored)
    python infer.py --model_path stabilityai/sd-vae-ft-mse --input image.jpg --output reconstructed.jpg
    python infer.py --model_path stabilityai/sd-vae-ft-mse --input photos/ --output recon/ --batch_size 8
    # latents for diffusion training (.pt or .safetensors by the output's extension; --ext in folder mode)
    python infer.py --model_path ... --input image.jpg --output latent.pt --encode [--sample --seed 0]
    python infer.py --model_path ... --input photos/ --output latents/ --encode --ext .safetensors
    python infer.py --model_path ... --input latent.pt --output decoded.png --decode
    # every GPU, resumable (README: "Caching latents on many GPUs"); shards and OUT/index.json: latents.py
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
fixed cost, so small tiles are slow). With --dtype fp16/bf16 a non-finite result is redone in fp32.
--eval: PSNR/SSIM/LPIPS (losses.py) and rFID (biased upwards at small N: compare at equal N) of the 8-bit
reconstructions (fid.py's Evaluator). README "Inference" and "Is my VAE ready?" say more.

Errors: one line on stderr, exit code 1, no traceback, no partial file (outputs are written to a temporary
file and renamed). In folder mode a bad file is reported and skipped, the others are processed, and the
summary counts every failure (exit code 1 if any; under torchrun rank 0's alone, see run()). Usage errors: 2.
"""
import argparse
import copy
import errno
import os
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

import latents
from data import BadImageError, DataError, UserError, find_images, load_image, one_line
from losses import from_uint8, to_uint8
from vae import atomic_write

SAVE_FORMATS = {".png": ("PNG", {}), ".jpg": ("JPEG", {"quality": 95}), ".jpeg": ("JPEG", {"quality": 95}),
                ".webp": ("WEBP", {"quality": 95}), ".bmp": ("BMP", {}), ".tif": ("TIFF", {}),
                ".tiff": ("TIFF", {})}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
AUTO_TILING_SIDE = 1024
DEFAULT_TILE_SIZE = 512
MAX_PENDING_BATCHES = 4  # images of many different sizes wait at most this many batches' worth in memory


class CLIError(UserError):
    """A problem the user must fix; main() prints it as one line and exits with 1."""


# ------------------------------------------------------------------------------------------ the computation
def pad(x, factor):
    """Pad (B, C, H, W) on the bottom/right to a multiple of the downsampling factor. Reflection keeps image
    statistics at the border (zeros would darken it); it needs the image to be larger than the pad, so tiny
    images are padded by repeating the edge instead."""
    H, W = x.shape[-2:]
    ph, pw = -H % factor, -W % factor
    if ph == pw == 0:
        return x
    return F.pad(x, (0, pw, 0, ph), mode="reflect" if ph < H and pw < W else "replicate")


def encode_images(model, images, noise=None):
    """Images in [-1, 1], (B, 3, H, W) of any size -> diffusion-ready latents (B, C, ceil(H/f), ceil(W/f)):
    (z - shift_factor) * scaling_factor, z the posterior's mode, or mean + std * noise for a sample (noise: a
    (B, C, h, w) standard normal)."""
    return model.encode_to_latent(pad(images, model.downsample_factor), sample=noise is not None, noise=noise)


def reconstruct_images(model, images, noise=None):  # (B, 3, H, W) -> (B, 3, H', W'), the padded size
    posterior = model.encode(pad(images, model.downsample_factor)).latent_dist  # z as encode_images draws it
    return model.decode(posterior.mode() if noise is None else posterior.mean + posterior.std * noise).sample


def decode_latents(model, latent, factors):  # factors: (B, 2), each file's scaling_factor and shift_factor
    return model.decode_from_latent(latent, factors[:, 0], factors[:, 1])


def noise_seed(seed, name):
    """The --sample seed of one file: independent of batching and order, different for each file."""
    return zlib.crc32(f"{seed}:{name}".encode())


class Runner:
    """The model on its device and dtype, the tiling policy and the fp32 retry of non-finite results."""

    def __init__(self, model, device, dtype, tiling=None, tile_size=DEFAULT_TILE_SIZE, slicing=False,
                 tile_mode="exact", auto_tiling_side=AUTO_TILING_SIDE):
        self.master = model.eval().requires_grad_(False)  # fp32 weights, kept for the fp32 retry
        self.model = (copy.deepcopy(model) if dtype != torch.float32 else model).to(device, dtype)
        self.device, self.dtype, self.fp32_on_device = device, dtype, None
        self.tiling, self.auto_tiling_side = tiling, auto_tiling_side
        self.tile_args = dict(tile_sample_size=tile_size, mode=tile_mode)
        for m in {id(m): m for m in (self.master, self.model)}.values():
            m.enable_tiling(**self.tile_args)  # validates the arguments now; switched per batch below
            if slicing:
                m.enable_slicing()

    def set_tiling(self, height, width):
        on = self.tiling if self.tiling is not None else max(height, width) > self.auto_tiling_side
        for m in (self.master, self.model):
            m.enable_tiling(**self.tile_args) if on else m.disable_tiling()

    def guarded(self, fn, inputs, names, warn):
        """fn(model, *inputs) on the batch in self.dtype; a non-finite image is redone in fp32."""
        with torch.no_grad():
            out = fn(self.model, *[t.to(self.device, self.dtype) for t in inputs]).float()
            if self.dtype == torch.float32:
                return out.cpu()
            for i in range(len(out)):
                if not torch.isfinite(out[i]).all():
                    warn(f"warning: {names[i]}: non-finite result in {self.dtype}, redone in fp32")
                    if self.fp32_on_device is None:
                        self.fp32_on_device = self.master.to(self.device)
                    one = [t[i:i + 1].to(self.device, torch.float32) for t in inputs]
                    out[i] = fn(self.fp32_on_device, *one)[0]
            return out.cpu()


# ------------------------------------------------------------------------------------------ batches
@dataclass
class Item:
    """One input on its way through: pixels (3, H, W) uint8, or a latent (C, h, w) with its file's factors."""
    index: int  # in file order, which --eval's table and grid keep
    name: str  # the relative path: messages, --sample seeds, shard keys
    dst: str
    data: torch.Tensor
    size: tuple  # (H, W) of the image
    factors: tuple = ()  # --decode: (scaling_factor, shift_factor)


def read_inputs(jobs, mode, model, fail):
    """Items of the jobs whose input is readable; each other one, and an input whose output another input has,
    goes to fail(message naming the file)."""
    claimed = {}
    for index, (src, name, dst) in enumerate(jobs):
        if dst in claimed:
            fail(f"{name}: skipped, its output {dst} is also the output of {claimed[dst]}")
            continue
        claimed[dst] = name
        try:
            if mode == "decode":
                data, size, *factors = latents.read_latent(src, model)
            else:
                img, factors = load_image(src), ()
                data, size = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1), img.size[::-1]
        except UserError as e:  # the message names the file
            latent = isinstance(e, BadImageError) and src.lower().endswith(latents.LATENT_EXTENSIONS)
            fail(f"{e}{' (a latent file: use --decode)' if latent else ''}")
            continue
        yield Item(index, name, dst, data, tuple(size), tuple(factors))


def batches(items, batch_size, max_pending):
    """Lists of up to batch_size items of one shape, each as soon as it is full; with more than max_pending
    items waiting (images of many sizes), the largest group goes early, so memory stays bounded."""
    pending = {}
    for item in items:
        group = pending.setdefault(item.data.shape, [])
        group.append(item)
        if len(group) >= batch_size:
            yield pending.pop(item.data.shape)
        elif sum(map(len, pending.values())) > max_pending:
            yield pending.pop(max(pending, key=lambda shape: len(pending[shape])))
    yield from pending.values()


def run_batch(runner, batch, mode, sample=False, seed=0, warn=print):
    """Same-shape items -> latents (--encode) or images in [-1, 1] at the padded size (the other modes)."""
    names, data = [it.name for it in batch], torch.stack([it.data for it in batch])
    runner.set_tiling(*batch[0].size)
    if mode == "decode":
        return runner.guarded(decode_latents, [data, torch.tensor([it.factors for it in batch])], names, warn)
    fn, x = encode_images if mode == "encode" else reconstruct_images, from_uint8(data)
    if not sample:
        return runner.guarded(fn, [x], names, warn)
    f, channels = runner.master.downsample_factor, runner.master.config["latent_channels"]
    shape = (channels, -(-x.shape[2] // f), -(-x.shape[3] // f))
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(noise_seed(seed, n))) for n in names]
    return runner.guarded(fn, [x, torch.stack(noise)], names, warn)


class Outputs:
    """Where results go (files, shards, --eval's table), what was written and what failed, the per-file
    progress bar, and the one printer: summaries from rank 0 on stdout, per-file lines from every process."""

    def __init__(self, mode, settings, shards=None, evaluator=None, allow_nonfinite=False, total=1,
                 rank=0, world=1, store=None):
        from tqdm import tqdm
        self.mode, self.settings, self.shards, self.evaluator = mode, settings, shards, evaluator
        self.allow_nonfinite, self.rank, self.world, self.store = allow_nonfinite, rank, world, store
        self.written, self.failed, self.skipped, self.start = [], [], 0, time.perf_counter()
        self.total, self.done = total, 0  # files finished (written, failed or skipped) by every process
        self.bar = tqdm(total=total, unit="file", disable=total < 2 or rank > 0, file=sys.stderr,
                        dynamic_ncols=True, desc=f"{world} processes" if world > 1 else None)

    def say(self, message, every_rank=False):
        """A line above the bar: on stdout from rank 0, or with every_rank on stderr from the process that
        knows it (a file's warning or failure)."""
        if every_rank or self.rank == 0:
            self.bar.write(message, file=sys.stderr if every_rank else sys.stdout)

    def warn(self, message):
        self.say(message, every_rank=True)

    def tick(self, n=1):
        """n more files finished here. Under torchrun each process adds its count in torchrun's key-value
        store and rank 0's bar shows the sum: no collective, which would make all wait for the slowest."""
        self.done = self.store.add("infer.py/files", n) if self.store else self.done + n
        self.bar.update(self.done - self.bar.n)

    def fail(self, message):
        self.failed.append(message)
        self.tick()

    def save(self, item, result):
        if not torch.isfinite(result).all():  # e.g. a NaN latent, or an fp16 overflow that fp32 did not cure
            if not self.allow_nonfinite:
                return self.fail(f"{item.name}: non-finite values (NaN/inf) in the result; nothing written "
                                 "(--allow_nonfinite writes it anyway)")
            self.warn(f"warning: {item.name}: non-finite values (NaN/inf) in the result, written anyway")
        try:
            if self.shards is not None:  # a failure to write a shard stops the run (UserError)
                self.shards.add(item.name, result, item.size)
            elif self.mode == "encode":
                latents.save_latent(item.dst, result, {**self.settings, "image_size": item.size})
            else:
                pixels = to_uint8(result[:, :item.size[0], :item.size[1]])
                save_image(item.dst, pixels)
                if self.evaluator is not None:
                    self.evaluator.add(item.index, item.name, item.data, pixels)
        except (OSError, ValueError, RuntimeError) as e:
            return self.fail(f"{item.name}: cannot write {item.dst}: {one_line(e)}")
        self.written.append(item.dst)
        self.tick()

    def finish(self, folder, folder_mode, resumable, device):
        """The last shard, the other processes' files on rank 0's bar, --eval's table, the summary; the exit
        status. Under torchrun only rank 0 exits non-zero, for the failures of every process: torchrun answers
        any non-zero exit with its own traceback, so the job gets one such report, not one per process."""
        if self.shards is not None:
            self.shards.flush()
        while self.store and self.rank == 0 and self.done < self.total:
            time.sleep(0.2)
            self.tick(0)
        self.bar.close()
        if self.evaluator is not None and self.evaluator.rows:
            self.evaluator.finish(folder)
        if not folder_mode and not resumable:  # one file: its line, or its error
            if self.failed:
                raise CLIError(self.failed[0])
            self.say(f"wrote {self.written[0]}")
            return 0
        for message in self.failed:
            self.warn(f"  failed: {message}")
        counts = torch.tensor([len(self.written), self.skipped, len(self.failed)], device=device)
        if self.world > 1:
            dist.all_reduce(counts)  # also waits for every process (and its last shard) before the index
        written, skipped, failed = counts.tolist()
        summary = f"done: {written} written to {folder}"
        if self.shards is not None and self.rank == 0:
            summary += " ({1} latents in {0})".format(*latents.write_index(folder))
        if resumable:
            summary += f", {skipped} skipped (done before)"
        self.say(f"{summary}, {failed} failed, {written / (time.perf_counter() - self.start):.1f} images/s")
        if failed and self.world > 1 and self.rank == 0:
            self.warn(f"error: {failed} input(s) failed, listed above; torchrun reports rank 0's exit status")
        return 1 if failed and self.rank == 0 else 0


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
    allowed = latents.LATENT_EXTENSIONS if mode == "encode" else tuple(SAVE_FORMATS)
    unknown = f"unknown extension for {mode}; use one of {', '.join(allowed)}"
    if args.ext:
        args.ext = args.ext if args.ext.startswith(".") else "." + args.ext
        if args.ext.lower() not in allowed:
            raise CLIError(f"--ext {args.ext}: {unknown}")
    src, out = args.input, args.output
    if not os.path.exists(src):
        raise CLIError(f"input {src!r} does not exist")
    out_root = os.path.join(out, "reconstructions") if mode == "eval" else out
    if mode == "eval" and os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"--eval writes a folder (metrics.csv, grid.png, reconstructions/); {out!r} is a file")
    shards = mode == "encode" and args.latent_format == "safetensors-shards"
    index = mode == "decode" and src.lower().endswith(".json")  # the index of latent shards
    if os.path.isdir(src) or index:
        if os.path.exists(out_root) and not os.path.isdir(out_root):
            raise CLIError(f"--input is a folder or index, so --output must be a folder, but {out_root!r} "
                           "is a file")
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
            raise CLIError(f"output {dst!r}: {unknown}")
        jobs = [(src, name, dst)]
    if shards:  # one tensor per input in a shard, named by the input's relative path: no file per input
        return [(s, name, name) for s, name, _ in jobs], True
    for s, _, d in jobs:
        if not index and os.path.exists(d) and os.path.samefile(s, d):
            raise CLIError(f"output {d!r} would overwrite its input; choose another --output")
    return jobs, os.path.isdir(src) or index


def check_writable(folder):
    """Fail before loading the model if outputs cannot be written (a file in the path, no permission, a
    filesystem that takes no files), creating nothing: a run that fails later leaves no empty folder."""
    parent = os.path.abspath(folder)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    try:
        if not os.path.isdir(parent):
            raise NotADirectoryError(errno.ENOTDIR, f"{parent!r} is a file")
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:  # ENOENT in a folder that exists: a virtual filesystem such as /proc
        why = f"{parent!r} takes no new files" if e.errno == errno.ENOENT else e.strerror or one_line(e)
        raise CLIError(f"cannot write to {folder!r}: {why}") from None


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
                   help=f"tile side in pixels, whatever the model's sample_size (default "
                        f"{DEFAULT_TILE_SIZE}): smaller saves memory, larger saves time")
    p.add_argument("--tile_mode", choices=["exact", "blend"], default="exact",
                   help="exact: seam-free, equal to untiled up to rounding; blend: constant memory, seams")
    p.add_argument("--slicing", action="store_true", help="one image of a batch at a time (less memory)")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps ... (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--ext", default=None, help="output extension in folder mode (.pt/.safetensors, .png ...)")
    p.add_argument("--latent_format", choices=["files", "safetensors-shards"], default="files",
                   help="--encode: one file per image, or shards of --shard_size latents with OUT/index.json")
    p.add_argument("--shard_size", type=int, default=1000, help="latents per shard (safetensors-shards)")
    p.add_argument("--allow_nonfinite", action="store_true",
                   help="write results holding NaN/inf (a warning) instead of failing those files")
    p.add_argument("--lpips", choices=["auto", "on", "off"], default="auto", help="LPIPS in --eval")
    p.add_argument("--rfid", choices=["auto", "on", "off"], default="auto",
                   help="rFID in --eval (biased at small N)")
    p.add_argument("--grid_images", type=int, default=8, help="images in --eval's grid.png")
    p.add_argument("--num_images", type=int, default=1000, help="--latent_stats: images to encode")
    p.add_argument("--resolution", type=int, help="--latent_stats: image side (default: model's sample_size)")
    p.add_argument("--write_config", action="store_true", help="--latent_stats: write scaling_factor")
    p.add_argument("--shift_factor", action="store_true", help="--write_config: also shift_factor (SD3/FLUX)")
    args = p.parse_args(argv)
    if args.output is None and not args.latent_stats:
        p.error("--output is required (except with --latent_stats)")
    return args


def load_model(args):
    from vae import AutoencoderKL
    try:
        model = AutoencoderKL.from_pretrained(args.model_path, subfolder=args.subfolder)
    except Exception as e:  # missing path, offline hub, corrupt or mismatched weights, bad config
        raise CLIError(f"cannot load model {args.model_path!r}: {one_line(e)}") from None
    return model.set_fast_kernels(True)  # vae.py computes plainly unless asked; a command line wants speed


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
        raise CLIError(f"--write_config needs a local diffusers folder (config.json): {args.model_path!r}")
    device = pick_device(args.device)
    model = load_model(args).to(device, DTYPES[args.dtype])
    try:
        images = fid.image_dataset(args.input, args.resolution or model.config["sample_size"])
        stats = fid.dataset_latent_statistics(model, images, args.num_images, args.batch_size, args.seed,
                                              4 if device.type == "cuda" else 0, True)
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
        raise CLIError("torchrun and --latent_format safetensors-shards are for --encode "
                       "(--decode reads index.json)")
    if torchrun and args.device:  # train.init_distributed below picks it
        raise CLIError("under torchrun each process uses cuda:LOCAL_RANK (the CPU without CUDA): "
                       "leave out --device")
    jobs, folder_mode = plan(args, mode)
    check_writable(args.output if folder_mode or mode == "eval" else os.path.dirname(jobs[0][2]) or ".")
    if torchrun:  # train.py's set-up: RANK, WORLD_SIZE, LOCAL_RANK; nccl on GPU, gloo on CPU
        from train import init_distributed
    rank, world, device = init_distributed() if torchrun else (0, 1, pick_device(args.device))
    model = load_model(args)
    try:
        runner = Runner(model, device, DTYPES[args.dtype], tiling=args.tiling, tile_size=args.tile_size,
                        slicing=args.slicing, tile_mode=args.tile_mode)
    except ValueError as e:  # vae.py's check of the tiling options, in the command line's words
        raise CLIError(one_line(e).replace("tile_sample_size", "--tile_size")) from None
    evaluator = None
    if mode == "eval":
        from fid import Evaluator
        evaluator = Evaluator(args.lpips, args.rfid, device, args.grid_images)
    name = args.model_path + (f"/{args.subfolder}" if args.subfolder else "")
    settings = {**{k: model.config[k] for k in ("scaling_factor", "shift_factor")}, "model": name,
                "sampled": args.sample}
    # Each process takes every world-th of the same sorted inputs: the same split on every rerun, without
    # talking, and a fair share of each subfolder (blocks could give one a whole folder of large images).
    mine = jobs[rank::world]
    todo = latents.not_done(mine, args.output, settings, shards) if torchrun or shards else mine
    store = world > 1 and dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
    writer = latents.ShardWriter(args.output, rank, args.shard_size, settings) if shards else None
    out = Outputs(mode, settings, shards=writer, evaluator=evaluator, allow_nonfinite=args.allow_nonfinite,
                  total=len(jobs), rank=rank, world=world, store=store)
    out.skipped = len(mine) - len(todo)
    out.tick(out.skipped)
    for batch in batches(read_inputs(todo, mode, model, out.fail), args.batch_size,
                         MAX_PENDING_BATCHES * args.batch_size):
        try:
            results = run_batch(runner, batch, mode, sample=args.sample, seed=args.seed, warn=out.warn)
        except (RuntimeError, ValueError) as e:  # e.g. out of memory: say how to avoid it
            hint = " (try --tiling, --slicing or a smaller --batch_size)" * ("memory" in str(e).lower())
            for it in batch:
                out.fail(f"{it.name}: {one_line(e)}{hint}")
            continue
        for it, result in zip(batch, results):
            out.save(it, result)
    return out.finish(args.output, folder_mode, torchrun or shards, device)


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
