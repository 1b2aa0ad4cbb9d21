"""Optional Lightning adapter: train.py's run, step pieces, validation and checkpoints under a Trainer.

    python lightning_module.py --config config.yaml [--precision bf16-mixed] [section.key=value ...]
    python lightning_module.py --config config.yaml --resume_from_checkpoint latest      # or a path
    vae = VAELightningModule.load_from_checkpoint("checkpoints/last.ckpt").vae  # train.py's files too

Each group of micro-batches runs train.train_step itself (mixed precision: training.precision, the run's
autocast and GradScalers; the Trainer stays at 32), so a Trainer run equals a train.py run and checkpoints
interchange. Its own ways: one device (train.py runs DDP); resuming restores Lightning's loop state, not
train.py's RNG streams; no compile. Validation: train.validate inside the training step.
"""
import os
import sys
import time
import warnings
from dataclasses import asdict

import lightning as L
import torch

import checkpoints
import train
from config import config_from_dict
from data import ResumableLoader, build_datasets, image_grid


class VAELightningModule(L.LightningModule):
    """train.py's step under manual optimization. `config`: config.yaml's layout, or sections as kwargs."""

    def __init__(self, config=None, **sections):
        super().__init__()
        self.cfg = config_from_dict({**(config or {}), **sections})
        self.save_hyperparameters(asdict(self.cfg))  # == train.py's "hyper_parameters"
        self.automatic_optimization = False
        self.run = train.build_run(self.cfg, torch.device("cpu"))  # seeded: train.py's weights and optimizers
        self.vae, self.discriminator, self.loss = self.run.vae, self.run.disc, self.run.loss_fn  # key prefix
        object.__setattr__(self, "ema", self.run.ema)  # not a submodule: "ema_state_dict", as in train.py
        self.window, self.micro = train.LogWindow(), []

    def configure_optimizers(self):
        return [self.run.opt_vae, self.run.opt_disc], [self.run.sched_vae, self.run.sched_disc]

    def setup(self, stage):  # before a checkpoint restores the scalers' states (on_load_checkpoint)
        run, trainer = self.run, self.trainer
        if trainer.world_size > 1:  # train_step's DDP is the run's own wrappers (build_run), not Lightning's
            raise train.StartupError(f"lightning_module.py trains on one device, not {trainer.world_size}: "
                                     "for several GPUs use torchrun train.py")
        if trainer.precision not in ("32-true", "32"):  # train_step autocasts, scales: training.precision
            raise train.StartupError(f"Trainer(precision={trainer.precision!r}): leave it at 32 and set "
                                     "training.precision (or --precision) instead")
        device = trainer.strategy.root_device  # the run was built on the CPU: "auto" as train.py does here
        if device.type != run.device.type:  # (no step taken yet: fresh scalers lose nothing)
            run.set_precision(device)
        run.device = device

    def on_fit_start(self):  # posterior noise seeded as train.py's (data augmentation is seeded by data.py)
        run, seed = self.run, self.cfg.training.seed
        run.noise = torch.Generator(self.device).manual_seed(seed)
        if run.inception is None and self.cfg.logging.val_rfid:  # (fit() built it: one-line errors)
            from fid import FIDInception
            run.inception = FIDInception.pretrained()
        for net in [net for net in (self.ema, run.inception) if net is not None]:
            net.to(self.device)
        self.val_loader = self.trainer.datamodule.val_loader()

    def on_train_epoch_start(self):  # Lightning never exhausts the iterator: follow its epoch (or resume's)
        if hasattr(self.trainer.train_dataloader, "set_epoch"):
            self.trainer.train_dataloader.set_epoch(self.current_epoch)

    def training_step(self, batch, batch_idx):
        """Collects a group of micro-batches; its last runs train.train_step, then train.train's loop body."""
        run, training, log_cfg = self.run, self.cfg.training, self.cfg.logging
        start = batch_idx - batch_idx % training.accumulate_grad_batches
        self.micro = [*self.micro, batch] if batch_idx > start else [batch]
        if len(self.micro) < min(training.accumulate_grad_batches,
                                 self.trainer.num_training_batches - start):  # (a short last group)
            return
        step = run.state.step = self.global_step  # the generator steps taken: train.py's `step`
        t0 = time.perf_counter()
        logs, skipped, sample = train.train_step(run, self.micro, step)
        self.window.seconds += time.perf_counter() - t0
        # train_step stepped the optimizers itself: count the step as Lightning's optimizer wrapper would
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready()
        progress.increment_completed()
        run.state.step = step = step + 1
        if not skipped:
            self.window.add(logs)
        run.state.count_nonfinite(skipped, training.max_consecutive_nonfinite)
        if step % log_cfg.log_every_n_steps == 0 and self.window.steps:  # means since the last log
            metrics = self.window.flush(run)
            self._log(metrics)
            self.log("loss", metrics["train/loss"], prog_bar=True, logger=False)
        if step % log_cfg.log_images_every_n_steps == 0:
            self._log({}, sample, "train/comparison")
        if step % log_cfg.val_check_interval == 0:  # (ModelCheckpoint saves after the step: it sees these)
            self._log(*train.validate(run, self.val_loader, log_cfg.num_val_images), "val/reconstruction")

    def _log(self, metrics, pairs=(), image_tag=None):  # train.py's log(), and for ModelCheckpoint
        self.log_dict(metrics, logger=False)  # checkpoint.monitor: any tag
        logger, step = self.logger, self.run.state.step
        if logger and metrics:
            logger.log_metrics(metrics, step)  # TensorBoard's x-axis: generator steps, as train.py's
        if logger and image_tag and pairs:
            logger.experiment.add_image(image_tag, image_grid(list(zip(*pairs))), step)

    def on_save_checkpoint(self, checkpoint):
        ema = self.ema.state_dict() if self.ema is not None else None
        checkpoint["ema_state_dict"] = {k: v.cpu() for k, v in ema.items()} if ema is not None else None
        if self.run.scaler_vae.is_enabled():  # fp16: the key checkpoints.py reads from Lightning's files
            checkpoint["MixedPrecision"] = self.run.scaler_vae.state_dict()
        folder = getattr(self.trainer.checkpoint_callback, "dirpath", None)
        if folder and self.trainer.is_global_zero:  # train.py's diffusers-format copy of the newest weights
            self.run.weights.save_pretrained(os.path.join(folder, checkpoints.HF_FOLDER))

    def on_load_checkpoint(self, checkpoint):  # before the state_dict loads: a new EMA starts from them
        if self.ema is not None:
            self.ema.load_state_dict(checkpoint.get("ema_state_dict") or {
                k[4:]: v for k, v in checkpoint["state_dict"].items() if k.startswith("vae.")})
        for scaler in (self.run.scaler_vae, self.run.scaler_disc) if checkpoint.get("MixedPrecision") else ():
            scaler.load_state_dict(checkpoint["MixedPrecision"])  # (the discriminator's scale: the VAE's)


class VAEDataModule(L.LightningDataModule):
    """data.py's datasets and ResumableLoaders, as train.py's; the module validates on `val_loader()`."""

    def __init__(self, config=None, **sections):
        super().__init__()
        self.cfg = config_from_dict({**(config or {}), **sections})

    def setup(self, stage=None):  # fit() calls it before the Trainer starts: start-up errors first
        if not hasattr(self, "train_ds"):
            self.train_ds, self.val_ds = build_datasets(self.cfg.data)  # (streams: train.py only)

    def _loader(self, dataset, training):
        settings, trainer = self.cfg.training, self.trainer
        return ResumableLoader(dataset, settings.batch_size, shuffle=training, drop_last=training,
                               **train.loader_args(settings, trainer.global_rank, trainer.world_size,
                                                   trainer.strategy.root_device))

    def train_dataloader(self):
        loader = self._loader(self.train_ds, training=True)
        loader.batch_sampler = None  # Lightning takes loaders with a `sampler` for DataLoaders, looks for it
        return loader

    def val_loader(self):
        return self._loader(self.val_ds, training=False)


def build_trainer(cfg, **overrides):
    """A Trainer writing train.py's files (checkpoints.py); `overrides`: more Trainer arguments."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger
    training, ckpt_cfg, log_cfg = cfg.training, cfg.checkpoint, cfg.logging
    # monitor null = train.py's "newest k": Lightning allows top-k > 1 only with a monitor, and "step" is one.
    checkpoint = ModelCheckpoint(dirpath=cfg.paths.checkpoint_dir, filename=checkpoints.TOP_K_NAME,
                                 auto_insert_metric_name=False, save_last=True,
                                 save_top_k=ckpt_cfg.save_top_k, monitor=ckpt_cfg.monitor or "step",
                                 mode=ckpt_cfg.mode if ckpt_cfg.monitor else "max",
                                 every_n_train_steps=ckpt_cfg.save_every_n_steps)
    kwargs = dict(  # precision: train_step's own, from training.precision; one device (setup says why)
        max_epochs=training.num_epochs, max_steps=training.max_steps or -1, precision="32-true", devices=1,
        logger=TensorBoardLogger(cfg.paths.log_dir, name=checkpoints.LOG_NAME, default_hp_metric=False),
        log_every_n_steps=log_cfg.log_every_n_steps, enable_progress_bar=log_cfg.progress_bar,
        use_distributed_sampler=False, default_root_dir=cfg.paths.output_dir)
    overrides["callbacks"] = [checkpoint, *overrides.get("callbacks", [])]
    return L.Trainer(**{**kwargs, **overrides})


def fit(cfg, resume_from_checkpoint=None, overwrite=False, resume_data_changed=None, **trainer_overrides):
    """Train as configured; returns (module, trainer). Problems before the first step raise
    train.StartupError. overwrite: train.py's; resume_data_changed: unused (Lightning restores its data)."""
    with train.startup_errors():
        lock = checkpoints.claim_run(cfg, resume_from_checkpoint, overwrite)
    with train.startup_errors(lock.release):
        resume = checkpoints.resume_checkpoint(cfg, resume_from_checkpoint)[0]
        module, data = VAELightningModule(asdict(cfg)), VAEDataModule(asdict(cfg))
        data.setup("fit")
        if cfg.logging.val_rfid:  # fid.py, imported only when switched on
            from fid import FIDInception
            module.run.inception = FIDInception.pretrained()
    trainer = build_trainer(cfg, **trainer_overrides)
    try:  # (the module's setup refuses a Trainer it cannot run under, also with a StartupError)
        with warnings.catch_warnings():  # ModelCheckpoint advises saving pre-step weights: we save post-step
            warnings.filterwarnings("ignore", message=".*manual optimization and every_n_train_steps.*")
            trainer.fit(module, datamodule=data, ckpt_path=resume)
        trainer.save_checkpoint(os.path.join(cfg.paths.checkpoint_dir, checkpoints.LAST))  # as train.py's
        if trainer.is_global_zero and not trainer.interrupted:  # EMA weights when on
            final = os.path.join(cfg.paths.output_dir, checkpoints.FINAL_MODEL)
            checkpoints.export_model(module.run.weights, final)
    finally:
        lock.release()
    return module, trainer


def main(argv=None):  # train.py's command line (options, overrides, exit codes), running `fit`
    return train.main(argv, fit, "lightning_module.py")


if __name__ == "__main__":
    sys.exit(main())
