"""LoRA/AdaLoRA adapters in the Hugging Face PEFT format: adapter_config.json +
adapter_model.safetensors with HF module names, loadable by PyTorch `peft` onto the HF model.

HF PEFT computes W x + alpha/r * B A dropout(x) with lora_A (r, in) and lora_B (out, r) per
module. Our factors map onto it through the HF name map of lib/hf.py: lora_a (K..., r) flattens to
A^T, lora_b (r, F...) to B^T. AdaLoRA exports as LoRA (diag(E) folded into A, pruned triplets
dropped, per-module ranks in `rank_pattern`); GPT-2's fused c_attn takes the query/key/value
factors side by side (block-diagonal B). Other trainable leaves go in as PEFT can hold them: the
biases of LoRA modules (`bias='lora_only'`), whole modules in `modules_to_save` (the task head
always).
"""

import collections
import json
import os
import re

import numpy as np

from lib import atomic, hf
from lib.models.layers import ModelArgs, lora_for
from lib.peft.labels import flatten_paths, is_trainable, peft_kind
from lib.peft.spec import base_args

TASK_TYPES = {"token_cls": "TOKEN_CLS", "seq_cls": "SEQ_CLS", "lm": "CAUSAL_LM"}
PREFIX = "base_model.model."
_HEAD_PATHS = ("classifier/",)


def _module(hf_key: str) -> str:
  return hf_key.rsplit(".", 1)[0]


def _part(flat: dict, mod: str, args: ModelArgs) -> tuple:
  """(A (r, in), B (out, r), scale) of one adapted kernel; AdaLoRA: E folded, zeros dropped."""
  lora = lora_for(args.lora, f"{mod}/kernel")
  if lora is None:
    raise ValueError(f"{mod}/lora_a: no lora rule of the model args matches {mod}/kernel")
  a = np.asarray(flat[f"{mod}/lora_a"], np.float32)
  b = np.asarray(flat[f"{mod}/lora_b"], np.float32)
  a, b = a.reshape(-1, a.shape[-1]), b.reshape(b.shape[0], -1)         # (in, r), (r, out)
  if lora.svd:
    e = np.asarray(flat[f"{mod}/lora_e"], np.float32)
    keep = np.flatnonzero(e)
    a, b = a[:, keep] * e[keep], b[keep]
  return a.T, b.T, lora.alpha / lora.rank


def _lora_tensors(flat: dict, args: ModelArgs, entries) -> dict:
  """{hf module: (lora_A, lora_B, alpha)} with alpha / rank equal to the first part's scale."""
  by_kernel = {p: (ent, j) for ent in entries for j, p in enumerate(ent.paths)}
  groups = collections.defaultdict(list)
  for p in sorted(flat):
    if p.endswith("/lora_a"):
      mod = p[:-len("/lora_a")]
      if f"{mod}/kernel" not in by_kernel:
        raise ValueError(f"{mod}/kernel has LoRA factors but no Hugging Face equivalent")
      ent, j = by_kernel[f"{mod}/kernel"]
      groups[ent.hf_key].append((j, mod))
  out = {}
  for key, parts in groups.items():
    n_paths = len(next(e for e in entries if e.hf_key == key).paths)   # 3: GPT-2's c_attn
    tensors = [(j, *_part(flat, mod, args)) for j, mod in sorted(parts)]
    n_out, scale0 = tensors[0][2].shape[0], tensors[0][3]
    a = np.concatenate([t[1] for t in tensors], axis=0)                # (R, in)
    b = np.zeros((n_out * n_paths, a.shape[0]), np.float32)           # (out, R)
    col = 0
    for j, _, bj, scale in tensors:
      b[j * n_out:(j + 1) * n_out, col:col + bj.shape[1]] = bj * (scale / scale0)
      col += bj.shape[1]
    if a.shape[0]:   # an AdaLoRA matrix pruned to rank 0 adds nothing
      out[_module(key)] = (a, b, scale0 * a.shape[0])
  return out


def _trainable_extras(flat, lab, entries, lora_modules, head) -> tuple:
  """(bias mode, modules_to_save) covering every trainable leaf that is not a LoRA factor.

  Raises:
    ValueError: a trainable leaf PEFT's LoRA format cannot hold (named, with the reason).
  """
  by_path = {p: ent for ent in entries for p in ent.paths}
  lora_biases, to_save, problems = False, set(), []
  for p, label in lab.items():
    head_leaf = p.startswith(_HEAD_PATHS) and head in ("token_cls", "seq_cls")
    if (not is_trainable(label) and not head_leaf) or peft_kind(p) == "lora":
      continue
    if p == "classifier/bias" and p not in by_path and not np.any(flat[p]):
      continue   # GPT-2's `score` has no bias; ours is kept at zero (hf.params_to_hf checks)
    if peft_kind(p) is not None or p not in by_path:
      problems.append(f"{p}: trainable, but has no Hugging Face PEFT LoRA equivalent")
      continue
    module = _module(by_path[p].hf_key)
    if module in lora_modules:
      if p.endswith("/bias"):
        lora_biases = True
      else:
        problems.append(f"{p}: trainable, but its module {module} carries LoRA")
    else:
      to_save.add(module)
  if problems:
    raise ValueError("cannot export as a Hugging Face PEFT LoRA adapter:\n  "
                     + "\n  ".join(problems))
  return ("lora_only" if lora_biases else "none"), sorted(to_save)


def _config(args, head, loras, bias, to_save, base_model_name_or_path, dropout) -> dict:
  ranks = {m: (a.shape[0], alpha) for m, (a, _, alpha) in loras.items()}
  r, alpha = collections.Counter(ranks.values()).most_common(1)[0][0]
  pattern = lambda i, default: {re.escape(m): v[i] for m, v in ranks.items() if v[i] != default}
  return dict(
      peft_type="LORA", task_type=TASK_TYPES.get(head), base_model_name_or_path=
      base_model_name_or_path, r=int(r), lora_alpha=float(alpha), lora_dropout=float(dropout),
      target_modules=sorted(loras), rank_pattern=pattern(0, r), alpha_pattern=pattern(1, alpha),
      modules_to_save=to_save or None, bias=bias, fan_in_fan_out=args.arch == "gpt2",
      use_rslora=False, use_dora=False, init_lora_weights=True, inference_mode=True)


def export_hf_adapter(out_dir: str, params, labels, args: ModelArgs, head=None, *,
                      base_model_name_or_path: str = "", overwrite: bool = False) -> str:
  """Writes `params`' LoRA/AdaLoRA adapter as a Hugging Face PEFT directory.

  Args:
    out_dir: written atomically (assembled beside it, then renamed); a non-empty one is refused
      unless `overwrite` (one holding a run's outputs always: `atomic.directory`).
    params: the PEFT model's params (frozen base leaves included).
    labels: their label tree (`peft.label_params`): which other leaves were trained.
    args: the PEFT model's ModelArgs (LoRA scales).
    head: our head (None, 'mlm', 'lm', 'token_cls', 'seq_cls').
    base_model_name_or_path: recorded in adapter_config.json (the HF base model directory, e.g.
      one written by `hf.export_checkpoint` of the frozen params).
    overwrite: replace a non-empty `out_dir`.

  Raises:
    ValueError: no LoRA factors, or trainable leaves the format cannot hold (all named).
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  flat = {p: np.asarray(v) for p, v in flatten_paths(params).items()}
  lab = flatten_paths(labels)
  entries = hf.name_map(base_args(args), head)
  loras = _lora_tensors(flat, args, entries)
  if not loras:
    raise ValueError("no LoRA/AdaLoRA factors to export")
  bias, to_save = _trainable_extras(flat, lab, entries, set(loras), head)
  state = {}
  for m, (a, b, _) in loras.items():
    state[f"{PREFIX}{m}.lora_A.weight"], state[f"{PREFIX}{m}.lora_B.weight"] = a, b
  for ent in entries:   # whole modules to save, and the biases of LoRA modules
    m, tensor = _module(ent.hf_key), lambda e=ent: e.to_hf([flat[p] for p in e.paths])
    if m in to_save:
      state[PREFIX + ent.hf_key] = tensor()
    elif bias == "lora_only" and m in loras and ent.hf_key.endswith(".bias"):
      state[f"{PREFIX}{m}.base_layer.bias"] = tensor()
  dropout = max((l.dropout for _, l in args.lora if l is not None), default=0.0)
  config = _config(args, head, loras, bias, to_save, base_model_name_or_path, dropout)
  with atomic.directory(out_dir, ".tmp-adapter-", overwrite=overwrite) as tmp:
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state.items()},
              os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
      json.dump(config, f, indent=2)
  return out_dir
