"""Language-modelling tasks (MLM, CLM) on packed text: their data and tokenizer from the config, and
the held-out evaluator (loss and accuracy per corpus and over all; CLM adds perplexity and
samples)."""

import itertools
import os
from typing import Optional

import jax
from absl import logging

from lib import data, distributed, errors, model_io, pretrain_data, sampling, train
from lib.tasks.supervised import Data


def data_kwargs(cfg, batch_divisor: int = 1) -> dict:
  """The config's `data` block as `lib.data.from_config` keywords (`dataset` may list corpora).

  See `data.config_kwargs`; `eval_batches` is the evaluator's.
  """
  d = data.config_kwargs(cfg.data, batch_divisor)
  d.pop("eval_batches", None)
  d.update(objective=cfg.objective, seed=cfg.seed)
  return d


def make_data(cfg, tokenizer, workdir=None) -> Data:
  """The training mixture and one held-out iterator per corpus (this process's shard)."""
  del workdir
  d = data_kwargs(cfg, jax.process_count())
  train_it, held_out = pretrain_data.make_iterators(d, tokenizer, shard_index=jax.process_index(),
                                                    shard_count=jax.process_count())
  packing = pretrain_data.packing_stats(train_it)
  logging.info("packing: %.2f%% of the training tokens are real (per corpus: %s)",
               100 * packing["fill_fraction"],
               ", ".join(f"{short(n)} {100 * f:.2f}%" for n, f in packing["per_corpus"].items()))
  return Data(train_it, held_out, [], {"packing": packing})


def load_tokenizer(cfg, workdir: str, arch: str):
  """(tokenizer, its location for model.json): a vocabulary trained into <workdir>/tokenizer when
  cfg.vocab.size > 0 (once; a resumed run reloads it), else the model source's own / the
  architecture's default (`model_io.load_tokenizer`)."""
  if not cfg.vocab.size:
    return model_io.load_tokenizer(cfg.model.init_from, arch, cfg.data.dir, cfg.model.tokenizer)
  if cfg.model.init_from or cfg.model.tokenizer:
    raise errors.ConfigError(f"config.vocab.size={cfg.vocab.size} trains a new vocabulary: it cannot be used "
                     f"with config.model.init_from={cfg.model.init_from!r} or config.model.tokenizer="
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


def short(name: str) -> str:
  return name.split(":", 1)[-1]


class Evaluator:
  """Held-out loss and accuracy per corpus and over all of them; `finish` adds the objective's
  derived metrics (CLM: perplexity) and `sampler` (CLM) prints text samples at each evaluation."""

  def __init__(self, eval_fn, cfg, data_: Data, batch_sharding, *, finish=None, sampler=None,
               second: str = "accuracy"):
    self.eval_step, self.its, self.bsh = train.make_eval_step(eval_fn), data_.evals, batch_sharding
    max_batches = cfg.data.eval_batches
    # Batches per corpus: `eval_batches` (0 = all); iterator lengths are equal on every host.
    self.steps = {n: min(len(it), max_batches) if max_batches else len(it)
                  for n, it in self.its.items()}
    self.finish, self.sampler, self.second = finish or (lambda r: r), sampler, second
    self.history_row: Optional[dict] = None

  def _finish(self, result: dict) -> dict:
    out = self.finish({k: result[k] for k in ("loss", "accuracy", "weight")})
    if "mlm_dropped" in result:
      out["mlm_dropped"] = result["mlm_dropped"]
    return out

  def _corpus(self, state, name) -> dict:
    it = self.its[name]
    it.reset()          # the same batches (and MLM masks) at every evaluation
    return train.evaluate(self.eval_step, state, itertools.islice(it, self.steps[name]), self.bsh)

  def dev(self, state) -> dict:
    rows, out = [], {}
    for name in self.its:
      r = self._corpus(state, name)
      rows.append(r)
      out[short(name)] = self._finish(r)
    out.update(self._finish(train.combine_metrics(rows)))
    if self.sampler is not None:
      self.sampler(state)
    return out

  def final(self, state, history=()) -> dict:
    """{'held_out': the last evaluation of training, or of `state` if training evaluated none}."""
    evals = [r for r in history if r["kind"] == "eval" and r["step"] == int(state.step)]
    if evals:
      row = {k: v for k, v in evals[-1].items() if k not in ("kind", "step")}
    else:
      row = train.scalar_metrics(self.dev(state))[0]
    return {"held_out": dict(row, step=int(state.step))}

  def write(self, workdir: str) -> None:
    del workdir   # metrics.json and curves.png are the skeleton's; samples.txt the sampler's

  def summary(self, out: dict) -> str:
    h = out["held_out"]
    second = (f"perplexity {h['perplexity']:.2f}" if self.second == "perplexity"
              else f"masked accuracy {h['accuracy']:.4f}")
    return f"held-out loss {h['loss']:.4f} {second}"

  def curves(self, rows: list) -> dict:
    """Loss curves (train, held-out overall and per corpus) and the held-out accuracy/perplexity."""
    train_rows = [r for r in rows if r["kind"] == "train" and "loss" in r]
    eval_rows = [r for r in rows if r["kind"] == "eval" and "loss" in r]
    curves = {"train_loss": [(r["step"], r["loss"]) for r in train_rows]}
    keys = sorted({k for r in eval_rows for k in r if k == "loss" or k.endswith("/loss")})
    for k in keys + [self.second]:
      curves[f"held_out_{k.replace('/', '_')}"] = [(r["step"], r[k]) for r in eval_rows if k in r]
    return curves


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
