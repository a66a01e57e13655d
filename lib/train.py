"""TrainState, sharded init, pure train/eval steps, the fit loop with its hooks."""

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from lib import optim, peft, sharding


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training. The dropout key is fold_in(key(seed), step)."""
  step: jax.Array       # () int32: optimizer steps taken
  params: Any           # full parameter tree (trainable and frozen)
  opt_state: Any        # optax state of the trainable parameters only


def default_config() -> ml_collections.ConfigDict:
  """The `train` sub-config.

  Fields:
    num_steps: optimizer steps; if 0, `epochs` * steps per epoch (see `num_train_steps`).
    epochs: used only when num_steps == 0.
    log_every: log train metrics (means over the window) every this many steps.
    eval_every: call the eval callback every this many steps (0: lib/experiment.py evaluates
      once per epoch; `fit` alone, only at the end).
    checkpoint_every: periodic saves, for `Checkpointer(save_every=...)` (0: lib/experiment.py
      saves at each evaluation; the end and preemption always save).
    keep: checkpoints to keep, for `Checkpointer(keep=...)`.
    peak_flops: peak FLOP/s of ONE device for model-FLOPs utilisation (0 = don't report MFU),
      e.g. 989e12 for an H100 SXM (bf16 dense), 197e12 for a TPU v5e chip.
  """
  return ml_collections.ConfigDict(dict(num_steps=1000, epochs=0, log_every=50, eval_every=0,
                                        checkpoint_every=1000, keep=3, peak_flops=0.0))


def num_train_steps(cfg, steps_per_epoch: Optional[int] = None) -> int:
  """`cfg.num_steps`, or `cfg.epochs * steps_per_epoch` when num_steps is 0."""
  if cfg.num_steps > 0:
    return int(cfg.num_steps)
  if cfg.get("epochs", 0) <= 0 or not steps_per_epoch:
    raise ValueError(f"train: set num_steps > 0, or epochs > 0 with steps_per_epoch "
                     f"(got num_steps={cfg.num_steps}, epochs={cfg.get('epochs')}, "
                     f"steps_per_epoch={steps_per_epoch})")
  return int(cfg.epochs * steps_per_epoch)


# ----------------------------------------------------------------------------- state init

def _init_state(init_fn, tx, labels, rng) -> TrainState:
  return _state_from(init_fn(rng), tx, labels)


def _state_from(params, tx, labels) -> TrainState:
  trainable = params if labels is None else peft.split_trainable(params, labels)[0]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(trainable))


def state_shardings(abstract_state: TrainState, mesh, rules, logical_specs) -> TrainState:
  """NamedSharding tree of a TrainState: params by their logical specs, optimizer state like
  its parameters, the step replicated."""
  ps = sharding.param_shardings(abstract_state.params, logical_specs, mesh, rules)
  os_ = sharding.opt_state_shardings(abstract_state.opt_state, abstract_state.params, ps, mesh)
  return TrainState(step=NamedSharding(mesh, P()), params=ps, opt_state=os_)


def abstract_train_state(init_fn, tx, mesh, rules, logical_specs, labels=None) -> TrainState:
  """ShapeDtypeStructs (with .sharding) of the state: the target of a checkpoint restore."""
  abstract = jax.eval_shape(functools.partial(_init_state, init_fn, tx, labels), jax.random.key(0))
  shard = state_shardings(abstract, mesh, rules, logical_specs)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shard)


def create_train_state(init_fn, rng, tx, mesh, rules, logical_specs, labels=None) -> TrainState:
  """Randomly initialised state, created directly in its shardings (never whole on one device).

  Args:
    init_fn: rng -> params (e.g. `lambda r: models.init_params(module, r)[0]`).
    rng: init key.
    tx: from `optim.make_optimizer`.
    mesh: from `sharding.make_mesh`.
    rules: logical-axis rules (the `sharding_rules` config).
    logical_specs: logical PartitionSpec tree of the params (from `models.init_params`).
    labels: label tree from `peft.label_params`; None = all trainable.
  """
  abstract = abstract_train_state(init_fn, tx, mesh, rules, logical_specs, labels)
  shard = jax.tree.map(lambda x: x.sharding, abstract)
  return jax.jit(functools.partial(_init_state, init_fn, tx, labels), out_shardings=shard)(rng)


def train_state_from_params(params, tx, mesh, rules, logical_specs, labels=None) -> TrainState:
  """State around given params (e.g. pretrained weights as host numpy), placed on the mesh.

  Every process must pass the same full `params`; each places only its own shards.
  """
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  ps = sharding.param_shardings(abstract, logical_specs, mesh, rules)
  placed = jax.tree.map(
      lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx, x=x: np.asarray(x)[idx]),
      params, ps)
  init = functools.partial(_state_from, tx=tx, labels=labels)
  shard = state_shardings(jax.eval_shape(init, placed), mesh, rules, logical_specs)
  return jax.jit(init, out_shardings=shard, donate_argnums=0)(placed)


# ----------------------------------------------------------------------------- pure steps

@flax.struct.dataclass
class Weights:
  """Parameters alone, for inference: what eval steps read (`state.params`), with no step or
  optimizer state (model_io.InferenceModel.weights)."""
  params: Any


def _batch_tokens(batch):
  if "input_mask" in batch:
    return batch["input_mask"].sum()
  return jnp.asarray(batch["input_ids"].size if "input_ids" in batch else 0, jnp.int32)


def make_train_step(loss_fn: Callable, tx, *, labels=None, accum_steps: int = 1,
                    schedule: Optional[Callable] = None, seed: int = 0) -> Callable:
  """Pure `train_step(state, batch) -> (state, metrics)`.

  Args:
    loss_fn: (params, batch, rng, train: bool) -> (scalar loss, metrics dict of scalars). A
      'weight' metric (the count the loss averages over) makes gradient accumulation exact for
      token-mean losses. Over micro-batches, integer metrics (counts) are summed and float
      metrics averaged (weighted by 'weight' if present).
    tx: from `optim.make_optimizer`, initialised on the trainable view (as `create_train_state`).
    labels: label tree (`peft.label_params`); only non-'freeze' params are differentiated and
      updated; frozen params pass through untouched. None = all trainable.
    accum_steps: micro-batches per step (`optim.accumulate_gradients`).
    schedule: step -> learning rate, reported as metrics['lr'].
    seed: dropout keys are fold_in(key(seed), step) (and fold_in(., micro-batch)).

  The returned metrics add 'loss', 'grad_norm' (global norm of the trainable gradients, before
  clipping), 'lr' and 'tokens' (sum of batch['input_mask']). Nothing is pulled to the host.
  """
  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    if labels is None:
      trainable, frozen = state.params, None
      merge = lambda t: t
    else:
      trainable, frozen = peft.split_trainable(state.params, labels)
      merge = lambda t: peft.merge_trainable(t, frozen)
    grad_fn = jax.value_and_grad(lambda t, b, r: loss_fn(merge(t), b, r, True), has_aux=True)
    (loss, metrics), grads = optim.accumulate_gradients(grad_fn, trainable, batch, rng,
                                                        accum_steps)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    params = merge(optax.apply_updates(trainable, updates))
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                   tokens=_batch_tokens(batch))
    if schedule is not None:
      metrics["lr"] = schedule(state.step)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics
  return train_step


def make_eval_step(eval_fn: Callable) -> Callable:
  """Pure `eval_step(state, batch) -> eval_fn(state.params, batch)`.

  eval_fn returns a dict of arrays: scalar metrics for `evaluate` (e.g.
  `lambda p, b: loss_fn(p, b, None, False)[1]`), or per-example outputs for `predict`.
  """
  return lambda state, batch: eval_fn(state.params, batch)


# ----------------------------------------------------------------------------- compiled steps

def jit_train_step(train_step: Callable, state: TrainState, batch_sharding) -> Callable:
  """train_step jitted for `state`'s shardings, donating the state (updated in place)."""
  shard = jax.tree.map(lambda x: x.sharding, state)
  return jax.jit(train_step, in_shardings=(shard, batch_sharding),
                 out_shardings=(shard, None), donate_argnums=(0,))


@functools.lru_cache(maxsize=32)
def _jit_eval(eval_step):
  return jax.jit(eval_step)


def to_host(tree):
  """Device arrays -> numpy; arrays spread over processes are gathered (a collective)."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(one, tree)


def predict(eval_step: Callable, state: TrainState, batches, batch_sharding) -> Iterator:
  """Yields (host batch, host outputs of eval_step) per batch (e.g. predictions for span F1)."""
  step = _jit_eval(eval_step)
  for batch in batches:
    yield batch, to_host(step(state, sharding.shard_batch(batch, batch_sharding)))


def evaluate(eval_step: Callable, state: TrainState, batches, batch_sharding) -> dict:
  """Aggregates eval_step's scalar metrics over batches (ints summed, floats weighted means)."""
  rows = [out for _, out in predict(eval_step, state, batches, batch_sharding)]
  return combine_metrics(rows)


def combine_metrics(rows: list) -> dict:
  """Integer metrics are counts (summed); float metrics are means, weighted by 'weight' if
  present, else equally."""
  if not rows:
    return {}
  w = np.array([float(r.get("weight", 1.0)) for r in rows])
  out = {}
  for k in rows[0]:
    v = np.array([r[k] for r in rows])
    is_count = np.issubdtype(v.dtype, np.integer) or k == "weight"
    out[k] = float(v.sum()) if is_count else float((v * w).sum() / max(w.sum(), 1e-30))
  return out


# ----------------------------------------------------------------------------- fit loop

@dataclasses.dataclass
class Hook:
  """A callback of `fit`: fn(state, step, eval_metrics) every `every` steps (0 = not by step)
  and/or after each evaluation (`at_eval`, with that evaluation's metrics; else None).
  `at_end` hooks are the run skeleton's (lib/experiment.py): called once with the reported state.
  Hooks run on every process (a hook that gathers must) and must not change the state."""
  fn: Callable
  every: int = 0
  at_eval: bool = False
  at_end: bool = False


class FitResult(NamedTuple):
  state: TrainState
  history: list         # logged rows (train windows and evals), as written to metrics.jsonl
  preempted: bool       # stopped by SIGTERM/SIGINT after saving a checkpoint
  early_stopped: bool   # stopped because eval_fn returned a true 'stop' (checkpoint saved)


def scalar_metrics(row: dict, prefix: str = "") -> tuple[dict, list]:
  """({name: float} of the numeric scalars in `row`, nested dicts as 'a/b'; [skipped names])."""
  out, skipped = {}, []
  for k, v in row.items():
    name = f"{prefix}{k}"
    if isinstance(v, dict):
      sub, sk = scalar_metrics(v, name + "/")
      out.update(sub)
      skipped += sk
    elif np.ndim(v) == 0 and np.issubdtype(np.asarray(v).dtype, np.number) or isinstance(v, bool):
      out[name] = float(v)
    else:
      skipped.append(name)
  return out, skipped


def _is_main() -> bool:
  return jax.process_index() == 0


class _Logger:
  """Console + TensorBoard + metrics.jsonl on process 0; throughput over each log window."""

  def __init__(self, logdir, num_steps, flops_per_token, peak_flops):
    self.num_steps, self.fpt, self.peak = num_steps, flops_per_token, peak_flops
    self.window, self.history, self.untimed = [], [], 0
    self.input_s = 0.0   # host time getting and placing batches since the clock started
    self.writer = self.jsonl = None
    if logdir and _is_main():
      import tensorboardX  # only the main process writes events
      os.makedirs(logdir, exist_ok=True)
      self.writer = tensorboardX.SummaryWriter(logdir)
      self.jsonl = open(os.path.join(logdir, "metrics.jsonl"), "a")
    self.reset_clock()

  def reset_clock(self):
    """Starts timing; metrics already in the window (the compiling first step) are not timed."""
    self.t0, self.untimed = time.perf_counter(), len(self.window)
    self.input_s = 0.0

  def pause(self, seconds: float):
    """Excludes time spent outside training steps (eval, checkpointing) from throughput."""
    self.t0 += seconds

  def add(self, metrics):
    self.window.append(metrics)

  def flush_train(self, step: int):
    """Pulls the window's metrics (one host sync) and logs their means and the throughput."""
    if not self.window:
      return
    rows = to_host(self.window)
    dt, timed = max(time.perf_counter() - self.t0, 1e-9), rows[self.untimed:]
    row = {k: float(np.mean([r[k] for r in rows])) for k in rows[-1]}
    row["lr"] = float(rows[-1].get("lr", np.nan))
    row["tokens"] = float(sum(r.get("tokens", 0) for r in rows))
    if timed:
      tokens = float(sum(r.get("tokens", 0) for r in timed))
      # input_frac: the share of the wall the loop spent reading and placing batches. Steps
      # dispatch asynchronously, so near 1 the loop is host-bound (the device waits for input).
      row.update(steps_per_s=len(timed) / dt, tokens_per_s=tokens / dt,
                 eta_s=(self.num_steps - step) * dt / len(timed),
                 input_frac=min(self.input_s / dt, 1.0))
      if self.fpt and self.peak:
        row["mfu"] = tokens / dt * self.fpt / (self.peak * jax.device_count())
    self.write(step, row, "train")
    self.window = []
    self.reset_clock()

  def write(self, step: int, row: dict, prefix: str):
    """Logs the numeric scalars of `row` (nested dicts flattened as 'a/b')."""
    row, skipped = scalar_metrics(row)
    if skipped and _is_main():
      logging.warning("%s step %d: %d non-numeric metrics not logged: %s", prefix, step,
                      len(skipped), skipped)
    self.history.append({"step": step, "kind": prefix, **row})
    if not _is_main():
      return row
    logging.info("%s step %d/%d | %s", prefix, step, self.num_steps,
                 " ".join(f"{k} {v:.5g}" for k, v in sorted(row.items())))
    if self.writer is not None:
      for k, v in row.items():
        self.writer.add_scalar(f"{prefix}/{k}", v, step)
      self.writer.flush()
      self.jsonl.write(json.dumps({"step": step, "kind": prefix, **row}) + "\n")
      self.jsonl.flush()
    return row

  def close(self):
    if self.writer is not None:
      self.writer.close()
      self.jsonl.close()


def _restore(state: TrainState, train_iter, checkpointer) -> TrainState:
  """The latest complete checkpoint onto `state`'s shardings (any mesh), and the data position.
  `state`'s buffers are freed first so that a restore never needs two states in memory."""
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  jax.tree.map(lambda x: x.delete(), state)
  restored = checkpointer.restore(abstract)
  if restored is None:  # every step was corrupt and has been set aside; a rerun starts afresh
    raise RuntimeError(f"no usable checkpoint in {checkpointer.directory} (corrupt steps were moved "
                       "aside); run again to start from scratch")
  state, data_state, _ = restored
  if data_state is not None and hasattr(train_iter, "set_state"):
    train_iter.set_state(data_state)
  else:
    logging.warning("resumed at step %d WITHOUT the data position (iterator has no set_state or "
                    "the checkpoint no data state): batches will repeat", int(state.step))
  logging.info("resumed from checkpoint at step %d", int(state.step))
  return state


def _due(step: int, every: int, last: int) -> bool:
  return step == last or (every > 0 and step % every == 0)


def fit(state: TrainState, train_step: Callable, train_iter, cfg, *, num_steps: int,
        batch_sharding, eval_fn: Optional[Callable] = None, checkpointer=None,
        logdir: Optional[str] = None, flops_per_token: float = 0.0,
        hooks: Sequence[Hook] = ()) -> FitResult:
  """Trains to `num_steps`, resuming from the latest checkpoint if there is one.

  Args:
    state: initial state (consumed: its buffers are donated to the step or freed on resume).
    train_step: pure step from `make_train_step` (jitted here, state donated).
    train_iter: iterator of process-local numpy batches (this process's rows of the global
      batch); with get_state()/set_state() the data position is checkpointed and restored.
    cfg: the `train` sub-config (log_every, eval_every, peak_flops).
    num_steps: total optimizer steps (`num_train_steps`).
    batch_sharding: from `sharding.batch_sharding`.
    eval_fn: state -> dict of host scalars (e.g. span F1), run every cfg.eval_every and at the end.
      A true 'stop' entry ends training there (early stopping; every process must agree).
    checkpointer: a `lib.checkpoint.Checkpointer`: saves on its `save_every` schedule (build it
      with save_every=cfg.checkpoint_every), at the last step and on SIGTERM/SIGINT (then fit
      returns with preempted=True); the eval metrics of the same step go along for best-by-metric.
      fit installs its preemption handler; the caller closes it (fit uninstalls it if it raises).
    logdir: TensorBoard events and metrics.jsonl (process 0).
    flops_per_token: for MFU (`lib.flops.model_flops_per_token`), with cfg.peak_flops.
    hooks: `Hook`s called after steps / evaluations (their `at_end` is not fit's business).

  Returns:
    FitResult(state, history, preempted, early_stopped). After a stop, the script should skip
    final work that the next (resumed) run will do anyway, and exit.
  """
  if checkpointer is not None:
    checkpointer.install_preemption_handler()
    if checkpointer.latest_step() is not None:
      state = _restore(state, train_iter, checkpointer)
  start = int(state.step)
  step_fn = jit_train_step(train_step, state, batch_sharding)
  log = _Logger(logdir, num_steps, flops_per_token, cfg.get("peak_flops", 0.0))
  stop = None
  try:
    for step in range(start + 1, num_steps + 1):
      t_in = time.perf_counter()
      batch = next(train_iter, None)
      if batch is None:  # keep what was trained: evaluate and save the previous step as the last
        logging.warning("data ran out after %d of %d steps", step - 1, num_steps)
        if step > start + 1:
          _after_step(state, step - 1, step - 1, cfg, log, train_iter, eval_fn, checkpointer,
                      hooks)
        break
      batch = sharding.shard_batch(batch, batch_sharding)
      log.input_s += time.perf_counter() - t_in
      state, metrics = step_fn(state, batch)
      log.add(metrics)
      if step == start + 1:  # compilation is not throughput
        jax.block_until_ready(metrics)
        log.reset_clock()
      stop = _after_step(state, step, num_steps, cfg, log, train_iter, eval_fn, checkpointer,
                         hooks)
      if stop:
        break
  except BaseException:
    if checkpointer is not None:   # a failed run gives Ctrl-C and SIGTERM back to their owners
      checkpointer.uninstall_preemption_handler()
    raise
  finally:
    log.close()
    if checkpointer is not None:
      checkpointer.wait()
  return FitResult(state, log.history, stop == "preempted", stop == "early_stop")


def _run_hooks(hooks, state, step: int, eval_metrics: Optional[dict]) -> None:
  for h in hooks:
    if (h.every > 0 and step % h.every == 0) or (h.at_eval and eval_metrics is not None):
      h.fn(state, step, eval_metrics if h.at_eval else None)


def _after_step(state, step, last, cfg, log, train_iter, eval_fn, checkpointer,
                hooks=()) -> Optional[str]:
  """Logging, eval and checkpointing after `step`; returns 'preempted', 'early_stop' or None."""
  stop = "preempted" if checkpointer is not None and checkpointer.preempted(step) else None
  if stop or _due(step, cfg.log_every, last):
    log.flush_train(step)
  will_eval = eval_fn is not None and _due(step, cfg.eval_every, last) and not stop
  if will_eval or (checkpointer is not None and (stop or step == last
                                                 or checkpointer.should_save(step))):
    # Steps still queued (async dispatch) are training time: finish them before the clock that
    # eval and saving are excluded by starts.
    jax.block_until_ready(state)
  t0, eval_metrics = time.perf_counter(), None
  if will_eval:
    eval_metrics = dict(eval_fn(state))
    if eval_metrics.pop("stop", False):
      stop = "early_stop"
    eval_metrics = log.write(step, eval_metrics, "eval")
  if hooks and stop != "preempted":
    _run_hooks(hooks, state, step, eval_metrics)
  if checkpointer is not None:
    # The Checkpointer's save_every decides periodic saves; the last step and stops force one.
    checkpointer.save(step, state, data_state=getattr(train_iter, "get_state", None),
                      metrics=eval_metrics, force=bool(stop) or step == last)
  if stop:
    logging.warning("%s at step %d%s; stopping", stop, step,
                    "" if checkpointer is None else " (checkpoint saved)")
  log.pause(time.perf_counter() - t0)
  return stop
