"""Is a VAE ready for a diffusion model? Reconstruction FID, latent statistics, and infer.py --eval's table
(per-image PSNR / SSIM / LPIPS from losses.py, with rFID).

rFID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule"): the Fréchet distance between
Gaussians fitted to Inception-v3 pool features of the original images and of their reconstructions. The
network is the one FID scores are compared against: TensorFlow's 2015-12-05 Inception graph as ported by
pytorch-fid, used as it is (`pytorch_fid.inception.InceptionV3`, weights
`pt_inception-2015-12-05-6726825d.pth`), with its preprocessing (bilinear resize to 299x299) and its 2048-d
average-pool features, read from the cache pytorch-fid itself uses ($TORCH_HOME/hub/checkpoints/). pytorch-fid
is an optional requirement (requirements-fid.txt), imported when rFID is switched on.

Latent statistics (LDM's `scale_by_std`, CompVis latent-diffusion `ldm/models/diffusion/ddpm.py`): the
diffusion model should see latents of unit variance, so `scaling_factor` = 1 / std of the latents over
training images (SD 1.x: 0.18215, SDXL: 0.13025); SD3/FLUX also subtract a `shift_factor` (their mean) first.

    net = FIDInception.pretrained(device)
    real, recon = FeatureStats(net), FeatureStats(net)
    for x in batches:                                  # (B, 3, H, W) in [-1, 1]
        real.add(x); recon.add(vae(x).sample)
    print(recon.frechet_distance(real), real.n)       # FID is biased upwards at small N: always report N

    stats = dataset_latent_statistics(vae, image_dataset("photos/", 512), num_images=1000)
    print(stats.summary())
    write_latent_config("my_vae", stats.config_updates(shift=False))   # writes scaling_factor = 1 / std
"""
import contextlib
import csv
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image
from tqdm import tqdm

import losses
from config import DataConfig
from data import (ImageDataset, ResumableLoader, SDTransform, UserError, find_images, hf_image_column,
                  image_grid, is_saved_dataset, load_hf_dataset, one_line)
from vae import atomic_write

NO_RFID = "infer.py --eval: --rfid off; training: logging.val_rfid: false"


class InceptionWeightsError(UserError, RuntimeError):
    """rFID cannot run: pytorch-fid is not installed, or its Inception weights are missing (and could not be
    downloaded) or unreadable."""


def inception_weights_path(url) -> str:
    """Where torch.hub, and so pytorch-fid, caches the file at `url`: $TORCH_HOME/hub/checkpoints/<name>."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def _ensure_inception_weights(url, download) -> str:
    # As losses.py does for LPIPS's VGG16: the cache first, then one download (losses.download_to_cache), so
    # an offline machine gets one clear line at once. No hash check: pytorch-fid does none either (the name's
    # suffix is not documented as a sha256 prefix); pytorch-fid loads the file strictly instead.
    path, why = inception_weights_path(url), "no download tried"
    if os.path.isfile(path):
        return path
    if download:
        try:
            losses.download_to_cache(url, path)
            return path
        except Exception as e:  # no network, proxy, read-only cache...
            why = f"the download from {url} failed: {one_line(e)}"
    raise InceptionWeightsError(
        f"rFID needs pytorch-fid's Inception weights '{os.path.basename(path)}', which are not at {path} "
        f"({why}). Copy the file into $TORCH_HOME/hub/checkpoints/ (here {os.path.dirname(path)}), or do "
        f"without rFID ({NO_RFID})")


class FIDInception(nn.Module):
    """pytorch-fid's InceptionV3 as FID uses it: images (B, 3, H, W) in [-1, 1] -> 2048-d pool features.

    The network FID scores are compared with: TensorFlow's 2015-12-05 Inception graph as pytorch-fid ports it
    (`pytorch_fid/inception.py`), resizing its input to 299x299 (bilinear). Frozen and always in eval mode
    (BatchNorm uses its running statistics); fp32 even under autocast."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def pretrained(cls, device=None, download=True):
        """The network with pt_inception's weights from the cache (downloaded there once if `download`)."""
        try:  # an optional requirement, imported when rFID is switched on
            from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3
        except ImportError:
            raise InceptionWeightsError(f"rFID needs pytorch-fid: pip install -r requirements-fid.txt, or do "
                                        f"without rFID ({NO_RFID})") from None
        path = _ensure_inception_weights(FID_WEIGHTS_URL, download)
        try:  # pytorch-fid reads the cached file itself (torch.hub's load_state_dict_from_url), strictly
            # normalize_input=False: pytorch-fid maps [0, 1] to [-1, 1] after its resize, which is affine, so
            # resizing our [-1, 1] images directly is the same computation.
            net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]], normalize_input=False)
        except Exception as e:  # not a torch file (a proxy's error page), or not pt_inception's keys/shapes
            raise InceptionWeightsError(f"cannot read {path} as pytorch-fid's Inception weights "
                                        f"({one_line(e)}); delete it to re-download, or do without rFID "
                                        f"({NO_RFID})") from None
        return cls(net).to(device)

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, x):
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.net(x.float())[0].flatten(1)  # [(B, 2048, 1, 1)] -> (B, 2048)


# --- feature statistics and the Fréchet distance ---------------------------------------------------------

class FeatureStats:
    """Running float64 sums of features (n, total, outer) giving their mean and covariance: `add` images, then
    `frechet_distance(other)`. Plain sums, not Welford updates: they add up across processes (DDP: all-reduce
    them), and in float64 the cancellation in outer/n - mean mean^T is far below what FID resolves."""

    def __init__(self, inception=None, dim=2048, device=None):
        self.inception = inception
        if device is None and inception is not None:
            device = next(inception.parameters()).device
        self.n = 0
        self.total = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, images):
        """images: (B, 3, H, W), uint8, or float in [-1, 1]. Floats are clamped and rounded to 8 bits first:
        the reference tools score image files, so a reconstruction is scored as it would be once saved."""
        pixels = images if images.dtype == torch.uint8 else losses.to_uint8(images)
        self.add_features(self.inception(losses.from_uint8(pixels.to(self.total.device))))

    def add_features(self, features):  # (B, dim)
        f = features.to(self.total.device, torch.float64)
        self.n += f.shape[0]
        self.total += f.sum(0)
        self.outer += f.T @ f

    def all_reduce(self):
        """DDP: every process's sums added up (a collective: call it on every rank). Returns self."""
        if dist.is_available() and dist.is_initialized():
            n = torch.tensor(float(self.n), dtype=torch.float64, device=self.total.device)
            for t in (n, self.total, self.outer):
                dist.all_reduce(t)
            self.n = int(n.item())
        return self

    def mean_cov(self):
        """(mean (dim,), unbiased covariance (dim, dim)), float64, as numpy.cov computes it."""
        if self.n < 2:
            raise UserError(f"FID needs at least 2 images in each set (got {self.n})")
        mean = self.total / self.n
        cov = (self.outer - self.n * torch.outer(mean, mean)) / (self.n - 1)
        return mean, cov

    def frechet_distance(self, other):
        return frechet_distance(*self.mean_cov(), *other.mean_cov())


def _sqrt_psd(cov):
    """Symmetric square root of a covariance by eigendecomposition. Eigenvalues below dim * eps * the largest
    are rounding noise (the covariance is not more accurate than that) and count as 0: with fewer images than
    dimensions most are, and the square root would turn noise of 1e-16 into 1e-8 per direction."""
    w, v = torch.linalg.eigh(cov)
    w = torch.where(w > w[-1] * len(w) * torch.finfo(w.dtype).eps, w, torch.zeros_like(w))
    return (v * w.sqrt()) @ v.T


def frechet_distance(mu1, cov1, mu2, cov2):
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2) between Gaussians, in float64.

    The trace term, tr(sqrtm(S1 S2)) in pytorch-fid, is the sum of the singular values of S1^1/2 S2^1/2 (its
    Gram matrix S1^1/2 S2 S1^1/2 is similar to S1 S2): two symmetric eigendecompositions and an SVD, all
    backward-stable. No square root of a non-symmetric matrix (scipy's sqrtm, which pytorch-fid retries with
    eps * I added when it fails), nor of the eigenvalues of S1^1/2 S2 S1^1/2, which would amplify their
    rounding noise: accurate also with rank-deficient covariances (fewer images than dimensions)."""
    mu1, cov1, mu2, cov2 = (t.to(torch.float64) for t in (mu1, cov1, mu2, cov2))
    diff = mu1 - mu2
    cross = torch.linalg.svdvals(_sqrt_psd(cov1) @ _sqrt_psd(cov2)).sum()
    value = diff @ diff + torch.trace(cov1) + torch.trace(cov2) - 2 * cross
    return max(float(value), 0.0)  # >= 0 as a squared distance; only rounding can take it below


# --- latent statistics ----------------------------------------------------------------------------------

@dataclass
class LatentStats:
    """Statistics of the raw latents z (before any scaling) over `num_images` images."""
    num_images: int
    mean: float
    std: float
    channel_mean: list
    channel_std: list

    @property
    def scaling_factor(self):
        return 1.0 / self.std  # LDM: scale_factor = 1 / z.flatten().std()

    def config_updates(self, shift=False):
        """The config.json keys to write: scaling_factor (SD 1.x/SDXL: latents = z * scale), and shift_factor
        with `shift` (SD3/FLUX: (z - shift) * scale; SD 1.x pipelines ignore it, so only when asked for).
        Per-channel statistics are reported, not written: diffusers' pipelines that read latents_mean/std
        combine them with scaling_factor in a way encode_to_latent does not."""
        # 5 significant digits, as published factors are written (0.18215, 0.13025): an estimate from ~1000
        # images is not more precise.
        updates = {"scaling_factor": float(f"{self.scaling_factor:.5g}")}
        return updates | ({"shift_factor": float(f"{self.mean:.5g}")} if shift else {})

    def summary(self):
        channels = [f"  channel {c}: mean {m:.5g}, std {s:.5g}"
                    for c, (m, s) in enumerate(zip(self.channel_mean, self.channel_std))]
        return "\n".join([f"latents of {self.num_images} images: mean {self.mean:.5g}, std {self.std:.5g}",
                          f"suggested scaling_factor {self.scaling_factor:.5g} (1/std), "
                          f"shift_factor {self.mean:.5g} (mean)"] + channels)


@torch.no_grad()
def latent_statistics(model, batches, num_images=1000, sample=True):
    """Mean and std of the latents of the first `num_images` images of `batches` ((B, 3, H, W) in [-1, 1]).

    z is a posterior *sample* by default, as in LDM's scale_by_std (its get_first_stage_encoding samples) and
    as diffusion training sees it, but no noise is drawn: the moments of z ~ N(mu, var) are taken in
    expectation (E z = mu, E z^2 = mu^2 + var), which is what a sampled estimate converges to, without its
    noise or its dependence on the order of the images. `sample=False` uses the mode (var = 0). LDM measures
    one batch; this pools all images in float64 sums, so the estimate does not depend on the batch size. std
    is torch.std's (unbiased)."""
    param = next(model.parameters())
    count, elements, s1, s2 = 0, 0, 0.0, 0.0
    for x in batches:
        x = x[:num_images - count].to(param.device, param.dtype)
        dist = model.encode(x).latent_dist
        mu, var = dist.mean.double(), dist.var.double() if sample else 0.0  # (B, C, h, w)
        s1 = s1 + mu.sum((0, 2, 3))
        s2 = s2 + (mu * mu + var).sum((0, 2, 3))
        elements += mu[:, 0].numel()
        count += x.shape[0]
        if count >= num_images:
            break
    if count == 0:
        raise UserError("no images to measure the latents of")

    def mean_std(total, squares, n):
        mean = total / n
        return mean, ((squares - n * mean * mean) / max(n - 1, 1)).clamp_min(0).sqrt()

    channel_mean, channel_std = mean_std(s1, s2, elements)
    mean, std = mean_std(s1.sum(), s2.sum(), elements * len(s1))
    return LatentStats(count, float(mean), float(std), channel_mean.tolist(), channel_std.tolist())


def image_dataset(source, resolution, image_column="image"):
    """The images of `source` through the SD transform (centre crop, no flip) as a data.ImageDataset: a folder
    of images (searched recursively), or a Hugging Face dataset (hub name, or a local copy: save_to_disk
    folder, parquet/arrow file), whose `train` split (else its first) is read."""
    resolution = resolution if isinstance(resolution, int) else resolution[0]  # sample_size may be [h, w]
    transform = SDTransform(resolution, center_crop=True, random_flip=False)
    bad = DataConfig.max_bad_fraction  # unreadable images tolerated as in training by default
    if os.path.isdir(source) and not is_saved_dataset(source):
        return ImageDataset(find_images(source), transform, max_bad_fraction=bad)
    splits = load_hf_dataset(source)
    splits = dict(splits) if isinstance(splits, dict) else {"train": splits}  # a DatasetDict is a dict
    split = "train" if "train" in splits else next(iter(splits))
    rows = hf_image_column(splits[split], image_column, f"dataset {source}:{split}")
    return ImageDataset(rows, transform, column=image_column, label=f"{source}:{split}", max_bad_fraction=bad)


def dataset_latent_statistics(model, dataset, num_images=1000, batch_size=8, seed=0, num_workers=0,
                              progress=False):
    """latent_statistics over up to `num_images` images of a data.ImageDataset, read in a seeded random
    order: a sample of the whole set, not its first files (a folder sorted by class would bias it)."""
    loader = ResumableLoader(dataset, batch_size, shuffle=True, drop_last=False, num_workers=num_workers,
                             seed=seed, persistent_workers=False)
    n = min(num_images, len(dataset))
    with tqdm(total=n, unit="image", disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
        def batches():  # a loop, not `bar.update(...) or x`: update() returns True whenever the bar redraws
            for b in loader:
                bar.update(len(b["pixel_values"]))
                yield b["pixel_values"]
        return latent_statistics(model, batches(), n)


def write_latent_config(folder, updates):
    """Set `updates` (config_updates()) in folder/config.json, changing nothing else; the previous file is
    kept as config.json.bak. Both writes are atomic. Returns the backup's path."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path, "rb") as f:
            original = f.read()
        config = json.loads(original)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the model's config {path} ({one_line(e)})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a model config (not a JSON object)")
    backup = path + ".bak"
    atomic_write(backup, lambda tmp: Path(tmp).write_bytes(original))
    config.update(updates)  # existing keys keep their place, and json.dumps the dict's order
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n", "utf-8"))
    return backup


# --- infer.py --eval: per-image metrics and rFID of reconstructions; table, CSV and grid -----------------

class Evaluator:
    """Per-image PSNR / SSIM / LPIPS with losses.py's functions; table, CSV and grid at the end."""

    def __init__(self, lpips, rfid, device, grid_images):
        self.rows, self.thumbs, self.grid_images, self.device = [], [], grid_images, device
        self.lpips, self.lpips_reason = optional_metric(
            "LPIPS", lpips, lambda download: losses.LPIPS(download=download).to(device))
        # rFID: Inception features of the originals and of the reconstructions, both as 8-bit images
        self.fid, self.fid_reason = optional_metric("rFID", rfid, lambda download: [
            FeatureStats(net) for net in [FIDInception.pretrained(device, download)] * 2])

    def add(self, index, name, original, recon):
        x, y = losses.from_uint8(original)[None], losses.from_uint8(recon)[None]
        row = {"file": name, "height": x.shape[2], "width": x.shape[3],
               "psnr": float(losses.psnr(x, y)[0]), "ssim": math.nan, "lpips": math.nan}
        with contextlib.suppress(ValueError):  # SSIM needs at least 11x11 pixels
            row["ssim"] = float(losses.ssim(x, y)[0])
        if self.lpips is not None:
            with torch.no_grad(), contextlib.suppress(RuntimeError):  # VGG needs ~16 px or more
                row["lpips"] = float(self.lpips(x.to(self.device), y.to(self.device)).flatten()[0])
        self.rows.append((index, row))
        for stats, pixels in zip(self.fid or (), (original, recon)):
            stats.add(pixels[None])
        if index < self.grid_images:
            self.thumbs.append((index, thumbnail(original), thumbnail(recon)))

    def finish(self, out):
        rows = [r for _, r in sorted(self.rows, key=lambda t: t[0])]
        keys = ["file", "height", "width", "psnr", "ssim", "lpips"]

        def write_csv(tmp):
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, keys)
                w.writeheader()
                w.writerows({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()}
                            for row in rows)
        atomic_write(os.path.join(out, "metrics.csv"), write_csv)
        thumbs = [t for _, *t in sorted(self.thumbs, key=lambda t: t[0])]
        if thumbs:
            tensors = [[losses.from_uint8(torch.from_numpy(np.array(t)).permute(2, 0, 1)) for t in pair]
                       for pair in thumbs]
            grid = Image.fromarray((image_grid(tensors) * 255).round().byte().permute(1, 2, 0).numpy())
            atomic_write(os.path.join(out, "grid.png"), lambda tmp: grid.save(tmp, format="PNG"))
        print(f"\n{len(rows)} image(s)          mean ±    std")
        for key, label, digits in (("psnr", "PSNR (dB)", 2), ("ssim", "SSIM", 4), ("lpips", "LPIPS", 4)):
            if key == "lpips" and self.lpips is None:
                print(f"{label:<12} {self.lpips_reason}")
                continue
            v = np.array([r[key] for r in rows], dtype=np.float64)
            v = v[np.isfinite(v)]  # inf PSNR (identical images) and undefined values are left out
            note = f"   ({len(rows) - len(v)} image(s) left out: undefined)" if len(v) < len(rows) else ""
            text = f"{v.mean():10.{digits}f} ± {v.std():6.{digits}f}" if len(v) else "       n/a"
            print(f"{label:<12} {text}{note}")
        real, recon = self.fid or (None, None)
        enough = real is not None and real.n >= 2
        rfid = (f"{recon.frechet_distance(real):10.3f} (N={real.n}; biased upwards at small N)" if enough
                else self.fid_reason if real is None else "n/a (needs N >= 2 images)")
        print(f"{'rFID':<12} {rfid}")
        grid_note = f" and {os.path.join(out, 'grid.png')}" if thumbs else ""
        print(f"wrote {os.path.join(out, 'metrics.csv')}{grid_note}")


def optional_metric(name, mode, build):
    """(metric, "") or (None, why not) for --lpips/--rfid auto|on|off; `build(download)` makes the metric.
    `on` downloads missing weights and turns a failure into an error; `auto` uses the metric if its weights
    are present and never downloads (README: "uses it if present and otherwise says it is unavailable")."""
    if mode == "off":
        return None, f"off (--{name.lower()} off)"
    try:
        return build(download=mode == "on"), ""
    except (RuntimeError, ImportError, OSError) as e:
        if mode == "on":
            raise UserError(f"{name} unavailable: {one_line(e)}") from None
        return None, f"unavailable: {one_line(e)}"


def thumbnail(pixels, height=256):
    """(3, H, W) uint8 -> PIL image `height` px tall (aspect kept, width at most 4 x height)."""
    img = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    w = max(1, min(4 * height, round(img.width * height / img.height)))
    return img.resize((w, height), Image.BICUBIC)
