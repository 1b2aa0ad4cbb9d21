"""Shared test fixtures. Tests run on CPU, offline, in seconds; diffusers is the numerical oracle."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# SD 1.5's VAE shape; the parity tests use it with random weights at small image sizes.
SD15 = dict(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_num_groups=32,
            sample_size=512, scaling_factor=0.18215)
# A tiny VAE (downsampling factor 2) for fast tests of everything that is not numerical parity.
TINY = dict(down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
            block_out_channels=[32, 64], layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32)


def perturb_(model, seed=0, scale=0.1):
    """Randomise GroupNorm weights and all biases: default init (ones/zeros) hides normalisation and bias bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.fixture(scope="session")
def sd_pair():
    """(diffusers AutoencoderKL, our AutoencoderKL) with the same perturbed random SD 1.5 weights, in eval mode."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from vae import AutoencoderKL
    torch.manual_seed(0)
    ref = perturb_(DiffusersAutoencoderKL(**SD15)).eval()
    ours = AutoencoderKL(**SD15).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def photo(name="astronaut", size=None):
    """A real photo from scikit-image as a (1, 3, H, W) tensor in [-1, 1], optionally resized to `size` (h, w)."""
    import numpy as np
    from PIL import Image
    from skimage import data
    img = getattr(data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    pil = Image.fromarray(img[..., :3])
    if size is not None:
        pil = pil.resize((size[1], size[0]), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    return x[None]


def write_photos(folder, names, short_side=40):
    """Save scikit-image photos `names` as PNGs in `folder`, resized to `short_side` px on the shorter side."""
    import numpy as np
    from PIL import Image
    from skimage import data
    os.makedirs(folder, exist_ok=True)
    for name in names:
        a = getattr(data, name)()
        img = Image.fromarray(np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3])
        s = short_side / min(img.size)
        img.resize((round(img.width * s), round(img.height * s)), Image.BICUBIC).save(f"{folder}/{name}.png")
    return str(folder)
