"""PEFT parameters on top of base weights; LoRA merge/unmerge; prefix folding; adapter files."""

import dataclasses
import json
import os

import jax
import numpy as np

from lib import atomic, models
from lib.models.layers import ModelArgs, lora_for
from lib.peft.labels import flatten_paths, is_trainable, peft_kind
from lib.tree import unflatten as unflatten_paths
from lib.peft.spec import base_args

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_JSON = "adapter.json"


def add_params(base_params, module, rng, seq_len: int = 8):
  """The parameters of `module` (a model built with PEFT args): `base_params` where they exist,
  a fresh init for the parameters PEFT adds.

  Raises:
    ValueError: a base parameter the module lacks or shapes differently, or a module parameter
      missing from `base_params` that PEFT does not create (all named).
  """
  fresh = flatten_paths(jax.tree.map(np.asarray, models.init_params(module, rng, seq_len)[0]))
  base = flatten_paths(base_params)
  problems = [f"{p}: base {tuple(np.shape(v))} vs model {tuple(fresh[p].shape)}"
              for p, v in base.items() if p in fresh and tuple(np.shape(v)) != fresh[p].shape]
  problems += [f"{p}: in the base params, not in the model" for p in base if p not in fresh]
  problems += [f"{p}: in the model but neither in the base params nor created by PEFT"
               for p in fresh if p not in base and peft_kind(p) is None]
  if problems:
    raise ValueError("base params do not fit the PEFT model:\n  " + "\n  ".join(problems))
  return unflatten_paths({p: base.get(p, v) for p, v in fresh.items()})


def trainable_count(params, labels) -> int:
  """Number of trainable scalars (labels not FREEZE)."""
  return sum(int(np.prod(x.shape)) for x, lab in
             zip(jax.tree.leaves(params), jax.tree.leaves(labels)) if is_trainable(lab))


# ----------------------------------------------------------------------------- LoRA merge

def _lora_delta(flat: dict, mod: str, args: ModelArgs) -> np.ndarray:
  """scale * A (. diag(E)) . B in the kernel's (K..., F...) layout, float32."""
  lora = lora_for(args.lora, f"{mod}/kernel")
  if lora is None:
    raise ValueError(f"{mod}/lora_a: LoRA factors, but no lora rule of the model args matches "
                     f"{mod}/kernel")
  a = np.asarray(flat[f"{mod}/lora_a"], np.float32)                     # (K..., r)
  b = np.asarray(flat[f"{mod}/lora_b"], np.float32)                     # (r, F...)
  if lora.svd:
    a = a * np.asarray(flat[f"{mod}/lora_e"], np.float32)
  return np.tensordot(a, b, axes=1) * np.float32(lora.alpha / lora.rank)


def _fold_prefix_mlp(flat: dict, args: ModelArgs) -> dict:
  """Replaces <root>/prefix_mlp/... by <root>/layer_i/attention/prefix_key|prefix_value."""
  roots = sorted({p.split("/prefix_mlp/")[0] for p in flat if "/prefix_mlp/" in p})
  out = {p: v for p, v in flat.items() if "/prefix_mlp/" not in p}
  f32 = lambda k: np.asarray(flat[k], np.float32)
  for root in roots:
    m = f"{root}/prefix_mlp"
    h = np.tanh(f32(f"{m}/embedding") @ f32(f"{m}/hidden/kernel") + f32(f"{m}/hidden/bias"))
    kv = np.tensordot(h, f32(f"{m}/out/kernel"), axes=1) + f32(f"{m}/out/bias")  # (P, L, 2, H, Dh)
    dtype = np.asarray(flat[f"{m}/embedding"]).dtype
    for i in range(args.num_layers):
      for j, name in enumerate(("prefix_key", "prefix_value")):
        out[f"{root}/layer_{i}/attention/{name}"] = kv[:, i, j].astype(dtype)
  return out


def merge(params, args: ModelArgs):
  """Folds what can be folded: LoRA/AdaLoRA factors into their kernels (W + scale A.B) and the
  prefix MLP into per-layer prefixes.

  Returns:
    (params, args) of the folded model (host numpy): with only LoRA/AdaLoRA/BitFit, the plain
    model, ready for `hf.export_checkpoint`. Adapters, prefixes and prompts stay.
  """
  flat = {p: np.asarray(v) for p, v in flatten_paths(params).items()}
  out = {p: v for p, v in flat.items() if p.rsplit("/", 1)[-1] not in ("lora_a", "lora_b",
                                                                       "lora_e")}
  for p in flat:
    if p.endswith("/lora_a"):
      mod = p[:-len("/lora_a")]
      kernel = flat[f"{mod}/kernel"]
      out[f"{mod}/kernel"] = (kernel.astype(np.float32) + _lora_delta(flat, mod, args)).astype(
          kernel.dtype)
  new_args = dataclasses.replace(args, lora=())
  if args.prefix_len and args.prefix_hidden:
    out = _fold_prefix_mlp(out, args)
    new_args = dataclasses.replace(new_args, prefix_hidden=0)
  return unflatten_paths(out), new_args


def unmerge(merged, factors, args: ModelArgs):
  """Inverse of the LoRA part of `merge`: W - scale A.B, factors put back.

  Args:
    merged: params with merged kernels.
    factors: a tree holding the lora_a/lora_b(/lora_e) leaves (e.g. the adapter subtree).
    args: the LoRA model's args (its `lora` rules give the scales).

  Returns:
    Params of the LoRA model (kernels equal to the originals up to float rounding).
  """
  flat = {p: np.asarray(v) for p, v in flatten_paths(merged).items()}
  fac = {p: np.asarray(v) for p, v in flatten_paths(factors).items()
         if p.rsplit("/", 1)[-1] in ("lora_a", "lora_b", "lora_e")}
  out = dict(flat, **fac)
  for p in fac:
    if p.endswith("/lora_a"):
      mod = p[:-len("/lora_a")]
      if f"{mod}/kernel" not in flat:
        raise ValueError(f"{p}: no kernel {mod}/kernel in the merged params")
      kernel = flat[f"{mod}/kernel"]
      out[f"{mod}/kernel"] = (kernel.astype(np.float32) - _lora_delta(fac, mod, args)).astype(
          kernel.dtype)
  return unflatten_paths(out)


# ----------------------------------------------------------------------------- adapter files

def _peft_fields(args: ModelArgs) -> dict:
  return {k: getattr(args, k) for k in ("lora", "adapter_dim", "prefix_len", "prefix_hidden",
                                        "prompt_len")}


def save_adapter(directory: str, params, labels, args: ModelArgs, *, overwrite: bool = False,
                 **extra) -> str:
  """Writes the trainable leaves alone (adapter.safetensors, '/'-joined paths) and adapter.json
  (the model's PEFT fields and every saved path and shape), assembled beside `directory`.

  bfloat16/float16 leaves are stored as float32 (safetensors' numpy API has no bfloat16).

  Args:
    directory: the adapter directory; a non-empty one is refused unless overwrite=True (a
      directory holding a run's checkpoints or results is never replaced: `atomic.directory`).
    params: the model's params.
    labels: their label tree: which leaves are trainable (saved).
    args: the PEFT model's ModelArgs.
    overwrite: replace an existing adapter directory (a run re-writing its own on resume).
    **extra: more adapter.json entries (provenance: e.g. source, source_step).
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  lab = flatten_paths(labels)
  flat = {p: np.asarray(v) for p, v in flatten_paths(params).items() if is_trainable(lab[p])}
  store = {p: v.astype(np.float32) if v.dtype.name in ("bfloat16", "float16") else v
           for p, v in flat.items()}
  with atomic.directory(directory, ".tmp-adapter-", overwrite=overwrite) as tmp:
    save_file({p: np.ascontiguousarray(v) for p, v in store.items()},
              os.path.join(tmp, ADAPTER_WEIGHTS))
    meta = dict(format=1, peft=_peft_fields(args), base_args=dataclasses.asdict(base_args(args)),
                params={p: dict(shape=list(v.shape), dtype=str(v.dtype), label=lab[p])
                        for p, v in flat.items()}, **extra)
    with open(os.path.join(tmp, ADAPTER_JSON), "w") as f:
      json.dump(meta, f, indent=1, default=list)
  return directory


def load_adapter(directory: str, params):
  """`params` with the leaves saved by `save_adapter` replaced (cast to the params' dtypes).

  Raises:
    ValueError: a saved leaf the params lack or shape differently (every one named).
  """
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  path = os.path.join(directory, ADAPTER_WEIGHTS)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: not found (an adapter directory from peft.save_adapter)")
  saved = load_file(path)
  flat = flatten_paths(params)
  problems = [f"{p}: saved {tuple(v.shape)}, params have "
              f"{tuple(flat[p].shape) if p in flat else 'no such parameter'}"
              for p, v in saved.items() if p not in flat or tuple(flat[p].shape) != v.shape]
  if problems:
    raise ValueError(f"{path} does not fit the params:\n  " + "\n  ".join(problems))
  out = {p: saved[p].astype(np.asarray(v).dtype) if p in saved else v for p, v in flat.items()}
  return unflatten_paths(out)
