"""Checkpoint files and run folders: what train.py writes and reads back, in the layout of Lightning's
ModelCheckpoint and TensorBoardLogger (README, "What a training run leaves"), named by the constants below
(train.py and lightning_module.py use them too). The functions take train.py's Run and never import train.py.
Files are replaced atomically. A checkpoint records the sha256 of its tensors and a fingerprint of the
training data; `--resume_from_checkpoint latest` skips damaged files for the newest good one. A run holds
train.lock in checkpoint_dir and output_dir and never writes over another run's files (claim_run).
"""
import atexit
import contextlib
import copy
import datetime
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import socket
import time
import zipfile
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError

from data import UserError, one_line
from vae import atomic_write

log = logging.getLogger(__name__)
TOP_K_NAME = "vae-epoch={epoch:02d}-step={step:06d}"  # + ".ckpt"; Lightning's filename template as well
LAST, HF_FOLDER, LOCK = "last.ckpt", "hf_checkpoint", "train.lock"  # in paths.checkpoint_dir
FINAL_MODEL = "final_model"  # in paths.output_dir
LOG_NAME = "vae_training"  # in paths.log_dir, with its version_N folders
WRITE_ERRORS = (OSError, SafetensorError)  # a failed write (atomic_save turns torch.save's into OSError)


class RunFolderError(UserError, RuntimeError):
    """checkpoint_dir is in use by a running job, or holds a previous run (a start-up error, exit code 2)."""


class DamagedCheckpoint(UserError, RuntimeError):
    """A checkpoint that cannot be resumed from: empty, truncated, another format, altered, non-finite."""


class DataChangedError(UserError, RuntimeError):
    """The training data differs from the data the checkpoint was trained on."""


class SaveError(UserError, RuntimeError):
    """A checkpoint could not be written (disk full, I/O error, permissions); earlier files are untouched."""


# ------------------------------------------------------------------------------------------------------ write
def save_checkpoint(run, loader, top_k):
    """Top-k file (when due and good enough), last.ckpt, hf_checkpoint/ (EMA weights when on). Rank 0 writes.
    A failed write (disk full, I/O error, permissions) removes or alters no earlier checkpoint: it raises
    SaveError, or with checkpoint.on_save_error "warn" logs one line and the run goes on."""
    ckpt = checkpoint_dict(run, loader)
    if run.rank != 0:
        return
    folder = run.cfg.paths.checkpoint_dir
    name = TOP_K_NAME.format(epoch=loader.epoch, step=run.state.step) + ".ckpt"
    last = os.path.join(folder, LAST)
    records = dict(run.state.top_k)  # committed to run.state only once the files are written
    keep, drop = update_top_k(run, name, records) if top_k else (False, [])
    ckpt["loop_state"]["top_k"] = dict(records)  # the file records itself, as Lightning's does
    written = []
    try:
        os.makedirs(folder, exist_ok=True)
        if keep:
            atomic_save(ckpt, os.path.join(folder, name))
            written.append(os.path.join(folder, name))
            tmp = os.path.join(folder, f".{LAST}.tmp")
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            # last.ckpt as a hard link to the same bytes: one write instead of two (files are only replaced)
            try:
                os.link(os.path.join(folder, name), tmp)
                os.replace(tmp, last)
            except OSError:
                atomic_save(ckpt, last)
        else:
            atomic_save(ckpt, last)
        run.weights.save_pretrained(os.path.join(folder, HF_FOLDER))
    except WRITE_ERRORS as e:
        for path in written:  # this save's own top-k file: never an earlier one
            with contextlib.suppress(OSError):
                os.remove(path)
        message = (f"cannot save the step-{run.state.step} checkpoint in {folder} ({one_line(e)}; "
                   "disk full, quota or permissions?); the earlier checkpoints there are untouched")
        if run.cfg.checkpoint.on_save_error == "warn":
            log.warning("warning: %s; training goes on (checkpoint.on_save_error: warn)", message)
            return
        raise SaveError(f"{message}. Free space, then --resume_from_checkpoint latest "
                        "(or set checkpoint.on_save_error: warn to train on)") from None
    run.state.top_k = records
    for old in drop:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, old))


def export_model(model, folder):
    """model.save_pretrained(folder) (outputs/final_model); a failed write is a one-line SaveError."""
    try:
        model.save_pretrained(folder)
    except WRITE_ERRORS as e:
        raise SaveError(f"cannot export the final model to {folder} ({one_line(e)}; disk full, quota or "
                        "permissions?); free space: --resume_from_checkpoint latest exports it") from None


def update_top_k(run, filename, top_k):
    """Lightning's ModelCheckpoint rule: keep the save_top_k best by `monitor` (strictly better replaces the
    worst); with monitor null, the newest k. Updates `top_k` (file -> key); returns (save it?, to delete)."""
    c = run.cfg.checkpoint
    score = run.state.metrics.get(c.monitor) if c.monitor else None
    if c.save_top_k == 0 or (c.monitor and score is None):  # Lightning too skips top-k until it is logged
        return False, []
    if not c.monitor:
        key = -float(run.state.step)  # newest first
    elif not math.isfinite(score):
        key = math.inf  # NaN/inf never counts as best (Lightning replaces NaN by +-inf)
    else:
        key = score if c.mode == "min" else -score  # compared as "lower is better"
    if c.save_top_k < 0 or len(top_k) < c.save_top_k:
        top_k[filename] = key
        return True, []
    worst = max(top_k, key=top_k.get)
    if key >= top_k[worst]:
        return False, []
    del top_k[worst]
    top_k[filename] = key
    return True, [worst]


def checkpoint_dict(run, loader):
    """Lightning's layout (module-prefixed state_dict, optimizer_states, lr_schedulers, epoch, global_step,
    hyper_parameters) plus our loop state. Collective under DDP (all ranks' RNG and data states)."""
    mine = (_rng_state(run), loader.state_dict())
    ranks = [mine]
    if run.world > 1:
        ranks = [None] * run.world
        dist.all_gather_object(ranks, mine)
    if run.rank != 0:
        return None
    rng, data = [r for r, _ in ranks], [d for _, d in ranks]
    # One data position when every rank's is the same (the folder loader's); a stream's differ, each rank
    # reading its own part: then all of them, and the resumed loader takes its rank's.
    data = data[0] if data.count(data[0]) == run.world else data
    ckpt = {
        "epoch": loader.epoch, "global_step": run.state.step,
        "pytorch-lightning_version": lightning_version(),
        "state_dict": {f"{prefix}.{k}": v.detach().cpu() for prefix, module in _prefixed(run)
                       for k, v in module.state_dict().items()},
        "optimizer_states": [run.opt_vae.state_dict(), run.opt_disc.state_dict()],
        "lr_schedulers": [run.sched_vae.state_dict(), run.sched_disc.state_dict()],
        "hyper_parameters": asdict(run.cfg),
        "ema_state_dict": ({k: v.cpu() for k, v in run.ema.state_dict().items()}
                           if run.ema is not None else None),
        "loop_state": {"grad_scalers": [run.scaler_vae.state_dict(), run.scaler_disc.state_dict()],
                       "rng_states": rng, "world_size": run.world, "data": data, **_saved_state(run.state)}}
    ckpt["loop_state"]["weights_sha256"] = weights_sha256(ckpt)
    return ckpt


def weights_sha256(ckpt):
    """The integrity record: sha256 over the names, dtypes, shapes and bytes of every tensor of the weights,
    the optimizer states and the EMA (all but a few KB of a file; damage to the rest fails unpickling). Equal
    states give equal records, so two runs' checkpoints still compare equal."""
    h = hashlib.sha256()

    def walk(obj, path):
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            h.update(f"{path}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                walk(obj[k], f"{path}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{path}[{i}]")
    for key in ("state_dict", "optimizer_states", "ema_state_dict"):
        walk(ckpt.get(key), key)
    return h.hexdigest()


def atomic_save(obj, path):
    """torch.save through atomic_write: a crash mid-write never leaves a truncated checkpoint."""
    def write(tmp):
        try:
            torch.save(obj, tmp)
        except RuntimeError:  # torch's failed write (disk full, EIO): "[enforce fail ...] unexpected pos"
            raise OSError("torch.save's write failed") from None
    atomic_write(path, write)


def _rng_state(run):
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]), "noise": run.noise.get_state(),
            "cuda": torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None}


def lightning_version():  # Lightning's load_from_checkpoint needs it: the version installed, else 2.5.0
    from importlib.metadata import PackageNotFoundError, version
    with contextlib.suppress(PackageNotFoundError):
        return version("lightning")
    return "2.5.0"


# ------------------------------------------------------------------------------------------------------- read
def resume_checkpoint(cfg, resume):
    """--resume_from_checkpoint: None, 'latest' or a path -> (a checkpoint file that reads back whole, its
    dict as read_checkpoint checked it), or (None, None). 'latest' is checkpoint_dir/last.ckpt, or when that
    is damaged the newest readable checkpoint there (named)."""
    if resume is None:
        return None, None
    if resume != "latest":
        if not os.path.isfile(resume):
            raise FileNotFoundError(f"--resume_from_checkpoint: no such file {resume}")
        return resume, read_checkpoint(resume)
    folder, last = cfg.paths.checkpoint_dir, os.path.join(cfg.paths.checkpoint_dir, LAST)
    candidates = checkpoint_files(folder)
    if not candidates:
        raise FileNotFoundError(f"--resume_from_checkpoint latest: no {last} (nothing to resume yet)")
    if candidates[0] != last:
        log.warning("warning: no %s; trying the other checkpoints there", last)
    problems = []
    for path in candidates:
        try:
            ckpt = read_checkpoint(path)
        except DamagedCheckpoint as e:
            log.warning("warning: %s", e)
            problems.append(os.path.basename(path))
            continue
        if path != last:
            log.warning("resuming from %s, the newest readable checkpoint in %s", path, folder)
        return path, ckpt
    raise DamagedCheckpoint(f"--resume_from_checkpoint latest: no readable checkpoint in {folder} "
                            f"({', '.join(problems)} damaged)")


def checkpoint_files(folder):
    """The .ckpt files in `folder`, newest first: last.ckpt, then by the step in their names, then by age."""
    if not os.path.isdir(folder):
        return []
    names = [f for f in os.listdir(folder) if f.endswith(".ckpt")]

    def newest_first(name):
        step = re.search(r"step=(\d+)", name)
        modified = os.path.getmtime(os.path.join(folder, name))
        return name != LAST, -int(step.group(1)) if step else 0, -modified
    return [os.path.join(folder, f) for f in sorted(names, key=newest_first)]


def read_checkpoint(path):
    """torch.load(weights_only=True) -> the checkpoint dict, after the checks a damaged file fails (not empty,
    a zip torch reads, a state_dict, the recorded sha256 if any, finite weights): DamagedCheckpoint."""
    if os.path.getsize(path) == 0:
        raise DamagedCheckpoint(f"{path} is unreadable: empty (0 bytes)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    # torch's weights_only advice (load with weights_only=False) is wrong for a damaged file
    except Exception as e:
        what = (str(e).strip().splitlines() or [""])[0][:200] if zipfile.is_zipfile(path) else \
            "not the zip archive torch.save writes: truncated, or another format"
        raise DamagedCheckpoint(f"{path} is unreadable ({type(e).__name__}: {what})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise DamagedCheckpoint(f"{path} is not a training checkpoint (no state_dict)")
    recorded = (ckpt.get("loop_state") or {}).get("weights_sha256")
    if recorded is not None and recorded != weights_sha256(ckpt):
        raise DamagedCheckpoint(f"{path} is damaged: its tensors' sha256 differs from the one "
                                "recorded when saved")
    for part in ("state_dict", "ema_state_dict"):
        for k, v in (ckpt.get(part) or {}).items():
            if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all():
                raise DamagedCheckpoint(f"{path} holds non-finite weights ({part} {k})")
    return ckpt


def load_checkpoint(run, path, loader, data_changed="error", ckpt=None):
    """Restore everything checkpoint_dict saved into `run`; returns the saved config dict. The training data
    must match the saved fingerprint (run.state.data_fingerprint holds this run's), unless data_changed is
    "restart_epoch": then the saved epoch starts again from its first batch. `ckpt`: the file's dict when
    already read (resume_checkpoint)."""
    s = run.state
    ckpt = ckpt if ckpt is not None else torch.load(path, map_location="cpu", weights_only=True)
    for prefix, module in _prefixed(run):
        part = {k[len(prefix) + 1:]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix + ".")}
        # The loss holds only logvar and frozen LPIPS weights: a run may switch the perceptual loss on or off.
        module.load_state_dict(part, strict=prefix != "loss")
    for obj, state in zip((run.opt_vae, run.opt_disc, run.sched_vae, run.sched_disc),
                          ckpt["optimizer_states"] + ckpt["lr_schedulers"]):
        obj.load_state_dict(state)
    # fused is this run's choice, not the file's (older files hold foreach groups): a fused optimizer given
    for opt in (run.opt_vae, run.opt_disc):  # foreach groups fails at its first fp16 step
        for group in opt.param_groups:
            group.update(fused=opt.defaults.get("fused"), foreach=opt.defaults.get("foreach"))
    if run.ema is not None:  # (EMA switched on since: it starts here)
        run.ema.load_state_dict(ckpt["ema_state_dict"] or run.vae.state_dict())
    s.epoch, s.step = ckpt["epoch"], ckpt["global_step"]
    ls = ckpt.get("loop_state")
    if ls is None:  # written by lightning_module.py: Lightning keeps its own loop state ("loops"), not ours
        for scaler in (run.scaler_vae, run.scaler_disc) if ckpt.get("MixedPrecision") else ():
            scaler.load_state_dict(ckpt["MixedPrecision"])  # Lightning's one fp16 GradScaler served both
        if run.rank == 0:
            print(f"note: {path} is a Lightning checkpoint: weights, optimizers and schedulers restored; the "
                  f"data restarts at the beginning of epoch {s.epoch} and the random streams are reseeded")
        return ckpt["hyper_parameters"]
    run.scaler_vae.load_state_dict(ls["grad_scalers"][0])
    run.scaler_disc.load_state_dict(ls["grad_scalers"][1])
    if ls["world_size"] == run.world:
        _set_rng_state(run, ls["rng_states"][run.rank])
    elif run.rank == 0:
        print(f"note: checkpoint written by {ls['world_size']} process(es), resumed by {run.world}: random "
              "streams are reseeded, the data position is approximate")
    # a dict (folders: one position for all ranks), or a per-rank list (streams), which the loader picks from
    data_state = ls["data"] if isinstance(ls["data"], list) else dict(ls["data"])
    saved = ls.get("data_fingerprint")
    change = describe_data_change(saved, s.data_fingerprint) if saved and s.data_fingerprint else None
    if change and data_changed != "restart_epoch":
        raise DataChangedError(f"the training data changed since {path} was saved: {change}; its data "
                               "position would point at other images. Restore the data, or pass "
                               "--resume_data_changed=restart_epoch to go on from the start of epoch "
                               f"{s.epoch}")
    if change:
        data_state["batches_consumed"] = 0
        if run.rank == 0:
            print(f"note: the training data changed ({change}): epoch {s.epoch} starts again from its "
                  "first batch")
    loader.load_state_dict(data_state)
    for key in _saved_state(s):  # data_fingerprint is this run's, compared above
        if key != "data_fingerprint":
            setattr(s, key, copy.deepcopy(ls.get(key)))
    return ckpt["hyper_parameters"]


def _set_rng_state(run, s):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state((s["numpy"][0], np.array(s["numpy"][1], dtype=np.uint32), *s["numpy"][2:]))
    run.noise.set_state(s["noise"])
    if s["cuda"] is not None and run.device.type == "cuda":
        torch.cuda.set_rng_state(s["cuda"], run.device)


def _saved_state(state):  # what loop_state keeps of train.py's LoopState (step, epoch: Lightning's keys)
    return {k: v for k, v in asdict(state).items() if k not in ("step", "epoch")}


def _prefixed(run):  # the state_dict key prefixes: the attribute names in lightning_module.py
    return ("vae", run.vae), ("discriminator", run.disc), ("loss", run.loss_fn)


def data_fingerprint(dataset, root=None):
    """What the training set was: {"count", "sha256"} of the sorted (path relative to `root`, size) of an
    image folder, or {"count", "hf_fingerprint"} of a Hugging Face dataset (datasets' own `_fingerprint`)."""
    if dataset.column is not None:
        return {"count": len(dataset), "hf_fingerprint": getattr(dataset.source, "_fingerprint", None)}
    h = hashlib.sha256()
    for path in sorted(dataset.source, key=lambda p: os.path.relpath(p, root or ".")):
        size = os.path.getsize(path) if os.path.exists(path) else -1
        h.update(f"{os.path.relpath(path, root or '.')}\0{size}\n".encode())
    return {"count": len(dataset), "sha256": h.hexdigest()}


def describe_data_change(saved, now):
    """None if two data_fingerprints agree, else what changed, in words ("1 image added")."""
    if saved == now:
        return None
    diff = now["count"] - saved["count"]
    if diff:
        return f"{abs(diff)} image{'s' * (abs(diff) != 1)} {'added' if diff > 0 else 'removed'} " \
               f"({saved['count']} then, {now['count']} now)"
    return f"the same number of images ({now['count']}), but files renamed, replaced or resized" \
        if "sha256" in now else f"the dataset's fingerprint changed ({saved.get('hf_fingerprint')} -> " \
                                f"{now.get('hf_fingerprint')})"


# ------------------------------------------------------------------------------------------------ run folders
def claim_run(cfg, resume, overwrite):
    """Before a run writes anything: take train.lock in checkpoint_dir and output_dir (a live holder: a
    RunFolderError naming it; a stale one, whose process on this host is gone, is taken over with a warning),
    then refuse to start a new run over a previous run's files unless resuming or `overwrite` (which deletes
    them). Returns the RunLock (release() at the end or exit). Only rank 0 (torchrun, Lightning) claims."""
    lock = RunLock()
    if any(int(os.environ.get(v) or 0) for v in ("RANK", "LOCAL_RANK", "NODE_RANK")):
        return lock
    folder, final = cfg.paths.checkpoint_dir, os.path.join(cfg.paths.output_dir, FINAL_MODEL)
    try:
        for path in {os.path.realpath(p): p for p in (cfg.paths.output_dir, folder)}.values():  # once if same
            lock.acquire(path)
    except RunFolderError:
        lock.release()
        raise
    found = checkpoint_files(folder) + [p for p in (os.path.join(folder, HF_FOLDER), final)
                                        if os.path.isdir(p)]
    names = [p if p == final else os.path.basename(p) for p in found]
    if found and resume is None and not overwrite:
        lock.release()
        shown = ", ".join(names[:3]) + ", ..." * (len(names) > 3)
        raise RunFolderError(f"{folder} holds a previous run ({shown}): continue it with "
                             "--resume_from_checkpoint latest, give new paths.checkpoint_dir and "
                             "paths.output_dir, or pass --overwrite to replace it")
    if found and resume is None:
        for path in found:
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        log.warning("--overwrite: removed the previous run's %s", ", ".join(names))
    return lock


class RunLock:
    """train.lock, {"host", "pid", "started"} of the run using a folder, in each folder acquired."""

    def __init__(self):
        self.paths, self.made = [], []  # the lock files held; the folders made for them

    def acquire(self, folder):
        made, parent = [], folder
        while parent and not os.path.isdir(parent):  # an empty folder made here goes again with the lock
            made.append(parent)
            parent = os.path.dirname(parent)
        os.makedirs(folder, exist_ok=True)
        self.made += made
        path = os.path.join(folder, LOCK)
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        for _ in range(3):
            try:  # O_EXCL: of two runs starting together exactly one creates the file
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read_lock(path)
                here = holder.get("host") == me["host"]
                # (an earlier run in this process that failed to start)
                mine = here and holder.get("pid") == me["pid"]
                if holder == {} or here and not _alive(holder.get("pid")) or mine:
                    if not mine:
                        log.warning("warning: taking over the stale lock %s of PID %s (started %s), which "
                                    "is no longer running", path, holder.get("pid"), holder.get("started"))
                    with contextlib.suppress(FileNotFoundError):  # one of two runs taking it over removes it
                        os.rename(path, f"{path}.{me['pid']}.stale")
                        os.remove(f"{path}.{me['pid']}.stale")
                    continue
                raise RunFolderError(
                    f"{os.path.dirname(path)} is in use by another run: PID {holder.get('pid')} on host "
                    f"{holder.get('host')}, started {holder.get('started')} ({path}); wait for it, give "
                    "other paths, or delete the lock file if that run is gone") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.paths.append(path)
            atexit.register(self.release)
            return
        raise RunFolderError(f"cannot take the lock {path}: other runs keep taking it")

    def release(self):
        for path in self.paths:
            with contextlib.suppress(OSError):
                os.remove(path)
        for folder in sorted(self.made, key=lambda f: f.count(os.sep), reverse=True):  # those left empty
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        self.paths, self.made = [], []


def _read_lock(path):
    """The lock's record; {} when unreadable (taken over as stale), unless just created (being written)."""
    try:
        with open(path) as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        with contextlib.suppress(OSError):  # created, then written: a just-created lock is empty for a moment
            if time.time() - os.path.getmtime(path) < 10:
                return {"pid": "?", "host": "?", "started": "just now"}
        return {}


def _alive(pid):
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


def log_version_dir(log_dir, name=None):
    """logs/vae_training/`name` when given and present (a resumed run continues its curves), else version_N
    with N one more than the highest present (Lightning's TensorBoardLogger)."""
    base = os.path.join(log_dir, LOG_NAME)
    if name and os.path.isdir(os.path.join(base, name)):
        return os.path.join(base, name)
    os.makedirs(base, exist_ok=True)
    versions = [int(d[8:]) for d in os.listdir(base) if d.startswith("version_") and d[8:].isdigit()]
    path = os.path.join(base, f"version_{max(versions) + 1 if versions else 0}")
    os.makedirs(path)
    return path
