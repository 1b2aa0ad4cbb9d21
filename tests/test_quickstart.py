"""The README quickstart: configs/quickstart.yaml trains on the sample photos in assets/ and infer.py reconstructs a
photo with the exported model. Shortened here to a few steps (the full run is `.ci/run`'s / the README's)."""
import os

import numpy as np
import torch
from PIL import Image

import infer
import train
from conftest import ROOT


def test_quickstart_config_trains_exports_and_reconstructs(tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the README runs it (OMP_NUM_THREADS=1): a tiny model, one thread is fastest
    monkeypatch.chdir(ROOT)  # the config's data paths are relative to the repository root, as in the README
    out = tmp_path / "run"
    rc = train.main(["--config", "configs/quickstart.yaml", "training.max_steps=4", "logging.val_check_interval=2",
                     "logging.log_every_n_steps=2", "logging.log_images_every_n_steps=2", "logging.progress_bar=false",
                     "checkpoint.save_every_n_steps=2", f"paths.output_dir={out}/outputs", f"paths.log_dir={out}/logs",
                     f"paths.checkpoint_dir={out}/checkpoints"])
    assert rc == 0
    assert os.path.isfile(out / "checkpoints" / "last.ckpt")
    assert os.path.isfile(out / "outputs" / "final_model" / "diffusion_pytorch_model.safetensors")
    assert os.listdir(out / "logs" / "vae_training")
    src = os.path.join(ROOT, "assets", "photos", "chelsea.jpg")
    rc = infer.main(["--model_path", str(out / "outputs" / "final_model"), "--input", src,
                     "--output", str(tmp_path / "reconstructed.png")])
    assert rc == 0
    rec = Image.open(tmp_path / "reconstructed.png")
    assert rec.size == Image.open(src).size and np.asarray(rec).std() > 0
    torch.set_num_threads(threads)
