"""Parameter labels from ordered (regex, label) path rules: the one trainable/frozen mechanism."""

import re
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging

# The label of frozen parameters: no gradient, no optimizer state, never updated.
FREEZE = "freeze"
# Full fine-tuning: every parameter trainable under one label.
FULL_FINETUNE = ((".*", "train"),)


def path_str(keypath) -> str:
  """'/'-joined parameter path of a jax key path, e.g. 'encoder/layer_0/attention/query/kernel'."""
  parts = []
  for k in keypath:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    else:
      parts.append(str(getattr(k, "key", k)))
  return "/".join(parts)


def flatten_paths(tree) -> dict:
  """{path string: leaf} in tree order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {path_str(kp): leaf for kp, leaf in flat}


def _check_rules(rules) -> list:
  out = []
  for i, rule in enumerate(rules):
    if len(rule) != 2 or not all(isinstance(r, str) for r in rule):
      raise ValueError(f"peft rule #{i} {rule!r}: expected a (regex, label) pair of strings")
    try:
      out.append((re.compile(rule[0]), rule[1]))
    except re.error as e:
      raise ValueError(f"peft rule #{i} {rule!r}: bad regex: {e}") from e
  if not out:
    raise ValueError("peft rules are empty; full fine-tuning is [('.*', 'train')]")
  return out


def label_params(params, rules: Sequence[Sequence[str]], log: bool = True):
  """Label every parameter by the first rule whose regex fully matches its '/'-joined path.

  Args:
    params: parameter tree (arrays or jax.ShapeDtypeStruct leaves).
    rules: ordered (regex, label) pairs; `re.fullmatch` on paths like
      'encoder/layer_0/attention/query/kernel'. Label FREEZE ('freeze') means frozen; any other
      label is trainable and selects an optimizer group (e.g. for `optim.lr_mult`).
    log: log the per-label count table.

  Returns:
    A tree with the structure of `params` whose leaves are label strings.

  Raises:
    ValueError: a parameter matches no rule (all such paths listed), or a rule matches no
      parameter (a rule that silently does nothing is almost always a typo).
  """
  compiled = _check_rules(rules)
  used = [0] * len(compiled)
  unmatched = []

  def label(kp, _):
    path = path_str(kp)
    for i, (rx, lab) in enumerate(compiled):
      if rx.fullmatch(path):
        used[i] += 1
        return lab
    unmatched.append(path)
    return None

  labels = jax.tree_util.tree_map_with_path(label, params)
  if unmatched:
    raise ValueError(f"{len(unmatched)} parameters match no peft rule (rules: {list(rules)}):\n  "
                     + "\n  ".join(unmatched))
  unused = [f"#{i} {tuple(rules[i])!r}" for i, n in enumerate(used) if n == 0]
  if unused:
    raise ValueError(f"peft rules match no parameter (shadowed by an earlier rule or a typo): "
                     f"{', '.join(unused)}")
  if log:
    logging.info("parameter labels:\n%s", label_table(params, labels))
  return labels


def label_table(params, labels) -> str:
  """Table of tensors and parameter counts per label, with the total."""
  counts: dict = {}
  for x, lab in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(labels)):
    n, t = counts.get(lab, (0, 0))
    counts[lab] = (n + int(np.prod(x.shape)), t + 1)
  total = sum(n for n, _ in counts.values()) or 1
  rows = [f"{'label':<16} {'tensors':>8} {'params':>14} {'%':>7}"]
  for lab, (n, t) in sorted(counts.items()):
    rows.append(f"{lab:<16} {t:>8} {n:>14,} {100 * n / total:>6.2f}%")
  rows.append(f"{'total':<16} {sum(t for _, t in counts.values()):>8} {total:>14,}")
  return "\n".join(rows)


def is_trainable(label: str) -> bool:
  return label != FREEZE


def split_trainable(params, labels) -> tuple[Any, Any]:
  """(trainable, frozen): two trees of the structure of `params`, with None in the other's slots.

  None is an empty pytree, so optax and jax.grad see only the leaves present; `merge_trainable`
  puts them back together.
  """
  trainable = jax.tree.map(lambda p, l: p if is_trainable(l) else None, params, labels)
  frozen = jax.tree.map(lambda p, l: None if is_trainable(l) else p, params, labels)
  return trainable, frozen


def merge_trainable(trainable, frozen):
  """Inverse of `split_trainable`."""
  return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen,
                      is_leaf=lambda x: x is None)
