"""infer.py: any size/mode in, exactly that size out; latent files that round-trip and match diffusers; folder
mode; --eval figures equal to losses.py's; every bad input gives one line, exit 1, no traceback, no file.

Most runs call infer.main() in-process (fast); a few run `python infer.py` for real exit codes and stderr.
The models are random (tiny, or SD 1.5's shape for the diffusers parity) with perturbed norms/biases."""
import csv
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, SD15, TINY, perturb_
from PIL import Image
from safetensors import safe_open
from skimage import data as skdata

import fid
import infer
import losses
from data import load_image
from vae import AutoencoderKL

# SD3's factors: a non-zero shift exercises the (z - shift) * scale path that SD 1.5 (shift None) skips.
TINY_SHIFTED = dict(TINY, scaling_factor=1.5305, shift_factor=0.0609)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, model) of a tiny random VAE saved with save_pretrained (downsampling factor 2)."""
    torch.manual_seed(0)
    model = perturb_(AutoencoderKL(**TINY_SHIFTED)).set_fast_kernels(True).eval()  # computes as the CLI does
    folder = tmp_path_factory.mktemp("tiny_vae")
    model.save_pretrained(folder)
    return str(folder), model


def save_photo(path, name="astronaut", size=None, mode=None):
    """A scikit-image photo, resized to size=(h, w), converted to a Pillow mode, saved; returns the path."""
    img = Image.fromarray(getattr(skdata, name)())
    if size is not None:
        img = img.resize((size[1], size[0]), Image.BICUBIC)
    if mode is not None:
        img = img.convert(mode)
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    img.save(path)
    return str(path)


def pixels(path):
    """An image file as data.load_image reads it: (1, 3, H, W) in [-1, 1]."""
    return losses.from_uint8(torch.from_numpy(np.array(load_image(path))).permute(2, 0, 1)[None])


def read_png(path):
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)


def reference_reconstruction(model, x):
    """What the CLI should produce, computed here independently: reflect-pad bottom/right to the model's
    factor, encode (mode), decode, crop, round to 8 bits."""
    f, (h, w) = model.downsample_factor, x.shape[-2:]
    xp = F.pad(x, (0, -w % f, 0, -h % f), mode="reflect")
    with torch.no_grad():
        y = model.decode(model.encode(xp).latent_dist.mode()).sample[0, :, :h, :w]
    return ((y + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def run(argv, capsys):
    rc = infer.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def run_subprocess(argv):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "infer.py")] + [str(a) for a in argv],
                       capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


# ---------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("case", ["rgb_77x45", "rgb_45x77", "rgba", "grayscale", "gray16", "tiny_1x5",
                                  "exif"])
def test_reconstruction_has_the_input_size(tiny, tmp_path, capsys, case):
    folder, model = tiny
    if case.startswith("rgb_"):
        h, w = map(int, case[4:].split("x"))
        src, expected = save_photo(tmp_path / "in.jpg", "chelsea", (h, w)), (h, w)
    elif case == "rgba":  # transparent left half: composited on white by data.load_image
        a = np.array(Image.fromarray(skdata.coffee()).resize((53, 37)).convert("RGBA"))
        a[:, :26, 3] = 0
        src, expected = str(tmp_path / "in.png"), (37, 53)
        Image.fromarray(a).save(src)
    elif case == "grayscale":
        src, expected = save_photo(tmp_path / "in.png", "camera", (41, 59), "L"), (41, 59)
    elif case == "gray16":
        a = (np.array(Image.fromarray(skdata.camera()).resize((35, 29))).astype(np.uint16) * 257)
        src, expected = str(tmp_path / "in.png"), (29, 35)
        img = Image.fromarray(a)
        assert img.mode == "I;16"
        img.save(src)
    elif case == "tiny_1x5":  # a 1-pixel side: reflection padding is impossible, replicate instead
        src, expected = save_photo(tmp_path / "in.png", "astronaut", (1, 5)), (1, 5)
    else:  # EXIF orientation 6: stored 40 wide x 24 high, shown rotated (24 wide x 40 high)
        img = Image.fromarray(skdata.rocket()).resize((40, 24))
        exif = Image.Exif()
        exif[0x0112] = 6
        src, expected = str(tmp_path / "in.jpg"), (40, 24)
        img.save(src, exif=exif)
    dst = tmp_path / "out" / "recon.png"
    rc, out, err = run(["--model_path", folder, "--input", src, "--output", dst], capsys)
    assert rc == 0, err
    assert Image.open(dst).size == (expected[1], expected[0]) and Image.open(dst).mode == "RGB"
    x = pixels(src)
    assert x.shape[-2:] == expected
    if min(expected) > 1:  # the file is exactly the independent pad -> encode -> decode -> crop
        assert torch.equal(read_png(dst), reference_reconstruction(model, x))
    assert "wrote" in out


def test_padding_is_reflect_and_falls_back_to_replicate():
    x = torch.randn(1, 3, 77, 45)  # SD 1.5's factor 8
    assert torch.equal(infer.pad(x, 8), F.pad(x, (0, 3, 0, 3), mode="reflect"))
    assert infer.pad(x, 8).shape[-2:] == (80, 48)
    small = torch.randn(1, 3, 3, 3)  # pad 5 > side 3: reflection is impossible
    assert torch.equal(infer.pad(small, 8), F.pad(small, (0, 5, 0, 5), mode="replicate"))
    assert infer.pad(torch.zeros(1, 3, 16, 8), 8).shape[-2:] == (16, 8)


def test_tiling_switches_on_above_the_threshold_and_obeys_overrides(tiny, tmp_path, capsys):
    model = AutoencoderKL(**TINY)
    runner = infer.Runner(model, torch.device("cpu"), torch.float32, tiling=None, tile_size=16)
    runner.set_tiling(64, infer.AUTO_TILING_SIDE)
    assert not model.use_tiling and model.tile_sample_size == 16
    runner.set_tiling(64, infer.AUTO_TILING_SIDE + 1)
    assert model.use_tiling
    infer.Runner(model, torch.device("cpu"), torch.float32, tiling=False).set_tiling(5000, 5000)
    assert not model.use_tiling
    infer.Runner(model, torch.device("cpu"), torch.float32, tiling=True, tile_mode="blend").set_tiling(8, 8)
    assert model.use_tiling and model.tile_mode == "blend"
    # the CLI with forced small tiles: exactly the input's size; seam-free ("exact") tiles give the untiled
    # result up to float rounding (vae.py's tests check the tilers themselves)
    src = save_photo(tmp_path / "in.png", "astronaut", (37, 21))
    common = ["--model_path", tiny[0], "--input", src, "--tile_size", 16]
    for name, extra in (("plain.png", ["--no_tiling"]), ("exact.png", ["--tiling"]),
                        ("blend.png", ["--tiling", "--tile_mode", "blend"])):
        rc, _, err = run(common + ["--output", tmp_path / name] + extra, capsys)
        assert rc == 0, err
        assert Image.open(tmp_path / name).size == (21, 37)
    plain, exact = (read_png(tmp_path / n).int() for n in ("plain.png", "exact.png"))
    assert (plain - exact).abs().max() <= 1


def test_automatic_tiling_starts_above_auto_tiling_side(tiny, tmp_path, capsys, monkeypatch):
    # a thin image crosses the threshold cheaply: 1024 px wide is encoded whole, 1026 px in tiles
    import vae_tiling
    tiled = []
    encode = vae_tiling.encode
    monkeypatch.setattr(vae_tiling, "encode", lambda model, x: tiled.append(x.shape[-1]) or encode(model, x))
    for width in (infer.AUTO_TILING_SIDE, infer.AUTO_TILING_SIDE + 2):
        src = save_photo(tmp_path / f"in{width}.png", "astronaut", (2, width))
        argv = ["--model_path", tiny[0], "--input", src, "--output", tmp_path / f"o{width}.png"]
        rc, _, err = run(argv, capsys)
        assert rc == 0, err
        assert Image.open(tmp_path / f"o{width}.png").size == (width, 2)
    assert tiled == [infer.AUTO_TILING_SIDE + 2]


def test_default_tile_size_is_in_pixels_not_the_models_sample_size(tiny, tmp_path, capsys):
    # a small model trained on 32-px crops (sample_size 32) still tiles a large image in DEFAULT_TILE_SIZE
    # tiles: tiles of its sample_size would cost a fixed overhead 256 times as often
    model = AutoencoderKL(**TINY)
    assert model.config["sample_size"] == 32 < infer.DEFAULT_TILE_SIZE == 512
    infer.Runner(model, torch.device("cpu"), torch.float32, tiling=True).set_tiling(2048, 2048)
    assert model.use_tiling and model.tile_sample_size == infer.DEFAULT_TILE_SIZE
    assert infer.parse_args(["--model_path", "m", "--input", "i", "--output", "o"]).tile_size == 512
    with pytest.raises(SystemExit):
        infer.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"larger side > {infer.AUTO_TILING_SIDE} px" in help_text
    assert "whatever the model's sample_size" in help_text


def test_images_of_many_sizes_wait_in_memory_at_most_max_pending():
    # batch_size 2, max_pending 4: a full pair goes at once; then five sizes are waiting, more than 4, so the
    # largest (oldest) group goes early, one per new image; the rest at the end
    read = []

    def items(shapes):
        for i, shape in enumerate(shapes):
            read.append(i)
            yield infer.Item(i, f"{i}.png", f"{i}.png", torch.zeros(3, *shape), shape)
    shapes = [(8, 8), (8, 8)] + [(8, 9 + i) for i in range(7)]
    got = [(len(read), [it.index for it in batch]) for batch in infer.batches(items(shapes), 2, 4)]
    assert got == [(2, [0, 1]), (7, [2]), (8, [3]), (9, [4])] + [(9, [i]) for i in range(5, 9)]


# --------------------------------------------------------------------------------------------- latents
@pytest.mark.parametrize("ext", [".pt", ".safetensors"])
def test_encode_file_decode_equals_in_memory(tiny, tmp_path, capsys, ext):
    folder, model = tiny
    src = save_photo(tmp_path / "in.png", "astronaut", (77, 45))
    lat_path, dec_path = tmp_path / ("lat" + ext), tmp_path / "dec.png"
    umask = os.umask(0o027)  # not the usual 022: a file made with a fixed mode (0600, 0644) shows
    try:
        assert run(["--model_path", folder, "--input", src, "--output", lat_path, "--encode"], capsys)[0] == 0
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(lat_path).st_mode) == 0o640  # the umask's mode, as any file the user makes
    x = F.pad(pixels(src), (0, 1, 0, 1), mode="reflect")  # 77x45 -> 78x46 (factor 2)
    with torch.no_grad():
        expected = model.encode_to_latent(x)
        decoded = model.decode_from_latent(expected)[0, :, :77, :45]
    if ext == ".pt":
        stored = torch.load(lat_path, weights_only=True)
        latent, meta = stored["latent"], stored
        assert tuple(meta["image_size"]) == (77, 45) and meta["sampled"] is False
    else:
        with safe_open(str(lat_path), framework="pt") as f:
            latent, meta = f.get_tensor("latent"), f.metadata()
        assert meta["image_size"] == "[77, 45]" and meta["sampled"] == "false"
    assert latent.shape == (4, 39, 23) and latent.dtype == torch.float32
    assert torch.equal(latent, expected[0])
    assert float(meta["scaling_factor"]) == 1.5305 and float(meta["shift_factor"]) == 0.0609
    assert meta["model"] == folder
    rc, _, err = run(["--model_path", folder, "--input", lat_path, "--output", dec_path, "--decode"], capsys)
    assert rc == 0, err
    assert Image.open(dec_path).size == (45, 77)
    assert torch.equal(read_png(dec_path), ((decoded + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))


@pytest.mark.parametrize("batched", [False, True])
def test_decode_bare_tensor(tiny, tmp_path, capsys, batched):
    folder, model = tiny
    latent = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(1))
    torch.save(latent[None] if batched else latent, tmp_path / "bare.pt")
    rc, _, err = run(["--model_path", folder, "--input", tmp_path / "bare.pt", "--output", tmp_path / "d.png",
                      "--decode"], capsys)
    assert rc == 0, err
    with torch.no_grad():
        y = model.decode_from_latent(latent[None])[0]  # the model's own factors
    assert Image.open(tmp_path / "d.png").size == (10, 12)  # factor 2: 6x5 latent -> 12x10 image
    assert torch.equal(read_png(tmp_path / "d.png"), ((y + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))


@pytest.mark.parametrize("config", [
    pytest.param(dict(SD15, block_out_channels=[32, 32, 64, 64], layers_per_block=1),
                 id="sd15_layout_narrow"),
    pytest.param(SD15, id="sd15", marks=pytest.mark.slow)])
def test_latents_equal_diffusers_on_sd15_weights(tmp_path, capsys, config):
    """SD 1.5's layout (4 levels, factor 8, mid-block attention, its factors) at 60x44 (padded to 64x48,
    latent 8x6): our file == diffusers' mode() * scaling_factor, with diffusers loading the very folder the
    CLI used. The narrow model has the same property as SD 1.5's width (the slow case)."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    torch.manual_seed(0)
    perturb_(AutoencoderKL(**config)).save_pretrained(tmp_path / "sd15")
    ref = DiffusersAutoencoderKL.from_pretrained(tmp_path / "sd15").eval()
    src = save_photo(tmp_path / "in.png", "coffee", (60, 44))
    rc, _, err = run(["--model_path", tmp_path / "sd15", "--input", src, "--output", tmp_path / "l.pt",
                      "--encode"], capsys)
    assert rc == 0, err
    stored = torch.load(tmp_path / "l.pt", weights_only=True)
    with torch.no_grad():
        expected = ref.encode(F.pad(pixels(src), (0, 4, 0, 4), mode="reflect")).latent_dist.mode() * 0.18215
    assert stored["latent"].shape == (4, 8, 6) and stored["scaling_factor"] == 0.18215
    assert stored["shift_factor"] is None
    torch.testing.assert_close(stored["latent"], expected[0], rtol=1e-4, atol=1e-5)
    # and decoding restores the 60x44 original size
    rc, _, err = run(["--model_path", tmp_path / "sd15", "--input", tmp_path / "l.pt", "--output",
                      tmp_path / "d.png", "--decode"], capsys)
    assert rc == 0, err
    assert Image.open(tmp_path / "d.png").size == (44, 60)


def test_sample_is_seeded_per_file_and_independent_of_batching(tiny, tmp_path, capsys):
    folder, model = tiny
    for name in ("a", "b", "c"):
        save_photo(tmp_path / "in" / f"{name}.png", "chelsea" if name != "b" else "coffee", (20, 24))
    common = ["--model_path", folder, "--input", tmp_path / "in", "--encode", "--sample", "--seed", 7]
    assert run(common + ["--output", tmp_path / "one", "--batch_size", 1], capsys)[0] == 0
    assert run(common + ["--output", tmp_path / "three", "--batch_size", 3], capsys)[0] == 0
    x = pixels(tmp_path / "in" / "a.png")
    with torch.no_grad():
        dist = model.encode(x).latent_dist
    g = torch.Generator().manual_seed(infer.noise_seed(7, "a.png"))
    expected = (dist.sample(g) - 0.0609) * 1.5305
    mode = (dist.mode() - 0.0609) * 1.5305
    for name in ("a", "b", "c"):
        one = torch.load(tmp_path / "one" / f"{name}.pt", weights_only=True)
        three = torch.load(tmp_path / "three" / f"{name}.pt", weights_only=True)
        assert one["sampled"] is True
        torch.testing.assert_close(one["latent"], three["latent"], rtol=1e-5, atol=1e-5)
    a = torch.load(tmp_path / "one" / "a.pt", weights_only=True)["latent"]
    c = torch.load(tmp_path / "one" / "c.pt", weights_only=True)["latent"]
    torch.testing.assert_close(a, expected[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a, mode[0], atol=1e-3)
    assert not torch.allclose(a, c, atol=1e-3)  # same image content, different file: different noise


# ------------------------------------------------------------------------------------------ folder mode
def test_folder_mode_mirrors_paths_batches_and_keeps_extensions(tiny, tmp_path, capsys):
    folder, model = tiny
    src = tmp_path / "in"
    save_photo(src / "a.jpg", "chelsea", (16, 20))
    save_photo(src / "sub" / "b.PNG", "coffee", (16, 20))
    save_photo(src / "sub" / "deeper" / "c.gif", "rocket", (16, 20))
    save_photo(src / "d.png", "astronaut", (13, 11))
    common = ["--model_path", folder, "--input", src]
    assert run(common + ["--output", tmp_path / "b1", "--batch_size", 1], capsys)[0] == 0
    rc, out, _ = run(common + ["--output", tmp_path / "b3", "--batch_size", 3], capsys)
    assert rc == 0 and "done: 4 written" in out
    for rel in ("a.jpg", "sub/b.PNG", "sub/deeper/c.png", "d.png"):  # GIF (palette) -> PNG
        one, three = (np.array(Image.open(tmp_path / b / rel)).astype(int) for b in ("b1", "b3"))
        assert np.abs(one - three).max() <= 1  # batched conv may round differently, by one level at most
    assert Image.open(tmp_path / "b3" / "d.png").size == (11, 13)
    assert run(common + ["--output", tmp_path / "lat", "--encode"], capsys)[0] == 0
    written = sorted(os.path.relpath(os.path.join(d, f), tmp_path / "lat")
                     for d, _, fs in os.walk(tmp_path / "lat") for f in fs)
    assert written == ["a.pt", "d.pt", os.path.join("sub", "b.pt"), os.path.join("sub", "deeper", "c.pt")]
    assert run(common + ["--output", tmp_path / "st", "--encode", "--ext", ".safetensors"], capsys)[0] == 0
    assert os.path.isfile(tmp_path / "st" / "sub" / "b.safetensors")
    rc, _, err = run(["--model_path", folder, "--input", tmp_path / "st", "--output", tmp_path / "dec",
                      "--decode"], capsys)
    assert rc == 0, err
    assert Image.open(tmp_path / "dec" / "d.png").size == (11, 13)
    assert torch.equal(read_png(tmp_path / "dec" / "d.png"), read_png(tmp_path / "b1" / "d.png"))


def test_folder_mode_skips_a_bad_file_and_fails_at_the_end(tiny, tmp_path):
    """A real process: exit code 1, the bad file named, the good ones written, no traceback."""
    src = tmp_path / "in"
    save_photo(src / "good1.png", "chelsea", (24, 20))
    save_photo(src / "sub" / "good2.jpg", "coffee", (26, 30))
    (src / "sub" / "broken.jpg").write_bytes(b"this is not a jpeg")
    rc, out, err = run_subprocess(["--model_path", tiny[0], "--input", src, "--output", tmp_path / "out"])
    assert rc == 1
    assert "Traceback" not in err and "Traceback" not in out
    assert os.path.join("sub", "broken.jpg") in err and "done: 2 written" in out and "1 failed" in out
    assert "3/3" in err  # the progress bar (stderr)
    assert Image.open(tmp_path / "out" / "good1.png").size == (20, 24)
    assert Image.open(tmp_path / "out" / "sub" / "good2.jpg").size == (30, 26)
    # nothing for the bad file, no temporary files
    assert sorted(os.listdir(tmp_path / "out" / "sub")) == ["good2.jpg"]


def test_output_may_not_overwrite_the_input(tiny, tmp_path, capsys):
    src = save_photo(tmp_path / "in" / "a.png", "chelsea", (20, 20))
    before = open(src, "rb").read()
    argv = ["--model_path", tiny[0], "--input", tmp_path / "in", "--output", tmp_path / "in"]
    rc, _, err = run(argv, capsys)
    assert rc == 1 and "overwrite its input" in err and open(src, "rb").read() == before


# ----------------------------------------------------------------------------------------- fp16 safety
def test_non_finite_fp16_result_is_redone_in_fp32(tmp_path, capsys):
    torch.manual_seed(0)
    model = perturb_(AutoencoderKL(**TINY)).eval()
    with torch.no_grad():  # activations ~1e6 inside the decoder: fine in fp32, inf in fp16 (max 65504)
        model.decoder.up_blocks[0].resnets[0].conv2.weight.mul_(1e6)
    model.save_pretrained(tmp_path / "m")
    src = save_photo(tmp_path / "in.png", "astronaut", (8, 12))
    half = AutoencoderKL.from_pretrained(tmp_path / "m", torch_dtype=torch.float16)
    with torch.no_grad():  # the premise: in fp16 this model really gives a non-finite image
        assert not torch.isfinite(half(pixels(src).half()).sample).all()
    rc, _, err = run(["--model_path", tmp_path / "m", "--input", src, "--output", tmp_path / "h.png",
                      "--dtype", "fp16"], capsys)
    assert rc == 0 and "non-finite" in err and "fp32" in err
    rc, _, err = run(["--model_path", tmp_path / "m", "--input", src, "--output", tmp_path / "f.png"], capsys)
    assert rc == 0, err
    assert torch.equal(read_png(tmp_path / "h.png"), read_png(tmp_path / "f.png"))
    assert torch.equal(read_png(tmp_path / "f.png"), reference_reconstruction(model, pixels(src)))


def test_a_partly_non_finite_result_is_an_error_and_nothing_is_written(tmp_path, capsys):
    torch.manual_seed(0)
    model = perturb_(AutoencoderKL(**TINY)).eval()
    with torch.no_grad():  # the red channel of every reconstruction is inf, green and blue are finite
        model.decoder.conv_out.bias[0] = float("inf")
    model.save_pretrained(tmp_path / "m")
    src = save_photo(tmp_path / "in.png", "astronaut", (8, 8))
    with torch.no_grad():  # the premise: some values are finite, some are not
        finite = torch.isfinite(model(pixels(src)).sample)
    assert finite.any() and not finite.all()
    argv = ["--model_path", tmp_path / "m", "--input", src, "--output", tmp_path / "o.png"]
    rc, _, err = run(argv, capsys)
    assert rc == 1 and "non-finite values (NaN/inf)" in err and not os.path.exists(tmp_path / "o.png")
    rc, _, err = run(argv + ["--allow_nonfinite"], capsys)
    assert rc == 0 and "warning:" in err and os.path.exists(tmp_path / "o.png")


# ------------------------------------------------------------------------------------------------ eval
def write_random_vgg16(torch_home):
    """torchvision's cache file, holding a randomly initialised VGG16 `features` state dict: LPIPS then runs
    its real loading path (file lookup, key mapping) with no download. Only the `features.*` keys are read."""
    from torchvision.models.vgg import cfgs, make_layers
    torch.manual_seed(0)
    features = make_layers(cfgs["D"])  # VGG16's conv stack, the layer indices of torchvision's vgg16()
    path = os.path.join(torch_home, "hub", "checkpoints", "vgg16-397923af.pth")
    os.makedirs(os.path.dirname(path))
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return path


def test_eval_figures_equal_losses_metrics_and_grid_is_written(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    write_random_vgg16(tmp_path / "torch_home")
    built, lpips_class = [], losses.LPIPS  # the network is built once (VGG16's construction is slow)
    monkeypatch.setattr(losses, "LPIPS", lambda *a, **k: built.append(lpips_class(*a, **k)) or built[-1])
    src = tmp_path / "in"
    names = [("a.png", "astronaut", (40, 48)), ("sub/b.jpg", "coffee", (36, 52)),
             ("c.png", "chelsea", (9, 30))]
    for rel, photo, size in names:
        save_photo(src / rel, photo, size)
    rc, out, err = run(["--model_path", tiny[0], "--input", src, "--output", tmp_path / "ev", "--eval",
                        "--lpips", "on", "--grid_images", 2], capsys)
    assert rc == 0, err
    with open(tmp_path / "ev" / "metrics.csv", newline="") as f:
        rows = [{k: v if k == "file" else float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    assert [r["file"] for r in rows] == ["a.png", "c.png", os.path.join("sub", "b.jpg")]
    lpips = built[0]  # the CLI's losses.LPIPS, the (random) weights loaded the real way
    for r in rows:
        recon = tmp_path / "ev" / "reconstructions" / (os.path.splitext(r["file"])[0] + ".png")
        x, y = pixels(src / r["file"]), pixels(recon)
        assert (r["height"], r["width"]) == tuple(x.shape[-2:]) == tuple(y.shape[-2:])
        assert r["psnr"] == pytest.approx(float(losses.psnr(x, y)[0]), abs=1e-5)
        if min(x.shape[-2:]) >= 11:
            assert r["ssim"] == pytest.approx(float(losses.ssim(x, y)[0]), abs=1e-5)
            assert r["lpips"] == pytest.approx(float(lpips(x, y).flatten()[0]), abs=1e-5)
        else:  # 9 px high: SSIM's 11x11 window does not fit, and VGG's pooling runs out of pixels
            assert np.isnan(r["ssim"])
    psnr = np.array([r["psnr"] for r in rows])
    ssim = np.array([r["ssim"] for r in rows if np.isfinite(r["ssim"])])
    assert f"{psnr.mean():.2f} ± {psnr.std():6.2f}" in out
    assert f"{ssim.mean():.4f} ± {ssim.std():6.4f}" in out and "2 image(s) left out" not in out
    grid = Image.open(tmp_path / "ev" / "grid.png")
    # the first two images in file order (a.png, c.png), 256 px high, originals on top
    thumbs = [fid.thumbnail(read_png(p)) for p in (src / "a.png", src / "c.png")]
    recons = [fid.thumbnail(read_png(tmp_path / "ev" / "reconstructions" / n)) for n in ("a.png", "c.png")]
    assert grid.size == (thumbs[0].width + thumbs[1].width, 512)
    assert np.array_equal(np.array(grid.crop((0, 0, thumbs[0].width, 256))), np.array(thumbs[0]))
    assert np.array_equal(np.array(grid.crop((0, 256, thumbs[0].width, 512))), np.array(recons[0]))
    assert np.array_equal(np.array(grid.crop((thumbs[0].width, 256, grid.width, 512))), np.array(recons[1]))


def test_eval_without_lpips_weights(tiny, tmp_path, capsys, monkeypatch):
    """An unreadable VGG16 cache file (no network involved): auto reports LPIPS unavailable with the reason
    and still writes everything; --lpips on refuses with one line before reconstructing anything."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    os.makedirs(tmp_path / "th" / "hub" / "checkpoints")
    (tmp_path / "th" / "hub" / "checkpoints" / "vgg16-397923af.pth").write_bytes(b"corrupt")
    src = save_photo(tmp_path / "in.png", "chelsea", (32, 32))
    argv = ["--model_path", tiny[0], "--input", src, "--output", tmp_path / "ev", "--eval"]
    rc, out, err = run(argv, capsys)
    assert rc == 0, err
    assert "LPIPS        unavailable" in out and "vgg16-397923af.pth" in out
    assert os.path.isfile(tmp_path / "ev" / "metrics.csv") and os.path.isfile(tmp_path / "ev" / "grid.png")
    rc, out, err = run(["--model_path", tiny[0], "--input", src, "--output", tmp_path / "ev2", "--eval",
                        "--lpips", "on"], capsys)
    assert rc == 1 and err.startswith("error: LPIPS unavailable") and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "ev2")  # not even an empty folder


# ------------------------------------------------------------------------------------------ bad inputs
def bad_case(case, tmp_path, model_folder):
    """-> (argv, output path that must not exist, words the message must contain)."""
    good = save_photo(tmp_path / "good.png", "chelsea", (16, 16))
    out = tmp_path / "out" / "result.png"
    model = ["--model_path", model_folder]
    if case == "non_image":
        (tmp_path / "notes.png").write_text("just some text\n")
        argv = model + ["--input", tmp_path / "notes.png", "--output", out]
        return argv, out, ["notes.png", "not an image"]
    if case == "truncated_image":
        blob = open(save_photo(tmp_path / "full.jpg", "astronaut", (64, 64)), "rb").read()
        (tmp_path / "cut.jpg").write_bytes(blob[: len(blob) // 2])
        return model + ["--input", tmp_path / "cut.jpg", "--output", out], out, ["cut.jpg"]
    if case in ("latent_channels", "latent_dims", "latent_batch", "latent_garbage"):
        value = {"latent_channels": torch.randn(3, 8, 8), "latent_dims": torch.randn(4, 8),
                 "latent_batch": torch.randn(2, 4, 8, 8)}.get(case)
        path = tmp_path / "lat.pt"
        torch.save(value, path) if value is not None else path.write_bytes(b"\x80garbage")
        words = ["lat.pt"] + (["shape"] if value is not None else ["not a readable latent file"])
        return model + ["--input", path, "--output", out, "--decode"], out, words
    if case == "latent_image_size":  # metadata that does not belong to this latent
        torch.save({"latent": torch.randn(4, 8, 8), "image_size": (30, 16)}, tmp_path / "lat.pt")
        argv = model + ["--input", tmp_path / "lat.pt", "--output", out, "--decode"]
        return argv, out, ["lat.pt", "image_size"]
    if case == "missing_input":
        argv = model + ["--input", tmp_path / "nope.png", "--output", out]
        return argv, out, ["nope.png", "does not exist"]
    if case == "missing_model":
        argv = ["--model_path", tmp_path / "no_model", "--input", good, "--output", out]
        return argv, out, ["cannot load model"]
    if case == "invalid_model":  # a config that does not fit the weights
        bad = tmp_path / "bad_model"
        AutoencoderKL(**TINY).save_pretrained(bad)
        (bad / "config.json").write_text('{"block_out_channels": [16, 32], "norm_num_groups": 8, '
                                         '"down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"], '
                                         '"up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"]}')
        return ["--model_path", bad, "--input", good, "--output", out], out, ["cannot load model", "shape"]
    if case == "unwritable_output":  # a regular file where a folder should be (root ignores permission bits)
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "result.png"
        return model + ["--input", good, "--output", out], out, ["cannot write"]
    if case == "virtual_filesystem_output":  # /proc exists but takes no files: ENOENT, said plainly
        if not os.path.isdir("/proc/self"):
            pytest.skip("no /proc")
        out = "/proc/sd_vae_test/result.png"
        return model + ["--input", good, "--output", out], out, ["cannot write", "'/proc' takes no new files"]
    if case == "unknown_extension":
        out = tmp_path / "result.xyz"
        return model + ["--input", good, "--output", out], out, ["unknown extension", ".png"]
    if case == "image_as_latent_output":
        out = tmp_path / "result.png"
        argv = model + ["--input", good, "--output", out, "--encode"]
        return argv, out, ["unknown extension", ".safetensors"]
    raise AssertionError(case)


BAD_CASES = ["non_image", "truncated_image", "latent_channels", "latent_dims", "latent_batch",
             "latent_garbage",
             "latent_image_size",
             "missing_input", "missing_model", "invalid_model", "unwritable_output",
             "virtual_filesystem_output",
             "unknown_extension",
             "image_as_latent_output"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_one_line_exit_1_no_output(tiny, tmp_path, capsys, case):
    argv, out, words = bad_case(case, tmp_path, tiny[0])
    before = {os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs}
    rc, stdout, err = run(argv, capsys)
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not os.path.exists(out)
    after = {os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs}
    assert after == before  # no partial or temporary file anywhere


@pytest.mark.slow  # a Python start each; test_folder_mode_skips_a_bad_file_and_fails_at_the_end runs quick
@pytest.mark.parametrize("case", ["truncated_image", "latent_channels", "missing_model"])
def test_bad_input_in_a_real_process(tiny, tmp_path, case):
    argv, out, words = bad_case(case, tmp_path, tiny[0])
    rc, stdout, err = run_subprocess(argv)
    assert rc == 1 and "Traceback" not in err + stdout
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words[0] in lines[0], err
    assert not os.path.exists(out)


def test_bad_tile_size_and_batch_size(tiny, tmp_path, capsys):
    src = save_photo(tmp_path / "in.png", "chelsea", (16, 16))
    for extra, word in ((["--tiling", "--tile_size", 0], "positive"), (["--batch_size", 0], "batch_size"),
                        (["--tiling", "--tile_mode", "blend", "--tile_size", 15], "multiple of 4")):
        argv = ["--model_path", tiny[0], "--input", src, "--output", tmp_path / "o.png"] + extra
        rc, _, err = run(argv, capsys)
        assert rc == 1 and word in err and len(err.strip().splitlines()) == 1
        assert "tile_sample_size" not in err and ("--tile_size" in err or "--tile_size" not in extra)
        assert not os.path.exists(tmp_path / "o.png")
