"""Is a VAE ready for a diffusion model? Reconstruction FID, latent statistics, and infer.py --eval's table
(per-image PSNR / SSIM / LPIPS from losses.py, with rFID).

rFID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule"): the Fréchet distance between
Gaussians fitted to Inception-v3 pool features of the original images and of their reconstructions. The
network is the one FID scores are compared against: TensorFlow's 2015-12-05 Inception graph as ported by
pytorch-fid (`pytorch_fid/inception.py`, weights `pt_inception-2015-12-05-6726825d.pth`), with its
preprocessing (bilinear resize to 299x299, inputs in [-1, 1]) and its 2048-d average-pool features, loaded
from the cache path pytorch-fid itself uses ($TORCH_HOME/hub/checkpoints/), so a file it downloaded is reused.

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
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import losses
from data import (ImageDataset, ResumableLoader, SDTransform, UserError, find_images, hf_image_column, image_grid,
                  is_saved_dataset, load_hf_dataset, one_line)
from vae import atomic_write

INCEPTION_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_FILENAME
NO_RFID = "infer.py --eval: --rfid off; training: logging.val_rfid: false"


class InceptionWeightsError(UserError, RuntimeError):
    """The FID Inception weights are missing (and could not be downloaded) or unreadable."""


def inception_weights_path() -> str:
    """Where pytorch-fid caches its weights: $TORCH_HOME/hub/checkpoints/<INCEPTION_FILENAME>."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILENAME)


def _ensure_inception_weights(download=True) -> str:
    # As losses.py does for LPIPS's VGG16: the cache first, then one download (losses.download_to_cache), so an
    # offline machine gets one clear line at once. No hash check: pytorch-fid does none either (the name's
    # suffix is not documented as a sha256 prefix); pretrained() checks every key and shape instead.
    path, why = inception_weights_path(), "no download tried"
    if os.path.isfile(path):
        return path
    if download:
        try:
            losses.download_to_cache(INCEPTION_URL, path)
            return path
        except Exception as e:  # no network, proxy, read-only cache...
            why = f"the download from {INCEPTION_URL} failed: {one_line(e)}"
    raise InceptionWeightsError(
        f"rFID needs pytorch-fid's Inception weights '{INCEPTION_FILENAME}', which are not at {path} "
        f"({why}). Copy the file into $TORCH_HOME/hub/checkpoints/ (here {os.path.dirname(path)}), or do without rFID "
        f"({NO_RFID})")


# --- the FID Inception-v3 -------------------------------------------------------------------------------
# torchvision's Inception3 layout and attribute names (so pt_inception's keys load as they are), with the
# changes pytorch-fid makes to match the TensorFlow graph: its average pools leave the zero padding out of the
# mean, and the last block (Mixed_7c) pools by max. No classifier: FID uses the pool features.

def conv(cin, cout, kernel, stride=1, padding=0):  # torchvision's BasicConv2d, with its keys
    """Conv (no bias) -> BatchNorm (eps 1e-3, TensorFlow's) -> ReLU."""
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(cin, cout, kernel, stride, padding, bias=False),
                                     bn=nn.BatchNorm2d(cout, eps=0.001), relu=nn.ReLU()))


def _chain(x, *layers):
    for layer in layers:
        x = layer(x)
    return x


def _avg_pool(x):  # TensorFlow's 3x3 average pool: padded zeros are not counted in the mean
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # 35x35 grid: 1x1, 5x5, double 3x3 and pool branches
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = conv(cin, 64, 1)
        self.branch5x5_1 = conv(cin, 48, 1)
        self.branch5x5_2 = conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = conv(cin, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, padding=1)
        self.branch_pool = conv(cin, pool_features, 1)

    def forward(self, x):  # (B, cin, 35, 35) -> (B, 224 + pool_features, 35, 35)
        return torch.cat([self.branch1x1(x),
                          _chain(x, self.branch5x5_1, self.branch5x5_2),
                          _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          self.branch_pool(_avg_pool(x))], 1)


class InceptionB(nn.Module):  # 35x35 -> 17x17 reduction
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = conv(cin, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, stride=2)

    def forward(self, x):  # (B, cin, 35, 35) -> (B, 480 + cin, 17, 17)
        return torch.cat([self.branch3x3(x),
                          _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):  # 17x17 grid: 7x7 convolutions factored into 1x7 and 7x1
    def __init__(self, cin, c7):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = conv(cin, 192, 1)
        self.branch7x7_1 = conv(cin, c7, 1)
        self.branch7x7_2 = conv(c7, c7, **row)
        self.branch7x7_3 = conv(c7, 192, **col)
        self.branch7x7dbl_1 = conv(cin, c7, 1)
        self.branch7x7dbl_2 = conv(c7, c7, **col)
        self.branch7x7dbl_3 = conv(c7, c7, **row)
        self.branch7x7dbl_4 = conv(c7, c7, **col)
        self.branch7x7dbl_5 = conv(c7, 192, **row)
        self.branch_pool = conv(cin, 192, 1)

    def forward(self, x):  # (B, 768, 17, 17) -> (B, 768, 17, 17)
        return torch.cat([self.branch1x1(x),
                          _chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
                          _chain(x, self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                                 self.branch7x7dbl_4, self.branch7x7dbl_5),
                          self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):  # 17x17 -> 8x8 reduction
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = conv(cin, 192, 1)
        self.branch3x3_2 = conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = conv(cin, 192, 1)
        self.branch7x7x3_2 = conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = conv(192, 192, 3, stride=2)

    def forward(self, x):  # (B, 768, 17, 17) -> (B, 1280, 8, 8)
        return torch.cat([_chain(x, self.branch3x3_1, self.branch3x3_2),
                          _chain(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                                 self.branch7x7x3_4),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):  # 8x8 grid: 3x3 convolutions split into parallel 1x3 and 3x1
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool  # Mixed_7c: TensorFlow's graph pools by max (pytorch-fid's FIDInceptionE_2)
        self.branch1x1 = conv(cin, 320, 1)
        self.branch3x3_1 = conv(cin, 384, 1)
        self.branch3x3_2a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = conv(cin, 448, 1)
        self.branch3x3dbl_2 = conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = conv(cin, 192, 1)

    def forward(self, x):  # (B, cin, 8, 8) -> (B, 2048, 8, 8)
        a = self.branch3x3_1(x)
        b = _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b), self.branch_pool(pool)], 1)


class FIDInception(nn.Module):
    """Images in [-1, 1] -> 2048-d Inception pool features, as pytorch-fid's InceptionV3 (block 3) gives them.
    Frozen and always in eval mode (BatchNorm uses its running statistics); fp32 even under autocast."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = conv(32, 32, 3)
        self.Conv2d_2b_3x3 = conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = conv(64, 80, 1)
        self.Conv2d_4a_3x3 = conv(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def pretrained(cls, device=None, download=True):
        """The network with pt_inception's weights from the cache (downloaded there once if `download`)."""
        path = _ensure_inception_weights(download)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise InceptionWeightsError(f"cannot read {path} ({one_line(e)}); delete it to re-download, "
                                        f"or do without rFID ({NO_RFID})") from e
        net = cls()
        # The file also holds the 1008-way classifier (fc.*), which FID does not use; num_batches_tracked may
        # be absent from files older than that buffer and does nothing in eval mode.
        wanted = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
        wrong = [k for k, v in wanted.items() if not isinstance(state, dict) or k not in state
                 or not torch.is_tensor(state[k]) or state[k].shape != v.shape]
        if wrong:
            raise InceptionWeightsError(f"{path} is not pytorch-fid's Inception state dict (no or a wrong "
                                        f"'{wrong[0]}'); delete it to re-download")
        net.load_state_dict({k: state[k] for k in wanted}, strict=False)
        return net.to(device)

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, x):
        with torch.autocast(device_type=x.device.type, enabled=False):
            # pytorch-fid resizes (bilinear, no antialiasing) then maps [0, 1] to [-1, 1]; the resize is
            # affine, so resizing our [-1, 1] images directly is the same computation.
            x = F.interpolate(x.float(), (299, 299), mode="bilinear", align_corners=False)  # (B, 3, 299, 299)
            x = _chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)  # (B, 64, 147, 147)
            x = F.max_pool2d(x, 3, stride=2)                                            # (B, 64, 73, 73)
            x = _chain(x, self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)                       # (B, 192, 71, 71)
            x = F.max_pool2d(x, 3, stride=2)                                            # (B, 192, 35, 35)
            x = _chain(x, self.Mixed_5b, self.Mixed_5c, self.Mixed_5d)                  # (B, 288, 35, 35)
            x = self.Mixed_6a(x)                                                        # (B, 768, 17, 17)
            x = _chain(x, self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e)   # (B, 768, 17, 17)
            x = _chain(x, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)                  # (B, 2048, 8, 8)
            return F.adaptive_avg_pool2d(x, 1).flatten(1)                               # (B, 2048)


# --- feature statistics and the Fréchet distance ---------------------------------------------------------

def to_unit_range(pixels):
    """8-bit values (uint8, or floats 0..255) -> floats in [-1, 1], the range the models take."""
    return pixels.float() / 127.5 - 1.0


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
        x = images.to(self.total.device).float()
        x = x if images.dtype == torch.uint8 else ((x.clamp(-1, 1) + 1) * 127.5).round()  # 0..255
        self.add_features(self.inception(to_unit_range(x)))

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
    if os.path.isdir(source) and not is_saved_dataset(source):
        return ImageDataset(find_images(source), transform)
    splits = load_hf_dataset(source)
    splits = dict(splits) if isinstance(splits, dict) else {"train": splits}  # a DatasetDict is a dict
    split = "train" if "train" in splits else next(iter(splits))
    rows = hf_image_column(splits[split], image_column, f"dataset {source}:{split}")
    return ImageDataset(rows, transform, column=image_column, label=f"{source}:{split}")


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
        self.lpips, self.lpips_reason = optional_metric("LPIPS", lpips, lambda: losses.LPIPS().to(device))
        # rFID: Inception features of the originals and of the reconstructions, both as 8-bit images
        self.fid, self.fid_reason = optional_metric("rFID", rfid, lambda: [FeatureStats(net) for net in [
            FIDInception.pretrained(device, download=rfid == "on")] * 2])

    def add(self, index, name, original, recon):
        x, y = to_unit_range(original)[None], to_unit_range(recon)[None]
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
                w.writerows({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
        atomic_write(os.path.join(out, "metrics.csv"), write_csv)
        thumbs = [t for _, *t in sorted(self.thumbs, key=lambda t: t[0])]
        if thumbs:
            tensors = [[to_unit_range(torch.from_numpy(np.array(t)).permute(2, 0, 1)) for t in pair]
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
        print(f"{'rFID':<12} " + (f"{recon.frechet_distance(real):10.3f} (N={real.n}; biased upwards at small N)"
                                  if enough else self.fid_reason if real is None else "n/a (needs N >= 2 images)"))
        print(f"wrote {os.path.join(out, 'metrics.csv')}" + (f" and {os.path.join(out, 'grid.png')}" if thumbs else ""))


def optional_metric(name, mode, build):
    """(metric, "") or (None, why not) for --lpips/--rfid auto|on|off; `on` turns a failure into an error."""
    if mode == "off":
        return None, f"off (--{name.lower()} off)"
    try:
        return build(), ""
    except (RuntimeError, ImportError, OSError) as e:
        if mode == "on":
            raise UserError(f"{name} unavailable: {one_line(e)}") from None
        return None, f"unavailable: {one_line(e)}"


def thumbnail(pixels, height=256):
    """(3, H, W) uint8 -> PIL image `height` px tall (aspect kept, width at most 4 x height)."""
    img = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    w = max(1, min(4 * height, round(img.width * height / img.height)))
    return img.resize((w, height), Image.BICUBIC)
