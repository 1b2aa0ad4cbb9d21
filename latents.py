"""Latent files for diffusion training: one file per image (.pt / .safetensors) or safetensors shards with a
JSON index, written by `infer.py --encode` and read by `infer.py --decode` or a diffusion data loader.

One file per image: the diffusion-ready latent (z - shift_factor) * scaling_factor, (4, h, w) float32, with
scaling_factor, shift_factor, image_size (H, W of the original image), model and sampled: a dict in .pt, the
tensor "latent" plus metadata in .safetensors (JSON values, the model as plain text).

Shards (--latent_format safetensors-shards): OUT/shards/r<rank>-<n>.safetensors, each holding up to
--shard_size latents, one tensor per image named by the image's relative path, its metadata the run's settings
(as above) and "image_sizes" ({key: [H, W]}), all JSON values. Each is written whole (temporary file +
rename), so a shard that exists is complete, and each process writes only its own names (rank in the name), so
nothing races. OUT/index.json is rebuilt from the shards' headers at the end of a run (a killed job's shards
are kept and listed by the next):

    {"format": "sd-vae latent shards", "scaling_factor": 0.18215, "shift_factor": null, "model": "...",
     "sampled": false, "shards": ["shards/r00000-000000.safetensors", ...],
     "entries": {"sub/photo.jpg": {"shard": "shards/r00000-000000.safetensors", "key": "sub/photo.jpg",
                                   "image_size": [512, 768]}, ...}}

A data loader reads the index once and opens each shard with safetensors' safe_open (memory-mapped), reading
only the tensors it needs: no listing or opening of millions of small files.
"""
import json
import os
import warnings

import torch

from data import UserError, one_line
from vae import atomic_write, read_weights

LATENT_EXTENSIONS = (".pt", ".safetensors")
INDEX_FORMAT = "sd-vae latent shards"
SETTINGS = ("scaling_factor", "shift_factor", "model", "sampled")  # one run's, the same in every shard


# ----------------------------------------------------------------------------------------- one file per image
def save_safetensors(path, tensors, metadata):
    """safetensors' save_file creates its file with mode 0600 whatever the umask; its bytes written with
    open() get the umask's mode (0644 under 022), as every other output (vae.atomic_write)."""
    from safetensors.torch import save
    blob = save(tensors, metadata=metadata)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(blob)
    atomic_write(path, write)


def save_latent(path, latent, meta):
    latent = latent.detach().float().cpu().contiguous()
    if path.lower().endswith(".safetensors"):
        strings = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}  # strings only
        save_safetensors(path, {"latent": latent}, strings)
    else:
        atomic_write(path, lambda tmp: torch.save({"latent": latent, **meta}, tmp))


def read_latent(src, model):
    """A latent file, or an index entry (shard path, key, meta), -> (latent (C, h, w) float32, (H, W),
    scaling_factor, shift_factor); UserError if unusable."""
    cfg, f = model.config, model.downsample_factor
    path, key, meta = src if isinstance(src, tuple) else (src, "latent", {})
    try:
        if path.lower().endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(path, framework="pt") as sf:
                strings = dict(sf.metadata() or {})
                if key not in sf.keys():
                    has = ", ".join(sf.keys()) or "none"
                    raise UserError(f"{path}: no tensor named {key!r} (has: {has})")
                latent = sf.get_tensor(key)
            keys = ("scaling_factor", "shift_factor", "image_size")
            meta = meta or {k: json.loads(strings[k]) for k in keys if k in strings}
        else:
            with warnings.catch_warnings():  # e.g. "pickle protocol" on non-latent files: not for users
                warnings.simplefilter("ignore")
                data = read_weights(path, what="latent")  # a PNG or text file: one line saying so
            latent, meta = (data.get("latent"), data) if isinstance(data, dict) else (data, {})
    except UserError:
        raise
    except ValueError as e:  # read_weights' message: the path and what the file is
        raise UserError(str(e)) from None
    except Exception as e:
        raise UserError(f"{path}: not a readable latent file ({one_line(e)})") from None
    if not isinstance(latent, torch.Tensor) or not latent.is_floating_point():
        raise UserError(f"{path}: holds no floating-point latent tensor")
    if latent.dim() == 4 and latent.shape[0] == 1:
        latent = latent[0]
    c = cfg["latent_channels"]
    if latent.dim() != 3 or latent.shape[0] != c:
        raise UserError(f"{path}: latent of shape {tuple(latent.shape)}; this model decodes ({c}, h, w) "
                        f"or (1, {c}, h, w)")
    h, w = latent.shape[1:]
    H, W = (int(v) for v in (meta.get("image_size") or (h * f, w * f)))
    if -(-H // f) != h or -(-W // f) != w:  # the image was padded up to the next multiple of f, no more
        raise UserError(f"{path}: image_size {H}x{W} does not match a {h}x{w} latent (it encodes "
                        f"{(h - 1) * f + 1}..{h * f} x {(w - 1) * f + 1}..{w * f} px)")
    scale = float(meta.get("scaling_factor") or cfg["scaling_factor"])
    shift = meta.get("shift_factor", cfg["shift_factor"])
    return latent.float(), (H, W), scale, float(shift or 0.0)


def find_latents(root):
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(folder, n) for n in files
                  if not n.startswith(".") and n.lower().endswith(LATENT_EXTENSIONS)]
    if not found:
        raise UserError(f"no latent files ({', '.join(LATENT_EXTENSIONS)}) found under {root!r}")
    return sorted(found)


# ------------------------------------------------------------------------------------------ shards
def shard_headers(out):
    """{shard path relative to out: its metadata, JSON values decoded} of every whole shard in out/shards."""
    from safetensors import safe_open
    folder, headers = os.path.join(out, "shards"), {}
    names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors") and not n.startswith(".")) \
        if os.path.isdir(folder) else []
    for name in names:
        try:
            with safe_open(os.path.join(folder, name), framework="pt") as sf:
                headers[f"shards/{name}"] = {k: json.loads(v) for k, v in (sf.metadata() or {}).items()}
        except Exception as e:
            raise UserError(f"{os.path.join(folder, name)}: not a readable shard ({one_line(e)})") from None
    return headers


def done_in_shards(out, settings):
    """The keys already in out's shards; UserError if a shard was made with other settings (model, factor)."""
    done = set()
    for shard, meta in shard_headers(out).items():
        for k in SETTINGS:
            if meta.get(k) != settings[k]:
                raise UserError(f"{os.path.join(out, shard)} holds latents made with {k} {meta.get(k)!r}, "
                                f"this run's is {settings[k]!r}; choose another --output")
        done.update(meta.get("image_sizes", {}))
    return done


def not_done(jobs, out, settings, shards):
    """The (source, name, destination) jobs whose latent is not written yet: not in a shard, or no file at its
    destination. Every output is renamed into place when complete (vae.atomic_write), so one that exists is
    complete: existence suffices, and costs one stat per file (or one header per shard)."""
    if shards:
        done = done_in_shards(out, settings)
        return [job for job in jobs if job[1] not in done]
    return [job for job in jobs if not os.path.exists(job[2])]


class ShardWriter:
    """Collects one process's latents and writes each full shard at once: out/shards/r<rank>-<n>.safetensors,
    numbered on from the rank's shards of earlier (killed) runs."""

    def __init__(self, out, rank, shard_size, settings):
        self.folder, self.prefix = os.path.join(out, "shards"), f"r{rank:05d}-"
        self.size, self.settings = shard_size, settings
        mine = [n for n in (os.listdir(self.folder) if os.path.isdir(self.folder) else [])
                if n.startswith(self.prefix) and n.endswith(".safetensors")]
        self.number = 1 + max((int(n[len(self.prefix):-len(".safetensors")]) for n in mine), default=-1)
        self.latents, self.sizes = {}, {}

    def add(self, key, latent, image_size):
        self.latents[key] = latent.detach().float().cpu().contiguous()
        self.sizes[key] = list(image_size)
        if len(self.latents) >= self.size:
            self.flush()

    def flush(self):
        if not self.latents:
            return
        meta = {k: json.dumps(v) for k, v in {**self.settings, "image_sizes": self.sizes}.items()}
        path = os.path.join(self.folder, f"{self.prefix}{self.number:06d}.safetensors")
        try:
            save_safetensors(path, self.latents, meta)
        except (OSError, ValueError, RuntimeError) as e:  # its latents are lost: stop; a rerun redoes them
            raise UserError(f"cannot write shard {path}: {one_line(e)}") from None
        self.number, self.latents, self.sizes = self.number + 1, {}, {}


def write_index(out):
    """out/index.json from the headers of every shard under out/shards; returns its path and entry count."""
    headers = shard_headers(out)
    entries, settings = {}, {}
    for shard, meta in headers.items():
        settings = {k: meta.get(k) for k in SETTINGS}
        for key, size in meta.get("image_sizes", {}).items():
            entries[key] = {"shard": shard, "key": key, "image_size": size}
    index = {"format": INDEX_FORMAT, **settings, "shards": list(headers),
             "entries": dict(sorted(entries.items()))}
    path = os.path.join(out, "index.json")

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(index, f)
    atomic_write(path, write)
    return path, len(entries)


def read_index(path):
    """[(key, (shard path, key, meta))] of an index.json, meta as read_latent takes it; UserError if bad."""
    try:
        with open(path) as f:
            index = json.load(f)
        if index.get("format") != INDEX_FORMAT:
            raise ValueError(f"not an index of latent shards (format {index.get('format')!r})")
        folder = os.path.dirname(os.path.abspath(path))
        meta = {k: index[k] for k in ("scaling_factor", "shift_factor")}
        entries = [(key, (os.path.join(folder, e["shard"]), e["key"], dict(meta, image_size=e["image_size"])))
                   for key, e in index["entries"].items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: not a readable latent index ({one_line(e)})") from None
    if not entries:
        raise UserError(f"{path}: the index lists no latents")
    return entries
