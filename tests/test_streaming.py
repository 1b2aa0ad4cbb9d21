"""data_stream.py: WebDataset tar shards and a streamed saved HF dataset, bad samples, ranks, exact resume."""
import gc
import io
import logging
import multiprocessing
import os
import signal
import tarfile
import weakref

import pytest
import torch
from conftest import STREAM_PHOTOS, data_section, offline, which, write_photos, write_shards
from PIL import Image

import data
import data_stream
from data import DataError, ResumableLoader, SDTransform
from data_stream import StreamingLoader, expand_braces, open_stream, shard_files, take_images

RES = 32
PHOTOS = STREAM_PHOTOS
CORRUPT = "coins"  # its tar member holds the first 100 bytes of the PNG
RANDOM = SDTransform(RES, center_crop=False, random_flip=True)
CENTER = SDTransform(RES, center_crop=True, random_flip=False)


def tars(pattern):
    """config.py's data section streaming the tar shards `pattern`."""
    return data_section(train_shards=str(pattern))


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    """Photo folder, center-crop references by name, and shard folders: 3 x 4 samples with a corrupt member;
    4 x 3, 3 x 4, 2 x 6 and 1 x 12 good samples."""
    root = tmp_path_factory.mktemp("stream")
    folder = write_photos(root / "photos", PHOTOS, 40)
    from data import load_image
    ref = {n: CENTER(load_image(f"{folder}/{n}.png")) for n in PHOTOS}
    return {"photos": folder, "ref": ref,
            "bad3": write_shards(root / "bad3", folder, PHOTOS, 4, corrupt=CORRUPT),
            "good4": write_shards(root / "good4", folder, PHOTOS, 3),
            "good3": write_shards(root / "good3", folder, PHOTOS, 4),
            "good2": write_shards(root / "good2", folder, PHOTOS, 6),
            "good1": write_shards(root / "good1", folder, PHOTOS, 12)}


def test_brace_patterns_and_missing_shards(shots, tmp_path):
    assert expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert shard_files(shots["bad3"] + "/{000000..000002}.tar") == shard_files(shots["bad3"] + "/*.tar")
    assert len(shard_files(shots["bad3"] + "/*.tar")) == 3
    with pytest.raises(DataError, match="no such shard"):
        shard_files(shots["bad3"] + "/{000000..000003}.tar")
    with pytest.raises(DataError, match="matches no files"):
        open_stream(tars(tmp_path / "*.tar"))


def test_shards_batches_and_corrupt_member_skipped_and_counted(shots, caplog):
    stream = open_stream(tars(shots["bad3"] + "/{000000..000002}.tar"))
    loader = StreamingLoader(stream, CENTER, 2, shuffle_buffer=None, max_bad_fraction=0.1)
    with caplog.at_level(logging.WARNING, logger="data_stream"):
        batches = list(loader)
    assert all(b["pixel_values"].shape == (2, 3, RES, RES) for b in batches)
    good = [n for n in PHOTOS if n != CORRUPT]
    assert which(shots["ref"], batches) == good[:10]  # 11 readable, the odd one dropped with the last batch
    assert loader.num_skipped == 1 and list(loader.bad_files) == ["000002.tar/coins"]
    assert len(caplog.records) == 1 and "000002.tar/coins" in caplog.records[0].getMessage()
    assert loader.epoch == 1 and loader.samples_seen == 10
    # none allowed: a DataError at once, before the pass ends (the 9th sample met is the corrupt one)
    with pytest.raises(DataError, match=r"^1 of 9 samples met in pass 0 of shards .* unreadable, more than "
                                        r"max_bad_fraction=0.0 allows \(0: at least 10 unless 0\)"):
        list(StreamingLoader(stream, CENTER, 2, shuffle_buffer=None, max_bad_fraction=0.0))


def test_bad_samples_counted_as_in_folders(shots, tmp_path):
    """One rule (data.check_bad) for a folder and the same images as shards: 2 of 8 unreadable train under
    the default 1% (at least 10 are tolerated); 11 of 13 stop both under 0.8 (floor(10.4) = 10) and train
    under 0.9 (floor(11.7) = 11). The readable images come first, so a stream has met all 13 by its 11th bad
    sample (before a pass ends it counts the samples met so far)."""
    def images(name, good, bad):
        folder = tmp_path / name
        write_photos(folder, PHOTOS[:good], 36)
        for k in range(bad):
            (folder / f"x{k:02d}.png").write_bytes(b"not an image")
        return data.find_images(folder)

    def folder_images(files, fraction):
        ds = data.ImageDataset(files, CENTER, max_bad_fraction=fraction)
        return sum(len(b["pixel_values"]) for b in data.ResumableLoader(ds, 1, shuffle=False))

    def streamed_images(files, fraction):
        stream = open_stream(tars(data_stream.write_shards(files, tmp_path / f"tars{len(files)}")))
        loader = StreamingLoader(stream, CENTER, 1, shuffle_buffer=None, max_bad_fraction=fraction)
        return sum(len(b["pixel_values"]) for b in loader)

    for count in (folder_images, streamed_images):
        assert count(images("two_of_eight", 6, 2), 0.01) in (8, 6)  # a folder substitutes, a stream skips
        eleven = images("eleven_of_thirteen", 2, 11)
        assert count(eleven, 0.9) in (13, 2)
        with pytest.raises(DataError, match=r"^11 of 13 .* unreadable, more than max_bad_fraction=0.8 allows "
                                            r"\(10: at least 10 unless 0\); last: .*x10"):
            count(eleven, 0.8)


def test_write_shards_keeps_source_names(shots, tmp_path):
    """Keys are the paths under the files' common folder, without extension, "." made "_"; a repeated key
    gets ~index; per_shard samples a tar. A bad sample is named by its shard and source name."""
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "b.v2").mkdir()
    for member, name in (("a/cat.jpg", "coffee"), ("a/cat.png", "rocket"), ("b.v2/x.y.png", "page")):
        Image.open(f"{shots['photos']}/{name}.png").convert("RGB").save(src / member)
    (src / "b.v2" / "broken.png").write_bytes(b"not an image")
    files = data.find_images(src)
    pattern = data_stream.write_shards(files, tmp_path / "out", per_shard=3)
    assert pattern == str(tmp_path / "out" / "{000000..000001}.tar")
    members = [tarfile.open(f).getnames() for f in shard_files(pattern)]
    assert members == [["a/cat.jpg", "a/cat~1.png", "b_v2/broken.png"], ["b_v2/x_y.png"]]
    loader = StreamingLoader(open_stream(tars(pattern)), CENTER, 1, shuffle_buffer=None, max_bad_fraction=0.5)
    x = [b["pixel_values"][0] for b in loader]
    assert all(torch.equal(a, CENTER(data.load_image(f))) for a, f in zip(x, [files[0], files[1], files[3]]))
    assert list(loader.bad_files) == ["000000.tar/b_v2/broken"]
    rooted = data_stream.write_shards(files[:1], tmp_path / "rooted", root=tmp_path)
    assert [tarfile.open(f).getnames() for f in shard_files(rooted)] == [["src/a/cat.jpg"]]


def test_shards_with_mixed_image_extensions(shots, tmp_path):
    """datasets infers a WebDataset's fields from its first samples; a .jpg or .JPG after .png samples (and a
    sample with no image at all) must still be read as such."""
    from PIL import Image
    with tarfile.open(tmp_path / "mixed.tar", "w") as tar:
        for k, name in enumerate(PHOTOS[:8]):
            tar.add(f"{shots['photos']}/{name}.png", arcname=f"{k:03d}.png")
        Image.open(f"{shots['photos']}/page.png").save(tmp_path / "page.jpg", quality=95)
        tar.add(tmp_path / "page.jpg", arcname="008.jpg")
        tar.add(tmp_path / "page.jpg", arcname="009.JPG")
        (tmp_path / "caption.txt").write_text("a caption without its image")
        tar.add(tmp_path / "caption.txt", arcname="010.txt")
    loader = StreamingLoader(open_stream(tars(tmp_path / "mixed.tar")), CENTER, 1, shuffle_buffer=None,
                             max_bad_fraction=0.1)
    batches = [b["pixel_values"] for b in loader]
    page = CENTER(Image.open(tmp_path / "page.jpg").convert("RGB"))
    assert len(batches) == 10 and torch.equal(batches[8][0], page) and torch.equal(batches[9][0], page)
    no_image = "no image (an empty cell, or no image file in the sample)"
    assert loader.bad_files == {"mixed.tar/010": f"mixed.tar/010: {no_image}"}
    with tarfile.open(tmp_path / "json.tar", "w") as tar:  # a member datasets decodes itself, broken
        tar.add(f"{shots['photos']}/text.png", arcname="000.json")
    with pytest.raises(DataError, match=r"json.tar: cannot read the stream: UnicodeDecodeError"):
        list(StreamingLoader(open_stream(tars(tmp_path / "json.tar")), CENTER, 1, shuffle_buffer=1,
                             max_bad_fraction=0.0))


def test_streamed_saved_hf_dataset(shots, tmp_path, monkeypatch):
    import datasets
    offline(monkeypatch)
    bad = {"bytes": b"not an image", "path": "broken.png"}
    rows = {"image": [f"{shots['photos']}/{n}.png" for n in PHOTOS[:7]] + [bad],
            "caption": [f"photo {k}" for k in range(8)]}
    ds = datasets.Dataset.from_dict(rows, features=datasets.Features(
        {"image": datasets.Image(), "caption": datasets.Value("string")}))
    datasets.DatasetDict({"train": ds}).save_to_disk(tmp_path / "saved")
    stream = open_stream(data_section(dataset_name=tmp_path / "saved", streaming=True), num_shards=4)
    assert stream.dataset.num_shards == 4 and list(stream.dataset.features) == ["image"]
    loader = StreamingLoader(stream, CENTER, 3, shuffle_buffer=None, max_bad_fraction=0.2)
    batches = list(loader)
    assert [b["pixel_values"].shape for b in batches] == [(3, 3, RES, RES)] * 2
    assert which(shots["ref"], batches) == PHOTOS[:6] and loader.num_skipped == 1
    # shuffled: a permutation of the same samples, another one in the next pass
    loader = StreamingLoader(stream, CENTER, 1, shuffle_buffer=3, seed=1, max_bad_fraction=0.2)
    passes = [which(shots["ref"], loader) for _ in range(2)]
    assert sorted(passes[0]) == sorted(passes[1]) == sorted(PHOTOS[:7])
    assert loader.num_skipped == 1 and "broken.png" in next(iter(loader.bad_files))  # each pass; logged once
    assert passes[0] != passes[1] and PHOTOS[:7] not in passes
    val = take_images(stream, 3, CENTER, max_bad_fraction=0.0)  # validation: the first samples, in memory
    x = torch.cat([b["pixel_values"] for b in ResumableLoader(val, 2, shuffle=False, drop_last=False)])
    assert which(shots["ref"], [{"pixel_values": x}]) == PHOTOS[:3]
    with pytest.raises(DataError, match=r"no column 'img'.*image"):
        open_stream(data_section(dataset_name=tmp_path / "saved", image_column="img"))
    with pytest.raises(DataError, match="cannot stream 'no-such-user-xyz/no-such-set'") as e:
        open_stream(data_section(dataset_name="no-such-user-xyz/no-such-set", cache_dir=tmp_path / "cache"))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("shards,counts,buffer", [("good4", (6, 6), 4), ("good2", (6, 6), None),
                                                  ("good1", (6, 6), 4), ("good3", (8, 4), 4)])
def test_two_ranks_read_disjoint_samples(shots, shards, counts, buffer):
    """4 shards / 2 ranks: 2 shards each; 2 shards read in order: one each (as many shards as ranks split by
    shards, not 1 in 2 samples of both; shuffled, datasets splits them so either way); 1 shard: each rank
    keeps 1 in 2 samples; 3 shards: 2 + 1 shards (strategy "shards"; "auto" would read all 3 on each rank)."""
    stream = open_stream(tars(shots[shards] + "/*.tar"))
    names = []
    for rank, n in enumerate(counts):
        loader = StreamingLoader(stream, CENTER, 1, rank=rank, world_size=2, seed=7, shuffle_buffer=buffer,
                                 max_bad_fraction=0.0, batches_per_epoch=n)
        names.append(which(shots["ref"], loader))
    assert not set(names[0]) & set(names[1])
    assert sorted(names[0] + names[1]) == sorted(PHOTOS)
    if shards == "good2":  # whole shards, not every other sample of both
        assert names == [PHOTOS[:6], PHOTOS[6:]]
    with pytest.raises(DataError, match="needs batches_per_epoch"):
        StreamingLoader(stream, CENTER, 1, rank=0, world_size=2, shuffle_buffer=4, max_bad_fraction=0.0)


def test_ranks_get_their_own_augmentations(shots, tmp_path):
    """Two shards holding the same photos in the same order, one per rank: rank r's i-th sample is the
    global sample i * world + r, so its crop and flip differ from the other rank's i-th (a seed without the
    rank would give both ranks the same)."""
    names = ["coffee", "chelsea", "rocket", "page"]
    pattern = write_shards(tmp_path / "twins", shots["photos"], names * 2, 4) + "/*.tar"
    stream = open_stream(tars(pattern))
    out = []
    for rank in (0, 1):
        loader = StreamingLoader(stream, RANDOM, 1, shuffle_buffer=None, max_bad_fraction=0.0, seed=5,
                                 rank=rank, world_size=2, batches_per_epoch=4)
        out.append([b["pixel_values"][0] for b in loader])
        imgs = [data.load_image(f"{shots['photos']}/{n}.png") for n in names]
        want = [RANDOM(img, torch.Generator().manual_seed(data.sample_seed(5, 0, i * 2 + rank)))
                for i, img in enumerate(imgs)]
        assert all(torch.equal(a, b) for a, b in zip(out[rank], want, strict=True))
    assert sum(not torch.equal(a, b) for a, b in zip(*out)) >= 2


def run(make, epochs, stop=None):
    """Batches of `epochs` epochs; with `stop`, a fresh loader resumes from the state after `stop` batches."""
    loader, out = make(), []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            out.append(batch["pixel_values"])
            if len(out) == stop:
                buf = io.BytesIO()  # as train.py saves and loads checkpoints
                torch.save({"data": [loader.state_dict()]}, buf)
                buf.seek(0)
                state = torch.load(buf, weights_only=True)["data"]
                loader = make()
                loader.load_state_dict(state)
                return out + run_from(loader, state[0]["epoch"], epochs)
    return out


def run_from(loader, start, epochs):
    out = []
    for epoch in range(start, epochs):
        loader.set_epoch(epoch)
        out += [b["pixel_values"] for b in loader]
    return out


@pytest.mark.parametrize("workers,per_epoch,stops", [(0, 4, [1, 3, 4, 6]), (0, None, [2, 5, 6]),
                                                     pytest.param(2, 4, [3, 6], marks=pytest.mark.slow),
                                                     (2, None, [4])])
def test_resume_mid_stream_is_bitwise_identical(shots, workers, per_epoch, stops):
    """Shuffle blocks of 3 (a stop inside a block re-reads it), a corrupt member, passes of 5 batches: 4
    batches per epoch cross pass boundaries; one-pass epochs stop at a pass end (6 = 1 batch into epoch 1)."""
    stream = open_stream(tars(shots["bad3"] + "/*.tar"))

    def make():
        return StreamingLoader(stream, RANDOM, 2, num_workers=workers, seed=3, shuffle_buffer=3,
                               batches_per_epoch=per_epoch, max_bad_fraction=0.2)

    full = run(make, 3)
    assert len(full) == (12 if per_epoch else 15) and all(x.shape == (2, 3, RES, RES) for x in full)
    assert sum(not torch.equal(a, b) for a, b in zip(full, full[5:])) >= 4  # passes differ
    for k in stops:
        resumed = run(make, 3, stop=k)
        assert len(resumed) == len(full) and all(torch.equal(a, b) for a, b in zip(resumed, full)), k


def test_resume_decodes_only_what_comes_next(shots, monkeypatch):
    stream = open_stream(tars(shots["good1"] + "/*.tar"))
    first = StreamingLoader(stream, RANDOM, 2, shuffle_buffer=5, max_bad_fraction=0.0)
    batches = iter(first)
    next(batches), next(batches), next(batches)  # 6 samples: a stop inside the second block of 5
    state = first.state_dict()
    import data
    calls, real = [], data.load_image  # what data.decode_cell calls for every sample the stream decodes
    monkeypatch.setattr(data, "load_image", lambda v, name: calls.append(name) or real(v, name=name))
    resumed = StreamingLoader(stream, RANDOM, 2, shuffle_buffer=5, max_bad_fraction=0.0)
    resumed.load_state_dict(state)
    assert torch.equal(next(iter(resumed))["pixel_values"], next(batches)["pixel_values"])
    assert len(calls) == 2 + 2 and calls[:2] == calls[2:]  # the resumed batch, then the same 2 uninterrupted


def test_resume_with_other_stream_settings_restarts_the_pass(shots, caplog):
    """Positions hold for the same world size, seed and shuffle buffer; another one restarts the pass (with a
    warning) rather than continue in a different order."""
    stream = open_stream(tars(shots["good4"] + "/*.tar"))

    def make(buffer):
        return StreamingLoader(stream, CENTER, 2, shuffle_buffer=buffer, max_bad_fraction=0.0, seed=3)

    first = make(3)
    batches = iter(first)
    next(batches), next(batches)
    state = first.state_dict()
    same = make(3)
    same.load_state_dict([state])  # train.py's list of every rank's state
    assert torch.equal(next(iter(same))["pixel_values"], next(batches)["pixel_values"])
    other = make(4)
    with caplog.at_level(logging.WARNING, logger="data_stream"):
        other.load_state_dict([state])
    assert "restarts at the beginning of pass 0" in caplog.text
    assert torch.equal(next(iter(other))["pixel_values"], next(iter(make(4)))["pixel_values"])


def test_loader_is_freed_without_the_garbage_collector(shots):
    """No reference cycle through the sampler: a loader dropped mid-pass is freed (and its workers shut down)
    at once; with a cycle the garbage collector frees it later, after the workers' queues, and each worker
    waits out a 5 s timeout."""
    loader = StreamingLoader(open_stream(tars(shots["good4"] + "/*.tar")), CENTER, 1, shuffle_buffer=2,
                             max_bad_fraction=0.0)
    gc.disable()
    try:
        batches = iter(loader)
        next(batches)
        del batches
        freed = weakref.ref(loader)
        del loader
        assert freed() is None
    finally:
        gc.enable()


def test_stream_workers_outlive_a_stop_signal(shots):
    """`timeout`, SLURM and Ctrl-C signal a run's whole process group; the decoding workers ignore SIGTERM and
    SIGINT (as data.ResumableLoader's do), so the main process can finish its step, save and stop them."""
    loader = StreamingLoader(open_stream(tars(shots["good4"] + "/*.tar")), CENTER, 1, shuffle_buffer=None,
                             max_bad_fraction=0.0, num_workers=1)
    before = set(multiprocessing.active_children())
    batches = iter(loader)
    next(batches)
    (worker,) = set(multiprocessing.active_children()) - before
    os.kill(worker.pid, signal.SIGTERM)
    os.kill(worker.pid, signal.SIGINT)
    assert len(list(batches)) == len(PHOTOS) - 1 and worker.is_alive()


def test_augmentation_seeded_per_pass_and_position(shots):
    stream = open_stream(tars(shots["good4"] + "/*.tar"))

    def passes(seed):
        loader = StreamingLoader(stream, RANDOM, 4, shuffle_buffer=None, max_bad_fraction=0.0, seed=seed)
        return [torch.cat([b["pixel_values"] for b in loader]) for _ in range(2)]

    a, b = passes(0), passes(0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # a function of the seed
    assert sum(not torch.equal(x, y) for x, y in zip(*a)) >= 4  # same samples, new crops/flips next pass
    assert sum(not torch.equal(x, y) for x, y in zip(a[0], passes(1)[0])) >= 4
