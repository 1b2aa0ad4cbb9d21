"""Training losses and image metrics for the SD 1.5 VAE.

The objective is LDM's ``LPIPSWithDiscriminator`` (CompVis latent-diffusion,
``ldm/modules/losses/contperceptual.py``) built from taming-transformers' pieces
(``taming/modules/losses/vqperceptual.py``, ``taming/modules/discriminator/model.py``), with the
fixes other trainers lack: LPIPS trains the VAE (no ``no_grad``), the generator step never writes
discriminator gradients, the discriminator step never writes VAE gradients, and the adaptive GAN
weight is computed correctly under an fp16 GradScaler.

Intended use (the pattern train.py and lightning_module.py follow)::

    loss_fn = VAELoss(**settings)    # config.py's `loss` section, less disc_num_layers/disc_ndf (D's size)
    out = vae(x, sample_posterior=True)
    g_total, g_log = loss_fn.generator_loss(x, out.sample, out.latent_dist, step,
                                            discriminator=disc, last_layer=vae.decoder.conv_out.weight,
                                            grad_scale=scaler.get_scale() if fp16 else 1.0)
    if step >= loss_fn.disc_start_step:                    # the caller skips the D step before it
        d_total, d_log = loss_fn.discriminator_loss(disc_ddp, x, out.sample, step)

Losses log nothing: the returned dicts hold detached scalars for the caller to log.
Metrics: ``psnr``/``ssim`` (per image, match scikit-image) and ``LPIPS`` (under ``torch.no_grad``).
"""
import os
import socket
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

VGG16_FILENAME = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16; the name carries its sha256 prefix
VGG16_URL = "https://download.pytorch.org/models/" + VGG16_FILENAME
DOWNLOAD_TIMEOUT_S = 30  # per socket operation: a dead network fails instead of hanging


class LPIPSWeightsError(RuntimeError):
    """The VGG16 backbone LPIPS needs is missing (and could not be downloaded) or unreadable."""


NO_LPIPS = "training: loss.perceptual_weight: 0; infer.py --eval: --lpips off"


def _one_line(e: Exception) -> str:  # an exception as `Type: text` on one line, for the messages below
    return " ".join(f"{type(e).__name__}: {e}".split())


def vgg16_weights_path() -> str:
    """Where torchvision caches the VGG16 weights: $TORCH_HOME/hub/checkpoints/vgg16-397923af.pth."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", VGG16_FILENAME)


def download_to_cache(url, path, hash_prefix=None):
    """One download of `url` to `path` (torch.hub's cache) under a DOWNLOAD_TIMEOUT_S socket timeout, so that
    an offline machine fails at once instead of hanging; errors propagate (the caller says what to do)."""
    previous = socket.getdefaulttimeout()
    try:
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.hub.download_url_to_file(url, path, hash_prefix=hash_prefix, progress=False)
    finally:
        socket.setdefaulttimeout(previous)


def _ensure_vgg16_weights(download: bool) -> str:
    # We look for the cached file ourselves before anything touches the network, so an offline machine gets a
    # clear error at once instead of a hang or a traceback from deep inside torchvision.
    path, why = vgg16_weights_path(), "no download tried"
    if os.path.isfile(path):
        return path
    if download:
        try:
            download_to_cache(VGG16_URL, path, hash_prefix="397923af")
            return path
        except Exception as e:  # no network, proxy, bad hash, read-only cache...
            why = f"the download from {VGG16_URL} failed: {_one_line(e)}"
    raise LPIPSWeightsError(
        f"LPIPS needs torchvision's ImageNet VGG16 weights '{VGG16_FILENAME}', which are not at {path} "
        f"({why}). Copy the file into $TORCH_HOME/hub/checkpoints/ (here {os.path.dirname(path)}), or do "
        f"without LPIPS ({NO_LPIPS})")


def _read_vgg16_features(path: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LPIPSWeightsError(f"cannot read {path} ({_one_line(e)}); delete it to re-download, "
                                f"or do without LPIPS ({NO_LPIPS})") from e
    state = state if isinstance(state, dict) else {}
    features = {k: v for k, v in state.items() if k.startswith("features.")}
    if not features:  # checked here, before the slow build of the network
        raise LPIPSWeightsError(f"{path} is not a torchvision VGG16 state dict")
    return features  # without the 120M-parameter classifier


class LPIPS(nn.Module):
    """LPIPS-VGG (Zhang et al. 2018) from the ``lpips`` package, with its shipped v0.1 linear layers.

    Frozen (no parameter takes a gradient, the module stays in eval mode even under a parent's
    ``.train()``), but differentiable with respect to its inputs: it is a training loss for the VAE.
    Runs in fp32 even under autocast: its feature normalisation divides by sqrt(sum of squares) + 1e-10,
    and in fp16 that sum can overflow and the 1e-10 rounds to 0 (0/0 on dead ReLU features).
    Inputs in [-1, 1], (B, 3, H, W); output (B, 1, 1, 1). As a metric, call it under ``torch.no_grad()``.
    ``random_backbone=True`` keeps a randomly initialised VGG16 (tests only: no weights needed).
    ``download=False`` uses the cached VGG16 only (infer.py's ``--lpips auto``): missing, it is an error.
    """

    def __init__(self, random_backbone: bool = False, download: bool = True):
        super().__init__()
        import lpips  # imported here: only runs that use the perceptual loss pay for it

        # Find and read the backbone first: a missing or broken file fails before the slow build below.
        features = None if random_backbone else _read_vgg16_features(_ensure_vgg16_weights(download))
        with warnings.catch_warnings():  # torchvision's `pretrained=` deprecation, raised inside lpips
            warnings.simplefilter("ignore", UserWarning)
            # pnet_rand=True: lpips builds a random VGG16 without touching the network; the ImageNet
            # backbone is loaded below from torchvision's cache, where we control the failure mode.
            self.model = lpips.LPIPS(net="vgg", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
        if features is not None:
            # lpips splits torchvision's `features` into slice1..slice5 but keeps the layer indices:
            # `slice3.10.weight` is torchvision's `features.10.weight`.
            mapped = {}
            for key in self.model.net.state_dict():
                _, index, name = key.split(".")
                source = f"features.{index}.{name}"
                if source not in features:
                    raise LPIPSWeightsError(f"{vgg16_weights_path()} is not a torchvision VGG16 state dict "
                                            f"(no '{source}')")
                mapped[key] = features[source]
            self.model.net.load_state_dict(mapped)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # always eval: lpips' linear layers carry Dropout

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.model(x.float(), y.float())


# ----------------------------------------------------------------------------- discriminator
class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator of pix2pix, as in taming-transformers (``discriminator/model.py``).

    Conv(k4, s2) + LeakyReLU(0.2); then ``n_layers - 1`` Conv(k4, s2) + BatchNorm + LeakyReLU; one
    Conv(k4, s1) + BatchNorm + LeakyReLU; a last Conv(k4, s1) to one channel of patch logits. Convs
    followed by BatchNorm have no bias. Channels double up to 8 * ndf. Module names (``main.N``) match
    taming/LDM checkpoints. Plain ``nn.BatchNorm2d``: under DDP, ``nn.SyncBatchNorm.
    convert_sync_batchnorm(disc)`` swaps them in place and keeps the state dict.
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(input_nc, ndf, kernel_size=4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        channels = ndf
        for n in range(1, n_layers + 1):
            out = ndf * min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(channels, out, kernel_size=4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(out), nn.LeakyReLU(0.2, True)]
            channels = out
        layers.append(nn.Conv2d(channels, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)  # taming applies it right after construction too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def weights_init(m: nn.Module) -> None:
    """DCGAN/taming init: conv weights N(0, 0.02); BatchNorm (SyncBatchNorm too) weight N(1, 0.02), bias 0."""
    if isinstance(m, nn.modules.conv._ConvNd):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.modules.batchnorm._BatchNorm):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------- loss terms
def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """taming: 0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x̂))))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """taming: 0.5 * (mean(softplus(-D(x))) + mean(softplus(D(x̂)))), i.e. the non-saturating BCE."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over C, H, W and averaged over the batch (LDM)."""
    mean, logvar = mean.float(), logvar.float()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1).mean()


def adaptive_weight(nll_loss, g_loss, last_layer, grad_scale=1.0) -> torch.Tensor:
    """LDM/taming's ``calculate_adaptive_weight``: ||∇_W nll|| / (||∇_W g|| + 1e-4), clamped to [0, 1e4].

    Gradients are taken of ``grad_scale * loss`` (under fp16 the backward through half activations
    underflows without the GradScaler's scale) and the norms divided by it again, so the result equals
    the fp32 formula, the 1e-4 included. ``torch.autograd.grad`` fills no ``.grad`` and fires no DDP
    hook, so this is local to each rank (as in LDM). Non-finite gradients (an overflowing fp16 step,
    which the scaler skips anyway) give 0. The result is detached.
    """
    nll_grad, = torch.autograd.grad(nll_loss * grad_scale, last_layer, retain_graph=True)
    g_grad, = torch.autograd.grad(g_loss * grad_scale, last_layer, retain_graph=True)
    nll_norm = nll_grad.float().norm() / grad_scale
    g_norm = g_grad.float().norm() / grad_scale
    weight = nll_norm / (g_norm + 1e-4)
    # torch.where, not `if`: no host sync in the training step
    return torch.where(torch.isfinite(weight), weight.clamp(0.0, 1e4), torch.zeros_like(weight)).detach()


class VAELoss(nn.Module):
    """The VAE objective of LDM's ``LPIPSWithDiscriminator``, split into a generator and a discriminator call.

    Generator: nll + kl_weight * KL + d_weight * disc_factor * g_loss, where per pixel
    ``rec = |x - x̂|`` (l1) or ``(x - x̂)²`` (l2), ``rec += perceptual_weight * LPIPS(x, x̂)`` (one value
    per image, broadcast over its pixels), ``nll = rec / exp(logvar) + logvar``.

    Why sums over C, H, W (divided only by the batch size, as LDM does) rather than means: the SD/LDM
    hyper-parameters were tuned at that scale. ``kl_weight = 1e-6`` weighs a KL summed over the latent
    (4x32x32 at LDM's 256² training) against a reconstruction summed over 3x256x256 = 196,608 values;
    with a per-pixel mean the reconstruction would shrink ~2e5x (~8e5x at 512²) and the same 1e-6
    would let the KL dominate (blurry, over-regularised latents). The learning rate (4.5e-6, LDM's base
    rate, which its main.py multiplies by batch x GPUs x accumulation) was tuned on gradients of this
    size too: Adam's step is invariant to a constant loss factor only up to its eps (1e-8), which
    per-pixel-mean gradients (~1e5x smaller) approach, and gradient clipping at a fixed norm is not
    invariant at all. (The adaptive GAN weight is a ratio and does not care.)

    ``logvar`` is LDM's scalar "learned" log-variance. LDM registers it as a parameter but never gives
    it to an optimizer, so it stays at ``logvar_init``; ours is frozen the same way unless
    ``learn_logvar=True`` (then the caller adds ``loss.logvar`` to the VAE optimizer). LDM's optional
    per-pixel ``weights`` for the nll are not supported (nothing in SD training uses them).

    The settings, their defaults (SD's) and their checks are config.py's ``loss`` section; each is passed by
    keyword. ``rec_loss_type``: "l1" | "l2"; ``disc_loss_type``: "hinge" | "vanilla".
    """

    def __init__(self, *, rec_loss_type, kl_weight, perceptual_weight, disc_weight, disc_start_step,
                 disc_loss_type, learn_logvar, logvar_init, random_lpips_backbone):
        super().__init__()
        for name, value in (("kl_weight", kl_weight), ("perceptual_weight", perceptual_weight),
                            ("disc_weight", disc_weight)):
            if value < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {value}")
        self.rec_loss_type = rec_loss_type
        self.rec_loss_fn = {"l1": torch.abs, "l2": torch.square}[rec_loss_type]
        self.kl_weight = kl_weight
        self.perceptual_weight = perceptual_weight
        self.disc_weight = disc_weight
        self.disc_start_step = disc_start_step
        self.disc_loss_type = disc_loss_type
        self.disc_loss_fn = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}[disc_loss_type]
        self.logvar = nn.Parameter(torch.tensor(float(logvar_init)), requires_grad=learn_logvar)
        self.lpips = LPIPS(random_backbone=random_lpips_backbone) if perceptual_weight > 0 else None

    def generator_loss(self, inputs, reconstructions, posterior, global_step, discriminator=None,
                       last_layer=None, grad_scale=1.0):
        """Total VAE loss and its detached parts (loss, rec_loss, p_loss, nll_loss, kl_loss, g_loss,
        d_weight, disc_factor, logvar). ``posterior``: anything with ``.mean`` and ``.logvar``.

        ``discriminator`` should be the bare module; a DDP wrapper is unwrapped here. Running D's DDP
        forward in the generator step would arm D's gradient reducer for a backward that (D being frozen
        here) produces no D gradient: wasted or mismatched all-reduces. D is synchronised by its own step.
        ``last_layer``: ``vae.decoder.conv_out.weight``. ``grad_scale``: the GradScaler's current scale
        under fp16 (1.0 otherwise). Before ``disc_start_step`` the adversarial term is 0 and D is not run.
        Without autograd (validation under ``no_grad``) d_weight is 0, as in LDM's eval fallback.
        """
        if inputs.shape != reconstructions.shape:
            raise ValueError(f"inputs {tuple(inputs.shape)} and reconstructions "
                             f"{tuple(reconstructions.shape)} differ in shape")
        x, x_rec = inputs.float(), reconstructions.float()  # sums over ~1e6 values: never in fp16
        rec = self.rec_loss_fn(x - x_rec)  # (B, C, H, W)
        rec_with_p = rec
        p_loss = x.new_zeros(())
        if self.lpips is not None and self.perceptual_weight > 0:
            p = self.lpips(x, x_rec)  # (B, 1, 1, 1): broadcast over C, H, W as in LDM
            rec_with_p = rec + self.perceptual_weight * p
            p_loss = p.mean()
        nll = rec_with_p / torch.exp(self.logvar) + self.logvar
        nll_loss = nll.sum() / nll.shape[0]
        kl = kl_loss(posterior.mean, posterior.logvar)

        zero = x.new_zeros(())
        g_loss, d_weight = zero, zero
        disc_factor = 1.0 if global_step >= self.disc_start_step else 0.0  # taming's adopt_weight
        if disc_factor > 0 and self.disc_weight > 0:
            if discriminator is None:
                raise ValueError(f"generator_loss needs the discriminator from step {self.disc_start_step}")
            disc = getattr(discriminator, "module", discriminator)  # the model inside a DDP wrapper
            # Freeze D while it judges x̂: gradients flow through it to x̂ but none lands on D's
            # parameters (the autograd graph records them as constants).
            trainable = [p for p in disc.parameters() if p.requires_grad]
            for p in trainable:
                p.requires_grad_(False)
            try:
                logits_fake = disc(reconstructions.contiguous())
            finally:
                for p in trainable:
                    p.requires_grad_(True)
            g_loss = -logits_fake.float().mean()
            if torch.is_grad_enabled() and nll_loss.requires_grad and g_loss.requires_grad:
                if last_layer is None:
                    raise ValueError("generator_loss needs last_layer (vae.decoder.conv_out.weight) for the "
                                     "adaptive GAN weight")
                d_weight = adaptive_weight(nll_loss, g_loss, last_layer, grad_scale) * self.disc_weight

        loss = nll_loss + self.kl_weight * kl + d_weight * disc_factor * g_loss
        log = {"loss": loss, "rec_loss": rec.mean(), "p_loss": p_loss, "nll_loss": nll_loss, "kl_loss": kl,
               "g_loss": g_loss, "d_weight": d_weight, "disc_factor": x.new_tensor(disc_factor),
               "logvar": self.logvar}
        return loss, {k: v.detach().clone() for k, v in log.items()}

    def discriminator_loss(self, discriminator, inputs, reconstructions, global_step):
        """Discriminator loss (hinge or vanilla) on real inputs vs detached reconstructions.

        ``discriminator`` may be the DDP wrapper (this step owns D's gradient synchronisation). Two
        separate D passes, real then fake, so BatchNorm sees each batch alone as in taming. Before
        ``disc_start_step`` it returns a zero loss without running D and **the caller must skip the D
        step** (check ``global_step >= loss_fn.disc_start_step``): the zero has no graph to backward.
        """
        if global_step < self.disc_start_step:
            zero = inputs.new_zeros((), dtype=torch.float32)
            return zero, {"d_loss": zero.clone(), "logits_real": zero.clone(), "logits_fake": zero.clone()}
        logits_real = discriminator(inputs.contiguous().detach()).float()
        logits_fake = discriminator(reconstructions.contiguous().detach()).float()  # no VAE gradient
        d_loss = self.disc_loss_fn(logits_real, logits_fake)
        return d_loss, {"d_loss": d_loss.detach().clone(), "logits_real": logits_real.detach().mean(),
                        "logits_fake": logits_fake.detach().mean()}


# ----------------------------------------------------------------------------- pixels
# The models take and give images in [-1, 1]; image files hold 8-bit values. These two are the project's one
# spelling of that mapping (data.py, infer.py, fid.py and the metrics below use them).
def from_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """8-bit values (uint8, or floats 0..255) -> float32 in [-1, 1]."""
    return pixels.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8, rounded to the nearest level (values outside [-1, 1] clamped)."""
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------- metrics
def _to_unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.detach().float() + 1.0) / 2.0).clamp(0.0, 1.0)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB, (B,), of images in [-1, 1] measured on [0, 1] (clamped), data_range 1:
    skimage's ``peak_signal_noise_ratio(a, b, data_range=1.0)``. Identical images give inf."""
    mse = (_to_unit(x) - _to_unit(y)).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse)


def _gaussian_taps(sigma: float, truncate: float, device) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)  # scipy.ndimage's radius: 5 for sigma 1.5 -> 11 taps
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    taps = torch.exp(-0.5 * (t / sigma) ** 2)
    return (taps / taps.sum()).to(device=device, dtype=torch.float32)


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM, (B,), of images in [-1, 1] measured on [0, 1] (clamped).

    Matches skimage's ``structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1.0, channel_axis=...)`` (Wang et al. 2004): an 11-tap
    Gaussian (skimage's truncate 3.5 -> radius int(3.5*1.5+0.5) = 5), C1 = 0.01², C2 = 0.03², population
    covariances, then the mean over each channel with a 5-pixel border cropped, averaged over channels.
    skimage filters the whole image with 'reflect' padding and then crops exactly the border the padding
    reached, so a padding-free ('valid') convolution gives the same numbers.
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim needs two (B, C, H, W) tensors of one shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    taps = _gaussian_taps(1.5, 3.5, x.device)
    b, c, h, w = x.shape
    if h < taps.numel() or w < taps.numel():
        raise ValueError(f"ssim needs images of at least {taps.numel()}x{taps.numel()} pixels, got {h}x{w}")
    x, y = _to_unit(x), _to_unit(y)
    stats = torch.cat([x, y, x * x, y * y, x * y]).reshape(5 * b * c, 1, h, w)
    stats = F.conv2d(stats, taps.view(1, 1, 1, -1))  # separable Gaussian, rows then columns
    stats = F.conv2d(stats, taps.view(1, 1, -1, 1))
    mu_x, mu_y, e_xx, e_yy, e_xy = stats.reshape(5, b, c, *stats.shape[-2:])
    var_x, var_y, cov = e_xx - mu_x ** 2, e_yy - mu_y ** 2, e_xy - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)
