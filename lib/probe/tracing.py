"""Causal tracing of synthetic facts: corpus -> small GPT (CLM pretraining) -> recall -> traces.

`run_facts(cfg, out_dir, log)` writes the generated corpus (a `text:` folder), trains the GPT of
cfg.facts.clm through lib/pretrain (its workdir under out_dir), measures recall of the held-out
subjects' facts in the held-out query template (greedy: every token of the object), traces up to
cfg.facts.trace recalled facts (noise on the subject's word embeddings; residual / MLP /
attention restored at every layer x position, prefix reuse), times that grid against a per-cell
loop and attribution patching, and writes the three ROME heatmaps (facts.png) and facts.json.
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from lib import model_io, models, pretrain, reporting
from lib.probe import facts as facts_lib
from lib.probe import hooks, patching


def write_corpus(fc, out_dir: str, seed: int) -> tuple:
  """(all facts, held-out facts, corpus folder): train.txt = the training documents (blank lines
  between them), validation.txt = the held-out facts in the query template, answered."""
  fs = facts_lib.make_facts(fc.subjects, fc.relations, fc.objects, seed=seed)
  query_subj, held_subj = facts_lib.split_subjects(fs, fc.query_frac, seed=seed)
  docs = facts_lib.corpus(fs, fc.repeats, fc.distractors, seed=seed, query_subjects=query_subj)
  held = [f for f in fs if f.subject in held_subj]
  folder = os.path.join(out_dir, "corpus")
  os.makedirs(folder, exist_ok=True)
  reporting.write_text_atomic(os.path.join(folder, "train.txt"), "\n\n".join(docs) + "\n")
  reporting.write_text_atomic(os.path.join(folder, "validation.txt"),
                              "\n\n".join(facts_lib.statement(f) for f in held) + "\n")
  return fs, held, folder


def train_gpt(cfg, corpus_dir: str, workdir: str) -> dict:
  """CLM pretraining of cfg.facts.clm on the corpus folder: the run's metrics.json content."""
  import ml_collections   # pylint: disable=import-outside-toplevel
  c = ml_collections.ConfigDict(cfg.facts.clm.to_dict())
  c.data.dataset, c.data.dir, c.seed = f"text:{corpus_dir}", cfg.data_dir, cfg.seed
  size = {k: v for k, v in c.model.size.items() if v}
  args = models.args_from_config(dict(cfg.facts.preset.to_dict(), **size))
  return pretrain.run(c, workdir, model_args=args)


def query_batch(facts, tokenizer, max_len: int, with_object: bool = False) -> tuple:
  """encode_queries of the facts with the model's BPE (the object's first token is the target),
  trimmed to the longest query; with_object: (batch, object ids per fact) where input_ids also
  hold the object's tokens after the query (for greedy recall by teacher forcing)."""
  tok = lambda text: list(tokenizer(text)["input_ids"])
  objs = [tok(" " + f.obj) for f in facts]
  b = facts_lib.encode_queries(facts, tok, max_len, lambda f: tok(" " + f.obj)[0])
  if with_object:
    for r, o in enumerate(objs):
      p = b["target_pos"][r] + 1
      if p + len(o) > max_len:
        raise ValueError(f"facts.max_len={max_len}: {facts[r]} needs {p + len(o)} tokens")
      b["input_ids"][r, p:p + len(o)], b["input_mask"][r, p:p + len(o)] = o, 1
  t = int(b["input_mask"].sum(1).max())
  b.update({k: b[k][:, :t] for k in ("input_ids", "input_mask", "subject")})
  return b, objs


def recall(module, params, facts, tokenizer, max_len: int, batch: int = 256) -> np.ndarray:
  """(N,) bool: greedy decoding of the query reproduces every token of the fact's object."""
  b, objs = query_batch(facts, tokenizer, max_len, with_object=True)
  fn = jax.jit(lambda p, ids, mask: jnp.argmax(hooks.apply(
      module, p, {"input_ids": ids, "input_mask": mask})[0]["logits"], -1))
  pred = np.concatenate([np.asarray(fn(params, b["input_ids"][i:i + batch],
                                       b["input_mask"][i:i + batch]))
                         for i in range(0, len(facts), batch)])
  ok = np.ones(len(facts), bool)
  for r, o in enumerate(objs):
    p = b["target_pos"][r]
    ok[r] = list(pred[r, p:p + len(o)]) == o
  return ok


def answer_probability(outputs, rows):
  """P(the object's first token) at the query's last position: (R,)."""
  logits = jnp.take_along_axis(outputs["logits"], rows["target_pos"][:, None, None], 1)[:, 0]
  return jnp.take_along_axis(jax.nn.softmax(logits.astype(jnp.float32)), rows["target"][:, None],
                             1)[:, 0]


def trace(m, known, fc, seed: int, log) -> tuple:
  """Exact grid (prefix reuse), per-cell-loop comparison and attribution patching of `known`
  facts: (grid, subject mask, input mask, summary)."""
  b, _ = query_batch(known, m.tokenizer, fc.max_len)
  subject = b.pop("subject")
  batch = {k: jnp.asarray(v) for k, v in b.items()}
  patcher = patching.Patcher(m.module, m.params, answer_probability)
  _, acts = patcher.record(batch)
  std = float(np.asarray(acts["embed"])[subject.astype(bool)].std())
  noise = patching.embedding_noise(jax.random.key(seed), subject, m.args.hidden_size, std,
                                   fc.noise_scale)
  bench = patching.compare_grids(patcher, batch, noise, fc.window, min(fc.benchmark_facts,
                                                                       len(known)))
  per_fact = bench["per_cell_s"] / bench["examples"]
  log(f"benchmark ({bench['examples']} facts x {bench['cells']} cells, same process): per-cell "
      f"loop {bench['per_cell_s']:.2f} s, prefix reuse {bench['prefix_reuse_s']:.2f} s "
      f"({bench['speedup']:.1f}x), max |diff| {bench['max_abs_diff']:.2e}")
  patcher.grid(batch, batch, noise, fc.window, fc.chunk)          # compile the full-size chunks
  grid, t_grid = patching.timed(patcher.grid, batch, batch, noise, fc.window, fc.chunk)
  attr, t_attr = patching.timed(patcher.attribution, batch, batch, noise, fc.window)
  rho = patching.spearman(grid, attr)
  n = len(known)
  log(f"exact grid: {n} facts x {bench['cells']} cells in {t_grid:.1f} s (prefix reuse); the "
      f"per-cell loop extrapolated from {bench['examples']} facts: {per_fact * n:.0f} s "
      f"({per_fact * n / t_grid:.1f}x); attribution patching {t_attr:.2f} s, Spearman vs exact "
      + " ".join(f"{k} {v:.3f}" for k, v in rho.items()))
  summary = dict(benchmark=bench, grid_s=t_grid, per_cell_extrapolated_s=per_fact * n,
                 attribution_s=t_attr, spearman=rho, traced=n, noise_std=3 * std,
                 window=fc.window)
  return grid, subject, b["input_mask"], summary


def run_facts(cfg, out_dir: str, log) -> dict:
  """The whole facts experiment (module docstring); returns the summary written to facts.json."""
  fc = cfg.facts
  fs, held, corpus_dir = write_corpus(fc, out_dir, cfg.seed)
  log(f"facts: {len(fs)} ({fc.subjects} subjects x {fc.relations} relations), {len(held)} "
      f"held out of the query template; corpus -> {corpus_dir}")
  workdir = os.path.join(out_dir, "gpt")
  t0 = time.perf_counter()
  metrics = train_gpt(cfg, corpus_dir, workdir)
  t_train = time.perf_counter() - t0
  log(f"CLM pretraining: {metrics['summary']} ({metrics['train']['steps']} steps, "
      f"{t_train:.0f} s)")
  m = model_io.load_for_inference(workdir, data_dir=cfg.data_dir)
  ok = recall(m.module, m.params, held, m.tokenizer, fc.max_len)
  trained = [f for f in fs if f not in set(held)]
  ok_trained = recall(m.module, m.params, trained[:len(held)], m.tokenizer, fc.max_len)
  log(f"recall (greedy, whole object) of held-out facts in the held-out query template: "
      f"{ok.mean():.4f} ({ok.sum()}/{len(held)}); of query-trained facts: {ok_trained.mean():.4f}")
  known = [f for f, k in zip(held, ok) if k][:fc.trace]
  summary = dict(facts=len(fs), held_out=len(held), recall=float(ok.mean()),
                 recall_query_trained=float(ok_trained.mean()), train_s=t_train,
                 pretrain=dict(summary=metrics["summary"], steps=metrics["train"]["steps"]),
                 roles=list(patching.ROLES), traced=len(known))
  if len(known) < fc.trace:
    log(f"only {len(known)} held-out facts are recalled (facts.trace={fc.trace})")
  if known:
    summary.update(_traces(m, known, fc, cfg.seed, out_dir, log))
  reporting.write_json_atomic(os.path.join(out_dir, "facts.json"), summary)
  return summary


def _traces(m, known, fc, seed, out_dir, log) -> dict:
  """`trace` of the known facts, the heatmaps and the peak of each kind: the summary."""
  from lib.probe import experiments   # pylint: disable=import-outside-toplevel
  grid, subject, input_mask, summary = trace(m, known, fc, seed, log)
  summary.update(experiments._trace_outputs(   # pylint: disable=protected-access
      out_dir, "facts", grid, subject, input_mask,
      f"causal trace of {len(known)} synthetic facts (GPT {m.args.num_layers}x"
      f"{m.args.hidden_size}): P(object) with the subject noised"))
  for kind in patching.KINDS:
    s = summary[kind]
    log(f"  restore {kind}: peak avg indirect effect {s['peak_value']:.4f} at layer "
        f"{s['peak_layer']}, {s['peak_role']}")
  return summary
