"""Model construction: config -> linen module; parameter init with logical-axis specs."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from lib.models.bert import Bert
from lib.models.gpt import Gpt
from lib.models.heads import HEADS, get_head, register_head
from lib.models.layers import (DOT_GENERALS, ModelArgs, check_dot_general_rules,
                               register_dot_general)

__all__ = ["ModelArgs", "Bert", "Gpt", "BACKBONE", "build", "args_from_config", "init_params",
           "abstract_params", "param_count", "HEADS", "register_head", "DOT_GENERALS",
           "register_dot_general"]

# The parameter-tree name of each architecture's layer stack (params[BACKBONE[arch]]/layer_i).
BACKBONE = {"bert": "encoder", "gpt2": "decoder"}

_FIELDS = {f.name for f in dataclasses.fields(ModelArgs)}


def args_from_config(model_cfg) -> ModelArgs:
  """ModelArgs from a model sub-config (ConfigDict or dict); other keys (preset...) are ignored."""
  d = dict(model_cfg)
  return ModelArgs(**{k: v for k, v in d.items() if k in _FIELDS})


def build(model_cfg, head=None, num_labels: int = 0) -> nn.Module:
  """Builds the linen module for `model_cfg.arch` with the given head.

  Args:
    model_cfg: a ModelArgs, or a config with its fields (see configs/common.py).
    head: None (no head) or a name in lib/models/heads.py's HEADS: 'mlm' (BERT), 'lm' (GPT-2),
      'token_cls', 'seq_cls', or one added with `register_head`.
    num_labels: classes of a classification head.

  Raises:
    ValueError: an unknown head (the registered ones listed) or arch.
  """
  args = model_cfg if isinstance(model_cfg, ModelArgs) else args_from_config(model_cfg)
  if head is not None:
    get_head(head)
  if args.arch == "bert":
    return Bert(args, head=head, num_labels=num_labels)
  if args.arch == "gpt2":
    return Gpt(args, head=head, num_labels=num_labels)
  raise ValueError(f"unknown model arch {args.arch!r}; valid: 'bert', 'gpt2'")


def _init_boxed(module, rng, seq_len):
  ids = jnp.zeros((1, seq_len), jnp.int32)
  return module.init({"params": rng, "dropout": rng}, ids, jnp.ones_like(ids))["params"]


def _check_rules(module, params) -> None:
  """ModelArgs.dot_general rules that match no kernel of this model raise (a typo otherwise)."""
  rules = getattr(getattr(module, "args", None), "dot_general", ())
  if rules:
    check_dot_general_rules(rules, traverse_util.flatten_dict(params, sep="/"))


def abstract_params(module, seq_len: int = 8):
  """(ShapeDtypeStruct tree, logical PartitionSpec tree) without allocating anything."""
  boxed = jax.eval_shape(lambda r: _init_boxed(module, r, seq_len), jax.random.key(0))
  shapes = nn.meta.unbox(boxed)
  _check_rules(module, shapes)
  return shapes, nn.get_partition_spec(boxed)


def init_params(module, rng, seq_len: int = 8):
  """Random init. Returns (params as plain nested dicts, logical PartitionSpec tree)."""
  boxed = _init_boxed(module, rng, seq_len)
  params = nn.meta.unbox(boxed)
  _check_rules(module, params)
  return params, nn.get_partition_spec(boxed)


def param_count(params) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
