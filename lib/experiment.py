"""The run skeleton: `setup` turns a config, a task and a model source into a ready `Run`
(tokenizer, data, model, PEFT, optimizer, mesh, sharded state, the workdir's record); `fit` owns
checkpoints, evaluation timing, early stopping, preemption, hooks and the train block;
`finish` writes metrics.json, the task's reports and curves.png. lib/finetune.py,
lib/pretrain.py and every new experiment are short compositions of these three."""

import dataclasses
import json
import os
import resource
import time
from typing import Optional, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from lib import (adversarial, checkpoint, config_check, errors, flops, model_io, models, optim,
                 peft, reporting, sharding, train, tree)
from lib.train import Hook

# What a workdir records of its run (model.json) and a rerun must match before resuming.
# Runtime switches (compute dtype, rematerialisation) may change between runs.
RUNTIME_ARGS = ("dtype", "remat")


class ResumeMismatchError(errors.UserError, ValueError):
  """A rerun of a workdir with a config that differs from what the workdir was trained with."""


@dataclasses.dataclass
class Run:
  """Everything a run is made of, built by `setup`; experiments read what they need from it."""
  cfg: object
  workdir: str
  task: object
  tokenizer: object
  data: object                 # lib.tasks.supervised.Data
  args: models.ModelArgs
  module: object
  abstract: object             # parameter ShapeDtypeStructs
  labels: object               # lib/peft label tree (train / freeze / groups)
  spec: object                 # lib/peft Spec
  num_steps: int
  tx: object
  schedule: object
  mesh: object
  rules: list
  bsh: object                  # batch sharding
  state: Optional[train.TrainState]
  flops_per_token: float
  sizes: dict
  t_start: float
  source: str


# ----------------------------------------------------------------------------- setup

def model_source(cfg, source: Optional[str] = None, preset_args=None):
  """(source, ModelArgs or None): the one place that decides "preset vs init_from".

  `preset_args` (the config's preset) means a random init of that architecture; else the model
  is loaded from `source` (default cfg.model.init_from: a HF dir, 'minilm', our model dir, a run
  workdir, optionally @best/@latest/@<step>).
  """
  if preset_args is not None:
    return "", preset_args
  source = cfg.model.init_from if source is None else source
  if not source:
    raise errors.ConfigError("config.model.init_from is empty and no config.model.preset is set: "
                             "set one of them")
  return source, None


def _overrides(cfg) -> dict:
  out = dict(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, remat=cfg.model.remat)
  if cfg.model.dropout_rate >= 0:
    out.update(dropout_rate=cfg.model.dropout_rate, attention_dropout_rate=cfg.model.dropout_rate)
  return out


def load_model(cfg, source, preset_args, head, num_labels, tokenizer):
  """(ModelArgs, host params or None for a random init made later in its shardings, origin:
  'random' or the source pinned to the checkpoint step it was loaded from)."""
  if preset_args is not None:
    pad = getattr(tokenizer, "pad_token_id", None)
    args = dataclasses.replace(preset_args, vocab_size=len(tokenizer),
                               pad_token_id=preset_args.pad_token_id if pad is None else pad,
                               **_overrides(cfg))
    logging.info("random init (seed %d) of %s", cfg.seed, args)
    return args, None, "random"
  loaded = model_io.load_model(source, head, num_labels, rng=jax.random.key(cfg.seed),
                               overrides=_overrides(cfg))
  if loaded.args.vocab_size < len(tokenizer):
    raise errors.ConfigError(f"config.model.init_from={source!r} has vocab_size "
                             f"{loaded.args.vocab_size} < {len(tokenizer)} tokens of its tokenizer")
  return loaded.args, loaded.params, model_io.pinned(source, loaded.step)


def _with_peft(spec, args, params, head, num_labels, seed):
  """The model args of the config's PEFT spec and the parameters it adds (freshly initialised)."""
  peft_args = peft.configure(args, spec)
  if peft_args == args or params is None:
    return peft_args, params
  module = models.build(peft_args, head, num_labels)
  rng = jax.random.fold_in(jax.random.key(seed), 1)
  return peft_args, peft.add_params(params, module, rng)


def _tokenizer(cfg, task, workdir, source, preset_args):
  arch = preset_args.arch if preset_args is not None else model_io.describe(source).arch
  if getattr(task, "ARCH", arch) != arch:
    raise errors.ConfigError(f"config task needs a {task.ARCH!r} model; the model is {arch!r}")
  if hasattr(task, "load_tokenizer"):
    return task.load_tokenizer(cfg, workdir, arch)
  return model_io.load_tokenizer(source, arch, cfg.data.dir, cfg.model.tokenizer)


def setup(cfg, workdir: str, task, *, source: Optional[str] = None, preset_args=None,
          explain_sharding: bool = False) -> Optional[Run]:
  """Builds a run; resuming a workdir is refused, before anything is written, if it differs.

  Args:
    cfg: the experiment's config (model, data, optim, train, mesh, sharding_rules, peft blocks).
    workdir: outputs and checkpoints; an existing run there is resumed by `fit`.
    task: a lib/tasks module or any object with that interface.
    source: the model to start from (default cfg.model.init_from).
    preset_args: random init of this architecture instead of a source.
    explain_sharding: print the per-parameter sharding table and return None.
  """
  t_start = time.perf_counter()
  config_check.validate_run(cfg, model_args=preset_args)   # before anything is loaded or written
  source, preset_args = model_source(cfg, source, preset_args)
  tokenizer, tok_where = _tokenizer(cfg, task, workdir, source, preset_args)
  data = task.make_data(cfg, tokenizer, workdir)
  args, params, origin = load_model(cfg, source, preset_args, task.HEAD, len(data.label_names),
                                    tokenizer)
  spec = peft.spec_from_config(cfg.peft)
  args, params = _with_peft(spec, args, params, task.HEAD, len(data.label_names), cfg.seed)
  module = models.build(args, task.HEAD, len(data.label_names))
  abstract, logical = models.abstract_params(module)
  labels = peft.label_params(abstract, [tuple(r) for r in cfg.peft.rules])
  _check_groups(spec, cfg)
  num_steps = train.num_train_steps(cfg.train, len(data.train))
  tx, schedule = optim.make_optimizer(cfg.optim, labels, num_steps)
  tx = peft.wrap_optimizer(tx, spec, num_steps)   # AdaLoRA's rank budget; else tx unchanged
  mesh, rules = sharding.make_mesh(cfg.mesh), [tuple(r) for r in cfg.sharding_rules]
  config_check.validate(cfg, max_positions=args.max_len,
                        data_parallel=config_check.data_parallel_size(mesh, rules))
  init_fn = lambda r: models.init_params(module, r)[0]
  if explain_sharding:
    st = train.abstract_train_state(init_fn, tx, mesh, rules, logical, labels)
    print(sharding.explain_sharding(st.params, opt_state=st.opt_state))
    return None
  record = _record(cfg, args, task, data, tok_where, origin)
  check_resume(workdir, record)                   # before anything is written
  if params is not None:
    state = train.train_state_from_params(params, tx, mesh, rules, logical, labels)
  else:
    state = train.create_train_state(init_fn, jax.random.key(cfg.seed), tx, mesh, rules,
                                     logical, labels)
  del params
  if jax.process_index() == 0:
    write_record(workdir, record)
  fpt = flops.model_flops_per_token(args, abstract, cfg.data.max_len, labels,
                                    getattr(task, "head_fraction", lambda c: None)(cfg))
  sizes = state_sizes(state, labels)
  logging.info("trainable %d of %d parameters (%.3f%%); optimizer state %.1f MB",
               sizes["trainable_params"], sizes["params"], sizes["trainable_percent"],
               sizes["optimizer_state_bytes"] / 1e6)
  return Run(cfg, workdir, task, tokenizer, data, args, module, abstract, labels, spec,
             num_steps, tx, schedule, mesh, rules, sharding.batch_sharding(mesh, rules), state,
             fpt, sizes, t_start, source)


def _check_groups(spec, cfg) -> None:
  """A rule method that is no PEFT method names an optimizer group: it must have an lr_mult
  (else it is most likely a typo, e.g. 'lorax', that would silently train the parameters)."""
  groups = sorted({m.label for _, m in spec.rules if m.label not in peft.METHODS})
  missing = [g for g in groups if g not in cfg.optim.get("lr_mult", {})]
  if missing:
    raise errors.ConfigError(
        f"config.peft.rules: {missing} are neither PEFT methods (valid: {sorted(peft.METHODS)}) "
        "nor optimizer groups with a config.optim.lr_mult entry")


def state_sizes(state, labels) -> dict:
  """Parameter counts (all, trainable) and optimizer-state bytes of a train state."""
  sizes = [(x.size, peft.is_trainable(l)) for x, l in zip(jax.tree.leaves(state.params),
                                                          jax.tree.leaves(labels))]
  total, trainable = sum(n for n, _ in sizes), sum(n for n, t in sizes if t)
  opt_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.opt_state))
  return dict(params=total, trainable_params=trainable,
              trainable_percent=100.0 * trainable / max(total, 1),
              optimizer_state_bytes=int(opt_bytes))


# ----------------------------------------------------------------------------- the workdir record

def _record(cfg, args, task, data, tok_where, origin) -> dict:
  """model.json of this run: the model (args, head, labels), tokenizer, source, data, PEFT."""
  d = cfg.data
  skip = ("dir", "cache_dir", "batch_size", "eval_batch_size", "eval_batches", "max_eval_examples")
  fingerprint = {k: d[k] for k in sorted(d.keys()) if k not in skip}
  if data.fingerprint:
    fingerprint["content"] = data.fingerprint
  return dict(args=dataclasses.asdict(args), head=task.HEAD, num_labels=len(data.label_names),
              label_names=list(data.label_names), tokenizer=tok_where,
              init_from=origin, task=getattr(task, "__name__", type(task).__name__),
              data=json.loads(json.dumps(fingerprint, default=str)),
              peft=dict(rules=[list(r) for r in cfg.peft.rules], options=list(cfg.peft.options)))


def _comparable(body: dict) -> dict:
  """A model.json body as check_resume compares it: model args (named 'model') without the
  runtime switches."""
  out = dict(body)
  out["model"] = {k: v for k, v in out.pop("args", {}).items() if k not in RUNTIME_ARGS}
  return json.loads(json.dumps(out))


def record_diffs(old: dict, new: dict, prefix: str = "") -> list:
  """'key: old -> new' (nested keys dotted) for every value both records hold that differs;
  keys only one side has are not compared: a run made before a field existed stays usable."""
  out = []
  for k in sorted(set(old) & set(new)):
    a, b = old[k], new[k]
    if isinstance(a, dict) and isinstance(b, dict):
      out += record_diffs(a, b, f"{prefix}{k}.")
    elif a != b:
      out.append(f"{prefix}{k}: {_short(a)} -> {_short(b)}")
  return out


def check_resume(workdir: str, record: dict) -> None:
  """Raises ResumeMismatchError if `workdir` holds a run whose record differs from `record`
  (one line: what differs). Label names are compared, not only their count."""
  path = os.path.join(workdir, model_io.MODEL_JSON)
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    diffs = record_diffs(_comparable(json.load(f)), _comparable(record))
  if diffs:
    raise ResumeMismatchError(
        f"{path}: this workdir was trained with a different configuration ({'; '.join(diffs)}); "
        "nothing was changed: use a new --workdir, or move this one aside to start over")


def _short(value) -> str:
  text = json.dumps(value)
  return text if len(text) <= 120 else text[:117] + "..."


def write_record(workdir: str, record: dict) -> None:
  """model.json, unless the workdir already holds the same record (it is then left untouched)."""
  if os.path.exists(os.path.join(workdir, model_io.MODEL_JSON)):
    return      # check_resume found it equal up to runtime switches: keep the original bytes
  body = dict(record)
  args = models.ModelArgs(**body.pop("args"))
  model_io.write_model_json(workdir, args, **body)


# ----------------------------------------------------------------------------- fit

@dataclasses.dataclass
class FitOutput:
  """A finished fit: the reported state (best or final), the history and the train block."""
  state: object
  history: list
  train: dict


class EarlyStopping:
  """Dev-metric tracker: 'stop' after `patience` evaluations without improvement (0 = never)."""

  def __init__(self, patience: int, mode: str = "max", best: Optional[float] = None,
               since_best: int = 0):
    self.patience, self.sign, self.best, self.since_best = (
        patience, 1.0 if mode == "max" else -1.0, best, since_best)

  def update(self, value: float) -> bool:
    if self.best is None or self.sign * value > self.sign * self.best:
      self.best, self.since_best = value, 0
    else:
      self.since_best += 1
    return self.patience > 0 and self.since_best >= self.patience


def _resumed_early_stopping(patience, mode, ckpt, metric, eval_every) -> EarlyStopping:
  """Tracker state rebuilt from the checkpoints' metrics, so a resumed run stops where it would."""
  best_step, latest = ckpt.best_step(), ckpt.latest_step()
  if best_step is None:
    return EarlyStopping(patience, mode)
  best = float(ckpt._metrics(best_step)[metric])  # pylint: disable=protected-access
  return EarlyStopping(patience, mode, best, (latest - best_step) // max(eval_every, 1))


def _peak_flops(cfg) -> float:
  """cfg.train.peak_flops, or (< 0) the measured FLOP/s of a large matmul in the compute dtype."""
  if cfg.train.peak_flops >= 0:
    return float(cfg.train.peak_flops)
  peak = flops.matmul_peak(1024, cfg.model.dtype)
  logging.info("MFU is relative to the measured %s matmul peak: %.1f GFLOP/s per device",
               cfg.model.dtype, peak / 1e9)
  return peak


def fit(run: Run, evaluator, hooks: Sequence[Hook] = (), loss_fn=None) -> Optional[FitOutput]:
  """Trains `run` with evaluation (evaluator.dev), early stopping, checkpoints and hooks.

  Returns None when preempted (a checkpoint was saved: rerun to resume); else the reported
  state (the best checkpoint when the task's RESTORE_BEST, with fallback past damaged ones) after
  the `at_end` hooks have run on it.
  """
  cfg, task = run.cfg, run.task
  if loss_fn is None:   # config.adversarial (FGM/PGD/FreeLB) wraps the task's loss, here only
    loss_fn = adversarial.from_config(task.make_loss(run.module, cfg), cfg, run.args.hidden_size,
                                      run.labels)
  step_fn = train.make_train_step(loss_fn, run.tx,
                                  labels=run.labels, accum_steps=cfg.optim.accum_steps,
                                  schedule=run.schedule, seed=cfg.seed)
  step_fn = peft.with_rank_metrics(step_fn)       # AdaLoRA: logs the kept rank per matrix
  eval_every = cfg.train.eval_every or len(run.data.train)  # 0: once per epoch
  ckpt = checkpoint.Checkpointer(os.path.join(run.workdir, "checkpoints"), keep=cfg.train.keep,
                                 best_metric=task.METRIC, best_mode=task.MODE,
                                 save_every=cfg.train.checkpoint_every or eval_every)
  start = ckpt.latest_step() or 0
  stopper = _resumed_early_stopping(cfg.train.get("patience", 0), task.MODE, ckpt, task.METRIC,
                                    eval_every)
  eval_s = [0.0]

  def eval_fn(st):
    t = time.perf_counter()
    out = dict(evaluator.dev(st))
    out["stop"] = stopper.update(out[task.METRIC])
    eval_s[0] += time.perf_counter() - t
    return out
  tcfg = cfg.train.copy_and_resolve_references()
  tcfg.eval_every, tcfg.peak_flops = eval_every, _peak_flops(cfg)
  t_fit = time.perf_counter()
  res = train.fit(run.state, step_fn, run.data.train, tcfg, num_steps=run.num_steps,
                  batch_sharding=run.bsh, eval_fn=eval_fn, checkpointer=ckpt, logdir=run.workdir,
                  flops_per_token=run.flops_per_token, hooks=[h for h in hooks if not h.at_end])
  fit_s = time.perf_counter() - t_fit
  run.state = None                                 # donated to the step
  if res.preempted:
    ckpt.close()
    logging.warning("preempted: rerun the same command to resume from the checkpoint")
    return None
  final_step = int(res.state.step)
  state, best_step, note = res.state, final_step, None
  if task.RESTORE_BEST:
    # A damaged best checkpoint is set aside and the next best (or the final state) is used.
    state, best_step, note = ckpt.restore_best(res.state, final_step)
  ckpt.close()
  for h in hooks:
    if h.at_end:
      h.fn(state, best_step, None)
  block = _train_block(run, res, start, final_step, fit_s, eval_s[0], tcfg.peak_flops)
  block.update(best_step=best_step, early_stopped=res.early_stopped)
  if note:
    block["best_checkpoint_note"] = note
  return FitOutput(state, res.history, block)


def _examples_per_step(run) -> float:
  """The global batch size, or for packed rows (lib/data pack_rows) the mean windows a step of
  this process's iterator times the processes."""
  packed = getattr(run.data.train, "info", {}).get("examples_per_batch")
  return packed * jax.process_count() if packed else run.cfg.data.batch_size


def _train_block(run, res, start, final_step, fit_s, eval_s, peak_flops) -> dict:
  """Steps, times, throughput (all tokens / training time, and the median of the log windows:
  median_step_s is the median of 50-step window means), MFU, sizes, the task's data stats and
  memory of a finished fit."""
  cfg = run.cfg
  train_rows = [r for r in res.history if r["kind"] == "train"]
  tokens = sum(r.get("tokens", 0.0) for r in train_rows)
  train_s = max(fit_s - eval_s, 1e-9)
  timed = [r for r in train_rows if r.get("steps_per_s")]
  median = lambda k: float(np.median([r[k] for r in timed if k in r])) if any(
      k in r for r in timed) else None
  steps_run = final_step - start
  return dict(
      steps=final_step, steps_this_process=steps_run, epochs=final_step / len(run.data.train),
      wall_s=time.perf_counter() - run.t_start, fit_s=fit_s, eval_s=eval_s, train_s=train_s,
      examples_per_s=steps_run * _examples_per_step(run) / train_s, tokens_this_process=tokens,
      tokens_per_s=tokens / train_s, tokens_per_s_steady=median("tokens_per_s"),
      median_step_s=float(1.0 / np.median([r["steps_per_s"] for r in timed])) if timed
      else float("nan"),
      # All training time (compiles of new batch shapes included) over the steps: with batches
      # of many lengths, the one step time comparable across frameworks.
      mean_step_s=train_s / max(steps_run, 1),
      mfu=median("mfu"), input_frac=median("input_frac"), peak_flops=peak_flops,
      flops_per_token=run.flops_per_token,
      peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
      **run.data.stats, **run.sizes)


# ----------------------------------------------------------------------------- outputs

def finish(run: Run, evaluator, fitted: FitOutput) -> dict:
  """Final evaluation of the reported state; metrics.json (with the config), the task's report
  and prediction files, curves.png (process 0). Returns the metrics.json content (without the
  config) and 'summary', the evaluator's one-line result."""
  out = dict(evaluator.final(fitted.state, fitted.history), train=fitted.train,
             workdir=os.path.abspath(run.workdir))
  if jax.process_index() == 0:
    reporting.write_json_atomic(os.path.join(run.workdir, "metrics.json"),
                                dict(out, config=json.loads(run.cfg.to_json_best_effort())))
    evaluator.write(run.workdir)
    rows = reporting.read_jsonl_history(os.path.join(run.workdir, "metrics.jsonl"))
    reporting.plot_curves(os.path.join(run.workdir, "curves.png"), evaluator.curves(rows))
  summary = evaluator.summary(out)
  logging.info("%s | %d steps, wall %.0f s", summary, out["train"]["steps"],
               out["train"]["wall_s"])
  return dict(out, summary=summary)


def run(cfg, workdir: str, task, *, hooks=lambda r: [], **setup_kwargs) -> Optional[dict]:
  """setup -> the task's evaluator -> fit (with `hooks(run)`) -> finish: a whole standard run.

  Returns the metrics.json content, or None (sharding explained, or preempted: rerun to resume).
  """
  r = setup(cfg, workdir, task, **setup_kwargs)
  if r is None:
    return None
  evaluator = task.make_evaluator(r)
  fitted = fit(r, evaluator, hooks=hooks(r))
  if fitted is None:
    return None
  return finish(r, evaluator, fitted)


def adapter_hook(run: Run) -> Hook:
  """At the end: <workdir>/adapter holds the trainable leaves of the reported state when some
  parameters were frozen (PEFT, probes; peft.load_adapter puts them onto the base model);
  nothing for full fine-tuning (the checkpoints hold everything)."""
  def save(state, step, _):
    lab = tree.flatten(run.labels)
    if all(peft.is_trainable(l) for l in lab.values()):
      return
    keep = {p: v for p, v in tree.flatten(state.params).items()
            if peft.is_trainable(lab[p])}
    if jax.process_count() > 1:   # every process joins the gather of the trainable leaves
      keep = multihost_utils.process_allgather(keep, tiled=True)
    params, labels = tree.unflatten(keep), tree.unflatten({p: lab[p] for p in keep})
    if jax.process_index() == 0:
      path = peft.save_adapter(os.path.join(run.workdir, "adapter"), params, labels, run.args,
                               overwrite=True, source=os.path.abspath(run.workdir),
                               source_step=step)
      logging.info("trainable parameters of step %d -> %s", step, path)
  return Hook(save, at_end=True)
