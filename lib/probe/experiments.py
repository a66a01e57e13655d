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
