"""Train or fine-tune the SD 1.5 VAE: one plain PyTorch loop for CPU, one GPU, and torchrun DDP.

    python train.py --config config.yaml                                  # CPU or one GPU
    python train.py --config config.yaml training.batch_size=2 training.decoder_only=true   # section.key=value
    python train.py --config config.yaml --resume_from_checkpoint latest  # = checkpoints/last.ckpt (or a path)
    python train.py --config config.yaml --precision bf16-mixed           # 16-mixed | bf16-mixed | 32
    torchrun --nproc_per_node=8 train.py --config config.yaml             # one node, 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        train.py --config config.yaml                                     # the same on every node
    python train.py --config configs/quickstart.yaml                      # small VAE from scratch, CPU, ~3 min

Each step: one VAE forward; the generator loss (reconstruction + LPIPS + KL + adaptive-weighted PatchGAN term from
loss.disc_start_step) and its backward; then the discriminator step on the real images and the detached
reconstructions. It leaves what Lightning's ModelCheckpoint + TensorBoardLogger would (CONTRACT.md):
checkpoints/vae-epoch=XX-step=XXXXXX.ckpt (top-k), checkpoints/last.ckpt, checkpoints/hf_checkpoint/,
outputs/final_model/, logs/vae_training/version_N/. SIGTERM/SIGINT: the current step finishes, last.ckpt is
written, the process exits 0. Resuming is exact: same batches, augmentations, noise and weights.
Checkpoints hold the frozen LPIPS weights under "loss." so that the Lightning adapter loads them strictly.
Under DDP, resuming needs checkpoint_dir on a filesystem every node can read.
"""
import argparse
import contextlib
import copy
import dataclasses
import difflib
import itertools
import math
import os
import pickle
import random
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import List, Optional, Union, get_args, get_origin, get_type_hints

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from tqdm import tqdm

from data import DataError, ResumableLoader, build_datasets, image_grid, one_line
from losses import NLayerDiscriminator, VAELoss, psnr, ssim
from vae import AutoencoderKL, atomic_write



# ---------------------------------------------------------------------------------------------------- config
@dataclass
class ModelConfig:
    pretrained_model_name_or_path: Optional[str] = "stabilityai/sd-vae-ft-mse"
    subfolder: Optional[str] = None
    gradient_checkpointing: bool = False
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: List[str] = field(default_factory=lambda: ["DownEncoderBlock2D"] * 4)
    up_block_types: List[str] = field(default_factory=lambda: ["UpDecoderBlock2D"] * 4)
    block_out_channels: List[int] = field(default_factory=lambda: [128, 256, 512, 512])
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: Union[int, List[int]] = 512
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    latents_mean: Optional[List[float]] = None
    latents_std: Optional[List[float]] = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True


@dataclass
class TrainingConfig:
    seed: int = 42
    batch_size: int = 4
    num_epochs: int = 100
    max_steps: Optional[int] = None
    learning_rate: float = 4.5e-6
    disc_learning_rate: float = 4.5e-6
    weight_decay: float = 0.01
    adam_betas: List[float] = field(default_factory=lambda: [0.5, 0.9])  # LDM's Adam betas for both optimizers
    warmup_steps: int = 0
    gradient_clip_val: Optional[float] = 1.0
    accumulate_grad_batches: int = 1
    precision: str = "16-mixed"
    num_workers: int = 4
    decoder_only: bool = False
    ema_decay: Optional[float] = None
    compile: bool = False
    max_consecutive_nonfinite: int = 20


@dataclass
class LossConfig:
    rec_loss_type: str = "l2"
    kl_weight: float = 1e-6
    perceptual_weight: float = 0.5
    disc_weight: float = 1.0
    disc_start_step: int = 50001
    disc_loss_type: str = "hinge"
    disc_num_layers: int = 3
    disc_ndf: int = 64
    learn_logvar: bool = False
    logvar_init: float = 0.0
    random_lpips_backbone: bool = False  # tests only


@dataclass
class DataConfig:
    dataset_name: Optional[str] = "lambdalabs/pokemon-blip-captions"
    dataset_config_name: Optional[str] = None
    train_data_dir: Optional[str] = None
    val_data_dir: Optional[str] = None
    image_column: str = "image"
    resolution: int = 512
    center_crop: bool = True
    random_flip: bool = True
    num_val_holdout: int = 64
    max_bad_fraction: float = 0.01
    cache_dir: Optional[str] = None


@dataclass
class CheckpointConfig:
    save_top_k: int = 3
    save_every_n_steps: int = 1000
    monitor: Optional[str] = "val/rec_loss"
    mode: str = "min"


@dataclass
class LoggingConfig:
    log_every_n_steps: int = 50
    val_check_interval: int = 500
    log_images_every_n_steps: int = 500
    num_val_images: int = 4
    progress_bar: bool = True


@dataclass
class PathsConfig:
    output_dir: str = "./outputs"
    log_dir: str = "./logs"
    checkpoint_dir: str = "./checkpoints"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
VAE_KEYS = [f.name for f in dataclasses.fields(ModelConfig)][3:]  # the AutoencoderKL(**config) keys
PRECISIONS = {"32": "32", "32-true": "32", "16": "16-mixed", "16-mixed": "16-mixed", "bf16": "bf16-mixed",
              "bf16-mixed": "bf16-mixed"}
CHOICES = {"loss.rec_loss_type": ("l1", "l2"), "loss.disc_loss_type": ("hinge", "vanilla"),
           "checkpoint.mode": ("min", "max")}
POSITIVE = ["training.batch_size", "training.num_epochs", "training.accumulate_grad_batches", "data.resolution",
            "training.max_consecutive_nonfinite", "checkpoint.save_every_n_steps", "logging.log_every_n_steps",
            "logging.val_check_interval", "logging.log_images_every_n_steps", "loss.disc_num_layers", "loss.disc_ndf"]
# What the loop logs (TensorBoard scalars); checkpoint.monitor must be one of them.
STEP_TAGS = ["train/loss", "train/rec_loss", "train/p_loss", "train/kl_loss", "train/g_loss", "train/d_loss",
             "train/grad_norm", "train/disc_grad_norm"]
VAL_TAGS = ["val/rec_loss", "val/psnr", "val/ssim", "val/lpips"]
EXTRA_TAGS = ["train/lr", "train/disc_lr", "train/images_per_sec"]


class ConfigError(ValueError):
    """A bad config file, key, value or override; the message names the key."""


def _coerce(value, tp, key):
    """`value` checked against the annotation `tp`; ints widen to float. Raises ConfigError naming `key`."""
    if get_origin(tp) is Union:
        if value is None and type(None) in get_args(tp):
            return None
        for option in (a for a in get_args(tp) if a is not type(None)):
            with contextlib.suppress(ConfigError):
                return _coerce(value, option, key)
    elif get_origin(tp) is list:
        if isinstance(value, (list, tuple)):
            return [_coerce(v, get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    elif tp is bool and isinstance(value, bool):
        return value
    elif tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif tp is float and isinstance(value, str):
        with contextlib.suppress(ValueError):  # PyYAML (YAML 1.1) reads `1e-6` (no dot) as a string
            return float(value)
    elif tp is str and isinstance(value, str):
        return value
    name = str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")
    raise ConfigError(f"{key}: expected {name}, got {value!r} ({type(value).__name__})")


def config_from_dict(raw):
    """Plain nested dict (config.yaml's layout) -> Config. Missing keys take their defaults."""
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping of sections {list(SECTIONS)}, got {type(raw).__name__}")
    sections = {}
    for name, values in raw.items():
        if name not in SECTIONS:
            hint = difflib.get_close_matches(str(name), SECTIONS, 1)
            raise ConfigError(f"unknown section '{name}'" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
        values = {} if values is None else values  # an empty section in YAML
        if not isinstance(values, dict):
            raise ConfigError(f"{name}: expected a mapping of keys, got {values!r}")
        hints = get_type_hints(SECTIONS[name])
        kwargs = {}
        for k, v in values.items():
            key = f"{name}.{k}"
            if k not in hints:
                hint = difflib.get_close_matches(str(k), hints, 1)
                raise ConfigError(f"unknown key '{key}'" + (f" (did you mean '{name}.{hint[0]}'?)" if hint else ""))
            if key == "training.precision":  # Lightning's spellings, 32 and 16 also as YAML ints
                if str(v) not in PRECISIONS:
                    raise ConfigError(f"{key}: expected one of 16-mixed, bf16-mixed, 32, got {v!r}")
                v = PRECISIONS[str(v)]
            kwargs[k] = _coerce(v, hints[k], key)
        sections[name] = SECTIONS[name](**kwargs)
    cfg = Config(**sections)
    for key, allowed in CHOICES.items():
        value = getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])
        if value not in allowed:
            raise ConfigError(f"{key}: expected one of {', '.join(allowed)}, got {value!r}")
    for key in POSITIVE:
        if getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]) < 1:
            raise ConfigError(f"{key}: must be >= 1")
    t = cfg.training
    if t.max_steps is not None and t.max_steps < 1:
        raise ConfigError("training.max_steps: must be >= 1 or null")
    if t.ema_decay is not None and not 0.0 < t.ema_decay < 1.0:
        raise ConfigError(f"training.ema_decay: must be in (0, 1) or null, got {t.ema_decay}")
    if len(t.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in t.adam_betas):
        raise ConfigError(f"training.adam_betas: expected two numbers in [0, 1), got {t.adam_betas}")
    monitorable = STEP_TAGS + VAL_TAGS + EXTRA_TAGS
    if cfg.checkpoint.monitor is not None and cfg.checkpoint.monitor not in monitorable:
        raise ConfigError(f"checkpoint.monitor: expected one of {', '.join(monitorable)} or null, "
                          f"got {cfg.checkpoint.monitor!r}")
    return cfg


def load_config(path=None, overrides=()):
    """config.yaml (or defaults when path is None) + `section.key=value` overrides (YAML scalars) -> Config."""
    raw = {}
    if path is not None:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections {list(SECTIONS)}")
    for item in overrides:
        key, eq, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not eq or not dot or not name or "." in name:
            raise ConfigError(f"bad override {item!r}: expected section.key=value (e.g. training.batch_size=8)")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"{key}: cannot parse override value {text!r} as YAML") from None
        if section in raw and not isinstance(raw[section], dict):
            raise ConfigError(f"{section}: expected a mapping of keys")
        raw.setdefault(section, {})[name] = value
    return config_from_dict(raw)


# ---------------------------------------------------------------------------------------------------- set-up
class StartupError(Exception):
    """Anything wrong before the first step (config, model, data, checkpoint): one line, exit code 2."""


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row."""


def init_distributed():
    """(rank, world_size, device) from torchrun's environment; single process without it."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def all_reduce(t, world, op=None):
    if world > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def load_vae(m):
    if m.pretrained_model_name_or_path:
        return AutoencoderKL.from_pretrained(m.pretrained_model_name_or_path, subfolder=m.subfolder)
    return AutoencoderKL(**{k: getattr(m, k) for k in VAE_KEYS})


def build_run(cfg, device, rank=0, world=1):
    """Models, optimizers, schedulers, scalers, EMA and wrappers: everything a step needs, in one namespace."""
    t, lc = cfg.training, cfg.loss
    torch.manual_seed(t.seed)  # the same initialisation on every rank (DDP broadcasts rank 0's anyway)
    vae = load_vae(cfg.model).to(device).train()
    if cfg.model.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    if t.decoder_only:  # sd-vae-ft-mse: only the decoder is fine-tuned; the latent space stays the same
        for module in (vae.encoder, vae.quant_conv):
            if module is not None:
                module.requires_grad_(False)
    loss_fn = VAELoss(lc.rec_loss_type, lc.kl_weight, lc.perceptual_weight, lc.disc_weight, lc.disc_start_step,
                      lc.disc_loss_type, lc.learn_logvar, lc.logvar_init, lc.random_lpips_backbone).to(device)
    disc = NLayerDiscriminator(3, lc.disc_ndf, lc.disc_num_layers).to(device)  # initialised with weights_init
    if world > 1 and device.type == "cuda":
        disc = nn.SyncBatchNorm.convert_sync_batchnorm(disc)
    # On CPU (gloo) SyncBatchNorm raises in training ("expected input tensor to be on GPU"), so BatchNorm stays
    # per-rank there; DDP's broadcast_buffers still keeps the running statistics equal across ranks.
    vae_params = [p for p in vae.parameters() if p.requires_grad] + ([loss_fn.logvar] if lc.learn_logvar else [])
    # Fused AdamW, one kernel over all parameters: one VAE step 11x faster than the for-loop on an H200 and 3.6x on
    # 2 CPU cores, where foreach is *slower* than the for-loop (BENCHMARKS.md). (CPU needs torch >= 2.4, required.)
    opt_vae = torch.optim.AdamW(vae_params, t.learning_rate, betas=tuple(t.adam_betas),
                                weight_decay=t.weight_decay, fused=True)
    opt_disc = torch.optim.AdamW(disc.parameters(), t.disc_learning_rate, betas=tuple(t.adam_betas),
                                 weight_decay=t.weight_decay, fused=True)
    warmup = t.warmup_steps

    def lr_factor(step):  # linear warmup, then constant
        return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0

    train_vae, train_disc = vae, disc
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        train_vae = nn.parallel.DistributedDataParallel(vae, device_ids=ids, gradient_as_bucket_view=True)
        train_disc = nn.parallel.DistributedDataParallel(disc, device_ids=ids, gradient_as_bucket_view=True)
    ddp_vae = train_vae
    if t.compile:
        # Compile the blocks in place (module.compile(): state-dict keys unchanged), not the whole model: the
        # adaptive GAN weight takes gradients w.r.t. decoder.conv_out.weight twice per step, and with conv_out
        # inside one compiled graph each of those would run that graph's whole backward (3 backwards a step).
        dec = vae.decoder
        for module in (vae.encoder, vae.quant_conv, vae.post_quant_conv, dec.conv_in, dec.mid_block, *dec.up_blocks):
            if module is not None:
                module.compile()
    # The EMA copy is made after DDP's constructor broadcast rank 0's weights, so it is the same on every rank.
    ema = copy.deepcopy(vae).requires_grad_(False).eval() if t.ema_decay else None
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(t.precision)
    run = SimpleNamespace(
        cfg=cfg, device=device, rank=rank, world=world, vae=vae, disc=disc, loss_fn=loss_fn, ema=ema,
        train_vae=train_vae, train_disc=train_disc, ddp_vae=ddp_vae, vae_params=vae_params,
        opt_vae=opt_vae, opt_disc=opt_disc,
        sched_vae=torch.optim.lr_scheduler.LambdaLR(opt_vae, lr_factor),
        sched_disc=torch.optim.lr_scheduler.LambdaLR(opt_disc, lr_factor),
        # fp16: one GradScaler per optimizer over the fp32 weights; disabled scalers are pass-throughs.
        scaler_vae=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        scaler_disc=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        autocast=lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None),
        # Posterior noise from its own generator: the data loader's use of the global RNG cannot shift it.
        noise=torch.Generator(device).manual_seed(t.seed + rank),
        top_k={}, metrics={}, nonfinite=0, nonfinite_total=0, stop=False, stop_requested=False)
    random.seed(t.seed + rank)
    np.random.seed((t.seed + rank) % 2**32)
    torch.manual_seed(t.seed + rank)
    return run


# ------------------------------------------------------------------------------------------------------ step
def scheduler_step(scheduler):
    # Under fp16 the GradScaler skips steps whose gradients overflowed (by design), and non-finite losses skip
    # steps too; the schedule still follows the step count, so torch's "scheduler stepped before the optimizer"
    # warning is expected here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        scheduler.step()


def train_step(run, micro_batches, step):
    """One optimizer step of the VAE and (from disc_start_step) of the discriminator over `micro_batches`.

    Returns (stats tensor in STEP_TAGS order, skipped: bool, (inputs, reconstructions) of the last micro-batch)."""
    cfg, device, n = run.cfg, run.device, len(micro_batches)
    disc_on = cfg.loss.disc_weight > 0 and step >= cfg.loss.disc_start_step
    fp16 = run.scaler_vae.is_enabled()
    run.opt_vae.zero_grad(set_to_none=True)
    run.opt_disc.zero_grad(set_to_none=True)
    stats = torch.zeros(len(STEP_TAGS), device=device)
    for i, batch in enumerate(micro_batches):
        x = batch["pixel_values"].to(device, non_blocking=True)
        with contextlib.ExitStack() as stack:
            if run.world > 1 and i < n - 1:  # DDP: all-reduce gradients on the last micro-batch only
                stack.enter_context(run.ddp_vae.no_sync())
                stack.enter_context(run.train_disc.no_sync())
            # Generator step. The loss freezes D while it judges the reconstructions: no D gradient leaks here.
            with run.autocast():
                out = run.train_vae(x, sample_posterior=True, generator=run.noise)
                g_total, g_logs = run.loss_fn.generator_loss(
                    x, out.sample, out.latent_dist, step, discriminator=run.disc if disc_on else None,
                    last_layer=run.vae.decoder.conv_out.weight,
                    grad_scale=run.scaler_vae.get_scale() if fp16 and disc_on else 1.0)
            run.scaler_vae.scale(g_total / n).backward()
            # Discriminator step on the same forward's reconstructions, detached: no VAE gradient leaks here.
            d_total = torch.zeros((), device=device)
            if disc_on:
                with run.autocast():
                    d_total, _ = run.loss_fn.discriminator_loss(run.train_disc, x, out.sample.detach(), step)
                run.scaler_disc.scale(d_total / n).backward()
        stats[:6] += torch.stack([g_total.detach(), g_logs["rec_loss"], g_logs["p_loss"], g_logs["kl_loss"],
                                  g_logs["g_loss"], d_total.detach()]).float() / n
    sample = (x[:4].detach(), out.sample[:4].detach().float())

    if run.world > 1 and cfg.loss.learn_logvar:  # logvar lives outside the DDP module: average it by hand
        all_reduce(run.loss_fn.logvar.grad, run.world).div_(run.world)
    clip = cfg.training.gradient_clip_val or math.inf
    run.scaler_vae.unscale_(run.opt_vae)  # clip the true gradients, not the fp16-scaled ones
    stats[6] = torch.nn.utils.clip_grad_norm_(run.vae_params, clip)
    if disc_on:
        run.scaler_disc.unscale_(run.opt_disc)
        stats[7] = torch.nn.utils.clip_grad_norm_(run.disc.parameters(), clip)
    # A non-finite loss (or, without fp16's GradScaler, which skips overflowing steps itself, a non-finite gradient)
    # skips the step on every rank; the caller counts it.
    bad = ~torch.isfinite(stats[:6]).all() | (~torch.isfinite(stats[6:]).all() & (not fp16))
    if all_reduce(bad.float(), run.world, dist.ReduceOp.MAX).item():
        run.opt_vae.zero_grad(set_to_none=True)
        run.opt_disc.zero_grad(set_to_none=True)
        run.scaler_vae.update()  # (fp16) close this step's unscale_; backs off on NaN gradients
        if disc_on:
            run.scaler_disc.update()
        scheduler_step(run.sched_vae)  # the VAE's schedule stays a function of the step count
        return stats, True, sample
    run.scaler_vae.step(run.opt_vae)  # fp16: skipped by the scaler if a gradient overflowed (scale backs off)
    run.scaler_vae.update()
    if disc_on:
        run.scaler_disc.step(run.opt_disc)
        run.scaler_disc.update()
        scheduler_step(run.sched_disc)  # the discriminator's warmup starts with its first step
    stats[6:] = torch.nan_to_num(stats[6:], nan=0.0, posinf=0.0)  # fp16 overflow steps: not a norm worth logging
    scheduler_step(run.sched_vae)
    if run.ema is not None:
        # diffusers' EMAModel decay warm-up: min(decay, (1 + t) / (10 + t)), so early weights do not dominate.
        decay = min(cfg.training.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(run.ema.parameters()), [p.detach() for p in run.vae.parameters()], 1 - decay)
    return stats, False, sample


@torch.no_grad()
def validate(run, loader, num_images):
    """val/* metrics over the whole validation set (all ranks), and (rank 0) the first images with their
    reconstructions. Uses the EMA weights when EMA is on; the posterior mode, as at inference."""
    model = run.ema if run.ema is not None else run.vae
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, device=run.device)  # rec_loss, psnr, ssim, lpips, images
    shown = []
    for batch in loader:
        x = batch["pixel_values"].to(run.device)
        with run.autocast():
            rec = model(x).sample.float()
        err = (x - rec).abs() if run.cfg.loss.rec_loss_type == "l1" else (x - rec).pow(2)
        lp = run.loss_fn.lpips(x, rec.clamp(-1, 1)).flatten() if run.loss_fn.lpips is not None else x.new_zeros(len(x))
        sums += torch.stack([err.flatten(1).mean(1).sum(), psnr(x, rec).sum(), ssim(x, rec).sum(), lp.sum(),
                             x.new_tensor(float(len(x)))])
        if sum(len(a) for a, _ in shown) < num_images:
            shown.append((x, rec))
    all_reduce(sums, run.world)
    model.train(was_training)
    metrics = dict(zip(VAL_TAGS, (sums[:4] / sums[4]).tolist()))
    if run.loss_fn.lpips is None:
        del metrics["val/lpips"]
    images = None
    if shown:
        images = tuple(torch.cat(part)[:num_images] for part in zip(*shown))
    return metrics, images


# ----------------------------------------------------------------------------------------------- checkpoints
def _rng_state(run):
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]), "noise": run.noise.get_state(),
            "cuda": torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None}


def _set_rng_state(run, s):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state((s["numpy"][0], np.array(s["numpy"][1], dtype=np.uint32), *s["numpy"][2:]))
    run.noise.set_state(s["noise"])
    if s["cuda"] is not None and run.device.type == "cuda":
        torch.cuda.set_rng_state(s["cuda"], run.device)


def lightning_version():
    """Lightning's load_from_checkpoint needs this key; the version installed, else one we know matches."""
    from importlib.metadata import PackageNotFoundError, version
    for name in ("lightning", "pytorch-lightning"):
        with contextlib.suppress(PackageNotFoundError):
            return version(name)
    return "2.5.0"


def checkpoint_dict(run, epoch, step, loader):
    """Lightning's layout (state_dict with module-prefixed keys, optimizer_states, lr_schedulers, epoch,
    global_step, hyper_parameters) plus our loop state. Collective under DDP (RNG states of every rank)."""
    rng = [_rng_state(run)]
    if run.world > 1:
        rng = [None] * run.world
        dist.all_gather_object(rng, _rng_state(run))
    if run.rank != 0:
        return None
    state = {f"{prefix}.{k}": v.detach().cpu() for prefix, module in
             (("vae", run.vae), ("discriminator", run.disc), ("loss", run.loss_fn))
             for k, v in module.state_dict().items()}
    return {
        "epoch": epoch, "global_step": step, "pytorch-lightning_version": lightning_version(),
        "state_dict": state,
        "optimizer_states": [run.opt_vae.state_dict(), run.opt_disc.state_dict()],
        "lr_schedulers": [run.sched_vae.state_dict(), run.sched_disc.state_dict()],
        "hyper_parameters": asdict(run.cfg),
        "ema_state_dict": {k: v.cpu() for k, v in run.ema.state_dict().items()} if run.ema is not None else None,
        "loop_state": {"grad_scalers": [run.scaler_vae.state_dict(), run.scaler_disc.state_dict()],
                       "rng_states": rng, "world_size": run.world, "data": loader.state_dict(),
                       "top_k": dict(run.top_k), "metrics": dict(run.metrics),
                       "nonfinite": run.nonfinite, "nonfinite_total": run.nonfinite_total}}


def atomic_save(obj, path):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))  # a crash mid-write never leaves a truncated checkpoint


def update_top_k(run, filename, step):
    """Lightning's ModelCheckpoint rule: keep the save_top_k best by `monitor` (strictly better replaces the
    worst); with monitor null, the newest k. Returns (save this one?, files to delete)."""
    k, monitor, mode = run.cfg.checkpoint.save_top_k, run.cfg.checkpoint.monitor, run.cfg.checkpoint.mode
    score = run.metrics.get(monitor) if monitor else None
    if k == 0 or (monitor and score is None):  # Lightning also skips top-k while the metric is not logged yet
        return False, []
    if not monitor:
        key = -float(step)  # newest first
    elif not math.isfinite(score):
        key = math.inf  # NaN/inf never counts as best (Lightning replaces NaN by +-inf)
    else:
        key = score if mode == "min" else -score  # compared as "lower is better"
    if k < 0 or len(run.top_k) < k:
        run.top_k[filename] = key
        return True, []
    worst = max(run.top_k, key=run.top_k.get)
    if key < run.top_k[worst]:
        del run.top_k[worst]
        run.top_k[filename] = key
        return True, [worst]
    return False, []


def save_checkpoint(run, epoch, step, loader, top_k):
    """Top-k file (when due and good enough), last.ckpt, hf_checkpoint/ (EMA weights when on). Rank 0 writes."""
    ckpt = checkpoint_dict(run, epoch, step, loader)
    if run.rank != 0:
        return
    folder = run.cfg.paths.checkpoint_dir
    os.makedirs(folder, exist_ok=True)
    name = f"vae-epoch={epoch:02d}-step={step:06d}.ckpt"
    keep, drop = update_top_k(run, name, step) if top_k else (False, [])
    ckpt["loop_state"]["top_k"] = dict(run.top_k)  # the file records itself, as Lightning's does
    last = os.path.join(folder, "last.ckpt")
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


def load_checkpoint(run, path, loader):
    """Restore everything checkpoint_dict saved; returns (epoch, global_step, the checkpoint's config dict)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    sd = ckpt["state_dict"]
    for prefix, module in (("vae", run.vae), ("discriminator", run.disc), ("loss", run.loss_fn)):
        part = {k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(prefix + ".")}
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
    ls = ckpt.get("loop_state")
    if ls is None:  # written by lightning_module.py: Lightning keeps its own loop state ("loops"), not ours
        for scaler in (run.scaler_vae, run.scaler_disc):  # Lightning's one fp16 GradScaler served both optimizers
            if ckpt.get("MixedPrecision"):
                scaler.load_state_dict(ckpt["MixedPrecision"])
        if run.rank == 0:
            print(f"note: {path} is a Lightning checkpoint: weights, optimizers and schedulers restored; the data "
                  f"restarts at the beginning of epoch {ckpt['epoch']} and the random streams are reseeded")
        return ckpt["epoch"], ckpt["global_step"], ckpt["hyper_parameters"]
    run.scaler_vae.load_state_dict(ls["grad_scalers"][0])
    run.scaler_disc.load_state_dict(ls["grad_scalers"][1])
    if ls["world_size"] == run.world:
        _set_rng_state(run, ls["rng_states"][run.rank])
    elif run.rank == 0:
        print(f"note: checkpoint written by {ls['world_size']} process(es), resumed by {run.world}: random "
              "streams are reseeded, the data position is approximate")
    loader.load_state_dict(ls["data"])
    run.top_k, run.metrics = dict(ls["top_k"]), dict(ls["metrics"])
    run.nonfinite, run.nonfinite_total = ls["nonfinite"], ls["nonfinite_total"]
    return ckpt["epoch"], ckpt["global_step"], ckpt["hyper_parameters"]


def _flat(d, prefix=""):
    return {k2: v2 for k, v in d.items()
            for k2, v2 in (_flat(v, f"{prefix}{k}.").items() if isinstance(v, dict) else [(prefix + k, v)])}


def new_version_dir(log_dir):
    """logs/vae_training/version_N with N one more than the highest present (Lightning's TensorBoardLogger)."""
    base = os.path.join(log_dir, "vae_training")
    os.makedirs(base, exist_ok=True)
    versions = [int(d[8:]) for d in os.listdir(base) if d.startswith("version_") and d[8:].isdigit()]
    path = os.path.join(base, f"version_{max(versions) + 1 if versions else 0}")
    os.makedirs(path)
    return path


# ------------------------------------------------------------------------------------------------------ main
def train(cfg, resume_from_checkpoint=None):
    """Run training as configured; returns the run namespace. Start-up problems raise StartupError."""
    rank, world, device = init_distributed()
    t, lg = cfg.training, cfg.logging
    say = print if rank == 0 else (lambda *a, **k: None)
    if device.type == "cuda":
        # TF32 tensor cores for fp32 matmuls/convs: all of the model with precision 32; with mixed precision the
        # LPIPS network, which runs in fp32 (losses.LPIPS). fp32 decode on an H200: 2.8x faster (BENCHMARKS.md).
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    say("resolved config:\n" + yaml.safe_dump(asdict(cfg), sort_keys=False).rstrip())
    try:
        resume = resume_from_checkpoint
        if resume == "latest":
            resume = os.path.join(cfg.paths.checkpoint_dir, "last.ckpt")
            if not os.path.isfile(resume):
                raise FileNotFoundError(f"--resume_from_checkpoint latest: no {resume} (nothing to resume yet)")
        elif resume is not None and not os.path.isfile(resume):
            raise FileNotFoundError(f"--resume_from_checkpoint: no such file {resume}")
        run = build_run(cfg, device, rank, world)
        d = cfg.data
        train_ds, val_ds = build_datasets(d.dataset_name, d.train_data_dir, d.val_data_dir, d.image_column,
                                          d.resolution, d.center_crop, d.random_flip, d.num_val_holdout,
                                          d.max_bad_fraction, d.dataset_config_name, d.cache_dir)
        common = dict(num_workers=t.num_workers, seed=t.seed, rank=rank, world_size=world,
                      pin_memory=device.type == "cuda")
        train_loader = ResumableLoader(train_ds, t.batch_size, shuffle=True, drop_last=True, **common)
        val_loader = ResumableLoader(val_ds, t.batch_size, shuffle=False, drop_last=False, **common)
        epoch, step = 0, 0
        if resume is not None:
            epoch, step, old = load_checkpoint(run, resume, train_loader)
            changed = [k for k, v in _flat(asdict(cfg)).items() if _flat(old).get(k, v) != v]
            say(f"resumed from {resume} at epoch {epoch}, step {step}"
                + (f" (config changed: {', '.join(changed)})" if changed else ""))
    except (ValueError, RuntimeError, OSError, ImportError, KeyError, pickle.UnpicklingError) as e:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise StartupError(one_line(e)) from e

    steps_per_epoch = math.ceil(len(train_loader) / t.accumulate_grad_batches)
    total = min(t.max_steps or math.inf, t.num_epochs * steps_per_epoch)
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter  # imported late: tensorboard is slow to import
        version_dir = new_version_dir(cfg.paths.log_dir)
        with open(os.path.join(version_dir, "hparams.yaml"), "w") as f:  # as Lightning's TensorBoardLogger
            yaml.safe_dump(asdict(cfg), f, sort_keys=False)
        writer = SummaryWriter(version_dir)
        say(f"device {device} x {world}, {len(train_ds)} training / {len(val_ds)} validation images, "
            f"{steps_per_epoch} steps per epoch, {total} steps; TensorBoard: {version_dir}")

    def on_signal(signum, frame):  # finish the step, write last.ckpt, exit 0; a second Ctrl-C kills
        run.stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        say(f"\nsignal {signal.Signals(signum).name}: stopping after this step")

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, disable=rank != 0 or not lg.progress_bar)
    write = bar.write if not bar.disable else say
    window, window_steps, window_time, saved_at = torch.zeros(len(STEP_TAGS), device=device), 0, 0.0, None
    images_per_step = t.batch_size * t.accumulate_grad_batches * world
    try:
        while step < total and epoch < t.num_epochs and not run.stop:
            train_loader.set_epoch(epoch)  # keeps a restored mid-epoch position
            batches = iter(train_loader)
            while step < total and not run.stop:
                micro = list(itertools.islice(batches, t.accumulate_grad_batches))
                if not micro:
                    break
                t0 = time.perf_counter()
                stats, skipped, sample = train_step(run, micro, step)
                window_time += time.perf_counter() - t0  # train_step ends in a host sync: this is true time
                step += 1
                bar.update(1)
                if skipped:
                    run.nonfinite += 1
                    run.nonfinite_total += 1
                    write(f"step {step}: non-finite loss, step skipped ({run.nonfinite} in a row)")
                    if run.nonfinite >= t.max_consecutive_nonfinite:
                        raise NonFiniteLossError(
                            f"{run.nonfinite} consecutive steps had a non-finite loss (last at step {step}); lower "
                            "training.learning_rate, try precision bf16-mixed or 32, or check the data")
                else:
                    run.nonfinite = 0
                    window += stats
                    window_steps += 1
                if step % lg.log_every_n_steps == 0 and window_steps:
                    means = (all_reduce(window, world) / (window_steps * world)).tolist()
                    run.metrics.update(zip(STEP_TAGS, means))
                    run.metrics.update({"train/lr": run.sched_vae.get_last_lr()[0],
                                        "train/disc_lr": run.sched_disc.get_last_lr()[0],
                                        "train/images_per_sec": images_per_step * window_steps / window_time})
                    if writer:
                        for tag in STEP_TAGS + EXTRA_TAGS:
                            writer.add_scalar(tag, run.metrics[tag], step)
                    m = run.metrics
                    bar.set_postfix(loss=f"{m['train/loss']:.4g}", img_s=f"{m['train/images_per_sec']:.1f}")
                    write(f"step {step}/{total} epoch {train_loader.epoch} loss {m['train/loss']:.4g} "
                          f"rec {m['train/rec_loss']:.4g} p {m['train/p_loss']:.4g} kl {m['train/kl_loss']:.4g} "
                          f"g {m['train/g_loss']:.4g} d {m['train/d_loss']:.4g} lr {m['train/lr']:.3g} "
                          f"{m['train/images_per_sec']:.1f} img/s")
                    window.zero_()
                    window_steps, window_time = 0, 0.0
                if writer and step % lg.log_images_every_n_steps == 0:
                    writer.add_image("train/comparison", image_grid(list(zip(*sample))), step)
                if step % lg.val_check_interval == 0:
                    metrics, images = validate(run, val_loader, lg.num_val_images)
                    run.metrics.update(metrics)
                    if writer:
                        for tag, value in metrics.items():
                            writer.add_scalar(tag, value, step)
                        writer.add_image("val/reconstruction", image_grid(list(zip(*images))), step)
                    write(f"step {step} validation: " + " ".join(f"{k[4:]} {v:.4g}" for k, v in metrics.items()))
                if step % cfg.checkpoint.save_every_n_steps == 0:
                    save_checkpoint(run, train_loader.epoch, step, train_loader, top_k=True)
                    saved_at = step
                run.stop = run.stop_requested
                if world > 1:  # torchrun signals every rank, but not at the same moment: stop together
                    run.stop = bool(all_reduce(torch.tensor(float(run.stop), device=device), world,
                                               dist.ReduceOp.MAX).item())
            epoch = train_loader.epoch
        if saved_at != step:  # (the same decision on every rank: saving is collective)
            save_checkpoint(run, train_loader.epoch, step, train_loader, top_k=False)
        if rank == 0 and not run.stop:
            final = os.path.join(cfg.paths.output_dir, "final_model")
            (run.ema if run.ema is not None else run.vae).save_pretrained(final)
            write(f"done: {step} steps; final model (diffusers format{', EMA weights' if run.ema else ''}): {final}")
        elif run.stop:
            write(f"stopped at step {step}; resume with --resume_from_checkpoint latest")
        if world > 1:
            dist.barrier()  # nobody exits (and tears down the group) while rank 0 still writes
    finally:
        bar.close()
        if writer:
            writer.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
        if dist.is_initialized():
            dist.destroy_process_group()
    run.global_step, run.epoch = step, epoch
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train the SD 1.5 VAE.", epilog="launch examples: see train.py")
    parser.add_argument("--config", default="config.yaml", help="YAML config (default: config.yaml)")
    parser.add_argument("--resume_from_checkpoint", default=None, help="'latest' (= checkpoint_dir/last.ckpt) or a path")
    parser.add_argument("--precision", default=None, help="overrides training.precision: 16-mixed | bf16-mixed | 32")
    parser.add_argument("overrides", nargs="*", help="section.key=value (YAML values), e.g. training.max_steps=1000")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    import logging
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR, format="%(message)s")
    try:
        overrides = args.overrides + ([f"training.precision={args.precision}"] if args.precision else [])
        cfg = load_config(args.config, overrides)
        train(cfg, args.resume_from_checkpoint)
    except (ConfigError, StartupError) as e:
        if rank == 0:
            print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, DataError) as e:  # during training: bad data or a diverged run
        if rank == 0:
            print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
