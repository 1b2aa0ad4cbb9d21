"""Streamed training data: a Hugging Face dataset read with `streaming=True`, or WebDataset tar shards read
through `datasets`' webdataset loader, batched with data.ResumableLoader's interface and an exact resume.

    stream, transform, val_ds = stream_datasets(cfg.data)       # config.py's data section
    loader = StreamingLoader(stream, transform, batch_size=4, shuffle_buffer=cfg.data.shuffle_buffer,
                             max_bad_fraction=cfg.data.max_bad_fraction, num_workers=4, seed=42, rank=rank,
                             world_size=world, batches_per_epoch=max_steps)
    for batch in loader: ...            # {"pixel_values": (B, 3, 512, 512)}; loader.state_dict() per rank

- Order: `IterableDataset.shuffle(seed, buffer_size=1)` shuffles (and interleaves) the shards, anew each pass
  via `set_epoch(pass)`; then blocks of `shuffle_buffer` samples are permuted by a generator seeded by (seed,
  pass, rank, block). Not datasets' shuffle buffer: its content is not in `state_dict()` ("examples from
  shuffle buffers are lost when resuming", datasets docs). A resumed run re-reads its block from the state
  saved at the block start (raw bytes; nothing is decoded twice) and skips what it had consumed.
- Ranks: `split_dataset_by_node`, strategy "shards" when there are at least as many shards as ranks (some
  ranks get one shard more when the count does not divide the world), else "examples": every rank reads all
  shards and keeps 1 in world samples, so each rank reads (downloads) all the data. (datasets' default "auto"
  also falls back to "examples" when the count does not divide the world: 127 shards on 8 ranks.)
- Workers: the stream is read in the main process (tar members or arrow rows cost little beside a JPEG
  decode); DataLoader workers only decode and augment raw bytes. So the position is exact in the main process
  and the batches do not depend on num_workers (torchdata's StatefulDataLoader is not needed).
- Epochs: with `batches_per_epoch` an epoch is that many batches on every rank (a new pass starts when one
  ends); without it an epoch is one pass, for a single process only (ranks read unequal sample counts).
- Bad samples are skipped (the next readable one takes the place), logged once and counted per pass with
  data.check_bad, the folders' rule: more than max(10, max_bad_fraction x N) of a pass of N samples is a
  DataError. N is known when the pass ends; before, the rule holds for the samples met so far in the pass
  (the run stops as a folder of those samples would), so a broken stream stops without reading a whole pass.
"""
import collections
import glob
import itertools
import logging
import math
import os
import re
import tarfile

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data import (
    IMAGE_EXTENSIONS,
    VAL_SPLITS,
    BadImageError,
    DataError,
    ImageDataset,
    check_bad,
    decode_cell,
    find_images,
    ignore_stop_signals,
    import_datasets,
    is_saved_dataset,
    one_line,
    sample_seed,
    transforms,
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ sources
def expand_braces(pattern):
    """Shell/WebDataset brace patterns: `a{000..002}.tar` -> a000.tar a001.tar a002.tar (zero padding kept
    from the first bound), `{x,y}` -> x y; several braces multiply."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        items = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [p for item in items for p in expand_braces(head + item + tail)]


def shard_files(pattern):
    """The tar files of `data.train_shards`: brace patterns expanded, then local globs (sorted, deduplicated);
    URLs (`hf://...`, `https://...`) are handed to datasets as they are."""
    files = []
    for part in expand_braces(os.fspath(pattern)):
        if "://" in part:
            files.append(part)
            continue
        found = sorted(glob.glob(os.path.expanduser(part), recursive=True))
        if not found and not glob.has_magic(part):
            raise DataError(f"data.train_shards: no such shard {part!r}")
        files += found
    files = list(dict.fromkeys(files))
    if not files:
        raise DataError(f"data.train_shards={pattern!r} matches no files")
    return files


def write_shards(files, folder, per_shard=1000, root=None):
    """Pack image files into WebDataset tars folder/000000.tar, ... and return their brace pattern.

    files: image paths (e.g. data.find_images(FOLDER)), in the order the shards will hold them.
    per_shard: samples per tar; ranks split a stream by shards and the shuffle reorders whole shards, so
        keep several shards per process.
    root: the folder keys are relative to (default: the files' common folder). Each sample keeps its source
        name: its key (`__key__`, named in bad-sample warnings as `000003.tar/<key>`) is the path under root
        without extension, with "." made "_" (a WebDataset key ends at a member name's first dot); a key met
        twice (cat.jpg, cat.png) gets `~<index in files>`."""
    files = [os.fspath(f) for f in files]
    if not files:
        raise DataError("write_shards: no files to pack")
    root = os.path.commonpath([os.path.dirname(f) or "." for f in files]) if root is None else os.fspath(root)
    os.makedirs(folder, exist_ok=True)
    count, keys = math.ceil(len(files) / per_shard), set()
    for s in range(count):
        with tarfile.open(os.path.join(folder, f"{s:06d}.tar"), "w") as tar:
            for k in range(s * per_shard, min(len(files), (s + 1) * per_shard)):
                stem, ext = os.path.splitext(os.path.relpath(files[k], root))
                key = stem.replace(os.sep, "/").replace(".", "_")
                key = f"{key}~{k}" if key in keys else key
                keys.add(key)
                tar.add(files[k], arcname=key + ext.lower())
    return os.path.join(folder, f"{{{0:06d}..{count - 1:06d}}}.tar")


class Stream:
    """An IterableDataset (image columns undecoded: {"bytes", "path"} dicts) and how to read its samples."""

    def __init__(self, dataset, image_columns, label):
        self.dataset, self.image_columns, self.label = dataset, image_columns, label

    def value(self, row):
        """The first image column present in a row (WebDataset samples hold one of jpg/png/...), else None."""
        return next((row[c] for c in self.image_columns if row.get(c) is not None), None)

    def name(self, row, p, ordinal):
        """A sample's name in warnings: shard/key, or the image's path in a row, stay the same each pass (a
        bad sample is logged once); a row with bytes alone is named by its place in the pass."""
        if "__key__" in row:  # WebDataset: shard file / sample key, what a user finds with `tar tf`
            return f"{os.path.basename(str(row.get('__url__', '')))}/{row['__key__']}"
        value = self.value(row)
        path = value.get("path") if isinstance(value, dict) else None
        return f"{self.label}: {path}" if path else f"{self.label} (pass {p}, sample {ordinal})"


def open_stream(data_cfg, split="train", num_shards=64):
    """A Stream of config.py's data section: WebDataset tar shards (data.train_shards, wins over
    dataset_name), else `split` of data.dataset_name streamed (a hub id, a local data folder, or a
    save_to_disk folder, which is read as `num_shards` contiguous shards so that ranks and the shard shuffle
    have something to split)."""
    datasets = import_datasets("streaming")
    d = data_cfg
    train_shards, dataset_name, image_column = d.train_shards, d.dataset_name, d.image_column
    try:
        if train_shards:
            files = shard_files(train_shards)
            # Features given, not inferred: datasets infers them from the first 5 samples, and a sample whose
            # image has another extension (a .png among .jpg) would lose it. Other members are dropped.
            columns = [e[1:] for e in IMAGE_EXTENSIONS] + [e[1:].upper() for e in IMAGE_EXTENSIONS]
            features = datasets.Features({c: datasets.Image(decode=False) for c in columns})
            features.update({"__key__": datasets.Value("string"), "__url__": datasets.Value("string")})
            ds = datasets.load_dataset("webdataset", data_files={"train": files}, split="train",
                                       streaming=True, cache_dir=d.cache_dir, features=features)
            label = f"shards {train_shards}"
        else:
            name = os.fspath(dataset_name)
            if is_saved_dataset(name):
                ds = datasets.load_from_disk(name)
                if not isinstance(ds, datasets.DatasetDict) and split != "train":  # one Dataset: no splits
                    raise DataError(f"{name} is a saved Dataset without splits: no {split!r} split")
                ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
                ds = ds.to_iterable_dataset(num_shards=max(1, min(num_shards, len(ds))))
            else:
                ds = datasets.load_dataset(name, d.dataset_config_name, split=split, streaming=True,
                                           cache_dir=d.cache_dir)
            if ds.features is not None and image_column not in ds.features:
                raise DataError(f"dataset {name}:{split} has no column {image_column!r}; columns: "
                                f"{list(ds.features)} (set data.image_column)")
            label, columns, ds = f"{name}:{split}", [image_column], ds.select_columns([image_column])
            if ds.features is not None and isinstance(ds.features[image_column], datasets.Image):
                ds = ds.cast_column(image_column, datasets.Image(decode=False))  # we decode, catching errors
    except DataError:
        raise
    except Exception as e:  # offline, unknown name, bad tar...: one line, not a traceback deep in datasets
        raise DataError(f"cannot stream {train_shards or dataset_name!r}: {one_line(e)}"[:1000]) from None
    return Stream(ds, columns, label)


def take_images(stream, n, transform, *, max_bad_fraction):
    """The first n samples of a stream (its order, unshuffled), held in memory as a data.ImageDataset: a
    validation set from a streamed validation split, for data.ResumableLoader."""
    rows = [{"image": stream.value(row)} for row in itertools.islice(stream.dataset, int(n))]
    if not rows:
        raise DataError(f"{stream.label} has no samples")
    return ImageDataset(rows, transform, column="image", label=stream.label,
                        max_bad_fraction=max_bad_fraction)


def stream_datasets(data_cfg):
    """data.build_datasets's counterpart for config.py's data section when it streams: (the training Stream,
    its transform, the validation ImageDataset). Validation: val_data_dir, else the first num_val_holdout
    images of dataset_name's validation/test split, streamed; shards need val_data_dir."""
    d = data_cfg
    if d.train_shards and d.dataset_name:
        log.warning("data: training on train_shards=%s; dataset_name=%s is ignored", d.train_shards,
                    d.dataset_name)
    stream = open_stream(d)
    train_tf, val_tf = transforms(d)
    if d.val_data_dir:
        val = ImageDataset(find_images(d.val_data_dir), val_tf, max_bad_fraction=d.max_bad_fraction)
        return stream, train_tf, val
    if d.train_shards:
        raise DataError("data.train_shards needs data.val_data_dir (a folder of validation images)")
    errors = []
    for split in VAL_SPLITS:
        try:
            val = take_images(open_stream(d, split), d.num_val_holdout, val_tf,
                              max_bad_fraction=d.max_bad_fraction)
            return stream, train_tf, val
        except DataError as e:
            errors.append(str(e))
    raise DataError(f"no validation images: {d.dataset_name} has no {'/'.join(VAL_SPLITS)} split to stream "
                    f"({errors[0]}); set data.val_data_dir"[:1000])


# ------------------------------------------------------------------------------------------------- loader
class _Decode(Dataset):
    """Map-style decoding in DataLoader workers: key (value, name, seed) -> ((3, res, res) tensor, None), or
    (None, "name: reason") for an unreadable sample."""

    def __init__(self, transform):
        self.transform = transform

    def __getitem__(self, key):
        value, name, seed = key
        try:
            img = decode_cell(value, name, missing="no image (an empty cell, or no image file in the sample)")
            return self.transform(img, torch.Generator().manual_seed(seed)), None
        except BadImageError as e:
            return None, str(e)


def _stack(items):
    """Worker-side collate: the chunk's readable images stacked, (B', 3, res, res) or None, and every item's
    error or None (stacking in the workers keeps the 25 MB copy per 512^2 batch out of the main process)."""
    good = [x for x, error in items if error is None]
    return (torch.stack(good) if good else None), [error for _, error in items]


def _fresh(p):
    """The position at the start of pass p (met/bad: the pass's sample and bad-sample counts so far)."""
    return {"pass": p, "next": 0, "dataset_state": None, "met": 0, "bad": 0}


class _StreamSampler:
    """The DataLoader's batch sampler: reads this rank's stream in the main process from `pos` on and yields
    lists of batch_size decoding keys; their (pass, index, name) go to `sent`, in order, for the loader. It
    holds no reference to the loader or its DataLoader: with a reference cycle the workers would be shut down
    by the garbage collector, after its queues, each worker waiting out a 5 s timeout."""

    def __init__(self, stream, batch_size, seed, rank, world_size, shuffle, block, endless):
        self.stream, self.batch_size, self.seed, self.shuffle = stream, batch_size, seed, shuffle
        self.rank, self.world_size, self.block, self.endless = rank, world_size, block, endless
        self.dataset = stream.dataset.shuffle(seed=seed, buffer_size=1) if shuffle else stream.dataset
        self.pos, self.block_states, self.sent = _fresh(0), {}, collections.deque()

    def records(self):
        """(pass, index in pass, row) from `pos` on, block-shuffled, and (pass, None, None) after each pass;
        one pass, or endless. datasets' state at every block start goes to block_states[(pass, block)]."""
        from datasets.distributed import split_dataset_by_node
        p, start, state = self.pos["pass"], self.pos["next"], self.pos["dataset_state"]
        strategy = "shards" if self.dataset.num_shards >= self.world_size else "examples"
        while True:
            ds = split_dataset_by_node(self.dataset, self.rank, self.world_size, strategy=strategy)  # a copy
            ds.set_epoch(p)  # the shard order of this pass
            if state is not None:
                ds.load_state_dict(state)
            rows, b, skip, found = iter(ds), start // self.block, start % self.block, start > 0
            self.block_states[(p, b)] = state
            while True:
                try:
                    block = list(itertools.islice(rows, self.block))
                except Exception as e:  # datasets itself decodes some members (.json, .npy): a broken one
                    message = f"{self.stream.label}: cannot read the stream: {one_line(e)}"
                    raise DataError(message[:1000]) from e
                if not block:
                    break
                found = True
                self.block_states[(p, b + 1)] = ds.state_dict()
                order = np.random.default_rng([self.seed, p, self.rank, b]).permutation(len(block)) \
                    if self.shuffle else range(len(block))
                for j in range(skip, len(block)):
                    yield p, b * self.block + j, block[order[j]]
                b, skip = b + 1, 0
            if not found:
                raise DataError(f"{self.stream.label}: rank {self.rank} of {self.world_size} got no samples")
            yield p, None, None
            if not self.endless:
                return
            p, start, state = p + 1, 0, None

    def __iter__(self):
        meta, keys = [], []
        for p, i, row in self.records():
            if i is None:
                meta.append((p, None, None))
                continue
            name = self.stream.name(row, p, i)
            meta.append((p, i, name))
            # augmentation seeded by (seed, pass, index in the pass counted over all ranks, as a folder's
            # sample index is): rank r's i-th sample is i * world + r, so ranks do not share crops and flips
            seed = sample_seed(self.seed, p, i * self.world_size + self.rank)
            keys.append((self.stream.value(row), name, seed))
            if len(keys) == self.batch_size:
                self.sent.append(meta)
                yield keys
                meta, keys = [], []
        if keys or meta:
            self.sent.append(meta)
            yield keys


class StreamingLoader:
    """data.ResumableLoader's interface over a Stream: iterating yields {"pixel_values": (B, 3, H, W)} from
    the current position (always full batches); set_epoch, state_dict, load_state_dict, num_skipped as there.

    Position: (pass, index of the next sample in this rank's pass, datasets' state_dict at the start of the
    shuffle block holding it), advanced only by batches the caller received, so a loop broken off (and the
    workers' prefetched batches thrown away) restarts exactly after the last batch it used.
    shuffle_buffer=None reads the stream in its own order (no shard shuffle, no blocks)."""

    def __init__(self, stream, transform, batch_size, *, shuffle_buffer, max_bad_fraction, num_workers=0,
                 seed=42, rank=0, world_size=1, batches_per_epoch=None, pin_memory=False,
                 persistent_workers=True):
        if int(world_size) > 1 and batches_per_epoch is None:
            raise DataError("a stream read by several processes needs batches_per_epoch (training.max_steps):"
                            " ranks read unequal numbers of samples, so a pass would end at different steps")
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        shuffle = shuffle_buffer is not None
        self.block = int(shuffle_buffer) if shuffle else 1
        self.batches_per_epoch = None if batches_per_epoch is None else int(batches_per_epoch)
        self.max_bad_fraction, self.label = max_bad_fraction, stream.label
        self.epoch, self.batches_consumed, self.samples_seen = 0, 0, 0
        self.bad_files = {}  # sample name -> "name: reason", this rank only, for the warnings
        self._sampler = _StreamSampler(stream, self.batch_size, self.seed, self.rank, self.world_size,
                                       shuffle, self.block, endless=self.batches_per_epoch is not None)
        workers = int(num_workers)
        self._pin = bool(pin_memory and torch.cuda.is_available())
        # one DataLoader (and its persistent workers) serves every pass and every resume
        self._dataloader = DataLoader(_Decode(transform), batch_sampler=self._sampler, num_workers=workers,
                                      collate_fn=_stack, pin_memory=self._pin,
                                      persistent_workers=bool(persistent_workers and workers),
                                      worker_init_fn=ignore_stop_signals)

    @property
    def num_skipped(self):
        """Distinct unreadable samples met so far by this rank."""
        return len(self.bad_files)

    def __len__(self):
        if self.batches_per_epoch is None:
            raise TypeError("a one-pass stream has no length; give batches_per_epoch")
        return self.batches_per_epoch

    def set_epoch(self, epoch):
        """Start `epoch` unless it is the current one (a restored position is kept). One-pass epochs start
        at the beginning of pass `epoch`; fixed-length epochs continue the stream where it is."""
        if int(epoch) != self.epoch:
            self.epoch, self.batches_consumed = int(epoch), 0
            if self.batches_per_epoch is None:
                self._sampler.pos = _fresh(int(epoch))

    def __iter__(self):
        epoch = self.epoch
        left = None
        if self.batches_per_epoch is not None:
            left = max(0, self.batches_per_epoch - self.batches_consumed)
        for pixels in itertools.islice(self._batches(), left):
            self.batches_consumed += 1
            self.samples_seen += len(pixels)
            yield {"pixel_values": pixels}
        if self.batches_per_epoch is None:  # one pass done (its last partial batch dropped)
            self._sampler.pos = _fresh(self._sampler.pos["pass"] + 1)
        if self.epoch == epoch:
            self.epoch, self.batches_consumed = epoch + 1, 0

    def _batches(self):
        """Full batches of decoded samples in stream order. The sampler's position moves to just after a
        batch's last sample when the batch is handed out (samples decoded beyond it are decoded again after
        a resume)."""
        sampler, ready = self._sampler, []
        sampler.sent.clear()
        pos = dict(sampler.pos)
        for stacked, errors in self._dataloader:
            errors, taken = iter(errors), 0  # taken: rows of `stacked` used so far
            for p, i, name in sampler.sent.popleft():
                if i is None:  # the pass ended
                    pos = _fresh(p + 1)
                    continue
                error = next(errors)
                pos.update({"pass": p, "next": i + 1, "met": pos["met"] + 1})
                if error is not None:
                    pos["bad"] += 1
                    self._record_bad(name, error, pos)
                    continue
                ready.append(stacked[taken])
                taken += 1
                if len(ready) == self.batch_size:
                    states = sampler.block_states
                    pos["dataset_state"] = states[(p, (i + 1) // self.block)]
                    sampler.block_states = {k: v for k, v in states.items() if k >= (p, i // self.block)}
                    if taken == self.batch_size:  # a whole chunk without bad samples: no copy
                        batch = stacked
                    else:
                        batch = torch.stack(ready)
                        batch = batch.pin_memory() if self._pin else batch
                    sampler.pos, ready = dict(pos), []
                    yield batch

    def _record_bad(self, name, message, pos):
        if name not in self.bad_files:
            self.bad_files[name] = message
            log.warning("data: skipped unreadable image %s [%d bad sample(s) so far; using the next one "
                        "instead]", message, len(self.bad_files))
        check_bad(pos["bad"], pos["met"], self.max_bad_fraction,
                  f"{pos['met']} samples met in pass {pos['pass']} of {self.label}", message)

    def state_dict(self):
        """This rank's position (train.py gathers one per rank); plain Python values and datasets' state."""
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed,
                "samples_seen": self.samples_seen, "position": dict(self._sampler.pos), "rank": self.rank,
                "world_size": self.world_size, "seed": self.seed, "shuffle_buffer": self.block}

    def load_state_dict(self, state):
        """One rank's state, or the list of every rank's (this rank's is taken)."""
        if isinstance(state, (list, tuple)):
            state = state[self.rank] if len(state) == self.world_size else state[0]
        self.epoch, self.batches_consumed = int(state["epoch"]), int(state["batches_consumed"])
        self.samples_seen = int(state.get("samples_seen", 0))
        # positions count samples, so a new batch size keeps them; another split of the shards or another
        # shuffle does not
        if (state["world_size"], state["seed"], state["shuffle_buffer"]) == (
                self.world_size, self.seed, self.block):
            self._sampler.pos = dict(state["position"])
            return
        log.warning("data: world size, seed or shuffle buffer changed since the checkpoint: the stream "
                    "restarts at the beginning of pass %d", state["position"]["pass"])
        self.batches_consumed = 0 if self.batches_per_epoch is None else self.batches_consumed
        self._sampler.pos = _fresh(int(state["position"]["pass"]))
