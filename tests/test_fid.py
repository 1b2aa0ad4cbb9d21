"""Tests for fid.py: the Fréchet distance against pytorch-fid's scipy-based formula and closed forms, the FID
Inception against pytorch-fid's network on the same random weights (loaded from the cache path pytorch-fid
uses), the missing-weights error, latent statistics of a model whose latent distribution is known by
construction, and the config.json writer (only the latent keys change, a backup is kept, diffusers loads it).

Run: python -m pytest tests/test_fid.py -q
"""
import functools
import json
import math
import os
import sys

import numpy as np
import pytest
import pytorch_fid.inception as pf
import torch
from conftest import ROOT, TINY

import fid
from data import UserError, one_line
from fid import FeatureStats, FIDInception, InceptionWeightsError, frechet_distance, latent_statistics
from vae import AutoencoderKL

pytestmark = pytest.mark.usefixtures("one_thread")
INCEPTION_FILENAME = os.path.basename(pf.FID_WEIGHTS_URL)  # pt_inception-2015-12-05-6726825d.pth
UNREACHABLE_URL = "http://127.0.0.1:9/" + INCEPTION_FILENAME  # discard port: refused at once, offline


def features(n, dim, seed, offset=0.0):
    """Correlated, non-negative-mean features (n, dim) in float64, like pooled activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g, dtype=torch.float64) * 0.1
    return torch.randn(n, dim, generator=g, dtype=torch.float64) @ mix + 1.0 + offset


def stats_of(f):
    s = FeatureStats(dim=f.shape[1])
    for chunk in f.split(7):  # streamed in uneven batches, as add() sees them
        s.add_features(chunk)
    return s


# ----------------------------------------------------------------------------- Fréchet distance
@pytest.mark.parametrize("n1, n2, dim", [(300, 400, 64), (40, 60, 128)])  # full rank; fewer images than dims
def test_frechet_distance_matches_pytorch_fid(n1, n2, dim):
    from pytorch_fid.fid_score import calculate_frechet_distance
    a, b = features(n1, dim, 0), features(n2, dim, 1, offset=0.1)
    sa, sb = stats_of(a), stats_of(b)
    mu, cov = sa.mean_cov()
    assert torch.allclose(mu, a.mean(0), rtol=1e-12)
    assert np.allclose(cov, np.cov(a, rowvar=False), rtol=1e-10, atol=1e-14)
    ref = calculate_frechet_distance(a.mean(0).numpy(), np.cov(a, rowvar=False),
                                     b.mean(0).numpy(), np.cov(b, rowvar=False))
    assert sa.frechet_distance(sb) == pytest.approx(ref, rel=1e-6)
    assert sb.frechet_distance(sa) == pytest.approx(ref, rel=1e-6)  # symmetric


@pytest.mark.parametrize("n, dim", [(500, 64), (24, 256)])
def test_frechet_distance_closed_forms(n, dim):
    """Identical sets: 0. Shifted by d: ||d||^2. Scaled by c: ||(1 - c) mu||^2 + (1 - c)^2 tr(S). Also with
    fewer images than dimensions (rank-deficient covariances, where sqrtm-based code needs an offset)."""
    a = features(n, dim, 2)
    sa = stats_of(a)
    assert sa.frechet_distance(stats_of(a.clone())) == pytest.approx(0.0, abs=1e-6)
    d = torch.linspace(-0.2, 0.3, dim, dtype=torch.float64)
    assert sa.frechet_distance(stats_of(a + d)) == pytest.approx(float(d @ d), rel=1e-9)
    c = 1.7
    mu, cov = sa.mean_cov()
    closed = float((1 - c) ** 2 * (mu @ mu + torch.trace(cov)))
    assert frechet_distance(mu, cov, c * mu, c * c * cov) == pytest.approx(closed, rel=1e-9)


def test_frechet_distance_rank_deficient_exact():
    """Fewer images than dimensions, different sets: against the distance computed from the features
    themselves (S^1/2 = V diag(s) V^T / sqrt(n - 1) from the SVD of the centred features, exactly rank n - 1),
    to a tolerance met only if the covariances' numerically-zero eigenvalues count as zero (pytorch-fid's
    sqrtm misses it)."""
    a, b = features(24, 256, 5), features(30, 256, 6, offset=0.1)

    def half(x):  # (rank n - 1 basis (r, dim), singular values / sqrt(n - 1))
        _, s, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
        return vh[:len(x) - 1], s[:len(x) - 1] / math.sqrt(len(x) - 1)
    (v1, s1), (v2, s2) = half(a), half(b)
    cross = torch.linalg.svdvals(s1[:, None] * (v1 @ v2.T) * s2[None]).sum()
    d = a.mean(0) - b.mean(0)
    exact = float(d @ d + s1.square().sum() + s2.square().sum() - 2 * cross)
    assert stats_of(a).frechet_distance(stats_of(b)) == pytest.approx(exact, rel=1e-12)


def test_fid_needs_two_images_per_set():
    one = stats_of(features(1, 8, 3))
    with pytest.raises(UserError, match="at least 2 images .*got 1"):
        one.frechet_distance(stats_of(features(5, 8, 4)))


# ----------------------------------------------------------------------------- the Inception network
def random_inception_state(seed=0):
    """pt_inception-shaped random weights (torchvision's Inception-v3 keys with the 1008-way classifier, which
    pytorch-fid loads strictly) with activations of order 1 through all 94 conv layers: He-normal convs,
    non-trivial BatchNorm statistics."""
    import torchvision
    with torch.device("meta"):  # shapes only; pytorch-fid's FID blocks keep torchvision's parameters
        net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008,
                                              init_weights=False)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in net.state_dict().items():
        if k.endswith("conv.weight"):
            state[k] = torch.randn(v.shape, generator=g) * math.sqrt(2.0 / v[0].numel())
        elif k.endswith(("bn.weight", "bn.running_var")):
            state[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith(("bn.bias", "bn.running_mean")):
            state[k] = 0.1 * torch.randn(v.shape, generator=g)
        elif k == "fc.weight":
            state[k] = 0.01 * torch.randn(v.shape, generator=g)
        else:  # fc.bias, num_batches_tracked
            state[k] = torch.zeros(v.shape, dtype=v.dtype)
    return state


def write_random_inception(torch_home):
    path = torch_home / "hub" / "checkpoints" / INCEPTION_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_inception_state(), path)
    return path


@pytest.fixture(scope="module")
def inception_home(tmp_path_factory):
    """A TORCH_HOME whose cache holds random pt_inception-shaped weights, written once for the module."""
    home = tmp_path_factory.mktemp("torch_home")
    write_random_inception(home)
    return home


@pytest.fixture(scope="module")
def inception(inception_home):
    """FIDInception.pretrained() on those weights, built once for the module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(inception_home))
        return FIDInception.pretrained()


def offline_inception(monkeypatch):
    monkeypatch.setattr(pf, "FID_WEIGHTS_URL", UNREACHABLE_URL)  # a download attempt fails at once


def test_inception_is_pytorch_fids_on_cached_random_weights(inception_home, inception, monkeypatch):
    """Random weights saved where pytorch-fid caches pt_inception: FIDInception is built from there offline,
    and on images in [-1, 1] gives the features pytorch-fid's InceptionV3 gives on them in [0, 1]."""
    monkeypatch.setenv("TORCH_HOME", str(inception_home))
    offline_inception(monkeypatch)
    assert fid.inception_weights_path(pf.FID_WEIGHTS_URL) == str(inception_home / "hub" / "checkpoints" /
                                                                  INCEPTION_FILENAME)
    ref = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()  # reads the same cached file
    x = torch.rand(2, 3, 48, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1  # resized to 299 by both
    with torch.no_grad():
        expected = ref((x + 1) / 2)[0].flatten(1)  # pytorch-fid takes [0, 1]
        got = inception(x)
    assert got.shape == (2, 2048) and expected.abs().max() > 0.1  # the random network did not collapse
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    inception.train()
    assert not inception.training and not any(p.requires_grad for p in inception.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert inception(x).dtype == torch.float32


@pytest.mark.slow  # scipy's sqrtm of a singular 2048 x 2048 product, retried with an offset
def test_rfid_equals_pytorch_fid_on_the_same_features(inception):
    """FeatureStats fed images (in two batches) gives the Fréchet distance pytorch-fid's
    calculate_frechet_distance gives on the same 2048-d Inception features."""
    from pytorch_fid.fid_score import calculate_frechet_distance
    g = torch.Generator().manual_seed(2)
    real = torch.rand(8, 3, 32, 32, generator=g) * 2 - 1
    recon = real + 0.3 * torch.randn(real.shape, generator=g)
    seen = []

    def recorded(x):
        seen.append(inception(x))
        return seen[-1]
    stats = [FeatureStats(recorded, device="cpu") for _ in range(2)]
    for s, images in zip(stats, (real, recon)):
        for batch in images.split(5):
            s.add(batch)
    a, b = (torch.cat(f).double().numpy() for f in (seen[:2], seen[2:]))
    ref = calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert ref > 1.0  # random features of different images: far from 0
    assert stats[1].frechet_distance(stats[0]) == pytest.approx(ref, rel=1e-4)


def test_feature_stats_add_scores_images_as_8_bit_files():
    """add() rounds float images to the 8-bit values a saved file would hold (and clamps them), so a float
    reconstruction and its uint8 version have the same features."""
    calls = []

    def first_six(x):
        calls.append(x)
        return x.flatten(1)[:, :6]
    stats = FeatureStats(inception=first_six, dim=6, device="cpu")
    u8 = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    as_float = u8.float() / 127.5 - 1 + 0.3 / 255  # off the 8-bit grid by less than half a level
    as_float[0, 0, 0, 0] = 1.5  # out of range: clamped
    stats.add(as_float)
    stats.add(u8)
    expected = u8.float() / 127.5 - 1
    expected[0, 0, 0, 0] = 1.0
    assert torch.allclose(calls[0], expected, atol=1e-6) and torch.allclose(calls[1], u8.float() / 127.5 - 1)
    assert stats.n == 4


def test_missing_inception_weights_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    offline_inception(monkeypatch)
    with pytest.raises(InceptionWeightsError) as err:
        FIDInception.pretrained()
    msg = one_line(err.value)
    assert isinstance(err.value, UserError) and msg == str(err.value) and "\n" not in msg
    assert INCEPTION_FILENAME in msg and UNREACHABLE_URL in msg and "$TORCH_HOME/hub/checkpoints/" in msg
    assert str(tmp_path / "hub" / "checkpoints") in msg and fid.NO_RFID in msg
    assert os.listdir(tmp_path / "hub" / "checkpoints") == []  # no partial download left behind


def test_unreadable_or_wrong_inception_weights(tmp_path, monkeypatch, inception_home):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    offline_inception(monkeypatch)
    path = tmp_path / "hub" / "checkpoints" / INCEPTION_FILENAME
    path.parent.mkdir(parents=True)
    path.write_bytes(b"<html>proxy error page, not a checkpoint</html>")
    with pytest.raises(InceptionWeightsError, match="cannot read .*pt_inception") as err:
        FIDInception.pretrained()
    assert "\n" not in str(err.value) and fid.NO_RFID in str(err.value)
    state = torch.load(inception_home / "hub" / "checkpoints" / INCEPTION_FILENAME, weights_only=True)
    state["Mixed_7c.branch_pool.conv.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(state, path)
    with pytest.raises(InceptionWeightsError, match="not .*pytorch-fid's .*Mixed_7c.branch_pool.conv.weight"):
        FIDInception.pretrained()


def hide_pytorch_fid(monkeypatch):
    for name in ("pytorch_fid", "pytorch_fid.inception", "pytorch_fid.fid_score"):
        monkeypatch.setitem(sys.modules, name, None)  # `import pytorch_fid...` raises ImportError


def test_without_pytorch_fid_one_line_says_what_to_install(tmp_path, monkeypatch, capsys, photos,
                                                           inception_home):
    """pytorch-fid is optional: without it, --rfid on and logging.val_rfid fail in one line naming the
    requirements file; --rfid auto says rFID is unavailable, and why, and the rest of --eval runs."""
    from conftest import tiny_config

    import train
    from config import config_from_dict
    assert "pytorch-fid" in open(os.path.join(ROOT, "requirements-fid.txt")).read()
    monkeypatch.setenv("TORCH_HOME", str(inception_home))  # the weights are there: only the package is not
    hide_pytorch_fid(monkeypatch)
    install = "rFID needs pytorch-fid: pip install -r requirements-fid.txt"
    with pytest.raises(InceptionWeightsError, match=install):
        FIDInception.pretrained()
    folder = tmp_path / "vae"
    AutoencoderKL(**TINY).save_pretrained(folder)
    base = ["--model_path", folder, "--input", photos[1], "--eval", "--lpips", "off", "--rfid"]
    rc, out, err = run_infer(base + ["on", "--output", tmp_path / "ev"], capsys)
    assert rc == 1 and err.startswith(f"error: rFID unavailable: {install}") and len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / "ev" / "metrics.csv")
    assert not os.path.exists(tmp_path / "ev" / "reconstructions")
    rc, out, err = run_infer(base + ["auto", "--output", tmp_path / "ev2"], capsys)
    assert rc == 0 and f"rFID         unavailable: {install}" in out
    cfg = config_from_dict(tiny_config(tmp_path, photos, **{"logging.val_rfid": True}))
    with pytest.raises(train.StartupError, match=install):
        train.train(cfg)


def test_auto_uses_present_weights_only_and_on_downloads(tmp_path, monkeypatch):
    """--lpips auto and --rfid auto alike: weights missing, no download is tried and the metric is reported
    unavailable; `on` tries the download and fails in one line when it fails."""
    import losses
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    tried = []

    def download(url, dst, hash_prefix=None, progress=True):
        tried.append(url)
        raise OSError("offline")
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    auto = fid.Evaluator("auto", "auto", "cpu", 0)
    assert auto.lpips is None and auto.fid is None and tried == []
    assert "no download tried" in auto.lpips_reason and "no download tried" in auto.fid_reason
    for metric, modes in (("LPIPS", ("on", "off")), ("rFID", ("off", "on"))):
        with pytest.raises(UserError, match=f"^{metric} unavailable: .*download .* failed: OSError: offline"):
            fid.Evaluator(*modes, "cpu", 0)
    assert tried == [losses.VGG16_URL, pf.FID_WEIGHTS_URL]



def test_eval_thresholds_rfid_n_and_thumbnail_aspect(tmp_path, monkeypatch, capsys, inception_home):
    """The thresholds of the --eval table and grid: rFID is n/a below N = 2 (and computed from 2: the slow
    tests); a thumbnail keeps its aspect up to 4:1 and is at least 1 px wide."""
    monkeypatch.setenv("TORCH_HOME", str(inception_home))
    evaluator = fid.Evaluator("off", "on", "cpu", grid_images=1)
    pixels = torch.randint(0, 256, (3, 16, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    evaluator.add(0, "a.png", pixels, pixels)
    evaluator.finish(str(tmp_path))
    out = capsys.readouterr().out
    assert "rFID         n/a (needs N >= 2 images)" in out and evaluator.fid[0].n == 1
    assert os.path.isfile(tmp_path / "grid.png")
    blank = lambda h, w: torch.zeros(3, h, w, dtype=torch.uint8)  # noqa: E731
    assert fid.thumbnail(blank(10, 20), 8).size == (16, 8)
    assert fid.thumbnail(blank(10, 100), 8).size == (32, 8)  # 80 px at that height: capped at 4 x 8
    assert fid.thumbnail(blank(100, 1), 8).size == (1, 8)  # 0.08 px: at least 1

# ----------------------------------------------------------------------------- latent statistics
def model_with_known_latents(channel_mean, sigma):
    """A tiny VAE whose posterior is N(channel_mean[c], sigma^2) for every image and position: quant_conv maps
    everything to constant moments (zero weights; biases = means and log-variances)."""
    torch.manual_seed(0)
    model = AutoencoderKL(**TINY).eval()
    with torch.no_grad():
        model.quant_conv.weight.zero_()
        model.quant_conv.bias.copy_(torch.tensor(list(channel_mean) + [2 * math.log(sigma)] * 4))
    return model


def test_latent_statistics_recover_known_scale():
    means, sigma = [-1.0, 0.5, 0.0, 1.5], 0.5
    model = model_with_known_latents(means, sigma)
    images = torch.rand(9, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batches = list(images.split(3))  # 3 + 3 + 2 of them are used
    stats = latent_statistics(model, batches, num_images=8)
    m = torch.tensor(means)
    true_std = math.sqrt(sigma ** 2 + float(m.var(unbiased=False)))  # mixture of the four channels
    assert stats.num_images == 8
    assert stats.scaling_factor == pytest.approx(1 / true_std, rel=0.01)
    assert stats.mean == pytest.approx(float(m.mean()), abs=0.01)
    assert stats.channel_mean == pytest.approx(means, abs=0.02)
    assert stats.channel_std == pytest.approx([sigma] * 4, rel=1e-3)  # in expectation: no sampling noise
    mode = latent_statistics(model, batches, num_images=8, sample=False)  # the mode: the means alone
    assert mode.std == pytest.approx(math.sqrt(float(m.var(unbiased=False))), rel=1e-3)
    assert mode.channel_std == pytest.approx([0.0] * 4, abs=1e-6)
    assert "scaling_factor" in stats.summary() and stats.summary().count("channel") == 4
    with pytest.raises(UserError, match="no images"):
        latent_statistics(model, [], num_images=8)


def test_dataset_latent_statistics_with_a_redrawing_progress_bar(monkeypatch, capsys, photos):
    """The progress bar redraws after every batch (tqdm's 0.1 s interval forced to 0, as any run longer than
    0.1 s crosses it), where update() returns True: the statistics must not see that return value."""
    from tqdm import tqdm
    monkeypatch.setattr(fid, "tqdm", functools.partial(tqdm, mininterval=0, miniters=1))
    model = model_with_known_latents([-0.5, 0.25, 0.0, 1.0], 0.4)
    expected = latent_statistics(model, [photo_batch(photos[0], 32)])
    for batch_size in (1, 2, 16):
        stats = fid.dataset_latent_statistics(model, fid.image_dataset(photos[0], 32), batch_size=batch_size,
                                              progress=True)
        assert stats.num_images == 6 and stats.std == pytest.approx(expected.std, rel=1e-9)
        assert stats.channel_mean == pytest.approx(expected.channel_mean, rel=1e-9)
        assert "6/6" in capsys.readouterr().err  # the bar was drawn


def test_write_latent_config_changes_only_those_keys(tmp_path):
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    model = model_with_known_latents([0.2, 0.1, 0.0, -0.1], 0.3)
    stats = latent_statistics(model, [torch.zeros(2, 3, 32, 32)])
    folder = tmp_path / "vae"
    AutoencoderKL(**TINY).save_pretrained(folder)
    before = (folder / "config.json").read_bytes()
    updates = stats.config_updates(shift=True)
    assert set(updates) == {"scaling_factor", "shift_factor"}
    assert set(stats.config_updates()) == {"scaling_factor"}
    backup = fid.write_latent_config(folder, updates)
    assert open(backup, "rb").read() == before
    old, new = json.loads(before), json.loads((folder / "config.json").read_text())
    assert list(new) == list(old)  # same keys, same order
    assert {k: v for k, v in new.items() if old[k] != v} == updates
    assert updates["scaling_factor"] == pytest.approx(stats.scaling_factor, rel=1e-4)
    loaded = DiffusersAutoencoderKL.from_pretrained(folder)
    assert loaded.config.scaling_factor == updates["scaling_factor"]
    assert loaded.config.shift_factor == updates["shift_factor"]
    assert AutoencoderKL.from_pretrained(folder).config["scaling_factor"] == updates["scaling_factor"]
    assert sorted(os.listdir(folder)) == ["config.json", "config.json.bak",
                                          "diffusion_pytorch_model.safetensors"]


def test_write_latent_config_bad_folder(tmp_path):
    with pytest.raises(UserError, match="cannot read the model's config .*config.json") as err:
        fid.write_latent_config(tmp_path, {"scaling_factor": 0.2})
    assert "\n" not in str(err.value) and os.listdir(tmp_path) == []
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="not a model config"):
        fid.write_latent_config(tmp_path, {"scaling_factor": 0.2})
    assert os.listdir(tmp_path) == ["config.json"]


# ----------------------------------------------------------------------------- infer.py and train.py
def run_infer(argv, capsys):
    import infer
    rc = infer.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def moments_std(model, images):
    """The latents' unbiased std in expectation over posterior samples, computed here from mu and var."""
    with torch.no_grad():
        dist = model.encode(images).latent_dist
    mu, var = dist.mean.double(), dist.var.double()
    n = mu.numel()
    return math.sqrt(float((mu * mu + var).sum() - n * mu.mean() ** 2) / (n - 1))


def photo_batch(folder, resolution):
    from data import SDTransform, find_images, load_image
    tf = SDTransform(resolution, center_crop=True, random_flip=False)
    return torch.stack([tf(load_image(p)) for p in find_images(folder)])


def test_latent_stats_cli_prints_and_writes_the_factor(tmp_path, capsys, photos):
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    model = model_with_known_latents([-0.5, 0.25, 0.0, 1.0], 0.4)
    folder = tmp_path / "vae"
    model.save_pretrained(folder)
    before = json.loads((folder / "config.json").read_text())
    std = moments_std(model, photo_batch(photos[0], 32))
    base = ["--model_path", folder, "--input", photos[0], "--latent_stats", "--resolution", 32,
            "--batch_size", 4]
    rc, out, err = run_infer(base, capsys)
    assert rc == 0, err
    assert f"std {std:.5g}" in out and f"suggested scaling_factor {1 / std:.5g} (1/std)" in out
    assert out.count("channel") == 4 and "latents of 6 images" in out
    assert sorted(os.listdir(folder)) == ["config.json", "diffusion_pytorch_model.safetensors"]  # unwritten
    rc, out, err = run_infer(base + ["--write_config", "--shift_factor"], capsys)
    assert rc == 0, err
    after = json.loads((folder / "config.json").read_text())
    changed = {k: v for k, v in after.items() if before[k] != v}
    assert list(after) == list(before) and set(changed) == {"scaling_factor", "shift_factor"}
    assert changed["scaling_factor"] == pytest.approx(1 / std, rel=1e-4)
    assert json.loads((folder / "config.json.bak").read_text()) == before
    assert DiffusersAutoencoderKL.from_pretrained(folder).config.scaling_factor == changed["scaling_factor"]


@pytest.mark.parametrize("model_path", ["stabilityai/sd-vae-ft-mse", "model.safetensors"])
def test_latent_stats_write_config_needs_a_local_folder(tmp_path, capsys, photos, model_path):
    path = tmp_path / model_path if model_path.endswith(".safetensors") else model_path
    if model_path.endswith(".safetensors"):
        path.write_bytes(b"not read: refused before loading")
    rc, out, err = run_infer(["--model_path", path, "--input", photos[0], "--latent_stats", "--write_config"],
                             capsys)
    assert rc == 1 and err.startswith("error: --write_config needs a local diffusers folder")
    assert len(err.strip().splitlines()) == 1 and out == ""
    assert os.listdir(tmp_path) == ([model_path] if model_path.endswith(".safetensors") else [])


def test_eval_rfid_missing_weights(tmp_path, capsys, monkeypatch, photos):
    """--rfid on: one line, exit 1, nothing written. auto: reported unavailable, no download tried."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    offline_inception(monkeypatch)
    folder = tmp_path / "vae"
    AutoencoderKL(**TINY).save_pretrained(folder)
    base = ["--model_path", folder, "--input", photos[1], "--eval", "--lpips", "off", "--rfid"]
    rc, out, err = run_infer(base + ["on", "--output", tmp_path / "ev"], capsys)
    assert rc == 1 and err.startswith("error: rFID unavailable: rFID needs pytorch-fid's Inception weights")
    assert len(err.strip().splitlines()) == 1 and INCEPTION_FILENAME in err
    assert not os.path.exists(tmp_path / "ev" / "metrics.csv")
    assert not os.path.exists(tmp_path / "ev" / "reconstructions")
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("auto downloaded"))
    rc, out, err = run_infer(base + ["auto", "--output", tmp_path / "ev2"], capsys)
    assert rc == 0, err
    assert "rFID         unavailable: " in out and "no download tried" in out
    assert os.path.isfile(tmp_path / "ev2" / "metrics.csv")


SLOW_FID = pytest.mark.slow  # two 2048-d Fréchet distances, each 2048 x 2048 float64 eigh and SVD


@SLOW_FID
def test_eval_reports_rfid_and_n(tmp_path, capsys, monkeypatch, photos, inception_home, inception):
    """rFID of the 8-bit originals against the 8-bit reconstructions the CLI wrote, recomputed here."""
    from data import find_images, load_image
    monkeypatch.setenv("TORCH_HOME", str(inception_home))
    folder = tmp_path / "vae"
    AutoencoderKL(**TINY).save_pretrained(folder)
    rc, out, err = run_infer(["--model_path", folder, "--input", photos[1], "--output", tmp_path / "ev",
                              "--eval", "--lpips", "off", "--rfid", "on"], capsys)
    assert rc == 0, err
    real, recon = FeatureStats(inception), FeatureStats(inception)
    for path in find_images(photos[1]):
        for stats, p in ((real, path), (recon, tmp_path / "ev" / "reconstructions" / os.path.basename(path))):
            stats.add(torch.from_numpy(np.array(load_image(str(p)))).permute(2, 0, 1)[None])
    assert real.n == 2
    assert f"rFID         {recon.frechet_distance(real):10.3f} (N=2; biased upwards at small N)" in out


def test_train_val_rfid_needs_the_weights_and_logs_latent_std(tmp_path, monkeypatch, photos):
    """logging.val_rfid without the weights stops at startup in one line; val/latent_std is the latents'
    std."""
    from conftest import tiny_config

    import train
    from config import config_from_dict
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    offline_inception(monkeypatch)
    settings = {"training.max_steps": 2, "logging.val_check_interval": 2}
    cfg = config_from_dict(tiny_config(tmp_path, photos, **settings, **{"logging.val_rfid": True}))
    with pytest.raises(train.StartupError, match="rFID needs pytorch-fid's Inception weights"):
        train.train(cfg)
    metrics = train.train(config_from_dict(tiny_config(tmp_path, photos, **settings))).state.metrics
    assert "val/rfid" not in metrics
    model = AutoencoderKL.from_pretrained(tmp_path / "outputs" / "final_model").eval()
    x = photo_batch(photos[1], 32)
    n = model.encode(x).latent_dist.mean.numel()
    biased = moments_std(model, x) * math.sqrt((n - 1) / n)
    assert metrics["val/latent_std"] == pytest.approx(biased, rel=1e-4)


@SLOW_FID
def test_train_logs_val_rfid(tmp_path, monkeypatch, photos, inception_home, inception):
    from conftest import tiny_config

    import train
    from config import config_from_dict
    monkeypatch.setenv("TORCH_HOME", str(inception_home))
    cfg = config_from_dict(tiny_config(tmp_path, photos, **{"logging.val_rfid": True, "training.max_steps": 2,
                                                            "logging.val_check_interval": 2}))
    metrics = train.train(cfg).state.metrics
    model = AutoencoderKL.from_pretrained(tmp_path / "outputs" / "final_model").eval()
    x = photo_batch(photos[1], 32)
    real, recon = FeatureStats(inception), FeatureStats(inception)
    real.add(x)
    with torch.no_grad():
        recon.add(model(x).sample)
    assert metrics["val/rfid"] == pytest.approx(recon.frechet_distance(real), rel=1e-4)


def test_train_estimates_the_scaling_factor_at_export(tmp_path, photos):
    from conftest import tiny_config

    import train
    from config import config_from_dict
    cfg = config_from_dict(tiny_config(tmp_path, photos, **{"model.estimate_scaling_factor": True,
                                                            "training.max_steps": 2, "data.center_crop": True,
                                                            "data.random_flip": False,
                                                            "checkpoint.save_every_n_steps": 2}))  # and again
    train.train(cfg)
    final = tmp_path / "outputs" / "final_model"
    std = moments_std(AutoencoderKL.from_pretrained(final).eval(), photo_batch(photos[0], 32))
    for folder in (final, tmp_path / "checkpoints" / "hf_checkpoint"):
        assert json.loads((folder / "config.json").read_text())["scaling_factor"] == float(f"{1 / std:.5g}")
