"""Tests for losses.py: every loss term against hand-computed values, the adaptive GAN weight against
torch.autograd.grad, gradient isolation between VAE / discriminator / LPIPS, LPIPS against the `lpips`
package, the discriminator against taming's structure, and PSNR/SSIM against scikit-image.

Run: python -m pytest tests/test_losses.py -q
"""
import math
import os
import socket
import time
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import losses
from config import config_from_dict
from losses import (
    LPIPS,
    LPIPSWeightsError,
    NLayerDiscriminator,
    VAELoss,
    hinge_d_loss,
    kl_loss,
    psnr,
    ssim,
    vanilla_d_loss,
    weights_init,
)

pytestmark = pytest.mark.usefixtures("one_thread")
UNREACHABLE_URL = "http://127.0.0.1:9/vgg16-397923af.pth"  # discard port: refused at once, never the internet


# ----------------------------------------------------------------------------- helpers
def vae_loss(**settings):
    """A VAELoss built as train.py builds it: config.py's `loss` section (its defaults and checks) with
    `settings` changed, less the discriminator's size."""
    loss = asdict(config_from_dict({"loss": settings}).loss)
    return VAELoss(**{k: v for k, v in loss.items() if k not in ("disc_num_layers", "disc_ndf")})


def photo(name, size=64, crop=None):
    """A scikit-image sample photo as (1, C, size, size) in [-1, 1] (centre square, area-downscaled)."""
    a = getattr(skdata, name)()
    if a.ndim == 2:
        a = a[..., None]
    t = torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255.0
    h, w = t.shape[-2:]
    s = min(h, w)
    t = t[..., (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    t = F.interpolate(t, size=size, mode="area")
    if crop is not None:
        t = t[..., :crop[0], :crop[1]]
    return t * 2 - 1


def noisy(x, sigma, seed):
    g = torch.Generator().manual_seed(seed)
    return x + sigma * 2 * torch.randn(x.shape, generator=g)  # sigma in [0, 1] units; may leave [-1, 1]


def to_np01(x):
    """(C, H, W) in [-1, 1] -> (H, W, C) float64 in [0, 1], clamped as the metrics do."""
    return ((x.double() + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()


def sk_ssim(a, b):
    a, b = to_np01(a), to_np01(b)
    if a.shape[-1] == 1:
        return structural_similarity(a[..., 0], b[..., 0], gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, data_range=1.0)
    return structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=1.0, channel_axis=2)


def sk_psnr(a, b):
    return peak_signal_noise_ratio(to_np01(a), to_np01(b), data_range=1.0)


class TinyVAE(nn.Module):
    """Differentiable stand-in: conv encoder -> (mean, logvar), decoder ending in `decoder.conv_out`."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv2d(3, 8, 3, padding=1)
        self.decoder = nn.Module()
        self.decoder.conv_in = nn.Conv2d(4, 8, 3, padding=1)
        self.decoder.conv_out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        rec = self.decoder.conv_out(F.silu(self.decoder.conv_in(mean)))
        return rec, SimpleNamespace(mean=mean, logvar=logvar)


def linear_disc(weight, bias, channels=1):
    """A 1x1-conv "discriminator": logits = weight * sum_c(x) + bias, easy to differentiate by hand."""
    d = nn.Conv2d(channels, 1, 1)
    with torch.no_grad():
        d.weight.fill_(weight)
        d.bias.fill_(bias)
    return d


# Hand example: B=2, C=1, H=1, W=2. x̂ = w * b with a 1x1 "decoder" weight w = 1 (the last layer),
# so every |x - x̂| is 0.5 and every (x - x̂)² is 0.25.
X = torch.tensor([[[[0.5, 0.5]]], [[[1.0, 1.0]]]])
B = torch.tensor([[[[0.0, 0.0]]], [[[0.5, 0.5]]]])
POST = SimpleNamespace(mean=torch.tensor([[[[1.0, 0.0]]], [[[0.0, 0.0]]]]),
                       logvar=torch.tensor([[[[0.0, math.log(2.0)]]], [[[0.0, 0.0]]]]))
KL_HAND = (0.5 * (1 + 1 - 1 - 0) + 0.5 * (0 + 2 - 1 - math.log(2.0))) / 2  # image 1 contributes 0


def hand_decoder():
    dec = nn.Conv2d(1, 1, 1, bias=False)
    with torch.no_grad():
        dec.weight.fill_(1.0)
    return dec


class FixedPerceptual(nn.Module):
    """Stands in for LPIPS with known per-image values (B, 1, 1, 1)."""

    def forward(self, x, y):
        return torch.tensor([0.2, 0.4]).view(2, 1, 1, 1) + 0 * y.sum()


@pytest.fixture(scope="module")
def vl_lpips():
    """A VAELoss with the random-backbone LPIPS (the only LPIPS built through VAELoss), built once."""
    return vae_loss(rec_loss_type="l2", perceptual_weight=0.5, disc_start_step=10**9,
                    random_lpips_backbone=True)



def test_losses_py_imports_no_project_file():
    """losses.py is copied into other projects alone: it imports the standard library, torch, lpips only."""
    import ast
    tree = ast.parse(open(losses.__file__).read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported == {"os", "socket", "warnings", "torch", "lpips"}

# ----------------------------------------------------------------------------- hand-computed terms
def test_hinge_and_vanilla_d_loss_hand_values():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # hinge: 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))) = 0.5 * (mean(0, .5) + mean(0, 1.5))
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.75), abs=1e-7)
    sp = lambda t: math.log1p(math.exp(t))  # noqa: E731
    expected = 0.5 * ((sp(-2.0) + sp(-0.5)) / 2 + (sp(-2.0) + sp(0.5)) / 2)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected, abs=1e-7)


def test_kl_hand_value_and_matches_vae_posterior():
    assert kl_loss(POST.mean, POST.logvar).item() == pytest.approx(KL_HAND, abs=1e-7)
    from vae import DiagonalGaussianDistribution  # the project's posterior: its .kl() is summed per image
    params = torch.randn(3, 8, 4, 5, generator=torch.Generator().manual_seed(0))
    post = DiagonalGaussianDistribution(params)
    assert torch.allclose(kl_loss(post.mean, post.logvar), post.kl().mean(), rtol=1e-5)


@pytest.mark.parametrize("rec_type,logvar,with_p", [("l1", 0.0, False), ("l2", 0.0, False),
                                                    ("l1", math.log(2.0), True), ("l2", math.log(2.0), True)])
def test_rec_nll_kl_hand_values(rec_type, logvar, with_p):
    fn = vae_loss(rec_loss_type=rec_type, kl_weight=0.1, perceptual_weight=0.0, logvar_init=logvar,
                 disc_start_step=100)
    per_pixel = 0.5 if rec_type == "l1" else 0.25
    p = [0.0, 0.0]
    if with_p:
        fn.lpips, fn.perceptual_weight, p = FixedPerceptual(), 0.5, [0.2, 0.4]
    rec = hand_decoder()(B)
    loss, log = fn.generator_loss(X, rec, POST, global_step=99)
    # nll per pixel = (rec + 0.5 * p_image) / e^logvar + logvar; summed over the 2 pixels, / batch of 2
    nll = sum(2 * ((per_pixel + 0.5 * pi) / math.exp(logvar) + logvar) for pi in p) / 2
    assert log["rec_loss"].item() == pytest.approx(per_pixel, abs=1e-7)  # pixel term only
    assert log["p_loss"].item() == pytest.approx(sum(p) / 2, abs=1e-7)
    assert log["nll_loss"].item() == pytest.approx(nll, abs=1e-6)
    assert log["kl_loss"].item() == pytest.approx(KL_HAND, abs=1e-7)
    assert loss.item() == pytest.approx(nll + 0.1 * KL_HAND, abs=1e-6)
    assert log["loss"].item() == pytest.approx(loss.item())
    assert log["logvar"].item() == pytest.approx(logvar)
    assert log["g_loss"].item() == 0 and log["d_weight"].item() == 0 and log["disc_factor"].item() == 0
    assert all(not v.requires_grad and v.dim() == 0 for v in log.values())


def test_generator_adversarial_term_and_adaptive_weight_by_hand():
    fn = vae_loss(rec_loss_type="l1", kl_weight=0.1, perceptual_weight=0.0, disc_weight=0.8,
                  disc_start_step=5)
    dec = hand_decoder()
    rec = dec(B)
    disc = linear_disc(2.0, -1.0)  # logits = 2 x̂ - 1
    loss, log = fn.generator_loss(X, rec, POST, 5, discriminator=disc, last_layer=dec.weight)
    # g = -mean(2 w b - 1) = 1 - 2 mean(b) = 0.5; dg/dw = -2 mean(b) = -0.5
    # nll = sum(x - w b) / 2 = 1.0 (all x > w b); dnll/dw = -sum(b) / 2 = -0.5
    d_weight = 0.5 / (0.5 + 1e-4) * 0.8
    assert log["g_loss"].item() == pytest.approx(0.5, abs=1e-7)
    assert log["nll_loss"].item() == pytest.approx(1.0, abs=1e-7)
    assert log["d_weight"].item() == pytest.approx(d_weight, rel=1e-6)
    assert log["disc_factor"].item() == 1.0
    assert loss.item() == pytest.approx(1.0 + 0.1 * KL_HAND + d_weight * 0.5, rel=1e-6)
    loss.backward()  # d_weight is detached: dL/dw = dnll/dw + d_weight * dg/dw
    assert dec.weight.grad.item() == pytest.approx(-0.5 + d_weight * -0.5, rel=1e-6)
    assert disc.weight.grad is None and disc.bias.grad is None


def test_discriminator_loss_hand_values():
    disc = linear_disc(2.0, -1.0)
    rec = hand_decoder()(B)
    for kind, fn_ref in (("hinge", hinge_d_loss), ("vanilla", vanilla_d_loss)):
        fn = vae_loss(perceptual_weight=0.0, disc_loss_type=kind, disc_start_step=0)
        d_loss, log = fn.discriminator_loss(disc, X, rec, 0)
        real, fake = 2 * X - 1, 2 * B - 1  # logits [0, 0, 1, 1] and [-1, -1, 0, 0]
        if kind == "hinge":  # 0.5 * (mean(1, 1, 0, 0) + mean(0, 0, 1, 1))
            assert d_loss.item() == pytest.approx(0.5, abs=1e-7)
        assert d_loss.item() == pytest.approx(fn_ref(real, fake).item(), abs=1e-7)
        assert log["logits_real"].item() == pytest.approx(0.5)
        assert log["logits_fake"].item() == pytest.approx(-0.5)


# ----------------------------------------------------------------------------- adaptive weight
def _tiny_setup(seed=0, size=32):
    torch.manual_seed(seed)
    vae, disc = TinyVAE(), NLayerDiscriminator(ndf=8, n_layers=2)
    x = torch.cat([photo("astronaut", size), photo("coffee", size)])
    return vae, disc, x


def test_adaptive_weight_matches_manual_autograd():
    vae, disc, x = _tiny_setup()
    rec, post = vae(x)
    fn = vae_loss(rec_loss_type="l1", perceptual_weight=0.0, disc_weight=0.7, disc_start_step=0,
                  logvar_init=0.3)
    W = vae.decoder.conv_out.weight
    loss, log = fn.generator_loss(x, rec, post, 0, discriminator=disc, last_layer=W)
    # LDM's calculate_adaptive_weight, written out
    nll = ((x - rec).abs() / math.exp(0.3) + 0.3).sum() / x.shape[0]
    g = -disc(rec).mean()  # BatchNorm in train mode normalises by batch statistics: same logits again
    nll_grad, = torch.autograd.grad(nll, W, retain_graph=True)
    g_grad, = torch.autograd.grad(g, W, retain_graph=True)
    expected = torch.clamp(nll_grad.norm() / (g_grad.norm() + 1e-4), 0.0, 1e4) * 0.7
    assert 0 < expected < 0.7e4
    assert torch.allclose(log["d_weight"], expected, rtol=1e-5)
    assert torch.allclose(log["nll_loss"], nll.detach(), rtol=1e-6)
    assert torch.allclose(log["g_loss"], g.detach(), rtol=1e-6)
    loss.backward()
    assert torch.allclose(W.grad, nll_grad + expected * g_grad, rtol=1e-4, atol=1e-6)


def test_adaptive_weight_clamps_at_1e4():
    vae, _, x = _tiny_setup()
    disc = linear_disc(0.0, 0.3, channels=3)  # logits ignore x̂: zero generator gradient
    rec, post = vae(x)
    fn = vae_loss(perceptual_weight=0.0, disc_weight=0.5, disc_start_step=0)
    _, log = fn.generator_loss(x, rec, post, 0, discriminator=disc, last_layer=vae.decoder.conv_out.weight)
    assert log["d_weight"].item() == pytest.approx(0.5e4)  # ||∇nll|| / 1e-4 > 1e4, clamped, x disc_weight


def test_grad_scale_invariance_and_non_finite():
    vae, _, x = _tiny_setup()
    rec, post = vae(x)
    W = vae.decoder.conv_out.weight
    # Scale the linear D so ||∇_W g|| is about the 1e-4 epsilon: a scale that leaked into the norms
    # (norm(s ∇nll) / (norm(s ∇g) + 1e-4)) would then visibly change the weight.
    g_norm_unit = torch.autograd.grad(-linear_disc(1.0, 0.0, 3)(rec).mean(), W, retain_graph=True)[0].norm()
    disc = linear_disc((1e-4 / g_norm_unit).item(), 0.0, channels=3)
    # logvar 10 divides ∇nll by e^10 so the ratio stays below the 1e4 clamp
    fn = vae_loss(perceptual_weight=0.0, disc_start_step=0, logvar_init=10.0)
    weights = {}
    for scale in (1.0, 2.0 ** 16, 2.0 ** -8):
        _, log = fn.generator_loss(x, rec, post, 0, discriminator=disc, last_layer=W, grad_scale=scale)
        weights[scale] = log["d_weight"].item()
    assert weights[2.0 ** 16] == pytest.approx(weights[1.0], rel=1e-5)
    assert weights[2.0 ** -8] == pytest.approx(weights[1.0], rel=1e-5)
    nll = ((x - rec) ** 2 / math.exp(10.0) + 10.0).sum() / 2
    gn = torch.autograd.grad(nll, W, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(-disc(rec).mean(), W, retain_graph=True)[0].norm()
    assert weights[1.0] == pytest.approx((gn / (gg + 1e-4)).item(), rel=1e-5) and weights[1.0] < 1e4
    naive = (2 ** 16 * gn) / (2 ** 16 * gg + 1e-4)  # the test is sensitive: naive scaling differs by ~2x
    assert abs(naive.item() - weights[1.0]) > 0.3 * weights[1.0]
    # An overflowing fp16 step (inf scale -> inf/nan grads): weight 0, the GradScaler skips the step anyway.
    _, log = fn.generator_loss(x, rec, post, 0, discriminator=disc, last_layer=W, grad_scale=float("inf"))
    assert log["d_weight"].item() == 0.0 and math.isfinite(log["loss"].item())


# ----------------------------------------------------------------------------- disc_start_step
class CountingDisc(NLayerDiscriminator):
    calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


def test_switch_at_disc_start_step():
    vae, _, x = _tiny_setup()
    torch.manual_seed(1)
    disc = CountingDisc(ndf=8, n_layers=2)
    fn = vae_loss(perceptual_weight=0.0, disc_start_step=7)
    W = vae.decoder.conv_out.weight
    rec, post = vae(x)
    loss6, log6 = fn.generator_loss(x, rec, post, 6, discriminator=disc, last_layer=W)
    d6, dlog6 = fn.discriminator_loss(disc, x, rec, 6)
    assert disc.calls == 0  # no discriminator forward before the start step
    assert log6["g_loss"].item() == 0 and log6["disc_factor"].item() == 0 and log6["d_weight"].item() == 0
    assert loss6.item() == pytest.approx(log6["nll_loss"].item() + 1e-6 * log6["kl_loss"].item(), rel=1e-6)
    assert d6.item() == 0 and not d6.requires_grad and all(v.item() == 0 for v in dlog6.values())

    loss7, log7 = fn.generator_loss(x, rec, post, 7, discriminator=disc, last_layer=W)
    assert disc.calls == 1
    assert log7["disc_factor"].item() == 1 and log7["d_weight"].item() > 0 and log7["g_loss"].item() != 0
    assert loss7.item() == pytest.approx(loss6.item() + (log7["d_weight"] * log7["g_loss"]).item(), rel=1e-5)
    d7, dlog7 = fn.discriminator_loss(disc, x, rec, 7)
    assert disc.calls == 3 and d7.requires_grad
    assert d7.item() == pytest.approx(hinge_d_loss(disc(x), disc(rec)).item(), rel=1e-6)
    with pytest.raises(ValueError, match="discriminator"):
        fn.generator_loss(x, rec, post, 7, last_layer=W)


def test_validation_without_grad_gives_zero_d_weight():
    vae, disc, x = _tiny_setup()
    fn = vae_loss(perceptual_weight=0.0, disc_start_step=0)
    with torch.no_grad():
        rec, post = vae(x)
        loss, log = fn.generator_loss(x, rec, post, 10, discriminator=disc)  # no last_layer needed
    assert log["d_weight"].item() == 0 and log["g_loss"].item() != 0
    assert loss.item() == pytest.approx(log["nll_loss"].item() + 1e-6 * log["kl_loss"].item(), rel=1e-6)


# ----------------------------------------------------------------------------- gradient isolation
def test_generator_step_leaves_discriminator_gradients_untouched():
    vae, disc, x = _tiny_setup()
    disc.main[0].bias.requires_grad_(False)  # a parameter the caller froze stays frozen
    rec, post = vae(x)
    fn = vae_loss(perceptual_weight=0.0, disc_start_step=0)
    loss, _ = fn.generator_loss(x, rec, post, 0, discriminator=disc, last_layer=vae.decoder.conv_out.weight)
    loss.backward()
    assert all(p.grad is None for p in disc.parameters())
    frozen = [n == "main.0.bias" for n, _ in disc.named_parameters()]
    assert [not p.requires_grad for p in disc.parameters()] == frozen
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.parameters())


def test_discriminator_step_leaves_vae_gradients_untouched():
    vae, disc, x = _tiny_setup()
    rec, post = vae(x)
    fn = vae_loss(perceptual_weight=0.0, disc_start_step=0, disc_loss_type="vanilla")
    d_loss, _ = fn.discriminator_loss(disc, x, rec, 0)  # rec is not detached by the caller
    d_loss.backward()
    assert all(p.grad is None for p in vae.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters())


def test_lpips_trains_the_vae_but_not_itself(vl_lpips):
    vae, _, x = _tiny_setup()
    W = vae.decoder.conv_out.weight
    rec, post = vae(x)
    loss, log = vl_lpips.generator_loss(x, rec, post, 0)
    grad_with, = torch.autograd.grad(loss, W, retain_graph=True)
    p = vl_lpips.lpips(x, rec)
    assert log["p_loss"].item() == pytest.approx(p.mean().item(), rel=1e-6) and p.shape == (2, 1, 1, 1)
    # The perceptual part of the gradient is exactly that of 0.5 * LPIPS summed over C*H*W pixels / B.
    grad_p, = torch.autograd.grad(0.5 * p.sum() * (3 * 32 * 32) / 2, W, retain_graph=True)
    grad_pixel, = torch.autograd.grad(((x - rec) ** 2).sum() / 2 + 1e-6 * kl_loss(post.mean, post.logvar), W,
                                      retain_graph=True)
    assert grad_p.norm() > 1e-3 * grad_pixel.norm() > 0
    assert torch.allclose(grad_with, grad_pixel + grad_p, rtol=1e-4, atol=1e-6)
    loss.backward()
    assert all(q.grad is None and not q.requires_grad for q in vl_lpips.lpips.parameters())
    assert W.grad is not None


def test_lpips_stays_eval_frozen_and_autocast_safe(vl_lpips):
    vl_lpips.train()
    assert not any(m.training for m in vl_lpips.lpips.modules())
    assert vl_lpips.training  # only the LPIPS subtree is pinned to eval
    x, y = photo("astronaut", 32), photo("chelsea", 32)
    a, b = vl_lpips.lpips(x, y), vl_lpips.lpips(x, y)  # dropout in the linear layers would differ
    assert torch.equal(a, b) and a.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c = vl_lpips.lpips(x.bfloat16(), y.bfloat16())
    assert c.dtype == torch.float32
    assert torch.equal(c, vl_lpips.lpips(x.bfloat16().float(), y.bfloat16().float()))
    assert isinstance(vl_lpips.lpips, LPIPS)
    assert vae_loss(perceptual_weight=0.0).lpips is None


# ----------------------------------------------------------------------------- LPIPS vs the lpips package
def _package_lpips(**kw):
    import warnings

    import lpips
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lpips.LPIPS(net="vgg", verbose=False, **kw)


def _lpips_pairs():
    a, c, h = photo("astronaut", 64), photo("coffee", 64), photo("chelsea", 64)
    return torch.cat([a, a, c]), torch.cat([noisy(a, 0.1, 0).clamp(-1, 1), c, h])


def test_lpips_random_backbone_matches_lpips_package(vl_lpips):
    ours = vl_lpips.lpips
    ref = _package_lpips(pnet_rand=True)
    ref.load_state_dict(ours.model.state_dict())
    x, y = _lpips_pairs()
    with torch.no_grad():
        out, expected = ours(x, y), ref(x, y)
    assert out.shape == (3, 1, 1, 1)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-7)
    assert out.min() > 0
    # the linear layers are the package's shipped v0.1 VGG calibration, not random
    import lpips
    shipped = torch.load(os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth"),
                         map_location="cpu", weights_only=True)
    for k, v in shipped.items():
        assert torch.equal(ours.model.state_dict()[k], v), k


def _random_vgg16_state_dict(classifier=True):
    """A *random* VGG16 in torchvision's key layout (feature convs ~ He init, classifier zeros); without
    `classifier`, only the `features` LPIPS reads."""
    import torchvision
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in torchvision.models.vgg16().state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {}
    for k, shape in shapes.items():
        if k.startswith("features") and k.endswith("weight"):
            state[k] = torch.randn(shape, generator=g) * math.sqrt(2.0 / (shape[1] * shape[2] * shape[3]))
        elif k.startswith("features"):
            state[k] = 0.01 * torch.randn(shape, generator=g)
        elif classifier:
            state[k] = torch.zeros(shape)
    return state


def _cached_random_vgg16(tmp_path, monkeypatch, classifier):
    """A random VGG16 state dict saved where torchvision caches vgg16-397923af.pth, in a temporary TORCH_HOME,
    in torchvision's legacy (2017, non-zip) serialisation like the real file. Returns the dict."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(losses, "VGG16_URL", UNREACHABLE_URL)
    path = tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth"
    assert losses.vgg16_weights_path() == str(path)
    path.parent.mkdir(parents=True)
    state = _random_vgg16_state_dict(classifier)
    torch.save(state, path, _use_new_zipfile_serialization=False)
    return state


def test_lpips_real_path_loads_torchvision_cached_vgg16(tmp_path, monkeypatch):
    """The non-random path, without downloading anything: a *randomly initialised* VGG16 (not ImageNet
    weights; only its `features`, the part LPIPS reads) in the cache; our LPIPS loads it into the backbone."""
    state = _cached_random_vgg16(tmp_path, monkeypatch, classifier=False)
    ours = LPIPS(download=False)
    for key, value in ours.model.net.state_dict().items():  # sliceK.N.weight <- features.N.weight
        assert torch.equal(value, state["features." + key.split(".", 1)[1]]), key
    assert not any(p.requires_grad for p in ours.parameters())


@pytest.mark.slow  # the whole VGG16 file, classifier included, which torchvision loads strictly
def test_lpips_real_path_agrees_with_the_lpips_package(tmp_path, monkeypatch):
    """Our LPIPS on a cached random VGG16 agrees with the lpips package's own pretrained path, which reads the
    same cached file through torchvision (torchvision does not hash-check a cached file)."""
    state = _cached_random_vgg16(tmp_path, monkeypatch, classifier=True)
    ours = LPIPS()
    for key, value in ours.model.net.state_dict().items():
        assert torch.equal(value, state["features." + key.split(".", 1)[1]]), key
    ref = _package_lpips(pnet_rand=False)
    x, y = _lpips_pairs()
    with torch.no_grad():
        assert torch.allclose(ours(x, y), ref(x, y), rtol=1e-5, atol=1e-7)
    assert not any(p.requires_grad for p in ours.parameters())


def test_lpips_missing_weights_raises_clear_error_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(losses, "VGG16_URL", UNREACHABLE_URL)  # offline: the download attempt fails at once
    start = time.monotonic()
    with pytest.raises(LPIPSWeightsError) as err:
        vae_loss(perceptual_weight=0.5)
    assert time.monotonic() - start < 30
    msg = str(err.value)
    assert isinstance(err.value, RuntimeError) and "\n" not in msg  # one line
    assert "vgg16-397923af.pth" in msg and str(tmp_path / "hub" / "checkpoints") in msg
    assert "$TORCH_HOME/hub/checkpoints/" in msg and "loss.perceptual_weight: 0" in msg
    assert os.listdir(tmp_path / "hub" / "checkpoints") == []  # no partial download left behind
    assert vae_loss(perceptual_weight=0.0).lpips is None  # the advertised way out works offline


def test_lpips_unreadable_weights_file_raises_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"<html>proxy error page, not a checkpoint</html>")
    message = "cannot read .*vgg16-397923af.pth.*perceptual_weight: 0"
    with pytest.raises(LPIPSWeightsError, match=message) as e:
        LPIPS()
    assert "\n" not in str(e.value)
    torch.save({"classifier.0.weight": torch.zeros(2, 2)}, path)  # readable, but not VGG16
    with pytest.raises(LPIPSWeightsError, match="not a torchvision VGG16 state dict"):
        LPIPS()


def test_lpips_download_attempt_has_a_socket_timeout(tmp_path, monkeypatch):
    """The download runs under a socket timeout (a dead network cannot hang training) which is restored."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    seen = {}

    def fake_download(url, dst, hash_prefix=None, progress=True):
        seen.update(url=url, dst=dst, hash=hash_prefix, timeout=socket.getdefaulttimeout())
        raise TimeoutError("timed out")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    before = socket.getdefaulttimeout()
    with pytest.raises(LPIPSWeightsError, match="TimeoutError"):
        LPIPS()
    assert seen == dict(url=losses.VGG16_URL, dst=losses.vgg16_weights_path(), hash="397923af",
                        timeout=losses.DOWNLOAD_TIMEOUT_S)
    assert socket.getdefaulttimeout() == before


# ----------------------------------------------------------------------------- discriminator
def test_discriminator_structure_matches_taming():
    torch.manual_seed(0)
    d = NLayerDiscriminator()  # input_nc=3, ndf=64, n_layers=3
    convs = [m for m in d.main if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.in_channels for c in convs] == [3, 64, 128, 256, 512]
    assert all(c.kernel_size == (4, 4) and c.padding == (1, 1) for c in convs)
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert [c.bias is not None for c in convs] == [True, False, False, False, True]
    bns = [m for m in d.main if isinstance(m, nn.BatchNorm2d)]
    assert [b.num_features for b in bns] == [128, 256, 512]
    acts = [m for m in d.main if isinstance(m, nn.LeakyReLU)]
    assert len(acts) == 4 and all(a.negative_slope == 0.2 for a in acts)
    assert len(d.main) == 12
    # taming/LDM checkpoint names (loss.discriminator.main.N.*)
    assert [k for k in d.state_dict() if k.endswith(("weight", "bias"))] == [
        "main.0.weight", "main.0.bias", "main.2.weight", "main.3.weight", "main.3.bias", "main.5.weight",
        "main.6.weight", "main.6.bias", "main.8.weight", "main.9.weight", "main.9.bias", "main.11.weight",
        "main.11.bias"]
    assert d(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)  # 70x70 PatchGAN: 256 -> 30x30
    assert d(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    # weights_init statistics: conv N(0, 0.02); BN weight N(1, 0.02), bias 0
    conv_w = torch.cat([c.weight.flatten() for c in convs])
    assert abs(conv_w.mean().item()) < 1e-3 and conv_w.std().item() == pytest.approx(0.02, rel=0.02)
    bn_w = torch.cat([b.weight for b in bns])
    assert bn_w.mean().item() == pytest.approx(1.0, abs=3e-3)
    assert bn_w.std().item() == pytest.approx(0.02, rel=0.1)
    assert all(torch.equal(b.bias, torch.zeros_like(b.bias)) for b in bns)
    small = NLayerDiscriminator(input_nc=1, ndf=8, n_layers=5)  # channels cap at 8 * ndf
    assert [c.out_channels for c in small.main if isinstance(c, nn.Conv2d)] == [8, 16, 32, 64, 64, 64, 1]
    with torch.no_grad():  # weights_init is a plain function usable with .apply
        small.main[0].weight.fill_(5.0)
    small.apply(weights_init)
    assert small.main[0].weight.abs().max() < 0.2


def test_discriminator_converts_to_syncbatchnorm():
    torch.manual_seed(0)
    d = NLayerDiscriminator(ndf=8, n_layers=3).eval()
    x = photo("rocket", 32).repeat(2, 1, 1, 1)
    ref = d(x)
    state = {k: v.clone() for k, v in d.state_dict().items()}
    s = nn.SyncBatchNorm.convert_sync_batchnorm(d)
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in s.modules()) == 3
    assert not any(type(m) is nn.BatchNorm2d for m in s.modules())
    assert s.state_dict().keys() == state.keys()
    assert torch.allclose(s.eval()(x), ref)
    s.apply(weights_init)  # weights_init also recognises SyncBatchNorm
    bn = [m for m in s.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in bn)
    assert all((m.weight - 1).abs().max() < 0.15 for m in bn)


@pytest.fixture
def single_process_group(tmp_path):
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.fail("a process group is already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_ddp_wrapped_discriminator(single_process_group):
    """D under DDP: the D step takes the wrapper (two forwards, one backward, repeated); the generator step
    unwraps it and gives the same numbers as with the bare module, with no gradient on D. (Plain
    BatchNorm here: DDP refuses SyncBatchNorm on CPU modules.)"""
    vae, _, x = _tiny_setup()
    torch.manual_seed(3)
    disc = NLayerDiscriminator(ndf=8, n_layers=2)
    ddp = nn.parallel.DistributedDataParallel(disc)
    fn = vae_loss(perceptual_weight=0.0, disc_start_step=0)
    W = vae.decoder.conv_out.weight
    for _ in range(2):
        rec, post = vae(x)
        loss_w, log_w = fn.generator_loss(x, rec, post, 1, discriminator=ddp, last_layer=W)
        _, log_b = fn.generator_loss(x, rec, post, 1, discriminator=disc, last_layer=W)
        assert torch.allclose(log_w["d_weight"], log_b["d_weight"]) and log_w["g_loss"] == log_b["g_loss"]
        loss_w.backward()
        assert all(p.grad is None for p in disc.parameters())
        d_loss, _ = fn.discriminator_loss(ddp, x, rec, 1)
        d_loss.backward()
        assert all(p.grad is not None for p in disc.parameters())
        disc.zero_grad(set_to_none=True)
        vae.zero_grad(set_to_none=True)


def test_with_project_vae_end_to_end():
    """One generator + discriminator step with the project's AutoencoderKL (tiny config)."""
    from vae import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4)
    disc = NLayerDiscriminator(ndf=8, n_layers=2)
    x = torch.cat([photo("astronaut", 32), photo("chelsea", 32)])
    out = vae(x, sample_posterior=True, generator=torch.Generator().manual_seed(0))
    fn = vae_loss(perceptual_weight=0.0, disc_start_step=0, learn_logvar=True)
    loss, log = fn.generator_loss(x, out.sample, out.latent_dist, 0, discriminator=disc,
                                  last_layer=vae.decoder.conv_out.weight)
    assert torch.allclose(log["kl_loss"], out.latent_dist.kl().mean(), rtol=1e-5)
    assert log["d_weight"] > 0
    loss.backward()
    assert fn.logvar.requires_grad and fn.logvar.grad is not None  # learn_logvar: the VAE optimizer trains it
    assert all(p.grad is None for p in disc.parameters())
    assert vae.decoder.conv_out.weight.grad.abs().sum() > 0
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0
    vae.zero_grad(set_to_none=True)
    d_loss, _ = fn.discriminator_loss(disc, x, out.sample, 0)
    d_loss.backward()
    assert all(p.grad is None for p in vae.parameters())
    assert not vae_loss(perceptual_weight=0.0).logvar.requires_grad  # frozen by default, as LDM's in practice


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(TypeError, match="keyword"):  # no defaults of its own: config.py's are the ones
        VAELoss(perceptual_weight=0.0)
    with pytest.raises(ValueError, match="rec_loss_type"):  # (checked once, by config.py)
        vae_loss(rec_loss_type="l3", perceptual_weight=0.0)
    with pytest.raises(ValueError, match="disc_loss_type"):
        vae_loss(disc_loss_type="wgan", perceptual_weight=0.0)
    with pytest.raises(ValueError, match="kl_weight"):
        vae_loss(kl_weight=-1.0, perceptual_weight=0.0)
    fn = vae_loss(perceptual_weight=0.0, disc_start_step=0)
    with pytest.raises(ValueError, match="shape"):
        fn.generator_loss(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9), POST, 0)
    vae, disc, x = _tiny_setup()
    rec, post = vae(x)
    with pytest.raises(ValueError, match="last_layer"):
        fn.generator_loss(x, rec, post, 0, discriminator=disc)
    with pytest.raises(ValueError, match="11x11"):
        ssim(torch.zeros(1, 3, 10, 32), torch.zeros(1, 3, 10, 32))


# ----------------------------------------------------------------------------- metrics vs scikit-image
def _metric_pairs():
    """(reference, distorted) pairs of real photos at 128x128 (and one 96x128, one grayscale)."""
    pairs = []
    for i, name in enumerate(("astronaut", "coffee", "chelsea")):
        img = photo(name, 128)
        for j, sigma in enumerate((0.02, 0.1, 0.3)):  # light to heavy noise, out-of-range values included
            pairs.append((img, noisy(img, sigma, seed=10 * i + j)))
    pairs.append((photo("astronaut", 128), photo("coffee", 128)))  # two different photos
    blur = F.avg_pool2d(photo("chelsea", 128), 3, stride=1, padding=1, count_include_pad=False)
    pairs.append((photo("chelsea", 128), blur))
    return pairs


def test_psnr_and_ssim_match_scikit_image_per_image():
    pairs = _metric_pairs()
    pairs.append((photo("rocket", 128, crop=(96, 128)), noisy(photo("rocket", 128, crop=(96, 128)), 0.05, 1)))
    pairs.append((photo("camera", 128), noisy(photo("camera", 128), 0.05, 2)))  # grayscale, C = 1
    for a, b in pairs:
        p, s = psnr(a, b), ssim(a, b)
        assert p.shape == (1,) and s.shape == (1,)
        assert abs(p.item() - sk_psnr(a[0], b[0])) < 0.01
        ref = sk_ssim(a[0], b[0])
        assert abs(s.item() - ref) < 0.005
        assert abs(s.item() - ref) < 1e-4  # in practice far tighter than required


def test_psnr_and_ssim_match_scikit_image_for_a_batch():
    pairs = _metric_pairs()
    a, b = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    p, s = psnr(a, b), ssim(a, b)
    assert p.shape == s.shape == (len(pairs),)
    sk_p = np.array([sk_psnr(x, y) for x, y in zip(a, b)])
    sk_s = np.array([sk_ssim(x, y) for x, y in zip(a, b)])
    assert np.abs(p.numpy() - sk_p).max() < 0.01 and np.abs(s.numpy() - sk_s).max() < 0.005
    assert abs(p.mean().item() - sk_p.mean()) < 0.01 and abs(s.mean().item() - sk_s.mean()) < 0.005
    assert len(set(np.round(sk_s, 3))) > 5 and sk_s.min() < 0.5 < sk_s.max()  # a spread of qualities
    x = photo("coffee", 64)
    assert psnr(x, x).item() == math.inf and ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
