"""Optional Lightning adapter: train.py's model, losses, data and checkpoints under a Lightning Trainer.

    python lightning_module.py --config config.yaml [--precision bf16-mixed] [section.key=value ...]
    python lightning_module.py --config config.yaml --resume_from_checkpoint latest      # or a path
    vae = VAELightningModule.load_from_checkpoint("checkpoints/last.ckpt").vae           # train.py's files too

train.py builds everything (config, models, loss, optimizers, schedulers, EMA) and losses.py computes the losses;
this file maps them onto Lightning's hooks, and nothing else imports it. With precision 32 a Trainer run equals a
train.py run bit for bit (tests/test_lightning.py). Checkpoints interchange: the same state_dict prefixes (vae.,
discriminator., loss. with the frozen LPIPS weights), optimizer/scheduler order, hyper_parameters (the config),
global_step (generator steps) and "ema_state_dict". Lightning's own ways: mixed precision rounds differently (its
autocast has no weight cache; one fp16 GradScaler for both optimizers); resuming restores Lightning's loop state, not
train.py's RNG streams; ModelCheckpoint saves before the same step's validation and, while the monitored metric is not
logged yet, waits for the next validation; with accumulate_grad_batches > 1 the discriminator's BatchNorm running
statistics see the batches in another order, and validation runs every val_check_interval x accumulate_grad_batches
batches; training.compile is not applied. Several GPUs: DDP (find_unused_parameters: each backward reaches one model)
with SyncBatchNorm, untested here.
"""
import argparse
import contextlib
import math
import os
import sys
import time
import warnings
from dataclasses import asdict
from types import SimpleNamespace

import lightning as L
import torch

from data import DataError, ResumableLoader, build_datasets, image_grid, one_line
from train import (EXTRA_TAGS, STEP_TAGS, VAL_TAGS, ConfigError, NonFiniteLossError, StartupError, build_run,
                   config_from_dict, load_config, validate)


class VAELightningModule(L.LightningModule):
    """train.py's training step under manual optimisation. `config`: config.yaml's layout as a plain dict, or its
    sections as keyword arguments (how Lightning re-creates the module from a train.py checkpoint)."""

    def __init__(self, config=None, **sections):
        super().__init__()
        self.cfg = config_from_dict({**(config or {}), **sections})
        self.save_hyperparameters(asdict(self.cfg))  # == train.py's "hyper_parameters"
        self.automatic_optimization = False
        run = build_run(self.cfg, torch.device("cpu"))  # seeded: train.py's initial weights
        self.vae, self.discriminator, self.loss = run.vae, run.disc, run.loss_fn  # the checkpoint key prefixes
        # train.py's optimizers (AdamW foreach: Lightning unscales fp16 gradients before on_before_optimizer_step
        # only for optimizers that do not unscale themselves, as fused ones do) and schedulers.
        self.opts, self.scheds, self.noise = (run.opt_vae, run.opt_disc), (run.sched_vae, run.sched_disc), None
        # The EMA copy stays out of the state_dict, as in train.py ("ema_state_dict"): not registered as a submodule.
        object.__setattr__(self, "ema", run.ema)
        self.nonfinite, self.micro, self.bad = 0, [], False
        self.window, self.window_steps, self.window_time = torch.zeros(len(STEP_TAGS)), 0, 0.0

    def configure_optimizers(self):
        return list(self.opts), list(self.scheds)  # [vae, discriminator], as in train.py's checkpoints

    def on_fit_start(self):
        # Posterior noise from its own generator, seeded as train.py's (data augmentation is seeded by data.py).
        self.noise = torch.Generator(self.device).manual_seed(self.cfg.training.seed + self.global_rank)
        self.window = self.window.to(self.device)

    def on_train_epoch_start(self):
        # Lightning stops after len(loader) batches without exhausting the iterator, so a ResumableLoader does not
        # move on to the next epoch by itself: follow Lightning's epoch (a restored mid-epoch position is kept).
        if hasattr(self.trainer.train_dataloader, "set_epoch"):
            self.trainer.train_dataloader.set_epoch(self.current_epoch)
        if self.ema is not None:
            self.ema.to(self.device)

    # ------------------------------------------------------------------------------------------------ training
    def training_step(self, batch, batch_idx):
        """One micro-batch; the last of a group of accumulate_grad_batches ends one train.train_step: a generator
        step and, from loss.disc_start_step, a discriminator step."""
        t, lc = self.cfg.training, self.cfg.loss
        opt_vae, opt_disc = self.optimizers()
        # Lightning's global_step counts LightningOptimizer.step() calls. The discriminator steps through the
        # strategy below, uncounted, so global_step is the number of generator steps, train.py's `step`: in the GAN
        # schedule, checkpoint names, every_n_train_steps, max_steps and TensorBoard.
        step = self.global_step
        start = batch_idx - batch_idx % t.accumulate_grad_batches
        n = min(t.accumulate_grad_batches, self.trainer.num_training_batches - start)  # a short last group
        if batch_idx == start:
            self.micro, self.t0, self.stats = [], time.perf_counter(), torch.zeros(len(STEP_TAGS), device=self.device)
            opt_vae.zero_grad(set_to_none=True)
        disc_on = lc.disc_weight > 0 and step >= lc.disc_start_step
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)  # fp16 only; one for both optimizers
        x = batch["pixel_values"]
        out = self.vae(x, sample_posterior=True, generator=self.noise)  # autocast: Trainer(precision)'s
        g_total, g_logs = self.loss.generator_loss(
            x, out.sample, out.latent_dist, step, discriminator=self.discriminator if disc_on else None,
            last_layer=self.vae.decoder.conv_out.weight, grad_scale=scaler.get_scale() if scaler and disc_on else 1.0)
        self.manual_backward(g_total / n)
        self.micro.append((x, out.sample.detach()))
        self.stats[:5] += torch.stack([g_total.detach(), g_logs["rec_loss"], g_logs["p_loss"], g_logs["kl_loss"],
                                       g_logs["g_loss"]]).float() / n
        if len(self.micro) < n:
            return
        # The generator steps before the discriminator's backward: the one fp16 GradScaler may change its scale in
        # each step, so D's gradients are scaled after G's update. D's weights and the detached reconstructions are
        # the same either way: the gradients are train.py's.
        self.bad = self._anywhere(~torch.isfinite(self.stats[:5]).all())
        opt_vae.step()  # clipping and the non-finite skip: on_before_optimizer_step
        if disc_on and not self.bad:
            opt_disc.zero_grad(set_to_none=True)
            for xi, rec in self.micro:
                d_total, _ = self.loss.discriminator_loss(self.discriminator, xi, rec, step)
                self.manual_backward(d_total / n)
                self.stats[5] += d_total.detach().float() / n
            self.bad = self._anywhere(~torch.isfinite(self.stats[5]))
            self.trainer.strategy.optimizer_step(opt_disc.optimizer, closure=lambda: None, model=self)
            if not self.bad:
                self.scheds[1].step()  # the discriminator's warmup starts with its first step
        self.scheds[0].step()
        self.stats[6:] = torch.nan_to_num(self.stats[6:], nan=0.0, posinf=0.0)
        self._after_step(step + 1, (x[:4].detach(), out.sample[:4].detach().float()))

    def _anywhere(self, flag):  # one decision on every rank, as train.py's (DDP: the steps must stay in lockstep)
        return bool(self.trainer.strategy.reduce(flag.float().reshape(1), reduce_op="sum") > 0)

    def on_before_optimizer_step(self, optimizer):
        """After Lightning's fp16 unscaling: clip the true gradients (train.py's clip), record the norm, and drop
        the gradients (no update) after a non-finite loss, or a non-finite norm without fp16's GradScaler."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.training.gradient_clip_val or math.inf)
        self.stats[6 if optimizer is self.opts[0] else 7] = norm
        fp16 = getattr(self.trainer.precision_plugin, "scaler", None) is not None
        if self.bad or (not fp16 and not bool(torch.isfinite(norm))):  # (norms of all-reduced gradients agree)
            self.bad = True
            for p in params:
                p.grad = None

    def _after_step(self, step, sample):
        """The tail of train.train_step and of train.train's step loop: EMA, non-finite count, train/* logs."""
        t, lg = self.cfg.training, self.cfg.logging
        if self.bad:
            self.nonfinite += 1
            if self.nonfinite >= t.max_consecutive_nonfinite:
                raise NonFiniteLossError(f"{self.nonfinite} consecutive steps had a non-finite loss (last at step "
                                         f"{step}); lower training.learning_rate, try precision bf16-mixed or 32")
            return
        self.nonfinite = 0
        if self.ema is not None:  # train.py's decay warm-up (1 + s) / (10 + s), s = step - 1
            with torch.no_grad():
                torch._foreach_lerp_(list(self.ema.parameters()), [p.detach() for p in self.vae.parameters()],
                                     1 - min(t.ema_decay, step / (9 + step)))
        self.window += self.stats
        self.window_steps += 1
        self.window_time += time.perf_counter() - self.t0
        logger = self.logger if self.trainer.is_global_zero else None
        if step % lg.log_every_n_steps == 0:  # means over the steps since the last log, over all ranks
            world = self.trainer.world_size
            means = (self.trainer.strategy.reduce(self.window, reduce_op="sum") / (self.window_steps * world)).tolist()
            metrics = {**dict(zip(STEP_TAGS, means)), EXTRA_TAGS[0]: self.scheds[0].get_last_lr()[0],
                       EXTRA_TAGS[1]: self.scheds[1].get_last_lr()[0], EXTRA_TAGS[2]:
                       t.batch_size * t.accumulate_grad_batches * world * self.window_steps / self.window_time}
            self.log_dict(metrics, logger=False)  # for ModelCheckpoint: checkpoint.monitor may be a train/* tag
            self.log("loss", metrics["train/loss"], prog_bar=True, logger=False)
            if logger:
                logger.log_metrics(metrics, step)  # TensorBoard's x-axis: generator steps, as train.py's
            self.window.zero_()
            self.window_steps, self.window_time = 0, 0.0
        if logger and step % lg.log_images_every_n_steps == 0:
            logger.experiment.add_image("train/comparison", image_grid(list(zip(*sample))), step)

    # ---------------------------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self):
        self.val_sums, self.val_images = torch.zeros(len(VAL_TAGS) + 1, device=self.device), []
        if self.ema is not None:
            self.ema.to(self.device)

    def validation_step(self, batch, batch_idx):
        # train.validate on one batch (EMA weights when on, posterior mode); its means become sums again here.
        run = SimpleNamespace(cfg=self.cfg, device=self.device, vae=self.vae, ema=self.ema, loss_fn=self.loss,
                              world=1, autocast=contextlib.nullcontext)  # autocast: Trainer(precision)'s
        wanted = self.cfg.logging.num_val_images - sum(len(a) for a, _ in self.val_images)
        metrics, images = validate(run, [batch], max(wanted, 0))
        n = len(batch["pixel_values"])
        self.val_sums += torch.tensor([metrics.get(tag, 0.0) * n for tag in VAL_TAGS] + [n], device=self.device)
        if images is not None:
            self.val_images.append(images)

    def on_validation_epoch_end(self):
        sums = self.trainer.strategy.reduce(self.val_sums, reduce_op="sum")
        metrics = dict(zip(VAL_TAGS, (sums[:-1] / sums[-1]).tolist()))
        if self.loss.lpips is None:
            del metrics["val/lpips"]
        self.log_dict(metrics, logger=False)  # (already reduced) for ModelCheckpoint's monitor
        if self.trainer.is_global_zero and self.logger and not self.trainer.sanity_checking:
            self.logger.log_metrics(metrics, self.global_step)
            if self.val_images:
                images = [torch.cat(part)[:self.cfg.logging.num_val_images] for part in zip(*self.val_images)]
                self.logger.experiment.add_image("val/reconstruction", image_grid(list(zip(*images))), self.global_step)

    # --------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint):
        checkpoint["ema_state_dict"] = ({k: v.cpu() for k, v in self.ema.state_dict().items()}
                                        if self.ema is not None else None)
        folder = getattr(self.trainer.checkpoint_callback, "dirpath", None)
        if folder and self.trainer.is_global_zero:  # train.py's diffusers-format copy of the newest weights
            (self.ema if self.ema is not None else self.vae).save_pretrained(os.path.join(folder, "hf_checkpoint"))

    def on_load_checkpoint(self, checkpoint):
        # Runs before the state_dict is loaded: an EMA switched on after the fact starts from the saved weights.
        if self.ema is not None:
            self.ema.load_state_dict(checkpoint.get("ema_state_dict") or {
                k[4:]: v for k, v in checkpoint["state_dict"].items() if k.startswith("vae.")})


class _WholePassLoader(ResumableLoader):
    def __iter__(self):  # Lightning never exhausts the iterator (see on_train_epoch_start): start each pass anew
        self.rewind()
        yield from super().__iter__()


class VAEDataModule(L.LightningDataModule):
    """data.py's datasets and ResumableLoaders, configured as train.py configures them (the same config dict)."""

    def __init__(self, config=None, **sections):
        super().__init__()
        self.cfg = config_from_dict({**(config or {}), **sections})

    def setup(self, stage=None):
        d = self.cfg.data
        if not hasattr(self, "train_ds"):  # fit() builds them before the Trainer starts: start-up errors first
            self.train_ds, self.val_ds = build_datasets(
                d.dataset_name, d.train_data_dir, d.val_data_dir, d.image_column, d.resolution, d.center_crop,
                d.random_flip, d.num_val_holdout, d.max_bad_fraction, d.dataset_config_name, d.cache_dir)

    def _loader(self, dataset, train):
        t = self.cfg.training
        loader = (ResumableLoader if train else _WholePassLoader)(
            dataset, t.batch_size, shuffle=train, drop_last=train, num_workers=t.num_workers, seed=t.seed,
            rank=self.trainer.global_rank, world_size=self.trainer.world_size, pin_memory=torch.cuda.is_available())
        loader.batch_sampler = None  # Lightning takes loaders with a `sampler` for DataLoaders and looks for it
        return loader

    def train_dataloader(self):
        return self._loader(self.train_ds, True)

    def val_dataloader(self):
        return self._loader(self.val_ds, False)


def build_trainer(cfg, **overrides):
    """A Trainer writing what train.py writes: checkpoints/vae-epoch=XX-step=XXXXXX.ckpt (top-k), last.ckpt,
    hf_checkpoint/, logs/vae_training/version_N/. `overrides`: more Trainer arguments (callbacks are added)."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger
    t, c, lg = cfg.training, cfg.checkpoint, cfg.logging
    # monitor null = train.py's "newest k": Lightning allows top-k > 1 only with a monitor, and "step" is one.
    checkpoint = ModelCheckpoint(dirpath=cfg.paths.checkpoint_dir, filename="vae-{epoch:02d}-{step:06d}",
                                 save_last=True, save_top_k=c.save_top_k, monitor=c.monitor or "step",
                                 mode=c.mode if c.monitor else "max", every_n_train_steps=c.save_every_n_steps)
    multi = torch.cuda.device_count() > 1
    kwargs = dict(
        max_epochs=t.num_epochs, max_steps=t.max_steps or -1, precision=t.precision,
        logger=TensorBoardLogger(cfg.paths.log_dir, name="vae_training", default_hp_metric=False),
        # val_check_interval counts batches: one generator step takes accumulate_grad_batches of them
        val_check_interval=lg.val_check_interval * t.accumulate_grad_batches, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, log_every_n_steps=lg.log_every_n_steps, enable_progress_bar=lg.progress_bar,
        use_distributed_sampler=False, default_root_dir=cfg.paths.output_dir, sync_batchnorm=multi,
        strategy="ddp_find_unused_parameters_true" if multi else "auto")
    overrides["callbacks"] = [checkpoint, *overrides.get("callbacks", [])]
    return L.Trainer(**{**kwargs, **overrides})


def fit(cfg, resume_from_checkpoint=None, **trainer_overrides):
    """Train as configured; returns (module, trainer). Writes last.ckpt and outputs/final_model/ at the end too.
    Problems before the first step (checkpoint path, model, data) raise train.StartupError."""
    resume = resume_from_checkpoint
    try:
        if resume == "latest":
            resume = os.path.join(cfg.paths.checkpoint_dir, "last.ckpt")
        if resume is not None and not os.path.isfile(resume):
            raise FileNotFoundError(f"--resume_from_checkpoint: no such file {resume}")
        module, data = VAELightningModule(asdict(cfg)), VAEDataModule(asdict(cfg))
        data.setup("fit")
    except (ValueError, RuntimeError, OSError, ImportError, KeyError) as e:
        raise StartupError(one_line(e)) from e
    trainer = build_trainer(cfg, **trainer_overrides)
    with warnings.catch_warnings():  # ModelCheckpoint's advice to save pre-step weights: train.py saves post-step
        warnings.filterwarnings("ignore", message=".*manual optimization and every_n_train_steps.*")
        trainer.fit(module, datamodule=data, ckpt_path=resume)
    trainer.save_checkpoint(os.path.join(cfg.paths.checkpoint_dir, "last.ckpt"))  # always the newest, as train.py
    if trainer.is_global_zero and not trainer.interrupted:
        (module.ema if module.ema is not None else module.vae).save_pretrained(
            os.path.join(cfg.paths.output_dir, "final_model"))
    return module, trainer


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train the SD 1.5 VAE with a Lightning Trainer.")
    parser.add_argument("--config", default="config.yaml", help="YAML config (default: config.yaml)")
    parser.add_argument("--resume_from_checkpoint", help="'latest' (= checkpoint_dir/last.ckpt) or a path")
    parser.add_argument("--precision", help="overrides training.precision: 16-mixed | bf16-mixed | 32")
    parser.add_argument("overrides", nargs="*", help="section.key=value (YAML values), e.g. training.max_steps=1000")
    args = parser.parse_args(argv)
    try:
        precision = [f"training.precision={args.precision}"] if args.precision else []
        fit(load_config(args.config, args.overrides + precision), args.resume_from_checkpoint)
    except (ConfigError, StartupError, DataError, NonFiniteLossError) as e:  # as train.py: 2 before training, 1 in it
        print(f"lightning_module.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2 if isinstance(e, (ConfigError, StartupError)) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
