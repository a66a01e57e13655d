"""Supervised fine-tuning tasks (token and sequence classification): their data from the config, and
one evaluator that predicts a split on every process, gathers and scores the predictions, and
writes the report and prediction files through the task's own functions."""

import dataclasses
import os
from typing import Callable

import jax
import numpy as np

from lib import data, distributed, reporting, sharding, train


@dataclasses.dataclass
class Data:
  """A run's batch iterators (this process's shard) and what the skeleton needs to know of them."""
  train: object                  # training iterator (len = steps per epoch; get/set_state)
  evals: dict                    # split name -> evaluation iterator
  label_names: list              # class names (index = model output); [] for tasks without labels
  stats: dict = dataclasses.field(default_factory=dict)   # extras for metrics.json's train block
  fingerprint: str = ""          # identity of the data's content (recorded in the workdir)


def data_kwargs(data_cfg, split: str, batch_divisor: int = 1) -> dict:
  """The config's `data` block as `lib.data.from_config` keywords for one split.

  See `data.config_kwargs`; `max_train_examples` applies to the training split only.
  """
  d = data.config_kwargs(data_cfg, batch_divisor)
  n = d.pop("max_train_examples", 0)
  if split == "train" and n:
    d["max_examples"] = n
  return d


def _iterator(cfg, tokenizer, split: str, train_mode: bool, steps=None):
  d = data_kwargs(cfg.data, split, jax.process_count())
  if steps is not None:
    d["steps_per_epoch"] = steps
  return data.from_config(d, tokenizer, split, train=train_mode, shard_index=jax.process_index(),
                          shard_count=jax.process_count())


def make_data(cfg, tokenizer, workdir=None) -> Data:
  """Train, validation and test iterators of this process's shard; labels from the training data.

  With several processes every host must run the same number of steps: training takes the
  smallest shard's epoch, evaluation the largest (short shards are padded with dummy batches).
  """
  del workdir
  its = {"train": _iterator(cfg, tokenizer, "train", True)}
  its.update({s: _iterator(cfg, tokenizer, s, False) for s in ("validation", "test")})
  if jax.process_count() > 1:
    its["train"] = _iterator(cfg, tokenizer, "train", True,
                             distributed.agree_int(len(its["train"]), "min"))
    for s in ("validation", "test"):
      its[s] = _iterator(cfg, tokenizer, s, False, distributed.agree_int(len(its[s]), "max"))
  stats = {"padding_fraction": data.padding_stats(its["train"])["padding_fraction"]}
  return Data(its["train"], {s: its[s] for s in ("validation", "test")},
              list(its["train"].info["label_names"]), stats,
              data.source_of(data_kwargs(cfg.data, "train")).name)


@dataclasses.dataclass
class TaskOps:
  """What a supervised task module contributes to the evaluator.

  collect(batches, predictions, info, label_names) -> predicted labels (one per gold item)
  score(gold, predicted) -> {metric: value}
  report(split, result, label_names, step) -> text
  write_predictions(workdir, inputs, gold, predicted) -> None
  summary_metric: the metric named in the one-line summary
  """
  collect: Callable
  score: Callable
  report: Callable
  write_predictions: Callable
  summary_metric: str


class Evaluator:
  """Predicts a split with the current state and scores it against the gold data (all processes).

  dev(state) is what training calls; final(state) evaluates validation and test for metrics.json;
  write() writes report.txt and the test predictions. The last result per split is kept: the same
  step is not evaluated twice."""

  def __init__(self, ops: TaskOps, predict_fn, cfg, data_: Data, batch_sharding):
    self.ops, self.cfg, self.data, self.bsh = ops, cfg, data_, batch_sharding
    self.predict_step = train.make_eval_step(predict_fn)
    self.label_names = data_.label_names
    self._last, self._gold, self.results = {}, {}, {}

  def _local_predictions(self, state, split):
    """Predictions for this process's shard, as the task's collector returns them."""
    it = self.data.evals[split]
    pos = {e: i for i, e in enumerate(it.info["example_ids"])}  # global id -> shard position
    batches, preds = [], []
    for batch, p in train.predict(self.predict_step, state, it, self.bsh):
      start, stop = sharding.process_batch_range(self.bsh, len(p))  # this process's rows
      ids = np.array([pos.get(int(e), -1) for e in batch["example_ids"]])
      batches.append(dict(batch, example_ids=ids))
      preds.append(np.asarray(p)[start:stop])
    return self.ops.collect(batches, preds, it.info, self.label_names)

  def gold(self, split):
    """(inputs, gold label names) of the whole split (`data.read_gold`: named or own data)."""
    if split not in self._gold:
      self._gold[split] = data.read_gold(data_kwargs(self.cfg.data, split), split)
    return self._gold[split]

  def __call__(self, state, split: str):
    """(metrics, inputs, gold, predicted) of a split; predictions gathered from every process."""
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
    return self.ops.score(gold, pred), inputs, gold, pred

  def dev(self, state) -> dict:
    return dict(self(state, "validation")[0])

  def final(self, state, history=()) -> dict:
    """metrics.json blocks: {'dev': ..., 'test': ...} of `state` (the reported checkpoint)."""
    del history
    self.results = {s: self(state, s) for s in ("validation", "test")}
    self._step = int(state.step)
    return {"dev": self.results["validation"][0], "test": self.results["test"][0]}

  def write(self, workdir: str) -> None:
    """report.txt (test, then validation) and the test predictions of the last `final`."""
    report = "\n".join(self.ops.report(s, self.results[s], self.label_names, self._step)
                       for s in ("test", "validation"))
    reporting.write_text_atomic(os.path.join(workdir, "report.txt"), report)
    _, inputs, gold, pred = self.results["test"]
    self.ops.write_predictions(workdir, inputs, gold, pred)

  def summary(self, out: dict) -> str:
    m = self.ops.summary_metric
    return f"dev {m} {out['dev'][m]:.4f}  test {m} {out['test'][m]:.4f}"

  def curves(self, rows: list) -> dict:
    return metric_curves(rows, self.ops.summary_metric)


def metric_curves(rows: list, metric: str) -> dict:
  """curves.png's series of a run: the training loss and the dev `metric` by step."""
  train_rows = [r for r in rows if r["kind"] == "train" and "loss" in r]
  eval_rows = [r for r in rows if r["kind"] == "eval" and metric in r]
  return {"train_loss": [(r["step"], r["loss"]) for r in train_rows],
          f"dev_{metric}": [(r["step"], r[metric]) for r in eval_rows]}


def accuracy_summary(out: dict) -> str:
  """The one-line result of a run reporting dev and test accuracy."""
  return f"dev accuracy {out['dev']['accuracy']:.4f}  test accuracy {out['test']['accuracy']:.4f}"


def evaluator_factory(ops: TaskOps, make_predict_fn: Callable) -> Callable:
  """The `make_evaluator(run)` of a supervised task: its ops and predict function on the run's
  module, config, data and batch sharding."""
  return lambda run: Evaluator(ops, make_predict_fn(run.module), run.cfg, run.data, run.bsh)
