"""Fine-tuning runs (token and sequence classification): config -> data, model, fit, test, outputs.

Outputs in the workdir: model.json; checkpoints/ (latest for resume, best on the dev metric);
TensorBoard events and metrics.jsonl; metrics.json (dev, test, train blocks); report.txt;
test_predictions.conll (NER: `word gold predicted`) or test_predictions.tsv (classification);
curves.png; adapter/ when some parameters were frozen (PEFT): the best checkpoint's trainable
leaves alone (peft.save_adapter).
"""

import dataclasses
import json
import os
import resource
import time
from typing import Optional

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from lib import (checkpoint, data, distributed, metrics, model_io, models, optim, peft, reporting,
                 sharding, train)
from lib.tasks import classification, ner

TASKS = {"ner": ner, "classification": classification}
DEV_METRIC = {"ner": "f1", "classification": "accuracy"}


def _task(name: str):
  if name not in TASKS:
    raise ValueError(f"config task={name!r}; valid: {sorted(TASKS)}")
  return TASKS[name]


def data_config(data_cfg, split: str, batch_divisor: int = 1) -> dict:
  """The config's `data` block as `lib.data.from_config` keywords for one split.

  See `data.config_kwargs`; `max_train_examples` applies to the training split only.
  """
  d = data.config_kwargs(data_cfg, batch_divisor)
  n = d.pop("max_train_examples", 0)
  if split == "train" and n:
    d["max_examples"] = n
  return d


def _iterator(cfg, tokenizer, split: str, train_mode: bool, steps=None):
  d = data_config(cfg.data, split, jax.process_count())
  if steps is not None:
    d["steps_per_epoch"] = steps
  return data.from_config(d, tokenizer, split, train=train_mode, shard_index=jax.process_index(),
                          shard_count=jax.process_count())


def make_iterators(cfg, tokenizer) -> dict:
  """{'train', 'validation', 'test'} batch iterators of this process's shard.

  With several processes every host must run the same number of steps: training takes the
  smallest shard's epoch, evaluation the largest (short shards are padded with dummy batches).
  """
  its = {"train": _iterator(cfg, tokenizer, "train", True)}
  its.update({s: _iterator(cfg, tokenizer, s, False) for s in ("validation", "test")})
  if jax.process_count() > 1:
    its["train"] = _iterator(cfg, tokenizer, "train", True,
                             distributed.agree_int(len(its["train"]), "min"))
    for s in ("validation", "test"):
      its[s] = _iterator(cfg, tokenizer, s, False, distributed.agree_int(len(its[s]), "max"))
  return its


# ----------------------------------------------------------------------------- evaluation

@dataclasses.dataclass
class Evaluator:
  """Predicts a split with the current state and scores it against the gold data (all processes)."""
  task_name: str
  predict_step: object
  batch_sharding: object
  its: dict
  label_names: list
  data_cfg: object
  _last: dict = dataclasses.field(default_factory=dict)   # split -> (step, result)
  _gold: dict = dataclasses.field(default_factory=dict)   # split -> (inputs, gold)

  def _local_predictions(self, state, split):
    """Predictions for this process's shard, as the task's collector returns them."""
    it, info = self.its[split], self.its[split].info
    pos = {e: i for i, e in enumerate(info["example_ids"])}  # global example id -> shard position
    batches, preds = [], []
    for batch, p in train.predict(self.predict_step, state, it, self.batch_sharding):
      start, stop = sharding.process_batch_range(self.batch_sharding, len(p))  # this process's rows
      ids = np.array([pos.get(int(e), -1) for e in batch["example_ids"]])
      batches.append(dict(batch, example_ids=ids))
      preds.append(np.asarray(p)[start:stop])
    if self.task_name == "ner":
      return ner.collect_word_predictions(batches, preds, info["num_words"], self.label_names)
    pred = classification.collect_predictions(batches, preds, len(info["example_ids"]))
    return [self.label_names[i] for i in pred]

  def gold(self, split):
    """(inputs, gold labels) of the whole split: word lists and tag lists, or sentences and labels."""
    if split not in self._gold:
      self._gold[split] = self._read_gold(split)
    return self._gold[split]

  def _read_gold(self, split):
    d = data_config(self.data_cfg, split)
    src = data.load_split(d["dataset"], split, d["data_dir"], d.get("cache_dir"),
                          d.get("label_names"))
    text = lambda x: x.decode("utf-8") if isinstance(x, bytes) else str(x)
    if self.task_name == "ner":
      key = data.pipeline.LABEL_KEY[d["dataset"]]
      rows = [([text(w) for w in e["tokens"]], [self.label_names[t] for t in e[key]])
              for e in src]
    else:
      rows = [(text(e["sentence"]), self.label_names[int(e["label"])]) for e in src]
    return [r[0] for r in rows], [r[1] for r in rows]

  def __call__(self, state, split: str):
    """(metrics, inputs, gold, predicted) of a split; predictions gathered from every process.

    The last result per split is kept: the same step is not evaluated twice."""
    step = int(state.step)
    if self._last.get(split, (None,))[0] != step:
      self._last[split] = (step, self._evaluate(state, split))
    return self._last[split][1]

  def _evaluate(self, state, split):
    local = self._local_predictions(state, split)
    pred = [p for part in distributed.allgather_json(local) for p in part]
    inputs, gold = self.gold(split)
    if len(pred) != len(gold):
      raise RuntimeError(f"{split}: {len(pred)} predictions for {len(gold)} examples")
    if self.task_name == "ner":
      return ner.evaluate(gold, pred), inputs, gold, pred
    return classification.evaluate(gold, pred), inputs, gold, pred


class EarlyStopping:
  """Dev-metric tracker: 'stop' after `patience` evaluations without improvement (0 = never)."""

  def __init__(self, patience: int, best: Optional[float] = None, since_best: int = 0):
    self.patience, self.best, self.since_best = patience, best, since_best

  def update(self, value: float) -> bool:
    if self.best is None or value > self.best:
      self.best, self.since_best = value, 0
    else:
      self.since_best += 1
    return self.patience > 0 and self.since_best >= self.patience


def _resumed_early_stopping(patience, ckpt, metric, eval_every) -> EarlyStopping:
  """Tracker state rebuilt from the checkpoints' metrics, so a resumed run stops where it would."""
  best_step, latest = ckpt.best_step(), ckpt.latest_step()
  if best_step is None:
    return EarlyStopping(patience)
  best = float(ckpt._metrics(best_step)[metric])  # pylint: disable=protected-access
  return EarlyStopping(patience, best, (latest - best_step) // max(eval_every, 1))


# ----------------------------------------------------------------------------- the run

def _model(cfg, source, model_args, head, num_labels):
  """(ModelArgs, host params): `model_args` (random init from a preset) or loaded from `source`."""
  overrides = dict(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                   remat=cfg.model.remat)
  if cfg.model.dropout_rate >= 0:
    overrides.update(dropout_rate=cfg.model.dropout_rate,
                     attention_dropout_rate=cfg.model.dropout_rate)
  rng = jax.random.key(cfg.seed)
  if model_args is not None:
    args = dataclasses.replace(model_args, **overrides)
    params = models.init_params(models.build(args, head, num_labels), rng)[0]
    logging.info("random init (seed %d) of %s", cfg.seed, args)
    return args, jax.tree.map(np.asarray, params)
  loaded = model_io.load_model(source, head, num_labels, rng=rng, overrides=overrides)
  return loaded.args, loaded.params


def _with_peft(spec, args, params, head, num_labels, seed):
  """PEFT (lib/peft): the model args of the config's `peft` spec and the parameters it adds
  (freshly initialised); a spec of labels only returns its inputs."""
  peft_args = peft.configure(args, spec)
  if peft_args == args:
    return args, params
  module = models.build(peft_args, head, num_labels)
  rng = jax.random.fold_in(jax.random.key(seed), 1)
  return peft_args, peft.add_params(params, module, rng)


def _best_state(state, ckpt):
  """The best-dev checkpoint's state (the final state if that is the best)."""
  best = ckpt.best_step()
  if best is None or best == int(state.step):
    return state
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  logging.info("restoring the best dev checkpoint (step %d) for the test evaluation", best)
  return ckpt.restore(abstract, step=best)[0]


def _flops_per_token(args, params, labels, seq_len):
  """Model FLOPs per trained token (matmul params: all but the embedding tables)."""
  flat, lab = peft.flatten_paths(params), peft.flatten_paths(labels)
  matmul = {k: v.size for k, v in flat.items() if not k.endswith("embedding")}
  trainable = sum(n for k, n in matmul.items() if peft.is_trainable(lab[k]))
  return train.flops_per_token(sum(matmul.values()), args.num_layers, args.hidden_size, seq_len,
                               trainable)


def run(cfg, workdir: str, *, source: str = "", model_args=None,
        explain_sharding: bool = False) -> Optional[dict]:
  """Fine-tunes, evaluates the best dev checkpoint on test, writes the outputs; resumes a workdir.

  Args:
    cfg: a configs/ner.py or configs/sst2.py config.
    workdir: outputs and checkpoints; an existing run there is resumed.
    source: model to start from (HF dir, 'minilm', our model dir or run workdir).
    model_args: random init of this architecture instead of `source`.
    explain_sharding: print the per-parameter sharding table and return without training.

  Returns:
    the metrics.json content, or None (sharding explained, or preempted: rerun to resume).
  """
  t_start = time.perf_counter()
  task = _task(cfg.task)
  arch = model_args.arch if model_args is not None else model_io.describe(source).arch
  tokenizer, tok_where = model_io.load_tokenizer(source, arch, cfg.data.dir, cfg.model.tokenizer)
  its = make_iterators(cfg, tokenizer)
  label_names = list(its["train"].info["label_names"])
  args, params = _model(cfg, source, model_args, task.HEAD, len(label_names))
  spec = peft.spec_from_config(cfg.peft)
  args, params = _with_peft(spec, args, params, task.HEAD, len(label_names), cfg.seed)
  module = models.build(args, task.HEAD, len(label_names))
  abstract, logical = models.abstract_params(module)
  labels = peft.label_params(abstract, [tuple(r) for r in cfg.peft.rules])
  num_steps = train.num_train_steps(cfg.train, len(its["train"]))
  tx, schedule = optim.make_optimizer(cfg.optim, labels, num_steps)
  tx = peft.wrap_optimizer(tx, spec, num_steps)   # AdaLoRA's rank budget; else tx unchanged
  mesh, rules = sharding.make_mesh(cfg.mesh), [tuple(r) for r in cfg.sharding_rules]
  if explain_sharding:
    init_fn = lambda r: models.init_params(module, r)[0]
    st = train.abstract_train_state(init_fn, tx, mesh, rules, logical, labels)
    print(sharding.explain_sharding(st.params, opt_state=st.opt_state))
    return None
  state = train.train_state_from_params(params, tx, mesh, rules, logical, labels)
  del params
  if jax.process_index() == 0:
    model_io.write_model_json(workdir, args, task.HEAD, len(label_names), label_names,
                              tokenizer=tok_where, init_from=source or "random")
  bsh = sharding.batch_sharding(mesh, rules)
  evaluator = Evaluator(cfg.task, train.make_eval_step(task.make_predict_fn(module)), bsh, its,
                        label_names, cfg.data)
  step_fn = train.make_train_step(task.make_loss_fn(module), tx, labels=labels,
                                  accum_steps=cfg.optim.accum_steps, schedule=schedule,
                                  seed=cfg.seed)
  step_fn = peft.with_rank_metrics(step_fn)       # AdaLoRA: logs the kept rank per matrix
  fpt = _flops_per_token(args, abstract, labels, cfg.data.max_len)
  sizes = _state_sizes(state, labels)
  logging.info("trainable %d of %d parameters (%.3f%%); optimizer state %.1f MB",
               sizes["trainable_params"], sizes["params"], sizes["trainable_percent"],
               sizes["optimizer_state_bytes"] / 1e6)
  return _fit_and_report(cfg, workdir, state, step_fn, its, evaluator, bsh, num_steps, fpt,
                         sizes, t_start, adapter=(args, labels))


def _state_sizes(state, labels) -> dict:
  """Parameter counts (all, trainable) and optimizer-state bytes of a train state."""
  sizes = [(x.size, peft.is_trainable(l)) for x, l in zip(jax.tree.leaves(state.params),
                                                          jax.tree.leaves(labels))]
  total, trainable = sum(n for n, _ in sizes), sum(n for n, t in sizes if t)
  opt_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.opt_state))
  return dict(params=total, trainable_params=trainable,
              trainable_percent=100.0 * trainable / max(total, 1),
              optimizer_state_bytes=int(opt_bytes))


def _fit_and_report(cfg, workdir, state, step_fn, its, evaluator, bsh, num_steps, fpt, sizes,
                    t_start, adapter=None):
  """fit with dev evaluation, early stopping and checkpoints; then test and the output files.

  `adapter`: (model args, label tree); when some parameters are frozen, the best state's
  trainable leaves are also written to <workdir>/adapter (peft.save_adapter).
  """
  metric = DEV_METRIC[cfg.task]
  eval_every = cfg.train.eval_every or len(its["train"])  # 0: once per epoch
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.train.keep,
                                 best_metric=metric, best_mode="max",
                                 save_every=cfg.train.checkpoint_every or eval_every)
  start = ckpt.latest_step() or 0
  stopper = _resumed_early_stopping(cfg.train.patience, ckpt, metric, eval_every)
  eval_s = [0.0]

  def eval_fn(st):
    t = time.perf_counter()
    out = dict(evaluator(st, "validation")[0])
    out["stop"] = stopper.update(out[metric])
    eval_s[0] += time.perf_counter() - t
    return out
  tcfg = cfg.train.copy_and_resolve_references()
  tcfg.eval_every = eval_every
  t_fit = time.perf_counter()
  res = train.fit(state, step_fn, its["train"], tcfg, num_steps=num_steps, batch_sharding=bsh,
                  eval_fn=eval_fn, checkpointer=ckpt, logdir=workdir, flops_per_token=fpt)
  fit_s = time.perf_counter() - t_fit
  if res.preempted:
    ckpt.close()
    logging.warning("preempted: rerun the same command to resume from the checkpoint")
    return None
  final_step = int(res.state.step)
  state = _best_state(res.state, ckpt)
  best_step = int(state.step)
  ckpt.close()
  results = {s: evaluator(state, s) for s in ("validation", "test")}
  tokens = sum(r.get("tokens", 0.0) for r in res.history if r["kind"] == "train")
  train_s = max(fit_s - eval_s[0], 1e-9)
  steps_run = final_step - start
  train_block = dict(
      steps=final_step, steps_this_process=steps_run, epochs=final_step / len(its["train"]),
      early_stopped=res.early_stopped, best_step=best_step,
      wall_s=time.perf_counter() - t_start, fit_s=fit_s, eval_s=eval_s[0], train_s=train_s,
      examples_per_s=steps_run * cfg.data.batch_size / train_s, tokens_per_s=tokens / train_s,
      padding_fraction=data.padding_stats(its["train"])["padding_fraction"],
      median_step_s=_median_step_s(res.history),
      peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, **sizes)
  out = {"dev": results["validation"][0], "test": results["test"][0], "train": train_block,
         "workdir": os.path.abspath(workdir)}
  if adapter is not None:
    _save_adapter(workdir, state.params, *adapter)
  if jax.process_index() == 0:
    write_outputs(workdir, cfg, out, results, evaluator.label_names)
  logging.info("dev %s %.4f | test %s %.4f | %d steps, wall %.0f s", metric,
               out["dev"][metric], metric, out["test"][metric], final_step, train_block["wall_s"])
  return out


def _save_adapter(workdir, params, args, labels) -> None:
  """<workdir>/adapter: the trainable leaves of a run that froze some parameters (PEFT, probes);
  nothing for full fine-tuning (the checkpoints hold everything)."""
  lab = peft.flatten_paths(labels)
  if all(peft.is_trainable(l) for l in lab.values()):
    return
  keep = {p: v for p, v in peft.flatten_paths(params).items() if peft.is_trainable(lab[p])}
  if jax.process_count() > 1:   # every process joins the gather of the trainable leaves
    keep = multihost_utils.process_allgather(keep, tiled=True)
  params, labels = peft.unflatten_paths(keep), peft.unflatten_paths({p: lab[p] for p in keep})
  if jax.process_index() == 0:
    path = peft.save_adapter(os.path.join(workdir, "adapter"), params, labels, args)
    logging.info("trainable parameters only -> %s (peft.load_adapter onto the base model)", path)


def _median_step_s(history) -> float:
  """Median seconds per step over the logged training windows (NaN if none was timed)."""
  rates = [r["steps_per_s"] for r in history if r["kind"] == "train" and r.get("steps_per_s")]
  return float(1.0 / np.median(rates)) if rates else float("nan")


def _report(task_name, split, result, label_names, step) -> str:
  m, _, gold, pred = result
  head = f"== {split} (checkpoint at step {step}) =="
  if task_name == "ner":
    return "\n".join([
        head, "-- conlleval --", reporting.conlleval_summary(gold, pred),
        "-- entity level (seqeval, default mode) --",
        metrics.classification_report_entities(gold, pred),
        "-- token level (every word, including O) --",
        metrics.token_report(gold, pred, label_names)])
  return "\n".join([head, f"accuracy {m['accuracy']:.4f}",
                    metrics.token_report([gold], [pred], label_names)])


def _curves(workdir, metric) -> dict:
  rows = reporting.read_jsonl_history(os.path.join(workdir, "metrics.jsonl"))
  train_rows = [r for r in rows if r["kind"] == "train" and "loss" in r]
  eval_rows = [r for r in rows if r["kind"] == "eval" and metric in r]
  return {"train_loss": [(r["step"], r["loss"]) for r in train_rows],
          f"dev_{metric}": [(r["step"], r[metric]) for r in eval_rows]}


def write_outputs(workdir, cfg, out, results, label_names) -> None:
  """metrics.json, report.txt, test predictions and curves.png (atomic writes)."""
  step = out["train"]["best_step"]
  reporting.write_json_atomic(os.path.join(workdir, "metrics.json"),
                              dict(out, config=json.loads(cfg.to_json_best_effort())))
  report = "\n".join(_report(cfg.task, s, results[s], label_names, step)
                     for s in ("test", "validation"))
  reporting.write_text_atomic(os.path.join(workdir, "report.txt"), report)
  _, inputs, gold, pred = results["test"]
  if cfg.task == "ner":
    reporting.write_conll_predictions(os.path.join(workdir, "test_predictions.conll"), inputs,
                                      gold, pred)
  else:
    reporting.write_tsv_predictions(os.path.join(workdir, "test_predictions.tsv"), inputs, gold,
                                    pred)
  reporting.plot_curves(os.path.join(workdir, "curves.png"), _curves(workdir, DEV_METRIC[cfg.task]))
