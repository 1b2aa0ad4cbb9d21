"""Tests of lightning_module.py, the optional Lightning adapter: a Trainer run equals a train.py run (weights,
optimizer states, checkpoint names, TensorBoard scalars and images), checkpoints cross-load both ways, the
CLI, and that nothing else depends on it. CPU, one thread, tiny models, 32 px photos from scikit-image.
"""
import ast
import glob
import os
from types import SimpleNamespace

import pytest
import torch
import yaml

pytest.importorskip("lightning")  # an optional dependency (requirements-test.txt installs it)
from conftest import ROOT, assert_same, load, tiny_config  # noqa: E402

import lightning_module as lm  # noqa: E402
import train  # noqa: E402
from checkpoints import load_checkpoint  # noqa: E402
from config import EXTRA_TAGS, STEP_TAGS, VAL_TAGS, config_from_dict  # noqa: E402
from data import ResumableLoader, build_datasets  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


# What these tests need beyond conftest.tiny_config: checkpoints, validation and images inside a 6-step run.
LIGHTNING_DEFAULTS = {"checkpoint.save_every_n_steps": 2, "checkpoint.monitor": "train/loss",
                      "logging.val_check_interval": 3, "logging.log_images_every_n_steps": 2}


def raw_config(workdir, photos, **overrides):
    return tiny_config(workdir, photos, **{**LIGHTNING_DEFAULTS, **overrides})


def tiny(workdir, photos, **overrides):
    return config_from_dict(raw_config(workdir, photos, **overrides))


def fit(cfg, **trainer_overrides):
    return lm.fit(cfg, accelerator="cpu", enable_model_summary=False, **trainer_overrides)


def events(workdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(os.path.join(workdir, "logs", "vae_training", "version_0"),
                          size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    return ea


@pytest.fixture(scope="module")
def pair(tmp_path_factory, photos):
    """The same tiny config trained 6 steps by train.py and by a Lightning Trainer (own output folders)."""
    root = tmp_path_factory.mktemp("pair")
    cfg_pt, cfg_pl = tiny(root / "pt", photos), tiny(root / "pl", photos)
    run = train.train(cfg_pt)
    module, trainer = fit(cfg_pl)
    return SimpleNamespace(pt=root / "pt", pl=root / "pl", run=run, module=module, trainer=trainer,
                           cfg=cfg_pl)


# ---------------------------------------------------------------------------------------------- training
def test_trainer_fit_equals_train_py(pair):
    """Same initial weights, batches, posterior noise, G and D steps, clipping, schedules: bitwise equal
    results."""
    assert pair.trainer.global_step == 6  # generator steps, although the discriminator also stepped 3 times
    assert_same(pair.module.vae.state_dict(), pair.run.vae.state_dict())
    assert_same(pair.module.discriminator.state_dict(), pair.run.disc.state_dict())  # BatchNorm buffers too
    ours, theirs = load(pair.pl / "checkpoints" / "last.ckpt"), load(pair.pt / "checkpoints" / "last.ckpt")
    assert (ours["global_step"], theirs["global_step"]) == (6, 6)
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "ema_state_dict"):
        assert_same(ours[key], theirs[key], key)
    assert {k.split(".")[0] for k in ours["state_dict"]} == {"vae", "discriminator", "loss"}
    assert ours["optimizer_states"][1]["state"], "the discriminator's optimizer has stepped"
    assert ours["hyper_parameters"] == train.asdict(pair.cfg)
    with open(pair.pl / "logs" / "vae_training" / "version_0" / "hparams.yaml") as f:
        assert yaml.safe_load(f) == train.asdict(pair.cfg)

    # ModelCheckpoint: train.py's names (step = generator steps) and the same top-1 choice by train/loss
    losses = {e.step: e.value for e in events(pair.pt).Scalars("train/loss")}
    best = min((2, 4, 6), key=losses.get)
    expected = {"hf_checkpoint", "last.ckpt", f"vae-epoch={(best - 1) // 3:02d}-step={best:06d}.ckpt"}
    assert set(os.listdir(pair.pl / "checkpoints")) == set(os.listdir(pair.pt / "checkpoints")) == expected
    from vae import AutoencoderKL
    for folder in (pair.pl / "checkpoints" / "hf_checkpoint", pair.pl / "outputs" / "final_model"):
        assert_same(AutoencoderKL.from_pretrained(folder).state_dict(), pair.run.vae.state_dict())


def test_tensorboard_has_train_py_tags_steps_and_values(pair):
    ours, theirs = events(pair.pl), events(pair.pt)
    assert set(ours.Tags()["scalars"]) == set(theirs.Tags()["scalars"]) == \
        set(STEP_TAGS + EXTRA_TAGS + VAL_TAGS) - {"val/lpips"}  # no LPIPS in this config
    for tag in theirs.Tags()["scalars"]:
        a, b = ours.Scalars(tag), theirs.Scalars(tag)
        assert [e.step for e in a] == [e.step for e in b], tag
        if tag != "train/images_per_sec":  # a timing
            assert [e.value for e in a] == pytest.approx([e.value for e in b], rel=1e-6, abs=1e-9), tag
    d_loss = [e.value for e in ours.Scalars("train/d_loss")]
    # GAN from step index 3 (logged as 4)
    assert d_loss[:3] == [0.0] * 3 and all(v > 0 for v in d_loss[3:]), d_loss
    assert [e.step for e in ours.Scalars("val/rec_loss")] == [3, 6]
    assert set(ours.Tags()["images"]) == {"train/comparison", "val/reconstruction"}
    for tag in ("train/comparison", "val/reconstruction"):
        a, b = ours.Images(tag), theirs.Images(tag)
        assert [e.step for e in a] == [e.step for e in b] == ([2, 4, 6] if tag[0] == "t" else [3, 6])
        assert [e.encoded_image_string for e in a] == [e.encoded_image_string for e in b], tag


def test_accumulation_and_ema_equal_train_py(tmp_path, photos):
    """accumulate_grad_batches 2 over 3 batches per epoch (a short last group), EMA, D from step 1: the
    weights (the discriminator's BatchNorm statistics too), the EMA and the optimizer states are bitwise
    train.py's, and the EMA has moved from the initial weights."""
    over = {"training.accumulate_grad_batches": 2, "training.ema_decay": 0.9, "training.max_steps": 4,
            "loss.disc_start_step": 1, "logging.val_check_interval": 100,
            "checkpoint.save_every_n_steps": 100}
    run = train.train(tiny(tmp_path / "pt", photos, **over))
    cfg = tiny(tmp_path / "pl", photos, **over)
    init = train.build_run(cfg, torch.device("cpu")).vae.decoder.conv_out.weight
    module, trainer = fit(cfg)
    assert trainer.global_step == 4 and trainer.current_epoch == 2  # 2 steps per epoch: 2 + 1 batches
    assert_same(module.vae.state_dict(), run.vae.state_dict())
    assert_same(module.discriminator.state_dict(), run.disc.state_dict())
    assert_same(module.ema.state_dict(), run.ema.state_dict())
    ema = module.ema.decoder.conv_out.weight
    assert not torch.equal(ema, module.vae.decoder.conv_out.weight) and not torch.equal(ema, init)
    ours, theirs = (load(tmp_path / d / "checkpoints" / "last.ckpt") for d in ("pl", "pt"))
    assert_same(ours["optimizer_states"], theirs["optimizer_states"])
    assert_same(ours["ema_state_dict"], theirs["ema_state_dict"])
    from vae import AutoencoderKL  # the exported model is the EMA, as train.py's
    assert_same(AutoencoderKL.from_pretrained(tmp_path / "pl" / "outputs" / "final_model").state_dict(),
                run.ema.state_dict())
    loaded = lm.VAELightningModule.load_from_checkpoint(tmp_path / "pt" / "checkpoints" / "last.ckpt",
                                                        map_location="cpu")  # train.py's EMA comes back
    assert_same(loaded.ema.state_dict(), run.ema.state_dict())


def test_bf16_equals_train_py(tmp_path, photos):
    """training.precision bf16-mixed: train_step's own autocast under a Trainer at precision 32 gives
    train.py's losses and weights bitwise; a Trainer told to autocast itself is refused in one line."""
    over = {"training.precision": "bf16-mixed", "training.max_steps": 3, "loss.disc_start_step": 1,
            "logging.val_check_interval": 100, "checkpoint.save_every_n_steps": 100}
    run = train.train(tiny(tmp_path / "pt", photos, **over))
    module, trainer = fit(tiny(tmp_path / "pl", photos, **over))
    assert trainer.precision == "32-true" and module.run.autocast_dtype == torch.bfloat16
    assert_same(module.vae.state_dict(), run.vae.state_dict())
    ours, theirs = events(tmp_path / "pl"), events(tmp_path / "pt")
    for tag in ("train/loss", "train/rec_loss", "train/kl_loss", "train/g_loss", "train/d_loss"):
        assert [e.value for e in ours.Scalars(tag)] == [e.value for e in theirs.Scalars(tag)], tag
    assert [e.value for e in ours.Scalars("train/d_loss")][1] > 0
    with pytest.raises(train.StartupError, match=r"Trainer\(precision='bf16-mixed'\): leave it at 32"):
        fit(tiny(tmp_path / "bad", photos, **over), precision="bf16-mixed")


@pytest.mark.slow  # fp16 autocast on CPU has no native kernels: ~30x slower than fp32
def test_fp16_loss_scaling_equals_train_py(tmp_path, photos, monkeypatch):
    """training.precision 16-mixed: train_step's two GradScalers (here starting at 2^10) under the Trainer.
    The untrained VAE's summed losses overflow at first, the scale backs off (steps skipped by the scaler,
    their grad norm logged as 0), then both models train: train.py's weights and losses bitwise; the scale
    is in the checkpoint (where train.py resumes it from)."""
    make = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *a, **k: make(*a, init_scale=2.0 ** 10, **k))
    over = {"training.precision": "16-mixed", "training.max_steps": 8, "loss.disc_start_step": 4,
            "logging.val_check_interval": 100}
    run = train.train(tiny(tmp_path / "pt", photos, **over))
    cfg = tiny(tmp_path / "pl", photos, **over)
    init = {k: v.clone() for k, v in train.build_run(cfg, torch.device("cpu")).vae.state_dict().items()}
    module, trainer = fit(cfg)
    scale = module.run.scaler_vae.get_scale()
    assert trainer.global_step == 8 and scale < 2.0 ** 10 and module.run.state.nonfinite == 0
    assert scale == run.scaler_vae.get_scale()
    after = module.vae.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert_same(after, run.vae.state_dict())
    assert any(not torch.equal(init[k], after[k]) for k in init)
    ckpt = load(tmp_path / "pl" / "checkpoints" / "last.ckpt")
    assert ckpt["MixedPrecision"]["scale"] == scale and ckpt["optimizer_states"][1]["state"]
    ea, theirs = events(tmp_path / "pl"), events(tmp_path / "pt")
    d_loss = [e.value for e in ea.Scalars("train/d_loss")]
    norms = [e.value for e in ea.Scalars("train/grad_norm")]
    assert d_loss[:4] == [0.0] * 4 and all(v > 0 for v in d_loss[4:]), d_loss
    assert 0.0 in norms and norms[-1] > 0, norms
    assert norms == [e.value for e in theirs.Scalars("train/grad_norm")]


def test_non_finite_losses_skip_steps_then_stop(tmp_path, photos):
    """A NaN loss (here a NaN KL weight) updates nothing and is counted; training.max_consecutive_nonfinite in
    a row stop the run with train.py's error (the CLI's exit code 1)."""
    cfg = tiny(tmp_path, photos, **{"training.max_consecutive_nonfinite": 3, "loss.disc_start_step": 0})
    module, data = lm.VAELightningModule(train.asdict(cfg)), lm.VAEDataModule(train.asdict(cfg))
    module.loss.kl_weight = float("nan")
    before = {k: v.clone() for k,
              v in module.state_dict().items() if "running" not in k and "batches" not in k}
    trainer = lm.build_trainer(cfg, accelerator="cpu", enable_model_summary=False)
    with pytest.raises(train.NonFiniteLossError, match="3 consecutive steps"):
        trainer.fit(module, datamodule=data)
    assert module.run.state.nonfinite == 3 and trainer.global_step == 3
    assert_same({k: v for k, v in module.state_dict().items() if k in before}, before)
    # no optimizer ever stepped
    assert not any(s["state"] for s in (o.state_dict() for o in (module.run.opt_vae, module.run.opt_disc)))


# ------------------------------------------------------------------------------------------- checkpoints
def test_load_from_checkpoint_reads_train_py_checkpoints(pair):
    for path in glob.glob(str(pair.pt / "checkpoints" / "*.ckpt")):
        ckpt = load(path)
        module = lm.VAELightningModule.load_from_checkpoint(path, map_location="cpu")  # strict
        assert_same(module.state_dict(), ckpt["state_dict"])
        assert dict(module.hparams) == ckpt["hyper_parameters"] and module.ema is None


@pytest.mark.slow  # LPIPS builds a random VGG16 (138M parameters) twice
def test_load_from_checkpoint_reads_lpips_and_ema(tmp_path, photos):
    """With the (frozen, here random) LPIPS weights under "loss." and an EMA: both come back."""
    cfg = tiny(tmp_path, photos, **{"loss.perceptual_weight": 0.1, "loss.random_lpips_backbone": True,
                                    "training.ema_decay": 0.9, "training.max_steps": 2})
    run = train.train(cfg)
    ckpt = load(tmp_path / "checkpoints" / "last.ckpt")
    assert any(k.startswith("loss.lpips.") for k in ckpt["state_dict"])
    module = lm.VAELightningModule.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt",
                                                        map_location="cpu")
    assert_same(module.state_dict(), ckpt["state_dict"])
    assert_same(module.ema.state_dict(), run.ema.state_dict())
    assert_same(module.vae.state_dict(), run.vae.state_dict())


def test_load_from_checkpoint_reads_lightning_checkpoints(pair):
    for path in glob.glob(str(pair.pl / "checkpoints" / "*.ckpt")):
        module = lm.VAELightningModule.load_from_checkpoint(path, map_location="cpu")
        assert_same(module.state_dict(), load(path)["state_dict"])
    assert_same(module.vae.state_dict(), pair.run.vae.state_dict())  # last.ckpt


def test_train_py_resumes_a_lightning_checkpoint(tmp_path, photos, pair):
    """train.py --resume_from_checkpoint <Lightning checkpoint>: weights, both optimizers' and schedulers'
    states restored, training continues from its generator step."""
    path = glob.glob(str(pair.pl / "checkpoints" / "vae-*.ckpt"))[0]  # mid-run, with a discriminator state
    ckpt = load(path)
    cfg = tiny(tmp_path, photos, **{"training.max_steps": 8})
    run = train.build_run(cfg, torch.device("cpu"))
    train_ds, _ = build_datasets(cfg.data)
    assert load_checkpoint(run, path, ResumableLoader(train_ds, 2)) == ckpt["hyper_parameters"]
    assert (run.state.epoch, run.state.step) == (ckpt["epoch"], ckpt["global_step"])
    state = {f"{p}.{k}": v for p, m in (("vae", run.vae), ("discriminator", run.disc), ("loss", run.loss_fn))
             for k, v in m.state_dict().items()}
    assert_same(state, ckpt["state_dict"])
    assert_same([run.opt_vae.state_dict(), run.opt_disc.state_dict()], ckpt["optimizer_states"])
    assert_same([run.sched_vae.state_dict(), run.sched_disc.state_dict()], ckpt["lr_schedulers"])
    overrides = [f"{s}.{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                 for s, sec in train.asdict(cfg).items() for k, v in sec.items()]
    assert train.main(["--config", os.path.join(ROOT, "config.yaml"), "--resume_from_checkpoint", path,
                       *overrides]) == 0
    assert load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 8


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_trains_resumes_and_rejects_bad_input(tmp_path, photos, capsys):
    raw = raw_config(tmp_path, photos, **{"training.max_steps": 4, "checkpoint.monitor": "val/rec_loss",
                                          "logging.val_check_interval": 2})
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert lm.main(["--config", str(config), "logging.num_val_images=1"]) == 0
    files = set(os.listdir(tmp_path / "checkpoints"))
    assert {"last.ckpt", "hf_checkpoint"} < files
    assert len([f for f in files if f.startswith("vae-epoch=")]) == 1
    assert sorted(os.listdir(tmp_path / "outputs" / "final_model")) == \
        ["config.json", "diffusion_pytorch_model.safetensors"]
    assert load(tmp_path / "checkpoints" / "last.ckpt")["hyper_parameters"]["logging"]["num_val_images"] == 1
    # Lightning's own resume continues the generator-step count.
    assert lm.main(["--config", str(config), "--resume_from_checkpoint", "latest",
                    "training.max_steps=6"]) == 0
    assert load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 6
    assert [e.step for e in events(tmp_path).Scalars("train/loss")] == [1, 2, 3, 4]
    capsys.readouterr()
    for argv in (["training.batch_sizee=2"], ["loss.rec_loss_type=l3"], ["--resume_from_checkpoint",
                                                                         "nope.ckpt"]):
        assert lm.main(["--config", str(config), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("lightning_module.py: error: ") and "\n" not in err, err
    assert not os.path.exists(tmp_path / "logs" / "vae_training" / "version_2")


def test_nothing_else_imports_the_adapter_or_lightning():
    """lightning is optional: no other file of the project imports it or the adapter."""
    files = [f for f in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True)
             if os.path.basename(f) not in ("lightning_module.py", "test_lightning.py")]
    assert len(files) > 5
    for path in files:
        with open(path) as f:
            tree = ast.parse(f.read())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        bad = [n for n in names if n.split(".")[0] in ("lightning", "lightning_module", "pytorch_lightning")]
        assert not bad, (path, bad)
