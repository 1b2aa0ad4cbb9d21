"""data.py: decoding every image mode, bad files, the SD transform, HF datasets offline, resumable loading."""
import logging
import os
import sys

import numpy as np
import pytest
import torch
from conftest import data_section, offline
from PIL import Image
from skimage import data as skdata

import data
from data import BadImageError, DataError, ResumableLoader, build_datasets, find_images, load_image

RES = 32
CENTER = data.SDTransform(RES, center_crop=True, random_flip=False)
RANDOM = data.SDTransform(RES, center_crop=False, random_flip=True)


def photo(name, short=64):
    """A scikit-image sample photo, shrunk so its shorter side is `short` (keeps the tests fast)."""
    img = Image.fromarray(getattr(skdata, name)())
    s = short / min(img.size)
    return img.resize((round(img.width * s), round(img.height * s)), Image.BICUBIC)


def exif_rotated(path):
    """Save an upright photo stored sideways with EXIF Orientation=6 (display rotated 90 deg clockwise);
    return the upright image."""
    upright = photo("chelsea").convert("RGB")  # 96x64: landscape
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.ROTATE_90).save(path, exif=exif, quality=95)  # stored as a 64x96 portrait
    return upright


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """8 good images (JPEG/PNG, RGBA, L, 16-bit, EXIF, nested, upper-case extensions), 3 bad, 2 ignored
    files."""
    root = tmp_path_factory.mktemp("photos")
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "bad").mkdir()
    photo("astronaut").save(root / "astronaut.jpg", quality=90)
    photo("coffee").save(root / "coffee.PNG")
    photo("chelsea").save(root / "sub" / "chelsea.JPEG", quality=90)
    photo("rocket").save(root / "sub" / "deeper" / "rocket.Jpg", quality=90)
    rgba = photo("coffee").convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))  # transparent at the top
    rgba.save(root / "rgba.png")
    photo("camera").save(root / "gray.png")
    Image.fromarray(np.asarray(photo("moon")).astype(np.uint16) * 257).save(root / "gray16.png")
    exif_rotated(root / "sub" / "exif_rotated.jpg")
    jpeg = (root / "astronaut.jpg").read_bytes()
    (root / "bad" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "bad" / "not_an_image.jpg").write_text("this is a text file, not a JPEG\n")
    (root / "bad" / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("ignored: not an image extension")
    (root / ".hidden.jpg").write_text("ignored: hidden (e.g. macOS ._ files)")
    return root


BAD = ("truncated.jpg", "not_an_image.jpg", "empty.png")


def folders(photos, **settings):
    """The data section reading `photos` for training and its sub/ folder for validation."""
    return data_section(train_data_dir=photos, val_data_dir=photos / "sub", resolution=RES, **settings)


def u8(img):
    return np.asarray(img).astype(np.int32)


# -------------------------------------------------------------------------------------------- decoding
def test_find_images_recursive_sorted_case_insensitive(photos):
    files = find_images(photos)
    rel = [os.path.relpath(f, photos) for f in files]
    assert files == sorted(files) and len(files) == 11
    assert {"coffee.PNG", "sub/chelsea.JPEG", "sub/deeper/rocket.Jpg", "bad/empty.png"} <= set(rel)
    assert "notes.txt" not in rel and ".hidden.jpg" not in rel


def test_load_image_modes(tmp_path):
    rgb = photo("coffee")
    # RGBA composited on white: out = a*rgb + (1-a)*255
    alpha = np.asarray(Image.linear_gradient("L").resize(rgb.size))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(tmp_path / "rgba.png")
    a = alpha[..., None] / 255.0
    want = u8(rgb) * a + 255 * (1 - a)
    got = load_image(tmp_path / "rgba.png")
    assert got.mode == "RGB" and np.abs(u8(got) - want).max() <= 1
    # LA: the same with one channel
    gray = photo("camera")
    la = Image.merge("LA", (gray, Image.fromarray(alpha[: gray.height, : gray.width])))
    la.save(tmp_path / "la.png")
    a = alpha[: gray.height, : gray.width] / 255.0
    got = u8(load_image(tmp_path / "la.png"))
    assert np.abs(got - (u8(gray) * a + 255 * (1 - a))[..., None]).max() <= 1
    # L -> three equal channels; 1-bit; 16-bit (I;16) and 32-bit (I) holding 16-bit data scaled to 8 bits
    gray.save(tmp_path / "l.png")
    assert (u8(load_image(tmp_path / "l.png")) == u8(gray)[..., None]).all()
    Image.fromarray(u8(gray).astype(np.uint16) * 257).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode.startswith("I")
    assert (u8(load_image(tmp_path / "i16.png")) == u8(gray)[..., None]).all()
    Image.fromarray(u8(gray) * 257, "I").save(tmp_path / "i32.tif")
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    assert (u8(load_image(tmp_path / "i32.tif")) == u8(gray)[..., None]).all()
    Image.fromarray(u8(gray), "I").save(tmp_path / "i8.tif")  # 8-bit values in an "I" image stay as they are
    assert (u8(load_image(tmp_path / "i8.tif")) == u8(gray)[..., None]).all()
    Image.fromarray(u8(gray).astype(np.float32) / 255, "F").save(tmp_path / "f.tif")
    assert np.abs(u8(load_image(tmp_path / "f.tif")) - u8(gray)[..., None]).max() <= 1
    gray.convert("1").save(tmp_path / "bw.png")
    assert set(np.unique(u8(load_image(tmp_path / "bw.png")))) <= {0, 255}
    # CMYK JPEG -> RGB (close to the RGB source up to JPEG loss)
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    assert np.abs(u8(load_image(tmp_path / "cmyk.jpg")) - u8(rgb)).mean() < 4
    # P with a transparent palette entry: those pixels become white, the rest keep their palette colour
    p = rgb.quantize(16)
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png")
    idx, pal = np.asarray(p), np.asarray(p.getpalette()[: 48]).reshape(16, 3)
    got = u8(load_image(tmp_path / "p.png"))
    assert (idx == 0).any() and (got[idx == 0] == 255).all() and (got[idx != 0] == pal[idx[idx != 0]]).all()
    # animated GIF: the first frame
    frames = [photo("coffee"), photo("coffee").transpose(Image.FLIP_TOP_BOTTOM)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    got = u8(load_image(tmp_path / "anim.gif"))
    assert np.abs(got - u8(frames[0])).mean() < 12 < np.abs(got - u8(frames[1])).mean()


def test_exif_orientation_applied(tmp_path):
    upright = exif_rotated(tmp_path / "e.jpg")
    assert Image.open(tmp_path / "e.jpg").size == upright.size[::-1]  # stored sideways
    got = load_image(tmp_path / "e.jpg")
    assert got.size == upright.size
    err = np.abs(u8(got) - u8(upright)).mean()
    assert err < 4 < np.abs(u8(got) - u8(upright.rotate(180))).mean()  # upright, not upside down


@pytest.mark.parametrize("name,reason", [("missing.jpg", "cannot read"),
                                         *zip(BAD, ["cannot decode", "not an image", "empty file"])])
def test_load_image_bad_files(photos, name, reason):
    path = photos / "bad" / name
    with pytest.raises(BadImageError) as e:
        load_image(path)
    msg = str(e.value)
    assert isinstance(e.value, ValueError) and msg.startswith(str(path)) and reason in msg and "\n" not in msg


# ------------------------------------------------------------------------------------------- transform
def test_transform_matches_torchvision_reference():
    from torchvision import transforms as T
    for size in (64, 96, RES):  # tall, wide and exact shapes
        rocket = photo("rocket", size)
        for img in (photo("astronaut", size), rocket, rocket.rotate(90, expand=True)):
            img = img.convert("RGB")
            ref = T.Compose([T.Resize(RES, T.InterpolationMode.BICUBIC), T.CenterCrop(RES), T.ToTensor(),
                             T.Normalize([0.5], [0.5])])(img)
            got = CENTER(img)
            assert got.shape == (3, RES, RES) and torch.equal(got, ref)


def test_transform_random_crop_and_flip():
    img = photo("rocket").convert("RGB")  # 96x64: resized to 48x32, then a random 32x32 window
    assert img.size == (96, 64)
    resized = torch.from_numpy(np.array(img.resize((48, 32), Image.BICUBIC))).permute(2, 0, 1)
    resized = resized.float().div(255).sub(0.5).div(0.5)
    crops = {left: resized[:, :, left: left + RES] for left in range(48 - RES + 1)}
    windows = {(left, flip): crop.flip(-1) if flip else crop
               for left, crop in crops.items() for flip in (False, True)}
    tf = RANDOM
    outs = [tf(img, torch.Generator().manual_seed(s)) for s in range(24)]
    assert torch.equal(outs[3], tf(img, torch.Generator().manual_seed(3)))  # a pure function of the generator
    found = [[key for key, w in windows.items() if torch.equal(out, w)] for out in outs]
    assert all(len(f) >= 1 for f in found)  # every output is a (possibly flipped) window of the resized image
    assert len({f[0][0] for f in found}) > 3 and {f[0][1] for f in found} == {False, True}


# ----------------------------------------------------------------------------------------- bad files
def expected_sequence(files, tf):
    """What a sequential pass must yield: each bad file replaced by the next readable one."""
    good = {}
    for i, f in enumerate(files):
        try:
            good[i] = tf(load_image(f))
        except BadImageError:
            pass
    return [good[next(j % len(files) for j in range(i, i + len(files)) if j % len(files) in good)]
            for i in range(len(files))]


@pytest.mark.parametrize("workers", [0, 2])
def test_folder_yields_good_images_and_skips_bad(photos, tmp_path, caplog, workers):
    (tmp_path / "val").mkdir()
    photo("coffee").save(tmp_path / "val" / "v.png")
    train, val = build_datasets(data_section(train_data_dir=photos, val_data_dir=tmp_path / "val",
                                             resolution=RES, random_flip=False, max_bad_fraction=0.5))
    assert len(train) == 11 and len(val) == 1
    loader = ResumableLoader(train, batch_size=4, shuffle=False, drop_last=False, num_workers=workers)
    with caplog.at_level(logging.WARNING, logger="data"):
        batches = [b for b in loader]
    assert [sorted(b) for b in batches] == [["pixel_values"]] * 3
    x = torch.cat([b["pixel_values"] for b in batches])
    assert x.shape == (11, 3, RES, RES) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    want = expected_sequence(train.source, CENTER)
    assert all(torch.equal(a, b) for a, b in zip(x, want))  # bitwise, in order, substitutes included
    good = [f for f in train.source if os.path.basename(f) not in BAD]
    distinct = {t.numpy().tobytes() for t in x}
    assert len(good) == 8 and len(distinct) == 8  # exactly the 8 good images
    assert loader.num_skipped == 3
    k = [os.path.basename(f) for f in train.source].index("exif_rotated.jpg")
    ref = CENTER
    upright = photo("chelsea").convert("RGB")
    err = (x[k] - ref(upright)).abs().mean()  # the EXIF-rotated photo comes out upright
    assert err < 0.05 < (x[k] - ref(upright.transpose(Image.ROTATE_90))).abs().mean()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3  # emitted in the main process, so they reach the user with workers too
    for k, (msg, name) in enumerate(zip(warnings, ["empty.png", "not_an_image.jpg", "truncated.jpg"])):
        assert name in msg and f"[{k + 1} bad file(s) so far" in msg


def test_too_many_bad_files_is_an_error(photos, tmp_path):
    # (the default tolerates at least 10 bad files: none at all with max_bad_fraction 0)
    train, _ = build_datasets(folders(photos, max_bad_fraction=0.0))
    with pytest.raises(DataError, match=r"unreadable, more than max_bad_fraction=0.0 allows"):
        for _ in ResumableLoader(train, batch_size=2, shuffle=False):
            pass
    (tmp_path / "allbad").mkdir()
    for k in range(3):
        (tmp_path / "allbad" / f"{k}.jpg").write_text("not an image")
    ds = data.ImageDataset(find_images(tmp_path / "allbad"), CENTER, max_bad_fraction=0.5)
    with pytest.raises(DataError, match="unreadable"):
        next(iter(ResumableLoader(ds, batch_size=1)))


def test_empty_or_missing_source_errors(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        build_datasets(data_section(train_data_dir=tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"no images .* found under .*empty"):
        build_datasets(data_section(train_data_dir=tmp_path / "empty"))
    with pytest.raises(DataError, match="no training data"):
        build_datasets(data_section())
    (tmp_path / "one").mkdir()
    photo("coffee", 32).save(tmp_path / "one" / "only.png")
    with pytest.raises(DataError, match="has 1 image.*cannot hold out validation images; give val_data_dir"):
        build_datasets(data_section(train_data_dir=tmp_path / "one"))


# ----------------------------------------------------------------------------------------- validation
def test_validation_folder_and_holdout(photos, tmp_path):
    train, val = build_datasets(folders(photos))
    assert sorted(val.source) == find_images(photos / "sub") and len(val) == 3
    assert not set(train.source) & set(val.source) and len(train) == 8  # the nested val folder left training
    assert (val.transform.center_crop, val.transform.random_flip) == (True, False)
    # hold-out: disjoint, covers everything, deterministic, at most 10% (at least 1)
    for n in (11, 40):
        folder = tmp_path / f"many{n}"
        folder.mkdir()
        img = photo("astronaut", 32)
        for k in range(n):
            img.save(folder / f"{k:02d}.png")
        tr, va = build_datasets(data_section(train_data_dir=folder, resolution=RES, num_val_holdout=64))
        tr2, va2 = build_datasets(data_section(train_data_dir=folder, resolution=RES, num_val_holdout=64))
        assert len(va) == max(1, n // 10) and not set(tr.source) & set(va.source)
        assert sorted(tr.source + va.source) == find_images(folder)
        assert (tr.source, va.source) == (tr2.source, va2.source)
        assert va.transform.random_flip is False and tr.transform.random_flip is True
    tr, va = build_datasets(data_section(train_data_dir=tmp_path / "many40", resolution=RES,
                                         num_val_holdout=2))
    assert len(va) == 2
    # chosen by a hash of the relative path: spread over a folder sorted by class (not its first k files),
    # and adding files never turns an old training image into a validation image (the hash order of old
    # files holds)
    two = tmp_path / "two"
    for cls in ("cats", "dogs"):
        (two / cls).mkdir(parents=True)
        for k in range(20):
            img.save(two / cls / f"{k:02d}.png")
    tr, va = build_datasets(data_section(train_data_dir=two, resolution=RES))
    assert len(va) == 4 and {os.path.basename(os.path.dirname(f)) for f in va.source} == {"cats", "dogs"}
    for k in range(6):
        img.save(two / "cats" / f"new{k}.png")
    tr2, va2 = build_datasets(data_section(train_data_dir=two, resolution=RES))
    old_files = set(va.source) | set(tr.source)
    assert len(va2) == 4 and set(va2.source) & old_files <= set(va.source)


# ---------------------------------------------------------------------------------- Hugging Face datasets
def spy_load_hf(monkeypatch):
    calls, real = [], data.load_hf_dataset
    monkeypatch.setattr(data, "load_hf_dataset", lambda name, *a: calls.append(name) or real(name, *a))
    return calls


def make_hf(n, start=0):
    import datasets
    names = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "camera"]
    imgs = [photo(names[(start + k) % len(names)], 40 + 2 * k) for k in range(n)]
    return imgs, datasets.Dataset.from_dict(
        {"img": imgs, "caption": [f"photo {k}" for k in range(n)]},
        features=datasets.Features({"img": datasets.Image(), "caption": datasets.Value("string")}))


def test_hf_dataset_saved_to_disk_loads_offline(tmp_path, monkeypatch, caplog):
    import datasets
    offline(monkeypatch)
    calls = spy_load_hf(monkeypatch)
    train_imgs, train_rows = make_hf(5)
    bad = datasets.Dataset.from_dict({"img": [{"bytes": b"not an image", "path": None}], "caption": ["bad"]},
                                     features=train_rows.features)
    test_imgs, test_rows = make_hf(2, start=3)
    path = tmp_path / "saved"
    splits = {"train": datasets.concatenate_datasets([train_rows, bad]), "test": test_rows}
    datasets.DatasetDict(splits).save_to_disk(path)
    train, val = build_datasets(data_section(dataset_name=str(path), image_column="img", resolution=RES,
                                             max_bad_fraction=0.5))
    assert calls == [str(path)] and (len(train), len(val)) == (6, 2)
    ref = CENTER
    val_x = torch.cat([b["pixel_values"] for b in ResumableLoader(val, 2, shuffle=False, drop_last=False)])
    assert torch.equal(val_x, torch.stack([ref(im.convert("RGB")) for im in test_imgs]))  # the 'test' split
    train.transform = ref
    with caplog.at_level(logging.WARNING, logger="data"):
        loader = ResumableLoader(train, 3, shuffle=False)
        x = torch.cat([b["pixel_values"] for b in loader])
    # the bad last row is replaced by the next row, which wraps round to row 0
    want = [ref(im.convert("RGB")) for im in train_imgs] + [ref(train_imgs[0].convert("RGB"))]
    assert all(torch.equal(a, b) for a, b in zip(x, want)) and loader.num_skipped == 1
    assert "[5]" in caplog.records[0].getMessage()  # names the row
    with pytest.raises(DataError, match=r"no column 'image'.*img"):
        build_datasets(data_section(dataset_name=str(path)))


def test_hf_single_split_and_parquet_hold_out(tmp_path, monkeypatch):
    offline(monkeypatch)
    calls = spy_load_hf(monkeypatch)
    imgs, rows = make_hf(20)
    rows.save_to_disk(tmp_path / "one")
    rows.to_parquet(str(tmp_path / "rows.parquet"))
    for name in (str(tmp_path / "one"), str(tmp_path / "rows.parquet")):
        train, val = build_datasets(data_section(dataset_name=name, image_column="img", resolution=RES,
                                                 num_val_holdout=3, random_flip=False,
                                                 cache_dir=tmp_path / "cache"))
        assert (len(train), len(val)) == (18, 2)  # capped at 10%
        x = torch.stack([d[i]["pixel_values"] for d in (train, val) for i in range(len(d))])
        ref = torch.stack([CENTER(im.convert("RGB")) for im in imgs])
        # every row is in exactly one of the two sets
        match = [[torch.equal(a, b) for b in ref] for a in x]
        assert sorted(row.index(True) for row in match) == list(range(20))
    assert calls == [str(tmp_path / "one"), str(tmp_path / "rows.parquet")]


def test_hub_offline_is_one_quick_connection(monkeypatch):
    """Without HF_HUB_OFFLINE, one connection to the hub endpoint decides (a refused one sets the flag for the
    process, so the hub clients do not retry every file); a listening endpoint is online. Local sockets."""
    import socket

    from huggingface_hub import constants
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # restored after the test
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert data.hub_offline() is False and os.environ["HF_HUB_OFFLINE"] == "0"
    assert data.hub_offline() is True  # the port is closed now: refused at once
    assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.HF_HUB_OFFLINE is True


def test_hub_name_offline_is_a_one_line_error(tmp_path, monkeypatch):
    offline(monkeypatch)
    calls = spy_load_hf(monkeypatch)
    with pytest.raises(DataError) as e:
        build_datasets(data_section(dataset_name="no-such-user-xyz/no-such-dataset-xyz", cache_dir=tmp_path))
    assert calls == ["no-such-user-xyz/no-such-dataset-xyz"]
    msg = str(e.value)
    assert "no-such-user-xyz/no-such-dataset-xyz" in msg and "offline" in msg and "\n" not in msg


def test_datasets_package_is_optional(monkeypatch, photos):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    train, val = build_datasets(folders(photos))
    assert len(train) and len(val)  # image folders need no `datasets`
    with pytest.raises(DataError, match=r"pip install -r requirements-datasets\.txt") as e:
        build_datasets(data_section(dataset_name="lambdalabs/pokemon-blip-captions"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert "\n" not in str(e.value) and os.path.isfile(os.path.join(root, "requirements-datasets.txt"))
    import data_stream  # streaming says the same (one message, data.import_datasets)
    with pytest.raises(DataError, match=r"streaming needs .* pip install -r requirements-datasets\.txt"):
        data_stream.open_stream(data_section(dataset_name="lambdalabs/pokemon-blip-captions"))


# ---------------------------------------------------------------------------------------------- loader
def good_dataset(photos):
    files = [f for f in find_images(photos) if os.path.basename(f) not in BAD]
    return data.ImageDataset(files, RANDOM, max_bad_fraction=0.0)


def run(loader, epochs, start=0):
    out = []
    for epoch in range(start, epochs):
        loader.set_epoch(epoch)
        out += [b["pixel_values"] for b in loader]
    return out


def test_same_seed_same_batches(photos):
    ds = good_dataset(photos)
    a, b = run(ResumableLoader(ds, 2, seed=7), 2), run(ResumableLoader(ds, 2, seed=7), 2)
    c = run(ResumableLoader(ds, 2, seed=8), 2)
    assert len(a) == 8 and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert not torch.equal(torch.cat(a[:4]), torch.cat(a[4:]))  # epochs differ (order and augmentation)


def test_augmentation_seed_depends_on_seed_epoch_and_index(photos):
    seeds = {data.sample_seed(s, e, i) for s in (0, 1) for e in (0, 1, 2) for i in range(50)}
    assert len(seeds) == 300 and data.sample_seed(4, 2, 9) == data.sample_seed(4, 2, 9)
    ds = good_dataset(photos)
    x = [[ds[(i, 0, e)]["pixel_values"] for i in range(len(ds))] for e in (0, 1)]
    assert all(torch.equal(a, ds[(i, 0, 0)]["pixel_values"]) for i, a in enumerate(x[0]))
    assert sum(not torch.equal(a, b) for a, b in zip(*x)) >= 4  # a new crop/flip each epoch


@pytest.mark.parametrize("workers,stops", [(0, [1, 5, 6]), pytest.param(2, [3], marks=pytest.mark.slow)])
def test_resume_is_bitwise_identical(photos, workers, stops):
    ds = data.ImageDataset(find_images(photos), RANDOM, max_bad_fraction=0.5)
    full = run(ResumableLoader(ds, 2, num_workers=workers, seed=3), 3)  # 5 batches/epoch: 11 images
    assert len(full) == 15
    for k in stops:  # 5: exactly at an epoch boundary
        first = ResumableLoader(ds, 2, num_workers=workers, seed=3)
        seen = []
        for epoch in range(3):
            first.set_epoch(epoch)
            for batch in first:
                seen.append(batch["pixel_values"])
                if len(seen) == k:
                    break
            if len(seen) == k:
                break
        state = first.state_dict()
        assert all(type(v) is int for v in state.values())
        resumed = ResumableLoader(ds, 2, num_workers=workers, seed=3)
        resumed.load_state_dict(state)
        rest = run(resumed, 3, start=state["epoch"])
        assert len(seen) + len(rest) == 15
        assert all(torch.equal(x, y) for x, y in zip(seen + rest, full))


def test_resume_does_not_decode_skipped_images(photos, monkeypatch):
    ds = good_dataset(photos)
    loader = ResumableLoader(ds, 2)
    loader.load_state_dict({"epoch": 1, "batches_consumed": 3})
    calls = []
    real = data.load_image
    monkeypatch.setattr(data, "load_image", lambda p, **kw: calls.append(p) or real(p, **kw))
    batch = next(iter(loader))
    assert len(calls) == 2 and batch["pixel_values"].shape == (2, 3, RES, RES)
    assert calls == [ds.source[i] for i in loader.indices(1)[6:8]]


def test_resume_with_another_batch_size_or_seed(photos, caplog):
    """A new batch size x world size keeps the number of samples seen (rounded down to whole batches); a new
    seed or dataset size is resumed with a warning (the epoch order differs)."""
    ds = good_dataset(photos)
    first = ResumableLoader(ds, 2, seed=1)
    next(iter(first))  # 2 of epoch 0's samples
    resumed = ResumableLoader(ds, 4, seed=1)
    with caplog.at_level(logging.WARNING, logger="data"):
        resumed.load_state_dict(first.state_dict())
    assert "the resumed position is approximate" in caplog.text and resumed.batches_consumed == 0
    first = ResumableLoader(ds, 2, seed=1)
    batches = iter(first)
    next(batches), next(batches)  # 4 samples: one batch of 4
    resumed.load_state_dict(first.state_dict())
    assert resumed.batches_consumed == 1
    want = torch.stack([ds[(i, 1, 0)]["pixel_values"] for i in resumed.indices(0)[4:8]])
    assert torch.equal(next(iter(resumed))["pixel_values"], want)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="data"):
        ResumableLoader(ds, 2, seed=2).load_state_dict(first.state_dict())
    assert "seed changed from 1 to 2: the resumed epoch order differs" in caplog.text


def test_world_size_two_partitions_each_epoch(photos):
    ds = data.ImageDataset(find_images(photos), RANDOM, max_bad_fraction=0.5)
    n = len(ds)
    for drop_last in (True, False):
        ranks = [ResumableLoader(ds, 2, world_size=2, rank=r, drop_last=drop_last, seed=5) for r in (0, 1)]
        assert len(ranks[0]) == len(ranks[1]) == (2 if drop_last else 3)
        for epoch in (0, 1):
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(5 + epoch)).tolist()
            a, b = ranks[0].indices(epoch), ranks[1].indices(epoch)
            assert len(a) == len(b)
            if drop_last:  # disjoint, and together the first 2*len of the epoch's permutation
                assert not set(a) & set(b) and sorted(a + b) == sorted(perm[: len(a) * 2])
            else:  # everything once, padded by DistributedSampler with repeats of the first indices
                assert set(a) | set(b) == set(range(n))
    # what a rank yields is exactly its indices' samples
    rank1 = ResumableLoader(ds, 2, world_size=2, rank=1, seed=5)
    rank1.set_epoch(1)
    x = torch.cat([b["pixel_values"] for b in rank1])
    assert all(torch.equal(x[k], ds[(i, 5, 1)]["pixel_values"]) for k, i in enumerate(rank1.indices(1)))


def test_loader_len_and_too_small_dataset(photos):
    ds = good_dataset(photos)
    assert len(ResumableLoader(ds, 3)) == 2 and len(ResumableLoader(ds, 3, drop_last=False)) == 3
    with pytest.raises(DataError, match="cannot fill one batch"):
        ResumableLoader(ds, 9)


def test_loader_options(photos):
    ds = good_dataset(photos)
    plain = ResumableLoader(ds, 2, num_workers=0, pin_memory=True, persistent_workers=True)
    assert plain._dataloader.persistent_workers is False  # only meaningful with workers
    assert plain._dataloader.pin_memory is torch.cuda.is_available()  # pinning only helps a CUDA copy
    assert ResumableLoader(ds, 2, num_workers=1)._dataloader.persistent_workers is True
    next(iter(plain))
    assert plain.state_dict()["batches_consumed"] == 1
