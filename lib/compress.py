"""Compressing a fine-tuned model (research/compress.py): int8 PTQ or head / FFN-neuron pruning
into a model directory, and one table row of its size, CPU speed against the float32 model and
quality on the fine-tuning evaluator. The int8 matmuls themselves are lib/quant.py; head and
neuron importance and removal lib/prune.py."""

import dataclasses
import itertools
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lib import bench, model_io, models, peft, prune, quant

COLUMNS = ("model", "params", "file_MB", "b1_ms", "b32x128_seq_s", "speedup", "dev", "test",
           "drop")


def dir_bytes(path: str) -> int:
  """Total size of the files under `path` (what the compressed model costs on disk)."""
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def weight_count(params) -> int:
  """Parameters of a model, int8 scales (kernel_scale, input_scale) not counted."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return sum(int(np.size(v)) for kp, v in flat
             if str(getattr(kp[-1], "key", "")) not in (quant.SCALE, quant.INPUT_SCALE))


def _tokenizer_of(path: str) -> str:
  """Where the source's tokenizer is (our dirs record it; an HF dir holds its own)."""
  if os.path.exists(os.path.join(path, model_io.MODEL_JSON)):
    return model_io.read_model_json(path).get("tokenizer", "")
  return path


def quantize_source(source: str, out_dir: str, method: str, kernels: str, *,
                    calibration=(), overwrite: bool = False) -> model_io.LoadedModel:
  """Int8 PTQ of `source` (any model source with a head) into the model directory `out_dir`: the
  kernels that `kernels` fully matches are stored as int8 + per-channel scales, and model.json's
  `dot_general` rules send them to the `method` seat. Deterministic. 'int8_static' calibrates
  one activation scale per kernel on the `calibration` batches (`calibration_batches`).

  Returns:
    the float source as loaded (for the comparison).
  """
  head, num_labels, names = model_io.head_of(source)
  model = model_io.load_model(source, head, num_labels)
  rules = quant.default_rules(method, kernels)
  args = dataclasses.replace(model.args, dot_general=rules)
  absmax = None
  if method == "int8_static":
    if not calibration:
      raise ValueError("int8_static needs calibration batches")
    probe = dataclasses.replace(model.args, dot_general=((kernels, "int8_calibrate"),))
    absmax = quant.calibrate(models.build(probe, head, num_labels), model.params, calibration)
  params = quant.quantize_params(model.params, rules, absmax=absmax)
  path = model_io.split_source(source)[0]
  model_io.save_model_dir(out_dir, args, params, head, num_labels, names, overwrite=overwrite,
                          sources=(path,), tokenizer=_tokenizer_of(path),
                          compressed_from=model_io.pinned(source, model.step),
                          compression=dict(method=method, kernels=kernels,
                                           calibration_batches=len(calibration)))
  return model


def calibration_batches(cfg, source: str, n: int) -> list:
  """The first `n` training batches of `cfg`'s data (model inputs only), tokenised with `source`'s
  tokenizer: a deterministic calibration set, disjoint from dev and test."""
  from lib import tasks   # the task modules sit above this module's other users
  from lib.tasks import common
  tokenizer, _ = model_io.load_tokenizer(source, model_io.describe(source).arch, cfg.data.dir,
                                         cfg.model.tokenizer)
  data = tasks.get(cfg.task).make_data(cfg, tokenizer)
  return [{k: b[k] for k in common.MODEL_INPUTS if k in b}
          for b in itertools.islice(data.train, n)]


def dev_batches(cfg, source: str, max_batches: int = 0):
  """(task, the dev batches of `cfg`'s data (the first `max_batches`; 0: all)) tokenised with
  `source`'s tokenizer."""
  from lib import tasks   # the task modules sit above this module's other users
  task = tasks.get(cfg.task)
  tokenizer, _ = model_io.load_tokenizer(source, model_io.describe(source).arch, cfg.data.dir,
                                         cfg.model.tokenizer)
  data = task.make_data(cfg, tokenizer)
  it = data.evals["validation"]
  return task, list(itertools.islice(it, max_batches or None))


def prune_heads_source(source: str, out_dir: str, cfg, fraction: float, *, min_per_layer: int = 1,
                       max_batches: int = 0, overwrite: bool = False) -> model_io.LoadedModel:
  """`prune_structured_source` removing attention heads only (`fraction` of all heads)."""
  return prune_structured_source(source, out_dir, cfg, heads=fraction, min_heads=min_per_layer,
                                 max_batches=max_batches, overwrite=overwrite)


def prune_structured_source(source: str, out_dir: str, cfg, *, heads: float = 0.0,
                            neurons: float = 0.0, min_heads: int = 1, min_neurons: int = 1,
                            max_batches: int = 0,
                            overwrite: bool = False) -> model_io.LoadedModel:
  """Removes the least important attention heads and/or FFN neurons of `source` (Michel et al.:
  |gradient of a head / neuron mask| of the task loss summed over dev batches, normalised per
  layer; both scored on the unpruned model in one pass) and writes the smaller model to the model
  directory `out_dir`; model.json records what each layer kept and the head scores. LoRA factors
  are merged first.

  Args:
    source: a model source with a head.
    out_dir: the model directory to write.
    cfg: the fine-tuning config (configs/sst2.py, ner.py) whose task loss and dev data score units.
    heads: share of all heads to remove (globally; 0: none).
    neurons: share of all FFN neurons to remove (globally; 0: none).
    min_heads: heads every layer keeps.
    min_neurons: neurons every layer keeps.
    max_batches: dev batches to score on (0: the whole dev split).
    overwrite: replace a non-empty `out_dir`.

  Returns:
    the float source as loaded (for the comparison).
  """
  units = tuple(u for u, f in (("heads", heads), ("neurons", neurons)) if f)
  if not units:
    raise ValueError("structured pruning: heads and neurons fractions are both 0")
  head, num_labels, names = model_io.head_of(source)
  model = model_io.load_model(source, head, num_labels)
  params, args = peft.merge(model.params, model.args)
  task, batches = dev_batches(cfg, source, max_batches)
  loss = task.make_loss(models.build(args, head, num_labels), cfg)
  importance = prune.mask_importance(lambda p, b: loss(p, b, None, False)[0], params, args,
                                     batches, units)
  pruned, pargs, info = params, args, dict(dev_batches=len(batches))
  if heads:
    keep = prune.heads_to_keep(importance["heads"], heads, min_heads)
    pruned, pargs = prune.prune_heads(pruned, pargs, keep)
    logging.info("heads kept per layer: %s (of %d)", pargs.heads_per_layer, args.num_heads)
    info.update(fraction=heads, kept=[list(k) for k in keep],
                importance=[[round(float(v), 6) for v in s] for s in importance["heads"]])
  if neurons:
    keep = prune.neurons_to_keep(importance["neurons"], neurons, min_neurons)
    pruned, pargs = prune.prune_neurons(pruned, pargs, keep)
    logging.info("FFN neurons kept per layer: %s (of %d)", pargs.mlp_per_layer, args.mlp_dim)
    info.update(neuron_fraction=neurons, neurons_kept=[list(k) for k in keep])
  path = model_io.split_source(source)[0]
  model_io.save_model_dir(out_dir, pargs, pruned, head, num_labels, names, overwrite=overwrite,
                          sources=(path,), tokenizer=_tokenizer_of(path),
                          compressed_from=model_io.pinned(source, model.step),
                          compression=dict(method="+".join(units), **info))
  return dataclasses.replace(model, params=params, args=args)


def sparsity_spec(scfg, num_steps: int) -> prune.Sparsity:
  """The `prune.Sparsity` of a config's `sparsity` block (begin/end as fractions of the run)."""
  return prune.Sparsity(scfg.method, scfg.target, begin=int(scfg.begin * num_steps),
                        end=int(scfg.end * num_steps), every=scfg.every, scope=scfg.scope,
                        rules=tuple(tuple(r) for r in scfg.rules))


def sparse_finetune(cfg, workdir: str, source: str, scfg) -> dict:
  """Fine-tunes `source` on `cfg`'s task (the run skeleton, lib/experiment) with unstructured
  pruning to `scfg.target` sparsity (`prune.sparsify` around the run's optimizer). The run is
  evaluated once, at the end (an earlier best-on-dev checkpoint would be less sparse). Writes the
  run workdir (a model source: dense kernels whose pruned weights are exactly zero) and in it
  sparse.npz (the pruned kernels as nonzero values + bitmask, `prune.sparse_encode`).

  Returns:
    metrics.json's content plus 'sparsity' (`prune.sparsity_of`) and 'sparse_bytes' (the sizes of
    sparse.npz, of the pruned kernels dense, and of the other parameters).
  """
  from lib import experiment, tasks, train   # the run skeleton sits above this module's users
  task = tasks.get(cfg.task)
  run = experiment.setup(cfg, workdir, task, source=source)
  spec = sparsity_spec(scfg, run.num_steps)
  logging.info("unstructured pruning: %s", spec)
  run.cfg.train.eval_every = run.num_steps
  run.tx = prune.sparsify(run.tx, spec)
  _, logical = models.abstract_params(run.module)
  run.state = train.train_state_from_params(jax.tree.map(np.asarray, run.state.params), run.tx,
                                            run.mesh, run.rules, logical, run.labels)
  evaluator = task.make_evaluator(run)
  fitted = experiment.fit(run, evaluator)
  if fitted is None:
    return {}
  out = experiment.finish(run, evaluator, fitted)
  params = jax.tree.map(np.asarray, fitted.state.params)
  arrays = prune.sparse_encode(params, spec.rules)
  path = os.path.join(workdir, "sparse.npz")
  with open(path + ".tmp", "wb") as f:
    np.savez(f, **arrays)
  os.replace(path + ".tmp", path)
  pruned = sum(int(np.prod(arrays[k])) * arrays[k[:-len("shape")] + "values"].itemsize
               for k in arrays if k.endswith(".shape"))
  total = sum(v.nbytes for v in jax.tree.leaves(params))
  return dict(out, sparsity=prune.sparsity_of(params, spec.rules),
              sparse_bytes=dict(sparse_npz=os.path.getsize(path), pruned_dense=pruned,
                                others=total - pruned))


def qat_finetune(cfg, workdir: str, source: str, kernels: str) -> str:
  """Quantisation-aware fine-tuning of `source` on `cfg`'s task (the run skeleton): the kernels
  that `kernels` fully matches go through the `int8_fake` seat in training and evaluation. The
  run workdir keeps float weights (its model.json has no seat rules); `quantize_source(workdir,
  ..., 'int8_w8a8', kernels)` then gives the int8 model whose numerics QAT trained.

  Returns:
    the workdir as a model source ('' when preempted: rerun to resume).
  """
  from lib import experiment, tasks   # the run skeleton sits above this module's other users
  task = tasks.get(cfg.task)
  run = experiment.setup(cfg, workdir, task, source=source)
  run.args = dataclasses.replace(run.args, dot_general=((kernels, "int8_fake"),))
  run.module = models.build(run.args, task.HEAD, len(run.data.label_names))
  models.abstract_params(run.module)   # a rule matching no kernel raises here
  evaluator = task.make_evaluator(run)
  fitted = experiment.fit(run, evaluator)
  if fitted is None:
    return ""
  experiment.finish(run, evaluator, fitted)
  return workdir


def _forward(module):
  fwd = jax.jit(lambda p, b: module.apply({"params": p}, **b)[0]["logits"])
  return lambda p, b: fwd(p, b).block_until_ready()


def speed(modules: dict, *, vocab: int, batch: int, seq_len: int, steps: int,
          latency_steps: int) -> dict:
  """{name: (batch-1 median ms, batch x seq_len sequences/s)} of jitted forward passes of
  {name: (module, params)}, the models interleaved so that load changes hit them alike."""
  out = {}
  for b, n in ((1, latency_steps), (batch, steps)):
    data = bench.synthetic_batch(b, seq_len, vocab, 2)
    inputs = {k: jnp.asarray(data[k]) for k in ("input_ids", "input_mask", "token_type_ids")}
    fns = {}
    for name, (module, params) in modules.items():
      fwd, placed = _forward(module), jax.device_put(params)
      fwd(placed, inputs)                                                # compile
      fns[name] = (lambda f, p: lambda: f(p, inputs))(fwd, placed)
    for name, times in bench.time_interleaved(fns, n, block=2).items():
      out.setdefault(name, []).append(float(np.median(times)))
  return {k: (1e3 * t1, batch / tb) for k, (t1, tb) in out.items()}


def evaluate(cfg, source: str) -> dict:
  """{'dev': metrics, 'test': metrics} of `source` by the fine-tuning evaluator of `cfg` (a
  configs/sst2.py or ner.py config; its max_eval_examples apply). Nothing is trained."""
  from lib import experiment, tasks   # the run skeleton sits above this module's other users
  task = tasks.get(cfg.task)
  with tempfile.TemporaryDirectory(prefix="compress-eval-") as workdir:
    run = experiment.setup(cfg, workdir, task, source=source)
    ev = task.make_evaluator(run)
    return {"dev": dict(ev(run.state, "validation")[0]),
            "test": dict(ev(run.state, "test")[0])}


def row(name: str, params: int, file_bytes: int, timing: tuple, base_timing: tuple,
        scores: dict, base_scores: dict, metric: str) -> dict:
  """One table row; `drop` is the float model's test metric minus this one's (points); timing
  None: not measured (a sparse model run densely has the float model's speed)."""
  dev, test = (scores[s].get(metric) if scores else None for s in ("dev", "test"))
  base = base_scores["test"].get(metric) if base_scores else None
  timed = timing is not None and base_timing is not None
  return dict(model=name, params=params, file_MB=round(file_bytes / 1e6, 2),
              b1_ms=round(timing[0], 2) if timed else None,
              b32x128_seq_s=round(timing[1], 1) if timed else None,
              speedup=round(timing[1] / base_timing[1], 2) if timed else None, dev=dev, test=test,
              drop=None if test is None or base is None else round(100 * (base - test), 2))


def metrics(rows: list, metric: str) -> dict:
  """metrics.json of a compressed model (what tables/compress.py reads): its dev/test metric at
  the top level, as a fine-tuning run's, and `compress`: its `row` (size, speed, drop) with the
  float32 source's row as `compress.float32`. `rows`: [float32 row, compressed row]."""
  base, ours = rows
  return dict(dev={metric: ours["dev"]}, test={metric: ours["test"]},
              compress=dict(ours, float32=base, metric=metric))


def format_rows(rows: list) -> str:
  """A Markdown table of `row` dicts."""
  def cell(col, v):
    return "-" if v is None else (f"{v:.4f}" if col in ("dev", "test") else str(v))
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  return "\n".join(lines + ["| " + " | ".join(cell(c, r[c]) for c in COLUMNS) + " |"
                            for r in rows])
