"""Continual learning: a task sequence in one model (each task its own block of output labels,
chosen by the task at train and test time), experience replay, EWC with a diagonal Fisher, the
accuracy matrix with average accuracy, backward transfer and forgetting, and its heatmap."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from lib import data, train
from lib.tasks import common, supervised

HEAD = "token_cls"        # every task scores positions: a sentence label sits on [CLS]
METRIC, MODE, RESTORE_BEST = "accuracy", "max", False


# ----------------------------------------------------------------------------- matrix metrics

def average_accuracy(r) -> float:
  """Mean accuracy over all tasks after the last one was learnt (the last row of R)."""
  return float(np.mean(np.asarray(r, float)[-1]))


def backward_transfer(r) -> float:
  """BWT (Lopez-Paz & Ranzato 2017): mean over j < T-1 of R[T-1, j] - R[j, j]; < 0 = forgetting."""
  r = np.asarray(r, float)
  t = len(r)
  return float(np.mean([r[-1, j] - r[j, j] for j in range(t - 1)])) if t > 1 else 0.0


def forgetting(r) -> float:
  """Average forgetting (Chaudhry et al. 2018): mean over j < T-1 of the best accuracy on task j
  before the last task (max over i < T-1 of R[i, j]) minus R[T-1, j]; undefined entries (NaN)
  are skipped."""
  r = np.asarray(r, float)
  t = len(r)
  if t < 2:
    return 0.0
  return float(np.mean([np.nanmax(r[:t - 1, j]) - r[-1, j] for j in range(t - 1)]))


def plot_heatmap(path: str, r, task_names, title: str) -> None:
  """R as a heatmap PNG: rows = after training on task i, columns = evaluated on task j."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  r = np.asarray(r, float)
  fig, ax = plt.subplots(figsize=(1.2 * len(task_names) + 2, 1.1 * len(task_names) + 1.5))
  ax.imshow(r, vmin=0, vmax=1, cmap="viridis")
  for (i, j), v in np.ndenumerate(r):
    ax.text(j, i, "-" if np.isnan(v) else f"{v:.3f}", ha="center", va="center", color="w")
  ax.set_xticks(range(len(task_names)), task_names)
  ax.set_yticks(range(len(task_names)), [f"after {n}" for n in task_names])
  ax.set(xlabel="evaluated on", title=title)
  fig.tight_layout()
  tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}.png")
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)


# ----------------------------------------------------------------------------- EWC

def diagonal_fisher(example_loss, params, rows, chunk: int = 8):
  """Empirical diagonal Fisher: the mean over examples of the squared gradient of each example's
  negative log-likelihood, per parameter (the gradients are jitted and vmapped over a chunk).

  Args:
    example_loss: (params, one example's arrays) -> scalar NLL of that example.
    params: the parameters (a pytree) at which the Fisher is taken.
    rows: a dict of arrays with a leading example axis (every row one example).
    chunk: examples per vmapped gradient call (memory: chunk x the parameters).

  Returns:
    a pytree like `params`, float32.
  """
  grad_sq = jax.jit(jax.vmap(lambda p, x: jax.tree.map(jnp.square, jax.grad(example_loss)(p, x)),
                             in_axes=(None, 0)))
  n = len(next(iter(rows.values())))
  total = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params)
  for s in range(0, n, chunk):
    g = grad_sq(params, {k: v[s:s + chunk] for k, v in rows.items()})
    total = jax.tree.map(lambda t, x: t + x.sum(0), total, g)
  return jax.tree.map(lambda t: t / n, total)


def ewc_penalty(params, anchors, lam: float):
  """lam / 2 * sum over previous tasks k of sum_i F_k,i (theta_i - theta*_k,i)^2.

  Args:
    params: the current parameters.
    anchors: [(fisher tree, anchor params tree)], one per previous task, both like `params`.
    lam: the penalty's strength.
  """
  total = 0.0
  # Anchors closed over by a jitted loss are constants: the barrier keeps XLA from spending
  # minutes constant-folding arithmetic on them at compile time.
  anchors = jax.lax.optimization_barrier(anchors)
  for fisher, anchor in anchors:
    terms = jax.tree.map(lambda f, p, a: (f * jnp.square(p.astype(jnp.float32) - a)).sum(),
                         fisher, params, anchor)
    total = total + sum(jax.tree.leaves(terms))
  return 0.5 * lam * total


# ----------------------------------------------------------------------------- one label space

def union_labels(label_lists: dict) -> tuple:
  """(names '<task>:<label>', {task: (lo, hi)}): each task's block of the shared output layer."""
  names, ranges = [], {}
  for task, labels in label_lists.items():
    ranges[task] = (len(names), len(names) + len(labels))
    names += [f"{task}:{n}" for n in labels]
  return names, ranges


def to_union(batch: dict, lo: int, hi: int) -> dict:
  """A task's batch in the shared label space: `labels` (B, T) offset by `lo` (a sentence label on
  position 0, padding rows -1), and the row's label block `label_lo`, `label_hi` (B,)."""
  ids = np.asarray(batch["input_ids"])
  if "label" in batch:          # sequence classification
    labels = np.full(ids.shape, -1, np.int32)
    ok = np.asarray(batch["example_ids"]) >= 0 if "example_ids" in batch else True
    labels[:, 0] = np.where(ok, np.asarray(batch["label"]) + lo, -1)
  else:
    lab = np.asarray(batch["labels"])
    labels = np.where(lab >= 0, lab + lo, -1).astype(np.int32)
  b = len(ids)
  return dict(input_ids=ids, input_mask=np.asarray(batch["input_mask"]),
              token_type_ids=np.asarray(batch["token_type_ids"]), labels=labels,
              label_lo=np.full(b, lo, np.int32), label_hi=np.full(b, hi, np.int32))


def concat_rows(a: dict, b: dict, pad_id: int) -> dict:
  """Rows of `b` appended to `a`, both padded to the longer length (labels -1, mask 0)."""
  t = max(a["input_ids"].shape[1], b["input_ids"].shape[1])
  pad = dict(input_ids=pad_id, input_mask=0, token_type_ids=0, labels=-1)

  def fit(x, k):
    if x.ndim == 1 or x.shape[1] == t:
      return x
    return np.pad(x, ((0, 0), (0, t - x.shape[1])), constant_values=pad[k])
  return {k: np.concatenate([fit(a[k], k), fit(b[k], k)]) for k in a}


class UnionIterator:
  """A task's batch iterator mapped into the shared label space, with replayed rows from a
  buffer appended to each batch (`replay_rows` > 0); resumable (get/set_state)."""

  def __init__(self, it, lo, hi, pad_id, buffer=None, replay_rows=0, seed=0):
    self.it, self.lo, self.hi, self.pad_id = it, lo, hi, pad_id
    self.buffer, self.replay_rows, self.seed = buffer, replay_rows, seed
    self.info = getattr(it, "info", {})

  def __len__(self):
    return len(self.it)

  def __iter__(self):
    iter(self.it)
    return self

  def __next__(self):
    batch = to_union(next(self.it), self.lo, self.hi)
    if self.buffer and self.replay_rows:
      step = self.it.get_state()["epoch"] * len(self.it) + self.it.get_state()["index"]
      rng = np.random.default_rng((self.seed, step))
      pick = rng.choice(len(self.buffer), self.replay_rows, replace=len(self.buffer) <
                        self.replay_rows)
      batch = concat_rows(batch, stack_rows([self.buffer[i] for i in pick], self.pad_id),
                          self.pad_id)
    return batch

  def get_state(self):
    return self.it.get_state()

  def set_state(self, state):
    self.it.set_state(state)


def stack_rows(rows, pad_id):
  """One batch of single-example rows of different lengths (padded to the longest)."""
  out = rows[0]
  for r in rows[1:]:
    out = concat_rows(out, r, pad_id)
  return out


def fill_buffer(it, lo, hi, n: int) -> list:
  """The first `n` rows (one example each, in the shuffled epoch-0 order) of a training iterator
  in the shared label space: a task's share of the replay buffer."""
  rows, state = [], it.get_state()
  it.reset()
  while len(rows) < n:
    batch = to_union(next(it), lo, hi)
    rows += [{k: v[i:i + 1] for k, v in batch.items()} for i in range(len(batch["input_ids"]))]
  it.set_state(state)
  return rows[:n]


# ----------------------------------------------------------------------------- the task

def mask_logits(logits, lo, hi):
  """Logits outside each row's label block set to a large negative: (B, T, C), (B,), (B,)."""
  c = jnp.arange(logits.shape[-1])
  allowed = (c >= lo[:, None]) & (c < hi[:, None])                      # (B, C)
  return jnp.where(allowed[:, None, :], logits, jnp.asarray(-1e9, logits.dtype))


def make_loss(module, cfg=None):
  """loss_fn(params, batch, rng, train) -> (cross-entropy in each row's label block, metrics)."""
  del cfg

  def loss_fn(params, batch, rng, train_mode):
    out, _ = common.apply_model(module, params, batch, rng, train_mode)
    logits = mask_logits(out["logits"], batch["label_lo"], batch["label_hi"])
    loss, correct, count = common.masked_cross_entropy(logits, batch["labels"])
    return loss, {"loss": loss, "accuracy": correct / count.clip(1)}
  return loss_fn


def example_nll(module):
  """(params, one example's arrays (T,)) -> summed NLL of its labels (for the Fisher)."""
  def nll(params, row):
    batch = {k: v[None] for k, v in row.items()}
    out, _ = common.apply_model(module, params, batch)
    logits = mask_logits(out["logits"], batch["label_lo"], batch["label_hi"])
    loss, _, count = common.masked_cross_entropy(logits, batch["labels"])
    return loss * count
  return nll


def accuracy_step(module):
  """eval step: correct and scored positions of a batch (integer counts: summed by evaluate)."""
  def step(params, batch):
    out, _ = common.apply_model(module, params, batch)
    logits = mask_logits(out["logits"], batch["label_lo"], batch["label_hi"])
    valid = batch["labels"] >= 0
    return {"correct": ((jnp.argmax(logits, -1) == batch["labels"]) & valid).sum(),
            "count": valid.sum()}
  return train.make_eval_step(step)


def task_block(cfg, dataset: str) -> dict:
  """The data block of one task of the sequence: the run's data settings on `dataset`,
  subsampled by config.continual.max_train_examples / max_eval_examples, padded to the lengths
  config.continual.buckets (empty: multiples of 16; few lengths = few compilations on a CPU)."""
  d = cfg.data
  block = dict(dataset=dataset, dir=d.dir, cache_dir=d.cache_dir, max_len=d.max_len,
               batch_size=d.batch_size, eval_batch_size=d.eval_batch_size,
               max_train_examples=cfg.continual.max_train_examples,
               max_eval_examples=cfg.continual.max_eval_examples)
  if cfg.continual.get("buckets"):
    block["buckets"] = tuple(cfg.continual.buckets)
  return block


def iterator(cfg, dataset, tokenizer, split, train_mode):
  return data.from_config(supervised.data_kwargs(task_block(cfg, dataset), split), tokenizer,
                          split, train=train_mode)


class Stage:
  """Stage `index` of config.continual.tasks as a task (the lib/tasks interface): trains on its
  task (plus replayed rows of the earlier ones), evaluates every task of the sequence."""
  HEAD, METRIC, MODE, RESTORE_BEST = HEAD, METRIC, MODE, RESTORE_BEST
  make_loss = staticmethod(make_loss)

  def __init__(self, index: int, names: list, ranges: dict, replay_percent: float = 0.0,
               replay_rows: int = 0):
    self.index, self.names, self.ranges = index, names, ranges
    self.replay_percent, self.replay_rows = replay_percent, replay_rows

  def make_data(self, cfg, tokenizer, workdir=None) -> supervised.Data:
    del workdir
    specs, pad = [tuple(t) for t in cfg.continual.tasks], tokenizer.pad_token_id
    name, dataset = specs[self.index]
    buffer = []
    for old, old_ds in specs[:self.index] if self.replay_percent > 0 else ():
      it = iterator(cfg, old_ds, tokenizer, "train", True)
      n = max(1, round(self.replay_percent / 100 * len(it.info["example_ids"])))
      buffer += fill_buffer(it, *self.ranges[old], n)
    train_it = UnionIterator(iterator(cfg, dataset, tokenizer, "train", True),
                             *self.ranges[name], pad, buffer, self.replay_rows, cfg.seed)
    evals = {"validation": UnionIterator(iterator(cfg, dataset, tokenizer, "validation", False),
                                         *self.ranges[name], pad)}
    for t, ds in specs:
      evals[t] = UnionIterator(iterator(cfg, ds, tokenizer, "test", False), *self.ranges[t], pad)
    return supervised.Data(train_it, evals, self.names, {"replay_buffer_rows": len(buffer)},
                           f"stage{self.index}-{name}")

  def make_evaluator(self, run):
    return StageEvaluator(run, [tuple(t)[0] for t in run.cfg.continual.tasks], self.index)


class StageEvaluator:
  """Accuracy (scored positions) of the current task on its dev subsample during training; of
  every task on its test subsample at the end (a row of the accuracy matrix)."""

  def __init__(self, run, tasks, index):
    self.run, self.tasks, self.index = run, tasks, index
    self.step = accuracy_step(run.module)
    self.row = {}

  def accuracy(self, state, split) -> float:
    m = train.evaluate(self.step, state, self.run.data.evals[split], self.run.bsh)
    return m["correct"] / max(m["count"], 1)

  def dev(self, state) -> dict:
    return {"accuracy": self.accuracy(state, "validation")}

  def final(self, state, history=()) -> dict:
    del history
    self.row = {t: self.accuracy(state, t) for t in self.tasks}
    return {"dev": self.dev(state), "test": dict(self.row)}

  def write(self, workdir: str) -> None:
    from lib import reporting  # pylint: disable=g-import-not-at-top
    text = "".join(f"{t}\t{a:.4f}\n" for t, a in self.row.items())
    reporting.write_text_atomic(os.path.join(workdir, "report.txt"),
                                f"after task {self.tasks[self.index]}: test accuracy\n{text}")

  def summary(self, out: dict) -> str:
    return " ".join(f"{t} {a:.4f}" for t, a in out["test"].items())

  def curves(self, rows: list) -> dict:
    return {"train_loss": [(r["step"], r["loss"]) for r in rows
                           if r["kind"] == "train" and "loss" in r]}


# ----------------------------------------------------------------------------- the sequence

METHODS = ("naive", "replay", "ewc", "lora")


def _stage_config(cfg, method):
  c = cfg.copy_and_resolve_references()
  if method == "lora":     # the classifier and LoRA on the attention projections; the rest frozen
    c.peft.rules = tuple(tuple(r) for r in cfg.continual.lora_rules)
    c.optim.lr = cfg.continual.lora_lr
  return c


def _ewc_loss(module, anchors, lam):
  base = make_loss(module)

  def loss_fn(params, batch, rng, train_mode):
    loss, metrics = base(params, batch, rng, train_mode)
    penalty = ewc_penalty(params, anchors, lam)
    return loss + penalty, dict(metrics, ewc_penalty=penalty)
  return loss_fn


def _fisher(cfg, stage_wd, dataset, lo, hi, num_labels, tokenizer):
  """(Fisher, anchor params) of a finished stage, on its first config.continual.fisher_examples
  training examples (float32 trees, on the default device)."""
  from lib import model_io, models  # pylint: disable=g-import-not-at-top
  loaded = model_io.load_model(stage_wd, HEAD, num_labels)
  module = models.build(loaded.args, HEAD, num_labels)
  rows = fill_buffer(iterator(cfg, dataset, tokenizer, "train", True), lo, hi,
                     cfg.continual.fisher_examples)
  params = jax.tree.map(jnp.asarray, loaded.params)
  return diagonal_fisher(example_nll(module), params, stack_rows(rows, tokenizer.pad_token_id),
                         cfg.continual.fisher_chunk), params


def run_sequence(cfg, method: str, workdir: str) -> dict:
  """Trains the task sequence with `method` (one skeleton run per stage in <workdir>/<i>_<task>;
  finished stages are read back) and returns the accuracy matrix and its metrics.

  naive/replay/ewc: each stage starts from the previous stage's model. lora: each stage trains its
  own adapter and label block from the base model; task j is always routed to adapter j, which no
  later stage changes, so R[i, j] (i > j) is adapter j's measured accuracy R[j, j].
  """
  from lib import experiment, model_io  # pylint: disable=g-import-not-at-top
  if method not in METHODS:
    raise ValueError(f"config.continual.methods: unknown {method!r}; valid: {list(METHODS)}")
  specs = [tuple(t) for t in cfg.continual.tasks]
  tokenizer, _ = model_io.load_tokenizer(cfg.model.init_from, "bert", cfg.data.dir)
  names, ranges = union_labels({t: data.label_names_of(ds, cfg.data.dir) for t, ds in specs})
  c, prev, anchors, rows, trainable = _stage_config(cfg, method), cfg.model.init_from, [], [], []
  for i, (task, dataset) in enumerate(specs):
    wd = os.path.join(workdir, f"{i}_{task}")
    stage = Stage(i, names, ranges, cfg.continual.replay_percent if method == "replay" else 0,
                  cfg.continual.replay_rows)
    out = _read_metrics(wd)
    if out is None:
      run = experiment.setup(c, wd, stage, source=cfg.model.init_from if method == "lora" else prev)
      ev = stage.make_evaluator(run)
      loss = _ewc_loss(run.module, anchors, cfg.continual.ewc_lambda) if anchors else None
      fitted = experiment.fit(run, ev, loss_fn=loss)
      if fitted is None:
        raise RuntimeError(f"{wd}: preempted; rerun to resume")
      out = experiment.finish(run, ev, fitted)
    rows.append([out["test"][t] for t, _ in specs])
    trainable.append(out["train"]["trainable_params"])
    if method == "ewc" and i < len(specs) - 1:
      anchors.append(_fisher(c, wd, dataset, *ranges[task], len(names), tokenizer))
    prev = wd
  r = np.array(rows)
  if method == "lora":
    r = np.array([[r[j, j] if j <= i else np.nan for j in range(len(specs))]
                  for i in range(len(specs))])
  return dict(method=method, tasks=[t for t, _ in specs], matrix=r.tolist(),
              average_accuracy=average_accuracy(r), backward_transfer=backward_transfer(r),
              forgetting=forgetting(r), trainable_params_per_stage=trainable)


def _read_metrics(workdir):
  import json  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "metrics.json")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)
