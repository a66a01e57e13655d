"""Model directories of ours (model.json + orbax params) and loading a model from any source.

Sources a run can initialise from (`load_model`):
  - a Hugging Face directory (config.json + model.safetensors / pytorch_model.bin), or 'minilm';
  - one of our model directories, written by `save_model_dir` (research/convert.py):
      model.json   {"args": ModelArgs fields, "head": ..., "num_labels": ..., "label_names": [...]}
      params/      orbax PyTree checkpoint of the parameter tree;
  - one of our run workdirs (research/finetune.py, research/pretrain_mlm.py): its model.json and the
    'params' of the latest complete checkpoint in <workdir>/checkpoints.
"""

import dataclasses
import json
import os
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from lib import atomic, checkpoint, hf, models, peft
from lib.models import ModelArgs

MODEL_JSON = "model.json"
PARAMS_DIR = "params"
RUN_CHECKPOINTS = "checkpoints"
# The backbone subtree of each architecture: what carries over between heads.
BACKBONE = {"bert": "encoder", "gpt2": "decoder"}


@dataclasses.dataclass
class LoadedModel:
  """A model ready to train: architecture, head, parameters (host numpy) and their origin."""
  args: ModelArgs
  head: Optional[str]
  num_labels: int
  params: dict
  source: str


def write_model_json(directory: str, args: ModelArgs, head=None, num_labels: int = 0,
                     label_names=None, **extra) -> None:
  """Writes model.json (atomically) describing the model whose params live in `directory`."""
  os.makedirs(directory, exist_ok=True)
  body = dict(args=dataclasses.asdict(args), head=head, num_labels=int(num_labels),
              label_names=list(label_names or []), **extra)
  tmp = os.path.join(directory, f".{MODEL_JSON}.{os.getpid()}.tmp")
  with open(tmp, "w") as f:
    json.dump(body, f, indent=1)
  os.replace(tmp, os.path.join(directory, MODEL_JSON))


def read_model_json(directory: str) -> dict:
  """model.json of one of our model directories or run workdirs, with 'args' as ModelArgs."""
  path = os.path.join(directory, MODEL_JSON)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: not found; expected a Hugging Face directory (config.json), "
                            "or one of ours (model.json + params/) or a run workdir")
  with open(path) as f:
    body = json.load(f)
  fields = {f.name for f in dataclasses.fields(ModelArgs)}
  unknown = sorted(set(body.get("args", {})) - fields)
  if unknown:
    raise ValueError(f"{path}: unknown model args {unknown}; valid: {sorted(fields)}")
  body["args"] = ModelArgs(**body["args"])
  return body


def save_model_dir(out_dir: str, args: ModelArgs, params, head=None, num_labels: int = 0,
                   label_names=None) -> str:
  """Writes model.json + params/ (orbax) into `out_dir`, assembled beside it and renamed into place."""
  with atomic.directory(out_dir, ".tmp-model-") as tmp:
    host = jax.tree.map(np.asarray, params)
    with ocp.PyTreeCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, PARAMS_DIR), host)
    write_model_json(tmp, args, head, num_labels, label_names)
  return out_dir


def _restore_tree(directory: str, abstract, subtree: str):
  """Host numpy leaves of `subtree` of a saved tree (our model dir or a run's checkpoints)."""
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        abstract)
  if os.path.isdir(os.path.join(directory, PARAMS_DIR)):   # our model directory
    keys = [k for k in subtree.split("/")[1:] if k]          # drop the leading 'params'
    for key in reversed(keys):
      target = {key: target}
    args = ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(target))
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:
      out = reader.restore(os.path.join(directory, PARAMS_DIR), args=args)
    for key in keys:
      out = out[key]
  else:
    out = checkpoint.restore_params(os.path.join(directory, RUN_CHECKPOINTS), target,
                                    subtree=subtree)
  return jax.tree.map(np.asarray, out)


def _load_ours(path: str, head, num_labels: int, rng, overrides: Optional[dict]) -> LoadedModel:
  """Our model dir / run workdir: the whole tree if the head matches, else backbone + fresh head."""
  meta = read_model_json(path)
  args = meta["args"]
  if overrides:
    args = dataclasses.replace(args, **overrides)
  module = models.build(args, head, num_labels)
  init = jax.tree.map(np.asarray, models.init_params(module, rng)[0])
  same_head = meta["head"] == head and meta["num_labels"] == num_labels
  if same_head:
    return LoadedModel(args, head, num_labels, _restore_tree(path, init, "params"), path)
  backbone = BACKBONE[args.arch]
  params = dict(init)
  params[backbone] = _restore_tree(path, init[backbone], f"params/{backbone}")
  new = tuple(sorted(k for k in init if k != backbone))
  logging.info("%s: backbone %r loaded (saved head %r); newly initialised: %s", path, backbone,
               meta["head"], list(new))
  return LoadedModel(args, head, num_labels, params, path)


def load_model(source: str, head=None, num_labels: int = 0, *, rng=None,
               overrides: Optional[dict] = None) -> LoadedModel:
  """Loads a model from a HF directory, 'minilm', our model directory or a run workdir.

  Args:
    source: see the module docstring.
    head: our head (None, 'mlm', 'lm', 'token_cls', 'seq_cls').
    num_labels: classes of a classification head.
    rng: key for newly initialised heads (default key 0).
    overrides: ModelArgs fields to replace (dropout_rate, dtype, remat...).

  Raises:
    FileNotFoundError: `source` is none of the above (says what was expected).
    hf.CheckpointMismatchError: HF tensors that do not fit (every key named).
  """
  rng = jax.random.key(0) if rng is None else rng
  path = hf.resolve_model_dir(source)
  if os.path.exists(os.path.join(path, "config.json")):
    args, params = hf.import_checkpoint(path, head, num_labels, rng=rng, allow_new_heads=True,
                                        overrides=overrides)
    return LoadedModel(args, head, num_labels, params, path)
  if os.path.exists(os.path.join(path, MODEL_JSON)):
    return _load_ours(path, head, num_labels, rng, overrides)
  raise FileNotFoundError(f"{source}: not a model source: expected 'minilm', a Hugging Face "
                          f"directory (config.json), or one of ours ({MODEL_JSON})")


def _has_tokenizer(path: str, arch: str) -> bool:
  files = (("tokenizer.json",), ("vocab.txt",)) if arch == "bert" else (
      ("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))
  return any(all(os.path.exists(os.path.join(path, f)) for f in group) for group in files)


def load_tokenizer(source: str, arch: str, data_dir: str, override: str = ""):
  """The tokenizer of a model and where it came from.

  First match: `override`; the source's own tokenizer files (HF dir) or the 'tokenizer' recorded in
  its model.json (ours); the default of the architecture ('minilm' for BERT, <data_dir>/gpt2-bpe
  for GPT-2).

  Returns:
    (tokenizer, its location: a directory or 'minilm').
  """
  where = override
  path = hf.resolve_model_dir(source) if source else ""
  if not where and path and os.path.exists(os.path.join(path, MODEL_JSON)):
    where = read_model_json(path).get("tokenizer", "")
  elif not where and path and _has_tokenizer(path, arch):
    where = source
  if not where:
    where = "minilm" if arch == "bert" else os.path.join(data_dir, "gpt2-bpe")
  if arch == "bert":
    return hf.load_bert_tokenizer(where), where
  return hf.load_gpt2_tokenizer(hf.resolve_model_dir(where)), where


def describe(source: str) -> ModelArgs:
  """The architecture of a model source without loading its weights."""
  path = hf.resolve_model_dir(source)
  if os.path.exists(os.path.join(path, "config.json")):
    return hf.args_from_hf_config(hf.read_hf_config(path), os.path.join(path, "config.json"))
  if os.path.exists(os.path.join(path, MODEL_JSON)):
    return read_model_json(path)["args"]
  raise FileNotFoundError(f"{source}: not a model source: expected 'minilm', a Hugging Face "
                          f"directory (config.json), or one of ours ({MODEL_JSON})")


# ----------------------------------------------------------------------------- conversion

def hf_to_ours(src: str, dst: str) -> LoadedModel:
  """A HF checkpoint directory (or 'minilm') -> our model directory, head from its config.

  Every tensor must fit (hf.CheckpointMismatchError otherwise); the tokenizer location is recorded.
  """
  path = hf.resolve_model_dir(src)
  head, num_labels, names = hf.head_of_hf_config(hf.read_hf_config(path))
  args, params = hf.import_checkpoint(path, head, num_labels)
  save_model_dir(dst, args, params, head, num_labels, names)
  if _has_tokenizer(path, args.arch):
    meta = read_model_json(dst)
    write_model_json(dst, meta.pop("args"), tokenizer=os.path.abspath(path) if src != "minilm"
                     else "minilm", **{k: meta[k] for k in ("head", "num_labels", "label_names")})
  return LoadedModel(args, head, num_labels, params, path)


def ours_to_hf(src: str, dst: str, data_dir: str) -> LoadedModel:
  """Our model directory or run workdir -> a HF directory (config.json, model.safetensors,
  tokenizer files) that transformers loads with no missing or unexpected keys.

  LoRA/AdaLoRA factors (and a prefix MLP) are merged in first (`peft.merge`); adapters, prefixes
  and prompts have no HF equivalent (hf.params_to_hf names them)."""
  meta = read_model_json(src)
  model = load_model(src, meta["head"], meta["num_labels"])
  tokenizer, _ = load_tokenizer(src, model.args.arch, data_dir)
  id2label = dict(enumerate(meta["label_names"])) if meta["label_names"] else None
  params, args = peft.merge(model.params, model.args)
  hf.export_checkpoint(params, args, dst, model.head, model.num_labels,
                       id2label=id2label, tokenizer=tokenizer)
  return model
