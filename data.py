"""Training data for the SD VAE: image folders and Hugging Face datasets, the SD transform, a loader that
resumes (throughput: benchmarks/bench_data.py).

    from data import build_datasets, ResumableLoader
    train_ds, val_ds = build_datasets(cfg.data)   # config.py's data section (config_from_dict / load_config)
    loader = ResumableLoader(train_ds, batch_size=4, num_workers=4, seed=42, rank=rank, world_size=world_size)
    for epoch in range(start_epoch, num_epochs):
        loader.set_epoch(epoch)     # keeps a restored mid-epoch position when `epoch` is the restored one
        for batch in loader:        # {"pixel_values": (B, 3, 512, 512) float in [-1, 1]}
            ...; ckpt["loader"] = loader.state_dict()     # restore with loader.load_state_dict(...)
    val_loader = ResumableLoader(val_ds, 4, shuffle=False, drop_last=False)   # each pass reads it whole

An epoch's order is DistributedSampler's (seed, epoch) and a sample's crop/flip is seeded by (seed, epoch,
index): the batches do not depend on num_workers or on resuming. A bad file is logged once and replaced by
the next readable image; more than bad_limit of them is a DataError (check_bad, data_stream.py's rule too).
    python data.py --check FOLDER            # every unreadable file; exit code 1 if any, 0 if none
"""
import argparse
import hashlib
import io
import logging
import math
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import losses

log = logging.getLogger(__name__)

# Pillow reads all of these; GIF (and animated WebP/PNG) give their first frame.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
VAL_SPLITS = ("validation", "valid", "val", "test")


class UserError(Exception):
    """A problem the user must fix, in one line: one_line() prints it without its type name."""


class DataError(UserError, RuntimeError):
    """A data problem the user must fix (missing/empty source, too many bad files), in one line."""


class BadImageError(UserError, ValueError):
    """One unreadable image; the message is `<file>: <reason>` on one line."""


def one_line(e):
    """An exception as one line, `Type: text`, or the text alone for a UserError (the one formatter)."""
    text = " ".join(str(e).split())
    if isinstance(e, UserError) and text:
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def image_grid(pairs):
    """[(original, reconstruction)], each (3, H, W_i) in [-1, 1] with one H -> (3, 2H, sum W_i) in [0, 1]:
    originals in the top row, their reconstructions below (TensorBoard images, infer.py's eval grid)."""
    rows = [torch.cat([t.float().clamp(-1, 1).cpu() for t in row], dim=2) for row in zip(*pairs)]
    return (torch.cat(rows, dim=1) + 1) / 2


# ----------------------------------------------------------------------------------------------- decoding
def _to_rgb(img):
    """Any Pillow mode -> 8-bit RGB. Transparency is composited on white (what a viewer shows)."""
    if img.mode.startswith("I") or img.mode == "F":
        # 16-bit PNG/TIFF ("I;16*"): Pillow's own conversion clips at 255 instead of scaling, so scale by
        # 255/65535 here. Mode "I" is 32-bit but in practice holds 16-bit data (older Pillow opens 16-bit
        # PNGs as "I"); if no value exceeds 255 it is taken as 8-bit data. Float ("F"): [0, 1] if it fits,
        # else 0..255.
        a = np.asarray(img).astype(np.float64)
        if img.mode == "F":
            a = np.nan_to_num(a * 255.0 if a.max(initial=0) <= 1.0 else a)
        elif img.mode != "I" or a.max(initial=0) > 255:
            a = a / 257.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")  # P, L, 1, CMYK, YCbCr, LAB, HSV


def load_image(path, name=None):
    """An image file (a path, raw bytes, or a datasets {"bytes", "path"} dict) as upright 8-bit RGB; a
    missing, empty, non-image, truncated or corrupt file raises BadImageError("<name>: <reason>")."""
    if isinstance(path, dict):  # datasets.Image(decode=False) value
        name = name or path.get("path") or "<bytes>"
        path = path["bytes"] if path.get("bytes") is not None else path.get("path")
        if path is None:
            raise BadImageError(f"{name}: neither bytes nor a path")
    if isinstance(path, (bytes, bytearray, memoryview)):
        name, source, size = name or "<bytes>", io.BytesIO(path), len(path)
    else:
        name = name or os.fspath(path)
        try:
            source, size = os.fspath(path), os.path.getsize(path)
        except OSError as e:
            raise BadImageError(f"{name}: cannot read file ({e.strerror or one_line(e)})") from None
    if size == 0:
        raise BadImageError(f"{name}: empty file (0 bytes)")
    try:
        with Image.open(source) as img:
            img.load()  # forces the full decode: truncation shows up here, not in a worker later
            try:  # EXIF Orientation: a camera's portrait shot is stored sideways
                if img.getexif().get(0x0112, 1) != 1:
                    img = ImageOps.exif_transpose(img)
            except Exception:  # unreadable EXIF: the pixels are still good, keep them as stored
                pass
            return _to_rgb(img)
    except UnidentifiedImageError:
        raise BadImageError(f"{name}: not an image Pillow can read") from None
    except MemoryError:
        raise
    except Exception as e:  # truncated data, corrupt chunks, decompression bombs, broken EXIF, ...
        raise BadImageError(f"{name}: cannot decode ({one_line(e)})") from None


def decode_cell(value, name, missing="empty cell"):
    """An image column's value (a PIL image, {"bytes"/"path"} or bytes, None) -> RGB image, or BadImageError
    `name: missing` for None (map-style datasets here, streamed samples in data_stream.py)."""
    if isinstance(value, Image.Image):  # a column decoded by datasets despite the cast
        return _to_rgb(value)
    if value is None:
        raise BadImageError(f"{name}: {missing}")
    return load_image(value, name=name)


def find_images(root):
    """All image files under `root` (recursive, extensions case-insensitive, hidden files skipped), sorted."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DataError(f"image folder {root!r} does not exist or is not a directory")
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # .git, .ipynb_checkpoints, ...
        # hidden files include macOS "._x.jpg" AppleDouble files, which are not images
        found += [os.path.join(folder, f) for f in files
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    if not found:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root!r}")
    return sorted(found)


# ---------------------------------------------------------------------------------------------- transform
class SDTransform:
    """Resize(res, bicubic) -> CenterCrop/RandomCrop(res) -> RandomHorizontalFlip -> [-1, 1], as in the
    SD/diffusers training scripts. With center_crop=True, random_flip=False it equals torchvision's
    Resize(res, BICUBIC) + CenterCrop(res) + ToTensor() + Normalize([0.5], [0.5]) bit for bit."""

    def __init__(self, resolution, *, center_crop, random_flip):
        if int(resolution) <= 0:  # infer.py --latent_stats --resolution reaches here unchecked
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.resolution, self.center_crop, self.random_flip = int(resolution), center_crop, random_flip

    def __call__(self, img, generator=None):
        res = self.resolution
        w, h = img.size
        if min(w, h) != res:  # shorter side -> res; Pillow's bicubic filter widens its support when shrinking
            long = int(res * max(w, h) / min(w, h))  # (antialiasing); int() as torchvision computes it
            img = img.resize((res, long) if w <= h else (long, res), Image.BICUBIC)
            w, h = img.size
        if self.center_crop:
            top, left = int(round((h - res) / 2.0)), int(round((w - res) / 2.0))
        else:
            top = int(torch.randint(0, h - res + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - res + 1, (1,), generator=generator))
        img = img.crop((left, top, left + res, top + res))
        if self.random_flip and float(torch.rand(1, generator=generator)) < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        # bitwise equal to torchvision's ToTensor + Normalize(0.5, 0.5) at every 8-bit level (tested)
        return losses.from_uint8(torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous())


def sample_seed(seed, epoch, index):
    """The augmentation seed of one sample: a hash of (seed, epoch, index) (no rank: a sample has one per
    epoch; a stream's index counts across ranks)."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(1, np.uint64)[0])


# ---------------------------------------------------------------------------------------------- bad samples
def bad_limit(max_bad_fraction, n):
    """How many of n samples may be unreadable: max(10, floor(max_bad_fraction x n)), none if it is 0. At
    least 10: a few broken downloads must not stop a run on a small set; more than the fraction means
    something systematic (wrong folder or column, broken copy)."""
    return max(10, math.floor(max_bad_fraction * n)) if max_bad_fraction > 0 else 0


def check_bad(count, n, max_bad_fraction, what, last):
    """DataError when `count` unreadable samples of n are more than bad_limit allows; `what` names the n
    samples ("12 images", "9 samples met in pass 0 of shards ..."), `last` is the last one's message."""
    limit = bad_limit(max_bad_fraction, n)
    if count > limit:
        raise DataError(f"{count} of {what} are unreadable, more than max_bad_fraction={max_bad_fraction} "
                        f"allows ({limit}: at least 10 unless 0); last: {last}. Fix the data (a folder: "
                        "python data.py --check FOLDER lists them all) or raise data.max_bad_fraction")


# ----------------------------------------------------------------------------------------------- datasets
class ImageDataset(Dataset):
    """Images from a list of files, or from one column of a `datasets.Dataset` (decoded here, not by datasets,
    so a bad row is handled like a bad file). Item keys are `index` or `(index, seed, epoch)`; items are
    {"pixel_values": (3,res,res) or None, "bad": [(index, "name: reason"), ...]} (see ResumableLoader)."""

    def __init__(self, source, transform, *, max_bad_fraction, column=None, label=""):
        self.source, self.transform, self.column, self.label = source, transform, column, label
        self.max_bad_fraction = max_bad_fraction
        self._known_bad = {}  # per process (each worker has its copy): skip re-decoding files known to be bad

    def __len__(self):
        return len(self.source)

    def name(self, i):
        if self.column is None:
            return self.source[i]
        value = self.source[i][self.column]
        path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
        return f"{self.label}[{i}]" + (f" ({path})" if path else "")

    def load(self, i):
        if self.column is None:
            return load_image(self.source[i])
        return decode_cell(self.source[i][self.column], self.name(i))

    def __getitem__(self, key):
        i, seed, epoch = key if isinstance(key, tuple) else (key, 0, 0)
        generator = torch.Generator().manual_seed(sample_seed(seed, epoch, i))
        bad, n = [], len(self)
        for step in range(n):  # a bad file is replaced by the next readable one: deterministic, fixed shapes
            j = (i + step) % n
            if j not in self._known_bad:
                try:
                    return {"pixel_values": self.transform(self.load(j), generator), "bad": bad}
                except BadImageError as e:
                    self._known_bad[j] = str(e)
            bad.append((j, self._known_bad[j]))
            if len(bad) > bad_limit(self.max_bad_fraction, n):  # the loader will stop with a DataError
                break
        if not isinstance(key, tuple):
            raise DataError(f"no readable image at or after index {i}: {bad[-1][1]}")
        return {"pixel_values": None, "bad": bad}


def _holdout(keys, num_val_holdout, where):
    """Deterministic hold-out: the k items with the smallest hash of their key (relative path or row index):
    spread over a folder sorted by class, and independent of the listing order. k = num_val_holdout, but at
    most 10% of the data and at least one image."""
    n = len(keys)
    if n < 2:
        raise DataError(f"{where} has {n} image(s): cannot hold out validation images; give val_data_dir")
    k = max(1, min(int(num_val_holdout), n // 10))
    val = set(sorted(range(n), key=lambda i: hashlib.blake2b(str(keys[i]).encode(), digest_size=8).digest())
              [:k])
    log.info("data: holding out %d of %d images of %s for validation", k, n, where)
    return [i for i in range(n) if i not in val], sorted(val)


def hub_offline():
    """True when HF_HUB_OFFLINE is set, or when one quick connection to the hub endpoint (or its proxy) fails,
    which then sets HF_HUB_OFFLINE here (offline, the hub clients retry every file with back-off)."""
    import socket
    import urllib.parse
    import urllib.request

    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return True
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urllib.parse.urlsplit(proxy)
    try:
        socket.create_connection((url.hostname, url.port or {"https": 443}.get(url.scheme, 80)), 5).close()
        return False
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = "1"  # read by `datasets` when it is imported
        constants.HF_HUB_OFFLINE = True  # read by huggingface_hub at each call
        return True


def import_datasets(what):
    """The `datasets` package, or a DataError saying that `what` needs it (it is optional)."""
    try:
        import datasets
        return datasets
    except ImportError:
        raise DataError(f"{what} needs the Hugging Face `datasets` package (optional): pip install -r "
                        "requirements-datasets.txt; or train on a folder (data.train_data_dir)") from None


def is_saved_dataset(path):  # a folder written by datasets' save_to_disk (a DatasetDict's or a Dataset's)
    return any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json"))


def load_hf_dataset(name, config_name=None, cache_dir=None):
    """A hub dataset name or a local dataset (save_to_disk folder, parquet/arrow file, data folder)."""
    datasets = import_datasets(f"dataset_name={name!r}")
    if not os.path.exists(name) and hub_offline():  # one quick check: offline, read the cache without retries
        datasets.config.HF_HUB_OFFLINE = True
    try:
        if is_saved_dataset(name):
            return datasets.load_from_disk(name)
        builder = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}
        ext = os.path.splitext(name)[1].lower()
        if os.path.isfile(name) and ext in builder:
            return datasets.load_dataset(builder[ext], data_files=name, cache_dir=cache_dir)
        return datasets.load_dataset(name, config_name, cache_dir=cache_dir)
    except Exception as e:  # offline, unknown name, bad config...: one line, not a traceback deep in datasets
        offline = any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
                      for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        hint = (" (offline and not in the local cache; a folder of images works offline: data.train_data_dir)"
                if offline or datasets.config.HF_HUB_OFFLINE else "")
        raise DataError(f"cannot load dataset {name!r}{hint}: {one_line(e)}"[:1000]) from None


def hf_image_column(ds, column, where):
    """`ds` reduced to its image column, left undecoded (ImageDataset decodes it and catches bad rows)."""
    import datasets
    if column not in ds.column_names:
        raise DataError(f"{where} has no column {column!r}; columns: {ds.column_names} (set "
                        "data.image_column)")
    if len(ds) == 0:
        raise DataError(f"{where} has no rows")
    ds = ds.select_columns([column])
    if isinstance(ds.features[column], datasets.Image):
        ds = ds.cast_column(column, datasets.Image(decode=False))  # raw bytes: we decode (and catch errors)
    return ds


def transforms(data_cfg):
    """(training, validation) SDTransforms of config.py's data section: validation center-crops, no flip."""
    d = data_cfg
    return (SDTransform(d.resolution, center_crop=d.center_crop, random_flip=d.random_flip),
            SDTransform(d.resolution, center_crop=True, random_flip=False))


def build_datasets(data_cfg):
    """(train, val) ImageDatasets of config.py's data section (streams: data_stream.stream_datasets).
    Training: train_data_dir if given (it wins over dataset_name), else dataset_name's train split (else its
    only split). Validation: val_data_dir, else the dataset's validation/test split, else a deterministic
    hold-out of num_val_holdout training images."""
    d = data_cfg
    if d.streaming or d.train_shards:
        raise DataError("streamed data (data.streaming, data.train_shards) needs data_stream.stream_datasets "
                        "and train.py; this reads folders and map-style datasets")
    train_tf, val_tf = transforms(d)

    def folder(files, tf):
        return ImageDataset(files, tf, max_bad_fraction=d.max_bad_fraction)

    val = folder(find_images(d.val_data_dir), val_tf) if d.val_data_dir else None
    if d.train_data_dir:
        if d.dataset_name:
            log.warning("data: training on train_data_dir=%s; dataset_name=%s is ignored", d.train_data_dir,
                        d.dataset_name)
        files = find_images(d.train_data_dir)
        if val is not None:  # a validation folder inside the training folder must not leak into training
            val_set = {os.path.abspath(p) for p in val.source}
            files = [p for p in files if os.path.abspath(p) not in val_set]
            if not files:
                raise DataError(f"every image under {d.train_data_dir!r} is also in "
                                f"val_data_dir={d.val_data_dir!r}")
        if val is None:
            keep, held = _holdout([os.path.relpath(p, d.train_data_dir) for p in files], d.num_val_holdout,
                                  d.train_data_dir)
            return folder([files[i] for i in keep], train_tf), folder([files[i] for i in held], val_tf)
        return folder(files, train_tf), val
    if not d.dataset_name:
        raise DataError("no training data: set data.dataset_name or data.train_data_dir")

    ds = load_hf_dataset(d.dataset_name, d.dataset_config_name, d.cache_dir)
    splits = dict(ds) if isinstance(ds, dict) else {"train": ds}  # DatasetDict is a dict of splits
    if "train" not in splits and len(splits) != 1:
        raise DataError(f"dataset {d.dataset_name!r} has no 'train' split; splits: {sorted(splits)}")
    train_split = "train" if "train" in splits else next(iter(splits))
    where = f"{d.dataset_name}:{train_split}"
    train = hf_image_column(splits[train_split], d.image_column, f"dataset {where}")

    def hf(rows, tf, label):
        return ImageDataset(rows, tf, column=d.image_column, label=label, max_bad_fraction=d.max_bad_fraction)

    if val is not None:
        return hf(train, train_tf, where), val
    for split in VAL_SPLITS:
        if split in splits and split != train_split:
            rows = hf_image_column(splits[split], d.image_column, f"dataset {d.dataset_name}:{split}")
            return hf(train, train_tf, where), hf(rows, val_tf, f"{d.dataset_name}:{split}")
    keep, held = _holdout(list(range(len(train))), d.num_val_holdout, f"dataset {where}")
    return hf(train.select(keep), train_tf, where), hf(train.select(held), val_tf, where + "(held out)")


# ------------------------------------------------------------------------------------------------- loader
def _collate(items):
    pixels = [it["pixel_values"] for it in items]
    stacked = None if any(p is None for p in pixels) else torch.stack(pixels)
    return {"pixel_values": stacked, "bad": [b for it in items for b in it["bad"]]}


class ResumableLoader:
    """A DataLoader over an ImageDataset whose position (epoch, batches consumed) can be saved and restored.
    Iterating yields {"pixel_values": (B, 3, H, W)} from the current position, then moves to the next epoch.
    Bad files are counted here, in the main process, from what the workers report: the count and the
    warnings do not depend on num_workers."""

    def __init__(self, dataset, batch_size, shuffle=True, drop_last=True, num_workers=0, seed=42, rank=0,
                 world_size=1, pin_memory=False, persistent_workers=True):
        if len(dataset) == 0:
            raise DataError("the dataset is empty")
        self.dataset, self.batch_size = dataset, int(batch_size)
        self.shuffle, self.drop_last = shuffle, drop_last
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.epoch, self.batches_consumed = 0, 0
        self.bad_files = {}  # dataset index -> "name: reason", this process (rank) only
        self.sampler = DistributedSampler(dataset, num_replicas=self.world_size, rank=self.rank,
                                          shuffle=shuffle, seed=self.seed, drop_last=drop_last)
        # the batch sampler is this list, refilled in place before each pass: one DataLoader (and its
        # persistent workers) serves every epoch and every resume
        self._batches = []
        workers = int(num_workers)
        self._dataloader = DataLoader(dataset, batch_sampler=self._batches, num_workers=workers,
                                      collate_fn=_collate,
                                      pin_memory=bool(pin_memory and torch.cuda.is_available()),
                                      persistent_workers=bool(persistent_workers and workers > 0),
                                      worker_init_fn=ignore_stop_signals)
        if len(self) == 0:
            raise DataError(f"{len(dataset)} images cannot fill one batch of {batch_size} per rank "
                            f"(world size {world_size}, drop_last={drop_last})")

    num_skipped = property(lambda self: len(self.bad_files))  # distinct unreadable files met by this rank

    def __len__(self):
        n = self.sampler.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch):
        """Start `epoch` from its beginning, unless it is the current one (then keep a restored position)."""
        if int(epoch) != self.epoch:
            self.epoch, self.batches_consumed = int(epoch), 0

    def indices(self, epoch):
        """The dataset indices this rank reads in `epoch`, in order (before bad-file substitution)."""
        self.sampler.set_epoch(epoch)
        idx = list(self.sampler)
        return idx[: len(self) * self.batch_size] if self.drop_last else idx

    def __iter__(self):
        epoch, idx = self.epoch, self.indices(self.epoch)
        keys = [(i, self.seed, epoch) for i in idx]
        batches = [keys[b: b + self.batch_size] for b in range(0, len(keys), self.batch_size)]
        self._batches[:] = batches[self.batches_consumed:]  # skipped batches are never decoded
        if self._batches:
            for batch in self._dataloader:
                self._record_bad(batch.pop("bad"))
                if batch["pixel_values"] is None:  # every file bad and max_bad_fraction >= 1
                    raise DataError(f"all {len(self.dataset)} images are unreadable")
                self.batches_consumed += 1
                yield batch
        if self.epoch == epoch:
            self.epoch, self.batches_consumed = epoch + 1, 0

    def _record_bad(self, bad):
        for i, message in bad:
            if i not in self.bad_files:
                self.bad_files[i] = message
                log.warning("data: skipped unreadable image %s [%d bad file(s) so far; using the next image "
                            "instead]", message, len(self.bad_files))
        if bad:  # the same limit ends a dataset's search for a substitute
            check_bad(len(self.bad_files), len(self.dataset), self.dataset.max_bad_fraction,
                      f"{len(self.dataset)} images", self.bad_files[bad[-1][0]])

    def state_dict(self):
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed, "batch_size": self.batch_size,
                "world_size": self.world_size, "seed": self.seed, "num_samples": len(self.dataset)}

    def load_state_dict(self, state):
        epoch, consumed = int(state["epoch"]), int(state["batches_consumed"])
        old = (state.get("batch_size", self.batch_size), state.get("world_size", self.world_size))
        if old != (self.batch_size, self.world_size):  # same images seen globally, but not the same batches
            consumed = consumed * old[0] * old[1] // (self.batch_size * self.world_size)
            log.warning("data: batch size x world size changed from %s to %s: the resumed position is "
                        "approximate", old, (self.batch_size, self.world_size))
        for key, now in (("seed", self.seed), ("num_samples", len(self.dataset))):
            if key in state and int(state[key]) != now:
                log.warning("data: %s changed from %s to %s: the resumed epoch order differs", key,
                            state[key], now)
        self.epoch, self.batches_consumed = epoch, min(consumed, len(self))


def ignore_stop_signals(worker_id):
    """DataLoader workers (data_stream.py's too) ignore SIGTERM/SIGINT: `timeout`, SLURM and Ctrl-C signal the
    whole process group, and the main process, which finishes its step and saves, shuts them down itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def check_folder(root):
    """Decode every image under `root` once (threads: Pillow decodes without the GIL); print each unreadable
    file and a summary. Returns the unreadable files' messages."""
    files = find_images(root)

    def problem(path):
        try:
            load_image(path)
        except BadImageError as e:
            return str(e)
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        bad = [m for m in pool.map(problem, files) if m]
    for message in bad:
        print(message)
    print(f"{len(bad)} of {len(files)} images under {root} are unreadable")
    return bad


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", metavar="FOLDER", help="list every unreadable image (exit code 1 if any)")
    args = parser.parse_args()
    if args.check is None:
        sys.exit(parser.print_help())
    try:
        sys.exit(1 if check_folder(args.check) else 0)
    except DataError as e:
        print(f"data.py: error: {e}", file=sys.stderr)
        sys.exit(2)
