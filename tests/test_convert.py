"""convert_weights.py and vae.py's LDM key map: CompVis/LDM <-> diffusers VAE weights, checked against LDM's
architecture and diffusers' own single-file converter; CLI behaviour on good and bad input."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SD15, TINY, assert_same, perturb_, photo
from safetensors.torch import load_file, save_file

import convert_weights as cw
from vae import AutoencoderKL, config_from_weights, ldm_to_diffusers


def ldm_reference_shapes(ch, ch_mult, num_res_blocks, z_channels, in_channels=3, out_ch=3, embed_dim=None):
    """{key: shape} of an LDM AutoencoderKL, built the way CompVis/latent-diffusion's model.py Encoder/Decoder
    name and size their modules (independent of convert_weights' mapping tables)."""
    embed_dim = embed_dim or z_channels
    s = {}

    def conv(name, cin, cout, k):
        s[f"{name}.weight"], s[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        s[f"{name}.weight"], s[f"{name}.bias"] = (c,), (c,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def mid(part, c):
        resnet(f"{part}.mid.block_1", c, c)
        norm(f"{part}.mid.attn_1.norm", c)
        for p in ("q", "k", "v", "proj_out"):  # AttnBlock: 1x1 Conv2d projections
            conv(f"{part}.mid.attn_1.{p}", c, c, 1)
        resnet(f"{part}.mid.block_2", c, c)

    n = len(ch_mult)
    in_ch_mult = (1,) + tuple(ch_mult)
    conv("encoder.conv_in", in_channels, ch, 3)
    for i in range(n):
        block_in, block_out = ch * in_ch_mult[i], ch * ch_mult[i]
        for j in range(num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", block_in, block_out)
            block_in = block_out
        if i != n - 1:
            conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
    mid("encoder", block_in)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", block_in, 2 * z_channels, 3)  # double_z
    block_in = ch * ch_mult[-1]
    conv("decoder.conv_in", z_channels, block_in, 3)
    mid("decoder", block_in)
    for i in reversed(range(n)):  # built deepest first, then self.up.insert(0, up)
        block_out = ch * ch_mult[i]
        for j in range(num_res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", block_in, block_out)
            block_in = block_out
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", block_in, out_ch, 3)
    conv("quant_conv", 2 * z_channels, 2 * embed_dim, 1)
    conv("post_quant_conv", embed_dim, z_channels, 1)
    return s


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return perturb_(AutoencoderKL(**{**TINY, **overrides}), seed=seed).eval()


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "convert_weights.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


# ---------------------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("which", ["tiny", "sd15"])
def test_export_has_ldm_architecture_keys_and_shapes(sd_pair, which):
    if which == "sd15":
        sd, ref = sd_pair[0].state_dict(), ldm_reference_shapes(128, (1, 2, 4, 4), 2, 4)
    else:
        sd, ref = tiny_model().state_dict(), ldm_reference_shapes(32, (1, 2), 1, 4)
    ldm = cw.diffusers_to_ldm(sd)
    assert {k: tuple(v.shape) for k, v in ldm.items()} == ref
    # hand-picked correspondences: decoder levels reversed, shortcut renamed, attention as (C, C, 1, 1)
    n = 4 if which == "sd15" else 2
    assert torch.equal(ldm[f"decoder.up.{n - 1}.block.0.conv1.weight"],
                       sd["decoder.up_blocks.0.resnets.0.conv1.weight"])
    assert torch.equal(ldm["decoder.up.0.block.1.norm2.bias"],
                       sd[f"decoder.up_blocks.{n - 1}.resnets.1.norm2.bias"])
    assert torch.equal(ldm[f"decoder.up.{n - 1}.upsample.conv.bias"],
                       sd["decoder.up_blocks.0.upsamplers.0.conv.bias"])
    assert torch.equal(ldm["encoder.down.1.block.0.nin_shortcut.weight"],
                       sd["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"])
    assert torch.equal(ldm["encoder.down.0.downsample.conv.weight"],
                       sd["encoder.down_blocks.0.downsamplers.0.conv.weight"])
    assert torch.equal(ldm["decoder.mid.attn_1.proj_out.weight"][:, :, 0, 0],
                       sd["decoder.mid_block.attentions.0.to_out.0.weight"])
    assert torch.equal(ldm["encoder.mid.attn_1.norm.bias"],
                       sd["encoder.mid_block.attentions.0.group_norm.bias"])
    assert torch.equal(ldm["encoder.norm_out.weight"], sd["encoder.conv_norm_out.weight"])


@pytest.mark.slow  # SD-size files: the property is the full layout, and the quick run's peak memory
@torch.no_grad()
def test_diffusers_single_file_converter_reads_our_export(sd_pair, tmp_path):
    """folder (written by diffusers) -> CLI -> LDM .safetensors -> diffusers' convert_ldm_vae_checkpoint ->
    same model."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    ref = sd_pair[0]
    ref.save_pretrained(tmp_path / "folder")
    assert cw.main([str(tmp_path / "folder"), str(tmp_path / "vae.safetensors")]) == 0
    ldm = load_file(tmp_path / "vae.safetensors")
    assert not any(k.startswith("first_stage_model.") for k in ldm)  # A1111/ComfyUI VAE files carry no prefix
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    theirs = convert_ldm_vae_checkpoint(ldm, dict(ref.config))
    assert_same(theirs, ref.state_dict())
    model = DiffusersAutoencoderKL(**SD15).eval()
    model.load_state_dict(theirs, strict=True)
    x = photo("astronaut", (32, 32))
    assert torch.equal(model(x).sample, ref(x).sample)
    # the other direction: diffusers' converter and ours agree on a prefixed (full-SD-style) LDM state dict
    prefixed = {"first_stage_model." + k: v for k, v in ldm.items()}
    assert_same(cw.ldm_to_diffusers(prefixed), convert_ldm_vae_checkpoint(prefixed, dict(ref.config)))


# ------------------------------------------------------------------------------------------ file -> folder
@pytest.mark.slow  # a whole SD 1.5 checkpoint's VAE beside the pair: the quick run's peak memory
@torch.no_grad()
def test_full_sd15_ckpt_converts_to_matching_folder(sd_pair, tmp_path):
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    ref, ours = sd_pair
    ldm = cw.diffusers_to_ldm(ref.state_dict())
    state = {"first_stage_model." + k: v for k, v in ldm.items()}
    g = torch.Generator().manual_seed(1)
    state.update({  # the rest of a full SD 1.5 checkpoint, which the converter must ignore
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(320, 4, 3, 3, generator=g),
        "model.diffusion_model.out.2.bias": torch.randn(4, generator=g),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight":
            torch.randn(16, 8, generator=g),
        "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(10, dtype=torch.int32),
        "model_ema.diffusion_modelout2bias": torch.randn(4, generator=g),
        "first_stage_model.loss.logvar": torch.zeros(()),  # LDM training leftovers (LPIPS/discriminator)
        "first_stage_model.loss.discriminator.main.0.weight": torch.randn(64, 3, 4, 4, generator=g),
        "alphas_cumprod": torch.rand(1000, generator=g),
    })
    torch.save({"state_dict": state, "global_step": 470000, "epoch": 6}, tmp_path / "sd15.ckpt")
    assert cw.main([str(tmp_path / "sd15.ckpt"), str(tmp_path / "out")]) == 0
    assert sorted(os.listdir(tmp_path)) == ["out", "sd15.ckpt"]  # no temporary leftovers
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    for key in ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups",
                "scaling_factor"):
        assert config[key] == SD15[key], key
    mine = AutoencoderKL.from_pretrained(tmp_path / "out").eval()
    theirs = DiffusersAutoencoderKL.from_pretrained(tmp_path / "out").eval()
    # vae.py reads the single file itself
    direct = AutoencoderKL.from_pretrained(tmp_path / "sd15.ckpt").eval()
    for m in (mine, theirs, direct):
        assert_same(m.state_dict(), ref.state_dict())
    x = photo("coffee", (32, 32))
    assert torch.equal(theirs(x).sample, ref(x).sample)
    assert torch.equal(mine(x).sample, ours(x).sample)
    assert torch.equal(direct(x).sample, ours(x).sample)


@pytest.mark.parametrize("kind", ["safetensors", "ckpt", "legacy-pickle-ckpt"])
@torch.no_grad()
def test_standalone_vae_file_converts_to_matching_folder(tmp_path, kind):
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    src_model = tiny_model(seed=1)
    ldm = cw.diffusers_to_ldm(src_model.state_dict())
    path = tmp_path / ("vae.safetensors" if kind == "safetensors" else "vae.ckpt")
    if kind == "safetensors":
        save_file({k: v.contiguous() for k, v in ldm.items()}, path)
    else:  # like vae-ft-mse-840000-ema-pruned.ckpt: {"state_dict": unprefixed keys}, plus LDM loss leftovers
        torch.save({"state_dict": {**ldm, "loss.logvar": torch.zeros(())}, "global_step": 840000}, path,
                   # pre-1.6 torch.save format cannot be mmapped
                   _use_new_zipfile_serialization=kind == "ckpt")
    assert cw.main([str(path), str(tmp_path / "out"), "--norm_num_groups", "8"]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["norm_num_groups"] == 8 and config["block_out_channels"] == [32, 64]
    x = photo("chelsea", (16, 16))
    for cls in (AutoencoderKL, DiffusersAutoencoderKL):
        loaded = cls.from_pretrained(tmp_path / "out").eval()
        assert_same(loaded.state_dict(), src_model.state_dict())
    assert torch.equal(AutoencoderKL.from_pretrained(tmp_path / "out")(x).sample, src_model(x).sample)
    # converting into an existing folder replaces its weights
    other = tiny_model(seed=7)
    save_file({k: v.contiguous() for k, v in cw.diffusers_to_ldm(other.state_dict()).items()},
              tmp_path / "b.safetensors")
    assert cw.main([str(tmp_path / "b.safetensors"), str(tmp_path / "out"), "--norm_num_groups", "8"]) == 0
    assert_same(AutoencoderKL.from_pretrained(tmp_path / "out").state_dict(), other.state_dict())
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "diffusion_pytorch_model.safetensors"]


def test_prefixed_diffusers_layout_passes_through():
    """A Lightning-style checkpoint of a diffusers-layout model ("vae." prefix, other modules beside) is
    accepted."""
    sd = tiny_model(seed=8).state_dict()
    ckpt = {"state_dict": {**{"vae." + k: v for k, v in sd.items()},
                           "discriminator.main.0.weight": torch.zeros(2)}}
    assert_same(cw.ldm_to_diffusers(ckpt), sd)


def test_folder_with_legacy_attention_names_exports(tmp_path):
    """Old hub folders name the attention query/key/value/proj_attn; vae.py reads them, the export is the
    same."""
    model = tiny_model(seed=9)
    model.save_pretrained(tmp_path / "folder")
    path = tmp_path / "folder" / "diffusion_pytorch_model.safetensors"
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for k, v in load_file(path).items():
        for new, old in old_names.items():
            k = k.replace(new, old)
        legacy[k] = v
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in legacy
    save_file(legacy, path)
    assert cw.main([str(tmp_path / "folder"), str(tmp_path / "vae.safetensors")]) == 0
    assert_same(load_file(tmp_path / "vae.safetensors"), cw.diffusers_to_ldm(model.state_dict()))


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    ldm = {k: v.to(dtype).contiguous()
           for k, v in cw.diffusers_to_ldm(tiny_model(seed=2).state_dict()).items()}
    save_file(ldm, tmp_path / "a.safetensors")
    assert cw.main([str(tmp_path / "a.safetensors"), str(tmp_path / "folder"), "--norm_num_groups", "8"]) == 0
    assert cw.main([str(tmp_path / "folder"), str(tmp_path / "b.safetensors")]) == 0
    assert_same(load_file(tmp_path / "b.safetensors"), ldm)  # same keys, dtypes (fp16 stays fp16), bits
    sd = tiny_model(seed=3).state_dict()
    assert_same(cw.ldm_to_diffusers(cw.diffusers_to_ldm(sd)), sd)


def test_attention_weights_accepted_as_conv_or_linear():
    sd = tiny_model(seed=4).state_dict()
    ldm = cw.diffusers_to_ldm(sd)
    attn = [k for k in ldm if ".attn_1." in k and not k.endswith(("bias", "norm.weight"))]
    assert len(attn) == 8 and all(ldm[k].dim() == 4 for k in attn)
    for shape in (lambda w: w[:, :, 0, 0], lambda w: w[:, :, :, 0]):  # Linear (C, C) and conv1d (C, C, 1)
        assert_same(cw.ldm_to_diffusers({**ldm, **{k: shape(ldm[k]) for k in attn}}), sd)
    conv_shaped = {k: v[:, :, None, None] if k.endswith(cw.ATTN_LINEAR) else v for k, v in sd.items()}
    assert_same(cw.diffusers_to_ldm(conv_shaped), ldm)


# ------------------------------------------------------------------------------------------ config inference
def test_config_inference_on_a_non_sd_size():
    cfg = dict(in_channels=1, out_channels=2, block_out_channels=[16, 32, 48], layers_per_block=3,
               latent_channels=6, norm_num_groups=16, down_block_types=["DownEncoderBlock2D"] * 3,
               up_block_types=["UpDecoderBlock2D"] * 3, use_quant_conv=False, use_post_quant_conv=True,
               mid_block_add_attention=False)
    src = perturb_(AutoencoderKL(**cfg)).eval()
    ldm = cw.diffusers_to_ldm(src.state_dict())
    assert "encoder.mid.attn_1.q.weight" not in ldm and "quant_conv.weight" not in ldm
    for state_dict in (ldm, src.state_dict()):  # LDM or diffusers layout
        inferred = config_from_weights(ldm_to_diffusers(state_dict), norm_num_groups=16)
        assert {k: inferred[k] for k in cfg} == cfg
    model = AutoencoderKL(**config_from_weights(ldm_to_diffusers(ldm), norm_num_groups=16)).eval()
    model.load_state_dict(cw.ldm_to_diffusers(ldm))
    x = torch.rand(1, 1, 16, 24) * 2 - 1
    with torch.no_grad():
        assert model(x).sample.shape == (1, 2, 16, 24)
        assert torch.equal(model(x).sample, src(x).sample)
    with pytest.raises(ValueError, match="norm_num_groups=32 does not divide"):
        # 48 channels cannot use SD's 32 groups: ask instead of guessing
        config_from_weights(ldm_to_diffusers(ldm))


# ---------------------------------------------------------------------------------------------- EMA
def test_ema_weights_only_on_request(tmp_path):
    ldm = cw.diffusers_to_ldm(tiny_model(seed=5).state_dict())
    ema_ldm = cw.diffusers_to_ldm(tiny_model(seed=6).state_dict())
    # LDM's LitEma buffers: "model_ema." + parameter name with the dots removed
    state = {**ldm, **{"model_ema." + k.replace(".", ""): v for k, v in ema_ldm.items()},
             "model_ema.decay": torch.tensor(0.999), "model_ema.num_updates": torch.tensor(3)}
    assert_same(cw.ldm_to_diffusers(state), cw.ldm_to_diffusers(ldm))
    assert_same(cw.ldm_to_diffusers(state, prefer_ema=True), cw.ldm_to_diffusers(ema_ldm))
    with pytest.raises(cw.ConversionError, match="no EMA copy"):
        cw.ldm_to_diffusers(ldm, prefer_ema=True)
    torch.save({"state_dict": state}, tmp_path / "ema.ckpt")
    argv = [str(tmp_path / "ema.ckpt"), str(tmp_path / "out"), "--ema", "--norm_num_groups", "8"]
    assert cw.main(argv) == 0
    assert_same(AutoencoderKL.from_pretrained(tmp_path / "out").state_dict(), cw.ldm_to_diffusers(ema_ldm))


# ---------------------------------------------------------------------------------------------- errors
def test_cli_file_without_vae_fails_cleanly(tmp_path):
    torch.save({"state_dict": {"model.diffusion_model.out.2.weight": torch.zeros(4, 320, 3, 3),
                               "cond_stage_model.transformer.x.weight": torch.zeros(2, 2)}},
               tmp_path / "unet.ckpt")
    r = run_cli(tmp_path / "unet.ckpt", tmp_path / "out")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "no VAE weights found" in r.stderr and "unet.ckpt" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["unet.ckpt"]  # nothing written, not even a temporary


def _bad_inputs(tmp_path):
    ldm = cw.diffusers_to_ldm(tiny_model().state_dict())
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint at all")
    # weights_only refuses
    torch.save({"state_dict": {"a": argparse.Namespace()}}, tmp_path / "pickled_code.ckpt")
    for name, drop in [("nodec", "decoder."), ("no_conv_in", "decoder.conv_in.weight"),
                       ("no_bias", "decoder.up.0.block.1.conv2.bias")]:
        save_file({k: v.contiguous() for k, v in ldm.items() if not k.startswith(drop)},
                  tmp_path / f"{name}.safetensors")
    save_file({**{k: v.contiguous() for k, v in ldm.items()},
               "encoder.down.0.attn.0.q.weight": torch.zeros(32, 32, 1, 1)}, tmp_path / "extra.safetensors")
    save_file({k: v.contiguous() for k, v in ldm.items()}, tmp_path / "good.safetensors")
    (tmp_path / "not_diffusers").mkdir()
    (tmp_path / "a_file").write_text("x")
    return [  # (argv, expected message fragment)
        (["garbage.ckpt", "out"], "cannot read weights"),
        (["pickled_code.ckpt", "out"], "cannot read weights"),
        (["missing.ckpt", "out"], "no such file"),
        (["nodec.safetensors", "out", "--norm_num_groups", "8"], "encoder has 2 levels but decoder has 0"),
        (["no_conv_in.safetensors", "out", "--norm_num_groups", "8"], "missing decoder.conv_in.weight"),
        (["no_bias.safetensors", "out", "--norm_num_groups", "8"],
         "decoder.up_blocks.1.resnets.1.conv2.bias"),
        (["extra.safetensors", "out", "--norm_num_groups", "8"], "encoder.down.0.attn.0.q.weight"),
        (["good.safetensors", "out.safetensors"], "converts to a diffusers folder"),
        (["good.safetensors", "a_file"], "converts to a diffusers folder"),
        (["not_diffusers", "out.safetensors"], "no config.json"),
        (["not_diffusers", "out.ckpt"], "LDM '.safetensors' file"),
        (["notes.txt", "out"], "expected a folder or a"),
    ]


def test_cli_bad_inputs_give_one_line_errors_and_no_output(tmp_path, capsys):
    cases = _bad_inputs(tmp_path)
    before = sorted(os.listdir(tmp_path))
    for argv, fragment in cases:
        assert cw.main([str(tmp_path / a) if i < 2 else a for i, a in enumerate(argv)]) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, (argv, err)
        assert fragment in err, (argv, err)
        assert sorted(os.listdir(tmp_path)) == before, argv  # no partial output, no temporaries


def test_folder_ldm_folder_round_trip_keeps_what_shapes_cannot_show(tmp_path):
    """A 16-group, 64-px model with its own scaling factor survives folder -> LDM file -> folder with no
    flags: the export records the config in the safetensors header and the import reads it back (vae.py alone
    too)."""
    config = dict(TINY, norm_num_groups=16, sample_size=64, scaling_factor=0.5)
    model = perturb_(AutoencoderKL(**config)).eval()
    model.save_pretrained(tmp_path / "a")
    result = run_cli(tmp_path / "a", tmp_path / "a.safetensors")
    assert result.returncode == 0, result.stderr
    result = run_cli(tmp_path / "a.safetensors", tmp_path / "b")
    assert result.returncode == 0 and "note:" not in result.stderr, result.stderr
    assert json.loads((tmp_path / "b" / "config.json").read_text()) == json.loads(
        (tmp_path / "a" / "config.json").read_text())
    back = AutoencoderKL.from_pretrained(tmp_path / "b")
    assert back.config == model.config
    assert_same(back.state_dict(), model.state_dict())
    direct = AutoencoderKL.from_pretrained(tmp_path / "a.safetensors")  # the LDM file itself, through vae.py
    assert direct.config["norm_num_groups"] == 16 and direct.config["sample_size"] == 64
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(direct(x).sample, model(x).sample)


def test_a_file_without_a_recorded_config_says_what_it_assumed(tmp_path):
    save_file(cw.diffusers_to_ldm(perturb_(AutoencoderKL(**dict(TINY, norm_num_groups=16))).state_dict()),
              tmp_path / "plain.safetensors")
    result = run_cli(tmp_path / "plain.safetensors", tmp_path / "out")
    assert result.returncode == 0 and result.stderr.count("\n") == 1, result.stderr
    assert "records no norm_num_groups, sample_size, scaling_factor" in result.stderr
    assert "--norm_num_groups" in result.stderr  # the fix, named


@pytest.mark.parametrize("kind", ["png", "text", "empty"])
def test_a_file_that_is_not_weights_is_named_in_one_line(tmp_path, kind):
    path = tmp_path / "model.pt"
    if kind == "png":
        from PIL import Image
        from skimage import data
        Image.fromarray(data.chelsea()).save(path, format="PNG")  # a real photo under a weights name
    else:
        path.write_text("" if kind == "empty" else "not weights\n")
    result = run_cli(path, tmp_path / "out")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "weights_only" not in result.stderr and "not a readable weights file" in result.stderr
    assert {"png": "PNG image", "text": "text", "empty": "text"}[kind] in result.stderr
    assert not (tmp_path / "out").exists()
