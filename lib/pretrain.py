"""Pretraining runs (BERT masked LM, GPT-2 causal LM): config -> tokenizer, packed data, model, fit.

Outputs in the workdir: model.json (with the tokenizer's location; tokenizer/ when a vocabulary is
trained), checkpoints/, TensorBoard events and metrics.jsonl, metrics.json (held-out results,
throughput, packing efficiency, MFU), curves.png, and for CLM samples.txt (the text sampled at
each evaluation).
"""

import dataclasses
import itertools
import json
import os
import resource
import time
from typing import Optional

import jax
import numpy as np
from absl import logging

from lib import (bench, checkpoint, data, distributed, model_io, models, optim, peft,
                 pretrain_data, reporting, sampling, sharding, train)
from lib.tasks import clm, mlm

OBJECTIVES = {"mlm": mlm, "clm": clm}
ARCH = {"mlm": "bert", "clm": "gpt2"}


def _objective(name: str):
  if name not in OBJECTIVES:
    raise ValueError(f"config objective={name!r}; valid: {sorted(OBJECTIVES)}")
  return OBJECTIVES[name]


def data_config(cfg, batch_divisor: int = 1) -> dict:
  """The config's `data` block as `lib.data.from_config` keywords (`dataset` may list corpora).

  See `data.config_kwargs`; `eval_batches` is the caller's.
  """
  d = data.config_kwargs(cfg.data, batch_divisor)
  d.pop("eval_batches", None)
  d.update(objective=cfg.objective, seed=cfg.seed)
  return d


def load_tokenizer(cfg, workdir: str, arch: str):
  """(tokenizer, its location for model.json): a vocabulary trained into <workdir>/tokenizer when
  cfg.vocab.size > 0 (once; a resumed run reloads it), else the model source's own / the
  architecture's default (`model_io.load_tokenizer`)."""
  if not cfg.vocab.size:
    return model_io.load_tokenizer(cfg.model.init_from, arch, cfg.data.dir, cfg.model.tokenizer)
  if cfg.model.init_from or cfg.model.tokenizer:
    raise ValueError(f"vocab.size={cfg.vocab.size} trains a new vocabulary: it cannot be used "
                     f"with model.init_from={cfg.model.init_from!r} or model.tokenizer="
                     f"{cfg.model.tokenizer!r} (their embeddings index another vocabulary)")
  out = os.path.abspath(os.path.join(workdir, "tokenizer"))
  train_it = lambda: pretrain_data.train_vocabulary(
      arch, pretrain_data.dataset_names(cfg.data.dataset), cfg.data.dir, out, cfg.vocab.size,
      cache_dir=cfg.data.cache_dir or None, lowercase=cfg.vocab.lowercase,
      min_frequency=cfg.vocab.min_frequency)
  if jax.process_index() == 0:
    tokenizer = train_it()
  distributed.allgather_text("vocabulary ready")                # the others wait, then load it
  if jax.process_index() != 0:
    tokenizer = train_it()
  return tokenizer, out


def _model(cfg, model_args, head, tokenizer):
  """(ModelArgs, host params or None for a sharded random init) from `model_args` or init_from."""
  overrides = dict(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                   remat=cfg.model.remat)
  if cfg.model.dropout_rate >= 0:
    overrides.update(dropout_rate=cfg.model.dropout_rate,
                     attention_dropout_rate=cfg.model.dropout_rate)
  if model_args is not None:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model_args.pad_token_id
    args = dataclasses.replace(model_args, vocab_size=len(tokenizer), pad_token_id=pad, **overrides)
    logging.info("random init (seed %d) of %s", cfg.seed, args)
    return args, None
  loaded = model_io.load_model(cfg.model.init_from, head, rng=jax.random.key(cfg.seed),
                               overrides=overrides)
  if loaded.args.vocab_size < len(tokenizer):
    raise ValueError(f"model.init_from={cfg.model.init_from!r} has vocab_size "
                     f"{loaded.args.vocab_size} < {len(tokenizer)} tokens of its tokenizer")
  return loaded.args, loaded.params


def flops_per_token(args, abstract_params, seq_len: int, head_fraction: float = 1.0) -> float:
  """Model FLOPs per trained token: every matmul parameter (not the embedding tables), the tied
  output layer (vocab x embed) on `head_fraction` of the positions (MLM: its prediction slots),
  and attention over rows of `seq_len` (`train.flops_per_token`)."""
  flat = peft.flatten_paths(abstract_params)
  body = sum(v.size for k, v in flat.items() if not k.endswith("embedding"))
  decoder = head_fraction * args.vocab_size * args.hidden_size
  return train.flops_per_token(body + decoder, args.num_layers, args.hidden_size, seq_len)


def _peak_flops(cfg) -> float:
  """cfg.train.peak_flops, or (< 0) the measured FLOP/s of a large matmul in the compute dtype."""
  if cfg.train.peak_flops >= 0:
    return float(cfg.train.peak_flops)
  peak = bench.matmul_peak(1024, cfg.model.dtype)
  logging.info("MFU is relative to the measured %s matmul peak: %.1f GFLOP/s per device",
               cfg.model.dtype, peak / 1e9)
  return peak


# ----------------------------------------------------------------------------- evaluation

def _short(name: str) -> str:
  return name.split(":", 1)[-1]


class Evaluator:
  """Held-out loss and accuracy (CLM: perplexity) per corpus and over all of them; for CLM also
  prints text samples (greedy and sampled) from fixed prompts and appends them to samples.txt."""

  def __init__(self, objective, eval_step, its, batch_sharding, max_batches, sampler=None):
    self.objective, self.eval_step, self.its, self.bsh = objective, eval_step, its, batch_sharding
    # Batches per corpus: `max_batches` (0 = all); iterator lengths are equal on every host.
    self.steps = {n: min(len(it), max_batches) if max_batches else len(it) for n, it in its.items()}
    self.sampler = sampler

  def _finish(self, result: dict) -> dict:
    out = {k: result[k] for k in ("loss", "accuracy", "weight")}
    if self.objective == "clm":
      out = clm.with_perplexity(out)
    if "mlm_dropped" in result:
      out["mlm_dropped"] = result["mlm_dropped"]
    return out

  def _corpus(self, state, name) -> dict:
    it = self.its[name]
    it.reset()          # the same batches (and MLM masks) at every evaluation
    return train.evaluate(self.eval_step, state, itertools.islice(it, self.steps[name]), self.bsh)

  def __call__(self, state) -> dict:
    rows, out = [], {}
    for name in self.its:
      r = self._corpus(state, name)
      rows.append(r)
      out[_short(name)] = self._finish(r)
    out.update(self._finish(train.combine_metrics(rows)))
    if self.sampler is not None:
      self.sampler(state)
    return out


class Sampler:
  """Samples continuations of fixed prompts (greedy, and with temperature/top-k/top-p) and logs
  them; process 0 appends them to <workdir>/samples.txt with the step."""

  def __init__(self, module, tokenizer, cfg, batch_sharding, path: Optional[str]):
    s = cfg.samples
    self.prompts, self.tokenizer, self.bsh, self.path, self.seed = (
        list(s.prompts), tokenizer, batch_sharding, path, cfg.seed)
    self.modes = {
        "greedy": sampling.SampleArgs(s.max_new_tokens, temperature=0.0),
        f"T={s.temperature} top_k={s.top_k} top_p={s.top_p}": sampling.SampleArgs(
            s.max_new_tokens, s.temperature, s.top_k, s.top_p)}
    self.steps = {m: train.make_eval_step(sampling.make_sample_fn(module, a))
                  for m, a in self.modes.items()}

  def __call__(self, state) -> list:
    lines = [f"== step {int(state.step)} =="]
    for mode, args in self.modes.items():
      texts = sampling.generate(self.steps[mode], state, self.tokenizer, self.prompts, args,
                                self.bsh, seed=self.seed)
      lines += [f"[{mode}] {p!r} -> {t!r}" for p, t in zip(self.prompts, texts)]
    for line in lines:
      logging.info("sample %s", line)
    if self.path and jax.process_index() == 0:
      with open(self.path, "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return lines


# ----------------------------------------------------------------------------- the run

def _state(cfg, module, params, tx, mesh, rules, logical, labels):
  """The TrainState on the mesh: around loaded params, or randomly initialised in its shardings."""
  if params is not None:
    return train.train_state_from_params(params, tx, mesh, rules, logical, labels)
  init_fn = lambda r: models.init_params(module, r)[0]
  return train.create_train_state(init_fn, jax.random.key(cfg.seed), tx, mesh, rules, logical,
                                  labels)


def objective_fns(cfg, module):
  """(loss_fn, eval_fn, fraction of the positions the output layer runs on) of cfg.objective."""
  if cfg.objective == "clm":
    return clm.make_loss_fn(module), clm.make_eval_fn(module), 1.0
  slots = cfg.predictions_per_row
  if slots < 0:
    slots = mlm.prediction_slots(cfg.data.max_len, cfg.data.mlm_rate, cfg.data.whole_word_masking)
  fraction = slots / cfg.data.max_len if slots else 1.0
  return mlm.make_loss_fn(module, slots), mlm.make_eval_fn(module, slots), fraction


def run(cfg, workdir: str, *, model_args=None, explain_sharding: bool = False) -> Optional[dict]:
  """Pretrains (MLM or CLM), evaluates the held-out splits, writes the outputs; resumes a workdir.

  Args:
    cfg: a configs/mlm.py or configs/clm.py config.
    workdir: outputs and checkpoints; an existing run there is resumed.
    model_args: random init of this architecture (vocab_size follows the tokenizer); None:
      continue from cfg.model.init_from (its head is initialised if it has none).
    explain_sharding: print the per-parameter sharding table and return without training.

  Returns:
    the metrics.json content, or None (sharding explained, or preempted: rerun to resume).
  """
  t_start = time.perf_counter()
  task = _objective(cfg.objective)
  arch = model_args.arch if model_args is not None else model_io.describe(cfg.model.init_from).arch
  if arch != ARCH[cfg.objective]:
    raise ValueError(f"objective={cfg.objective!r} needs a {ARCH[cfg.objective]!r} model; "
                     f"the model is {arch!r}")
  tokenizer, tok_where = load_tokenizer(cfg, workdir, arch)
  d = data_config(cfg, jax.process_count())
  train_it, held_out = pretrain_data.make_iterators(d, tokenizer, shard_index=jax.process_index(),
                                                    shard_count=jax.process_count())
  args, params = _model(cfg, model_args, task.HEAD, tokenizer)
  if cfg.data.max_len > args.max_len:
    raise ValueError(f"data.max_len={cfg.data.max_len} exceeds the model's max_len {args.max_len}")
  module = models.build(args, task.HEAD)
  abstract, logical = models.abstract_params(module)
  labels = peft.label_params(abstract, [tuple(r) for r in cfg.param_rules])
  num_steps = train.num_train_steps(cfg.train, len(train_it))
  tx, schedule = optim.make_optimizer(cfg.optim, labels, num_steps)
  mesh, rules = sharding.make_mesh(cfg.mesh), [tuple(r) for r in cfg.sharding_rules]
  if explain_sharding:
    init_fn = lambda r: models.init_params(module, r)[0]
    st = train.abstract_train_state(init_fn, tx, mesh, rules, logical, labels)
    print(sharding.explain_sharding(st.params, opt_state=st.opt_state))
    return None
  state = _state(cfg, module, params, tx, mesh, rules, logical, labels)
  del params
  if jax.process_index() == 0:
    model_io.write_model_json(workdir, args, task.HEAD, tokenizer=tok_where,
                              init_from=cfg.model.init_from or "random", objective=cfg.objective)
  bsh = sharding.batch_sharding(mesh, rules)
  loss_fn, eval_fn, head_fraction = objective_fns(cfg, module)
  sampler = None
  if cfg.objective == "clm" and cfg.samples.prompts:
    sampler = Sampler(module, tokenizer, cfg, bsh, os.path.join(workdir, "samples.txt"))
  evaluator = Evaluator(cfg.objective, train.make_eval_step(eval_fn), held_out, bsh,
                        cfg.data.eval_batches, sampler)
  step_fn = train.make_train_step(loss_fn, tx, labels=labels, accum_steps=cfg.optim.accum_steps,
                                  schedule=schedule, seed=cfg.seed)
  fpt = flops_per_token(args, abstract, cfg.data.max_len, head_fraction)
  return _fit_and_report(cfg, workdir, state, step_fn, train_it, evaluator, bsh, num_steps, fpt,
                         t_start)


def _fit_and_report(cfg, workdir, state, step_fn, train_it, evaluator, bsh, num_steps, fpt,
                    t_start):
  """fit with held-out evaluation and checkpoints; then metrics.json and curves.png."""
  packing = pretrain_data.packing_stats(train_it)
  logging.info("packing: %.2f%% of the training tokens are real (per corpus: %s)",
               100 * packing["fill_fraction"],
               ", ".join(f"{_short(n)} {100 * f:.2f}%" for n, f in packing["per_corpus"].items()))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.train.keep,
                                 best_metric="loss", best_mode="min",
                                 save_every=cfg.train.checkpoint_every)
  start = ckpt.latest_step() or 0
  tcfg = cfg.train.copy_and_resolve_references()
  tcfg.peak_flops = _peak_flops(cfg)
  eval_s = [0.0]

  def eval_fn(st):
    t = time.perf_counter()
    out = evaluator(st)
    eval_s[0] += time.perf_counter() - t
    return out
  t_fit = time.perf_counter()
  res = train.fit(state, step_fn, train_it, tcfg, num_steps=num_steps, batch_sharding=bsh,
                  eval_fn=eval_fn, checkpointer=ckpt, logdir=workdir, flops_per_token=fpt)
  fit_s = time.perf_counter() - t_fit
  ckpt.close()
  if res.preempted:
    logging.warning("preempted: rerun the same command to resume from the checkpoint")
    return None
  evals = [r for r in res.history if r["kind"] == "eval"]
  # A run resumed at its last step trained nothing here: evaluate the final state for the report.
  held_out = _strip_row(evals[-1]) if evals else dict(
      train.scalar_metrics(evaluator(res.state))[0], step=int(res.state.step))
  train_block = _train_block(res, start, t_start, fit_s, eval_s[0], tcfg.peak_flops, fpt, packing)
  out = {"held_out": held_out, "train": train_block,
         "workdir": os.path.abspath(workdir)}
  if jax.process_index() == 0:
    write_outputs(workdir, cfg, out)
  logging.info("held-out %s | %d steps, %.0f tokens/s, wall %.0f s", _summary(cfg, out),
               train_block["steps"], train_block["tokens_per_s"], train_block["wall_s"])
  return out


def _train_block(res, start, t_start, fit_s, eval_s, peak_flops, fpt, packing) -> dict:
  """Steps, times, throughput (all tokens / training time, and the median of the log windows),
  MFU, packing and memory of a finished fit."""
  train_rows = [r for r in res.history if r["kind"] == "train"]
  tokens = sum(r.get("tokens", 0.0) for r in train_rows)
  train_s = max(fit_s - eval_s, 1e-9)
  timed = [r for r in train_rows if "tokens_per_s" in r]
  median = lambda k: float(np.median([r[k] for r in timed if k in r])) if any(
      k in r for r in timed) else None
  return dict(
      steps=int(res.state.step), steps_this_process=int(res.state.step) - start,
      wall_s=time.perf_counter() - t_start, fit_s=fit_s, eval_s=eval_s, train_s=train_s,
      tokens_this_process=tokens, tokens_per_s=tokens / train_s,
      tokens_per_s_steady=median("tokens_per_s"), mfu=median("mfu"), peak_flops=peak_flops,
      flops_per_token=fpt, packing=packing,
      peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)


def _strip_row(row: dict) -> dict:
  return {k: v for k, v in row.items() if k not in ("kind", "step")} | {"step": row["step"]}


def _summary(cfg, out) -> str:
  h = out["held_out"]
  if not h:
    return "(no evaluation)"
  second = f"perplexity {h['perplexity']:.2f}" if cfg.objective == "clm" else \
      f"masked accuracy {h['accuracy']:.4f}"
  return f"loss {h['loss']:.4f} {second}"


def _curves(workdir, objective) -> dict:
  """Loss curves (train, held-out overall and per corpus) and the held-out accuracy/perplexity."""
  rows = reporting.read_jsonl_history(os.path.join(workdir, "metrics.jsonl"))
  train_rows = [r for r in rows if r["kind"] == "train" and "loss" in r]
  eval_rows = [r for r in rows if r["kind"] == "eval" and "loss" in r]
  curves = {"train_loss": [(r["step"], r["loss"]) for r in train_rows]}
  keys = sorted({k for r in eval_rows for k in r if k == "loss" or k.endswith("/loss")})
  second = "perplexity" if objective == "clm" else "accuracy"
  keys += [second]
  for k in keys:
    curves[f"held_out_{k.replace('/', '_')}"] = [(r["step"], r[k]) for r in eval_rows if k in r]
  return curves


def write_outputs(workdir, cfg, out) -> None:
  """metrics.json (with the config) and curves.png, written atomically."""
  reporting.write_json_atomic(os.path.join(workdir, "metrics.json"),
                              dict(out, config=json.loads(cfg.to_json_best_effort())))
  reporting.plot_curves(os.path.join(workdir, "curves.png"), _curves(workdir, cfg.objective))
