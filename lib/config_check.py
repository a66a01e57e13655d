"""Run-config validation in one place: types and ranges of the values users set, before a run.

`validate` checks a fine-tuning (configs/common.py:finetune_base) or pretraining (configs/mlm.py:
base) config; `validate_run` also finds what it needs from the environment (the model's positions,
the data-parallel size of the mesh). Every problem names its key (`config.optim.lr=-0.001: must
be > 0`); all of them are reported at once, joined by '; ', in one `errors.ConfigError`.
Only the keys a config has are checked, so one table serves both kinds of run.
"""

import math
import numbers
import os
from typing import Callable, Optional

from lib import errors

DTYPES = ("float32", "bfloat16", "float16")
REMAT = ("none", "full", "dots")
_MISSING = object()


def _bound(lo=None, hi=None, *, lo_open=False, hi_open=False, integer=False) -> Callable:
  """A check of a number against [lo, hi] (open ends on request): value -> problem or None."""
  parts = []
  if lo is not None and hi is not None:
    parts.append(f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")
  elif lo is not None:
    parts.append(f"{'>' if lo_open else '>='} {lo}")
  elif hi is not None:
    parts.append(f"{'<' if hi_open else '<='} {hi}")
  expected = f"must be {'an integer ' if integer else 'a number '}{' '.join(parts)}".rstrip()

  def check(v):
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(v, bool) or not isinstance(v, kind) or not math.isfinite(v):
      return expected
    if lo is not None and (v <= lo if lo_open else v < lo):
      return expected
    if hi is not None and (v >= hi if hi_open else v > hi):
      return expected
    return None
  return check


def _one_of(*valid) -> Callable:
  return lambda v: None if v in valid else f"must be one of {list(valid)}"


def _dropout(v):
  if _bound()(v) or v >= 1:
    return "must be in [0, 1), or < 0 to keep the checkpoint's / preset's value"
  return None


# key -> check, for every key either kind of run config may have.
RULES = {
    "optim.name": _one_of("adamw"),
    "optim.lr": _bound(0, lo_open=True),
    "optim.b1": _bound(0, 1, hi_open=True),
    "optim.b2": _bound(0, 1, hi_open=True),
    "optim.eps": _bound(0, lo_open=True),
    "optim.weight_decay": _bound(0),
    "optim.warmup_steps": _bound(0, integer=True),
    "optim.warmup_frac": _bound(0, 1),
    "optim.schedule": _one_of("linear", "cosine", "constant"),
    "optim.clip_norm": _bound(0),
    "optim.accum_steps": _bound(1, integer=True),
    "train.num_steps": _bound(0, integer=True),
    "train.epochs": _bound(0),
    "train.log_every": _bound(0, integer=True),
    "train.eval_every": _bound(0, integer=True),
    "train.checkpoint_every": _bound(0, integer=True),
    "train.keep": _bound(1, integer=True),
    "train.patience": _bound(0, integer=True),
    "train.peak_flops": _bound(),
    "data.max_len": _bound(2, integer=True),
    "data.batch_size": _bound(1, integer=True),
    "data.eval_batch_size": _bound(1, integer=True),
    "data.max_train_examples": _bound(0, integer=True),
    "data.eval_batches": _bound(0, integer=True),
    "data.stride": _bound(0, integer=True),
    "data.mlm_rate": _bound(0, 1, lo_open=True, hi_open=True),
    "model.dropout_rate": _dropout,
    "model.dtype": _one_of(*DTYPES),
    "model.param_dtype": _one_of(*DTYPES),
    "model.remat": _one_of(*REMAT),
    "model.size.num_layers": _bound(0, integer=True),
    "model.size.hidden_size": _bound(0, integer=True),
    "model.size.num_heads": _bound(0, integer=True),
    "model.size.mlp_dim": _bound(0, integer=True),
    "model.size.max_len": _bound(0, integer=True),
    "predictions_per_row": _bound(-1, integer=True),
    "vocab.size": _bound(0, integer=True),
    "vocab.min_frequency": _bound(0, integer=True),
    "samples.max_new_tokens": _bound(0, integer=True),
    "samples.top_k": _bound(0, integer=True),
    "samples.top_p": _bound(0, 1, lo_open=True),
}


def get(cfg, key: str, default=_MISSING):
  """`cfg` at the dotted `key`, or `default` when a part is missing."""
  node = cfg
  for part in key.split("."):
    if not hasattr(node, "keys") or part not in node:
      return default
    node = node[part]
  return node


def problems(cfg, *, max_positions: Optional[int] = None, data_parallel: int = 1,
             choices: Optional[dict] = None) -> list:
  """Every problem of `cfg`, one string each naming its key (see `validate`)."""
  out = []
  for key, check in RULES.items():
    value = get(cfg, key)
    why = None if value is _MISSING else check(value)
    if why:
      out.append(f"config.{key}={value!r}: {why}")
  for key, valid in (choices or {}).items():
    value = get(cfg, key)
    if value is not _MISSING and value not in valid:
      out.append(f"config.{key}={value!r}: must be one of {sorted(valid)}")
  for key, mult in dict(get(cfg, "optim.lr_mult", None) or {}).items():
    if _bound(0)(mult):
      out.append(f"config.optim.lr_mult.{key}={mult!r}: must be a number >= 0")
  return out + _cross_problems(cfg, max_positions, data_parallel)


def _cross_problems(cfg, max_positions, data_parallel) -> list:
  """Problems between keys, and against the model and the mesh; keys of bad type are skipped."""
  out, ok = [], lambda key: get(cfg, key) is not _MISSING and not RULES[key](get(cfg, key))
  if ok("train.num_steps") and ok("train.epochs") and not (
      cfg.train.num_steps > 0 or cfg.train.epochs > 0):
    out.append(f"config.train.num_steps={cfg.train.num_steps} and config.train.epochs="
               f"{cfg.train.epochs}: set one of them > 0")
  if ok("optim.warmup_steps") and ok("optim.warmup_frac") and (
      cfg.optim.warmup_steps > 0 and cfg.optim.warmup_frac > 0):
    out.append(f"config.optim.warmup_steps={cfg.optim.warmup_steps} and config.optim."
               f"warmup_frac={cfg.optim.warmup_frac}: set one of them, not both")
  if ok("data.max_len") and max_positions and cfg.data.max_len > max_positions:
    out.append(f"config.data.max_len={cfg.data.max_len}: exceeds the model's {max_positions} "
               "positions")
  accum = cfg.optim.accum_steps if ok("optim.accum_steps") else 1
  if ok("data.batch_size"):
    b = cfg.data.batch_size
    if b % accum:
      out.append(f"config.data.batch_size={b}: not divisible by config.optim.accum_steps={accum}")
    elif (b // accum) % data_parallel:
      micro = f" (micro-batches of {b // accum} with accum_steps={accum})" if accum > 1 else ""
      out.append(f"config.data.batch_size={b}{micro}: not divisible by the {data_parallel} "
                 "data-parallel devices (the mesh axes the batch is split over)")
  if ok("data.eval_batch_size") and cfg.data.eval_batch_size % data_parallel:
    out.append(f"config.data.eval_batch_size={cfg.data.eval_batch_size}: not divisible by the "
               f"{data_parallel} data-parallel devices")
  return out


def validate(cfg, *, max_positions: Optional[int] = None, data_parallel: int = 1,
             choices: Optional[dict] = None) -> None:
  """Checks the types and ranges of a run config's values and how they fit together.

  Args:
    cfg: a fine-tuning or pretraining config (ConfigDict); keys it lacks are not checked.
    max_positions: the model's position embeddings (data.max_len must fit); None: not checked.
    data_parallel: devices the batch is split over (batch sizes, and micro-batches under
      gradient accumulation, must divide evenly); see `data_parallel_size`.
    choices: {dotted key: valid values} known only to the caller (e.g. {'task': TASKS}).

  Raises:
    errors.ConfigError: every problem found, each naming its key and what was expected.
  """
  found = problems(cfg, max_positions=max_positions, data_parallel=data_parallel,
                   choices=choices)
  if found:
    raise errors.ConfigError("; ".join(found))


def source_problem(source: str, key: str = "config.model.init_from") -> Optional[str]:
  """Why `source` is not a model source (`lib.model_io`), or None when it looks like one."""
  if source == "minilm":
    return None
  path = source
  if not os.path.exists(path) and "@" in source:   # <workdir>@best / @latest / @<step>
    path = source.rpartition("@")[0]
  expected = ("expected 'minilm', a Hugging Face directory (config.json), one of our model dirs "
              "or a run workdir (model.json)")
  if not os.path.exists(path):
    return f"{key}={source!r}: no such file or directory; {expected}"
  if not any(os.path.exists(os.path.join(path, f)) for f in ("config.json", "model.json")):
    return f"{key}={source!r}: not a model source; {expected}"
  return None


def data_parallel_size(mesh, rules) -> int:
  """Devices the batch axis is split over: the product of the mesh axes of logical 'batch'."""
  from lib import sharding  # pylint: disable=g-import-not-at-top  # jax only when asked
  axes = sharding.batch_sharding(mesh, rules).spec
  axes = axes[0] if len(axes) else None
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[a] for a in axes)


def validate_run(cfg, *, model_args=None, choices: Optional[dict] = None) -> None:
  """`validate` with what a run's setup knows: the model's positions (from `model_args`, or the
  config's model.init_from described without loading weights) and the mesh's data-parallel size.

  Raises:
    errors.ConfigError: as `validate`, plus a missing or unusable model.init_from and a mesh
      that does not fit the devices.
  """
  from lib import model_io, sharding  # pylint: disable=g-import-not-at-top  # jax only when asked
  found, positions, dp = [], None, 1
  if model_args is not None:
    positions = model_args.max_len
  elif get(cfg, "model.init_from", ""):
    why = source_problem(cfg.model.init_from)
    found += [why] if why else []
    positions = None if why else model_io.describe(cfg.model.init_from).max_len
  rules = [tuple(r) for r in get(cfg, "sharding_rules", sharding.DEFAULT_RULES)]
  try:
    dp = data_parallel_size(sharding.make_mesh(get(cfg, "mesh", sharding.default_mesh_config())),
                            rules)
  except ValueError as e:   # make_mesh / the rules: a shape that does not fit the devices
    found.append(f"config.mesh / config.sharding_rules: {e}")
  found += problems(cfg, max_positions=positions, data_parallel=dp, choices=choices)
  if found:
    raise errors.ConfigError("; ".join(found))
