"""Model directories of ours (model.json + orbax params) and loading a model from any source.

Sources a run can initialise from (`load_model`):
  - a Hugging Face directory (config.json + model.safetensors / pytorch_model.bin), or 'minilm';
  - one of our model directories, written by `save_model_dir` (research/convert.py):
      model.json   {"args": ModelArgs fields, "head": ..., "num_labels": ..., "label_names": [...]}
      params/      orbax PyTree checkpoint of the parameter tree;
  - one of our run workdirs (research/finetune.py, research/pretrain_mlm.py): its model.json and the
    'params' of one checkpoint in <workdir>/checkpoints: the one its reported metrics belong to.
    That is `train.best_step` of <workdir>/metrics.json (the best on dev); without it (a run not
    finished) the best on the dev metric the checkpoints saved (fine-tuning), else the latest
    (pretraining reports its final state).
    A suffix chooses another: `<workdir>@latest`, `<workdir>@<step>`, `<workdir>@best` (the
    default). A damaged chosen checkpoint is skipped with a warning naming its step (the latest
    readable one is used instead; an explicit @<step> is not replaced). The step used is logged,
    kept in `LoadedModel.step` and recorded in what is written from it.
"""

import dataclasses
import json
import os
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from lib import atomic, checkpoint, errors, hf, models, peft
from lib import quant  # noqa: F401  # registers the int8 seats a saved model.json may name
from lib.models import ModelArgs

MODEL_JSON = "model.json"
PARAMS_DIR = "params"
RUN_CHECKPOINTS = "checkpoints"
RUN_METRICS = "metrics.json"
# Per head, the dev metric whose best checkpoint a run reports (METRIC of lib/tasks/ner.py and
# classification.py, RESTORE_BEST); pretraining heads report their final state. Only consulted
# when metrics.json (train.best_step) is not written yet.
DEV_METRIC = {"token_cls": "f1", "seq_cls": "accuracy"}
# The backbone subtree of each architecture: what carries over between heads.
BACKBONE = models.BACKBONE


@dataclasses.dataclass
class LoadedModel:
  """A model ready to train: architecture, head, parameters (host numpy) and their origin."""
  args: ModelArgs
  head: Optional[str]
  num_labels: int
  params: dict
  source: str
  step: Optional[int] = None   # the checkpoint step of a run workdir source


def write_model_json(directory: str, args: ModelArgs, head=None, num_labels: int = 0,
                     label_names=None, **extra) -> None:
  """Writes model.json (atomically) describing the model whose params live in `directory`."""
  body = dict(args=dataclasses.asdict(args), head=head, num_labels=int(num_labels),
              label_names=list(label_names or []), **extra)
  atomic.write_bytes(os.path.join(directory, MODEL_JSON), json.dumps(body, indent=1).encode())


def read_model_json(directory: str) -> dict:
  """model.json of one of our model directories or run workdirs, with 'args' as ModelArgs."""
  path = os.path.join(directory, MODEL_JSON)
  if not os.path.exists(path):
    raise errors.MissingFileError(f"{path}: not found; expected a Hugging Face directory "
                                  "(config.json), or one of ours (model.json + params/) or a run "
                                  "workdir")
  with open(path) as f:
    body = json.load(f)
  fields = {f.name for f in dataclasses.fields(ModelArgs)}
  unknown = sorted(set(body.get("args", {})) - fields)
  if unknown:
    raise errors.ModelSourceError(f"{path}: unknown model args {unknown}; valid: {sorted(fields)}")
  body["args"] = ModelArgs(**body["args"])
  return body


def save_model_dir(out_dir: str, args: ModelArgs, params, head=None, num_labels: int = 0,
                   label_names=None, *, overwrite: bool = False, sources=(), **extra) -> str:
  """Writes model.json (+ `extra` entries) and params/ (orbax) into `out_dir`, assembled beside it
  and renamed into place. A non-empty `out_dir` is refused unless overwrite=True; `sources`: the
  directories it is made from (see `atomic.directory`)."""
  with atomic.directory(out_dir, ".tmp-model-", overwrite=overwrite, sources=sources) as tmp:
    host = jax.tree.map(np.asarray, params)
    with ocp.PyTreeCheckpointer() as ckptr:
      ckptr.save(os.path.abspath(os.path.join(tmp, PARAMS_DIR)), host)  # orbax: absolute only
    write_model_json(tmp, args, head, num_labels, label_names, **extra)
  return out_dir


# ----------------------------------------------------------------------------- run workdirs

def is_run_workdir(path: str) -> bool:
  """model.json beside checkpoints/ (research/finetune.py, research/pretrain_mlm.py)."""
  return (os.path.exists(os.path.join(path, MODEL_JSON))
          and os.path.isdir(os.path.join(path, RUN_CHECKPOINTS)))


def split_source(source: str):
  """(path, selector) of a model source: selector None, 'best', 'latest' or a step number from a
  run workdir's '@' suffix. A path that exists as written has no suffix.

  Raises:
    errors.ModelSourceError: a suffix on something that is not a run workdir, a bad suffix, a
      missing step (the available steps listed).
  """
  if "@" not in source or os.path.exists(source):
    return source, None
  path, _, suffix = source.rpartition("@")
  if not is_run_workdir(path):
    raise errors.ModelSourceError(f"{source}: a checkpoint suffix (@best, @latest, @<step>) "
                                  f"needs a run workdir (model.json + {RUN_CHECKPOINTS}/); "
                                  f"{path} is not one")
  steps = checkpoint.saved_steps(os.path.join(path, RUN_CHECKPOINTS))
  if suffix in ("best", "latest"):
    return path, suffix
  if not suffix.isdigit():
    raise errors.ModelSourceError(f"{source}: bad checkpoint suffix {suffix!r}; expected @best, "
                                  f"@latest or @<step> with a step of {steps}")
  if int(suffix) not in steps:
    raise errors.ModelSourceError(f"{source}: no checkpoint step {int(suffix)} in "
                                  f"{path}/{RUN_CHECKPOINTS}; available steps: {steps}")
  return path, int(suffix)


def _reported_step(workdir: str) -> Optional[int]:
  """`train.best_step` of <workdir>/metrics.json (None without one)."""
  path = os.path.join(workdir, RUN_METRICS)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    step = (json.load(f).get("train") or {}).get("best_step")
  return None if step is None else int(step)


def run_step(workdir: str, selector=None):
  """(step, why) of the checkpoint a run workdir stands for (see the module docstring).

  Args:
    workdir: a run workdir.
    selector: None or 'best' (what metrics.json reports), 'latest', or a step number.

  Raises:
    errors.MissingFileError: no checkpoint at all.
    errors.ModelSourceError: no step `selector` (the available steps listed).
  """
  ckdir = os.path.join(workdir, RUN_CHECKPOINTS)
  steps = checkpoint.saved_steps(ckdir)
  if not steps:
    raise errors.MissingFileError(f"{ckdir}: no checkpoint (a run workdir as a model source "
                                  "needs one)")
  if isinstance(selector, int):
    if selector not in steps:
      raise errors.ModelSourceError(f"{workdir}@{selector}: no such checkpoint step; available "
                                    f"steps: {steps}")
    return selector, "as requested"
  if selector == "latest":
    return steps[-1], "the latest, as requested"
  reported = _reported_step(workdir)
  if reported in steps:
    return reported, f"best on dev, as reported in {RUN_METRICS}"
  if reported is not None:
    logging.warning("%s: %s reports step %d, which is no longer among the checkpoints %s", workdir,
                    RUN_METRICS, reported, steps)
  metric = DEV_METRIC.get(read_model_json(workdir)["head"])
  best = checkpoint.best_saved_step(ckdir, metric, "max") if metric else None
  if best is not None:
    return best, f"best on dev {metric} among the saved checkpoints (no {RUN_METRICS} yet)"
  return steps[-1], "the latest (no dev evaluation to choose by)"


def _restore_tree(directory: str, abstract, subtree: str, step=None):
  """Host numpy leaves of `subtree` of a saved tree: our model dir, or step `step` of a run's
  checkpoints (None for a model dir)."""
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        abstract)
  if step is None:   # our model directory
    keys = [k for k in subtree.split("/")[1:] if k]          # drop the leading 'params'
    for key in reversed(keys):
      target = {key: target}
    args = ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(target))
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:
      out = reader.restore(os.path.abspath(os.path.join(directory, PARAMS_DIR)), args=args)
    for key in keys:
      out = out[key]
  else:
    out = checkpoint.restore_params(os.path.join(directory, RUN_CHECKPOINTS, str(step)), target,
                                    subtree=subtree)
  return jax.tree.map(np.asarray, out)


def _restore_run(workdir: str, selector, abstract, subtree: str):
  """(step, host leaves of `subtree`) of the checkpoint `run_step` chooses; a damaged one is
  skipped with a warning for the latest readable (not when a step was asked for)."""
  step, why = run_step(workdir, selector)
  steps = checkpoint.saved_steps(os.path.join(workdir, RUN_CHECKPOINTS))
  order = [step] if isinstance(selector, int) else [step] + [s for s in steps[::-1] if s != step]
  for candidate in order:
    try:
      tree = _restore_tree(workdir, abstract, subtree, candidate)
    except (checkpoint.CorruptCheckpointError, FileNotFoundError) as e:
      if candidate == order[-1]:
        raise
      logging.warning("%s: checkpoint step %d is damaged or unreadable (%s); trying step %d",
                      workdir, candidate, e, order[order.index(candidate) + 1])
      continue
    if candidate != step:
      why = f"the latest readable: step {step} ({why}) is damaged"
    logging.info("%s: checkpoint step %d (%s)", workdir, candidate, why)
    return candidate, tree


def _load_ours(path: str, selector, head, num_labels: int, rng,
               overrides: Optional[dict]) -> LoadedModel:
  """Our model dir / run workdir: the whole tree if the head matches, else backbone + fresh head."""
  meta = read_model_json(path)
  args = meta["args"]
  if overrides:
    args = dataclasses.replace(args, **overrides)
  module = models.build(args, head, num_labels)
  init = jax.tree.map(np.asarray, models.init_params(module, rng)[0])
  run = not os.path.isdir(os.path.join(path, PARAMS_DIR))
  same_head = meta["head"] == head and meta["num_labels"] == num_labels
  backbone = BACKBONE[args.arch]
  abstract, subtree = (init, "params") if same_head else (init[backbone], f"params/{backbone}")
  if run:
    step, tree = _restore_run(path, selector, abstract, subtree)
  else:
    step, tree = None, _restore_tree(path, abstract, subtree)
  if same_head:
    return LoadedModel(args, head, num_labels, tree, path, step)
  params = dict(init, **{backbone: tree})
  new = tuple(sorted(k for k in init if k != backbone))
  logging.info("%s: backbone %r loaded (saved head %r); newly initialised: %s", path, backbone,
               meta["head"], list(new))
  return LoadedModel(args, head, num_labels, params, path, step)


def _not_a_source(source: str) -> errors.MissingFileError:
  return errors.MissingFileError(f"{source}: not a model source: expected 'minilm', a Hugging "
                                 f"Face directory (config.json), or one of ours ({MODEL_JSON})")


def load_model(source: str, head=None, num_labels: int = 0, *, rng=None,
               overrides: Optional[dict] = None) -> LoadedModel:
  """Loads a model from a HF directory, 'minilm', our model directory or a run workdir.

  Args:
    source: see the module docstring (a run workdir may carry @best, @latest or @<step>).
    head: our head (None, 'mlm', 'lm', 'token_cls', 'seq_cls').
    num_labels: classes of a classification head.
    rng: key for newly initialised heads (default key 0).
    overrides: ModelArgs fields to replace (dropout_rate, dtype, remat...).

  Raises:
    errors.MissingFileError: `source` is none of the above (says what was expected).
    errors.ModelSourceError: a bad @ suffix or a step the workdir does not have (steps listed).
    hf.CheckpointMismatchError: HF tensors that do not fit (every key named).
  """
  rng = jax.random.key(0) if rng is None else rng
  path, selector = split_source(source)
  path = hf.resolve_model_dir(path)
  if os.path.exists(os.path.join(path, "config.json")):
    args, params = hf.import_checkpoint(path, head, num_labels, rng=rng, allow_new_heads=True,
                                        overrides=overrides)
    return LoadedModel(args, head, num_labels, params, path)
  if os.path.exists(os.path.join(path, MODEL_JSON)):
    return _load_ours(path, selector, head, num_labels, rng, overrides)
  raise _not_a_source(source)


def pinned(source: str, step: Optional[int]) -> str:
  """`source` as given, or '<workdir>@<step>' when it is a run workdir loaded at `step`: the
  source that loads the same checkpoint again (for a run's model.json `init_from`)."""
  return source if step is None else f"{split_source(source)[0]}@{step}"


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
  source = split_source(source)[0] if source else source
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
  """The architecture of a model source without loading its weights (an @ suffix is checked)."""
  path = hf.resolve_model_dir(split_source(source)[0])
  if os.path.exists(os.path.join(path, "config.json")):
    return hf.args_from_hf_config(hf.read_hf_config(path), os.path.join(path, "config.json"))
  if os.path.exists(os.path.join(path, MODEL_JSON)):
    return read_model_json(path)["args"]
  raise _not_a_source(source)


def head_of(source: str) -> tuple:
  """(head, num_labels, label names) a model source was saved with (HF: from its config's
  `architectures` and id2label; ours: model.json)."""
  path = hf.resolve_model_dir(split_source(source)[0])
  if os.path.exists(os.path.join(path, "config.json")):
    return hf.head_of_hf_config(hf.read_hf_config(path))
  if os.path.exists(os.path.join(path, MODEL_JSON)):
    meta = read_model_json(path)
    return meta["head"], meta["num_labels"], list(meta["label_names"])
  raise _not_a_source(source)


@dataclasses.dataclass
class InferenceModel:
  """A model ready to predict: module, parameters (host numpy), tokenizer and label names."""
  args: ModelArgs
  head: Optional[str]
  num_labels: int
  label_names: list
  module: object
  params: dict
  tokenizer: object
  source: str
  step: Optional[int] = None   # the checkpoint step of a run workdir source

  @property
  def weights(self):
    """The parameters as eval steps take them (`train.Weights`: no step, no optimizer state)."""
    from lib import train  # pylint: disable=g-import-not-at-top  # train sits above model_io
    return train.Weights(self.params)


def load_for_inference(source: str, head: Optional[str] = None, *, data_dir: str,
                       tokenizer: str = "", dtype: str = "float32") -> InferenceModel:
  """A model source for prediction: no dropout; the head it was saved with unless `head` is
  given (then a missing head is freshly initialised, e.g. 'mlm' on an encoder).

  Args:
    source: as `load_model` (a run workdir means its reported checkpoint; @latest, @<step>).
    head: our head name, or None for the source's own.
    data_dir: the shared data folder (GPT-2 BPE tables, the GPT-2 default tokenizer).
    tokenizer: a tokenizer location overriding the source's own.
    dtype: compute dtype.
  """
  own_head, num_labels, names = head_of(source)
  if head is not None and head != own_head:
    num_labels, names = 0, []
  head = own_head if head is None else head
  model = load_model(source, head, num_labels,
                     overrides=dict(dropout_rate=0.0, attention_dropout_rate=0.0, dtype=dtype))
  tok, _ = load_tokenizer(source, model.args.arch, data_dir, tokenizer)
  module = models.build(model.args, head, num_labels)
  return InferenceModel(model.args, head, num_labels, list(names), module, model.params, tok,
                        model.source, model.step)


# ----------------------------------------------------------------------------- conversion

def _provenance(model: LoadedModel) -> dict:
  return dict(path=os.path.abspath(model.source), step=model.step)


def to_ours(src: str, dst: str, *, overwrite: bool = False) -> LoadedModel:
  """A HF checkpoint directory (or 'minilm'), or a run workdir (one checkpoint of it, see
  `load_model`) -> our model directory, head from the source.

  Every HF tensor must fit (hf.CheckpointMismatchError otherwise). model.json records the tokenizer
  location and the source (`source`, and `source_step` for a run workdir).

  Raises:
    atomic.OutputExistsError: `dst` is the source, or non-empty without overwrite=True, or holds
      a run's outputs (checked before anything is read).
  """
  path = hf.resolve_model_dir(split_source(src)[0])
  atomic.check_output(dst, sources=(path,), overwrite=overwrite)
  extra = dict(source=os.path.abspath(path))
  if os.path.exists(os.path.join(path, "config.json")):
    head, num_labels, names = hf.head_of_hf_config(hf.read_hf_config(path))
    args, params = hf.import_checkpoint(path, head, num_labels)
    model = LoadedModel(args, head, num_labels, params, path)
    if _has_tokenizer(path, args.arch):
      extra["tokenizer"] = os.path.abspath(path) if src != "minilm" else "minilm"
  else:
    meta = read_model_json(path)
    head, num_labels, names = meta["head"], meta["num_labels"], meta["label_names"]
    model = load_model(src, head, num_labels)
    if model.step is not None:
      extra["source_step"] = model.step
    if meta.get("tokenizer"):
      extra["tokenizer"] = meta["tokenizer"]
  save_model_dir(dst, model.args, model.params, head, num_labels, names, overwrite=overwrite,
                 sources=(path,), **extra)
  return model


def hf_to_ours(src: str, dst: str, *, overwrite: bool = False) -> LoadedModel:
  """A HF checkpoint directory (or 'minilm') -> our model directory (see `to_ours`)."""
  return to_ours(src, dst, overwrite=overwrite)


def ours_to_hf(src: str, dst: str, data_dir: str, *, overwrite: bool = False) -> LoadedModel:
  """Our model directory or run workdir (see `load_model` for which checkpoint) -> a HF directory
  (config.json, model.safetensors, tokenizer files) that transformers loads with no missing or
  unexpected keys. config.json records the source: `workbench_source` {path, step}.

  LoRA/AdaLoRA factors (and a prefix MLP) are merged in first (`peft.merge`); adapters, prefixes
  and prompts have no HF equivalent (hf.params_to_hf names them).

  Raises:
    atomic.OutputExistsError: `dst` is the source, or non-empty without overwrite=True, or holds
      a run's outputs (checked before anything is read).
  """
  path = split_source(src)[0]
  atomic.check_output(dst, sources=(path,), overwrite=overwrite)
  if not os.path.exists(os.path.join(path, MODEL_JSON)) and os.path.exists(
      os.path.join(hf.resolve_model_dir(path), "config.json")):
    raise errors.ModelSourceError(f"{src} is already a Hugging Face directory (config.json); "
                                  "convert --to=hf converts our model dirs and run workdirs "
                                  f"({MODEL_JSON})")
  meta = read_model_json(path)
  model = load_model(src, meta["head"], meta["num_labels"])
  tokenizer, _ = load_tokenizer(path, model.args.arch, data_dir)
  id2label = dict(enumerate(meta["label_names"])) if meta["label_names"] else None
  params, args = peft.merge(model.params, model.args)
  hf.export_checkpoint(params, args, dst, model.head, model.num_labels, id2label=id2label,
                       tokenizer=tokenizer, overwrite=overwrite, sources=(path,),
                       config_extra=dict(workbench_source=_provenance(model)))
  return model
