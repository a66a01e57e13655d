"""lib/config_check.py: every invalid value of the shipped configs is refused, naming its key."""

import math

import pytest

from configs import clm, mlm, ner, sst2
from lib import config_check, errors


def _set(cfg, key: str, value):
  *parents, leaf = key.split(".")
  node = cfg
  for p in parents:
    node = node[p]
  node[leaf] = value
  return cfg


def _error(cfg, **kw) -> str:
  with pytest.raises(errors.ConfigError) as e:
    config_check.validate(cfg, **kw)
  return str(e.value)


@pytest.mark.parametrize("get_config", [ner.get_config, sst2.get_config, mlm.get_config,
                                        clm.get_config])
def test_shipped_configs_are_valid(get_config):
  cfg = get_config()
  assert config_check.problems(cfg, max_positions=cfg.data.max_len, data_parallel=8) == []


_DROPOUT = "must be in [0, 1), or < 0 to keep the checkpoint's / preset's value"
# (key, bad value, what the message must say after "config.<key>=<value>: ")
BAD_VALUES = [
    ("optim.lr", -0.001, "must be a number > 0"),
    ("optim.lr", 0.0, "must be a number > 0"),
    ("optim.lr", math.nan, "must be a number > 0"),
    ("optim.lr", math.inf, "must be a number > 0"),
    ("optim.b2", 1.0, "must be a number in [0, 1)"),
    ("optim.eps", 0.0, "must be a number > 0"),
    ("optim.weight_decay", -0.01, "must be a number >= 0"),
    ("optim.warmup_frac", 1.5, "must be a number in [0, 1]"),
    ("optim.warmup_steps", -1, "must be an integer >= 0"),
    ("optim.clip_norm", -1.0, "must be a number >= 0"),
    ("optim.accum_steps", 0, "must be an integer >= 1"),
    ("optim.schedule", "cosin", "must be one of ['linear', 'cosine', 'constant']"),
    ("optim.name", "sgd", "must be one of ['adamw']"),
    ("data.batch_size", 0, "must be an integer >= 1"),
    ("data.eval_batch_size", -8, "must be an integer >= 1"),
    ("data.max_len", 1, "must be an integer >= 2"),
    ("data.max_train_examples", -1, "must be an integer >= 0"),
    ("model.dropout_rate", 1.5, _DROPOUT),
    ("model.dropout_rate", 1.0, _DROPOUT),
    ("model.dtype", "fp16", "must be one of ['float32', 'bfloat16', 'float16']"),
    ("model.remat", "some", "must be one of ['none', 'full', 'dots']"),
    ("train.epochs", -1, "must be a number >= 0"),
    ("train.num_steps", -5, "must be an integer >= 0"),
    ("train.patience", -1, "must be an integer >= 0"),
    ("train.eval_every", -1, "must be an integer >= 0"),
    ("train.log_every", -10, "must be an integer >= 0"),
    ("train.checkpoint_every", -1, "must be an integer >= 0"),
    ("train.keep", 0, "must be an integer >= 1"),
]


@pytest.mark.parametrize("key,value,expected", BAD_VALUES)
def test_each_bad_value_is_refused_naming_its_key(key, value, expected):
  cfg = _set(ner.get_config(), key, value)
  assert _error(cfg) == f"config.{key}={value!r}: {expected}"


@pytest.mark.parametrize("key,value,expected", [
    ("data.mlm_rate", 0.0, "must be a number in (0, 1)"),
    ("data.eval_batches", -1, "must be an integer >= 0"),
    ("predictions_per_row", -2, "must be an integer >= -1"),
    ("model.size.num_layers", -1, "must be an integer >= 0"),
    ("vocab.size", -100, "must be an integer >= 0"),
    ("samples.top_p", 0.0, "must be a number in (0, 1]"),
])
def test_pretraining_keys(key, value, expected):
  cfg = _set(mlm.get_config(), key, value)
  assert _error(cfg) == f"config.{key}={value!r}: {expected}"


def test_a_negative_dropout_keeps_the_checkpoints_and_is_valid():
  for rate in (-1.0, -0.5, 0.0, 0.3):
    assert config_check.problems(_set(ner.get_config(), "model.dropout_rate", rate)) == []


def test_steps_or_epochs():
  cfg = _set(_set(ner.get_config(), "train.epochs", 0), "train.num_steps", 0)
  assert _error(cfg) == ("config.train.num_steps=0 and config.train.epochs=0: set one of them "
                         "> 0")
  assert config_check.problems(_set(cfg, "train.num_steps", 10)) == []


def test_warmup_steps_and_fraction_are_exclusive():
  cfg = _set(ner.get_config(), "optim.warmup_steps", 100)   # ner has warmup_frac 0.1
  assert "config.optim.warmup_steps=100 and config.optim.warmup_frac=0.1: set one of them" in (
      _error(cfg))


def test_max_len_within_the_models_positions():
  cfg = _set(ner.get_config(), "data.max_len", 600)
  assert _error(cfg, max_positions=512) == ("config.data.max_len=600: exceeds the model's 512 "
                                            "positions")
  assert config_check.problems(cfg, max_positions=600) == []
  assert config_check.problems(cfg) == []        # positions unknown: not checked


def test_batch_divisible_by_the_data_parallel_devices():
  cfg = _set(ner.get_config(), "data.batch_size", 30)
  assert _error(cfg, data_parallel=4) == (
      "config.data.batch_size=30: not divisible by the 4 data-parallel devices (the mesh axes "
      "the batch is split over)")
  assert config_check.problems(cfg, data_parallel=2) == []
  cfg = _set(ner.get_config(), "data.eval_batch_size", 12)
  assert _error(cfg, data_parallel=8).startswith("config.data.eval_batch_size=12: not divisible "
                                                 "by the 8 data-parallel devices")


def test_accumulation_divides_the_batch_and_each_micro_batch_the_devices():
  cfg = _set(ner.get_config(), "optim.accum_steps", 3)          # batch 32
  assert _error(cfg) == "config.data.batch_size=32: not divisible by config.optim.accum_steps=3"
  cfg = _set(ner.get_config(), "optim.accum_steps", 4)          # micro-batches of 8 rows
  assert config_check.problems(cfg, data_parallel=8) == []
  assert "(micro-batches of 8 with accum_steps=4): not divisible by the 16" in _error(
      cfg, data_parallel=16)


def test_all_problems_in_one_message():
  cfg = _set(_set(ner.get_config(), "optim.lr", -1.0), "data.batch_size", 0)
  cfg = _set(cfg, "model.dropout_rate", 1.5)
  message = _error(cfg)
  assert message.split("; ") == [
      "config.optim.lr=-1.0: must be a number > 0",
      "config.data.batch_size=0: must be an integer >= 1",
      "config.model.dropout_rate=1.5: must be in [0, 1), or < 0 to keep the checkpoint's / "
      "preset's value"]


def test_choices_and_lr_multipliers():
  cfg = _set(ner.get_config(), "task", "nre")
  assert _error(cfg, choices={"task": ("ner", "classification")}) == (
      "config.task='nre': must be one of ['classification', 'ner']")
  cfg = mlm.get_config("minilm")                                 # lr_mult {'head': 20.0}
  assert config_check.problems(cfg) == []
  cfg.optim.lr_mult.head = -2.0
  assert _error(cfg) == "config.optim.lr_mult.head=-2.0: must be a number >= 0"


def test_config_error_is_a_user_error_and_a_value_error():
  assert issubclass(errors.ConfigError, errors.UserError)
  assert issubclass(errors.ConfigError, ValueError)


def test_data_parallel_size_on_8_devices():
  import jax  # pylint: disable=g-import-not-at-top
  from lib import sharding  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 8
  rules = sharding.DEFAULT_RULES                                 # batch over (data, fsdp)
  for shape, expected in [(dict(data=-1), 8), (dict(data=-1, fsdp=2), 8),
                          (dict(data=-1, tensor=2), 4), (dict(data=1, fsdp=1, tensor=-1), 1)]:
    mesh_cfg = sharding.default_mesh_config()
    mesh_cfg.update(shape)
    dp = config_check.data_parallel_size(sharding.make_mesh(mesh_cfg), rules)
    assert dp == expected, shape


def test_validate_run_checks_the_model_source_and_the_mesh(tmp_path):
  cfg = _set(ner.get_config(), "model.init_from", str(tmp_path / "missing"))
  with pytest.raises(errors.ConfigError, match=r"^config.model.init_from='.*missing': no such "
                     r"file or directory; expected 'minilm', a Hugging Face directory"):
    config_check.validate_run(cfg)
  cfg = _set(ner.get_config(), "model.init_from", str(tmp_path))      # exists, holds no model
  with pytest.raises(errors.ConfigError, match="not a model source"):
    config_check.validate_run(cfg)
  cfg = _set(ner.get_config(), "data.max_len", 513)                    # MiniLM: 512 positions
  with pytest.raises(errors.ConfigError, match="^config.data.max_len=513: exceeds the model's "
                     "512 positions$"):
    config_check.validate_run(cfg)
  cfg = _set(ner.get_config(), "data.batch_size", 12)                  # 8 devices
  with pytest.raises(errors.ConfigError, match="batch_size=12: not divisible by the 8"):
    config_check.validate_run(cfg)
  cfg = _set(ner.get_config(), "mesh.data", 3)
  with pytest.raises(errors.ConfigError, match=r"^config.mesh / config.sharding_rules: mesh"):
    config_check.validate_run(cfg)
