"""Shared test fixtures. Tests run on CPU, offline, in seconds; diffusers is the numerical oracle."""
import math
import os
import sys
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from vae import DEFAULT_CONFIG  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true",
                     help="also run the tests marked slow (multi-process, long training, large images)")


def pytest_collection_modifyitems(config, items):
    """`pytest` is the quick check; `pytest --slow` adds the tests marked slow."""
    if config.getoption("--slow"):
        return
    slow = [item for item in items if "slow" in item.keywords]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if "slow" not in item.keywords]

# SD 1.5's VAE config: the parity tests and the benchmarks (benchmarks/ imports this file) use it with random
# weights.
SD15 = dict(DEFAULT_CONFIG)
# A tiny VAE (downsampling factor 2) for fast tests of everything that is not numerical parity.
TINY = dict(down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
            block_out_channels=[32, 64], layers_per_block=1, latent_channels=4, norm_num_groups=8,
            sample_size=32)

# Photos of the tiny training runs (test_train.py, test_lightning.py): 6 training (3 batches of 2), 2 val.
TRAIN_PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field"]
VAL_PHOTOS = ["retina", "camera"]
# Photos of the streamed-data tests (test_streaming*.py), packed in WebDataset shards or a saved HF dataset.
STREAM_PHOTOS = TRAIN_PHOTOS + VAL_PHOTOS + ["coins", "moon", "page", "text"]


def make_pair(config):
    """(diffusers AutoencoderKL, our AutoencoderKL) with the same perturbed random weights, in eval mode."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from vae import AutoencoderKL
    torch.manual_seed(0)
    ref = perturb_(DiffusersAutoencoderKL(**config)).eval()
    ours = AutoencoderKL(**config).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.fixture(scope="module")
def sd_pair():
    """make_pair(SD15), built per module, not per session: two SD-size models held through the whole run
    would set its peak memory."""
    return make_pair(SD15)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (pytestmark = pytest.mark.usefixtures("one_thread")): runs in this
    process and in OMP_NUM_THREADS=1 subprocesses give bitwise equal results, and on a shared, oversubscribed
    2-core machine each multi-threaded small op can wait a scheduler slice for a descheduled worker (tests
    became 50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """(training folder, validation folder) of TRAIN_PHOTOS / VAL_PHOTOS, shorter side 40 px (32 px crops)."""
    root = tmp_path_factory.mktemp("photos")
    return write_photos(root / "train", TRAIN_PHOTOS, 40), write_photos(root / "val", VAL_PHOTOS, 40)


def tiny_config(workdir, photos, **overrides):
    """A tiny from-scratch training config as a plain dict (VAE [16, 32], downsampling 2, 32 px, no LPIPS, the
    discriminator from step 3) writing under `workdir`; `photos` from the fixture. overrides: {"section.key":
    value}."""
    raw = {
        "model": {"pretrained_model_name_or_path": None, "block_out_channels": [16, 32],
                  "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
                  "layers_per_block": 1, "norm_num_groups": 8},
        "training": {"batch_size": 2, "max_steps": 6, "precision": "32", "num_workers": 0,
                     "learning_rate": 1e-3,
                     "disc_learning_rate": 1e-3},
        "loss": {"perceptual_weight": 0.0, "disc_start_step": 3, "disc_ndf": 16, "disc_num_layers": 2},
        "data": {"dataset_name": None, "train_data_dir": photos[0], "val_data_dir": photos[1],
                 "resolution": 32,
                 "center_crop": False},
        "checkpoint": {"save_every_n_steps": 1000, "save_top_k": 1},
        "logging": {"log_every_n_steps": 1, "val_check_interval": 1000, "log_images_every_n_steps": 1000,
                    "progress_bar": False},
        "paths": {"output_dir": f"{workdir}/outputs", "log_dir": f"{workdir}/logs",
                  "checkpoint_dir": f"{workdir}/checkpoints"},
    }
    for key, value in overrides.items():
        section, name = key.split(".")
        raw[section][name] = value
    return raw


def perturb_(model, seed=0, scale=0.1):
    """Random GroupNorm weights and all biases, so that no layer is an identity (default init: ones/zeros
    hides normalisation and bias bugs). Used by the tests and the benchmarks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def photo(name="astronaut", size=None):
    """A real photo from scikit-image as a (1, 3, H, W) tensor in [-1, 1], resized to (h, w) `size` if
    given."""
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
    """Save scikit-image photos `names` as PNGs in `folder`, `short_side` px on their shorter side."""
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


def write_shards(folder, photo_dir, names, per_shard, corrupt=None):
    """WebDataset tars folder/000000.tar, ...: per sample <name>.png (a photo from photo_dir; for `corrupt`,
    its first 100 bytes) and <name>.txt (a caption). Returns the folder."""
    import io
    import tarfile
    os.makedirs(folder, exist_ok=True)
    for s in range(0, len(names), per_shard):
        with tarfile.open(f"{folder}/{s // per_shard:06d}.tar", "w") as tar:
            for name in names[s: s + per_shard]:
                png = open(f"{photo_dir}/{name}.png", "rb").read()
                for member, payload in ((f"{name}.png", png[:100] if name == corrupt else png),
                                        (f"{name}.txt", f"a photo: {name}".encode())):
                    info = tarfile.TarInfo(member)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(folder)


def which(ref, batches):
    """The name of every image in `batches` ({"pixel_values": (B, 3, H, W)} dicts) whose tensor is one of
    ref's ({name: (3, H, W)}, e.g. centre crops without flip), by exact equality."""
    out = []
    for b in batches:
        for x in b["pixel_values"]:
            out += [n for n, r in ref.items() if torch.equal(x, r)]
    return out


def offline(monkeypatch):
    """No network for Hugging Face datasets and hub in this process (datasets reads its flag at import)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets
    import huggingface_hub.constants
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)


def wait_for(log, text, proc, timeout=120):
    """Wait until `text` is in the log file (which may not exist yet) of subprocess `proc`, still running."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(log) and text in log.read_text():
            return
        assert proc.poll() is None, log.read_text()
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not seen in {log}")


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same(a, b, path="ckpt", skip=()):
    """Bitwise equality of nested state: tensors (dtype too) with torch.equal, numpy arrays, NaN equal to NaN;
    `path` names the first difference; paths in `skip` are not compared."""
    if path in skip:
        return
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), (path, set(a) ^ set(b))
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}", skip)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]", skip)
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b, (path, a, b)


def data_section(**settings):
    """config.py's data section with `settings` (paths may be Path objects) and no dataset_name unless
    given: what data.build_datasets, data_stream.stream_datasets and data_stream.open_stream take."""
    from config import config_from_dict
    settings = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in settings.items()}
    return config_from_dict({"data": {"dataset_name": None, **settings}}).data
