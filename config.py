"""The training config: every setting with its default, config.yaml's layout, and its parsing and checks.

    cfg = load_config("config.yaml", ["training.batch_size=2"])   # config.yaml + section.key=value overrides
    cfg = config_from_dict({"training": {"max_steps": 10}})       # a plain nested dict; missing keys: defaults

train.py and lightning_module.py read their settings from here; the architecture keys (model.*) and their SD 1.5
values are vae.py's DEFAULT_CONFIG, not repeated here. A bad file, key, value or override raises ConfigError with a
one-line message naming the key ("did you mean" for a misspelt one).
"""
import contextlib
import copy
import difflib
from dataclasses import field, make_dataclass
from typing import List, Literal, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from data import UserError
from vae import DEFAULT_CONFIG

# What the loop logs (TensorBoard scalars); checkpoint.monitor must be one of them.
LOSS_TAGS = ["train/loss", "train/rec_loss", "train/p_loss", "train/kl_loss", "train/g_loss", "train/d_loss"]
STEP_TAGS = LOSS_TAGS + ["train/psnr", "train/grad_norm", "train/disc_grad_norm"]
VAL_TAGS = ["val/rec_loss", "val/psnr", "val/ssim", "val/lpips", "val/latent_mean", "val/latent_std"]
EXTRA_TAGS = ["train/lr", "train/disc_lr", "train/images_per_sec"]

# Every setting and its default, as config.yaml lists them: `key=default`, or `key=(type, default)` where the default
# alone does not give the type. The architecture keys and their SD 1.5 values are vae.py's DEFAULT_CONFIG.
VAE_TYPES = {"sample_size": Union[int, List[int]], "shift_factor": Optional[float],
             "latents_mean": Optional[List[float]], "latents_std": Optional[List[float]]}
Str = Optional[str]
SETTINGS = {
    "model": dict(pretrained_model_name_or_path=(Str, "stabilityai/sd-vae-ft-mse"), subfolder=(Str, None),
                  gradient_checkpointing=False, estimate_scaling_factor=False,
                  **{k: (VAE_TYPES[k], v) if k in VAE_TYPES else v for k, v in DEFAULT_CONFIG.items()}),
    "training": dict(seed=42, batch_size=4, num_epochs=100, max_steps=(Optional[int], None), learning_rate=4.5e-6,
                     disc_learning_rate=4.5e-6, weight_decay=0.01, adam_betas=[0.5, 0.9], warmup_steps=0,
                     lr_schedule=(Literal["constant", "cosine"], "constant"),
                     gradient_clip_val=(Optional[float], 1.0), accumulate_grad_batches=1,
                     precision=(Literal["auto", "16-mixed", "bf16-mixed", "32"], "auto"), num_workers=4,
                     decoder_only=False, ema_decay=(Optional[float], None), compile=False,
                     max_consecutive_nonfinite=20),
    "loss": dict(rec_loss_type=(Literal["l1", "l2"], "l2"), kl_weight=1e-6, perceptual_weight=0.5, disc_weight=1.0,
                 disc_start_step=50001, disc_loss_type=(Literal["hinge", "vanilla"], "hinge"), disc_num_layers=3,
                 disc_ndf=64, learn_logvar=False, logvar_init=0.0, random_lpips_backbone=False),
    "data": dict(dataset_name=(Str, "lambdalabs/pokemon-blip-captions"), dataset_config_name=(Str, None),
                 train_data_dir=(Str, None), val_data_dir=(Str, None), image_column="image", resolution=512,
                 center_crop=True, random_flip=True, num_val_holdout=64, max_bad_fraction=0.01,
                 cache_dir=(Str, None),  # the arguments of data.build_datasets; the last three are streaming's
                 streaming=False, train_shards=(Str, None), shuffle_buffer=1000),
    "checkpoint": dict(save_top_k=3, save_every_n_steps=1000, monitor=(Str, "val/rec_loss"),
                       mode=(Literal["min", "max"], "min"), on_save_error=(Literal["error", "warn"], "error")),
    "logging": dict(log_every_n_steps=50, val_check_interval=500, log_images_every_n_steps=500, num_val_images=4,
                    progress_bar=True, val_rfid=False),
    "paths": dict(output_dir="./outputs", log_dir="./logs", checkpoint_dir="./checkpoints"),
}
POSITIVE = ["training.batch_size", "training.num_epochs", "training.accumulate_grad_batches", "data.resolution",
            "data.shuffle_buffer",
            "training.max_consecutive_nonfinite", "checkpoint.save_every_n_steps", "logging.log_every_n_steps",
            "logging.val_check_interval", "logging.log_images_every_n_steps", "loss.disc_num_layers", "loss.disc_ndf"]
PRECISIONS = {"32": "32", "32-true": "32", "16": "16-mixed", "bf16": "bf16-mixed"}  # Lightning's other spellings


def _section(name, defaults):
    """A config section's dataclass; a field's type is its default's (a list's: of its first item's) unless given."""
    def typed(key, default):
        tp, default = default if isinstance(default, tuple) else (None, default)
        if tp is None and (default is None or default == []):
            raise TypeError(f"the setting {name}.{key} needs a type")
        tp = tp or (List[type(default[0])] if isinstance(default, list) else type(default))
        return key, tp, field(default_factory=lambda: copy.deepcopy(default))
    return make_dataclass(f"{name.title()}Config", [typed(k, d) for k, d in defaults.items()],
                          namespace={"__module__": __name__})


SECTIONS = {name: _section(name, defaults) for name, defaults in SETTINGS.items()}
Config = make_dataclass("Config", [(name, cls, field(default_factory=cls)) for name, cls in SECTIONS.items()],
                        namespace={"__module__": __name__})


class ConfigError(UserError, ValueError):
    """A bad config file, key, value or override; the message names the key."""


def load_config(path=None, overrides=()):
    """config.yaml (or defaults when path is None) + `section.key=value` overrides (YAML scalars) -> Config."""
    raw = {}
    if path is not None:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections {list(SECTIONS)}")
    for item in overrides:
        key, eq, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not eq or not dot or not name or "." in name:
            raise ConfigError(f"bad override {item!r}: expected section.key=value (e.g. training.batch_size=8)")
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
        raise ConfigError(f"the config must be a mapping of sections {list(SECTIONS)}, got {type(raw).__name__}")
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
                raise ConfigError(f"unknown key '{name}.{k}'" + (f" (did you mean '{name}.{hint[0]}'?)" if hint else ""))
            v = PRECISIONS.get(str(v), v) if f"{name}.{k}" == "training.precision" else v  # also YAML ints 32, 16
            kwargs[k] = _coerce(v, hints[k], f"{name}.{k}")
        sections[name] = SECTIONS[name](**kwargs)
    cfg = Config(**sections)
    for key in POSITIVE:
        if getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]) < 1:
            raise ConfigError(f"{key}: must be >= 1")
    t, monitorable = cfg.training, STEP_TAGS + VAL_TAGS + EXTRA_TAGS + ["val/rfid"] * cfg.logging.val_rfid
    if t.max_steps is not None and t.max_steps < 1:
        raise ConfigError("training.max_steps: must be >= 1 or null")
    if t.ema_decay is not None and not 0.0 < t.ema_decay < 1.0:
        raise ConfigError(f"training.ema_decay: must be in (0, 1) or null, got {t.ema_decay}")
    if t.lr_schedule == "cosine" and t.max_steps is None:
        raise ConfigError("training.lr_schedule: cosine decays to 0 at training.max_steps; set max_steps")
    if len(t.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in t.adam_betas):
        raise ConfigError(f"training.adam_betas: expected two numbers in [0, 1), got {t.adam_betas}")
    d = cfg.data
    if (d.streaming or d.train_shards) and d.train_data_dir:
        raise ConfigError("data.train_data_dir is a folder read whole, not a stream: set it to null to "
                          "stream data.train_shards or data.dataset_name")
    if d.streaming and not (d.dataset_name or d.train_shards):
        raise ConfigError("data.streaming: nothing to stream; set data.dataset_name or data.train_shards")
    for key in ("learning_rate", "disc_learning_rate"):
        if getattr(t, key) <= 0:
            raise ConfigError(f"training.{key}: must be > 0, got {getattr(t, key)}")
    if cfg.model.pretrained_model_name_or_path is None:  # a pretrained model's factor is known once it is loaded
        check_resolution(cfg.data.resolution, cfg.model.block_out_channels, "model.block_out_channels")
    if cfg.checkpoint.monitor is not None and cfg.checkpoint.monitor not in monitorable:
        raise ConfigError(f"checkpoint.monitor: expected one of {', '.join(monitorable)} or null, "
                          f"got {cfg.checkpoint.monitor!r}")
    return cfg


def check_resolution(resolution, block_out_channels, model):
    """data.resolution must be a multiple of the VAE's downsampling factor 2^(blocks - 1): else the decoder's output
    is smaller than its input and the loss fails at the first step."""
    factor = 2 ** (len(block_out_channels) - 1)
    if resolution % factor:
        raise ConfigError(f"data.resolution: {resolution} is not a multiple of {factor}, the downsampling factor of "
                          f"{model} ({len(block_out_channels)} blocks); use e.g. "
                          f"{max(factor, resolution - resolution % factor)}")


def _coerce(value, tp, key):
    """`value` checked against the annotation `tp`; ints widen to float. Raises ConfigError naming `key`."""
    if get_origin(tp) is Literal and value in get_args(tp):
        return value
    if get_origin(tp) is Literal:
        raise ConfigError(f"{key}: expected one of {', '.join(get_args(tp))}, got {value!r}")
    if get_origin(tp) is Union:
        if value is None and type(None) in get_args(tp):
            return None
        for option in (a for a in get_args(tp) if a is not type(None)):
            with contextlib.suppress(ConfigError):
                return _coerce(value, option, key)
    elif get_origin(tp) is list:
        if isinstance(value, (list, tuple)):
            return [_coerce(v, get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    elif tp is bool and isinstance(value, bool) or tp is str and isinstance(value, str):
        return value
    elif tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif tp is float and isinstance(value, str):
        with contextlib.suppress(ValueError):  # PyYAML (YAML 1.1) reads `1e-6` (no dot) as a string
            return float(value)
    name = str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")
    raise ConfigError(f"{key}: expected {name}, got {value!r} ({type(value).__name__})")

