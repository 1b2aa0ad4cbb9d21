"""Tests of train.py: config parsing, learning, exact resume, SIGTERM, DDP (gloo), outputs and TensorBoard
tags, precision paths, decoder-only, gradient isolation, non-finite handling. CPU, tiny models, 32-64 px
photos.

Every run here uses one CPU thread (set below, OMP_NUM_THREADS=1 in subprocesses): runs in this process and in
subprocesses must give bitwise equal weights, and on a shared 2-core machine one thread is also the fastest.
"""
import copy
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import ROOT, assert_same, load, tiny_config, wait_for, write_photos

import losses
import train
from config import EXTRA_TAGS, STEP_TAGS, VAL_TAGS, Config, config_from_dict, load_config

SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1",
                  "HF_DATASETS_OFFLINE": "1"}
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(workdir, photos, **overrides):
    """conftest.tiny_config as a config.Config."""
    return config_from_dict(tiny_config(workdir, photos, **overrides))


def as_args(cfg):
    """A Config as command-line overrides (for subprocess runs)."""
    return [f"{s}.{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for s, sec in train.asdict(cfg).items() for k, v in sec.items()]


# The state that must match after a resume: everything but the config (paths differ), the throughput (a
# timing) and the global torch RNG, which the DataLoader draws from whenever an iterator starts (the training
# randomness, posterior noise, uses its own generator, compared here; augmentations are seeded per sample by
# data.py).
RESUME_SKIP = ("ckpt/hyper_parameters", "ckpt/loop_state/rng_states[0]/torch",
               "ckpt/loop_state/metrics/train/images_per_sec")


# ------------------------------------------------------------------------------------------------- config
def test_config_yaml_is_the_dataclass_defaults_and_has_every_contract_key():
    cfg = load_config(os.path.join(ROOT, "config.yaml"))
    assert cfg == Config()
    with open(os.path.join(ROOT, "config.yaml")) as f:
        raw = yaml.safe_load(f)
    # every training setting; the architecture keys (and their SD 1.5 values) are vae.py's, named in a comment
    from vae import DEFAULT_CONFIG
    raw["model"].update(DEFAULT_CONFIG)
    assert {k: sorted(v) for k, v in raw.items()} == {k: sorted(v) for k, v in train.asdict(cfg).items()}
    with open(os.path.join(ROOT, "config.yaml")) as f:
        comments = " ".join(line.partition("#")[2] for line in f)
    named = [k for k in DEFAULT_CONFIG if f" {k}," in comments or f" {k}." in comments]
    assert named == list(DEFAULT_CONFIG), "config.yaml names every key"
    # the documented defaults (README, "Training")
    t, lo, d = cfg.training, cfg.loss, cfg.data
    assert (t.seed, t.batch_size, t.num_epochs, t.max_steps, t.learning_rate, t.disc_learning_rate) == \
        (42, 4, 100, None, 4.5e-6, 4.5e-6)
    assert (t.weight_decay, t.gradient_clip_val, t.accumulate_grad_batches, t.precision, t.num_workers,
            t.decoder_only, t.ema_decay) == (0.01, 1.0, 1, "auto", 4, False, None)
    assert (lo.rec_loss_type, lo.kl_weight, lo.perceptual_weight, lo.disc_weight, lo.disc_start_step,
            lo.disc_loss_type) == ("l2", 1e-6, 0.5, 1.0, 50001, "hinge")
    assert (d.dataset_name, d.train_data_dir, d.val_data_dir, d.image_column, d.resolution, d.center_crop,
            d.random_flip) == ("lambdalabs/pokemon-blip-captions", None, None, "image", 512, True, True)
    assert train.asdict(cfg.checkpoint) == dict(save_top_k=3, save_every_n_steps=1000, monitor="val/rec_loss",
                                                mode="min", on_save_error="error")
    assert train.asdict(cfg.logging) == dict(log_every_n_steps=50, val_check_interval=500,
                                             log_images_every_n_steps=500, num_val_images=4,
                                             progress_bar=True,
                                             val_rfid=False)
    assert train.asdict(cfg.paths) == dict(output_dir="./outputs", log_dir="./logs",
                                           checkpoint_dir="./checkpoints")
    assert cfg.model.pretrained_model_name_or_path == "stabilityai/sd-vae-ft-mse"
    assert {k: getattr(cfg.model, k) for k in DEFAULT_CONFIG} == DEFAULT_CONFIG


def test_overrides_are_yaml_values():
    cfg = load_config(None, ["training.max_steps=10", "training.adam_betas=[0.9, 0.99]",
                             "model.subfolder=vae",
                                   "loss.kl_weight=1e-5", "training.ema_decay=null", "training.precision=32",
                                   "data.center_crop=false", "training.gradient_clip_val=2"])
    assert cfg.training.max_steps == 10 and cfg.training.adam_betas == [0.9, 0.99]
    assert cfg.model.subfolder == "vae" and cfg.loss.kl_weight == 1e-5 and cfg.training.ema_decay is None
    assert cfg.training.precision == "32" and cfg.data.center_crop is False
    assert cfg.training.gradient_clip_val == 2.0 and isinstance(cfg.training.gradient_clip_val, float)


@pytest.mark.parametrize("content, args, message", [
    ("training:\n  batch_sise: 4\n", [], "unknown key 'training.batch_sise' (did you mean "
                                         "'training.batch_size'?)"),
    ("trainning:\n  batch_size: 4\n", [], "unknown section 'trainning'"),
    ("training:\n  batch_size: four\n", [], "training.batch_size: expected int, got 'four'"),
    ("training:\n  batch_size: 2.5\n", [], "training.batch_size: expected int"),
    ("data:\n  center_crop: 1\n", [], "data.center_crop: expected bool"),
    # bool is an int
    ("", ["training.batch_size=true"], "training.batch_size: expected int, got True (bool)"),
    ("", ["training.max_steps=false"], "training.max_steps: expected int | None, got False (bool)"),
    ("", ["loss.kl_weight=true"], "loss.kl_weight: expected float, got True (bool)"),
    ("training:\n  adam_betas: [0.5, x]\n", [], "training.adam_betas[1]: expected float"),
    ("", ["training.batch_size"], "bad override 'training.batch_size'"),
    ("", ["batch_size=4"], "bad override 'batch_size=4'"),
    ("", ["training.batch_size=[1"], "training.batch_size: cannot parse override value"),
    ("", ["training.learning_rate=fast"], "training.learning_rate: expected float, got 'fast'"),
    ("", ["loss.rec_loss_type=l3"], "loss.rec_loss_type: expected one of l1, l2"),
    ("", ["training.nope=1"], "unknown key 'training.nope'"),
    ("", ["checkpoint.monitor=val/psrn"], "checkpoint.monitor: expected one of"),
    ("", ["--precision", "fp8"], "training.precision: expected one of auto, 16-mixed, bf16-mixed, 32"),
    ("training: [1, 2]\n", [], "training: expected a mapping"),
    ("training: {batch_size: 4\n", [], "invalid YAML"),
])
def test_config_errors_name_the_key_in_one_line(tmp_path, capsys, content, args, message):
    path = tmp_path / "c.yaml"
    path.write_text(content)
    assert train.main(["--config", str(path)] + args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("train.py: error: ")


@pytest.mark.parametrize("hub_offline_flag", [pytest.param(False, marks=pytest.mark.slow), True])
def test_offline_default_config_fails_fast_in_one_line_naming_the_fixes(tmp_path, hub_offline_flag):
    """The default config downloads stabilityai/sd-vae-ft-mse. Offline, as a user sees it (no HF_HUB_OFFLINE
    in the environment, the hub at an unreachable address), or with HF_HUB_OFFLINE=1: exit 2 with one line
    naming the fixes, no hub retries, no output file, quickly."""
    env = {k: v for k, v in SUBPROCESS_ENV.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9")  # (port 9: nothing listens)
    if hub_offline_flag:
        env["HF_HUB_OFFLINE"] = "1"
    start = time.perf_counter()
    config = os.path.join(ROOT, "config.yaml")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config", config], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    print(f"offline start-up error after {seconds:.1f} s (HF_HUB_OFFLINE set: {hub_offline_flag})")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert "Retry" not in r.stdout + r.stderr  # no hub retries
    assert r.stderr.startswith("train.py: error: ") and "stabilityai/sd-vae-ft-mse" in r.stderr
    assert all(fix in r.stderr for fix in ("HF_HUB_OFFLINE=1", "model.pretrained_model_name_or_path",
                                           "data.train_data_dir", "LDM")), r.stderr
    assert not {"checkpoints", "logs", "outputs"} & set(os.listdir(tmp_path))
    assert seconds < 20


def test_precision_auto_picks_32_or_native_bf16_on_cpu_and_says_so(tmp_path, photos, capsys):
    cfg = tiny(tmp_path, photos, **{"training.precision": "auto", "training.max_steps": 1})
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    run = train.train(cfg)
    assert run.precision == ("bf16-mixed" if native else "32")
    assert run.autocast_dtype == (torch.bfloat16 if native else None) and not run.scaler_vae.is_enabled()
    out = capsys.readouterr().out
    assert out.count(f"precision {run.precision} (auto)") == 1 and "resolved config" not in out


def test_fp16_on_cpu_warns_once_with_the_reason(tmp_path, photos):
    with pytest.warns(UserWarning, match="16-mixed on CPU: fp16 autocast there runs ~30x slower") as record:
        train.build_run(tiny(tmp_path, photos, **{"training.precision": "16-mixed"}), torch.device("cpu"))
    assert len([w for w in record if "16-mixed on CPU" in str(w.message)]) == 1
    assert train.resolve_precision("bf16-mixed", torch.device("cpu")) == "bf16-mixed"


def test_other_startup_errors_are_one_line(tmp_path, photos, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(train.asdict(tiny(tmp_path, photos))))
    cases = [(["data.train_data_dir=null", "data.dataset_name=lambdalabs/pokemon-blip-captions"],
              "lambdalabs/pokemon-blip-captions"),  # the default hub dataset, offline
             (["data.train_data_dir=/no/such/dir"], "/no/such/dir"),
             (["--resume_from_checkpoint", "latest"], "last.ckpt (nothing to resume yet)"),
             (["--resume_from_checkpoint", str(cfg_path)], "UnpicklingError"),  # not a checkpoint
             (["model.pretrained_model_name_or_path=/no/such/model"], "/no/such/model")]
    for args, message in cases:
        assert train.main(["--config", str(cfg_path)] + args) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (args, err)


# ---------------------------------------------------------------------------------------------- learning
@pytest.mark.slow
def test_tiny_vae_overfits_real_photos(tmp_path):
    """4 photos at 64x64 (validated on copies of the same photos): validation PSNR must rise by >= 8 dB in 80
    steps. Measured: 10.5 dB (untrained) -> 23.3 dB (+12.9 dB); PSNR 17-19 dB after 20-40 steps."""
    names = ["astronaut", "coffee", "chelsea", "rocket"]
    folders = (write_photos(tmp_path / "train", names, 64), write_photos(tmp_path / "val", names, 64))
    cfg = tiny(tmp_path, folders, **{"training.batch_size": 4, "training.max_steps": 80,
                                     "training.learning_rate": 2e-3,
                                     "data.resolution": 64, "data.center_crop": True,
                                     "data.random_flip": False,
                                     "model.mid_block_add_attention": False, "loss.disc_weight": 0.0,
                                     "logging.log_every_n_steps": 20, "logging.val_check_interval": 40})
    import data
    _, val_ds = data.build_datasets(cfg.data)
    untrained = train.build_run(cfg, torch.device("cpu"))  # the run's own initialisation (same seed)
    before, _ = train.validate(untrained, data.ResumableLoader(val_ds, 4, shuffle=False, drop_last=False), 4)
    run = train.train(cfg)
    after = run.state.metrics
    print(f"val PSNR {before['val/psnr']:.2f} -> {after['val/psnr']:.2f} dB, SSIM {before['val/ssim']:.3f} "
          "-> "
          f"{after['val/ssim']:.3f}")
    assert after["val/psnr"] >= before["val/psnr"] + 8.0
    assert after["val/ssim"] >= before["val/ssim"] + 0.4
    assert after["val/rec_loss"] < before["val/rec_loss"] / 5


# ------------------------------------------------------------------------------------------------ resume
RESUME = {"training.max_steps": 10, "training.ema_decay": 0.9, "training.accumulate_grad_batches": 2,
          "loss.disc_start_step": 5, "logging.val_check_interval": 3, "checkpoint.save_every_n_steps": 3,
          "checkpoint.save_top_k": 2}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, photos):
    """10 steps in one go: accumulation 2 (3 batches per epoch: every other step ends an epoch on a partial
    accumulation), discriminator from step 5, EMA, validation + top-2 checkpoints every 3 steps."""
    work = tmp_path_factory.mktemp("uninterrupted")
    run = train.train(tiny(work, photos, **RESUME))
    assert run.state.step == 10
    return load(work / "checkpoints" / "last.ckpt"), sorted(os.listdir(work / "checkpoints"))


@pytest.mark.parametrize("k", [4, 7])  # before the discriminator starts, and after (mid-epoch)
def test_resume_is_bitwise_exact(tmp_path, photos, uninterrupted, k):
    train.train(tiny(tmp_path, photos, **{**RESUME, "training.max_steps": k}))
    assert load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == k
    train.train(tiny(tmp_path, photos, **RESUME), resume_from_checkpoint="latest")
    ref, ref_files = uninterrupted
    got = load(tmp_path / "checkpoints" / "last.ckpt")
    # weights, optimizer and scheduler states, EMA, GradScalers, posterior-noise RNG, data position, top-k
    # records
    assert_same(ref, got, skip=RESUME_SKIP)
    assert ref["ema_state_dict"] is not None and ref["optimizer_states"][1]["state"]  # D has stepped
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ref_files


def test_sigterm_in_a_step_stops_after_it_and_resumes_exactly(tmp_path, photos, uninterrupted, monkeypatch,
                                                               capsys):
    """In process (the subprocess version below is marked slow): SIGTERM during step 4 finishes the step,
    writes last.ckpt at step 4, exports nothing; resuming gives the uninterrupted run's state bit for bit."""
    step = train.train_step

    def signalled_step(run, micro, index):
        if index == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(run, micro, index)

    monkeypatch.setattr(train, "train_step", signalled_step)
    handler = signal.getsignal(signal.SIGTERM)
    run = train.train(tiny(tmp_path, photos, **RESUME))
    assert run.state.step == 4 and "signal SIGTERM: stopping after this step" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) == handler  # restored
    assert load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 4
    assert not os.path.exists(tmp_path / "outputs" / "final_model")
    monkeypatch.setattr(train, "train_step", step)
    train.train(tiny(tmp_path, photos, **RESUME), resume_from_checkpoint="latest")
    assert_same(uninterrupted[0], load(tmp_path / "checkpoints" / "last.ckpt"), skip=RESUME_SKIP)


@pytest.mark.slow
def test_sigterm_saves_last_ckpt_exits_0_and_resumes_to_the_same_weights(tmp_path, photos):
    cfg = tiny(tmp_path / "run", photos, **{**RESUME, "training.max_steps": 24})
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-u", os.path.join(ROOT, "train.py"), "--config", os.devnull]
                                + as_args(cfg), stdout=out, stderr=subprocess.STDOUT, env=SUBPROCESS_ENV)
    wait_for(log, "step 3/24 ", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, log.read_text()
    text = log.read_text()
    assert "signal SIGTERM: stopping after this step" in text and "Traceback" not in text
    stopped = load(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"]
    assert 3 <= stopped < 24, text
    assert not os.path.exists(tmp_path / "run" / "outputs")  # interrupted: no final model
    train.train(cfg, resume_from_checkpoint="latest")
    train.train(tiny(tmp_path / "ref", photos, **{**RESUME, "training.max_steps": 24}))
    assert_same(load(tmp_path / "ref" / "checkpoints" / "last.ckpt"),
                load(tmp_path / "run" / "checkpoints" / "last.ckpt"), skip=RESUME_SKIP)


# --------------------------------------------------------------------------------------------------- DDP
DDP_SCRIPT = """
import os, sys, torch, train
rank = int(os.environ["RANK"])
work, out = sys.argv[1], sys.argv[2]
base = work if rank == 0 else os.path.join(work, f"rank{rank}")  # rank 1 must write nothing under its paths
cfg = train.config.load_config(None, sys.argv[3:] + [f"paths.output_dir={base}/outputs",
                                              f"paths.log_dir={base}/logs",
                                               f"paths.checkpoint_dir={base}/checkpoints"])
run = train.train(cfg)
torch.save({name: {k: v.detach().clone() for k, v in m.state_dict().items()}
            for name, m in (("vae", run.vae), ("ema", run.ema), ("disc", run.disc))}, f"{out}/state{rank}.pt")
"""


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path, photos):
    """torchrun --nproc_per_node=2 on gloo: identical weights on both ranks, only rank 0 writes, and the
    checkpoint resumes in a single process."""
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    # batch 1: each rank reads 3 of the 6 photos per epoch, so with accumulation 2 the steps alternate between
    # 2 micro-batches (the first under no_sync) and 1.
    cfg = tiny(tmp_path / "work", photos, **{**RESUME, "training.max_steps": 4, "loss.disc_start_step": 2,
                                             "training.batch_size": 1, "checkpoint.save_every_n_steps": 2,
                                             "logging.val_check_interval": 2})
    args = [a for a in as_args(cfg) if not a.startswith("paths.")]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), str(tmp_path / "work"), str(tmp_path)] + args,
                       env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("device cpu x 2") == 1  # rank 0 prints, alone
    s0, s1 = load(tmp_path / "state0.pt"), load(tmp_path / "state1.pt")
    assert_same(s0["vae"], s1["vae"])
    assert_same(s0["ema"], s1["ema"])
    # Discriminator parameters are identical. Its BatchNorm running statistics are per rank on CPU (gloo has
    # no SyncBatchNorm) and unused (the discriminator always runs in training mode); DDP re-broadcasts rank
    # 0's at each forward.
    params = [k for k in s0["disc"] if "running_" not in k and "num_batches" not in k]
    assert_same({k: s0["disc"][k] for k in params}, {k: s1["disc"][k] for k in params})
    assert not os.path.exists(tmp_path / "work" / "rank1")
    ckpt = load(tmp_path / "work" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4 and ckpt["loop_state"]["world_size"] == 2
    assert len(ckpt["loop_state"]["rng_states"]) == 2  # every rank's random state, gathered on rank 0
    assert not torch.equal(ckpt["loop_state"]["rng_states"][0]["noise"],
                           ckpt["loop_state"]["rng_states"][1]["noise"])
    assert_same({k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("vae.")}, s0["vae"])
    assert os.listdir(tmp_path / "work" / "logs" / "vae_training") == ["version_0"]
    # resume in one process
    run = train.train(tiny(tmp_path / "work", photos, **{**RESUME, "training.max_steps": 6,
                                                         "training.batch_size": 1}),
                      resume_from_checkpoint="latest")
    assert run.state.step == 6 and run.world == 1
    assert load(tmp_path / "work" / "checkpoints" / "last.ckpt")["global_step"] == 6


# ------------------------------------------------------------------------------------- outputs and tags
def test_outputs_checkpoints_and_tensorboard_tags_are_the_contract(tmp_path, photos):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = tiny(tmp_path, photos, **{"training.ema_decay": 0.9, "loss.perceptual_weight": 0.1,
                                    "loss.random_lpips_backbone": True, "loss.disc_start_step": 2,
                                    "training.max_steps": 6, "checkpoint.save_every_n_steps": 2,
                                    "logging.val_check_interval": 3, "logging.log_images_every_n_steps": 3,
                                    "logging.num_val_images": 2})
    run = train.train(cfg)
    version = tmp_path / "logs" / "vae_training" / "version_0"
    assert sorted(os.listdir(tmp_path / "logs" / "vae_training")) == ["version_0"]
    ea = EventAccumulator(str(version), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    assert sorted(ea.Tags()["scalars"]) == sorted(STEP_TAGS + EXTRA_TAGS + VAL_TAGS)
    assert {"train/loss", "train/rec_loss", "train/p_loss", "train/kl_loss", "train/g_loss", "train/d_loss",
            "val/rec_loss", "val/psnr", "val/ssim", "val/lpips"} <= set(ea.Tags()["scalars"])
    assert sorted(ea.Tags()["images"]) == ["train/comparison", "val/reconstruction"]
    rec = ea.Images("val/reconstruction")
    assert [e.step for e in rec] == [3, 6] and (rec[0].height, rec[0].width) == (2 * 32, 2 * 32)  # 2 rows x 2
    assert [e.step for e in ea.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    d_loss = [e.value for e in ea.Scalars("train/d_loss")]
    assert d_loss[:2] == [0.0, 0.0] and all(v > 0 for v in d_loss[2:])  # the discriminator starts at step 2
    val = {e.step: e.value for e in ea.Scalars("val/rec_loss")}

    # Top-1 by val/rec_loss: the save at step 2 has no validation yet (Lightning saves no top-k file then),
    # the ones at 4 and 6 see the values of steps 3 and 6.
    best = 4 if val[3] <= val[6] else 6
    files = sorted(os.listdir(tmp_path / "checkpoints"))
    assert files == sorted(["hf_checkpoint", "last.ckpt",
                            f"vae-epoch={(best - 1) // 3:02d}-step={best:06d}.ckpt"])
    assert sorted(os.listdir(tmp_path / "checkpoints" / "hf_checkpoint")) == \
        ["config.json", "diffusion_pytorch_model.safetensors"]
    assert sorted(os.listdir(tmp_path / "outputs" / "final_model")) == \
        ["config.json", "diffusion_pytorch_model.safetensors"]

    ckpt = load(tmp_path / "checkpoints" / "last.ckpt")
    assert {"epoch", "global_step", "pytorch-lightning_version", "state_dict", "optimizer_states",
            "lr_schedulers",
            "hyper_parameters", "ema_state_dict", "loop_state"} == set(ckpt)
    assert (ckpt["global_step"], ckpt["epoch"]) == (6, 1)  # 3 steps per epoch: step 6 ends epoch 1
    assert {k.split(".")[0] for k in ckpt["state_dict"]} == {"vae", "discriminator", "loss"}
    assert len(ckpt["optimizer_states"]) == 2 and len(ckpt["lr_schedulers"]) == 2
    with open(version / "hparams.yaml") as f:
        # the resolved config, twice
        assert yaml.safe_load(f) == ckpt["hyper_parameters"] == train.asdict(cfg)
    assert list(ckpt["loop_state"]["top_k"]) == [f"vae-epoch={(best - 1) // 3:02d}-step={best:06d}.ckpt"]

    # The exported model: diffusers loads it with no missing/unexpected keys and gives our outputs; it holds
    # the EMA weights (different from the raw ones), as does hf_checkpoint/.
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    from vae import AutoencoderKL
    ref, info = DiffusersAutoencoderKL.from_pretrained(tmp_path / "outputs" / "final_model",
                                                       output_loading_info=True)
    assert not any(info.values()), info
    ours = AutoencoderKL.from_pretrained(tmp_path / "outputs" / "final_model")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours(x).sample, ref(x).sample, rtol=1e-5, atol=1e-5)
    assert_same(ours.state_dict(), run.ema.state_dict())
    assert_same(AutoencoderKL.from_pretrained(tmp_path / "checkpoints" / "hf_checkpoint").state_dict(),
                ckpt["ema_state_dict"])
    assert not torch.equal(ckpt["ema_state_dict"]["decoder.conv_out.weight"],
                           ckpt["state_dict"]["vae.decoder.conv_out.weight"])


def test_top_k_keeps_the_best_and_deletes_the_rest(tmp_path, photos):
    """save_top_k 2, mode max on val/psnr with a validation before every save: the two best steps' files
    remain."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = tiny(tmp_path, photos, **{"training.max_steps": 8, "loss.disc_weight": 0.0,
                                    "checkpoint.save_top_k": 2,
                                    "checkpoint.monitor": "val/psnr", "checkpoint.mode": "max",
                                    "checkpoint.save_every_n_steps": 1, "logging.val_check_interval": 1})
    train.train(cfg)
    ea = EventAccumulator(str(tmp_path / "logs" / "vae_training" / "version_0"), size_guidance={"scalars": 0})
    ea.Reload()
    psnr = {e.step: e.value for e in ea.Scalars("val/psnr")}
    assert sorted(psnr) == list(range(1, 9))
    best = sorted(sorted(psnr, key=lambda s: -psnr[s])[:2])
    expected = [f"vae-epoch={(s - 1) // 3:02d}-step={s:06d}.ckpt" for s in best]
    assert sorted(f for f in os.listdir(tmp_path / "checkpoints") if f.startswith("vae-")) == sorted(expected)
    assert set(load(tmp_path / "checkpoints" / "last.ckpt")["loop_state"]["top_k"]) == set(expected)


@pytest.mark.parametrize("top_k, monitor, kept", [(2, None, [3, 4]), (0, "val/rec_loss", []),
                                                  (-1, "val/rec_loss", [1, 2, 3, 4])])
def test_top_k_without_monitor_none_and_all(tmp_path, photos, top_k, monitor, kept):
    """monitor null keeps the newest k (Lightning's behaviour), save_top_k 0 none, -1 all; last.ckpt
    always."""
    cfg = tiny(tmp_path, photos, **{"training.max_steps": 4, "loss.disc_weight": 0.0,
                                    "checkpoint.save_top_k": top_k,
                                    "checkpoint.monitor": monitor, "checkpoint.save_every_n_steps": 1,
                                    "logging.val_check_interval": 1})
    train.train(cfg)
    expected = [f"vae-epoch={(s - 1) // 3:02d}-step={s:06d}.ckpt" for s in kept]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == sorted(expected + ["hf_checkpoint", "last.ckpt"])
    assert load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 4


def test_checkpoint_loads_with_lightning_load_from_checkpoint(tmp_path, photos):
    """The dict layout is Lightning's: a LightningModule with attributes vae / discriminator / loss and the
    config sections as init arguments loads it strictly."""
    L = pytest.importorskip("lightning")
    cfg = tiny(tmp_path, photos, **{"training.max_steps": 2})
    run = train.train(cfg)

    class Module(L.LightningModule):
        def __init__(self, **sections):
            super().__init__()
            self.save_hyperparameters()
            built = train.build_run(config_from_dict(sections), torch.device("cpu"))
            self.vae, self.discriminator, self.loss = built.vae, built.disc, built.loss_fn

    loaded = Module.load_from_checkpoint(str(tmp_path / "checkpoints" / "last.ckpt"), map_location="cpu")
    assert_same(loaded.vae.state_dict(), run.vae.state_dict())
    assert_same(loaded.discriminator.state_dict(), run.disc.state_dict())


# -------------------------------------------------------------------------------------- precision paths
def _changed_and_finite(before, model):
    after = model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    return any(not torch.equal(before[k], after[k]) for k in before)


def test_bf16_autocast_runs_on_cpu(tmp_path, photos):
    cfg = tiny(tmp_path, photos, **{"training.precision": "bf16-mixed", "training.max_steps": 4})
    init = {k: v.clone() for k, v in train.build_run(cfg, torch.device("cpu")).vae.state_dict().items()}
    run = train.train(cfg)
    assert run.scaler_vae.is_enabled() is False  # no loss scaling with bf16
    assert _changed_and_finite(init, run.vae) and run.state.nonfinite_total == 0
    with run.autocast():
        assert run.vae(torch.zeros(1, 3, 32, 32)).sample.dtype == torch.bfloat16


def _fp16_run(tmp_path, photos, device):
    """LDM's losses are sums over pixels, so the untrained VAE's fp16 weight gradients overflow at
    GradScaler's initial scale 2^16 (measured here: up to 2^6 still overflows): the first ~10 steps are
    skipped by the scaler while it backs off, then steps go through. Both paths run here."""
    over = {"training.precision": "16-mixed", "training.max_steps": 20, "loss.disc_start_step": 10}
    cfg = tiny(tmp_path, photos, **over)
    run = train.build_run(cfg, torch.device(device))
    assert run.scaler_vae.is_enabled() and run.scaler_disc.is_enabled()
    assert next(run.vae.parameters()).dtype == torch.float32  # fp32 master weights, never .half()
    init = {k: v.clone() for k, v in run.vae.state_dict().items()}
    run = train.train(cfg)
    assert _changed_and_finite(init, run.vae) and run.state.nonfinite_total == 0
    assert run.scaler_vae.get_scale() < 2.0 ** 16  # overflowing steps were skipped and the scale backed off
    scalers = load(tmp_path / "checkpoints" / "last.ckpt")["loop_state"]["grad_scalers"]
    assert [s["scale"] for s in scalers] == [run.scaler_vae.get_scale(), run.scaler_disc.get_scale()]
    resumed = train.train(tiny(tmp_path, photos, **{**over, "training.max_steps": 21}), "latest")
    assert resumed.state.step == 21 and resumed.scaler_vae.get_scale() > 0


@pytest.mark.slow  # (the quick run's fp16 path: test_train_plumbing's test_fp16_clips_the_unscaled_gradients)
def test_fp16_gradscaler_path_on_cpu(tmp_path, photos):
    """torch supports fp16 autocast and GradScaler on CPU: the whole fp16 path (scaled backward, unscale
    before clipping, adaptive GAN weight with grad_scale, scaler state in the checkpoint) runs here too."""
    _fp16_run(tmp_path, photos, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fp16 GradScaler path on a GPU needs CUDA")
def test_fp16_gradscaler_path_on_gpu(tmp_path, photos):
    _fp16_run(tmp_path, photos, "cuda")


# ------------------------------------------------------------------------------------ training semantics
def test_decoder_only_freezes_encoder_and_quant_conv(tmp_path, photos):
    cfg = tiny(tmp_path, photos, **{"training.decoder_only": True, "training.max_steps": 3})
    init = {k: v.clone() for k, v in train.build_run(cfg, torch.device("cpu")).vae.state_dict().items()}
    run = train.train(cfg)
    frozen = [k for k in init if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(init[k], run.vae.state_dict()[k]) for k in frozen)
    assert not torch.equal(init["decoder.conv_out.weight"], run.vae.decoder.conv_out.weight)
    in_optimizer = {id(p) for g in run.opt_vae.param_groups for p in g["params"]}
    frozen = list(run.vae.encoder.parameters()) + list(run.vae.quant_conv.parameters())
    assert not any(id(p) in in_optimizer for p in frozen)
    assert in_optimizer == {id(p) for p in run.vae.parameters() if p.requires_grad}


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step")  # the test wraps optimizer.step
def test_gradients_do_not_leak_between_vae_and_discriminator(photos):
    """In a step after disc_start_step, the VAE's gradient is exactly the generator loss's and the
    discriminator's exactly the discriminator loss's (recomputed here on copies taken before the step)."""
    cfg = tiny("/nonexistent", photos, **{"loss.disc_start_step": 0, "training.gradient_clip_val": None})
    run = train.build_run(cfg, torch.device("cpu"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    vae0, disc0 = copy.deepcopy(run.vae), copy.deepcopy(run.disc)
    noise0 = torch.Generator().manual_seed(0)
    noise0.set_state(run.noise.get_state())
    seen = {}
    for name, opt in (("vae", run.opt_vae), ("disc", run.opt_disc)):
        step = opt.step
        opt.step = lambda *a, _n=name, _o=opt, _s=step, **k: (seen.__setitem__(
            _n, [p.grad.clone() for g in _o.param_groups for p in g["params"]]), _s(*a, **k))[1]
    train.train_step(run, [{"pixel_values": x}], 0)

    out = vae0(x, sample_posterior=True, generator=noise0)
    g_loss, _ = run.loss_fn.generator_loss(x, out.sample, out.latent_dist, 0, discriminator=disc0,
                                           last_layer=vae0.decoder.conv_out.weight)
    ref_vae = torch.autograd.grad(g_loss, list(vae0.parameters()))
    d_loss, _ = run.loss_fn.discriminator_loss(disc0, x, out.sample.detach(), 0)
    ref_disc = torch.autograd.grad(d_loss, list(disc0.parameters()))
    for got, ref in ((seen["vae"], ref_vae), (seen["disc"], ref_disc)):
        assert len(got) == len(ref)
        for a, b in zip(got, ref):
            assert torch.equal(a, b)


def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path, photos, monkeypatch):
    original = losses.VAELoss.generator_loss
    bad_steps = {2}

    def generator_loss(self, inputs, reconstructions, posterior, global_step, **kw):
        loss, logs = original(self, inputs, reconstructions, posterior, global_step, **kw)
        return (loss * float("nan"), logs) if global_step in bad_steps else (loss, logs)

    monkeypatch.setattr(losses.VAELoss, "generator_loss", generator_loss)
    run = train.train(tiny(tmp_path / "one", photos, **{"training.max_steps": 5}))
    assert run.state.nonfinite_total == 1 and run.state.nonfinite == 0 and run.state.step == 5
    assert all(torch.isfinite(p).all() for p in run.vae.parameters())
    assert load(tmp_path / "one" / "checkpoints" / "last.ckpt")["loop_state"]["nonfinite_total"] == 1

    bad_steps.update(range(100))
    with pytest.raises(train.NonFiniteLossError, match="3 consecutive steps had a non-finite loss"):
        train.train(tiny(tmp_path / "all", photos, **{"training.max_steps": 5,
                                                      "training.max_consecutive_nonfinite": 3}))
