"""One view of every dataset, named or own files: task, identity, label names, splits, gold."""

import collections
import dataclasses
import json
import logging
import os
import re
from typing import Callable, Optional

from lib import atomic, errors
from lib.data import builders, own, readers

# Named token-classification datasets: the example field of per-word label ids.
LABEL_KEY = {"conll2003": "ner", "brown_pos": "tags"}
OWN_LABEL_KEY = "tag_ids"
_SPLIT_COUNTS = {}      # memo of the named datasets' per-split label counts
_WARNED = set()         # (source name, split): absent-from-train labels are reported once


def _unknown(dataset) -> errors.ConfigError:
  return errors.ConfigError(f"unknown dataset {dataset!r}; valid: {list(builders.DATASETS)}, or "
                           "own files as conll:<folder|file>, tsv:, csv:, jsonl: (classification) "
                           "or text:<file|folder>")


def task_of(dataset: str) -> str:
  """'token_cls', 'seq_cls' or 'lm' for a dataset name or own-files spec (reads no file).

  Raises:
    ValueError: an unknown dataset, listing the valid ones.
  """
  if dataset in LABEL_KEY:
    return "token_cls"
  if dataset == "sst2":
    return "seq_cls"
  if dataset in builders.DATASETS:
    return "lm"
  parsed = own.parse(dataset)
  if parsed is None:
    raise _unknown(dataset)
  return own.KIND_TASK[parsed[0]]


class Examples(list):
  """A split held in memory, with the random-access interface of a TFDS data source."""

  def __getitems__(self, indices):
    return [self[i] for i in indices]


@dataclasses.dataclass
class Source:
  """A dataset: its task, identity (keys every cache), label names and splits.

  Attributes:
    dataset: the name or spec it was made from.
    task: token_cls | seq_cls | lm.
    name: content identity (the TFDS config name, or 'own-' + a hash of the files and options).
    label_names: id -> label ([] for plain text).
    label_key: token_cls: the example field of per-word label ids.
    own: made from a user's own files.
    files: split -> the file(s) it comes from, for messages.
  """
  dataset: str
  task: str
  name: str
  label_names: list
  label_key: Optional[str]
  own: bool
  files: dict
  _split_fn: Callable

  def split(self, split: str):
    """Random-access examples of a split (len, [i], __getitems__); strings may be bytes or str."""
    return self._split_fn(split)


def get(dataset, data_dir: Optional[str] = None, cache_dir: Optional[str] = None, label_names=None,
        **options) -> Source:
  """The Source of a named dataset or own-files spec (a Source is returned unchanged).

  Args:
    dataset: one of builders.DATASETS, or '<kind>:<folder|file>' (see own.resolve).
    data_dir: the shared data folder of the named datasets (default builders.DEFAULT_DATA_DIR).
    cache_dir: prepared-data cache (default builders.DEFAULT_CACHE_DIR).
    label_names: a fixed label list (token classification, own classification).
    **options: own.OPTION_DEFAULTS keys; named datasets accept them only at their defaults.

  Raises:
    ValueError: unknown dataset or option; FileNotFoundError, DataFormatError: see the readers.
  """
  if isinstance(dataset, Source):
    return dataset
  if dataset in builders.DATASETS:
    bad = sorted(k for k, v in options.items() if v is not None and v != own.OPTION_DEFAULTS.get(k))
    if bad:
      raise ValueError(f"data config: {bad} apply to own-files datasets (conll:, tsv:, csv:, "
                       f"jsonl:, text:<path>), not to {dataset!r}")
    return _named(dataset, data_dir or builders.DEFAULT_DATA_DIR, cache_dir, label_names)
  if own.parse(dataset) is None:
    raise _unknown(dataset)
  return _own(own.resolve(dataset, label_names, **options))


def load_split(dataset: str, split: str, data_dir: Optional[str] = None,
               cache_dir: Optional[str] = None, label_names=None, **options):
  """Random-access examples of one split of a named dataset or own files (see get).

  Named datasets come from their prepared TFDS build (strings as bytes, labels as ids); own files
  from memory (strings as str; fields in own.load).
  """
  return get(dataset, data_dir, cache_dir, label_names, **options).split(split)


def label_names_of(dataset: str, data_dir: Optional[str] = None, cache_dir: Optional[str] = None,
                   label_names=None, **options) -> list:
  """The label list of a dataset (the one its integer labels index)."""
  return list(get(dataset, data_dir, cache_dir, label_names, **options).label_names)


def _named(dataset, data_dir, cache_dir, label_names) -> Source:
  task = task_of(dataset)
  if label_names and task != "token_cls":
    raise ValueError(f"data.label_names: {dataset} has fixed labels")
  builder = builders.get_builder(dataset, data_dir, cache_dir, label_names)
  splits = builder.info.splits

  def split_fn(split):
    if split not in splits:
      raise ValueError(f"{dataset}: unknown split {split!r}; valid: {sorted(splits.keys())}")
    return builder.as_data_source(split=split)
  src = Source(dataset, task, builder.builder_config.name, builders.stored_label_names(builder),
               LABEL_KEY.get(dataset), False, _named_files(dataset, data_dir), split_fn)
  if task != "lm":
    _warn_unseen(src, _named_split_counts(src, builder, cache_dir))
  return src


def _named_files(dataset, data_dir) -> dict:
  if dataset == "conll2003":
    return {s: os.path.join(data_dir, "conll2003", f) for s, f in readers.CONLL_FILES.items()}
  if dataset == "sst2":
    return {s: os.path.join(data_dir, "sst2", f) for s, f in readers.SST2_FILES.items()}
  return {s: f"{os.path.join(data_dir, 'brown')} ({s} files of readers.brown_split)"
          for s in readers.BROWN_SPLITS}


def _named_split_counts(src, builder, cache_dir) -> dict:
  """split -> {label: count} of a prepared dataset, memoised in memory and in cache_dir/labels."""
  cache_dir = os.path.abspath(cache_dir or builders.DEFAULT_CACHE_DIR)
  path = os.path.join(cache_dir, "labels", f"{builder.name}-{src.name}-splits.json")
  if path not in _SPLIT_COUNTS and os.path.exists(path):
    with open(path) as f:
      _SPLIT_COUNTS[path] = json.load(f)
  if path not in _SPLIT_COUNTS:
    counts = {}
    for split in builder.info.splits.keys():
      ds = builder.as_data_source(split=split)
      c = collections.Counter()
      for start in range(0, len(ds), 4096):
        for e in ds.__getitems__(list(range(start, min(start + 4096, len(ds))))):
          ids = e[src.label_key] if src.label_key else [e["label"]]
          c.update(src.label_names[int(i)] for i in ids)
      counts[split] = dict(sorted(c.items()))
    atomic.write_bytes(path, json.dumps(counts).encode())
    _SPLIT_COUNTS[path] = counts
  return _SPLIT_COUNTS[path]


def _warn_unseen(src: Source, counts: dict) -> None:
  """Warns (once per process and split) of the labels of a non-training split that training never
  shows, naming them and the files."""
  train = set(counts.get("train", {}))
  for split, c in counts.items():
    unseen = {label: n for label, n in c.items() if label not in train}
    if split == "train" or not unseen or (src.name, split) in _WARNED:
      continue
    _WARNED.add((src.name, split))
    listed = ", ".join(f"{label!r} ({n}x)" for label, n in unseen.items())
    logging.warning("%s: label(s) %s do not occur in the training data (%s): the model can never "
                    "predict them; they are still scored", src.files.get(split), listed,
                    src.files.get("train"))


def _own(spec: own.Spec) -> Source:
  loaded = own.load(spec)

  def split_fn(split):
    if split not in loaded.splits:
      raise ValueError(f"{spec.dataset}: no {split} split (a folder's {split} file is one of "
                       f"{own._candidates(spec.kind, split)}; or name one with data.{split})")
    return Examples(loaded.splits[split])
  files = {s: ", ".join(p) for s, p in spec.files}
  key = OWN_LABEL_KEY if spec.task == "token_cls" else None
  src = Source(spec.dataset, spec.task, "own-" + loaded.fingerprint, loaded.label_names, key, True,
               files, split_fn)
  _warn_unseen(src, loaded.counts)
  return src


# ---------------------------------------------------------------- gold labels

def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _one_line(e) -> str:
  """The example's text on one line (a pair joined by own.PAIR_SEPARATOR), for prediction files."""
  text = _text(e["sentence"])
  if "sentence_b" in e:
    text += own.PAIR_SEPARATOR + _text(e["sentence_b"])
  return re.sub(r"[\t\r\n]+", " ", text)


def gold(src: Source, split: str, limit: int = 0) -> tuple:
  """(inputs, gold) of the first `limit` examples of a split (0 = all), in split order.

  Token classification: word lists and tag-name lists; sequence classification: texts (one line;
  pairs joined by own.PAIR_SEPARATOR) and label names. A label that training never shows keeps its
  name (it is scored, and can never be predicted).

  Raises:
    ValueError: a plain-text corpus (no labels), or an unknown split.
  """
  if src.task == "lm":
    raise ValueError(f"{src.dataset}: a plain-text corpus has no gold labels")
  data = src.split(split)
  n = len(data) if not limit else min(limit, len(data))
  examples = data.__getitems__(list(range(n))) if n else []
  if src.task == "token_cls":
    inputs = [[_text(w) for w in e["tokens"]] for e in examples]
    labels = [list(e["tag_names"]) if "tag_names" in e else
              [src.label_names[int(t)] for t in e[src.label_key]] for e in examples]
    return inputs, labels
  labels = [e["label_name"] if "label_name" in e else src.label_names[int(e["label"])]
            for e in examples]
  return [_one_line(e) for e in examples], labels
