"""Checkpoint files and run folders: what train.py writes and reads back, in Lightning's layout (CONTRACT.md).

    checkpoints/vae-epoch=XX-step=XXXXXX.ckpt   the save_top_k best by checkpoint.monitor (ModelCheckpoint's rule)
    checkpoints/last.ckpt                       the newest state; `--resume_from_checkpoint latest` reads it
    checkpoints/hf_checkpoint/                  the newest weights in diffusers format (EMA weights when on)
    logs/vae_training/version_N/                one TensorBoard folder per run (TensorBoardLogger's numbering)

The functions take train.py's Run (models, optimizers, schedulers, scalers, `state`, `cfg`) and never import
train.py. Files are replaced atomically: a crash mid-write never leaves a truncated checkpoint.
"""
import contextlib
import math
import os
import random
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist

from vae import atomic_write


# ------------------------------------------------------------------------------------------------------ write
def save_checkpoint(run, loader, top_k):
    """Top-k file (when due and good enough), last.ckpt, hf_checkpoint/ (EMA weights when on). Rank 0 writes."""
    ckpt = checkpoint_dict(run, loader)
    if run.rank != 0:
        return
    folder = run.cfg.paths.checkpoint_dir
    os.makedirs(folder, exist_ok=True)
    name, last = f"vae-epoch={loader.epoch:02d}-step={run.state.step:06d}.ckpt", os.path.join(folder, "last.ckpt")
    keep, drop = update_top_k(run, name) if top_k else (False, [])
    ckpt["loop_state"]["top_k"] = dict(run.state.top_k)  # the file records itself, as Lightning's does
    if keep:
        atomic_save(ckpt, os.path.join(folder, name))
        tmp = os.path.join(folder, ".last.ckpt.tmp")
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        try:  # last.ckpt as a hard link to the same bytes: one write instead of two (files are only replaced)
            os.link(os.path.join(folder, name), tmp)
            os.replace(tmp, last)
        except OSError:
            atomic_save(ckpt, last)
    else:
        atomic_save(ckpt, last)
    for old in drop:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, old))
    (run.ema if run.ema is not None else run.vae).save_pretrained(os.path.join(folder, "hf_checkpoint"))


def update_top_k(run, filename):
    """Lightning's ModelCheckpoint rule: keep the save_top_k best by `monitor` (strictly better replaces the
    worst); with monitor null, the newest k. Returns (save this one?, files to delete)."""
    c, top_k = run.cfg.checkpoint, run.state.top_k
    score = run.state.metrics.get(c.monitor) if c.monitor else None
    if c.save_top_k == 0 or (c.monitor and score is None):  # Lightning also skips top-k while it is not logged yet
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
    """Lightning's layout (state_dict with module-prefixed keys, optimizer_states, lr_schedulers, epoch,
    global_step, hyper_parameters) plus our loop state. Collective under DDP (RNG states and data positions of
    every rank)."""
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
    s = run.state
    return {
        "epoch": loader.epoch, "global_step": s.step, "pytorch-lightning_version": lightning_version(),
        "state_dict": {f"{prefix}.{k}": v.detach().cpu() for prefix, module in _prefixed(run)
                       for k, v in module.state_dict().items()},
        "optimizer_states": [run.opt_vae.state_dict(), run.opt_disc.state_dict()],
        "lr_schedulers": [run.sched_vae.state_dict(), run.sched_disc.state_dict()],
        "hyper_parameters": asdict(run.cfg),
        "ema_state_dict": {k: v.cpu() for k, v in run.ema.state_dict().items()} if run.ema is not None else None,
        "loop_state": {"grad_scalers": [run.scaler_vae.state_dict(), run.scaler_disc.state_dict()],
                       "rng_states": rng, "world_size": run.world, "data": data,
                       "top_k": dict(s.top_k), "metrics": dict(s.metrics),
                       "nonfinite": s.nonfinite, "nonfinite_total": s.nonfinite_total}}


def atomic_save(obj, path):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))  # a crash mid-write never leaves a truncated checkpoint


def _rng_state(run):
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]), "noise": run.noise.get_state(),
            "cuda": torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None}


def lightning_version():
    """Lightning's load_from_checkpoint needs this key; the version installed, else one we know matches."""
    from importlib.metadata import PackageNotFoundError, version
    for name in ("lightning", "pytorch-lightning"):
        with contextlib.suppress(PackageNotFoundError):
            return version(name)
    return "2.5.0"


# ------------------------------------------------------------------------------------------------------- read
def resume_path(cfg, resume):
    """--resume_from_checkpoint: None, 'latest' (checkpoint_dir/last.ckpt) or a path -> an existing file or None."""
    if resume == "latest":
        resume = os.path.join(cfg.paths.checkpoint_dir, "last.ckpt")
        if not os.path.isfile(resume):
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no {resume} (nothing to resume yet)")
    elif resume is not None and not os.path.isfile(resume):
        raise FileNotFoundError(f"--resume_from_checkpoint: no such file {resume}")
    return resume


def load_checkpoint(run, path, loader):
    """Restore everything checkpoint_dict saved (run.state's step and epoch too); returns the saved config dict."""
    ckpt, s = torch.load(path, map_location="cpu", weights_only=True), run.state
    for prefix, module in _prefixed(run):
        part = {k[len(prefix) + 1:]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix + ".")}
        # The loss holds only logvar and frozen LPIPS weights: a run may switch the perceptual loss on or off.
        module.load_state_dict(part, strict=prefix != "loss")
    for obj, state in zip((run.opt_vae, run.opt_disc, run.sched_vae, run.sched_disc),
                          ckpt["optimizer_states"] + ckpt["lr_schedulers"]):
        obj.load_state_dict(state)
    for opt in (run.opt_vae, run.opt_disc):  # fused is this run's choice, not the file's (older files hold foreach
        for group in opt.param_groups:  # groups): a fused optimizer given foreach groups fails at its first fp16 step
            group.update(fused=opt.defaults.get("fused"), foreach=opt.defaults.get("foreach"))
    if run.ema is not None:
        run.ema.load_state_dict(ckpt["ema_state_dict"] or run.vae.state_dict())  # EMA switched on: start it here
    s.epoch, s.step = ckpt["epoch"], ckpt["global_step"]
    ls = ckpt.get("loop_state")
    if ls is None:  # written by lightning_module.py: Lightning keeps its own loop state ("loops"), not ours
        for scaler in (run.scaler_vae, run.scaler_disc):  # Lightning's one fp16 GradScaler served both optimizers
            if ckpt.get("MixedPrecision"):
                scaler.load_state_dict(ckpt["MixedPrecision"])
        if run.rank == 0:
            print(f"note: {path} is a Lightning checkpoint: weights, optimizers and schedulers restored; the data "
                  f"restarts at the beginning of epoch {s.epoch} and the random streams are reseeded")
        return ckpt["hyper_parameters"]
    run.scaler_vae.load_state_dict(ls["grad_scalers"][0])
    run.scaler_disc.load_state_dict(ls["grad_scalers"][1])
    if ls["world_size"] == run.world:
        _set_rng_state(run, ls["rng_states"][run.rank])
    elif run.rank == 0:
        print(f"note: checkpoint written by {ls['world_size']} process(es), resumed by {run.world}: random "
              "streams are reseeded, the data position is approximate")
    loader.load_state_dict(ls["data"])
    s.top_k, s.metrics = dict(ls["top_k"]), dict(ls["metrics"])
    s.nonfinite, s.nonfinite_total = ls["nonfinite"], ls["nonfinite_total"]
    return ckpt["hyper_parameters"]


def _set_rng_state(run, s):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state((s["numpy"][0], np.array(s["numpy"][1], dtype=np.uint32), *s["numpy"][2:]))
    run.noise.set_state(s["noise"])
    if s["cuda"] is not None and run.device.type == "cuda":
        torch.cuda.set_rng_state(s["cuda"], run.device)


def _prefixed(run):  # the state_dict key prefixes: the attribute names in lightning_module.py
    return ("vae", run.vae), ("discriminator", run.disc), ("loss", run.loss_fn)


# ------------------------------------------------------------------------------------------------ run folders
def new_version_dir(log_dir):
    """logs/vae_training/version_N with N one more than the highest present (Lightning's TensorBoardLogger)."""
    base = os.path.join(log_dir, "vae_training")
    os.makedirs(base, exist_ok=True)
    versions = [int(d[8:]) for d in os.listdir(base) if d.startswith("version_") and d[8:].isdigit()]
    path = os.path.join(base, f"version_{max(versions) + 1 if versions else 0}")
    os.makedirs(path)
    return path
