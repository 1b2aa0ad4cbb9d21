"""Train or fine-tune the SD 1.5 VAE: one plain PyTorch loop for CPU, one GPU, and torchrun DDP.

    python train.py --config config.yaml                                  # CPU or one GPU
    python train.py --config config.yaml training.batch_size=2 training.decoder_only=true  # section.key=value
    python train.py --config config.yaml --resume_from_checkpoint latest  # checkpoints/last.ckpt (or a path)
    python train.py --config config.yaml --precision bf16-mixed           # auto | 16-mixed | bf16-mixed | 32
    torchrun --nproc_per_node=8 train.py --config config.yaml             # one node, 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        train.py --config config.yaml                                     # the same on every node
    python train.py --config configs/quickstart.yaml                      # small VAE from scratch, CPU
    python train.py --config configs/finetune.yaml model.pretrained_model_name_or_path=MODEL \
        data.train_data_dir=PHOTOS                                        # fine-tune a VAE on your images

`train` builds a run (`build_run`), repeats `train_step` (a generator step, then a discriminator step), calls
`validate` and checkpoints.py's `save_checkpoint`; DDP helpers and the command line come last. A run leaves
the files Lightning's ModelCheckpoint + TensorBoardLogger would (checkpoints.py lists them). SIGTERM/SIGINT:
the step finishes, last.ckpt is written, exit 0. Resuming is exact (same batches, augmentations, noise and
weights); under DDP it needs checkpoint_dir on a filesystem every node can read.
"""
import argparse
import contextlib
import copy
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

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from tqdm import tqdm

import checkpoints
import config
from config import EXTRA_TAGS, LOSS_TAGS, RFID_TAG, STEP_TAGS, VAL_TAGS
from data import DataError, ResumableLoader, UserError, build_datasets, hub_offline, image_grid, one_line
from losses import NLayerDiscriminator, VAELoss, psnr, ssim
from vae import DEFAULT_CONFIG, AutoencoderKL


class StartupError(UserError):
    """Anything wrong before the first step (config, model, data, checkpoint): one line, exit code 2."""


class NonFiniteLossError(UserError, RuntimeError):
    """Too many non-finite losses in a row."""


# ---------------------------------------------------------------------------------------------------- the run
def train(cfg, resume_from_checkpoint=None, overwrite=False, resume_data_changed="error"):
    """Run training as configured; returns the Run (`run.state`: step, epoch, metrics). Anything wrong before
    the first step (run folders in use or holding a run's files, data changed since) raises StartupError."""
    rank, world, device = init_distributed()
    training, logging_cfg = cfg.training, cfg.logging
    say = printer(rank)
    if device.type == "cuda":  # TF32 for fp32 matmuls/convs: the model at precision 32, LPIPS (BENCHMARKS.md)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    with startup_errors():  # train.lock in both run folders, released at the end
        lock = checkpoints.claim_run(cfg, resume_from_checkpoint, overwrite)
    with startup_errors(lock.release):  # the checkpoint is read and checked once
        resume, resume_ckpt = checkpoints.resume_checkpoint(cfg, resume_from_checkpoint)
        run = build_run(cfg, device, rank, world)
        common = loader_args(training, rank, world, device)
        if cfg.data.streaming or cfg.data.train_shards:  # with max_steps the whole run is one epoch
            from data_stream import StreamingLoader, stream_datasets
            stream, transform, val_ds = stream_datasets(cfg.data)
            per_epoch = training.max_steps * training.accumulate_grad_batches if training.max_steps else None
            train_loader = StreamingLoader(stream, transform, training.batch_size,
                                           shuffle_buffer=cfg.data.shuffle_buffer,
                                           max_bad_fraction=cfg.data.max_bad_fraction,
                                           batches_per_epoch=per_epoch, **common)
            train_size = f"streamed ({stream.label})"
        else:
            train_ds, val_ds = build_datasets(cfg.data)
            train_loader = ResumableLoader(train_ds, training.batch_size, shuffle=True, drop_last=True,
                                           **common)
            train_size = len(train_ds)
            run.state.data_fingerprint = checkpoints.data_fingerprint(train_ds, cfg.data.train_data_dir)
        val_loader = ResumableLoader(val_ds, training.batch_size, shuffle=False, drop_last=False, **common)
        if logging_cfg.val_rfid:  # fid.py; missing weights: one line
            from fid import FIDInception
            run.inception = FIDInception.pretrained(device)
        if resume is not None:
            saved = checkpoints.load_checkpoint(run, resume, train_loader, resume_data_changed, resume_ckpt)
            changed = [f"{section}.{k}" for section, keys in asdict(cfg).items() for k, v in keys.items()
                       if saved.get(section, {}).get(k, v) != v]
            say(f"resumed from {resume} at epoch {run.state.epoch}, step {run.state.step}"
                + (f" (config changed: {', '.join(changed)})" if changed else ""))

    state, window, saved_at, stop, stop_requested = run.state, LogWindow(), None, False, False
    try:
        steps_per_epoch = math.ceil(len(train_loader) / training.accumulate_grad_batches)
    except TypeError:  # a stream read in passes of unknown length (no max_steps): the total is unknown too
        steps_per_epoch = None
    total = min(training.max_steps or math.inf, training.num_epochs * (steps_per_epoch or math.inf))
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter  # imported late: tensorboard is slow to import
        version_dir = checkpoints.log_version_dir(cfg.paths.log_dir, state.log_version)
        continued = os.path.basename(version_dir) == state.log_version
        state.log_version = os.path.basename(version_dir)
        with open(os.path.join(version_dir, "hparams.yaml"), "w") as f:  # as Lightning's TensorBoardLogger
            yaml.safe_dump(asdict(cfg), f, sort_keys=False)
        # purge_step: TensorBoard hides what the interrupted run logged after the step resumed from
        writer = SummaryWriter(version_dir, purge_step=state.step + 1 if continued else None)
        plan = (f"{steps_per_epoch} steps per epoch, {total} steps" if steps_per_epoch
                else f"{training.num_epochs} passes")
        auto = " (auto)" * (training.precision == "auto")
        say(f"device {device} x {world}, precision {run.precision}{auto}, "
            f"{common['num_workers']} data workers; {train_size} training / {len(val_ds)} validation images, "
            f"{plan}; config (hparams.yaml), TensorBoard: {version_dir}")

    def log(metrics, image_tag=None, pairs=()):  # into run.state.metrics, and TensorBoard on rank 0
        state.metrics.update(metrics)
        for tag, value in metrics.items() if writer else ():
            writer.add_scalar(tag, value, state.step)
        if writer and image_tag and pairs:
            writer.add_image(image_tag, image_grid(list(zip(*pairs))), state.step)

    def on_signal(signum, frame):  # finish the step, write last.ckpt, exit 0; a second Ctrl-C kills
        nonlocal stop_requested
        stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        say(f"\nsignal {signal.Signals(signum).name}: stopping after this step")

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    bar = tqdm(total=total, initial=state.step, unit="step", dynamic_ncols=True,
               disable=rank != 0 or not logging_cfg.progress_bar)
    show_warning, warn = warnings.showwarning, printer(rank, sys.stderr)  # warnings: off the bar's line too
    warnings.showwarning = lambda message, category, *where, **kwargs: warn(f"{category.__name__}: {message}")
    try:
        while state.step < total and state.epoch < training.num_epochs and not stop:
            train_loader.set_epoch(state.epoch)  # keeps a restored mid-epoch position
            batches = iter(train_loader)
            while state.step < total and not stop:
                micro = list(itertools.islice(batches, training.accumulate_grad_batches))
                if not micro:
                    break
                t0 = time.perf_counter()
                logs, skipped, sample = train_step(run, micro, state.step)
                window.seconds += time.perf_counter() - t0  # train_step ends in a host sync: true time
                state.step += 1
                bar.update(1)
                if skipped:
                    say(f"step {state.step}: non-finite loss, step skipped ({state.nonfinite + 1} in a row)")
                else:
                    window.add(logs)
                state.count_nonfinite(skipped, training.max_consecutive_nonfinite)
                if state.step % logging_cfg.log_every_n_steps == 0 and window.steps:
                    log(window.flush(run))
                    bar.set_postfix(loss=f"{state.metrics['train/loss']:.4g}")
                    shown = log_line(state.metrics, STEP_TAGS + EXTRA_TAGS)
                    say(f"step {state.step}/{total} epoch {train_loader.epoch} {shown}")
                if state.step % logging_cfg.log_images_every_n_steps == 0:
                    log({}, "train/comparison", sample)
                if state.step % logging_cfg.val_check_interval == 0:
                    metrics, images = validate(run, val_loader, logging_cfg.num_val_images)
                    log(metrics, "val/reconstruction", images)
                    say(f"step {state.step} validation: " + log_line(metrics, VAL_TAGS + (RFID_TAG,)))
                if state.step % cfg.checkpoint.save_every_n_steps == 0:
                    checkpoints.save_checkpoint(run, train_loader, top_k=True)
                    saved_at = state.step
                stop = stop_requested
                if world > 1:  # torchrun signals every rank, but not at the same moment: stop together
                    flag = torch.tensor(float(stop), device=device)
                    stop = bool(all_reduce(flag, world, dist.ReduceOp.MAX))
            state.epoch = train_loader.epoch
        export = run.weights
        if cfg.model.estimate_scaling_factor and not stop:  # LDM's scale_by_std, of the weights exported
            from fid import dataset_latent_statistics
            stats = dataset_latent_statistics(export.eval(), getattr(train_loader, "dataset", val_ds),
                                              batch_size=training.batch_size, seed=training.seed,
                                              num_workers=training.num_workers)
            export.config.update(stats.config_updates())
            say(f"estimate_scaling_factor: {stats.summary().splitlines()[1]}; written at export")
            saved_at = None  # hf_checkpoint/ gets it too
        if saved_at != state.step:  # (the same decision on every rank: saving is collective)
            checkpoints.save_checkpoint(run, train_loader, top_k=False)
        if rank == 0 and not stop:
            final = os.path.join(cfg.paths.output_dir, checkpoints.FINAL_MODEL)
            checkpoints.export_model(export, final)
            weights = ", EMA weights" * (run.ema is not None)
            say(f"done: {state.step} steps; final model (diffusers format{weights}): {final}")
        elif stop:
            say(f"stopped at step {state.step}; resume with --resume_from_checkpoint latest")
        if world > 1:
            dist.barrier()  # nobody exits (and tears down the group) while rank 0 still writes
    finally:
        bar.close()
        warnings.showwarning = show_warning
        if writer:
            writer.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if dist.is_initialized():
            dist.destroy_process_group()
        lock.release()
    return run


def log_line(metrics, tags):
    """`tag value` of the `tags` logged, in the tables' order (README, "Logged values": their units)."""
    return " ".join(f"{tag} {metrics[tag]:.4g}" for tag in tags if tag in metrics)


# ------------------------------------------------------------------------------------------------------ build
@dataclass
class LoopState:
    """Where the loop is and what it has seen: checkpoints save it ("loop_state"), resuming restores it."""
    step: int = 0  # optimizer steps of the VAE (the checkpoint's global_step)
    epoch: int = 0
    metrics: dict = field(default_factory=dict)  # the latest value of every logged tag
    top_k: dict = field(default_factory=dict)  # checkpoint file name -> score, lower is better
    nonfinite: int = 0  # steps skipped in a row for a non-finite loss
    nonfinite_total: int = 0
    log_version: str | None = None  # the TensorBoard folder (version_N) a resumed run continues
    data_fingerprint: dict = field(default_factory=dict)  # checkpoints.data_fingerprint of the training set

    def count_nonfinite(self, skipped, limit):
        self.nonfinite = self.nonfinite + 1 if skipped else 0
        self.nonfinite_total += skipped
        if self.nonfinite >= limit:
            raise NonFiniteLossError(f"{self.nonfinite} consecutive steps had a non-finite loss (last at "
                                     f"step {self.step}); lower training.learning_rate, try precision "
                                     "bf16-mixed or 32, or check the data")


@dataclass
class Run:
    """Everything a step needs (build_run makes it). train_vae/train_disc: the DDP wrappers under torchrun,
    else the models. Scalers: fp16's, one per optimizer over the fp32 weights (else pass-throughs). noise: the
    posterior samples' own generator, which the data loader's use of the global RNG cannot shift."""
    cfg: config.Config
    device: torch.device
    vae: AutoencoderKL
    disc: NLayerDiscriminator
    loss_fn: VAELoss
    ema: AutoencoderKL | None  # None without training.ema_decay
    train_vae: nn.Module
    train_disc: nn.Module
    opt_vae: torch.optim.Optimizer
    opt_disc: torch.optim.Optimizer
    sched_vae: torch.optim.lr_scheduler.LRScheduler
    sched_disc: torch.optim.lr_scheduler.LRScheduler
    noise: torch.Generator
    scaler_vae: torch.amp.GradScaler | None = None  # set_precision makes both
    scaler_disc: torch.amp.GradScaler | None = None
    autocast_dtype: torch.dtype | None = None  # None: autocast() leaves a caller's autocast (or none) alone
    precision: str = "32"  # training.precision resolved for this device (resolve_precision)
    inception: nn.Module | None = None  # logging.val_rfid's FID network (fid.py), built once
    rank: int = 0
    world: int = 1
    state: LoopState = field(default_factory=LoopState)

    def set_precision(self, device):  # training.precision on `device`: autocast dtype, fp16 scalers
        self.precision = resolve_precision(self.cfg.training.precision, device)
        self.autocast_dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(self.precision)
        self.scaler_vae = torch.amp.GradScaler(device.type, enabled=self.precision == "16-mixed")
        self.scaler_disc = torch.amp.GradScaler(device.type, enabled=self.precision == "16-mixed")

    def autocast(self):
        return contextlib.nullcontext() if self.autocast_dtype is None else torch.autocast(
            self.device.type, dtype=self.autocast_dtype)

    def disc_on(self, step):  # the discriminator and the adversarial term take part in `step`
        return self.cfg.loss.disc_weight > 0 and step >= self.cfg.loss.disc_start_step

    @property
    def vae_params(self):
        return [p for group in self.opt_vae.param_groups for p in group["params"]]

    @property
    def weights(self):  # what is validated and exported: the EMA weights when EMA is on
        return self.ema if self.ema is not None else self.vae


def build_run(cfg, device, rank=0, world=1):
    """Models, loss, optimizers, schedulers, scalers, EMA and DDP wrappers, seeded from training.seed."""
    training, loss_cfg, model_cfg = cfg.training, cfg.loss, cfg.model
    torch.manual_seed(training.seed)  # the same initialisation on every rank (DDP broadcasts rank 0's anyway)
    name = model_cfg.pretrained_model_name_or_path
    offline = bool(name) and not os.path.exists(name) and hub_offline()  # one check, not the hub's retries
    try:
        vae = (AutoencoderKL.from_pretrained(name, subfolder=model_cfg.subfolder)
               if name else AutoencoderKL(**{k: getattr(model_cfg, k) for k in DEFAULT_CONFIG}))
    except OSError as e:
        if not offline:
            raise
        raise OSError(f"{e}; offline: to train offline set model.pretrained_model_name_or_path to a local "
                      "diffusers folder or LDM .ckpt/.safetensors file (null: from scratch) and "
                      "data.train_data_dir to a folder of images; with the files in the cache, "
                      "HF_HUB_OFFLINE=1 skips the connection check") from e
    if name:  # its downsampling factor is known now (config.py checks the others)
        config.check_resolution(cfg.data.resolution, vae.config["block_out_channels"], name)
    vae = vae.to(device).train()
    if model_cfg.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    if training.decoder_only:  # sd-vae-ft-mse: the decoder alone is trained; the latent space stays
        for module in (vae.encoder, vae.quant_conv):
            if module is not None:
                module.requires_grad_(False)
    disc_keys = ("disc_num_layers", "disc_ndf")  # the discriminator's, not the loss's
    loss_fn = VAELoss(**{k: v for k, v in asdict(loss_cfg).items() if k not in disc_keys}).to(device)
    disc = NLayerDiscriminator(3, loss_cfg.disc_ndf, loss_cfg.disc_num_layers).to(device)  # weights_init'ed
    if world > 1 and device.type == "cuda":  # (gloo has no SyncBatchNorm; DDP broadcasts rank 0's statistics)
        disc = nn.SyncBatchNorm.convert_sync_batchnorm(disc)
    vae_params = [p for p in vae.parameters() if p.requires_grad] + [loss_fn.logvar] * loss_cfg.learn_logvar
    # Fused AdamW, one kernel over all parameters: faster than the for-loop on GPU and CPU, where foreach is
    # slower than the for-loop (BENCHMARKS.md). (CPU needs torch >= 2.4, required.)
    adamw = dict(betas=tuple(training.adam_betas), weight_decay=training.weight_decay, fused=True)
    opt_vae = torch.optim.AdamW(vae_params, training.learning_rate, **adamw)
    opt_disc = torch.optim.AdamW(disc.parameters(), training.disc_learning_rate, **adamw)

    def lr_factor(step):  # linear warm-up, then constant, or cosine to 0 at max_steps (transformers'
        # get_cosine_schedule_with_warmup); the discriminator counts from its own first step
        warmup, max_steps = training.warmup_steps, training.max_steps or 1
        warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        done = min(1.0, max(0, step - warmup) / max(1, max_steps - warmup))
        return warm * (1.0 if training.lr_schedule == "constant" else 0.5 * (1 + math.cos(math.pi * done)))

    train_vae, train_disc = vae, disc
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        train_vae = nn.parallel.DistributedDataParallel(vae, device_ids=ids, gradient_as_bucket_view=True)
        train_disc = nn.parallel.DistributedDataParallel(disc, device_ids=ids, gradient_as_bucket_view=True)
    if training.compile:
        # Compile the blocks in place (module.compile(): state-dict keys unchanged), not the whole model: the
        # adaptive GAN weight takes gradients w.r.t. decoder.conv_out.weight twice per step, and with conv_out
        # inside one compiled graph each of those would run that graph's whole backward (3 backwards a step).
        dec = vae.decoder
        for module in (vae.encoder, vae.quant_conv, vae.post_quant_conv, dec.conv_in, dec.mid_block,
                       *dec.up_blocks):
            if module is not None:
                module.compile()
    run = Run(cfg=cfg, device=device, vae=vae, disc=disc, loss_fn=loss_fn,
              # The EMA copy is made after DDP's constructor broadcast rank 0's weights: the same everywhere.
              ema=copy.deepcopy(vae).requires_grad_(False).eval() if training.ema_decay else None,
              train_vae=train_vae, train_disc=train_disc, opt_vae=opt_vae, opt_disc=opt_disc,
              sched_vae=torch.optim.lr_scheduler.LambdaLR(opt_vae, lr_factor),
              sched_disc=torch.optim.lr_scheduler.LambdaLR(opt_disc, lr_factor),
              noise=torch.Generator(device).manual_seed(training.seed + rank), rank=rank, world=world)
    run.set_precision(device)
    random.seed(training.seed + rank)
    np.random.seed((training.seed + rank) % 2**32)
    torch.manual_seed(training.seed + rank)
    return run


def resolve_precision(precision, device):
    """training.precision for `device`: "auto" -> bf16-mixed on GPUs that have bf16, else 16-mixed; on CPU
    bf16-mixed where bf16 is native (AVX512-BF16 or AMX, which oneDNN's bf16 kernels use), else 32 (emulated
    bf16 and fp16 autocast are slower than fp32 there: BENCHMARKS.md). 16-mixed on CPU warns."""
    if precision == "auto" and device.type == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if precision == "auto":
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return "bf16-mixed" if device.type == "cpu" and native else "32"
    if precision == "16-mixed" and device.type == "cpu":
        warnings.warn("precision 16-mixed on CPU: fp16 autocast there runs ~30x slower than fp32 (no native "
                      "fp16 kernels); use precision auto, bf16-mixed or 32", stacklevel=2)
    return precision


def loader_args(training, rank, world, device):
    """The loaders' common keywords (training: config.training). Workers: at most the CPUs this process may
    use (a container or taskset may allow fewer than cpu_count)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return dict(num_workers=min(training.num_workers, cpus), seed=training.seed, rank=rank, world_size=world,
                pin_memory=device.type == "cuda")


# ----------------------------------------------------------------------------------------------------- a step
def train_step(run, micro_batches, step):
    """One optimizer step of the VAE and (from disc_start_step) of the discriminator over `micro_batches`.
    Returns (logs {STEP_TAGS tag: 0-d tensor}, skipped, (inputs, reconstructions) of the last micro-batch's
    first 4 images). Its one host sync is the decision to skip a non-finite step."""
    n, disc_on, fp16 = len(micro_batches), run.disc_on(step), run.scaler_vae.is_enabled()
    grad_scale = run.scaler_vae.get_scale() if fp16 and disc_on else 1.0  # for the adaptive GAN weight
    run.opt_vae.zero_grad(set_to_none=True)
    run.opt_disc.zero_grad(set_to_none=True)
    logs = {tag: torch.zeros((), device=run.device) for tag in STEP_TAGS}
    for i, batch in enumerate(micro_batches):
        x = batch["pixel_values"].to(run.device, non_blocking=True)
        with contextlib.ExitStack() as stack:
            if run.world > 1 and i < n - 1:  # DDP: all-reduce gradients on the last micro-batch only
                stack.enter_context(run.train_vae.no_sync())
                stack.enter_context(run.train_disc.no_sync())
            # Generator step. The loss freezes D while it judges the reconstructions: no D gradient here.
            with run.autocast():
                g_loss, g_logs, rec = generator_loss(run, x, step, grad_scale)
            run.scaler_vae.scale(g_loss / n).backward()  # accumulation: the mean over the micro-batches
            # Discriminator step on the same forward's reconstructions, detached: no VAE gradient leaks here.
            d_loss = torch.zeros((), device=run.device)
            if disc_on:
                with run.autocast():
                    d_loss = discriminator_loss(run, x, rec, step)
                run.scaler_disc.scale(d_loss / n).backward()
        for tag, value in {**g_logs, "train/d_loss": d_loss.detach()}.items():
            logs[tag] += value.float() / n
    sample = (x[:4].detach(), rec[:4].detach().float())

    if run.world > 1 and run.cfg.loss.learn_logvar:  # logvar lives outside the DDP module: average it by hand
        all_reduce(run.loss_fn.logvar.grad, run.world).div_(run.world)
    clip = run.cfg.training.gradient_clip_val or math.inf
    run.scaler_vae.unscale_(run.opt_vae)  # clip the true gradients, not the fp16-scaled ones
    logs["train/grad_norm"] = torch.nn.utils.clip_grad_norm_(run.vae_params, clip)
    if disc_on:
        run.scaler_disc.unscale_(run.opt_disc)
        logs["train/disc_grad_norm"] = torch.nn.utils.clip_grad_norm_(run.disc.parameters(), clip)
    # A non-finite loss (or, without fp16's GradScaler, which skips overflowing steps itself, a non-finite
    # gradient) skips the step on every rank; the caller counts it.
    losses_ok = torch.isfinite(torch.stack([logs[tag] for tag in LOSS_TAGS])).all()
    norms_ok = torch.isfinite(torch.stack([logs["train/grad_norm"], logs["train/disc_grad_norm"]])).all()
    if all_reduce((~losses_ok | (~norms_ok & (not fp16))).float(), run.world, dist.ReduceOp.MAX).item():
        run.opt_vae.zero_grad(set_to_none=True)
        run.opt_disc.zero_grad(set_to_none=True)
        run.scaler_vae.update()  # (fp16) close this step's unscale_; backs off on NaN gradients
        if disc_on:
            run.scaler_disc.update()
        scheduler_step(run.sched_vae)  # the VAE's schedule stays a function of the step count
        return logs, True, sample
    run.scaler_vae.step(run.opt_vae)  # fp16: skipped by the scaler if a gradient overflowed (scale backs off)
    run.scaler_vae.update()
    if disc_on:
        run.scaler_disc.step(run.opt_disc)
        run.scaler_disc.update()
        scheduler_step(run.sched_disc)  # the discriminator's warmup starts with its first step
    scheduler_step(run.sched_vae)
    if run.ema is not None:
        ema_update(run.ema, run.vae, run.cfg.training.ema_decay, step)
    return logs, False, sample


def generator_loss(run, x, step, grad_scale=1.0):
    """One micro-batch through the VAE (posterior sampled with run.noise) and LDM's generator loss, judged by
    the discriminator from disc_start_step: (loss, {tag: detached part}, reconstruction). grad_scale: fp16's
    scale."""
    out = run.train_vae(x, sample_posterior=True, generator=run.noise)
    loss, parts = run.loss_fn.generator_loss(
        x, out.sample, out.latent_dist, step, discriminator=run.disc if run.disc_on(step) else None,
        last_layer=run.vae.decoder.conv_out.weight, grad_scale=grad_scale)
    logs = {tag: parts[tag.partition("/")[2]] for tag in LOSS_TAGS if tag != "train/d_loss"}  # parts by name
    logs["train/psnr"] = psnr(x, out.sample.detach().float()).mean()
    return loss, logs, out.sample


def discriminator_loss(run, x, reconstruction, step):
    """The discriminator's loss on one micro-batch: the real `x` against the detached `reconstruction`."""
    return run.loss_fn.discriminator_loss(run.train_disc, x, reconstruction.detach(), step)[0]


@torch.no_grad()
def ema_update(ema, model, decay, step):
    """ema += (1 - d)(model - ema) with diffusers' EMAModel warm-up d = min(decay, (1 + step) / (10 + step)),
    so the first weights do not dominate; `step`: the optimizer step just taken, counted from 0."""
    d = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - d)


def scheduler_step(scheduler):  # skipped steps step the schedule too: torch's warning about that is expected
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        scheduler.step()


def last_step_lr(scheduler):  # the rate the latest step ran at (get_last_lr(): the next's); 0 before one
    n = scheduler.last_epoch  # scheduler steps taken = optimizer steps taken
    return scheduler.base_lrs[0] * scheduler.lr_lambdas[0](n - 1) if n > 0 else 0.0


@dataclass
class LogWindow:
    """train/* scalars summed on the device over the steps since the last log (no host sync per step)."""
    sums: dict = field(default_factory=dict)
    steps: int = 0
    seconds: float = 0.0

    def add(self, logs):
        # fp16 overflow steps (skipped by the GradScaler) have an inf/NaN grad norm: not a norm worth logging
        logs = {tag: torch.nan_to_num(v, nan=0.0, posinf=0.0) if tag.endswith("grad_norm") else v
                for tag, v in logs.items()}
        self.sums = {tag: self.sums[tag] + value if tag in self.sums else value.clone()
                     for tag, value in logs.items()}
        self.steps += 1

    def flush(self, run):
        """Means over the window's steps and all ranks, learning rates and throughput; starts a new window."""
        training = run.cfg.training
        means = all_reduce(torch.stack(list(self.sums.values())), run.world) / (self.steps * run.world)
        images = training.batch_size * training.accumulate_grad_batches * run.world * self.steps
        metrics = {**dict(zip(self.sums, means.tolist())), "train/lr": last_step_lr(run.sched_vae),
                   "train/disc_lr": last_step_lr(run.sched_disc),
                   "train/images_per_sec": images / self.seconds}
        self.sums, self.steps, self.seconds = {}, 0, 0.0
        return metrics


# ------------------------------------------------------------------------------------------------- validation
@torch.no_grad()
def validate(run, loader, num_images):
    """val/* metrics over the whole validation set (all ranks), and the first images with their
    reconstructions. The EMA weights when EMA is on; the posterior mode, as at inference."""
    model = run.weights
    was_training = model.training
    model.eval()
    sums, shown, fid = {}, [], []
    if run.inception is not None:  # logging.val_rfid
        from fid import FeatureStats
        fid = [FeatureStats(run.inception) for _ in range(2)]  # real, reconstructed
    for batch in loader:
        x = batch["pixel_values"].to(run.device)
        with run.autocast():
            out = model(x)
        rec, mu, var = out.sample.float(), out.latent_dist.mean.float(), out.latent_dist.var.float()
        err = (x - rec).abs() if run.cfg.loss.rec_loss_type == "l1" else (x - rec).pow(2)
        per_image = {"val/rec_loss": err.flatten(1).mean(1), "val/psnr": psnr(x, rec),
                     "val/ssim": ssim(x, rec), "count": x.new_ones(len(x)),
                     # the latents' moments as fid.latent_statistics takes them (E z = mu, E z^2 = mu^2 + var;
                     # val/latent_std sums E z^2 until the end)
                     "val/latent_mean": mu.flatten(1).mean(1),
                     "val/latent_std": (mu * mu + var).flatten(1).mean(1)}
        if run.loss_fn.lpips is not None:  # with the perceptual loss on
            per_image["val/lpips"] = run.loss_fn.lpips(x, rec.clamp(-1, 1)).flatten()
        sums = {tag: sums.get(tag, 0) + v.sum() for tag, v in per_image.items()}
        for stats, images in zip(fid, (x, rec)):
            stats.add(images)
        if sum(len(a) for a, _ in shown) < num_images:
            shown.append((x, rec))
    model.train(was_training)
    totals = dict(zip(sums, all_reduce(torch.stack(list(sums.values())), run.world)))  # (same keys on all)
    metrics = {tag: (totals[tag] / totals["count"]).item() for tag in VAL_TAGS if tag in totals}
    second, mean = metrics["val/latent_std"], metrics["val/latent_mean"]  # E z^2 so far, E z
    metrics["val/latent_std"] = math.sqrt(max(second - mean * mean, 0.0))
    if fid and fid[0].all_reduce().n >= 2:  # (collective: the same decision on every rank)
        metrics[RFID_TAG] = fid[1].all_reduce().frechet_distance(fid[0])
    return metrics, tuple(torch.cat(p)[:num_images] for p in zip(*shown))


# --------------------------------------------------------------------------------------------------- plumbing
@contextlib.contextmanager
def startup_errors(cleanup=None):
    """An exception while setting up (config, model, data, checkpoint) -> StartupError with a one-line
    message, after cleanup() (e.g. releasing the run's lock)."""
    try:
        yield
    except (ValueError, RuntimeError, OSError, ImportError, KeyError, pickle.UnpicklingError) as e:
        if cleanup is not None:
            cleanup()
        if dist.is_initialized():
            dist.destroy_process_group()
        raise StartupError(one_line(e)) from e


def printer(rank, file=None):  # the one printer: rank 0's lines, through tqdm.write (off the bar's line)
    return (lambda text: tqdm.write(text, file=file)) if rank == 0 else (lambda text: None)


def init_distributed():
    """(rank, world_size, device) from torchrun's environment; single process without it."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def all_reduce(t, world, op=None):
    if world > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


# ----------------------------------------------------------------------------------------------- command line
def main(argv=None, fit=train, prog="train.py"):
    """The command line; lightning_module.py's too, with its own `fit`. Exit code 2 for a problem before
    training, 1 for bad data, a diverged run or a failed save, each with a one-line message."""
    parser = argparse.ArgumentParser(prog=prog, description="Train the SD 1.5 VAE.",
                                     epilog=f"launch examples: see {prog}")
    parser.add_argument("--config", default="config.yaml", help="YAML config (default: config.yaml)")
    parser.add_argument("--resume_from_checkpoint", help="'latest' (= checkpoint_dir/last.ckpt) or a path")
    parser.add_argument("--precision", help="overrides training.precision: auto|16-mixed|bf16-mixed|32")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run over the previous run's checkpoints and model (deleting them)")
    parser.add_argument("--resume_data_changed", choices=["error", "restart_epoch"], default="error",
                        help="resuming after the training data changed: stop (default), or restart its epoch")
    parser.add_argument("overrides", nargs="*",
                        help="section.key=value (YAML values), e.g. training.max_steps=1000")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    import logging
    handler = logging.StreamHandler()  # checkpoints.py's warnings: through tqdm.write, off the bar's line
    handler.emit = lambda record: tqdm.write(handler.format(record), file=sys.stderr)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR, format="%(message)s",
                        handlers=[handler])
    try:
        overrides = args.overrides + ([f"training.precision={args.precision}"] if args.precision else [])
        fit(config.load_config(args.config, overrides), args.resume_from_checkpoint, overwrite=args.overwrite,
            resume_data_changed=args.resume_data_changed)
    except (config.ConfigError, StartupError, NonFiniteLossError, DataError, checkpoints.SaveError) as e:
        if rank == 0:
            print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, (config.ConfigError, StartupError)) else 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
