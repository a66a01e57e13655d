"""Few-shot NER: K-shot sentence samples per entity type (greedy, per seed), token-level SetFit
pairs, and the NER side of the few-shot protocol (sample files, methods on a sample)."""

import os
from typing import Sequence

import numpy as np

from lib import atomic, data, errors, fewshot


# ----------------------------------------------------------------------------- K-shot samples

def entity_types(tags: Sequence[str]) -> set:
  """The entity types of one sentence's IOB tags ('B-PER', 'I-ORG' -> {'PER', 'ORG'})."""
  return {t.split("-", 1)[1] for t in tags if t != "O" and "-" in t}


def greedy_sample(type_sets: Sequence[set], k: int, seed: int, exclude=()) -> np.ndarray:
  """Sentences such that every type occurs in >= k of them (Yang & Katiyar 2020's greedy
  sampling, counting sentences): the types from rarest to most frequent, each topped up with the
  sentences holding it in one seeded order; a chosen sentence counts for all its types.

  Args:
    type_sets: the entity types of every candidate sentence.
    k: sentences per type.
    seed: the sample (same seed, same data -> same indices).
    exclude: indices never chosen (another sample's).

  Returns:
    the chosen indices, sorted.

  Raises:
    ValueError: k < 1, or a type with fewer than k available sentences (named).
  """
  if k < 1:
    raise ValueError(f"fewshot k={k}: expected at least 1 sentence per entity type")
  excluded = set(int(i) for i in exclude)
  frequency = {}
  for s in type_sets:
    for t in s:
      frequency[t] = frequency.get(t, 0) + 1
  order = [int(i) for i in np.random.default_rng(seed).permutation(len(type_sets))
           if int(i) not in excluded and type_sets[int(i)]]
  counts, chosen = dict.fromkeys(frequency, 0), set()
  for t in sorted(frequency, key=lambda t: (frequency[t], t)):
    for i in order:
      if counts[t] >= k:
        break
      if i not in chosen and t in type_sets[i]:
        chosen.add(i)
        for u in type_sets[i]:
          counts[u] += 1
    if counts[t] < k:
      raise ValueError(f"fewshot: entity type {t!r} occurs in only {counts[t]} available "
                       f"sentences; k={k} are needed")
  return np.array(sorted(chosen), np.int64)


def kshot_ner_split(tag_sequences: Sequence[Sequence[str]], k: int, seed: int,
                    dev_k: int = -1) -> tuple:
  """(train indices, dev indices) of K-shot NER samples, disjoint, both from the given (training)
  sentences: train = greedy_sample(k), dev = greedy_sample(dev_k) of the rest (dev_k < 0: k)."""
  types = [entity_types(tags) for tags in tag_sequences]
  train = greedy_sample(types, k, seed)
  dev = greedy_sample(types, k if dev_k < 0 else dev_k, seed + 10_000, exclude=train)
  return train, dev


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def write_conll(path: str, sentences) -> None:
  """(words, tags) pairs as a CoNLL file: 'word tag' lines, a blank line after each sentence."""
  lines = []
  for words, tags in sentences:
    lines += [f"{_text(w)} {t}" for w, t in zip(words, tags)] + [""]
  atomic.write_bytes(path, "\n".join(lines).encode("utf-8"))


def write_kshot_data(data_cfg, k: int, seed: int, out_dir: str, dev_k: int = -1,
                     pool: str = "all") -> dict:
  """The K-shot NER train and dev files of one seed (from the training split; K sentences per
  entity type) and the full test split as CoNLL files in `out_dir` (kept when present).

  Returns:
    {'train': path, 'validation': path, 'test': path}.
  """
  if pool != "all":
    raise errors.ConfigError(f"config.fewshot.pool={pool!r}: NER samples from 'all' sentences")
  paths = {s: os.path.join(out_dir, f"{s}.conll") for s in ("train", "validation", "test")}
  if all(os.path.exists(p) for p in paths.values()):
    return paths
  src = data.source_of(dict(data_cfg))
  if src.task != "token_cls":
    raise errors.ConfigError(f"config.data.dataset={src.dataset!r}: the NER K-shot protocol "
                             "needs a token-classification dataset")
  names = list(src.label_names)
  split = src.split("train")
  examples = split.__getitems__(list(range(len(split))))
  tags = [[names[i] for i in e[src.label_key]] for e in examples]
  train, dev = kshot_ner_split(tags, k, seed, dev_k)
  os.makedirs(out_dir, exist_ok=True)
  for name, idx in (("train", train), ("validation", dev)):
    write_conll(paths[name], [(examples[i]["tokens"], tags[i]) for i in idx])
  _, gold = data.read_gold(dict(data_cfg), "test")
  test = src.split("test")
  write_conll(paths["test"], [(e["tokens"], g) for e, g in
                              zip(test.__getitems__(list(range(len(test)))), gold)])
  return paths


# ----------------------------------------------------------------------------- token pairs

def token_pairs(labels: Sequence[int], outside: int, iterations: int, seed: int,
                outside_ratio: float = 1.0) -> tuple:
  """SetFit pairs over words: the anchors are every entity word and (per iteration) a sample of
  `outside_ratio` times as many 'O' words; each anchor gets one positive (same tag, another word
  when the tag has one) and one negative (another tag) partner.

  Args:
    labels: the tag id of every training word.
    outside: the id of 'O' (its words are subsampled: they outnumber the entity words).

  Returns:
    (a, b, target): word indices and float32 targets (1 same tag, 0 different), shuffled;
    exactly half of the pairs are positive.

  Raises:
    ValueError: fewer than two tags among the words.
  """
  labels = np.asarray(labels)
  if len(set(labels.tolist())) < 2:
    raise ValueError(f"token pairs need at least two tags; got {sorted(set(labels.tolist()))}")
  rng = np.random.default_rng(seed)
  members = {c: np.flatnonzero(labels == c) for c in set(labels.tolist())}
  entity, o_words = np.flatnonzero(labels != outside), np.flatnonzero(labels == outside)
  n_o = min(len(o_words), int(round(outside_ratio * max(len(entity), 1))))
  a, b = [], []
  for _ in range(iterations):
    for i in np.concatenate([entity, rng.choice(o_words, n_o, replace=False)]).tolist():
      c = labels[i]
      same = members[c][members[c] != i] if len(members[c]) > 1 else members[c]
      a += [i, i]
      b += [rng.choice(same), rng.choice(np.flatnonzero(labels != c))]
  t = np.tile(np.array([1.0, 0.0], np.float32), len(a) // 2)
  order = rng.permutation(len(a))
  return np.asarray(a)[order], np.asarray(b)[order], t[order]


# ----------------------------------------------------------------------------- methods

METHODS = ("setfit", "frozen", "finetune")


def _overrides(cfg) -> dict:
  """The sample files' reading: IOB2 tags, the full dataset's tag list (a K-shot sample may lack
  a tag, e.g. I-MISC, and the model must still have every output)."""
  names = tuple(data.source_of(dict(cfg.data)).label_names)
  return {"data.tag_scheme": "iob2", "data.label_names": names}


def run_method(cfg, method: str, paths: dict, runs_dir: str, sample: str) -> dict:
  """One NER method on one K-shot sample; its runs go to <runs_dir>/<method>/<sample>.

  'setfit' (lib/tasks/token_contrastive: word pairs, cosine loss, then a logistic-regression
  tagger on the words' embeddings); 'frozen' (that tagger on the untouched encoder); 'finetune'
  (token classification, each (lr, batch size) of cfg.fewshot.grid, the best K-shot dev F1).

  Raises:
    errors.ConfigError: an unknown method.
  """
  workdir = os.path.join(runs_dir, method, sample)
  fixed = _overrides(cfg)
  if method in ("setfit", "frozen"):
    over = dict(cfg.fewshot.setfit_overrides, **fixed)
    if method == "frozen":
      over.update(fewshot.FROZEN)
    c = fewshot.kshot_config(cfg, paths, "token_contrastive", "conll:", **over)
    return dict(fewshot.run_once(c, workdir, "f1"), workdir=workdir)
  if method == "finetune":
    return fewshot.grid_search(cfg, paths, "ner", workdir, cfg.fewshot.grid, "f1", "conll:",
                               **fixed)
  raise errors.ConfigError(f"config.fewshot.methods: unknown NER method {method!r}; valid: "
                           f"{METHODS}")
