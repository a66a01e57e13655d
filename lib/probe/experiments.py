"""The causal-probe experiments as functions of a config: probes, patching, INLP, IG, facts.

Each `run_<mode>(cfg, out_dir, log)` writes its files into `out_dir` (a fresh directory that
research/causal_probe.py renames into place) and returns a JSON-able summary.
"""

import os
import time

import numpy as np

from lib import model_io, reporting
from lib.data import readers
from lib.probe import probes, report

CONLL_TASKS = {"pos": "pos", "chunk": "chunk", "ner": "ner"}


def load_encoder(cfg):
  """The frozen model of cfg.model (no dropout): InferenceModel."""
  return model_io.load_for_inference(cfg.model, data_dir=cfg.data_dir)


def _word_task(m, cfg, train, evals, labels_of, log):
  """Features of train/eval sentences (lists of words) and their per-word label arrays."""
  p = cfg.probe
  xt, kt = probes.word_features(m.module, m.params, m.tokenizer, [s["tokens"] for s in train],
                                p.max_len, p.batch_size, p.pool)
  xe, ke = probes.word_features(m.module, m.params, m.tokenizer, [s["tokens"] for s in evals],
                                p.max_len, p.batch_size, p.pool)
  log(f"  features: train {xt.shape[1]} words ({len(kt)}/{len(train)} sentences), "
      f"eval {xe.shape[1]} words ({len(ke)}/{len(evals)} sentences)")
  words = lambda ss, keep: [w.lower() for k in keep for w in ss[k]["tokens"]]
  tags = {name: ([t for k in kt for t in labels_of(train[k], name)],
                 [t for k in ke for t in labels_of(evals[k], name)]) for name in cfg_tasks(cfg)}
  return xt, xe, words(train, kt), words(evals, ke), tags


def cfg_tasks(cfg) -> list:
  return [t.strip() for t in cfg.probe.tasks.split(",") if t.strip()]


def _fit_task(name, xt, xe, yt_str, ye_str, types, cfg, log):
  p = cfg.probe
  yt, names = probes.encode(yt_str)
  ye_str = [y if y in set(names) else None for y in ye_str]
  unseen = sum(y is None for y in ye_str)
  if unseen:   # a dev label never seen in training cannot be predicted: counted as wrong
    log(f"  {name}: {unseen} eval items have labels unseen in training (counted wrong)")
  ye = np.array([names.index(y) if y is not None else -1 for y in ye_str], np.int32)
  control = None
  if types is not None:
    control = probes.control_labels(types[0], yt, types[1], seed=cfg.seed)
  else:   # sentences: each gets a random label from the training distribution
    rng = np.random.default_rng(cfg.seed)
    control = (rng.choice(yt, len(yt)).astype(np.int32), rng.choice(yt, len(ye)).astype(np.int32))
  t0 = time.perf_counter()
  res = probes.probe_task(xt, yt, xe, ye, len(names), control=control, hidden=p.hidden,
                          steps=p.steps, batch=p.train_batch, lr=p.lr, seed=cfg.seed)
  res["train_s"] = time.perf_counter() - t0
  res["labels"] = names
  log(f"  {name}: acc/layer " + " ".join(f"{a:.3f}" for a in res["accuracy"])
      + f"  sel max {max(res['selectivity']):.3f}  E[layer] {res['expected_layer']:.2f}"
      f"  ({res['train_s']:.0f} s)")
  return res


def _conll(cfg):
  d = os.path.join(cfg.data_dir, "conll2003")
  train, _ = readers.read_conll(os.path.join(d, "train.txt"))
  dev, _ = readers.read_conll(os.path.join(d, "valid.txt"))
  return train[:cfg.probe.train_sentences], dev[:cfg.probe.eval_sentences]


def _brown(cfg):
  d = os.path.join(cfg.data_dir, "brown")
  train, dev = readers.read_brown(d, "train"), readers.read_brown(d, "validation")
  return train[:cfg.probe.train_sentences], dev[:cfg.probe.eval_sentences]


def _sst2(cfg):
  d = os.path.join(cfg.data_dir, "sst2")
  train, _ = readers.read_sst2(os.path.join(d, "train.tsv"))
  dev, _ = readers.read_sst2(os.path.join(d, "dev.tsv"))
  return train[:cfg.probe.sst2_train], dev[:cfg.probe.sst2_eval]


def run_probe(cfg, out_dir: str, log) -> dict:
  """Layer-wise probes with controls and scalar mixes for cfg.probe.tasks; table, heatmap, JSON."""
  m, tasks, results = load_encoder(cfg), cfg_tasks(cfg), {}
  unknown = set(tasks) - {"pos", "chunk", "ner", "brown_pos", "sst2"}
  if unknown:
    raise ValueError(f"probe.tasks: unknown {sorted(unknown)}; valid: pos, chunk, ner, "
                     "brown_pos, sst2")
  conll = [t for t in tasks if t in CONLL_TASKS]
  if conll:
    log(f"CoNLL-2003 ({', '.join(conll)})")
    tr, ev = _conll(cfg)
    xt, xe, wt, we, tags = _word_task(m, cfg, tr, ev, lambda s, n: s[CONLL_TASKS[n]]
                                      if n in CONLL_TASKS else [], log)
    for t in conll:
      results[t] = _fit_task(t, xt, xe, *tags[t], (wt, we), cfg, log)
  if "brown_pos" in tasks:
    log("Brown POS")
    tr, ev = _brown(cfg)
    xt, xe, wt, we, tags = _word_task(m, cfg, tr, ev, lambda s, n: s["tags"], log)
    results["brown_pos"] = _fit_task("brown_pos", xt, xe, *tags["brown_pos"], (wt, we), cfg, log)
  if "sst2" in tasks:
    log("SST-2 (mean-pooled sentences)")
    tr, ev = _sst2(cfg)
    f = lambda ex: probes.sentence_features(m.module, m.params, m.tokenizer,
                                            [e["sentence"] for e in ex], cfg.probe.max_len,
                                            cfg.probe.batch_size)
    results["sst2"] = _fit_task("sst2", f(tr), f(ev), [str(e["label"]) for e in tr],
                                [str(e["label"]) for e in ev], None, cfg, log)
  _write_probes(out_dir, results, cfg)
  return results


def _write_probes(out_dir, results, cfg):
  names = list(results)
  n_states = len(next(iter(results.values()))["accuracy"])
  layers = ["emb"] + [f"L{i}" for i in range(1, n_states)]
  rows = []
  for t in names:
    r = results[t]
    best = int(np.argmax(r["accuracy"]))
    rows.append([t, r["n_train"], r["n_eval"], r["majority"], *r["accuracy"], layers[best],
                 max(r["selectivity"]), r["expected_layer"], r["mix_accuracy"]])
  header = ["task", "train", "eval", "majority", *layers, "best", "max_sel", "E[layer]", "mix"]
  text = report.table(header, rows)
  sel = "\n".join(f"{t:10s} selectivity " + " ".join(f"{v:.3f}" for v in results[t]
                                                      ["selectivity"]) for t in names)
  reporting.write_text_atomic(os.path.join(out_dir, "probes.txt"), text + "\n\n" + sel + "\n")
  reporting.write_json_atomic(os.path.join(out_dir, "probes.json"),
                              dict(config=cfg.to_dict(), results=results))
  acc = np.array([results[t]["accuracy"] for t in names]).T                # (layers, tasks)
  sel_m = np.array([results[t]["selectivity"] for t in names]).T
  report.heatmaps(os.path.join(out_dir, "probes.png"), [
      ("probe accuracy", acc, layers, names, "accuracy"),
      ("selectivity (task - control)", sel_m, layers, names, "accuracy difference")],
      suptitle=f"{cfg.model}: layer-wise linear probes" if not cfg.probe.hidden else
      f"{cfg.model}: layer-wise MLP probes ({cfg.probe.hidden})")
  return text


# ------------------------------------------------------------------------------ patching
def _entity_examples(m, sents, names, max_len, limit):
  """Sentences with an entity: ids (N, T), mask, target_pos/target (the entity's first piece,
  gold tag id), subject (N, T) (the entity's pieces)."""
  from lib.data.tokenize import WordPieces, special_wrap   # pylint: disable=import-outside-toplevel
  pieces, (pre, suf) = WordPieces(m.tokenizer), special_wrap(m.tokenizer)
  rows = []
  for s in sents:
    tags = s["ner"]
    if not any(t.startswith("B-") for t in tags):
      continue
    ps = pieces(s["tokens"])
    seq = list(pre) + [i for p in ps for i in p] + list(suf)
    if len(seq) > max_len:
      continue
    w = next(k for k, t in enumerate(tags) if t.startswith("B-"))
    end = w + 1
    while end < len(tags) and tags[end] == "I-" + tags[w][2:]:
      end += 1
    starts = np.cumsum([len(pre)] + [len(p) for p in ps])
    rows.append((seq, int(starts[w]), int(starts[end]), names.index(tags[w])))
    if len(rows) == limit:
      break
  n = len(rows)
  b = {k: np.zeros((n, max_len), np.int32) for k in ("input_ids", "input_mask", "subject")}
  b["target_pos"], b["target"] = np.zeros(n, np.int32), np.zeros(n, np.int32)
  for r, (seq, a, e, tag) in enumerate(rows):
    b["input_ids"][r, :len(seq)], b["input_mask"][r, :len(seq)] = seq, 1
    b["subject"][r, a:e] = 1
    b["target_pos"][r], b["target"][r] = a, tag
  return b


def _ner_readout(m, cfg, log):
  """A linear NER probe on the last hidden state (first sub-words of CoNLL train sentences):
  (score fn for Patcher, label names, probe, (mu, sd))."""
  import jax   # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp   # pylint: disable=import-outside-toplevel
  d = os.path.join(cfg.data_dir, "conll2003")
  train, _ = readers.read_conll(os.path.join(d, "train.txt"))
  train = train[:cfg.patch.train_sentences]
  x, kept = probes.word_features(m.module, m.params, m.tokenizer, [s["tokens"] for s in train])
  y, names = probes.encode([t for k in kept for t in train[k]["ner"]])
  x = x[-1:]
  mu, sd = x.mean(1), x.std(1) + 1e-6
  p = probes.train_layer_probes(jnp.asarray((x - mu[:, None]) / sd[:, None]), y, len(names),
                                steps=cfg.probe.steps, seed=cfg.seed)
  p1 = jax.tree_util.tree_map(lambda a: a[0], p)
  log(f"NER readout: linear probe on the last layer, {len(y)} words of {len(kept)} sentences")

  def score(outputs, rows):
    h = jnp.take_along_axis(outputs["last_hidden_state"], rows["target_pos"][:, None, None],
                            1)[:, 0]
    logp = jax.nn.log_softmax(probes.probe_logits(p1, (h - mu[0]) / sd[0]), -1)
    return jnp.exp(jnp.take_along_axis(logp, rows["target"][:, None], 1)[:, 0])

  return score, names


def run_patch(cfg, out_dir: str, log) -> dict:
  """Exact NER patching grid on the encoder (prefix reuse), the per-cell loop timed against it,
  attribution patching and its Spearman correlation; three role-aligned heatmaps."""
  import jax   # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp   # pylint: disable=import-outside-toplevel
  from lib.probe import patching   # pylint: disable=import-outside-toplevel
  m, pc = load_encoder(cfg), cfg.patch
  score, names = _ner_readout(m, cfg, log)
  d = os.path.join(cfg.data_dir, "conll2003")
  dev, _ = readers.read_conll(os.path.join(d, "valid.txt"))
  b = _entity_examples(m, dev, names, pc.max_len, pc.examples)
  subject = b.pop("subject")
  batch = {k: jnp.asarray(v) for k, v in b.items()}
  patcher = patching.Patcher(m.module, m.params, score)
  _, acts = patcher.record(batch)
  std = float(np.asarray(acts["embed"])[subject.astype(bool)].std())
  noise = patching.embedding_noise(jax.random.key(cfg.seed), subject, m.args.hidden_size, std,
                                   pc.noise_scale)
  bench = patching.compare_grids(patcher, batch, noise, pc.window,
                                 min(pc.benchmark_examples, len(subject)))
  log(f"benchmark ({bench['examples']} examples x {bench['cells']} cells, T={pc.max_len}, same "
      f"process): per-cell loop {bench['per_cell_s']:.2f} s, prefix reuse "
      f"{bench['prefix_reuse_s']:.2f} s ({bench['speedup']:.1f}x), max |diff| "
      f"{bench['max_abs_diff']:.2e}")
  grid, t_grid = patching.timed(patcher.grid, batch, batch, noise, pc.window, pc.chunk)
  attr, t_attr = patching.timed(patcher.attribution, batch, batch, noise, pc.window)
  rho = patching.spearman(grid, attr)
  log(f"grid: {len(subject)} examples in {t_grid:.1f} s; attribution {t_attr:.1f} s; "
      f"Spearman " + " ".join(f"{k} {v:.3f}" for k, v in rho.items()))
  summary = _trace_outputs(out_dir, "patch", grid, subject, np.asarray(b["input_mask"]),
                           f"{cfg.model}: NER probe P(gold tag), noise on the entity")
  summary.update(benchmark=bench, grid_s=t_grid, attribution_s=t_attr, spearman=rho,
                 examples=len(subject))
  reporting.write_json_atomic(os.path.join(out_dir, "patch.json"), summary)
  return summary


def _trace_outputs(out_dir, stem, grid, subject, input_mask, title) -> dict:
  """Role-aligned average indirect effects (resid/attn/mlp) -> heatmap PNG; the summary."""
  from lib.probe import patching   # pylint: disable=import-outside-toplevel
  roles = patching.token_roles(subject, input_mask)
  panels, summary = [], dict(clean=float(np.mean(grid["clean"])),
                             corrupt=float(np.mean(grid["corrupt"])))
  for kind, label in (("resid", "hidden states"), ("mlp", "MLP outputs"),
                      ("attn", "attention outputs")):
    effect = role_average(grid[kind] - grid["corrupt"][:, None, None], roles)
    rows = [f"{'emb' if i == 0 and kind == 'resid' else i}" for i in range(effect.shape[0])]
    panels.append((f"restore {label}", effect.T, list(patching.ROLES), rows, "avg indirect effect"))
    peak = np.unravel_index(np.nanargmax(effect), effect.shape)
    summary[kind] = dict(avg_indirect_effect=effect.tolist(), peak_layer=int(peak[0]),
                         peak_role=patching.ROLES[peak[1]], peak_value=float(effect[peak]))
  report.heatmaps(os.path.join(out_dir, f"{stem}.png"), panels, suptitle=title)
  return summary


def role_average(effect, roles):
  from lib.probe import patching   # pylint: disable=import-outside-toplevel
  return patching.role_average(effect, roles)


# ------------------------------------------------------------------------------ INLP
def run_inlp(cfg, out_dir: str, log) -> dict:
  """INLP removes cfg.inlp.property at hidden state cfg.inlp.layer inside the forward pass; the
  last-layer probe of cfg.inlp.target is evaluated with it, with a same-rank random projection,
  and with neither."""
  import jax.numpy as jnp   # pylint: disable=import-outside-toplevel
  from lib.probe import inlp   # pylint: disable=import-outside-toplevel
  m, ic = load_encoder(cfg), cfg.inlp
  d = os.path.join(cfg.data_dir, "conll2003")
  train, _ = readers.read_conll(os.path.join(d, "train.txt"))
  dev, _ = readers.read_conll(os.path.join(d, "valid.txt"))
  train, dev = train[:ic.train_sentences], dev[:ic.eval_sentences]
  feats = lambda ss, edit=None: probes.word_features(m.module, m.params, m.tokenizer,
                                                      [s["tokens"] for s in ss], edit=edit)
  (xt, kt), (xe, ke) = feats(train), feats(dev)
  lab = lambda ss, keep, col: [t for k in keep for t in ss[k][CONLL_TASKS[col]]]
  pt, pnames = probes.encode(lab(train, kt, ic.property))
  pe = np.array([pnames.index(t) if t in pnames else -1 for t in lab(dev, ke, ic.property)])
  res = inlp.inlp(xt[ic.layer], pt, xe[ic.layer], pe, len(pnames), iterations=ic.iterations,
                  steps=ic.steps, seed=cfg.seed)
  log(f"INLP {ic.property} at state {ic.layer}: probe accuracy by iteration "
      + " ".join(f"{a:.3f}" for a in res["accuracy"]) + f" -> {res['final_accuracy']:.3f} "
      f"(majority {res['majority']:.3f}), rank {res['rank']}")
  tt, tnames = probes.encode(lab(train, kt, ic.target))
  te = jnp.asarray([tnames.index(t) if t in tnames else -1 for t in lab(dev, ke, ic.target)])
  (xl,) = probes.standardize(xt[-1:])
  mu, sd = xt[-1:].mean(1, keepdims=True), xt[-1:].std(1, keepdims=True) + 1e-6
  probe = probes.train_layer_probes(jnp.asarray(xl), tt, len(tnames), steps=ic.steps,
                                    seed=cfg.seed)
  rand = inlp.random_projection(xt.shape[-1], res["rank"], cfg.seed)
  out = {}
  for name, proj in (("none", None), ("inlp", res["P"]), ("random", rand)):
    edit = None if proj is None else inlp.projection_edit(ic.layer, proj, res["mean"])
    x = (feats(dev, edit)[0][-1:] - mu) / sd
    logits = probes.probe_logits(jax_first(probe), jnp.asarray(x[0]))
    ok = te >= 0
    loss = optax_xent(logits[ok], te[ok])
    out[name] = dict(loss=loss, accuracy=float(jnp.mean(jnp.argmax(logits, -1) == te)))
    log(f"  {ic.target} probe on the last layer, projection {name}: loss {loss:.4f}, "
        f"accuracy {out[name]['accuracy']:.4f}")
  summary = dict(property=ic.property, target=ic.target, layer=ic.layer, rank=res["rank"],
                 property_accuracy=res["accuracy"], property_final=res["final_accuracy"],
                 majority=res["majority"], target_probe=out, eval_words=int(len(te)))
  reporting.write_json_atomic(os.path.join(out_dir, "inlp.json"), summary)
  return summary


def jax_first(tree):
  import jax   # pylint: disable=import-outside-toplevel
  return jax.tree_util.tree_map(lambda a: a[0], tree)


def optax_xent(logits, labels) -> float:
  import optax   # pylint: disable=import-outside-toplevel
  return float(optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean())


# ------------------------------------------------------------------------------ IG
def run_ig(cfg, out_dir: str, log) -> dict:
  """Integrated gradients of an SST-2 probe's logit (mean-pooled last layer) per token."""
  import jax.numpy as jnp   # pylint: disable=import-outside-toplevel
  from lib.probe import attribution   # pylint: disable=import-outside-toplevel
  m, gc = load_encoder(cfg), cfg.ig
  d = os.path.join(cfg.data_dir, "sst2")
  train, _ = readers.read_sst2(os.path.join(d, "train.tsv"))
  dev, _ = readers.read_sst2(os.path.join(d, "dev.tsv"))
  x = probes.sentence_features(m.module, m.params, m.tokenizer,
                               [e["sentence"] for e in train[:gc.train]])[-1:]
  mu, sd = x.mean(1)[0], x.std(1)[0] + 1e-6
  probe = jax_first(probes.train_layer_probes(
      jnp.asarray((x - mu) / sd), np.array([e["label"] for e in train[:gc.train]]), 2,
      steps=cfg.probe.steps, seed=cfg.seed))
  shown, errs = [], []
  for e in dev[:gc.examples]:
    ids = m.tokenizer(e["sentence"])["input_ids"]
    batch = {"input_ids": jnp.asarray([ids]), "input_mask": jnp.ones((1, len(ids)), jnp.int32)}
    logit = lambda o: probes.probe_logits(probe, (o["last_hidden_state"][0].mean(0) - mu) / sd)
    cls = int(jnp.argmax(logit(_plain(m, batch))))
    fn, emb = attribution.embedding_fn(m.module, m.params, batch, lambda o: logit(o)[cls])
    attr, total, err = attribution.integrated_gradients(fn, emb, jnp.zeros_like(emb), gc.steps)
    errs.append(err)
    toks = m.tokenizer.convert_ids_to_tokens(ids)
    shown.append((f"gold {e['label']} pred {cls}  f(x)-f(0) {total:+.3f}  completeness error "
                  f"{100 * err:.3f}%", toks, attr))
  log(f"IG ({gc.steps} Gauss-Legendre nodes, zero-embedding baseline): completeness error "
      f"max {100 * max(errs):.4f}%, mean {100 * np.mean(errs):.4f}% over {len(errs)} sentences")
  reporting.write_text_atomic(os.path.join(out_dir, "ig.html"), report.token_html(
      f"{cfg.model}: integrated gradients of an SST-2 probe's logit", shown))
  report.heatmaps(os.path.join(out_dir, "ig.png"), [
      (c[:40], np.asarray(a)[None], [""], t, "attribution") for c, t, a in shown[:4]])
  summary = dict(completeness_error_max=max(errs), completeness_error_mean=float(np.mean(errs)),
                 sentences=len(errs), steps=gc.steps)
  reporting.write_json_atomic(os.path.join(out_dir, "ig.json"), summary)
  return summary


def _plain(m, batch):
  """The model's last hidden state on one batch (outputs dict) for the prediction."""
  out, _ = m.module.apply({"params": m.params}, batch["input_ids"], batch["input_mask"])
  return out


# ------------------------------------------------------------------------------ facts
def run_facts(cfg, out_dir: str, log) -> dict:
  """Synthetic facts -> small GPT -> causal traces: lib/probe/tracing.py."""
  from lib.probe import tracing   # pylint: disable=import-outside-toplevel
  return tracing.run_facts(cfg, out_dir, log)


# ------------------------------------------------------------------------------ metrics.json
def metrics(mode: str, summary: dict, wall_s: float) -> dict:
  """The headline numbers of a mode's summary, as research/causal_probe.py writes them to
  metrics.json (what a declared table reads; tables/probe*.py).

  probe: `probes`, one entry per task in run order (best_layer: 0 = embeddings, i = layer i);
  patch / facts: `grid` (prefix-reuse speedup over the per-cell loop, max |diff|, Spearman of
  attribution vs exact patching) and, for facts, `facts` (held-out recall); inlp: `inlp`
  (iterations, rank, property probe before/after, target probe accuracy with no / the INLP / a
  random projection); ig: `ig` (completeness error in percent).
  """
  out = dict(mode=mode, wall_s=wall_s)
  if mode == "probe":
    out["probes"] = [_probe_metrics(task, r) for task, r in summary.items()]
  elif mode in ("patch", "facts"):
    if "benchmark" in summary:   # facts with no recalled fact trace nothing
      b, rho = summary["benchmark"], summary["spearman"]
      out["grid"] = dict(speedup=b["speedup"], max_abs_diff=b["max_abs_diff"],
                         spearman=rho["all"], examples=summary.get("examples", summary.get(
                             "traced")), grid_s=summary["grid_s"],
                         **{f"spearman_{k}": v for k, v in rho.items() if k != "all"},
                         **{f"peak_{k}": summary[k]["peak_value"] for k in ("resid", "mlp",
                                                                             "attn")})
    if mode == "facts":
      out["facts"] = dict(recall=summary["recall"], held_out=summary["held_out"],
                          recalled=round(summary["recall"] * summary["held_out"]))
  elif mode == "inlp":
    t = summary["target_probe"]
    out["inlp"] = dict(
        property=summary["property"], target=summary["target"], layer=summary["layer"],
        iterations=len(summary["property_accuracy"]), rank=summary["rank"],
        property_before=summary["property_accuracy"][0],
        property_last=summary["property_accuracy"][-1],   # the probe that stopped INLP
        property_after=summary["property_final"],         # a fresh probe after the projection
        majority=summary["majority"], **{f"target_{k}": v["accuracy"] for k, v in t.items()},
        **{f"target_{k}_loss": v["loss"] for k, v in t.items()})
  elif mode == "ig":
    out["ig"] = dict(completeness_error_max_percent=100 * summary["completeness_error_max"],
                     completeness_error_mean_percent=100 * summary["completeness_error_mean"],
                     sentences=summary["sentences"], steps=summary["steps"])
  return out


def _probe_metrics(task: str, r: dict) -> dict:
  best = int(np.argmax(r["accuracy"]))
  return dict(task=task, best_layer=best, best_accuracy=float(r["accuracy"][best]),
              majority=r["majority"], expected_layer=r["expected_layer"],
              max_selectivity=float(max(r["selectivity"])), mix_accuracy=r["mix_accuracy"])
