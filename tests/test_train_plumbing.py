"""train.py's optimisation plumbing checked against values computed here from first principles, never against
another run of the same code: a plain PyTorch loop written from LDM's formulas (AdamW, L2 summed per image +
KL, clipping, accumulation), the true gradient norm, fp16's unscaling, the EMA's closed form, the warm-up
formula, resume state field by field, and what a write that dies half-way leaves on disk. CPU, tiny models, 32
px.

Random images stand in for photos where only the arithmetic matters; posterior noise is drawn from a copy of
the run's own generator, so both sides see the same batches and the same noise in the same order.
"""
import copy
import io
import math
import os
import random
from dataclasses import asdict

import numpy as np
import pytest
import torch
from conftest import assert_same, tiny_config

import checkpoints
import train
from config import ConfigError, config_from_dict
from data import ResumableLoader, build_datasets

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:precision 16-mixed "
                                                                                "on CPU")]
CPU = torch.device("cpu")
REAL_TORCH_SAVE = torch.save  # (the atomic-write test replaces torch.save)
KL_WEIGHT = 0.1  # large enough that the KL term moves the weights of this tiny VAE (LDM's 1e-6 would hide it)


def make_cfg(workdir="/nonexistent", photos=("/nonexistent", "/nonexistent"), **overrides):
    """conftest.tiny_config (no discriminator unless asked) as a Config; step-level tests need no data."""
    return config_from_dict(tiny_config(workdir, photos, **{"loss.disc_weight": 0.0, **overrides}))


def batches(n, size=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.rand(size, 3, 32, 32, generator=g) * 2 - 1} for _ in range(n)]


def noise_like(run):
    """A generator in the state of the run's posterior-noise generator."""
    return torch.Generator().set_state(run.noise.get_state())


def steps_of(run, steps):
    """train.train_step over `steps` (lists of micro-batches) -> the logs of each step as floats."""
    logs = []
    for s, micro in enumerate(steps):
        out, skipped, _ = train.train_step(run, micro, s)
        assert not skipped
        logs.append({k: v.item() for k, v in out.items()})
    return logs


# ------------------------------------------------------------------------------------- the plain loop
def ldm_loss(vae, x, noise, kl_weight):
    """LDM's autoencoder loss written out: posterior sample mean + std * eps, L2 summed over each image's
    pixels and KL(q || N(0, I)) summed over each latent, both averaged over the batch (LDM's nll and kl
    reductions)."""
    posterior = vae.encode(x).latent_dist
    mean, logvar = posterior.mean, posterior.logvar  # (B, 4, 16, 16)
    z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=noise)
    rec = vae.decode(z).sample
    l2 = (x.float() - rec.float()).pow(2).sum() / len(x)
    kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float()).sum() / len(x)
    return l2 + kl_weight * kl


def plain_loop(vae, steps, noise, lr, clip, kl_weight=KL_WEIGHT):
    """AdamW(betas 0.5, 0.9, weight decay 0.01), the mean loss over a step's micro-batches, the global
    gradient norm clipped to `clip` (torch's clip_grad_norm_ rule: scale by clip / (norm + 1e-6) when that is
    < 1). Returns [(loss, gradient norm before clipping)] per step."""
    params = list(vae.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.5, 0.9), weight_decay=0.01, eps=1e-8, foreach=False)
    records = []
    for micro in steps:
        opt.zero_grad()
        total = 0.0
        for b in micro:
            loss = ldm_loss(vae, b["pixel_values"], noise, kl_weight) / len(micro)
            loss.backward()
            total += loss.item()
        norm = math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in params))
        if clip is not None and clip / (norm + 1e-6) < 1:
            for p in params:
                p.grad.mul_(clip / (norm + 1e-6))
        opt.step()
        records.append((total, norm))
    return records


@pytest.mark.parametrize("accumulate, clip", [(1, 1.0), (2, 1.0), (1, None)])
def test_train_step_equals_a_plain_pytorch_loop(accumulate, clip):
    """Precision 32, no LPIPS/GAN/EMA: weights, logged loss and logged grad_norm (the true norm before
    clipping) after 4 steps equal the plain loop's. With clip 1.0 clipping is active at every step (norms
    ~1e3); with clip None the update is plain AdamW's."""
    cfg = make_cfg(**{"loss.kl_weight": KL_WEIGHT, "training.accumulate_grad_batches": accumulate,
                      "training.gradient_clip_val": clip, "training.learning_rate": 1e-3})
    run = train.build_run(cfg, CPU)
    vae, noise = copy.deepcopy(run.vae), noise_like(run)
    steps = [batches(accumulate, seed=s) for s in range(4)]
    got = steps_of(run, steps)
    ref = plain_loop(vae, steps, noise, 1e-3, clip)
    for g, (loss, norm) in zip(got, ref):
        assert g["train/loss"] == pytest.approx(loss, rel=1e-5)
        assert g["train/grad_norm"] == pytest.approx(norm, rel=1e-4)
        assert norm > 10  # so clipping at 1.0 really acts
    # Attention key biases have an exactly zero gradient (softmax ignores a shift shared by all keys): Adam
    # turns the two sides' different float noise there into different +-lr steps, so those are left out.
    for (name, a), b in zip(run.vae.named_parameters(), vae.parameters()):
        if not name.endswith("to_k.bias"):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("clip", [1.0, None])
def test_accumulating_k_micro_batches_equals_one_batch_of_k_times_b(clip):
    """2 micro-batches of 2 images and one batch of the same 4 images (noise drawn in the same order): the
    same gradients (compared before the optimizer sees them: p.grad after clipping), logged norm and
    weights."""
    cfg = make_cfg(**{"training.gradient_clip_val": clip, "training.accumulate_grad_batches": 2})
    micro_run, batch_run = train.build_run(cfg, CPU), train.build_run(cfg, CPU)
    for s in range(2):
        micro = batches(2, seed=s)
        whole = [{"pixel_values": torch.cat([b["pixel_values"] for b in micro])}]
        a, _, _ = train.train_step(micro_run, micro, s)
        b, _, _ = train.train_step(batch_run, whole, s)
        assert a["train/grad_norm"].item() == pytest.approx(b["train/grad_norm"].item(), rel=1e-5)
        assert a["train/loss"].item() == pytest.approx(b["train/loss"].item(), rel=1e-5)
        for (name, p), q in zip(micro_run.vae.named_parameters(), batch_run.vae.parameters()):
            if not name.endswith("to_k.bias"):  # (see test_train_step_equals_a_plain_pytorch_loop)
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4 * q.grad.abs().max().item(),
                                           msg=name)
                torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_fp16_clips_the_unscaled_gradients():
    """fp16 autocast + GradScaler at scale 1/8: the logged grad_norm is the true (unscaled) gradient norm
    computed here by a manual unscale, and the gradients the optimizer gets are clipped to norm 1 in true
    units."""
    scale = 0.125  # small: the summed loss's fp16 gradients of an untrained VAE overflow at GradScaler's 2^16
    run = train.build_run(make_cfg(**{"training.precision": "16-mixed"}), CPU)
    run.scaler_vae = torch.amp.GradScaler("cpu", init_scale=scale)
    vae, noise = copy.deepcopy(run.vae), noise_like(run)
    x = batches(1)[0]["pixel_values"]
    logs, skipped, _ = train.train_step(run, [{"pixel_values": x}], 0)
    assert not skipped and run.scaler_vae.get_scale() == scale  # no overflow, no back-off
    with torch.autocast("cpu", dtype=torch.float16):
        out = vae(x, sample_posterior=True, generator=noise)
        loss, _ = run.loss_fn.generator_loss(x, out.sample, out.latent_dist, 0)
    (loss * scale).backward()
    true_norm = math.sqrt(sum((p.grad.double() / scale).pow(2).sum().item() for p in vae.parameters()))
    assert true_norm > 10
    assert logs["train/grad_norm"].item() == pytest.approx(true_norm, rel=1e-3)
    clipped = math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in run.vae.parameters()))
    assert clipped == pytest.approx(1.0, rel=1e-3)


# ------------------------------------------------------------------------------------------------- EMA
def test_ema_is_the_closed_form_warm_up_average():
    """ema_k = prod_s d_s * theta_0 + sum_j (1 - d_j) prod_{i>j} d_i * theta_{j+1}, d_s = min(decay,
    (1 + s) / (10 + s)) (diffusers' EMAModel warm-up), over the recorded weight trajectory theta_0..theta_k.
    decay 0.3: the warm-up governs the first 3 steps, the decay the last 3."""
    decay, k = 0.3, 6
    run = train.build_run(make_cfg(**{"training.ema_decay": decay}), CPU)
    trajectory = [[p.detach().double().clone() for p in run.vae.parameters()]]
    for s, micro in enumerate(batches(k, seed=1)):
        train.train_step(run, [micro], s)
        trajectory.append([p.detach().double().clone() for p in run.vae.parameters()])
    d = [min(decay, (1 + s) / (10 + s)) for s in range(k)]
    weights = [math.prod(d)] + [(1 - d[j]) * math.prod(d[j + 1:]) for j in range(k)]
    assert sum(weights) == pytest.approx(1.0)
    for i, p in enumerate(run.ema.parameters()):
        expected = sum(w * theta[i] for w, theta in zip(weights, trajectory))
        torch.testing.assert_close(p.double(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(run.ema.decoder.conv_out.weight, run.vae.decoder.conv_out.weight)


def test_validation_uses_the_ema_weights():
    """validate() with EMA on: its reconstructions are the EMA model's posterior mode (computed here), not the
    raw VAE's, and val/rec_loss is their mean per-pixel squared error."""
    run = train.build_run(make_cfg(**{"training.ema_decay": 0.5}), CPU)
    for s, micro in enumerate(batches(3, seed=2)):
        train.train_step(run, [micro], s)
    val = batches(2, seed=3)
    metrics, (shown, rec) = train.validate(run, val, num_images=4)
    x = torch.cat([b["pixel_values"] for b in val])
    with torch.no_grad():
        ema_rec, raw_rec = run.ema.decode(run.ema.encode(x).latent_dist.mean).sample, run.vae.eval()(x).sample
    torch.testing.assert_close(rec, ema_rec, rtol=1e-5, atol=1e-6)
    assert (rec - raw_rec).abs().max() > 1e-3
    assert metrics["val/rec_loss"] == pytest.approx((x - ema_rec).pow(2).mean().item(), rel=1e-5)
    assert torch.equal(shown, x)


# ------------------------------------------------------------------------------------------ schedules
@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_logged_learning_rates_follow_the_schedule_formula(schedule):
    """warmup_steps 3: the n-th VAE step (from 1) runs at lr * min(1, n / 3), times 1 (constant) or, for
    cosine, (1 + cos(pi * min(1, max(0, n - 1 - 3) / (max_steps - 3)))) / 2: 0 from step max_steps + 1 on; and
    logs it as train/lr. The discriminator, from disc_start_step 2, runs the same schedule counted from its
    own first step and logs 0 before it."""
    lr, disc_lr, warmup, start, max_steps = 1e-3, 2e-3, 3, 2, 7

    def factor(n):
        decay = 0.5 * (1 + math.cos(math.pi * min(1.0, max(0, n - 1 - warmup) / (max_steps - warmup))))
        return min(1.0, n / warmup) * (decay if schedule == "cosine" else 1.0)

    run = train.build_run(make_cfg(**{"training.warmup_steps": warmup, "training.learning_rate": lr,
                                      "training.disc_learning_rate": disc_lr, "loss.disc_weight": 1.0,
                                      "loss.disc_start_step": start, "training.max_steps": max_steps,
                                      "training.lr_schedule": schedule}), CPU)
    used = {"vae": [], "disc": []}
    for name, opt in (("vae", run.opt_vae), ("disc", run.opt_disc)):
        opt.register_step_pre_hook(lambda o, args, kwargs, _n=name: used[_n].append(o.param_groups[0]["lr"]))
    window = train.LogWindow()
    expected_vae, expected_disc = [], []
    for s, micro in enumerate(batches(max_steps + 2, seed=4)):  # past max_steps: cosine stays at 0
        logs, skipped, _ = train.train_step(run, [micro], s)
        window.add(logs)
        window.seconds = 1.0
        metrics = window.flush(run)
        expected_vae.append(lr * factor(s + 1))
        expected_disc.append(0.0 if s < start else disc_lr * factor(s - start + 1))
        assert metrics["train/lr"] == pytest.approx(expected_vae[-1], rel=1e-12, abs=1e-15), s
        assert metrics["train/disc_lr"] == pytest.approx(expected_disc[-1], rel=1e-12, abs=1e-15), s
    assert used["vae"] == pytest.approx(expected_vae, rel=1e-12, abs=1e-15)
    assert used["disc"] == pytest.approx(expected_disc[start:], rel=1e-12, abs=1e-15)
    if schedule == "cosine":  # the formula above, not the test, is what decays
        assert 0 < expected_vae[max_steps - 1] < lr and expected_vae[max_steps:] == [0, 0]


def test_cosine_schedule_needs_max_steps():
    with pytest.raises(ConfigError, match="training.lr_schedule"):
        make_cfg(**{"training.lr_schedule": "cosine", "training.max_steps": None})


# --------------------------------------------------------------------------------------------- resume
def live_state(run, loader=None):
    """Everything a resume must restore, read from the objects themselves."""
    return {"vae": run.vae.state_dict(), "disc": run.disc.state_dict(), "ema": run.ema.state_dict(),
            "opt_vae": run.opt_vae.state_dict(), "opt_disc": run.opt_disc.state_dict(),
            "sched_vae": run.sched_vae.state_dict(), "sched_disc": run.sched_disc.state_dict(),
            "scaler_vae": run.scaler_vae.state_dict(), "scaler_disc": run.scaler_disc.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "numpy": np.random.get_state(),
                    "noise": run.noise.get_state()},
            "loop": asdict(run.state), "data": loader.state_dict() if loader is not None else None}


def test_resume_restores_every_piece_of_state_and_fp16_keeps_its_scale(tmp_path, photos):
    """A 13-step fp16 run (EMA, discriminator from step 2, warm-up, accumulation 2: the data position is
    mid-epoch) ends with a checkpoint; a fresh run that loads it equals the finished run's live objects field
    by field (optimizers, schedulers, GradScalers, EMA, RNG streams, loop state; data position as saved), and
    the exported final model holds the EMA weights. A resumed step then starts from the saved fp16 scale."""
    over = {"training.precision": "16-mixed", "training.max_steps": 13, "training.ema_decay": 0.9,
            "training.warmup_steps": 3, "training.accumulate_grad_batches": 2, "loss.disc_weight": 1.0,
            "loss.disc_start_step": 2, "checkpoint.save_every_n_steps": 1000}
    cfg = make_cfg(tmp_path, photos, **over)
    run = train.train(cfg)
    finished = copy.deepcopy(live_state(run))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    saved_scale = ckpt["loop_state"]["grad_scalers"][0]["scale"]
    assert run.scaler_vae.get_scale() == saved_scale < 2.0 ** 16  # the scale backed off: not the default
    assert finished["opt_disc"]["state"] and finished["sched_disc"]["last_epoch"] > 0  # D has stepped

    from vae import AutoencoderKL
    exported = AutoencoderKL.from_pretrained(str(tmp_path / "outputs" / "final_model")).state_dict()
    assert_same(exported, finished["ema"])
    assert not torch.equal(exported["decoder.conv_out.weight"], finished["vae"]["decoder.conv_out.weight"])

    fresh = train.build_run(cfg, CPU)
    train_ds, _ = build_datasets(cfg.data)
    loader = ResumableLoader(train_ds, 2, shuffle=True, drop_last=True, seed=cfg.training.seed)
    # as train() does
    fresh.state.data_fingerprint = checkpoints.data_fingerprint(train_ds, cfg.data.train_data_dir)
    random.seed(7), np.random.seed(7), torch.manual_seed(7)  # nothing left equal by chance
    checkpoints.load_checkpoint(fresh, str(tmp_path / "checkpoints" / "last.ckpt"), loader)
    restored = live_state(fresh, loader)
    assert restored["data"] == ckpt["loop_state"]["data"] and restored["data"]["batches_consumed"] > 0
    finished["data"] = restored["data"]
    assert_same(restored, finished)

    resumed = train.train(make_cfg(tmp_path, photos, **{**over, "training.max_steps": 14}), "latest")
    assert resumed.state.step == 14
    assert resumed.scaler_vae.get_scale() in (saved_scale, saved_scale / 2)  # one step from the saved scale


# --------------------------------------------------------------------------------------- atomic writes
def dies_half_way(serialise):
    """A writer that writes the first half of the real bytes under the name it is given, then fails (a crash
    or a full disk mid-write)."""
    def write(obj, path, *args, **kwargs):
        data = serialise(obj, *args, **kwargs)
        with open(path, "wb") as f:
            f.write(data[:len(data) // 2])
        raise OSError("simulated failure half-way through a write")
    return write


def folder_bytes(folder):
    """{relative path: bytes} of every file under `folder`."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                files[os.path.relpath(os.path.join(root, name), folder)] = f.read()
    return files


def torch_bytes(obj, *args, **kwargs):
    buf = io.BytesIO()
    REAL_TORCH_SAVE(obj, buf)
    return buf.getvalue()


def test_a_write_that_dies_half_way_leaves_the_previous_file(tmp_path, photos, monkeypatch):
    """Checkpoints (torch.save), exports (save_pretrained's safetensors) and infer.py's outputs (images,
    latents): after a write fails half-way the previous file is intact, and with no previous file nothing is
    left under the final name (no temporary files either)."""
    import safetensors.torch
    from PIL import Image

    import infer
    import latents
    cfg = make_cfg(tmp_path, photos, **{"training.max_steps": 1})
    run = train.train(cfg)
    ckpt_dir = tmp_path / "checkpoints"
    before = folder_bytes(ckpt_dir)
    monkeypatch.setattr(torch, "save", dies_half_way(torch_bytes))
    import checkpoints
    with pytest.raises(checkpoints.SaveError, match="simulated"):  # the OSError, named with its folder
        train.train(make_cfg(tmp_path, photos, **{"training.max_steps": 2}), "latest")
    assert folder_bytes(ckpt_dir) == before  # last.ckpt as it was, no temporary file
    monkeypatch.undo()

    export = tmp_path / "export"
    run.vae.save_pretrained(str(export))
    before = folder_bytes(export)
    with torch.no_grad():
        run.vae.decoder.conv_out.weight.add_(1.0)
    monkeypatch.setattr(safetensors.torch, "save_file", dies_half_way(
        lambda tensors, metadata=None: safetensors.torch.save(tensors, metadata=metadata)))
    with pytest.raises(OSError, match="simulated"):
        run.vae.save_pretrained(str(export))
    weights = "diffusion_pytorch_model.safetensors"
    assert folder_bytes(export)[weights] == before[weights]
    assert sorted(os.listdir(export)) == sorted(before)

    out = tmp_path / "infer"
    pixels = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    infer.save_image(str(out / "a.png"), pixels)
    before = folder_bytes(out)
    real_save = Image.Image.save

    def png_bytes(img, fp=None, format=None, **options):
        buf = io.BytesIO()
        real_save(img, buf, format=format, **options)
        return buf.getvalue()
    monkeypatch.setattr(Image.Image, "save", lambda img, fp, *a, **k: dies_half_way(png_bytes)(img, fp, *a,
                                                                                               **k))
    for name in ("a.png", "b.png"):  # over a previous file, and a new one
        with pytest.raises(OSError, match="simulated"):
            infer.save_image(str(out / name), pixels)
    assert folder_bytes(out) == before
    monkeypatch.setattr(torch, "save", dies_half_way(torch_bytes))
    with pytest.raises(OSError, match="simulated"):
        latents.save_latent(str(out / "z.pt"), torch.zeros(4, 2, 2), {"scaling_factor": 0.18215})
    assert folder_bytes(out) == before
