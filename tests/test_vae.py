"""vae.py: parity with diffusers' AutoencoderKL, weight interop (folders, offline hub cache, legacy names), switches."""
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, SD15, TINY, perturb_, photo
import vae
from vae import AutoencoderKL

TOL = 1e-4  # fp32 max-abs tolerance of the acceptance criteria (equality on CPU with vae.CPU_NNPACK and
# vae.SUBPIXEL_UPSAMPLE off)


@pytest.mark.parametrize("size", [(64, 64), (48, 80)])  # one square, one non-square input
@torch.no_grad()
def test_parity_with_diffusers(sd_pair, size):
    ref, ours = sd_pair
    x = photo("astronaut", size)
    a, b = ref.encode(x).latent_dist, ours.encode(x).latent_dist
    assert b.mean.shape == (1, 4, size[0] // 8, size[1] // 8)
    assert (a.mean - b.mean).abs().max() <= TOL
    assert (a.std - b.std).abs().max() <= TOL
    assert (a.logvar - b.logvar).abs().max() <= TOL
    z = a.mode()
    dec_ref, dec_ours = ref.decode(z).sample, ours.decode(z).sample
    assert dec_ours.shape == x.shape
    assert (dec_ref - dec_ours).abs().max() <= TOL
    # encode_to_latent / decode_from_latent against diffusers' manual scaling
    lat = ours.encode_to_latent(x)
    assert (lat - a.mode() * ref.config.scaling_factor).abs().max() <= TOL
    dec = ours.decode_from_latent(lat)
    assert (dec - ref.decode(lat / ref.config.scaling_factor).sample).abs().max() <= TOL
    # forward, and the posterior statistics
    assert (ours(x).sample - ref(x).sample).abs().max() <= TOL
    assert torch.allclose(a.kl(), b.kl(), rtol=1e-5)
    assert torch.allclose(a.nll(z), b.nll(z), rtol=1e-5)


def test_cpu_nnpack_convolutions(sd_pair, monkeypatch):
    """CPU fp32 inference runs the 3x3 stride-1 convs through NNPACK (vae.CPU_NNPACK): within rounding of
    diffusers' output; switched off, bit-identical to it; never under autograd or for other convs."""
    if not torch._nnpack_available():
        pytest.skip("this torch build has no NNPACK")
    ref, ours = sd_pair
    calls = []
    nnpack = torch._nnpack_spatial_convolution
    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", lambda *a: calls.append(a[1].shape) or nnpack(*a))
    x = photo("rocket", (48, 64))
    with torch.no_grad():
        z = ref.encode(x).latent_dist.mode()
        expected = ref.decode(z).sample
        fast = ours.decode(z).sample
        assert len(calls) == 1 + 2 * 2 + 4 * 3 * 2 + 3 + 1  # conv_in, mid (2 resnets), 12 resnets, 3 upsamplers, out
        assert all(shape[-2:] == (3, 3) for shape in calls)
        diff = (fast - expected).abs().max().item()
        assert 0 < diff <= TOL, diff  # not exact (Winograd rounding), well inside the parity tolerance
        monkeypatch.setattr(vae, "CPU_NNPACK", False)
        monkeypatch.setattr(vae, "SUBPIXEL_UPSAMPLE", False)  # diffusers' exact sequence of operations
        calls.clear()
        assert torch.equal(ours.decode(z).sample, expected) and not calls
        monkeypatch.setattr(vae, "CPU_NNPACK", True)
    out = ours.decoder.conv_in(z)  # under autograd: always F.conv2d
    assert not calls and out.requires_grad


def test_subpixel_upsampling(sd_pair, monkeypatch):
    """vae.SUBPIXEL_UPSAMPLE: nearest-2x + 3x3 conv computed as one stride-2 transposed conv with summed taps.
    Exact in real arithmetic (fp64: forward and every gradient, the 3x3 weight's included); in fp32 within
    rounding of diffusers; taken wherever NNPACK is not (NNPACK off, or under autograd)."""
    calls = []
    transposed = torch.nn.functional.conv_transpose2d
    monkeypatch.setattr(torch.nn.functional, "conv_transpose2d", lambda *a, **k: calls.append(1) or transposed(*a, **k))
    up = vae.Upsample(6).double()
    perturb_(up)
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 6, 10, 14, dtype=torch.float64)
    results = []
    for flag in (True, False):
        monkeypatch.setattr(vae, "SUBPIXEL_UPSAMPLE", flag)
        x.grad = None
        up.zero_grad()
        y = up(x)
        y.backward(g)
        results.append([y, x.grad, up.conv.weight.grad, up.conv.bias.grad])
        assert len(calls) == 1  # the transposed conv with the flag on, nearest + conv with it off
    assert all((a - b).abs().max() < 1e-12 for a, b in zip(*results))
    monkeypatch.setattr(vae, "SUBPIXEL_UPSAMPLE", True)

    ref, ours = sd_pair
    calls.clear()
    x = photo("rocket", (48, 64))
    with torch.no_grad():
        z = ref.encode(x).latent_dist.mode()
        expected = ref.decode(z).sample
        ours.decode(z)
        assert not calls  # CPU fp32 inference: nearest + NNPACK's 3x3 instead (as fast, BENCHMARKS.md)
        monkeypatch.setattr(vae, "CPU_NNPACK", False)
        out = ours.decode(z).sample
        assert len(calls) == 3  # the decoder's three upsamplers
        diff = (out - expected).abs().max().item()
        print(f"\nsubpixel upsampling vs diffusers (fp32, oneDNN convs): max abs {diff:.1e}")
        assert diff <= TOL


def test_groupnorm_under_autocast(monkeypatch):
    """vae.HALF_NORM_UNDER_AUTOCAST runs GroupNorm outside autocast, in the input's half dtype. CPU autocast keeps it
    in bf16 by itself, and there ours computes exactly the same thing, forward and backward (tests/test_cuda.py
    checks the CUDA side, where autocast alone would compute it in fp32)."""
    model = perturb_(AutoencoderKL(**TINY)).train()
    x = photo("astronaut", (32, 32))
    inside = []  # was autocast on inside each group_norm call?
    group_norm = torch.nn.functional.group_norm
    monkeypatch.setattr(torch.nn.functional, "group_norm",
                        lambda *a: inside.append(torch.is_autocast_enabled("cpu")) or group_norm(*a))
    results = []
    for flag in (True, False):
        monkeypatch.setattr(vae, "HALF_NORM_UNDER_AUTOCAST", flag)
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
    s_ours = ours.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(3))
    assert (s_ref - s_ours).abs().max() <= TOL
    out = ours(x, sample_posterior=True, generator=torch.Generator().manual_seed(3))
    assert (out.sample - ref(x, sample_posterior=True, generator=torch.Generator().manual_seed(3)).sample).abs().max() <= TOL
    assert out.latent_dist is not None  # forward hands back the posterior, so training needs one forward


def test_shift_factor_latents():
    model = perturb_(AutoencoderKL(**TINY, shift_factor=0.3, scaling_factor=0.5)).eval()
    x = photo("chelsea", (16, 16))
    with torch.no_grad():
        z = model.encode(x).latent_dist.mode()
        lat = model.encode_to_latent(x)
        assert torch.allclose(lat, (z - 0.3) * 0.5)
        assert torch.allclose(model.decode_from_latent(lat), model.decode(z).sample, atol=1e-5)


def test_save_pretrained_loads_in_diffusers(sd_pair, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL as D
    monkeypatch.setattr(vae, "CPU_NNPACK", False)  # oneDNN convolutions, like diffusers': bit-identical outputs
    monkeypatch.setattr(vae, "SUBPIXEL_UPSAMPLE", False)  # nearest + 3x3 conv, as diffusers
    _, ours = sd_pair
    ours.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded, info = D.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    x = photo("rocket", (32, 32))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x).sample, ours(x).sample)


def test_diffusers_save_pretrained_loads_here(sd_pair, tmp_path):
    ref, ours = sd_pair
    ref.save_pretrained(tmp_path / "vae")
    model = AutoencoderKL.from_pretrained(tmp_path, subfolder="vae").eval()
    assert model.config["block_out_channels"] == [128, 256, 512, 512]
    for (k, v), (k2, v2) in zip(sorted(model.state_dict().items()), sorted(ours.state_dict().items())):
        assert k == k2 and torch.equal(v, v2)
    assert all(p.requires_grad for p in model.parameters())  # meta-device loading keeps parameters trainable


def test_bin_fallback_and_dtype(tmp_path):
    model = perturb_(AutoencoderKL(**TINY))
    torch.save(model.state_dict(), tmp_path / "diffusion_pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0",
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
    """Lay out files as huggingface_hub stores them: blobs/<hash>, snapshots/<commit>/<path> symlinks, refs/<rev>."""
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
    _hub_cache(cache, "someone/tiny-vae", files)                                         # a standalone VAE repo
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
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hfhome")}
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
    """vae.py builds a model and loads a state dict with safetensors and huggingface_hub unimportable."""
    script = f"""
import sys
sys.modules["safetensors"] = None; sys.modules["huggingface_hub"] = None  # any import of them now fails
sys.path.insert(0, {ROOT!r})
import torch, vae
m = vae.AutoencoderKL(**{TINY!r})
m.load_state_dict(vae.AutoencoderKL(**{TINY!r}).state_dict())
print(m(torch.zeros(1, 3, 16, 16)).sample.shape)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "torch.Size([1, 3, 16, 16])" in r.stdout
    src = open(os.path.join(ROOT, "vae.py")).read()
    top_level_imports = [l for l in src.splitlines() if l.startswith(("import ", "from "))]
    assert not any("safetensors" in l or "huggingface" in l or "diffusers" in l for l in top_level_imports)


@torch.no_grad()
def test_slicing_matches_batched(sd_pair):
    _, ours = sd_pair
    x = torch.cat([photo(n, (32, 32)) for n in ("astronaut", "coffee", "chelsea")])
    m0 = ours.encode(x).latent_dist.mean
    d0 = ours.decode(m0).sample
    ours.enable_slicing()
    try:
        m1 = ours.encode(x).latent_dist.mean
        d1 = ours.decode(m0).sample
    finally:
        ours.disable_slicing()
    # The same per-image computation; batch size only changes the conv kernels' blocking (float reassociation;
    # NNPACK's Winograd transforms, vae.CPU_NNPACK, round a little differently for each batch size).
    assert (m0 - m1).abs().max() < 5e-5 and (d0 - d1).abs().max() < 5e-5


@torch.no_grad()
def test_blended_tiling_runs_and_reports_psnr(sd_pair):
    _, ours = sd_pair
    x = photo("astronaut", (128, 128))  # twice the 64-pixel tile each way
    lat = ours.encode(x).latent_dist.mode()
    ref_dec = ours.decode(lat).sample
    ours.enable_tiling(tile_sample_size=64, mode="blend")
    try:
        lat_t = ours.encode(x).latent_dist.mode()
        dec_t = ours.decode(lat).sample
    finally:
        ours.disable_tiling()
    assert lat_t.shape == lat.shape and dec_t.shape == ref_dec.shape
    def psnr(a, b):
        return (10 * torch.log10(4.0 / (a - b).pow(2).mean())).item()  # range [-1, 1] -> peak-to-peak 2
    print(f"\nblended tiling vs untiled (random SD 1.5 weights, 128px image, 64px tiles): "
          f"decode PSNR {psnr(dec_t, ref_dec):.1f} dB, encode-latent PSNR {psnr(lat_t, lat):.1f} dB")
    assert torch.isfinite(dec_t).all() and torch.isfinite(lat_t).all()
    # An image no larger than the tile goes through the untiled path unchanged.
    ours.enable_tiling(tile_sample_size=128, mode="blend")
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
