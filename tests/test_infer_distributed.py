"""infer.py --encode under torchrun (2 processes, gloo, CPU; marked slow): each latent written once and equal
to one process's; a job killed half-way and rerun completes the rest without redoing (or touching) the done
ones; latent shards and their index round-trip through --decode; a failed input gives one report for the job.
A tiny random VAE, 40 photos of 32-64 px in 4 subfolders. The quick check runs torchrun's code path in this
process (WORLD_SIZE=1)."""
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, STREAM_PHOTOS, TINY, perturb_
from PIL import Image
from safetensors import safe_open
from skimage import data as skdata

import infer
from vae import AutoencoderKL

pytestmark = pytest.mark.usefixtures("one_thread")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "CUDA_VISIBLE_DEVICES": ""}  # CPU: as `ref`
SIZES = [(32, 32), (40, 48), (48, 40), (64, 56)]  # (h, w) of subfolders s0..s3, each holding 10 photos

# torchrun starts this instead of infer.py: a process kills itself (SIGKILL, no clean-up, as a preempted
# machine) when about to write its output number `after` (+1), and torchrun then stops the other process.
KILLING = """
import os, signal, sys, infer, latents
after, writes, write = int(sys.argv[1]), [0], latents.atomic_write
def killing_write(path, fn):
    if writes[0] == after:
        os.kill(os.getpid(), signal.SIGKILL)
    writes[0] += 1
    return write(path, fn)
latents.atomic_write = killing_write
sys.exit(infer.main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    perturb_(AutoencoderKL(**TINY)).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory, model_folder):
    """(work folder, common arguments, {name: reference latent file}) with the reference from one process."""
    work = tmp_path_factory.mktemp("infer_distributed")
    for name in STREAM_PHOTOS[:10]:
        a = getattr(skdata, name)()
        img = Image.fromarray(np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3])
        for j, (h, w) in enumerate(SIZES):
            os.makedirs(work / f"photos/s{j}", exist_ok=True)
            img.resize((w, h), Image.BICUBIC).save(work / f"photos/s{j}/{name}.png")
    args = ["--model_path", model_folder, "--input", work / "photos", "--encode"]
    ref = ["--output", work / "ref", "--ext", ".safetensors", "--device", "cpu"]
    # In its own process, as a user runs it and as torchrun's are: vae.py takes NNPACK only at the thread
    # count its pool was first sized with, so in this (pytest) process the kernel, and the last bits, depend
    # on earlier tests.
    r = subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), *map(str, args + ref)], env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return work, args, files(work / "ref")


def files(folder):
    """{relative path: absolute path} of the non-hidden files under folder (a killed write leaves a .tmp)."""
    return {os.path.relpath(os.path.join(d, n), folder): os.path.join(d, n)
            for d, _, names in os.walk(folder) for n in names if not n.startswith(".")}


def torchrun(work, args, kill_after=None, timeout=300):
    script = work / "killing.py"
    script.write_text(KILLING)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(script), str(kill_after)] if kill_after is not None else [os.path.join(ROOT, "infer.py")]
    return subprocess.run(cmd + [str(a) for a in args], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def stamp(paths):  # what a rewrite would change
    return {p: (os.stat(p).st_mtime_ns, open(p, "rb").read()) for p in paths}


def tensors(path):
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.slow
def test_killed_job_resumes_and_latents_equal_one_process(setup, tmp_path):
    work, args, ref = setup
    out = tmp_path / "out"
    args = args + ["--output", out, "--ext", ".safetensors"]
    killed = torchrun(tmp_path, args, kill_after=5)
    assert killed.returncode != 0, killed.stdout + killed.stderr
    done = files(out)
    assert 5 <= len(done) <= 10, sorted(done)  # the process that killed itself wrote 5, the other at most 5
    before = stamp(done.values())

    rerun = torchrun(tmp_path, args)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    summary = f"done: {40 - len(done)} written to {out}, {len(done)} skipped (done before), 0 failed"
    assert summary in rerun.stdout
    assert stamp(done.values()) == before  # neither recomputed nor rewritten
    got = files(out)
    assert sorted(got) == sorted(ref) and len(got) == 40
    for name, path in got.items():
        (latent, meta), (expected, expected_meta) = tensors(path), tensors(ref[name])
        assert torch.equal(latent["latent"], expected["latent"]), name
        assert meta == expected_meta, name

    again = torchrun(tmp_path, args)
    assert again.returncode == 0 and "done: 0 written" in again.stdout and "40 skipped" in again.stdout


@pytest.mark.slow
def test_shards_resume_and_round_trip_through_decode(setup, tmp_path, capsys):
    work, args, ref = setup
    out = tmp_path / "shards"
    args = args + ["--output", out, "--latent_format", "safetensors-shards", "--shard_size", 3]
    killed = torchrun(tmp_path, args, kill_after=2)  # dies when about to write its third shard
    assert killed.returncode != 0, killed.stdout + killed.stderr
    done = files(out)
    assert 2 <= len(done) <= 4 and "index.json" not in done, sorted(done)
    entries = sum(len(tensors(p)[0]) for p in done.values())
    before = stamp(done.values())

    rerun = torchrun(tmp_path, args)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"done: {40 - entries} written to {out} (40 latents in {out}/index.json), {entries} skipped" \
        in rerun.stdout
    assert stamp(done.values()) == before
    index = json.loads((out / "index.json").read_text())
    assert sorted(index["entries"]) == sorted(os.path.splitext(n)[0] + ".png" for n in ref)
    for name, e in index["entries"].items():
        shard, _ = tensors(out / e["shard"])
        expected, meta = tensors(ref[os.path.splitext(name)[0] + ".safetensors"])
        assert torch.equal(shard[e["key"]], expected["latent"]), name
        assert e["image_size"] == json.loads(meta["image_size"])
    assert index["scaling_factor"] == json.loads(meta["scaling_factor"]) and index["sampled"] is False

    common = ["--model_path", args[1], "--decode", "--device", "cpu"]
    decode = ["--input", out / "index.json", "--output", tmp_path / "a"]
    assert infer.main([str(a) for a in common + decode]) == 0
    assert infer.main([str(a) for a in common + ["--input", work / "ref", "--output", tmp_path / "b"]]) == 0
    decoded, expected = files(tmp_path / "a"), files(tmp_path / "b")
    assert sorted(decoded) == sorted(expected) and len(decoded) == 40
    for name in decoded:
        assert np.array_equal(np.array(Image.open(decoded[name])), np.array(Image.open(expected[name]))), name

    # the same folder with other settings is refused in one line, before anything is written
    capsys.readouterr()
    assert infer.main([str(a) for a in args + ["--sample", "--device", "cpu"]]) == 1
    err = capsys.readouterr().err
    assert "made with sampled False, this run's is True" in err and err.count("\n") == 1


@pytest.mark.slow
def test_a_failed_input_gives_one_report_for_the_job(model_folder, tmp_path):
    # b.png (broken) is rank 1's only input; rank 0 has a.png and c.png. Rank 1 lists its failure and exits 0;
    # rank 0 prints the summed count and alone exits 1, so torchrun reports one failure, rank 0's.
    os.makedirs(tmp_path / "in")
    for name in ("a", "c"):
        Image.fromarray(skdata.chelsea()).resize((24, 16)).save(tmp_path / "in" / f"{name}.png")
    (tmp_path / "in" / "b.png").write_bytes(b"not a png")
    r = torchrun(tmp_path, ["--model_path", model_folder, "--input", tmp_path / "in", "--output",
                            tmp_path / "out", "--encode"])
    assert r.returncode == 1, r.stdout + r.stderr
    assert "done: 2 written" in r.stdout and "1 failed" in r.stdout
    assert f"failed: {tmp_path / 'in' / 'b.png'}" in r.stderr and "error: 1 input(s) failed" in r.stderr
    assert "<NO_OTHER_FAILURES>" in r.stderr and "rank      : 0 (local_rank: 0)" in r.stderr
    assert sorted(files(tmp_path / "out")) == ["a.pt", "c.pt"]


@pytest.mark.slow
def test_fewer_inputs_than_processes(model_folder, tmp_path):
    # one file, two processes: rank 1 has nothing to do, rank 0's progress bar is off (one file); neither
    # waits for the other's files forever
    src = tmp_path / "in"
    os.makedirs(src)
    Image.fromarray(skdata.coffee()).resize((24, 16)).save(src / "a.png")
    r = torchrun(tmp_path, ["--model_path", model_folder, "--input", src, "--output", tmp_path / "out",
                            "--encode"], timeout=120)
    assert r.returncode == 0 and "done: 1 written" in r.stdout, r.stdout + r.stderr


def test_shards_roll_over_and_resume_in_one_process(model_folder, tmp_path, capsys, monkeypatch):
    """torchrun's code path in this process (WORLD_SIZE=1: resuming on, no process group): 5 latents in
    shards of 2 make 3 shards; a rerun skips them all; a lost shard is redone alone; entries equal one file
    per image."""
    src = tmp_path / "in"
    os.makedirs(src / "sub")
    for i, name in enumerate(STREAM_PHOTOS[:5]):
        a = getattr(skdata, name)()
        img = Image.fromarray(np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3])
        img.resize((16 + 2 * i, 12)).save(src / ("sub" if i % 2 else "") / f"{name}.png")
    common = ["--model_path", model_folder, "--input", src, "--encode"]
    assert infer.main([str(a) for a in common + ["--output", tmp_path / "ref", "--ext", ".safetensors"]]) == 0
    for key, value in {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "out"
    args = [str(a) for a in common + ["--output", out, "--latent_format", "safetensors-shards",
                                      "--shard_size", 2]]
    umask = os.umask(0o027)
    try:
        capsys.readouterr()
        assert infer.main(args) == 0
        assert "done: 5 written" in capsys.readouterr().out
        shards = sorted(os.listdir(out / "shards"))
        assert shards == [f"r00000-00000{i}.safetensors" for i in range(3)]
        assert [len(tensors(out / "shards" / n)[0]) for n in shards] == [2, 2, 1]
        for path in [out / "index.json"] + [out / "shards" / n for n in shards]:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o640, path  # the umask's mode
        assert infer.main(args) == 0
        where = f"{out} (5 latents in {out}/index.json)"
        assert f"done: 0 written to {where}, 5 skipped" in capsys.readouterr().out
        os.remove(out / "shards" / shards[1])  # lost: its two latents are redone, into a new shard
        assert infer.main(args) == 0
        assert f"done: 2 written to {where}, 3 skipped" in capsys.readouterr().out
        assert sorted(os.listdir(out / "shards")) == [shards[0], shards[2], "r00000-000003.safetensors"]
    finally:
        os.umask(umask)
    index = json.loads((out / "index.json").read_text())
    ref = files(tmp_path / "ref")
    assert sorted(index["entries"]) == sorted(os.path.splitext(n)[0] + ".png" for n in ref)
    for name, e in index["entries"].items():
        expected = tensors(ref[os.path.splitext(name)[0] + ".safetensors"])[0]["latent"]
        assert torch.equal(tensors(out / e["shard"])[0][e["key"]], expected), name


def test_one_file_under_torchrun_resumes(model_folder, tmp_path, capsys, monkeypatch):
    # a single input under torchrun (WORLD_SIZE=1 here) is skipped when done, with a summary, no IndexError
    for key, value in {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    Image.fromarray(skdata.coffee()).resize((12, 8)).save(tmp_path / "a.png")
    args = [str(a) for a in ["--model_path", model_folder, "--input", tmp_path / "a.png", "--output",
                             tmp_path / "a.pt", "--encode"]]
    assert infer.main(args) == 0 and os.path.isfile(tmp_path / "a.pt")
    capsys.readouterr()
    assert infer.main(args) == 0
    summary = f"done: 0 written to {tmp_path / 'a.pt'}, 1 skipped (done before), 0 failed"
    assert summary in capsys.readouterr().out
