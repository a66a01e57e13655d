"""Model construction: config -> linen module; parameter init with logical-axis specs."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from lib.models.bert import Bert
from lib.models.gpt import Gpt
from lib.models.layers import ModelArgs

__all__ = ["ModelArgs", "Bert", "Gpt", "build", "args_from_config", "init_params",
           "abstract_params", "param_count"]

_FIELDS = {f.name for f in dataclasses.fields(ModelArgs)}


def args_from_config(model_cfg) -> ModelArgs:
  """ModelArgs from a model sub-config (ConfigDict or dict); extra keys (preset, init_from...) ignored."""
  d = dict(model_cfg)
  return ModelArgs(**{k: v for k, v in d.items() if k in _FIELDS})


def build(model_cfg, head=None, num_labels: int = 0) -> nn.Module:
  """Builds the linen module for `model_cfg.arch` with the given head.

  Args:
    model_cfg: a ModelArgs, or a config with its fields (see configs/common.py).
    head: None | 'mlm' (BERT) | 'lm' (GPT-2) | 'token_cls' | 'seq_cls'.
    num_labels: classes of a classification head.
  """
  args = model_cfg if isinstance(model_cfg, ModelArgs) else args_from_config(model_cfg)
  if args.arch == "bert":
    return Bert(args, head=head, num_labels=num_labels)
  if args.arch == "gpt2":
    return Gpt(args, head=head, num_labels=num_labels)
  raise ValueError(f"unknown model arch {args.arch!r}; valid: 'bert', 'gpt2'")


def _init_boxed(module, rng, seq_len):
  ids = jnp.zeros((1, seq_len), jnp.int32)
  return module.init({"params": rng, "dropout": rng}, ids, jnp.ones_like(ids))["params"]


def abstract_params(module, seq_len: int = 8):
  """(ShapeDtypeStruct tree, logical PartitionSpec tree) without allocating anything."""
  boxed = jax.eval_shape(lambda r: _init_boxed(module, r, seq_len), jax.random.key(0))
  return nn.meta.unbox(boxed), nn.get_partition_spec(boxed)


def init_params(module, rng, seq_len: int = 8):
  """Random init. Returns (params as plain nested dicts, logical PartitionSpec tree)."""
  boxed = _init_boxed(module, rng, seq_len)
  return nn.meta.unbox(boxed), nn.get_partition_spec(boxed)


def param_count(params) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
