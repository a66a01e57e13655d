"""Few-shot learning pieces: K-shot splits, contrastive pairs and loss (SetFit), a logistic-
regression head on embeddings, and the cloze scorer of prompt-based methods (PET / LM-BFF)."""

import functools
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lib import atomic, data, errors


# ----------------------------------------------------------------------------- K-shot splits

def kshot_split(labels: Sequence, k: int, seed: int, dev_k: int = -1) -> tuple:
  """(train indices, dev indices): `k` training and `dev_k` dev examples per class, disjoint.

  Both are drawn from the given (training) labels only, so the evaluation splits never leak in.
  One permutation per class and seed: training takes its head, dev its tail, so a larger K
  extends a smaller K's training set (a learning curve over nested samples) and never touches
  the dev examples of any K <= n_c / 2.

  Args:
    labels: the label of every training example (any hashable values).
    k: training examples per class.
    seed: the sample (same seed, same labels -> same indices).
    dev_k: dev examples per class (< 0: the same as k, LM-BFF's protocol).

  Raises:
    ValueError: k < 1, or a class with fewer than k + dev_k examples (named).
  """
  dev_k = k if dev_k < 0 else dev_k
  if k < 1:
    raise ValueError(f"fewshot k={k}: expected at least 1 example per class")
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  train, dev = [], []
  for c in sorted(set(labels.tolist())):
    idx = rng.permutation(np.flatnonzero(labels == c))
    if len(idx) < k + dev_k:
      raise ValueError(f"fewshot: class {c!r} has {len(idx)} training examples; k={k} + "
                       f"dev_k={dev_k} are needed")
    train.append(idx[:k])
    dev.append(idx[len(idx) - dev_k:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(dev))


# ----------------------------------------------------------------------------- SetFit

def contrastive_pairs(labels: Sequence, iterations: int, seed: int) -> tuple:
  """SetFit's pair generation: per iteration and example, one positive (same label, another
  example when the class has one) and one negative (a different label) partner.

  Returns:
    (a, b, target): int arrays of example indices and float32 targets (1 same, 0 different),
    shuffled; exactly half of the pairs are positive.

  Raises:
    ValueError: fewer than two classes (no negative pair exists).
  """
  labels = np.asarray(labels)
  classes = sorted(set(labels.tolist()))
  if len(classes) < 2:
    raise ValueError(f"contrastive pairs need at least two classes; got {classes}")
  rng = np.random.default_rng(seed)
  members = {c: np.flatnonzero(labels == c) for c in classes}
  others = {c: np.flatnonzero(labels != c) for c in classes}
  a, b, t = [], [], []
  for _ in range(iterations):
    for i, c in enumerate(labels.tolist()):
      same = members[c][members[c] != i] if len(members[c]) > 1 else members[c]
      a += [i, i]
      b += [rng.choice(same), rng.choice(others[c])]
      t += [1.0, 0.0]
  order = rng.permutation(len(a))
  return (np.asarray(a)[order], np.asarray(b)[order], np.asarray(t, np.float32)[order])


def mean_pool(hidden, mask):
  """Mean of the hidden states over the real tokens: (B, T, D), (B, T) -> (B, D) float32."""
  m = mask[..., None].astype(jnp.float32)
  return (hidden.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)


def cosine_similarity_loss(u, v, target):
  """sentence-transformers' CosineSimilarityLoss: mean squared error of cos(u, v) to target."""
  cos = (u * v).sum(-1) / jnp.maximum(jnp.linalg.norm(u, axis=-1) * jnp.linalg.norm(v, axis=-1),
                                      1e-12)
  return jnp.mean((cos - target) ** 2), cos


# ----------------------------------------------------------------------------- linear head

def fit_logistic_regression(x, y, num_classes: int, c: float = 1.0, iterations: int = 200):
  """Multinomial logistic regression (sklearn's objective: sum of cross-entropies + ||W||^2 / 2C,
  the bias unpenalised) fitted with L-BFGS on the full batch.

  Args:
    x: (N, D) features; y: (N,) int labels in [0, num_classes).
    c: inverse regularisation strength.

  Returns:
    (W (D, C), b (C,)) as numpy float32.
  """
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)
  params = (jnp.zeros((x.shape[1], num_classes)), jnp.zeros((num_classes,)))
  return tuple(np.asarray(p) for p in _lbfgs(x, y, params, c, iterations))


def logistic_objective(params, x, y, c):
  """The regularised negative log-likelihood that fit_logistic_regression minimises."""
  w, b = params
  nll = optax.softmax_cross_entropy_with_integer_labels(x @ w + b, y).sum()
  return nll + 0.5 / c * (w ** 2).sum()


@functools.partial(jax.jit, static_argnums=(4,))
def _lbfgs(x, y, params, c, iterations):
  fn = lambda p: logistic_objective(p, x, y, c)
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(fn)

  def step(carry, _):
    p, state = carry
    value, grad = value_and_grad(p, state=state)
    updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=fn)
    return (optax.apply_updates(p, updates), state), None
  (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=iterations)
  return params


def predict_linear(x, head) -> np.ndarray:
  """argmax of x @ W + b: (N, D) -> (N,) class ids."""
  w, b = head
  return np.argmax(np.asarray(x, np.float32) @ w + b, -1)


# ----------------------------------------------------------------------------- cloze (PET)

def verbalizer_log_probs(logits, mask_positions, verbalizer_ids):
  """Log-probabilities of the label words at each row's mask, normalised over the label words
  only (LM-BFF / PET): no other vocabulary entry enters the score.

  Args:
    logits: (B, T, V) MLM logits.
    mask_positions: (B,) the index of each row's [MASK].
    verbalizer_ids: (C,) one token id per class.

  Returns:
    (B, C) log-softmax over the C label words.
  """
  at_mask = jnp.take_along_axis(logits, mask_positions[:, None, None], axis=1)[:, 0]   # (B, V)
  words = at_mask[:, jnp.asarray(verbalizer_ids)].astype(jnp.float32)                 # (B, C)
  return jax.nn.log_softmax(words, axis=-1)


def label_word_log_probs(mask_logits, label_token_ids):
  """(B, V) MLM logits at each row's mask and (B, C) label-word ids per row -> (B, C) float32
  log-softmax over those C words only (the cloze task's class scores)."""
  words = jnp.take_along_axis(mask_logits, label_token_ids, axis=1).astype(jnp.float32)
  return jax.nn.log_softmax(words, axis=-1)


def ensemble_patterns(log_probs: Sequence, weights=None):
  """PET's ensemble of patterns: the (weighted) mean of per-pattern (B, C) label log-probs."""
  stacked = jnp.stack([jnp.asarray(lp) for lp in log_probs])             # (P, B, C)
  w = jnp.ones(len(log_probs)) if weights is None else jnp.asarray(weights, jnp.float32)
  return jnp.tensordot(w / w.sum(), stacked, axes=1)


def cloze_texts(template: str, sentences: Sequence[str], mask_token: str) -> list:
  """The pattern applied to each sentence: '{sentence}' and '{mask}' in `template` are replaced.

  Raises:
    ValueError: a template without exactly one '{mask}' or without '{sentence}'.
  """
  if template.count("{mask}") != 1 or "{sentence}" not in template:
    raise ValueError(f"fewshot cloze template {template!r}: expected one '{{mask}}' and a "
                     "'{sentence}'")
  return [template.replace("{sentence}", s).replace("{mask}", mask_token) for s in sentences]


# ----------------------------------------------------------------------------- the protocol

def _clean(text) -> str:
  text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
  return " ".join(text.split())     # tabs and newlines would break the TSV row


def _write_tsv(path: str, examples, label_names) -> None:
  rows = ["sentence\tlabel"] + [f"{_clean(e['sentence'])}\t{label_names[int(e['label'])]}"
                                for e in examples]
  atomic.write_bytes(path, ("\n".join(rows) + "\n").encode("utf-8"))


def sentence_like(text, min_words: int = 8) -> bool:
  """A full sentence rather than a phrase: >= min_words words and a final . ! or ? (GLUE's SST-2
  training split holds every phrase of the treebank; LM-BFF samples its 6,920 sentences)."""
  words = _clean(text).split()
  return len(words) >= min_words and words[-1][-1] in ".!?"


def write_kshot_data(data_cfg, k: int, seed: int, out_dir: str, dev_k: int = -1,
                     pool: str = "all") -> dict:
  """The K-shot train and dev TSVs of one seed (from the training split) and the full test split,
  with label names, in `out_dir` (kept when present: the sample is a function of its arguments).
  pool: 'all' training examples, or 'sentences' (sentence_like ones only) to sample from.

  Returns:
    {'train': path, 'validation': path, 'test': path}.
  """
  paths = {s: os.path.join(out_dir, f"{s}.tsv") for s in ("train", "validation", "test")}
  if all(os.path.exists(p) for p in paths.values()):
    return paths
  src = data.source_of(dict(data_cfg))
  if src.task != "seq_cls":
    raise ValueError(f"config.data.dataset={src.dataset!r}: the K-shot protocol here needs a "
                     "sequence-classification dataset")
  split = src.split("train")
  examples = split.__getitems__(list(range(len(split))))
  if pool not in ("all", "sentences"):
    raise ValueError(f"config.fewshot.pool={pool!r}: expected 'all' or 'sentences'")
  if pool == "sentences":
    examples = [e for e in examples if sentence_like(e["sentence"])]
  train_idx, dev_idx = kshot_split([int(e["label"]) for e in examples], k, seed, dev_k)
  os.makedirs(out_dir, exist_ok=True)
  _write_tsv(paths["train"], [examples[i] for i in train_idx], src.label_names)
  _write_tsv(paths["validation"], [examples[i] for i in dev_idx], src.label_names)
  test = src.split("test")
  _write_tsv(paths["test"], test.__getitems__(list(range(len(test)))), src.label_names)
  return paths


def kshot_config(cfg, paths: dict, task: str, dataset: str = "tsv:", **overrides):
  """A copy of `cfg` on the K-shot files (own data of kind `dataset`, e.g. 'tsv:' or 'conll:'),
  for `task`, with `overrides` as 'block.key' -> value."""
  c = cfg.copy_and_resolve_references()
  c.data.dataset, c.data.max_train_examples, c.task = dataset, 0, task
  c.data.train, c.data.validation, c.data.test = paths["train"], paths["validation"], paths["test"]
  for key, value in overrides.items():
    block, name = key.split(".")
    c[block][name] = value
  return c


def run_once(cfg, workdir: str, metric: str = "accuracy") -> dict:
  """One run through the skeleton (a finished workdir's metrics.json is read, not rerun, when
  the configuration it records is this one; else ResumeMismatchError); its dev and test
  `metric`, steps and training wall time."""
  from lib import experiment, tasks   # here: lib/tasks/contrastive imports this module
  done = os.path.join(workdir, "metrics.json")
  if not os.path.exists(done):
    if experiment.run(cfg, workdir, tasks.get(cfg.task)) is None:
      raise RuntimeError(f"{workdir}: the run was preempted; rerun to resume")
  with open(done, encoding="utf-8") as f:
    out = json.load(f)
  diffs = experiment.record_diffs(out.get("config") or {},
                                 json.loads(cfg.to_json_best_effort()))
  if diffs:
    raise experiment.ResumeMismatchError(
        f"{done}: this finished run had a different configuration ({'; '.join(diffs[:4])}"
        f"{'; ...' if len(diffs) > 4 else ''}); its result is not reused: use a new output "
        "directory, or move this one aside to run again")
  return {"dev": out["dev"][metric], "test": out["test"][metric],
          "steps": out["train"]["steps"], "wall_s": out["train"]["wall_s"]}


METHODS = ("setfit", "frozen", "finetune", "cloze_zeroshot", "cloze_zeroshot_pet",
           "cloze_finetune", "cloze_finetune_pet")


def setfit_config(cfg, paths: dict, frozen: bool = False):
  """The SetFit run's config on the K-shot files (cfg.fewshot.setfit_overrides); frozen: every
  parameter frozen and one step, so the head is fitted on the untouched encoder's embeddings."""
  overrides = dict(cfg.fewshot.setfit_overrides)
  if frozen:
    overrides.update(FROZEN)
  return kshot_config(cfg, paths, "contrastive", **overrides)


# Every parameter frozen and one step: the run only evaluates its starting model.
FROZEN = {"peft.rules": ((".*", "freeze"),), "train.num_steps": 1}


def grid_search(cfg, paths: dict, task: str, workdir: str, grid, metric: str = "accuracy",
                dataset: str = "tsv:", **overrides) -> dict:
  """LM-BFF's protocol: one run per (lr, batch size) of `grid`, the best K-shot dev `metric`."""
  best = None
  for lr, bs in grid:
    c = kshot_config(cfg, paths, task, dataset,
                     **{"optim.lr": lr, "data.batch_size": bs, **overrides})
    wd = os.path.join(workdir, f"lr{lr:g}_bs{bs}")
    out = dict(run_once(c, wd, metric), lr=lr, batch_size=bs, workdir=wd)
    if best is None or out["dev"] > best["dev"]:
      best = out
  return best


def run_method(cfg, method: str, paths: dict, runs_dir: str, sample: str) -> dict:
  """One method on one K-shot sample (`paths`, named `sample`, e.g. 'k16_seed0'); its runs go to
  <runs_dir>/<method>/<sample> (cloze: see run_cloze).

  'setfit'; 'frozen' (SetFit's head on the untouched encoder: every parameter frozen, one step;
  the baseline contrastive training must beat); 'finetune' (standard fine-tuning: each (lr,
  batch size) of cfg.fewshot.grid, the best dev accuracy reported, LM-BFF's protocol); the
  cloze methods of run_cloze.

  Raises:
    errors.ConfigError: an unknown method.
  """
  workdir = os.path.join(runs_dir, method, sample)
  if method in ("setfit", "frozen"):
    return run_once(setfit_config(cfg, paths, frozen=method == "frozen"), workdir)
  if method == "finetune":
    return grid_search(cfg, paths, "classification", workdir, cfg.fewshot.grid)
  if method in METHODS:
    return run_cloze(cfg, method, paths, runs_dir, sample)
  raise errors.ConfigError(f"config.fewshot.methods: unknown method {method!r}; valid: {METHODS}")


def summarize(results: list) -> list:
  """Rows (method, k, n, test mean, test std, dev mean) over the seeds of each (method, K);
  std is the sample standard deviation (ddof=1), as LM-BFF reports."""
  rows = []
  for method, k in sorted({(r["method"], r["k"]) for r in results}):
    test = [r["test"] for r in results if (r["method"], r["k"]) == (method, k)]
    dev = [r["dev"] for r in results if (r["method"], r["k"]) == (method, k)]
    rows.append(dict(method=method, k=k, n=len(test), test_mean=float(np.mean(test)),
                     test_std=float(np.std(test, ddof=1)) if len(test) > 1 else 0.0,
                     dev_mean=float(np.mean(dev))))
  return rows


def table_markdown(rows: list, full_data: float = 0.0, metric: str = "accuracy",
                   k_unit: str = "per class", full_source: str = "configs/sst2.py") -> str:
  """The summary as a markdown table (test `metric` mean (std) over seeds, in %)."""
  lines = [f"| method | K {k_unit} | seeds | test {metric} mean (std) | K-shot dev mean |",
           "|---|---|---|---|---|"]
  std = lambda r: f"{100 * r['test_std']:.1f}" if r["n"] > 1 else "n/a: one seed"
  lines += [f"| {r['method']} | {r['k']} | {r['n']} | {100 * r['test_mean']:.1f} "
            f"({std(r)}) | {100 * r['dev_mean']:.1f} |" for r in rows]
  if full_data:
    lines.append(f"| finetune, full training set ({full_source}) | all | | "
                 f"{100 * full_data:.1f} | |")
  return "\n".join(lines) + "\n"


def plot_learning_curve(path: str, rows: list, full_data: float = 0.0, metric: str = "accuracy",
                        k_unit: str = "examples per class") -> None:
  """Test `metric` (mean, std bars) against K per method; the full-data result as a line."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for method in sorted({r["method"] for r in rows}):
    rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["k"])
    k = [r["k"] for r in rs]
    m, s = np.array([r["test_mean"] for r in rs]), np.array([r["test_std"] for r in rs])
    ax.errorbar(k, m, yerr=s, marker="o", capsize=3, label=method)
  if full_data:
    ax.axhline(full_data, color="gray", ls="--", label="finetune, full data")
  ax.set(xscale="log", xlabel=f"K ({k_unit})", ylabel=f"test {metric}")
  ks = sorted({r["k"] for r in rows})
  ax.set_xticks(ks, [str(k) for k in ks])
  ax.minorticks_off()
  ax.legend()
  fig.tight_layout()
  tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}.png")
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)


# ----------------------------------------------------------------------------- cloze prediction

def verbalizer_token_ids(tokenizer, words: Sequence[str]) -> np.ndarray:
  """One vocabulary id per label word.

  Raises:
    ValueError: a word that is not a single token of the tokenizer (named).
  """
  ids = []
  for w in words:
    pieces = tokenizer(w, add_special_tokens=False)["input_ids"]
    if len(pieces) != 1:
      raise ValueError(f"fewshot cloze verbalizer word {w!r} is {len(pieces)} tokens "
                       f"({tokenizer.convert_ids_to_tokens(pieces)}); expected one")
    ids.append(pieces[0])
  return np.asarray(ids, np.int32)


def cloze_log_probs(module, params, tokenizer, sentences, template: str, words,
                    batch_size: int = 64, max_len: int = 128) -> np.ndarray:
  """(N, C) label-word log-probabilities of one pattern with an MLM-head model (PET / LM-BFF
  zero-shot or after prompt-based fine-tuning); the sentence is truncated, never the pattern.

  Args:
    module, params: a BERT with the 'mlm' head (e.g. model_io.load_for_inference(source, 'mlm')).
    template: with '{sentence}' and '{mask}' (cloze_texts).
    words: one label word per class, in label order.
  """
  verb = verbalizer_token_ids(tokenizer, words)
  apply = jax.jit(lambda p, ids, m: module.apply({"params": p}, ids, m)[0]["logits"])
  out = []
  for s in range(0, len(sentences), batch_size):
    texts = cloze_texts(template, sentences[s:s + batch_size], tokenizer.mask_token)
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_len,
                    return_tensors="np")
    ids = enc["input_ids"].astype(np.int32)
    is_mask = ids == tokenizer.mask_token_id
    if (is_mask.sum(1) != 1).any():
      raise ValueError(f"fewshot cloze: {(is_mask.sum(1) != 1).sum()} texts lost their mask to "
                       f"truncation at max_len={max_len}")
    logits = apply(params, ids, enc["attention_mask"].astype(np.int32))
    out.append(np.asarray(verbalizer_log_probs(logits, jnp.argmax(is_mask, 1), verb)))
  return np.concatenate(out)


# ----------------------------------------------------------------------------- cloze protocol

def check_cloze_config(cloze_cfg, label_names: Sequence[str], key: str = "config.cloze") -> None:
  """Checks the cloze block before any run: patterns, verbalizer and the MLM model source.

  Raises:
    errors.ConfigError: no pattern, a pattern without exactly one '{mask}' or without
      '{sentence}' (its index named), a verbalizer that does not map every label (and only
      those) to one word, or an mlm_source that is no model source.
  """
  from lib import config_check   # pylint: disable=g-import-not-at-top  # imports jax lazily
  if not cloze_cfg.patterns:
    raise errors.ConfigError(f"{key}.patterns is empty: expected at least one pattern such as "
                             "'{sentence} It was {mask}.'")
  for i, template in enumerate(cloze_cfg.patterns):
    try:
      cloze_texts(template, ["x"], "[MASK]")
    except ValueError:
      raise errors.ConfigError(f"{key}.patterns[{i}]={template!r}: expected exactly one "
                               "'{mask}' and a '{sentence}'") from None
  words = dict(tuple(p) for p in cloze_cfg.verbalizer)
  if sorted(words) != sorted(label_names) or len(words) != len(cloze_cfg.verbalizer):
    raise errors.ConfigError(f"{key}.verbalizer={tuple(map(tuple, cloze_cfg.verbalizer))}: "
                             f"expected one (label, word) pair per label of {list(label_names)}")
  why = config_check.source_problem(cloze_cfg.mlm_source, f"{key}.mlm_source")
  if why:
    raise errors.ConfigError(why + " with an MLM head (e.g. a research/pretrain_mlm.py workdir)")


def label_words(verbalizer, label_names: Sequence[str]) -> list:
  """The verbalizer's word of each label, in label order (check_cloze_config's pairs).

  Raises:
    errors.ConfigError: a label without a word.
  """
  words = dict(tuple(p) for p in verbalizer)
  missing = [l for l in label_names if l not in words]
  if missing:
    raise errors.ConfigError(f"config.cloze.verbalizer: no word for the labels {missing} "
                             f"(labels: {list(label_names)})")
  return [words[l] for l in label_names]


def write_cloze_data(paths: dict, template: str, mask_token: str, out_dir: str) -> dict:
  """The K-shot TSVs (write_kshot_data) with the pattern applied to every sentence, and
  pattern.txt (template and mask token); kept when present and made with the same pattern.

  Returns:
    {'train': path, 'validation': path, 'test': path}.

  Raises:
    errors.ConfigError: `out_dir` holds the files of another pattern (the runs on them would be
      reused): a new --workdir is needed.
  """
  out = {s: os.path.join(out_dir, f"{s}.tsv") for s in paths}
  record, made = os.path.join(out_dir, "pattern.txt"), f"{template}\n{mask_token}\n"
  if os.path.exists(record):
    with open(record, encoding="utf-8") as f:
      old = f.read()
    if old != made:
      raise errors.ConfigError(f"{out_dir} was made with the pattern {old.splitlines()[0]!r}, the "
                               f"config has {template!r}: use a new --workdir (finished runs on "
                               "the old files would be reused)")
    if all(os.path.exists(p) for p in out.values()):
      return out
  os.makedirs(out_dir, exist_ok=True)
  for split, path in paths.items():
    with open(path, encoding="utf-8") as f:
      rows = [line.rstrip("\n").split("\t") for line in f]
    texts = cloze_texts(template, [r[0] for r in rows[1:]], mask_token)
    lines = ["\t".join(rows[0])] + [f"{t}\t{r[1]}" for t, r in zip(texts, rows[1:])]
    atomic.write_bytes(out[split], ("\n".join(lines) + "\n").encode("utf-8"))
  atomic.write_bytes(record, made.encode("utf-8"))
  return out


def cloze_overrides(cfg, train: bool = True) -> dict:
  """The cloze task's run settings over the fine-tuning ones: the model is cfg.cloze.mlm_source
  (with its MLM head), cfg.cloze.overrides; train=False: everything frozen, one step (zero-shot)."""
  out = dict(cfg.cloze.overrides, **{"model.init_from": cfg.cloze.mlm_source})
  return out if train else dict(out, **FROZEN)


def _mask_token(cfg) -> str:
  from lib import model_io   # pylint: disable=g-import-not-at-top
  return model_io.load_tokenizer(cfg.cloze.mlm_source, "bert", cfg.data.dir)[0].mask_token


def run_cloze(cfg, method: str, paths: dict, runs_dir: str, sample: str) -> dict:
  """Prompt-based classification with the MLM head of cfg.cloze.mlm_source (lib/tasks/cloze).

  'cloze_zeroshot': pattern 0 on the model as it is (every parameter frozen, one step). Its runs
  (<runs_dir>/cloze_zeroshot/p<i>) are shared by every sample: the test result cannot depend on
  the sample (its dev is the first sample's). 'cloze_finetune': LM-BFF's prompt-based fine-
  tuning of pattern 0: encoder and MLM head trained with cross-entropy over the label words at
  the mask, each (lr, batch size) of cfg.cloze.grid, the best K-shot dev accuracy
  (<runs_dir>/cloze_finetune/<sample>/p<i>/lr<lr>_bs<b>). '_pet': every pattern of
  cfg.cloze.patterns run so, then PET's ensemble, the mean of their label log-probabilities
  (pattern 0's runs are the single-pattern method's).
  """
  kind = method.replace("cloze_", "").replace("_pet", "")
  patterns = range(len(cfg.cloze.patterns)) if method.endswith("_pet") else [0]
  mask, outs = _mask_token(cfg), []
  for i in patterns:
    ppaths = write_cloze_data(paths, cfg.cloze.patterns[i], mask,
                              os.path.join(os.path.dirname(paths["train"]), f"cloze_p{i}"))
    if kind == "zeroshot":
      wd = os.path.join(runs_dir, "cloze_zeroshot", f"p{i}")
      c = kshot_config(cfg, ppaths, "cloze", **cloze_overrides(cfg, train=False))
      outs.append(dict(run_once(c, wd), workdir=wd, note="one run for every sample: its dev is "
                       "the first sample's"))
    else:
      wd = os.path.join(runs_dir, "cloze_finetune", sample, f"p{i}")
      outs.append(grid_search(cfg, ppaths, "cloze", wd, cfg.cloze.grid, **cloze_overrides(cfg)))
  return outs[0] if len(outs) == 1 else ensemble_runs(outs)


def ensemble_runs(outs: Sequence[dict]) -> dict:
  """PET's ensemble of cloze runs (their log_probs.npz): dev and test accuracy of the mean label
  log-probabilities; steps and wall time summed; each run's own result under 'patterns'."""
  saved = [np.load(os.path.join(o["workdir"], "log_probs.npz")) for o in outs]
  res = {}
  for split, key in (("validation", "dev"), ("test", "test")):
    gold = saved[0][f"{split}_gold"]
    if any(not np.array_equal(s[f"{split}_gold"], gold) for s in saved):
      raise RuntimeError(f"cloze ensemble: the {split} examples of the runs differ: "
                         f"{[o['workdir'] for o in outs]}")
    mean = np.asarray(ensemble_patterns([s[split] for s in saved]))
    res[key] = float((mean.argmax(1) == gold).mean())
  return dict(res, steps=sum(o["steps"] for o in outs), wall_s=sum(o["wall_s"] for o in outs),
              patterns=[{k: o[k] for k in ("dev", "test", "workdir")} for o in outs])
