"""Parameter labels from ordered (regex, method) path rules: the one trainable/frozen mechanism."""

import re
from typing import Any, Optional, Sequence

import jax
import numpy as np
from absl import logging

from lib import errors
from lib.optim import FREEZE, is_trainable   # the optimizer owns the label vocabulary
from lib.peft import spec as spec_lib
from lib.tree import flatten as flatten_paths, path_str  # the one tree-path utility

# Full fine-tuning: every parameter trainable under one label.
FULL_FINETUNE = ((".*", "train"),)


# Parameters that PEFT methods create are recognised by name and labelled by their method, never
# by the rules (which are about the base model's parameters).
LORA_LEAVES = ("lora_a", "lora_b", "lora_e")
OPTION_PARTS = {"attention_adapter": "adapter", "mlp_adapter": "adapter", "prefix_key": "prefix",
                "prefix_value": "prefix", "prefix_mlp": "prefix", "prompt": "prompt"}


def peft_kind(path: str) -> Optional[str]:
  """'lora' (a LoRA/AdaLoRA factor), 'adapter', 'prefix', 'prompt', or None (a base parameter)."""
  parts = path.split("/")
  if parts[-1] in LORA_LEAVES:
    return "lora"
  return next((OPTION_PARTS[p] for p in parts if p in OPTION_PARTS), None)


def _check_rules(rules) -> list:
  """[(compiled regex, Method)]; bad rules raise ValueError naming the rule."""
  spec = spec_lib.parse_spec(rules)
  return [(re.compile(rx), m) for rx, m in spec.rules]


def _base_label(m, path: str) -> str:
  """The label of a base parameter whose first matching rule has method `m`."""
  if m.kind in ("freeze",) + spec_lib.LORA_METHODS:   # LoRA: the kernel itself stays frozen
    return FREEZE
  if m.kind == "bitfit":
    return m.label if path.rsplit("/", 1)[-1] == "bias" else FREEZE
  return m.label


def _lora_problems(flat: dict, first: dict, compiled: list, rules) -> list:
  """Rules and LoRA factors that do not fit each other (the model was built for other rules)."""
  problems = []
  for path, i in first.items():
    kind = compiled[i][1].kind
    if kind in spec_lib.LORA_METHODS:
      mod = path.rsplit("/", 1)[0]
      want = ("lora_a", "lora_b") + (("lora_e",) if kind == "adalora" else ())
      missing = [n for n in want if f"{mod}/{n}" not in flat]
      if not path.endswith("/kernel") or missing:
        problems.append(f"rule #{i} {tuple(rules[i])!r} matches {path}, which is not a Dense "
                        f"kernel with {'/'.join(want)} (build the model with "
                        "peft.configure(args, spec); LoRA adapts Dense kernels only)")
  for path in flat:
    if peft_kind(path) == "lora":
      kernel = path.rsplit("/", 1)[0] + "/kernel"
      kind = compiled[first[kernel]][1].kind if kernel in first else None
      if kind not in spec_lib.LORA_METHODS or (path.endswith("/lora_e") and kind != "adalora"):
        problems.append(f"{path}: a LoRA factor, but the rules give its kernel {kernel} the "
                        f"method {kind!r}")
  return problems


def label_params(params, rules: Sequence[Sequence[str]], log: bool = True):
  """Label every parameter by the first rule whose regex fully matches its '/'-joined path.

  Args:
    params: parameter tree (arrays or jax.ShapeDtypeStruct leaves).
    rules: ordered (regex, method) pairs; `re.fullmatch` on paths like
      'encoder/layer_0/attention/query/kernel'. Methods (lib/peft/spec.py): 'freeze' (label
      FREEZE: frozen), 'train'/'full' (trainable), 'bitfit' (leaves named 'bias' trainable,
      others frozen), 'lora(...)'/'adalora(...)' (the kernel frozen, its factors trainable);
      any other plain name is a trainable label of its own (an optimizer group, e.g. for
      `optim.lr_mult`). Parameters created by PEFT (LoRA factors, adapters, prefixes, prompts;
      see `peft_kind`) are not matched: they are labelled 'lora'/'adalora' (by their kernel's
      rule), 'adapter', 'prefix' or 'prompt'.
    log: log the per-label count table.

  Returns:
    A tree with the structure of `params` whose leaves are label strings.

  Raises:
    ValueError: a parameter matches no rule (all such paths listed), a rule matches no
      parameter (a rule that silently does nothing is almost always a typo), or rules and LoRA
      factors do not fit each other.
  """
  compiled = _check_rules(rules)
  flat = flatten_paths(params)
  used, unmatched, first = [0] * len(compiled), [], {}
  for path in flat:
    if peft_kind(path) is not None:
      continue
    i = next((i for i, (rx, _) in enumerate(compiled) if rx.fullmatch(path)), None)
    if i is None:
      unmatched.append(path)
    else:
      used[i] += 1
      first[path] = i
  if unmatched:
    raise errors.ConfigError(f"{len(unmatched)} parameters match no peft rule (rules: {list(rules)}):\n  "
                     + "\n  ".join(unmatched))
  unused = [f"#{i} {tuple(rules[i])!r}" for i, n in enumerate(used) if n == 0]
  if unused:
    raise errors.ConfigError(f"peft rules match no parameter (shadowed by an earlier rule or a typo): "
                     f"{', '.join(unused)}")
  problems = _lora_problems(flat, first, compiled, rules)
  if problems:
    raise errors.ConfigError("peft rules and parameters do not fit:\n  " + "\n  ".join(problems))

  def label(kp, _):
    path = path_str(kp)
    kind = peft_kind(path)
    if kind == "lora":
      return compiled[first[path.rsplit("/", 1)[0] + "/kernel"]][1].label
    return kind or _base_label(compiled[first[path]][1], path)

  labels = jax.tree_util.tree_map_with_path(label, params)
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
