"""No lost work, no silent wrong results: run folders (overwrite refusal, lock), SIGTERM to the process group,
damaged checkpoints, failed saves, TensorBoard continuity, changed data, config checks, bad files. Real files
and real `python train.py` processes with tiny configs (conftest.tiny_config); CPU, seconds each.
"""
import hashlib
import json
import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import ROOT, TRAIN_PHOTOS, assert_same, load, tiny_config, wait_for, write_photos
from test_train import RESUME, RESUME_SKIP, SUBPROCESS_ENV

import checkpoints
import data
import train
from config import config_from_dict

pytestmark = pytest.mark.usefixtures("one_thread")


def write_config(path, workdir, photos, **overrides):
    path.write_text(yaml.safe_dump(tiny_config(workdir, photos, **overrides)))
    return str(path)


def train_py(config, *args, **popen):
    """`python train.py --config config args...` -> CompletedProcess (text), or the Popen with popen
    arguments."""
    argv = [sys.executable, "-u", os.path.join(ROOT, "train.py"), "--config", str(config), *args]
    if popen:
        return subprocess.Popen(argv, env=SUBPROCESS_ENV, **popen)
    return subprocess.run(argv, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)


def train_main(capsys, config, *args):
    """train.main in this process (the quick run's `python train.py`): (exit code, stdout, stderr) as a
    CompletedProcess's attributes."""
    capsys.readouterr()
    code = train.main(["--config", str(config), *args])
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def one_line_error(r, code, *words):
    assert r.returncode == code, (r.stdout[-2000:], r.stderr)
    assert "Traceback" not in r.stderr + r.stdout and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("train.py: error: ") and all(w in r.stderr for w in words), r.stderr


def digests(folder):
    """{relative path: sha256} of every file under `folder`."""
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


# ------------------------------------------------------------------------------------------------ run folders
@pytest.mark.slow
def test_a_new_run_never_overwrites_a_previous_one(tmp_path, photos):
    config = write_config(tmp_path / "c.yaml", tmp_path, photos, **{"training.max_steps": 2})
    assert train_py(config).returncode == 0
    umask = os.umask(0o022)
    os.umask(umask)
    for path in ("checkpoints/last.ckpt", "checkpoints/hf_checkpoint/config.json"):  # as other files
        assert os.stat(tmp_path / path).st_mode & 0o777 == 0o666 & ~umask, path
    before = digests(tmp_path / "checkpoints")
    final = digests(tmp_path / "outputs")
    t0 = time.time()
    r = train_py(config)
    print(f"refused in {time.time() - t0:.1f} s")
    one_line_error(r, 2, "holds a previous run", "--resume_from_checkpoint latest", "--overwrite",
                   "last.ckpt")
    assert digests(tmp_path / "checkpoints") == before and digests(tmp_path / "outputs") == final
    assert sorted(os.listdir(tmp_path / "logs" / "vae_training")) == ["version_0"]  # refused before any log
    # the Lightning adapter's command line refuses the same way
    pytest.importorskip("lightning")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "lightning_module.py"), "--config", config],
                       env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("lightning_module.py: error: "), r.stderr
    assert "holds a previous run" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert digests(tmp_path / "checkpoints") == before
    # an exported model alone is protected too
    shutil.rmtree(tmp_path / "checkpoints")
    one_line_error(train_py(config), 2, "outputs/final_model")
    # --overwrite: a new run, none of the previous run's files left
    r = train_py(config, "--overwrite", "training.max_steps=1", "checkpoint.save_every_n_steps=1",
                 "logging.val_check_interval=1")
    assert r.returncode == 0 and "--overwrite: removed the previous run's" in r.stderr, r.stderr
    assert load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 1
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["hf_checkpoint", "last.ckpt",
                                                            "vae-epoch=00-step=000001.ckpt"]


@pytest.mark.slow
def test_logs_alone_or_a_stale_lock_do_not_block_a_start(tmp_path, photos):
    """A run killed before its first checkpoint leaves logs and its lock: the same command simply starts
    again."""
    config = write_config(tmp_path / "c.yaml", tmp_path, photos, **{"training.max_steps": 1})
    os.makedirs(tmp_path / "logs" / "vae_training" / "version_0")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a PID of this host that no longer runs
    os.makedirs(tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / "train.lock").write_text(
        f'{{"host": "{socket.gethostname()}", "pid": {dead.pid}, "started": "earlier"}}')
    r = train_py(config)
    assert r.returncode == 0, r.stderr
    assert f"taking over the stale lock {tmp_path}/checkpoints/train.lock of PID {dead.pid}" in r.stderr
    assert "train.lock" not in os.listdir(tmp_path / "checkpoints")  # released at the end
    assert sorted(os.listdir(tmp_path / "logs" / "vae_training")) == ["version_0", "version_1"]


def test_a_failed_start_leaves_no_lock_and_no_folder(tmp_path, photos, capsys):
    """Neither checkpoint_dir nor output_dir (nor their parent, made for them) stays behind, empty."""
    config = write_config(tmp_path / "c.yaml", tmp_path / "run", photos,
                          **{"data.train_data_dir": str(tmp_path / "nope")})
    assert train.main(["--config", config]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: ") and "nope" in err and err.count("\n") == 1, err
    assert os.listdir(tmp_path) == ["c.yaml"]


def test_an_empty_lock_is_a_starting_run_for_10_s_then_stale(tmp_path, photos, caplog):
    """A lock file is created, then written: empty and younger than 10 s, another run is starting (refused);
    empty and older, it is a crashed run's (taken over). Both sides of the threshold, by the file's mtime."""
    cfg = config_from_dict(tiny_config(tmp_path, photos))
    lock = tmp_path / "checkpoints" / "train.lock"
    os.makedirs(lock.parent)
    lock.write_text("")
    with pytest.raises(checkpoints.RunFolderError, match=r"in use by another run: PID \? .* started just "
                                                         r"now"):
        checkpoints.claim_run(cfg, None, False)
    # the output_dir lock taken first is released, its folder gone
    assert not os.path.exists(tmp_path / "outputs")
    os.utime(lock, (time.time() - 11, time.time() - 11))
    with caplog.at_level(logging.WARNING):
        claimed = checkpoints.claim_run(cfg, None, False)
    assert "taking over the stale lock" in caplog.text
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert json.loads((tmp_path / "outputs" / "train.lock").read_text())["pid"] == os.getpid()
    claimed.release()
    assert sorted(os.listdir(tmp_path)) == ["checkpoints"] and not os.listdir(tmp_path / "checkpoints")


def test_a_run_refuses_an_output_dir_another_live_run_writes(tmp_path, photos, capsys):
    """Two runs with their own checkpoint_dir and one output_dir: the second would replace the first's
    final_model/. It stops before any work, naming the live run (its PID here: this test's parent process)."""
    os.makedirs(tmp_path / "outputs")
    holder = {"host": socket.gethostname(), "pid": os.getppid(), "started": "earlier"}
    (tmp_path / "outputs" / "train.lock").write_text(json.dumps(holder))
    config = write_config(tmp_path / "c.yaml", tmp_path, photos)
    assert train.main(["--config", config]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: ") and err.count("\n") == 1, err
    assert f"{tmp_path}/outputs is in use by another run: PID {os.getppid()} on host" in err
    assert sorted(os.listdir(tmp_path)) == ["c.yaml", "outputs"]  # no checkpoint_dir, no logs
    assert os.listdir(tmp_path / "outputs") == ["train.lock"]  # the holder's lock untouched


@pytest.mark.slow
def test_a_concurrent_run_exits_2_naming_the_holder(tmp_path, photos):
    config = write_config(tmp_path / "c.yaml", tmp_path, photos, **{"training.max_steps": 100000,
                                                                     "training.num_epochs": 100000})
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        # (niced: on a busy machine the refusal time measures the second run's start-up, not the first's load)
        first = train_py(config, stdout=out, stderr=subprocess.STDOUT, preexec_fn=lambda: os.nice(19))
    try:
        wait_for(log, "step 1/100000 ", first)
        t0 = time.time()
        second = train_py(config)
        refused = time.time() - t0
        print(f"second run refused in {refused:.1f} s")
        one_line_error(second, 2, "is in use by another run", f"PID {first.pid} on host "
                                                              f"{socket.gethostname()}")
        assert refused < 10 and first.poll() is None
        # its own checkpoint_dir, the same output_dir: refused too (it would replace the first's final_model/)
        other = train_py(config, f"paths.checkpoint_dir={tmp_path / 'other'}")
        one_line_error(other, 2, f"{tmp_path}/outputs is in use by another run", f"PID {first.pid}")
        assert not os.path.exists(tmp_path / "other") and first.poll() is None
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 0
    finally:
        if first.poll() is None:
            first.kill()
    assert not os.path.exists(tmp_path / "checkpoints" / "train.lock")  # released by the run that held it


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_workers_saves_and_resumes_exactly(tmp_path, photos):
    """SIGTERM to the whole process group (trainer + 2 training and 2 validation DataLoader workers), as
    `timeout`, SLURM and `kill -TERM -PGID` send it: the workers ignore it, the trainer finishes its step,
    writes last.ckpt at the step reached and exits 0; resuming from it gives the uninterrupted run's state bit
    for bit."""
    over = {**RESUME, "training.max_steps": 1000, "training.num_epochs": 1000, "training.num_workers": 2}
    config = write_config(tmp_path / "c.yaml", tmp_path / "run", photos, **over)
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        proc = train_py(config, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(log, "step 3 validation", proc)  # (the validation loader's workers have started too)
        group = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert len(group) == 5, group  # the trainer and its 4 persistent workers all received the signal
    text = log.read_text()
    assert "signal SIGTERM: stopping after this step" in text and "Traceback" not in text, text
    stopped = int(text.split("stopped at step ")[1].split(";")[0])
    print(f"stopped at step {stopped}")
    assert 3 <= stopped < 1000
    assert load(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == stopped
    # Resumed for 2 more steps == an uninterrupted run of as many (max_steps only says where to stop).
    more = {**over, "training.max_steps": stopped + 2}
    train.train(config_from_dict(tiny_config(tmp_path / "run", photos, **more)),
                resume_from_checkpoint="latest")
    train.train(config_from_dict(tiny_config(tmp_path / "ref", photos, **{**more,
                                                                          "training.num_workers": 0})))
    assert_same(load(tmp_path / "ref" / "checkpoints" / "last.ckpt"),
                load(tmp_path / "run" / "checkpoints" / "last.ckpt"), skip=RESUME_SKIP)


# ------------------------------------------------------------------------------------------- damaged
# checkpoints
@pytest.fixture(scope="module")
def saved(tmp_path_factory, photos):
    """A run's checkpoint folder: top-k files at steps 2 and 4 (save_top_k -1, monitor null), last.ckpt (=
    step 4)."""
    work = tmp_path_factory.mktemp("saved")
    cfg = config_from_dict(tiny_config(work, photos, **{"training.max_steps": 4,
                                                        "checkpoint.save_every_n_steps": 2,
                                                        "checkpoint.save_top_k": -1,
                                                        "checkpoint.monitor": None}))
    train.train(cfg)
    return work / "checkpoints"


def _nonfinite(path, out):
    ckpt = load(path)
    ckpt["state_dict"]["vae.decoder.conv_out.weight"][0, 0, 0, 0] = float("nan")
    ckpt["loop_state"]["weights_sha256"] = checkpoints.weights_sha256(ckpt)  # consistent record, bad weights
    torch.save(ckpt, out)


def _bit_flip(path, out):  # one weight changed, the file otherwise valid: only the integrity record tells
    ckpt = load(path)
    ckpt["state_dict"]["vae.decoder.conv_out.weight"][0, 0, 0, 0] += 1e-3
    torch.save(ckpt, out)


DAMAGE = {
    "truncated": (lambda path, out: out.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2]),
                  "truncated"),
    "zero bytes": (lambda path, out: out.write_bytes(b""), "empty (0 bytes)"),
    "wrong format": (lambda path, out: out.write_text("model: not a checkpoint\n"), "another format"),
    "non-finite": (_nonfinite, "non-finite weights (state_dict vae.decoder.conv_out.weight)"),
    "altered": (_bit_flip, "sha256 differs"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_last_ckpt_falls_back_to_the_newest_readable(tmp_path, saved, damage, caplog):
    folder = tmp_path / "checkpoints"
    shutil.copytree(saved, folder)
    cfg = config_from_dict({"paths": {"checkpoint_dir": str(folder)}})
    assert checkpoints.resume_checkpoint(cfg, "latest")[0] == str(folder / "last.ckpt")
    make, says = DAMAGE[damage]
    os.remove(folder / "last.ckpt")  # (a hard link to the step-4 file: that one stays whole)
    make(saved / "last.ckpt", folder / "last.ckpt")
    with caplog.at_level(logging.WARNING, logger="checkpoints"):
        path, _ = checkpoints.resume_checkpoint(cfg, "latest")
    assert path == str(folder / "vae-epoch=01-step=000004.ckpt")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and says in lines[0] and "last.ckpt" in lines[0], lines
    top = folder / "vae-epoch=01-step=000004.ckpt"
    assert lines[1] == f"resuming from {top}, the newest readable checkpoint in {folder}"
    assert all("\n" not in line and "weights_only=False" not in line for line in lines)


def test_resuming_reads_the_checkpoint_once(tmp_path, saved, photos, monkeypatch):
    # resume_checkpoint reads and checks the file; load_checkpoint restores from that dict, not a second read
    shutil.copytree(saved, tmp_path / "checkpoints")
    reads, real_load = [], torch.load
    monkeypatch.setattr(torch, "load",
                        lambda f, *a, **k: reads.append(os.path.basename(f)) or real_load(f, *a, **k))
    cfg = config_from_dict(tiny_config(tmp_path, photos, **{"training.max_steps": 5}))
    train.train(cfg, "latest")
    assert reads == ["last.ckpt"]
    assert load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 5


@pytest.mark.slow
def test_resume_latest_after_truncation_in_place_runs_from_the_step_before(tmp_path, saved, photos):
    """last.ckpt truncated in place also truncates the top-k file it is a hard link of: resume from step 2."""
    shutil.copytree(saved, tmp_path / "checkpoints")
    last, top = (tmp_path / "checkpoints" / "last.ckpt",
                 tmp_path / "checkpoints" / "vae-epoch=01-step=000004.ckpt")
    assert os.stat(saved / "last.ckpt").st_ino == os.stat(saved / top.name).st_ino  # as the run wrote them
    os.remove(last)
    os.link(top, last)  # (copytree copied the two names as two files)
    with open(last, "r+b") as f:
        f.truncate(1000)
    config = write_config(tmp_path / "c.yaml", tmp_path, photos, **{"training.max_steps": 5})
    r = train_py(config, "--resume_from_checkpoint", "latest")
    assert r.returncode == 0, r.stderr
    assert "last.ckpt is unreadable (" in r.stderr, r.stderr
    assert "step=000004.ckpt is unreadable (" in r.stderr, r.stderr
    assert "resuming from" in r.stderr and "step=000002.ckpt, the newest readable" in r.stderr
    assert "resumed from" in r.stdout and "at epoch 0, step 2" in r.stdout
    assert load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 5
    # nothing readable at all, or a named damaged file: one line, exit 2
    for name in os.listdir(tmp_path / "checkpoints"):
        if name.endswith(".ckpt"):
            (tmp_path / "checkpoints" / name).write_bytes(b"")
    r = train_py(config, "--resume_from_checkpoint", "latest")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    *warnings, error = r.stderr.splitlines()  # a line per damaged file, then the error
    assert len(warnings) == 3 and all(w.endswith("is unreadable: empty (0 bytes)") for w in warnings)
    assert error.startswith("train.py: error: --resume_from_checkpoint latest: no readable checkpoint in")
    png = os.path.join(photos[0], "coffee.png")
    one_line_error(train_py(config, "--resume_from_checkpoint", png), 2, f"{png} is unreadable")


@pytest.mark.slow  # (the quick run's failed write: test_train_plumbing's test_a_write_that_dies_half_way_...)
def test_a_failed_save_keeps_earlier_checkpoints_byte_identical(tmp_path, photos):
    """The disk 'fills' (RLIMIT_FSIZE below a checkpoint's size: every larger write fails with EFBIG, as on a
    full disk) on the resumed run's first save: the earlier files stay byte for byte, the run stops in one
    line; with checkpoint.on_save_error=warn it trains on."""
    config = write_config(tmp_path / "c.yaml", tmp_path, photos, **{
        "training.max_steps": 2, "checkpoint.save_every_n_steps": 1, "logging.val_check_interval": 1})
    assert train_py(config).returncode == 0
    before = digests(tmp_path / "checkpoints")
    assert len(before) == 4  # last.ckpt, a top-k file, hf_checkpoint's two files

    def small_disk():
        # a write past the limit fails (EFBIG) instead of killing
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    argv = [sys.executable, os.path.join(ROOT, "train.py"), "--config", config, "--resume_from_checkpoint",
            "latest", "training.max_steps=4"]
    r = subprocess.run(argv, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300,
                       preexec_fn=small_disk)
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert f"cannot save the step-3 checkpoint in {tmp_path}/checkpoints" in r.stderr
    assert digests(tmp_path / "checkpoints") == before  # no partial or temporary file either
    r = subprocess.run(argv + ["checkpoint.on_save_error=warn"], env=SUBPROCESS_ENV, capture_output=True,
                       text=True,
                       timeout=300, preexec_fn=small_disk)
    assert r.returncode == 1 and r.stderr.count("training goes on (checkpoint.on_save_error: "
                                                "warn)") == 2, r.stderr
    assert "step 4/4" in r.stdout and f"cannot export the final model to {tmp_path}/outputs" in r.stderr
    assert digests(tmp_path / "checkpoints") == before


def test_resume_continues_the_tensorboard_folder(tmp_path, photos):
    """One curve: the resumed run logs into the same version_N, and what the first run logged after its last
    save (here steps 3-4, as after a kill -9) is hidden by the resumed run's purge_step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    train.train(config_from_dict(tiny_config(tmp_path, photos, **{
        "training.max_steps": 4, "checkpoint.save_every_n_steps": 2, "checkpoint.save_top_k": -1,
        "checkpoint.monitor": None})))
    shutil.copy(tmp_path / "checkpoints" / "vae-epoch=00-step=000002.ckpt",
                tmp_path / "checkpoints" / "last.ckpt")
    train.train(config_from_dict(tiny_config(tmp_path, photos, **{"training.max_steps": 4})), "latest")
    assert os.listdir(tmp_path / "logs" / "vae_training") == ["version_0"]
    assert load(tmp_path / "checkpoints" / "last.ckpt")["loop_state"]["log_version"] == "version_0"
    ea = EventAccumulator(str(tmp_path / "logs" / "vae_training" / "version_0"), size_guidance={"scalars": 0})
    ea.Reload()
    assert [e.step for e in ea.Scalars("train/loss")] == [1, 2, 3, 4]  # one curve


def test_changed_training_data_is_named_and_restart_epoch_goes_on(tmp_path, photos, capsys):
    folder = write_photos(tmp_path / "train", TRAIN_PHOTOS, 40)
    config = write_config(tmp_path / "c.yaml", tmp_path, (folder, photos[1]), **{"training.max_steps": 2})
    assert train_main(capsys, config).returncode == 0
    shutil.copy(os.path.join(folder, "coffee.png"), os.path.join(folder, "coffee2.png"))
    r = train_main(capsys, config, "--resume_from_checkpoint", "latest", "training.max_steps=4")
    one_line_error(r, 2, "the training data changed since", "1 image added (6 then, 7 now)",
                   "--resume_data_changed=restart_epoch")
    r = train_main(capsys, config, "--resume_from_checkpoint", "latest", "training.max_steps=4",
                   "--resume_data_changed=restart_epoch")
    assert r.returncode == 0, r.stderr
    assert "epoch 0 starts again from its first batch" in r.stdout
    ckpt = load(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4 and ckpt["loop_state"]["data_fingerprint"]["count"] == 7
    os.remove(os.path.join(folder, "coffee2.png"))  # same count, a file resized
    write_photos(folder, ["coffee"], 41)
    r = train_main(capsys, config, "--resume_from_checkpoint", "latest", "training.max_steps=5")
    one_line_error(r, 2, "1 image removed")


def test_data_fingerprint_of_a_hugging_face_dataset():
    datasets = pytest.importorskip("datasets")
    rows = datasets.Dataset.from_dict({"image": [b"x", b"y"]})
    ds = data.ImageDataset(rows, None, column="image", max_bad_fraction=0.01)
    assert checkpoints.data_fingerprint(ds) == {"count": 2, "hf_fingerprint": rows._fingerprint}
    changed = checkpoints.describe_data_change({"count": 2, "hf_fingerprint": "a"}, {"count": 2,
                                                                                     "hf_fingerprint": "b"})
    assert changed == "the dataset's fingerprint changed (a -> b)"


# ------------------------------------------------------------------------------------------------ config
# checks
@pytest.mark.parametrize("args, message", [
    (["data.resolution=30"], "data.resolution: 30 is not a multiple of 4"),
    (["training.learning_rate=0"], "training.learning_rate: must be > 0, got 0.0"),
    (["training.disc_learning_rate=-1e-4"], "training.disc_learning_rate: must be > 0, got -0.0001"),
])
def test_config_checks_are_one_line(tmp_path, photos, capsys, args, message):
    raw = tiny_config(tmp_path, photos, **{"model.block_out_channels": [16, 32, 32],
                                           "model.down_block_types": ["DownEncoderBlock2D"] * 3,
                                           "model.up_block_types": ["UpDecoderBlock2D"] * 3})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert train.main(["--config", str(tmp_path / "c.yaml"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: ") and message in err and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "checkpoints")


def test_resolution_is_checked_against_a_pretrained_model_once_loaded(tmp_path, photos, capsys):
    from conftest import TINY

    from vae import AutoencoderKL
    AutoencoderKL(**{**TINY, "block_out_channels": [32, 64, 64],
                     "down_block_types": ["DownEncoderBlock2D"] * 3,
                     "up_block_types": ["UpDecoderBlock2D"] * 3}).save_pretrained(tmp_path / "model")
    raw = tiny_config(tmp_path, photos, **{"model.pretrained_model_name_or_path": str(tmp_path / "model"),
                                           "data.resolution": 30})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert train.main(["--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert err == (f"train.py: error: data.resolution: 30 is not a multiple of 4, the downsampling factor of "
                   f"{tmp_path}/model (3 blocks); use e.g. 28\n")
    assert not os.path.exists(tmp_path / "checkpoints")


# -------------------------------------------------------------------------------------------------- bad files
@pytest.fixture
def small_folder(tmp_path):
    """12 images, 3 of them unreadable (empty, not an image, truncated)."""
    folder = write_photos(tmp_path / "imgs", [*TRAIN_PHOTOS, "retina", "camera", "cat"], 36)
    (tmp_path / "imgs" / "empty.png").write_bytes(b"")
    (tmp_path / "imgs" / "notes.jpg").write_text("not an image")
    raw = (tmp_path / "imgs" / "coffee.png").read_bytes()
    (tmp_path / "imgs" / "truncated.png").write_bytes(raw[:len(raw) // 3])
    return folder


def test_small_folders_tolerate_a_few_bad_files(small_folder):
    tf = data.SDTransform(32, center_crop=True, random_flip=True)
    ds = data.ImageDataset(data.find_images(small_folder), tf, max_bad_fraction=0.01)
    assert len(ds) == 12 and data.bad_limit(ds.max_bad_fraction, len(ds)) == 10  # max(10, 0.01 x 12)
    loader = data.ResumableLoader(ds, 4, shuffle=False, drop_last=False)
    assert sum(len(b["pixel_values"]) for b in loader) == 12 and loader.num_skipped == 3
    strict = data.ImageDataset(ds.source, tf, max_bad_fraction=0.0)
    with pytest.raises(data.DataError, match=r"1 of 12 images are unreadable, more than max_bad_fraction=0.0 "
                                             r"allows \(0: at least 10 unless 0\)"):
        list(data.ResumableLoader(strict, 4, shuffle=False, drop_last=False))
    assert data.bad_limit(0.01, 5000) == 50


@pytest.mark.slow  # (three data.py processes; the quick run's bad files: test_small_folders_tolerate_...)
def test_data_check_lists_every_unreadable_file_in_one_pass(small_folder, tmp_path):
    def check(folder):
        return subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "--check", str(folder)],
                              env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    r = check(small_folder)
    assert r.returncode == 1, r.stderr
    lines = r.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:-1]] == [os.path.join(small_folder, f) for f in
                                                           ("empty.png", "notes.jpg", "truncated.png")]
    assert lines[-1] == f"3 of 12 images under {small_folder} are unreadable"
    for name in ("empty.png", "notes.jpg", "truncated.png"):
        os.remove(os.path.join(small_folder, name))
    r = check(small_folder)
    assert r.returncode == 0 and r.stdout == f"0 of 9 images under {small_folder} are unreadable\n"
    r = check(tmp_path / "nope")
    assert r.returncode == 2 and r.stderr.startswith("data.py: error: ") and r.stderr.count("\n") == 1


# ----------------------------------------------------------------------------------- infer.py: wrong results
def infer_py(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), *map(str, args)],
                          env=SUBPROCESS_ENV,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from conftest import TINY, perturb_

    from vae import AutoencoderKL
    folder = tmp_path_factory.mktemp("model")
    perturb_(AutoencoderKL(**TINY)).save_pretrained(folder)
    return folder


def test_a_nan_latent_is_an_error_and_nothing_is_written(tmp_path, tiny_model):
    torch.save({"latent": torch.full((4, 8, 8), float("nan"))}, tmp_path / "nan.pt")
    r = infer_py("--model_path", tiny_model, "--input", tmp_path / "nan.pt", "--output",
                 tmp_path / "out.png", "--decode")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "non-finite values (NaN/inf)" in r.stderr and "--allow_nonfinite" in r.stderr
    assert not (tmp_path / "out.png").exists() and os.listdir(tmp_path) == ["nan.pt"]  # no temp file either
    r = infer_py("--model_path", tiny_model, "--input", tmp_path / "nan.pt", "--output", tmp_path / "out.png",
                 "--decode", "--allow_nonfinite")
    assert r.returncode == 0 and "warning:" in r.stderr and (tmp_path / "out.png").exists(), r.stderr


SLOW = pytest.mark.slow


@pytest.mark.parametrize("case", [pytest.param("png as --model_path", marks=SLOW), "png to --decode",
                                  pytest.param("text .pt to --decode", marks=SLOW)])
def test_a_file_that_is_not_weights_or_a_latent_is_named_in_one_line(tmp_path, tiny_model, case):
    from PIL import Image
    from skimage import data as skdata
    png, text = tmp_path / "photo.png", tmp_path / "latent.pt"
    Image.fromarray(skdata.chelsea()).save(png)
    text.write_text("this is not a latent\n")
    model, src = {"png as --model_path": (png, png), "png to --decode": (tiny_model, png),
                  "text .pt to --decode": (tiny_model, text)}[case]
    args = ["--model_path", model, "--input", src, "--output", tmp_path / "out" / "x.png"]
    r = infer_py(*args, *([] if case.startswith("png as") else ["--decode"]))
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "weights_only" not in r.stderr and ("PNG image" if "png" in case else "(text)") in r.stderr
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]  # nothing written
