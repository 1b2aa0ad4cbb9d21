"""train.py on streams: WebDataset tar shards and a streamed saved HF dataset, trained in 1 and 2 processes;
resuming mid-stream is bitwise exact; ranks read disjoint samples; 2 nodes x 1 process (two torchrun agents,
c10d rendezvous on 127.0.0.1) give the weights of 1 node x 2 processes. CPU, gloo, tiny VAE, 32 px photos.
"""
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import (
    STREAM_PHOTOS,
    VAL_PHOTOS,
    assert_same,
    load,
    offline,
    tiny_config,
    which,
    write_photos,
    write_shards,
)
from test_train import RESUME_SKIP, SUBPROCESS_ENV, as_args

import train
from config import config_from_dict
from data import SDTransform, load_image

pytestmark = pytest.mark.usefixtures("one_thread")
CORRUPT = "coins"  # its tar member holds the first 100 bytes of the PNG
HF_TRAIN = STREAM_PHOTOS[:7]  # the saved dataset's train split (plus a row that is not an image)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Photos (40 px), their 32 px centre crops by name, a validation folder, 3 WebDataset shards of 4 samples
    (one member corrupt) and a saved HF dataset (train: 7 photos and a bad row; validation: 2 photos)."""
    import datasets
    root = tmp_path_factory.mktemp("sources")
    folder = write_photos(root / "photos", STREAM_PHOTOS, 40)
    center = SDTransform(32, center_crop=True, random_flip=False)
    image = datasets.Features({"image": datasets.Image()})
    rows = [f"{folder}/{n}.png" for n in HF_TRAIN] + [{"bytes": b"not an image", "path": None}]
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"image": rows}, features=image),
        "validation": datasets.Dataset.from_dict({"image": [f"{folder}/{n}.png" for n in VAL_PHOTOS]},
                                                 features=image)}).save_to_disk(root / "saved")
    return {"ref": {n: center(load_image(f"{folder}/{n}.png")) for n in STREAM_PHOTOS},
            "val": write_photos(root / "val", VAL_PHOTOS, 40),
            "shards": write_shards(root / "shards", folder, STREAM_PHOTOS, 4, corrupt=CORRUPT) + "/*.tar",
            "saved": str(root / "saved")}


def stream_config(work, sources, source="shards", **overrides):
    """conftest.tiny_config reading `source` (shards: with val_data_dir; saved: its validation split), as a
    plain dict; the discriminator from step 3."""
    data = {"data.train_shards": sources["shards"], "data.val_data_dir": sources["val"]}
    if source == "saved":
        data = {"data.dataset_name": sources["saved"], "data.streaming": True, "data.val_data_dir": None}
    return tiny_config(work, (None, None), **{"data.train_data_dir": None, "data.max_bad_fraction": 0.2,
                                              "data.shuffle_buffer": 4, **data, **overrides})


def tiny(work, sources, source="shards", **overrides):
    return config_from_dict(stream_config(work, sources, source, **overrides))


# ---------------------------------------------------------------------------------------------- one process
def test_streams_train_in_one_process(tmp_path, sources, capsys, monkeypatch):
    """Shards: with max_steps the run is one epoch of max_steps batches. The saved dataset: without max_steps
    an epoch is one pass (7 good samples: 3 batches of 2); validation is its validation split."""
    offline(monkeypatch)
    run = train.train(tiny(tmp_path / "shards", sources, **{"training.max_steps": 7}))
    assert (run.state.step, run.state.epoch) == (7, 0)
    out = capsys.readouterr().out
    assert f"streamed (shards {sources['shards']}) training / 2 validation images, 7 steps per epoch" in out
    run = train.train(tiny(tmp_path / "saved", sources, "saved", **{
        "training.max_steps": None, "training.num_epochs": 2, "logging.val_check_interval": 6}))
    assert (run.state.step, run.state.epoch) == (6, 2) and "val/psnr" in run.state.metrics
    assert "training / 2 validation images, 2 passes" in capsys.readouterr().out
    ckpt = load(tmp_path / "saved" / "checkpoints" / "last.ckpt")
    assert ckpt["loop_state"]["data"]["position"]["pass"] == 2 and ckpt["epoch"] == 2


def test_stream_settings_errors_are_one_line(tmp_path, sources, capsys, monkeypatch):
    import datasets
    offline(monkeypatch)
    datasets.load_from_disk(sources["saved"])["train"].save_to_disk(tmp_path / "train_only")
    cases = [(["data.val_data_dir=null"], "data.train_shards needs data.val_data_dir"),
             (["data.val_data_dir=null", "data.train_shards=null", f"data.dataset_name={tmp_path}/train_only",
               "data.streaming=true"], "no validation images: "),
             ([f"data.train_data_dir={sources['val']}"], "data.train_data_dir is a folder read whole"),
             (["data.train_shards=null", "data.dataset_name=null", "data.streaming=true"],
              "nothing to stream"),
             (["data.train_shards=/no/such/*.tar"], "matches no files"),
             (["data.shuffle_buffer=0"], "data.shuffle_buffer: must be >= 1")]
    base = as_args(tiny(tmp_path, sources))
    capsys.readouterr()
    for args, message in cases:
        assert train.main(["--config", os.devnull] + base + args) in (1, 2), args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (args, err)


# ------------------------------------------------------------------------------------------------- resume
RESUME = {"training.max_steps": 6, "training.ema_decay": 0.9, "training.accumulate_grad_batches": 2,
          "checkpoint.save_every_n_steps": 2, "checkpoint.save_top_k": -1, "checkpoint.monitor": None,
          "logging.val_check_interval": 3}


@pytest.mark.parametrize("workers,max_steps,stop", [(0, 6, 3), pytest.param(2, 6, 4, marks=pytest.mark.slow),
                                                     pytest.param(0, None, 4, marks=pytest.mark.slow)])
def test_resume_mid_stream_is_bitwise_exact(tmp_path, sources, workers, max_steps, stop):
    """A run resumed from the checkpoint an uninterrupted run wrote at step `stop` (what a killed run leaves)
    ends with the same weights, optimizers, EMA, RNG and stream position. Accumulation 2, shuffle blocks of 4,
    a corrupt member; without max_steps, passes of 5 batches (3 steps, the last of one batch), 2 epochs, the
    stop inside the second pass."""
    over = {**RESUME, "training.num_workers": workers, "training.max_steps": max_steps,
            "training.num_epochs": 2, "checkpoint.save_every_n_steps": stop}
    train.train(tiny(tmp_path / "full", sources, **over))
    files = sorted(os.listdir(tmp_path / "full" / "checkpoints"))
    mid = next(f for f in files if f.endswith(f"step={stop:06d}.ckpt"))
    assert load(tmp_path / "full" / "checkpoints" / mid)["loop_state"]["data"]["position"]["next"] > 0
    run = train.train(tiny(tmp_path / "resumed", sources, **over),
                      resume_from_checkpoint=str(tmp_path / "full" / "checkpoints" / mid))
    assert run.state.step == 6
    assert_same(load(tmp_path / "full" / "checkpoints" / "last.ckpt"),
                load(tmp_path / "resumed" / "checkpoints" / "last.ckpt"), skip=RESUME_SKIP)


# ---------------------------------------------------------------------------------------------------- DDP
DDP_SCRIPT = """
import os, sys, torch, train
out, resume = sys.argv[1], sys.argv[2] or None
seen, step = [], train.train_step
def recording_step(run, micro, i):  # the batches this rank trains on
    seen.extend(b["pixel_values"].clone() for b in micro)
    return step(run, micro, i)
train.train_step = recording_step
run = train.train(train.config.load_config(None, sys.argv[3:]), resume)
torch.save({"vae": run.vae.state_dict(), "seen": seen}, f"{out}/rank{os.environ['RANK']}.pt")
"""


def torchrun(tmp_path, cfg, out, launch=("--standalone", "--nproc_per_node=2"), resume=""):
    """train.train(cfg) under one torchrun per `launch`, started together: {rank: its weights, batches}."""
    script = tmp_path / "ddp_stream.py"
    script.write_text(DDP_SCRIPT)
    os.makedirs(out, exist_ok=True)
    launches = [launch] if isinstance(launch[0], str) else launch
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args, str(script), str(out),
                               resume] + as_args(cfg), env=SUBPROCESS_ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for args in launches]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    return {r: load(f"{out}/rank{r}.pt") for r in range(2)}


DDP = {**RESUME, "training.batch_size": 1, "training.max_steps": 4, "training.accumulate_grad_batches": 1,
       "data.center_crop": True, "data.random_flip": False, "data.shuffle_buffer": 3,
       "checkpoint.save_every_n_steps": 3}


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, sources):
    """The shards on 1 node x 2 processes: 4 batches of 1 within the first pass, rank 0 reading 2 of the 3
    shards and rank 1 the third, so their stream positions differ (at step 3, rank 1 given rank 0's fails;
    centre crops without flips: the test names the samples)."""
    work = tmp_path_factory.mktemp("two_processes")
    cfg = tiny(work, sources, **DDP)
    return work, cfg, torchrun(work, cfg, work / "out")


@pytest.mark.slow  # torchrun
def test_two_processes_read_disjoint_samples_and_agree(two_processes, sources):
    work, _, ranks = two_processes
    names = [which(sources["ref"], [{"pixel_values": torch.cat(ranks[r]["seen"])}]) for r in range(2)]
    assert [len(n) for n in names] == [4, 4] and not set(names[0]) & set(names[1])
    assert set(names[0] + names[1]) <= set(STREAM_PHOTOS) - {CORRUPT}
    assert_same(ranks[0]["vae"], ranks[1]["vae"])
    ckpt = load(work / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4 and [d["rank"] for d in ckpt["loop_state"]["data"]] == [0, 1]


@pytest.mark.slow  # torchrun
def test_two_processes_resume_mid_stream_bitwise(tmp_path, two_processes, sources):
    """Every rank's stream position is in the checkpoint, and each resumed rank continues its own."""
    work, cfg, ranks = two_processes
    resumed = torchrun(tmp_path, tiny(tmp_path, sources, **DDP), tmp_path / "out",
                       resume=str(work / "checkpoints" / "vae-epoch=00-step=000003.ckpt"))
    assert_same(ranks[0]["vae"], resumed[0]["vae"])
    assert_same(load(work / "checkpoints" / "last.ckpt"), load(tmp_path / "checkpoints" / "last.ckpt"),
                skip=RESUME_SKIP + ("ckpt/loop_state/rng_states[1]/torch",))


@pytest.mark.slow  # torchrun
def test_two_nodes_equal_one_node_with_two_processes(tmp_path, two_processes, sources):
    """Two agents, started together as on two machines: torchrun --nnodes=2 --nproc_per_node=1
    --node_rank=i --rdzv_backend=c10d --rdzv_endpoint=127.0.0.1:PORT."""
    work, _, ranks = two_processes
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [("--nnodes=2", "--nproc_per_node=1", f"--node_rank={i}", "--rdzv_backend=c10d",
               f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=stream-test") for i in range(2)]
    nodes = torchrun(tmp_path, tiny(tmp_path, sources, **DDP), tmp_path / "out", launch)
    for r in range(2):
        assert_same(ranks[r]["vae"], nodes[r]["vae"])
        assert all(torch.equal(a, b) for a, b in zip(ranks[r]["seen"], nodes[r]["seen"], strict=True))
    assert_same(load(work / "checkpoints" / "last.ckpt"), load(tmp_path / "checkpoints" / "last.ckpt"),
                skip=RESUME_SKIP + ("ckpt/loop_state/rng_states[1]/torch",))


@pytest.mark.slow  # torchrun
def test_saved_dataset_streams_in_two_processes(tmp_path, sources):
    """The saved HF dataset (8 rows read as 8 shards: 4 per rank, one of them not an image): disjoint
    samples, the same weights."""
    cfg = tiny(tmp_path, sources, "saved", **{**DDP, "training.max_steps": 3, "data.max_bad_fraction": 0.3})
    ranks = torchrun(tmp_path, cfg, tmp_path / "out")
    names = [which(sources["ref"], [{"pixel_values": torch.cat(ranks[r]["seen"])}]) for r in range(2)]
    assert [len(n) for n in names] == [3, 3] and not set(names[0]) & set(names[1])
    assert set(names[0] + names[1]) <= set(HF_TRAIN)
    assert_same(ranks[0]["vae"], ranks[1]["vae"])
