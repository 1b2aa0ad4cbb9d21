"""vae.py: bit-for-bit parity with diffusers' AutoencoderKL, weight interop (folders, offline hub cache,
legacy names, file modes), vae_fast.py's kernels per model, vae.py working copied alone, no import cycles."""
import ast
import copy
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SD15, TINY, make_pair, perturb_, photo

import vae
import vae_fast
from vae import AutoencoderKL

FAST_TOL = 3e-5  # fp32 max abs against diffusers with fast kernels on (rounded differently); plain: equality


@pytest.fixture
def nnpack_threads():
    """As many torch threads as NNPACK's pool has (made now, at this count, if not yet; see vae_fast.py): a
    model switched on at that count takes NNPACK."""
    if not torch._nnpack_available():
        pytest.skip("this torch build has no NNPACK")
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    torch.set_num_threads(vae_fast.pool_threads())
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_pair():  # for what does not need SD's layout
    return make_pair(TINY)


@pytest.fixture(scope="module")
def narrow_pair():
    """SD 1.5's layout (4 levels, 2 layers a level, mid attention) at a narrow width: the fast kernels' call
    counts and rounding are those of SD's structure, at a fraction of its memory."""
    return make_pair(dict(SD15, block_out_channels=[32, 64, 64, 64], norm_num_groups=8))


@pytest.fixture(scope="module")
def fast(narrow_pair):
    """narrow_pair's model with every fast kernel on, switched on at NNPACK's pool size (nnpack_threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(vae_fast.pool_threads() if torch._nnpack_available() else threads)
    model = copy.deepcopy(narrow_pair[1]).set_fast_kernels(True)
    torch.set_num_threads(threads)
    return model


def same(a, b):  # bit for bit, with the largest difference in the message
    assert a.shape == b.shape and torch.equal(a, b), (a - b).abs().max().item()


@pytest.mark.parametrize("size", [(32, 32), (24, 40)])  # one square, one non-square input
@torch.no_grad()
def test_parity_with_diffusers(sd_pair, size):
    """A model built and loaded with no other call computes exactly what diffusers computes (CPU fp32)."""
    ref, ours = sd_pair
    x = photo("astronaut", size)
    a, b = ref.encode(x).latent_dist, ours.encode(x).latent_dist
    assert b.mean.shape == (1, 4, size[0] // 8, size[1] // 8)
    for t, u in ((a.mean, b.mean), (a.std, b.std), (a.logvar, b.logvar), (a.kl(), b.kl())):
        same(t, u)
    z = a.mode()
    same(ref.decode(z).sample, ours.decode(z).sample)
    same(a.nll(z), b.nll(z))
    # encode_to_latent / decode_from_latent against diffusers' manual scaling
    lat = ours.encode_to_latent(x)
    same(lat, a.mode() * ref.config.scaling_factor)
    same(ours.decode_from_latent(lat), ref.decode(lat / ref.config.scaling_factor).sample)
    same(ours(x).sample, ref(x).sample)


def test_cpu_nnpack_convolutions(narrow_pair, fast, monkeypatch, nnpack_threads):
    """Fast kernels on, CPU fp32 inference runs the 3x3 stride-1 convs through NNPACK: within rounding of
    diffusers' output; the plain model never; never under autograd."""
    ref, ours = narrow_pair
    calls = []
    nnpack = torch._nnpack_spatial_convolution
    counted = lambda *a: calls.append(a[1].shape) or nnpack(*a)
    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", counted)
    x = photo("rocket", (24, 32))
    with torch.no_grad():
        z = ref.encode(x).latent_dist.mode()
        expected = ref.decode(z).sample
        out = fast.decode(z).sample
        # conv_in, mid (2 resnets), 12 resnets, 3 upsamplers, out
        assert len(calls) == 1 + 2 * 2 + 4 * 3 * 2 + 3 + 1
        assert all(shape[-2:] == (3, 3) for shape in calls)
        diff = (out - expected).abs().max().item()
        assert 0 < diff <= FAST_TOL, diff  # not exact (Winograd rounding)
        calls.clear()
        same(ours.decode(z).sample, expected)
        assert not calls
    out = fast.decoder.conv_in(z)  # under autograd: always F.conv2d
    assert not calls and out.requires_grad


def test_subpixel_upsampling(narrow_pair, fast, monkeypatch, nnpack_threads):
    """Sub-pixel upsampling: nearest-2x + 3x3 conv computed as one stride-2 transposed conv with summed taps.
    Exact in real arithmetic (fp64: forward and every gradient, the 3x3 weight's included); in fp32 within
    rounding of diffusers; taken wherever NNPACK is not (NNPACK off, or under autograd)."""
    calls = []
    transposed = torch.nn.functional.conv_transpose2d
    counted = lambda *a, **k: calls.append(1) or transposed(*a, **k)
    monkeypatch.setattr(torch.nn.functional, "conv_transpose2d", counted)
    up = vae.Upsample(6).double()
    perturb_(up)
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 6, 10, 14, dtype=torch.float64)
    results = []
    for flag in (True, False):
        vae_fast.set_fast_kernels(up, False, subpixel=flag)
        x.grad = None
        up.zero_grad()
        y = up(x)
        y.backward(g)
        results.append([y, x.grad, up.conv.weight.grad, up.conv.bias.grad])
        assert len(calls) == 1  # the transposed conv with the flag on, nearest + conv with it off
    assert all((a - b).abs().max() < 1e-12 for a, b in zip(*results))

    ref, ours = narrow_pair
    calls.clear()
    x = photo("rocket", (24, 32))
    with torch.no_grad():
        z = ref.encode(x).latent_dist.mode()
        expected = ref.decode(z).sample
        fast.decode(z)
        assert not calls  # CPU fp32 inference: nearest + NNPACK's 3x3 instead (as fast, BENCHMARKS.md)
        out = copy.deepcopy(ours).set_fast_kernels(False, subpixel=True).decode(z).sample
        assert len(calls) == 3  # the decoder's three upsamplers
        diff = (out - expected).abs().max().item()
        print(f"\nsubpixel upsampling vs diffusers (fp32, oneDNN convs): max abs {diff:.1e}")
        assert 0 < diff <= FAST_TOL


def test_groupnorm_under_autocast(monkeypatch):
    """The half_norm kernel runs GroupNorm outside autocast, in the input's half dtype. CPU autocast keeps it
    in bf16 by itself, and there it computes exactly the same thing, forward and backward (tests/test_cuda.py
    checks the CUDA side, where autocast alone would compute it in fp32)."""
    model = perturb_(AutoencoderKL(**TINY)).train()
    x = photo("astronaut", (32, 32))
    inside = []  # was autocast on inside each group_norm call?
    group_norm = torch.nn.functional.group_norm
    monkeypatch.setattr(torch.nn.functional, "group_norm",
                        lambda *a: inside.append(torch.is_autocast_enabled("cpu")) or group_norm(*a))
    results = []
    for flag in (True, False):
        model.set_fast_kernels(False, half_norm=flag)
        model.zero_grad()
        inside.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model.decoder.conv_norm_out(torch.randn(1, 32, 4, 4).bfloat16()).dtype == torch.bfloat16
            y = model(x).sample
        y.float().square().mean().backward()
        assert inside and all(on != flag for on in inside)  # flag on: every GroupNorm ran with autocast off
        results.append([y] + [p.grad for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert all(g.dtype == torch.float32 for g in results[0][1:])

@torch.no_grad()
def test_posterior_sampling_matches_diffusers(sd_pair):
    ref, ours = sd_pair
    x = photo("coffee", (32, 32))
    s_ref = ref.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(3))
    same(ours.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(3)), s_ref)
    out = ours(x, sample_posterior=True, generator=torch.Generator().manual_seed(3))
    same(out.sample, ref(x, sample_posterior=True, generator=torch.Generator().manual_seed(3)).sample)
    assert out.latent_dist is not None  # forward hands back the posterior, so training needs one forward


def test_shift_factor_latents():
    model = perturb_(AutoencoderKL(**TINY, shift_factor=0.3, scaling_factor=0.5)).eval()
    x = photo("chelsea", (16, 16))
    with torch.no_grad():
        z = model.encode(x).latent_dist.mode()
        lat = model.encode_to_latent(x)
        assert torch.allclose(lat, (z - 0.3) * 0.5)
        assert torch.allclose(model.decode_from_latent(lat), model.decode(z).sample, atol=1e-5)


def test_save_pretrained_loads_in_diffusers(tiny_pair, tmp_path):
    from diffusers import AutoencoderKL as D
    ours = tiny_pair[1]
    ours.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded, info = D.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    x = photo("rocket", (32, 32))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x).sample, ours(x).sample)


def test_diffusers_save_pretrained_loads_here(tiny_pair, tmp_path):
    ref, ours = tiny_pair
    ref.save_pretrained(tmp_path / "vae")
    model = AutoencoderKL.from_pretrained(tmp_path, subfolder="vae").eval()
    assert model.config["block_out_channels"] == TINY["block_out_channels"]
    for (k, v), (k2, v2) in zip(sorted(model.state_dict().items()), sorted(ours.state_dict().items())):
        assert k == k2 and torch.equal(v, v2)
    assert all(p.requires_grad for p in model.parameters())  # meta-device loading keeps parameters trainable


def test_bin_fallback_and_dtype(tmp_path):
    model = perturb_(AutoencoderKL(**TINY))
    torch.save(model.state_dict(), tmp_path / "diffusion_pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL",
                                                      "_diffusers_version": "0.30.0",
                                                      **model.config}))
    loaded = AutoencoderKL.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.to(torch.bfloat16))


def test_legacy_attention_names_load():
    src = perturb_(AutoencoderKL(**TINY))
    legacy = {}
    for k, v in src.state_dict().items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f".attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
        legacy[k] = v
    assert any(".query." in k for k in legacy) and any(".proj_attn." in k for k in legacy)
    model = AutoencoderKL(**TINY)
    model.load_state_dict(legacy)
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_strict_loading_names_the_keys():
    model = AutoencoderKL(**TINY)
    sd = model.state_dict()
    missing = {k: v for k, v in sd.items() if k != "decoder.conv_out.bias"}
    with pytest.raises(ValueError, match="missing keys.*decoder.conv_out.bias"):
        model.load_state_dict(missing)
    with pytest.raises(ValueError, match="unexpected keys.*encoder.extra.weight"):
        model.load_state_dict({**sd, "encoder.extra.weight": torch.zeros(1)})
    bad = dict(sd)
    bad["quant_conv.weight"] = torch.zeros(3, 3, 1, 1)
    with pytest.raises(ValueError, match="shape mismatches.*quant_conv.weight"):
        model.load_state_dict(bad)
    with pytest.raises(ValueError, match="unknown AutoencoderKL config keys: bogus"):
        AutoencoderKL(bogus=1)


def _hub_cache(cache, repo_id, files, revision="main"):
    """Lay out files as huggingface_hub stores them: blobs/<hash>, snapshots/<commit>/<path> symlinks,
    refs/<rev>."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    for rel, src in files.items():
        data = open(src, "rb").read()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)


def test_hub_repo_id_resolves_offline_from_cache(tmp_path):
    model = perturb_(AutoencoderKL(**TINY))
    model.save_pretrained(tmp_path / "src")
    files = {n: tmp_path / "src" / n for n in ("config.json", "diffusion_pytorch_model.safetensors")}
    cache = tmp_path / "hub"
    # a standalone VAE repo
    _hub_cache(cache, "someone/tiny-vae", files)
    _hub_cache(cache, "someone/tiny-sd", {f"vae/{n}": p for n, p in files.items()})       # a pipeline repo
    torch.save(model.state_dict(), tmp_path / "expected.pt")
    script = f"""
import sys, torch
sys.path.insert(0, {ROOT!r})
import vae
from vae import AutoencoderKL
expected = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)
for repo, sub in (("someone/tiny-vae", None), ("someone/tiny-sd", "vae")):
    m = AutoencoderKL.from_pretrained(repo, subfolder=sub)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in expected.items()), repo
try:
    AutoencoderKL.from_pretrained("someone/not-cached")
except OSError as e:
    print("ERROR:", e)
print("OK")
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
           "HF_HOME": str(tmp_path / "hfhome")}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("OK")
    assert "ERROR: could not load 'someone/not-cached'" in r.stdout


def test_missing_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        AutoencoderKL.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no diffusion_pytorch_model"):
        AutoencoderKL.from_pretrained(tmp_path)


def test_vae_needs_only_torch(tmp_path):
    """vae.py builds a model and loads a state dict with safetensors and huggingface_hub unimportable, without
    importing vae_fast.py or vae_tiling.py; the .safetensors files this project writes then fail with one line
    saying what to install."""
    AutoencoderKL(**TINY).save_pretrained(tmp_path)
    script = f"""
import sys
sys.modules["safetensors"] = None; sys.modules["huggingface_hub"] = None  # any import of them now fails
sys.path.insert(0, {ROOT!r})
import torch, vae
m = vae.AutoencoderKL(**{TINY!r})
m.load_state_dict(vae.AutoencoderKL(**{TINY!r}).state_dict())
print(m(torch.zeros(1, 3, 16, 16)).sample.shape, [n for n in ("vae_fast", "vae_tiling") if n in sys.modules])
try:
    vae.AutoencoderKL.from_pretrained({str(tmp_path)!r})
except ImportError as e:
    print("error:", e)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "torch.Size([1, 3, 16, 16]) []" in r.stdout
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    assert f"error: {weights}: reading .safetensors needs `pip install safetensors`\n" in r.stdout, r.stdout
    src = open(os.path.join(ROOT, "vae.py")).read()
    top_level_imports = [line for line in src.splitlines() if line.startswith(("import ", "from "))]
    optional = ("safetensors", "huggingface", "diffusers")
    assert not any(name in line for line in top_level_imports for name in optional)


@torch.no_grad()
def test_slicing_matches_batched(tiny_pair):
    _, ours = tiny_pair
    x = torch.cat([photo(n, (32, 32)) for n in ("astronaut", "coffee", "chelsea")])
    m0 = ours.encode(x).latent_dist.mean
    d0 = ours.decode(m0).sample
    ours.enable_slicing()
    try:
        m1 = ours.encode(x).latent_dist.mean
        d1 = ours.decode(m0).sample
    finally:
        ours.disable_slicing()
    # The same per-image computation; batch size only changes the conv kernels' blocking (float
    # reassociation).
    assert (m0 - m1).abs().max() < 5e-5 and (d0 - d1).abs().max() < 5e-5


@torch.no_grad()
def test_blended_tiling_runs_and_reports_psnr(tiny_pair):
    _, ours = tiny_pair
    x = photo("astronaut", (64, 64))  # twice the 32-pixel tile each way
    lat = ours.encode(x).latent_dist.mode()
    ref_dec = ours.decode(lat).sample
    ours.enable_tiling(tile_sample_size=32, mode="blend")
    try:
        lat_t = ours.encode(x).latent_dist.mode()
        dec_t = ours.decode(lat).sample
    finally:
        ours.disable_tiling()
    assert lat_t.shape == lat.shape and dec_t.shape == ref_dec.shape
    def psnr(a, b):
        return (10 * torch.log10(4.0 / (a - b).pow(2).mean())).item()  # range [-1, 1] -> peak-to-peak 2
    print(f"\nblended tiling vs untiled (random tiny VAE, 64px image, 32px tiles): "
          f"decode PSNR {psnr(dec_t, ref_dec):.1f} dB, encode-latent PSNR {psnr(lat_t, lat):.1f} dB")
    assert torch.isfinite(dec_t).all() and torch.isfinite(lat_t).all()
    # An image no larger than the tile goes through the untiled path unchanged.
    ours.enable_tiling(tile_sample_size=64, mode="blend")
    try:
        assert torch.equal(ours.decode(lat).sample, ref_dec)
    finally:
        ours.disable_tiling()


def test_gradient_checkpointing_same_gradients():
    model = perturb_(AutoencoderKL(**TINY))
    x = photo("coffee", (16, 16))
    def grads():
        model.zero_grad()
        model(x).sample.pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}
    g0 = grads()
    model.enable_gradient_checkpointing()
    g1 = grads()
    model.disable_gradient_checkpointing()
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-6), n


@torch.no_grad()
def test_fast_kernels_are_per_model_and_switch_back(narrow_pair, fast):
    """set_fast_kernels(True) changes that model alone (other rounding: the fast path runs) and keeps its keys
    and parameters; set_fast_kernels(False) gives back diffusers' exact operations."""
    ref, ours = narrow_pair
    x = photo("astronaut", (32, 24))
    expected = ref(x).sample
    assert ours.fast_kernels == {} and fast.fast_kernels == dict(
        nnpack=2, subpixel=True, half_norm=True, attention_chunk=2 ** 26, inplace_act=True)
    assert not torch.equal(fast(x).sample, expected)
    same(ours(x).sample, expected)  # the model it was copied from: untouched
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in fast.state_dict().items())
    assert list(fast.state_dict()) == list(ours.state_dict())
    switched = copy.deepcopy(fast)
    assert switched.set_fast_kernels(False).fast_kernels == {}
    assert not any(type(m).__module__ == "vae_fast" for m in switched.modules())
    same(switched(x).sample, expected)
    assert switched.set_fast_kernels(True, nnpack=False, attention_chunk=4096).fast_kernels == dict(
        subpixel=True, half_norm=True, attention_chunk=4096, inplace_act=True)
    assert switched.decoder.mid_block.attentions[0].chunk == 4096
    with pytest.raises(ValueError, match="unknown fast kernel.*nnpak; known: nnpack"):
        switched.set_fast_kernels(nnpak=False)


def test_nnpack_only_at_the_thread_count_of_its_pool():
    """NNPACK serves a model at the thread count it was switched on at, if at most `nnpack` (2) and the size
    of NNPACK's pool (made by the first switch in the process); otherwise oneDNN's F.conv2d."""
    if not torch._nnpack_available():
        pytest.skip("this torch build has no NNPACK")
    script = f"""
import sys, torch
sys.path.insert(0, {ROOT!r})
import vae
calls = []
nnpack = torch._nnpack_spatial_convolution
torch._nnpack_spatial_convolution = lambda *a: calls.append(1) or nnpack(*a)
z = torch.randn(1, 4, 8, 8)
def model(threads):
    torch.set_num_threads(threads)
    return vae.AutoencoderKL(**{TINY!r}).eval().set_fast_kernels(True)
def used(model, threads):
    torch.set_num_threads(threads)
    calls.clear()
    with torch.no_grad():
        model.decode(z)
    return bool(calls)
too_many, one, two = model(3), model(1), model(2)  # the pool is made by `one`'s switch, with 1 thread
print(used(too_many, 3), used(one, 1), used(one, 2), used(two, 2), used(two, 1), used(one, 1))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True", "False", "False", "False", "True"], r.stdout


def test_vae_py_copied_alone_loads_every_format(tmp_path):
    """vae.py copied into an empty folder, with no project file importable: builds SD 1.5, loads a diffusers
    folder, an LDM .safetensors and a full-SD-style .ckpt, encodes and decodes a photo; tiling asks for
    vae_tiling.py and works once it is copied beside it."""
    from safetensors.torch import save_file

    from convert_weights import diffusers_to_ldm
    src = perturb_(AutoencoderKL(**dict(TINY, norm_num_groups=32))).eval()  # LDM files: SD's 32 groups
    src.save_pretrained(tmp_path / "folder")
    ldm = {k: v.contiguous() for k, v in diffusers_to_ldm(src.state_dict()).items()}
    save_file(ldm, tmp_path / "vae.safetensors")
    torch.save({"state_dict": {"first_stage_model." + k: v for k, v in ldm.items()}}, tmp_path / "sd.ckpt")
    x = photo("chelsea", (32, 48))
    with torch.no_grad():
        torch.save({"x": x, "y": src(x).sample}, tmp_path / "expected.pt")
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "vae.py").write_text(open(os.path.join(ROOT, "vae.py")).read())
    script = f"""
import importlib.util, sys, torch
assert all(importlib.util.find_spec(m) is None for m in ("convert_weights", "data", "vae_tiling", "vae_fast"))
from vae import AutoencoderKL
assert AutoencoderKL().config["block_out_channels"] == [128, 256, 512, 512]  # SD 1.5 by default
e = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
for path in ("folder", "vae.safetensors", "sd.ckpt"):
    m = AutoencoderKL.from_pretrained({str(tmp_path)!r} + "/" + path)
    with torch.no_grad():
        lat = m.encode_to_latent(e["x"])
        assert lat.shape == (1, 4, 16, 24), lat.shape
        assert (m(e["x"]).sample - e["y"]).abs().max() < 1e-5, path
try:
    m.enable_tiling(tile_sample_size=16)
except ImportError as err:
    print("no tiling:", err)
sys.stdout.flush()
import shutil
shutil.copy({os.path.join(ROOT, "vae_tiling.py")!r}, ".")
shutil.copy({os.path.join(ROOT, "vae_fast.py")!r}, ".")
importlib.invalidate_caches()
m.enable_tiling(tile_sample_size=16)
with torch.no_grad():
    y = m(e["x"]).sample
    print("tiled max abs", float((y - e["y"]).abs().max()))
    print("fast max abs", float((m.set_fast_kernels(True)(e["x"]).sample - e["y"]).abs().max()))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", script], cwd=alone, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "no tiling: No module named 'vae_tiling'" in r.stdout
    assert float(r.stdout.split("tiled max abs")[1].split()[0]) < 1e-4
    assert float(r.stdout.split("fast max abs")[1]) < 1e-4


def _project_imports(path):
    """The project modules a file imports anywhere (module level or inside functions)."""
    project = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Constant) and node.value in ("vae_tiling", "vae_fast"):  # lazy, in vae.py
            names.add(node.value)
    return names & project


def test_no_import_cycles_and_model_files_import_no_project_file():
    files = {f[:-3]: os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith(".py")}
    graph = {m: _project_imports(p) - {m} for m, p in files.items()}
    assert graph["vae"] == {"vae_tiling", "vae_fast"}  # lazily: by enable_tiling / set_fast_kernels
    assert graph["vae_tiling"] == graph["vae_fast"] == set()
    def reaches(start, target, seen=()):
        return any(n == target or (n not in seen and reaches(n, target, seen + (n,)))
                   for n in graph.get(start, ()))
    cycles = sorted(m for m in graph if reaches(m, m))
    assert not cycles, cycles


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_take_the_umask_mode(tmp_path, umask):
    """save_pretrained's .safetensors (which safetensors creates 0600) and .json, through vae.atomic_write,
    get the mode open() gives under the umask: 0644 under 022, so others can read weights on shared
    storage."""
    old = os.umask(umask)
    try:
        AutoencoderKL(**TINY).save_pretrained(tmp_path)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"config.json": 0o666 & ~umask, "diffusion_pytorch_model.safetensors": 0o666 & ~umask}
