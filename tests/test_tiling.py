"""vae_tiling.py: seam-free tiled encode/decode equals untiled, on batches, with slicing, in low precision."""
import copy
import os

import pytest
import torch
from conftest import TINY, perturb_, photo
from torch.overrides import TorchFunctionMode

import vae_fast
from vae import Attention, AutoencoderKL
from vae_tiling import GroupStats

pytestmark = pytest.mark.usefixtures("one_thread")  # tiles mean many small ops (conftest.one_thread)


def psnr(a, b, peak=2.0):  # images in [-1, 1]: peak-to-peak 2
    return (10 * torch.log10(peak ** 2 / (a.double() - b.double()).pow(2).mean())).item()


class ConvSizes(TorchFunctionMode):
    """Inside `with ConvSizes() as c:`, c.sizes records the spatial size of every conv output (the exact tiler
    calls the convolutions itself, not the modules), to see that tiles, not the whole image, went through."""
    CONVS = (torch.nn.functional.conv2d, torch._nnpack_spatial_convolution)

    def __init__(self):
        super().__init__()
        self.sizes, self.calls = [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.CONVS:
            self.sizes.append(tuple(out.shape[2:]))
            self.calls.append(func)
        return out


@pytest.fixture(scope="module")
def sd_512(sd_pair):
    """The acceptance setup: random SD 1.5 weights with perturbed GroupNorm/bias, fast kernels on (as infer.py
    runs it), a 512^2 photo, 256^2 tiles. Four full-size passes (untiled and tiled encode and decode), shared
    by the tests below."""
    ours = copy.deepcopy(sd_pair[1]).set_fast_kernels(True)
    x = photo("astronaut", (512, 512))
    r = {}
    with torch.no_grad():
        for tiled in (False, True):
            if tiled:
                ours.enable_tiling(tile_sample_size=256)  # mode="exact" is the default
            with ConvSizes() as enc:
                r["lat", tiled] = ours.encode(x).latent_dist
            with ConvSizes() as dec:
                r["dec", tiled] = ours.decode(r["lat", False].mean).sample
            r["enc_sizes", tiled], r["dec_sizes", tiled] = enc.sizes, dec.sizes
    return r


def went_through_tiles(r, what):
    """The tiled pass ran more, smaller convs: none covered the whole 512^2 image (the untiled pass's
    largest)."""
    tiled, untiled = r[what + "_sizes", True], r[what + "_sizes", False]
    assert max(h * w for h, w in untiled) == 512 * 512
    assert max(h * w for h, w in tiled) < 512 * 512 and len(tiled) > len(untiled)


@pytest.mark.slow  # SD's size at 512^2: the acceptance figure (the tiny model checks the same below, quickly)
def test_sd15_decode_512_with_256_tiles(sd_512):
    dec, dec_t = sd_512["dec", False], sd_512["dec", True]
    db = psnr(dec_t, dec)
    print(f"\nexact tiles, SD 1.5 (random, perturbed), 512^2, 256^2 tiles: decode PSNR {db:.1f} dB, "
          f"max abs {(dec_t - dec).abs().max():.2e}")
    assert dec_t.shape == dec.shape == (1, 3, 512, 512)
    assert db >= 100.0  # the acceptance figure (diffusers' blended tiles: ~22 dB)
    went_through_tiles(sd_512, "dec")


@pytest.mark.slow
def test_sd15_encode_512_with_256_tiles(sd_512):
    lat, lat_t = sd_512["lat", False], sd_512["lat", True]
    peak = (lat.mean.max() - lat.mean.min()).item()  # PSNR of the latent against its own range
    db = psnr(lat_t.mean, lat.mean, peak)
    print(f"\nexact tiles, SD 1.5 (random, perturbed), 512^2, 256^2 tiles: encode PSNR (posterior mean) "
          f"{db:.1f} dB, max abs {(lat_t.mean - lat.mean).abs().max():.2e}")
    assert lat_t.mean.shape == lat.mean.shape == (1, 4, 64, 64)
    assert db >= 100.0 and (lat_t.logvar - lat.logvar).abs().max() < 1e-3
    went_through_tiles(sd_512, "enc")


@pytest.mark.parametrize("tile", [8, 13, 24])
@torch.no_grad()
def test_exact_in_float64_any_tile_odd_sizes(tile):
    """In float64 the tiled result equals the untiled one to ~1e-15: the design is exact, not approximate.
    Non-square, odd image sizes; tile sizes that divide nothing."""
    torch.manual_seed(0)
    model = perturb_(AutoencoderKL(**TINY)).double().eval()
    x = photo("coffee", (37, 50)).double()
    moments = model.encode(x).latent_dist.parameters
    z = torch.randn(1, 4, 11, 18, dtype=torch.float64)
    dec = model.decode(z).sample
    model.enable_tiling(tile_sample_size=tile)
    moments_t = model.encode(x).latent_dist.parameters
    dec_t = model.decode(z).sample
    assert moments_t.shape == moments.shape == (1, 8, 18, 25) and dec_t.shape == dec.shape == (1, 3, 22, 36)
    assert (moments_t - moments).abs().max() < 1e-12
    assert (dec_t - dec).abs().max() < 1e-12


@torch.no_grad()
def test_batch_and_slicing():
    torch.manual_seed(0)
    model = perturb_(AutoencoderKL(**TINY)).eval()
    x = torch.cat([photo("astronaut", (48, 64)), photo("chelsea", (48, 64))])  # statistics differ per image
    lat, dec = model.encode(x).latent_dist.mean, model.decode(model.encode(x).latent_dist.mean).sample
    results = {}
    for slicing in (False, True):
        model.enable_tiling(tile_sample_size=16)
        if slicing:
            model.enable_slicing()
        results[slicing] = model.encode(x).latent_dist.mean, model.decode(lat).sample
        model.disable_slicing()
    single = model.decode(lat[1:]).sample  # the second image alone, tiled: its stats are its own
    model.disable_tiling()
    for lat_t, dec_t in results.values():  # convolutions round each window size a little differently
        assert (lat_t - lat).abs().max() < 5e-5 and (dec_t - dec).abs().max() < 5e-5
    assert (single - dec[1:]).abs().max() < 5e-5


def test_group_stats_merge_exact_and_fp16_safe():
    """Per-tile moments merged with the between-tile term == whole-tensor moments; fp16 tiles whose sum of
    squares would overflow fp16 (values ~300, 64k elements per group) give fp32-accurate statistics."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 64, 96, generator=g, dtype=torch.float64) * 40 + 300
    x[:, :, :, 48:] -= 250  # tiles with very different means: the between-tile term matters
    x16 = x.half()
    ref = x16.double().view(2, 4, -1)
    st = GroupStats(4)
    for rows in x16.split(20, dim=2):  # uneven tiles
        for tile in rows.split(37, dim=3):
            st.add(tile)
    assert st.n == 4 * 64 * 96
    assert torch.allclose(st.mean, ref.mean(2), rtol=1e-6)
    assert torch.allclose(st.m2 / st.n, ref.var(2, unbiased=False), rtol=1e-5)
    norm = torch.nn.GroupNorm(4, 16, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.normal_(generator=g)
        norm.bias.normal_(generator=g)
    scale, shift = st.affine(norm)
    assert scale.dtype == torch.float64  # the model's dtype was float64 here: computed in float64
    assert torch.allclose(x16.double() * scale + shift, norm(x16.double()), atol=1e-4)
    # an fp16 norm gets fp32 scale/shift
    assert st.affine(norm.half())[0].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_low_precision_tiles_no_worse_than_untiled(dtype):
    """bf16/fp16 models on CPU: tiled and untiled differ from the fp32 result by the same rounding noise."""
    torch.manual_seed(0)
    model = perturb_(AutoencoderKL(**TINY)).eval()
    x = photo("rocket", (64, 64))
    z = model.encode(x).latent_dist.mean
    dec32 = model.decode(z).sample
    model.to(dtype)
    try:
        dec_lp = model.decode(z.to(dtype)).sample.float()
    except RuntimeError as e:  # a CPU build without fp16 convolutions
        pytest.skip(f"{dtype} convolution not available on this CPU build: {e}")
    model.enable_tiling(tile_sample_size=16)
    dec_lp_t = model.decode(z.to(dtype)).sample.float()
    assert dec_lp_t.dtype == torch.float32 and torch.isfinite(dec_lp_t).all()
    err_untiled, err_tiled = psnr(dec_lp, dec32), psnr(dec_lp_t, dec32)
    print(f"\n{dtype}: untiled {err_untiled:.1f} dB, tiled {err_tiled:.1f} dB against fp32")
    assert err_tiled >= err_untiled - 1.0 and err_tiled > 35


@torch.no_grad()
def test_attention_query_chunks_same_result(monkeypatch):
    torch.manual_seed(0)
    attn = perturb_(Attention(64, 8)).eval()
    x = torch.randn(2, 64, 24, 40)  # 960 positions
    whole = attn(x)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    counted = lambda *a: calls.append(1) or sdpa(*a)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    # 100 queries per chunk (the last shorter)
    vae_fast.set_fast_kernels(attn, False, attention_chunk=960 * 100)
    chunked = attn(x)
    assert len(calls) == 10 and (chunked - whole).abs().max() < 1e-6


def _peak_growth_mb(fn):
    """RSS high-water growth during fn() (Linux: /proc/self/clear_refs resets VmHWM)."""
    def kb(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    base = kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    return (kb("VmHWM") - base) / 1024


@pytest.mark.slow  # a 256 MiB score matrix is what it rules out: the quick run's peak memory
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
@torch.no_grad()
def test_attention_never_holds_the_score_matrix_on_cpu():
    """Even with the non-fused (math) SDPA kernel, CPU attention with the attention_chunk kernel holds at most
    that many scores at a time. 8192 positions: the full score matrix would be 256 MiB (its softmax as
    much)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.manual_seed(0)
    attn = Attention(64, 8).eval()
    x = torch.randn(1, 64, 64, 128)
    with sdpa_kernel(SDPBackend.MATH):
        vae_fast.set_fast_kernels(attn, False, attention_chunk=2 ** 20)  # 4 MiB of scores per call
        attn(x)  # once before measuring: what the first call allocates for good (it is not the scores)
        chunked_mb = _peak_growth_mb(lambda: attn(x))
        vae_fast.set_fast_kernels(attn, False)  # positive control: the plain module, the whole matrix
        whole_mb = _peak_growth_mb(lambda: attn(x))
    print(f"\nattention over 8192 positions, math kernel: peak +{whole_mb:.0f} MB whole, "
          f"+{chunked_mb:.0f} MB chunked")
    assert whole_mb > 250 and chunked_mb < 64


@torch.no_grad()
def test_modes_switches_and_errors():
    torch.manual_seed(0)
    model = perturb_(AutoencoderKL(**TINY)).eval()
    x = photo("chelsea", (64, 64))
    z = model.encode(x).latent_dist.mean
    dec = model.decode(z).sample
    model.enable_tiling(tile_sample_size=32)
    assert model.tile_mode == "exact"
    exact = model.decode(z).sample
    model.enable_tiling(tile_sample_size=32, mode="blend")  # the constant-memory option is still there
    blend = model.decode(z).sample
    print(f"\ntiny model, 64^2, 32^2 tiles: exact {psnr(exact, dec):.1f} dB, blend {psnr(blend, dec):.1f} dB")
    assert psnr(exact, dec) > 100 and psnr(blend, dec) < psnr(exact, dec) - 30
    # an image no larger than a tile takes the untiled path
    model.enable_tiling(tile_sample_size=64)
    assert torch.equal(model.decode(z).sample, dec)
    for kwargs in (dict(mode="seamless"), dict(tile_sample_size=0), dict(tile_sample_size=18, mode="blend"),
                   dict(offload="yes"), dict(tile_overlap=1.0)):
        with pytest.raises(ValueError):
            model.enable_tiling(**kwargs)
    model.enable_tiling(tile_sample_size=16)
    with torch.enable_grad(), pytest.raises(ValueError, match="inference"):
        model.decode(z.clone().requires_grad_())


@torch.no_grad()
def test_exact_tiles_take_the_fast_kernels(monkeypatch):
    """With fast kernels on, the exact tiler's convolutions go through NNPACK (switched on at its pool's
    thread count) and still equal the untiled result to float rounding."""
    if not torch._nnpack_available():
        pytest.skip("this torch build has no NNPACK")
    torch.manual_seed(0)
    model = perturb_(AutoencoderKL(**TINY)).eval()
    z = model.encode(photo("chelsea", (64, 64))).latent_dist.mean
    plain = model.decode(z).sample
    threads = torch.get_num_threads()
    torch.set_num_threads(vae_fast.pool_threads())
    try:
        model.set_fast_kernels(True).enable_tiling(tile_sample_size=16)
        with ConvSizes() as convs:
            tiled = model.decode(z).sample
    finally:
        torch.set_num_threads(threads)
    assert convs.sizes and psnr(tiled, plain) > 100
    nnpack = [f for f in convs.calls if f is torch._nnpack_spatial_convolution]
    assert len(nnpack) > 9  # more than the untiled decoder's nine 3x3 stride-1 convs: tiles
