"""The training config: every setting with its default, config.yaml's layout, and its parsing and checks.

    cfg = load_config("config.yaml", ["training.batch_size=2"])  # config.yaml + section.key=value overrides
    cfg = config_from_dict({"training": {"max_steps": 10}})      # a plain nested dict; missing keys: defaults

config.yaml says what each setting does; the architecture keys (model.*) default to vae.py's DEFAULT_CONFIG.
A bad file, key, value or override raises ConfigError with a one-line message naming the key ("did you mean"
for a misspelt one); every check of a setting is made here, once.
"""
import contextlib
import copy
import difflib
import types
from dataclasses import dataclass, field, fields
from typing import Literal, Union, get_args, get_origin, get_type_hints

import yaml

from data import UserError
from vae import DEFAULT_CONFIG

# What the loop logs (TensorBoard scalar tags); checkpoint.monitor must be one of them.
LOSS_TAGS = ("train/loss", "train/rec_loss", "train/p_loss", "train/kl_loss", "train/g_loss", "train/d_loss")
STEP_TAGS = LOSS_TAGS + ("train/psnr", "train/grad_norm", "train/disc_grad_norm")  # one step's, train_step
EXTRA_TAGS = ("train/lr", "train/disc_lr", "train/images_per_sec")  # once per log window
VAL_TAGS = ("val/rec_loss", "val/psnr", "val/ssim", "val/lpips", "val/latent_mean", "val/latent_std")
RFID_TAG = "val/rfid"  # with logging.val_rfid


def _vae(key):  # an architecture key's default: vae.py's DEFAULT_CONFIG, the one place SD 1.5's values live
    return field(default_factory=lambda: copy.deepcopy(DEFAULT_CONFIG[key]))


@dataclass
class ModelConfig:
    pretrained_model_name_or_path: str | None = "stabilityai/sd-vae-ft-mse"  # or a folder, LDM file; None
    subfolder: str | None = None  # e.g. "vae" in a full pipeline repository
    gradient_checkpointing: bool = False
    estimate_scaling_factor: bool = False  # LDM's scale_by_std at export (a VAE trained from scratch)
    # The architecture, for training from scratch: diffusers' AutoencoderKL config keys
    in_channels: int = _vae("in_channels")
    out_channels: int = _vae("out_channels")
    down_block_types: list[str] = _vae("down_block_types")
    up_block_types: list[str] = _vae("up_block_types")
    block_out_channels: list[int] = _vae("block_out_channels")
    layers_per_block: int = _vae("layers_per_block")
    act_fn: str = _vae("act_fn")
    latent_channels: int = _vae("latent_channels")
    norm_num_groups: int = _vae("norm_num_groups")
    sample_size: int | list[int] = _vae("sample_size")
    scaling_factor: float = _vae("scaling_factor")
    shift_factor: float | None = _vae("shift_factor")
    latents_mean: list[float] | None = _vae("latents_mean")
    latents_std: list[float] | None = _vae("latents_std")
    force_upcast: bool = _vae("force_upcast")
    use_quant_conv: bool = _vae("use_quant_conv")
    use_post_quant_conv: bool = _vae("use_post_quant_conv")
    mid_block_add_attention: bool = _vae("mid_block_add_attention")


@dataclass
class TrainingConfig:
    seed: int = 42
    batch_size: int = 4  # per process
    num_epochs: int = 100
    max_steps: int | None = None  # optimizer steps; None: num_epochs decides
    learning_rate: float = 4.5e-6
    disc_learning_rate: float = 4.5e-6
    weight_decay: float = 0.01  # AdamW, both optimizers
    adam_betas: list[float] = field(default_factory=lambda: [0.5, 0.9])  # LDM's (0.5, 0.9)
    warmup_steps: int = 0  # linear warm-up of both learning rates
    lr_schedule: Literal["constant", "cosine"] = "constant"  # after warm-up; cosine decays to 0 at max_steps
    gradient_clip_val: float | None = 1.0  # max gradient norm of each model; None: no clipping
    accumulate_grad_batches: int = 1
    precision: Literal["auto", "16-mixed", "bf16-mixed", "32"] = "auto"
    num_workers: int = 4  # data-loading processes per training process
    decoder_only: bool = False  # freeze encoder and quant_conv (sd-vae-ft-mse)
    ema_decay: float | None = None  # EMA of the VAE weights for validation and export; None: off
    compile: bool = False  # torch.compile the VAE blocks
    max_consecutive_nonfinite: int = 20  # skipped non-finite steps in a row that stop the run


@dataclass
class LossConfig:
    rec_loss_type: Literal["l1", "l2"] = "l2"
    kl_weight: float = 1e-6
    perceptual_weight: float = 0.5  # LPIPS-VGG; 0: off
    disc_weight: float = 1.0  # the PatchGAN term; 0: no discriminator
    disc_start_step: int = 50001  # the step the discriminator and the adversarial term start at
    disc_loss_type: Literal["hinge", "vanilla"] = "hinge"
    disc_num_layers: int = 3  # PatchGAN depth
    disc_ndf: int = 64  # PatchGAN base width
    learn_logvar: bool = False  # LDM registers a learnable log-variance but never optimizes it
    logvar_init: float = 0.0
    random_lpips_backbone: bool = False  # tests only: LPIPS with a random VGG16 (no download)


@dataclass
class DataConfig:  # data.build_datasets's settings; the last three data_stream.py's
    dataset_name: str | None = "lambdalabs/pokemon-blip-captions"  # Hugging Face dataset (hub or path)
    dataset_config_name: str | None = None
    train_data_dir: str | None = None  # a folder of images; wins over dataset_name
    val_data_dir: str | None = None  # else the dataset's split, else a hold-out of training images
    image_column: str = "image"
    resolution: int = 512
    center_crop: bool = True  # False: random crops (training only)
    random_flip: bool = True
    num_val_holdout: int = 64
    max_bad_fraction: float = 0.01  # more unreadable images than this stop the run
    cache_dir: str | None = None
    streaming: bool = False  # stream dataset_name instead of loading it
    train_shards: str | None = None  # WebDataset tar shards (streamed)
    shuffle_buffer: int = 1000  # streams: samples shuffled together


@dataclass
class CheckpointConfig:
    save_top_k: int = 3  # the k best by `monitor` (-1: all, 0: none); last.ckpt always
    save_every_n_steps: int = 1000
    monitor: str | None = "val/rec_loss"  # a logged tag; None: the newest k
    mode: Literal["min", "max"] = "min"
    on_save_error: Literal["error", "warn"] = "error"  # a failed save stops the run, or warns


@dataclass
class LoggingConfig:
    log_every_n_steps: int = 50
    val_check_interval: int = 500  # validate every this many steps
    log_images_every_n_steps: int = 500
    num_val_images: int = 4
    progress_bar: bool = True
    val_rfid: bool = False  # rFID of the validation set (fid.py; Inception weights)


@dataclass
class PathsConfig:
    output_dir: str = "./outputs"
    log_dir: str = "./logs"
    checkpoint_dir: str = "./checkpoints"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


SECTIONS = {f.name: f.type for f in fields(Config)}
POSITIVE = ["training.batch_size", "training.num_epochs", "training.accumulate_grad_batches",
            "training.max_consecutive_nonfinite", "data.resolution", "data.shuffle_buffer",
            "checkpoint.save_every_n_steps", "logging.log_every_n_steps", "logging.val_check_interval",
            "logging.log_images_every_n_steps", "loss.disc_num_layers", "loss.disc_ndf"]
PRECISIONS = {"32": "32", "32-true": "32", "16": "16-mixed", "bf16": "bf16-mixed"}  # Lightning's spellings


class ConfigError(UserError, ValueError):
    """A bad config file, key, value or override; the message names the key."""


def load_config(path=None, overrides=()):
    """config.yaml (or defaults when path is None) + `section.key=value` overrides (YAML scalars): Config."""
    raw = {}
    if path is not None:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
    for item in overrides:
        key, eq, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not eq or not dot or not name or "." in name:
            raise ConfigError(f"bad override {item!r}: expected section.key=value "
                              "(e.g. training.batch_size=8)")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"{key}: cannot parse override value {text!r} as YAML") from None
        if section in raw and not isinstance(raw[section], dict):
            raise ConfigError(f"{section}: expected a mapping of keys")
        raw.setdefault(section, {})[name] = value
    return config_from_dict(raw)


def config_from_dict(raw):
    """Plain nested dict (config.yaml's layout) -> Config. Missing keys take their defaults."""
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping of sections {list(SECTIONS)}, "
                          f"got {type(raw).__name__}")
    sections = {}
    for name, values in raw.items():
        if name not in SECTIONS:
            hint = difflib.get_close_matches(str(name), SECTIONS, 1)
            raise ConfigError(f"unknown section '{name}'" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
        values = {} if values is None else values  # an empty section in YAML
        if not isinstance(values, dict):
            raise ConfigError(f"{name}: expected a mapping of keys, got {values!r}")
        hints, kwargs = get_type_hints(SECTIONS[name]), {}
        for k, v in values.items():
            if k not in hints:
                hint = difflib.get_close_matches(str(k), hints, 1)
                raise ConfigError(f"unknown key '{name}.{k}'"
                                  + (f" (did you mean '{name}.{hint[0]}'?)" if hint else ""))
            if f"{name}.{k}" == "training.precision":  # also YAML's ints 32 and 16
                v = PRECISIONS.get(str(v), v)
            kwargs[k] = _coerce(v, hints[k], f"{name}.{k}")
        sections[name] = SECTIONS[name](**kwargs)
    cfg = Config(**sections)
    for key in POSITIVE:
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 1:
            raise ConfigError(f"{key}: must be >= 1")
    training, data = cfg.training, cfg.data
    if training.max_steps is not None and training.max_steps < 1:
        raise ConfigError("training.max_steps: must be >= 1 or null")
    if training.ema_decay is not None and not 0.0 < training.ema_decay < 1.0:
        raise ConfigError(f"training.ema_decay: must be in (0, 1) or null, got {training.ema_decay}")
    if training.lr_schedule == "cosine" and training.max_steps is None:
        raise ConfigError("training.lr_schedule: cosine decays to 0 at training.max_steps; set max_steps")
    if len(training.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in training.adam_betas):
        raise ConfigError(f"training.adam_betas: expected two numbers in [0, 1), got {training.adam_betas}")
    for key in ("learning_rate", "disc_learning_rate"):
        if getattr(training, key) <= 0:
            raise ConfigError(f"training.{key}: must be > 0, got {getattr(training, key)}")
    if (data.streaming or data.train_shards) and data.train_data_dir:
        raise ConfigError("data.train_data_dir is a folder read whole, not a stream: set it to null to "
                          "stream data.train_shards or data.dataset_name")
    if data.streaming and not (data.dataset_name or data.train_shards):
        raise ConfigError("data.streaming: nothing to stream; set data.dataset_name or data.train_shards")
    if cfg.model.pretrained_model_name_or_path is None:  # a pretrained model's factor is known once loaded
        check_resolution(data.resolution, cfg.model.block_out_channels, "model.block_out_channels")
    monitorable = STEP_TAGS + VAL_TAGS + EXTRA_TAGS + (RFID_TAG,) * cfg.logging.val_rfid
    if cfg.checkpoint.monitor is not None and cfg.checkpoint.monitor not in monitorable:
        raise ConfigError(f"checkpoint.monitor: expected one of {', '.join(monitorable)} or null, "
                          f"got {cfg.checkpoint.monitor!r}")
    return cfg


def check_resolution(resolution, block_out_channels, model):
    """data.resolution must be a multiple of the VAE's downsampling factor 2^(blocks - 1): else the decoder's
    output is smaller than its input and the loss fails at the first step."""
    factor = 2 ** (len(block_out_channels) - 1)
    if resolution % factor:
        raise ConfigError(f"data.resolution: {resolution} is not a multiple of {factor}, the downsampling "
                          f"factor of {model} ({len(block_out_channels)} blocks); use e.g. "
                          f"{max(factor, resolution - resolution % factor)}")


def _coerce(value, tp, key):
    """`value` checked against the annotation `tp`; ints widen to float. Raises ConfigError naming `key`."""
    if get_origin(tp) is Literal and value in get_args(tp):
        return value
    if get_origin(tp) is Literal:
        raise ConfigError(f"{key}: expected one of {', '.join(get_args(tp))}, got {value!r}")
    if get_origin(tp) in (Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return None
        for option in (a for a in get_args(tp) if a is not type(None)):
            with contextlib.suppress(ConfigError):
                return _coerce(value, option, key)
    elif get_origin(tp) is list:
        if isinstance(value, (list, tuple)):
            return [_coerce(v, get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    elif tp in (bool, int, str) and type(value) is tp:  # (a bool is no int here)
        return value
    elif tp is float and type(value) in (int, float):
        return float(value)
    elif tp is float and isinstance(value, str):
        with contextlib.suppress(ValueError):  # PyYAML (YAML 1.1) reads `1e-6` (no dot) as a string
            return float(value)
    name = str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")
    raise ConfigError(f"{key}: expected {name}, got {value!r} ({type(value).__name__})")

