"""GPU tests (skipped without CUDA; scripts/gpu_check.sh runs them on a lent GPU): parity with diffusers on
CUDA in fp32 (plain and with fast kernels) and bf16, channels_last, exact tiling in bf16, a compiled training
step (training.compile) against eager, and GroupNorm in half precision under autocast (the half_norm fast
kernel)."""
import copy

import pytest
import torch
from conftest import TINY, perturb_, photo

import vae
import vae_fast

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = torch.device("cuda")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def cuda_pair(sd_pair):
    ref, ours = sd_pair
    return copy.deepcopy(ref).to(DEV), copy.deepcopy(ours).to(DEV)


@pytest.fixture
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@torch.no_grad()
def test_cuda_fp32_parity_with_diffusers(cuda_pair, no_tf32):
    """fp32 on CUDA, plain and with fast kernels (sub-pixel upsampling, half GroupNorm: not under autocast
    here): within 1e-4 of diffusers (cuDNN picks its algorithms per call; CPU tests check bit equality)."""
    ref, plain = cuda_pair
    x = photo("astronaut", (128, 96)).to(DEV)
    a = ref.encode(x).latent_dist
    expected = ref.decode(a.mean).sample
    for ours in (plain, copy.deepcopy(plain).set_fast_kernels(True)):
        b = ours.encode(x).latent_dist
        assert (a.mean - b.mean).abs().max() <= 1e-4 and (a.logvar - b.logvar).abs().max() <= 1e-4
        assert (expected - ours.decode(a.mean).sample).abs().max() <= 1e-4


@torch.no_grad()
def test_cuda_bf16_and_channels_last_match_diffusers(cuda_pair):
    ref, ours = cuda_pair
    ref16, ours16 = copy.deepcopy(ref).to(torch.bfloat16), copy.deepcopy(ours).to(torch.bfloat16)
    cl = copy.deepcopy(ours16).to(memory_format=torch.channels_last)
    x = photo("coffee", (128, 128)).to(DEV)
    ref32 = ref.decode(ref.encode(x).latent_dist.mode()).sample
    x16 = x.to(torch.bfloat16)
    out = {"diffusers": ref16.decode(ref16.encode(x16).latent_dist.mode()).sample,
           "ours": ours16.decode(ours16.encode(x16).latent_dist.mode()).sample}
    xcl = x16.contiguous(memory_format=torch.channels_last)
    out["channels_last"] = cl.decode(cl.encode(xcl).latent_dist.mode()).sample
    errs = {k: rel(v, ref32) for k, v in out.items()}
    print(f"\nbf16 relative error against fp32: {errs}")
    # bf16 keeps 8 bits of mantissa (a few % relative error through these random perturbed weights): ours and
    # diffusers' are as far from fp32 as each other (identical kernels in NCHW), channels_last nearly so
    assert errs["ours"] <= 1.05 * errs["diffusers"] + 1e-3
    assert errs["channels_last"] <= 1.2 * errs["diffusers"] + 1e-3


@torch.no_grad()
def test_cuda_exact_tiling_bf16(cuda_pair):
    _, ours = cuda_pair
    m = copy.deepcopy(ours).to(torch.bfloat16)
    z = torch.randn(1, 4, 64, 48, device=DEV, dtype=torch.bfloat16)
    full = m.decode(z).sample
    m.enable_tiling(tile_sample_size=128)
    tiled = m.decode(z).sample
    assert tiled.shape == full.shape == (1, 3, 512, 384)
    psnr = 10 * torch.log10(4 / (tiled.double() - full.double()).pow(2).mean()).item()
    print(f"\nexact tiling, bf16 on CUDA, 512x384 from 128^2 tiles: {psnr:.1f} dB against untiled bf16")
    assert psnr > 35


def test_cuda_compiled_training_matches_eager(no_tf32):
    """training.compile compiles the VAE blocks in place: same state-dict keys, and the first steps' losses
    and weights match eager training (fp32, TF32 off) up to compiled-kernel rounding."""
    import train
    from config import Config
    cfg = Config()
    cfg.model.pretrained_model_name_or_path = None
    for key, value in TINY.items():
        setattr(cfg.model, key, value)
    cfg.training.precision = "32"
    cfg.loss.disc_start_step, cfg.loss.perceptual_weight, cfg.loss.disc_ndf = 0, 0.0, 16
    x = [{"pixel_values": photo("astronaut", (64, 64)).repeat(2, 1, 1, 1)}]
    result = {}
    for flag in (False, True):
        cfg.training.compile = flag
        run = train.build_run(cfg, DEV)
        stats = [train.train_step(run, x, step)[0]["train/loss"].item() for step in range(3)]
        result[flag] = stats, run.vae.state_dict()
    (s0, w0), (s1, w1) = result[False], result[True]
    assert list(w0) == list(w1)  # no "_orig_mod." prefixes: checkpoints are the same with and without compile
    assert all(abs(a - b) <= 1e-3 * abs(a) for a, b in zip(s0, s1)), (s0, s1)
    assert max(rel(w1[k], w0[k]) for k in w0 if w0[k].is_floating_point()) < 1e-3


def test_cuda_half_groupnorm_under_autocast():
    """The half_norm kernel: under CUDA autocast GroupNorm stays in bf16 (autocast alone computes it in fp32),
    within bf16 rounding of the fp32 result, and a training forward keeps less for backward."""
    norm = perturb_(torch.nn.GroupNorm(4, 32, eps=1e-6)).to(DEV)
    x = torch.randn(2, 32, 16, 16, device=DEV).bfloat16()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y32 = norm(x)
        vae_fast.set_fast_kernels(norm, False, half_norm=True)
        y = norm(x)
    assert y.dtype == torch.bfloat16 and y32.dtype == torch.float32
    assert (y.float() - y32).abs().max() <= 2 ** -7 * y32.abs().max()

    model = perturb_(vae.AutoencoderKL(**TINY)).to(DEV).train()
    img = photo("astronaut", (64, 64)).to(DEV)

    def saved_bytes(flag):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t
        model.set_fast_kernels(False, half_norm=flag)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cuda", torch.bfloat16):
                model(img).sample.float().mean().backward()
        return total[0]
    half, full = saved_bytes(True), saved_bytes(False)
    print(f"\nsaved for backward under CUDA autocast: {half / full:.2f}x with bf16 GroupNorm")
    assert half < 0.8 * full
