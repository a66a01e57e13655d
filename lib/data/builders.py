"""TFDS builders (array_record, no TensorFlow) for CoNLL-2003, SST-2, Brown POS and plain-text corpora; load_split."""

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
from typing import Optional, Sequence

import numpy as np
import tensorflow_datasets as tfds

from lib import atomic
from lib.data import readers

# Bump when the parsing or the features change: it is part of every cache key, so old caches are not reused.
CODE_VERSION = "1"
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "workbench_data")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The shared data folder of the named datasets: beside the repository, never inside it. The one
# definition (configs/common.py's DATA_DIR refers to it).
DEFAULT_DATA_DIR = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")
TEXT_CORPORA = ("brown", "shakespeare", "conll2003", "sst2")
DATASETS = ("conll2003", "sst2", "brown_pos") + tuple(f"text:{c}" for c in TEXT_CORPORA)

tfds.display_progress_bar(False)


class _QuietCustomConfig(logging.Filter):
  """Drops tfds's 'Using custom data configuration' warning: our configs are always custom (hash-named)."""

  def filter(self, record):
    return not str(record.msg).startswith("Using custom data configuration")


logging.getLogger("absl").addFilter(_QuietCustomConfig())


@dataclasses.dataclass(eq=False)
class SourceConfig(tfds.core.BuilderConfig):
  """Builder config: where the raw files are, and the label set. Its name is a hash of both plus the files."""
  source_dir: str = ""
  label_names: tuple = ()
  corpus: str = ""


def source_files(dataset: str, data_dir: str) -> list:
  """The raw files a dataset is built from (their content keys the cache)."""
  if dataset == "conll2003":
    return [os.path.join(data_dir, "conll2003", f) for f in readers.CONLL_FILES.values()]
  if dataset == "sst2":
    return [os.path.join(data_dir, "sst2", f) for f in readers.SST2_FILES.values()]
  if dataset in ("brown_pos", "text:brown"):
    src = os.path.join(data_dir, "brown")
    return [os.path.join(src, "cats.txt")] + [os.path.join(src, f)
                                               for f in sorted(readers.read_brown_categories(src))]
  if dataset == "text:shakespeare":
    return [os.path.join(data_dir, "tinyshakespeare", "input.txt")]
  if dataset.startswith("text:"):
    return source_files(dataset[5:], data_dir)
  raise ValueError(f"unknown dataset {dataset!r}; valid: {list(DATASETS)}")


def source_hash(files: Sequence[str], extra: str = "") -> str:
  """Content hash of the source files (and of `extra`, e.g. the label set and CODE_VERSION)."""
  h = hashlib.blake2b(digest_size=8)
  h.update(f"{CODE_VERSION}|{extra}".encode())
  for path in files:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: data file not found")
    h.update(os.path.basename(path).encode())
    with open(path, "rb") as f:
      h.update(f.read())
  return h.hexdigest()


# Lists are stored as 1-D Tensor features (strings as bytes objects, labels as int32 ids into
# info.metadata["label_names"]): 4x faster to build and read than Sequence(Text/ClassLabel).
def _seq_text():
  return tfds.features.Tensor(shape=(None,), dtype=np.object_)


def _seq_int():
  return tfds.features.Tensor(shape=(None,), dtype=np.int32)


def _label_ids(tags, label_names):
  index = {t: i for i, t in enumerate(label_names)}
  return np.array([index[t] for t in tags], np.int32)


def _int():
  return tfds.features.Scalar(dtype=np.int32)


class _Builder(tfds.core.GeneratorBasedBuilder):
  """Shared base: no checksums file to look up (tfds would import importlib_resources to find one)."""
  code_path = None


class WbConll2003(_Builder):
  """CoNLL-format NER (4 columns); label set from the config (derived from the data by load_split)."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "tokens": _seq_text(), "pos": _seq_text(), "chunk": _seq_text(),
            "ner": _seq_int(), "doc_id": _int(), "sent_in_doc": _int(), "idx": _int()}),
        metadata=tfds.core.MetadataDict(label_names=list(self.builder_config.label_names)),
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    return {s: self._generate_examples(os.path.join(self.builder_config.source_dir, f))
            for s, f in readers.CONLL_FILES.items()}

  def _generate_examples(self, path):
    labels = self.builder_config.label_names
    sents, stats = readers.read_conll(path, labels)
    logging.info("%s: %s", path, stats)
    for s in sents:
      e = {k: s[k] for k in ("tokens", "pos", "chunk", "doc_id", "sent_in_doc", "idx")}
      yield s["idx"], dict(e, ner=_label_ids(s["ner"], labels))


class WbSst2(_Builder):
  """GLUE SST-2: sentence, label (0 negative / 1 positive), idx."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "sentence": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=["negative", "positive"]), "idx": _int()}),
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    return {s: self._generate_examples(os.path.join(self.builder_config.source_dir, f))
            for s, f in readers.SST2_FILES.items()}

  def _generate_examples(self, path):
    for e in readers.read_sst2(path)[0]:
      yield e["idx"], e


class WbBrownPos(_Builder):
  """Brown POS tagging; split by file id stratified by genre (readers.brown_split)."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "tokens": _seq_text(),
            "tags": _seq_int(), "file_id": tfds.features.Text(), "genre": tfds.features.Text(), "idx": _int()}),
        metadata=tfds.core.MetadataDict(label_names=list(self.builder_config.label_names)),
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    return {s: self._generate_examples(s) for s in readers.BROWN_SPLITS}

  def _generate_examples(self, split):
    labels = self.builder_config.label_names
    for e in readers.read_brown(self.builder_config.source_dir, split):
      if not set(e["tags"]) <= set(labels):
        bad = sorted(set(e["tags"]) - set(labels))
        raise readers.DataFormatError(f"{self.builder_config.source_dir}/{e['file_id']}: tags {bad} are not in "
                                      f"the label set {list(labels)}")
      yield e["idx"], dict(e, tags=_label_ids(e["tags"], labels))


class WbText(_Builder):
  """Plain-text documents for LM pretraining (readers.text_documents); the corpus is a config field."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "idx": _int()}),
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    splits = readers.SHAKESPEARE_SPLITS if self.builder_config.corpus == "shakespeare" else readers.BROWN_SPLITS
    return {s: self._generate_examples(s) for s in splits}

  def _generate_examples(self, split):
    docs = readers.text_documents(self.builder_config.corpus, self.builder_config.source_dir, split)
    for i, text in enumerate(docs):
      yield i, {"text": text, "idx": i}


def ner_label_names(data_dir: str) -> list:
  """CoNLL-2003 NER labels derived from the data: 'O', then B-/I- per type, types sorted."""
  return readers.conll_label_names(os.path.join(data_dir, "conll2003"))


def pos_label_names(data_dir: str) -> list:
  """Brown POS tags derived from the data (sorted)."""
  return readers.brown_label_names(os.path.join(data_dir, "brown"))


_DERIVED_LABELS = {}  # (dataset, source hash) -> labels; deriving Brown's tags reads the whole corpus


def _derived_labels(dataset, data_dir, files_hash, cache_dir):
  """Labels derived from the data, memoised in memory and in cache_dir/labels (keyed by the source hash)."""
  key = (dataset, files_hash)
  path = os.path.join(cache_dir, "labels", f"{dataset}-{files_hash}.json")
  if key not in _DERIVED_LABELS and os.path.exists(path):
    with open(path) as f:
      _DERIVED_LABELS[key] = tuple(json.load(f))
  if key not in _DERIVED_LABELS:
    labels = ner_label_names(data_dir) if dataset == "conll2003" else pos_label_names(data_dir)
    atomic.write_bytes(path, json.dumps(labels).encode())
    _DERIVED_LABELS[key] = tuple(labels)
  return _DERIVED_LABELS[key]


def _builder_and_config(dataset, data_dir, label_names, files_hash, cache_dir):
  if dataset in ("conll2003", "brown_pos"):
    labels = tuple(label_names) if label_names else _derived_labels(dataset, data_dir, files_hash, cache_dir)
    cls, sub = (WbConll2003, "conll2003") if dataset == "conll2003" else (WbBrownPos, "brown")
    return cls, dict(source_dir=os.path.join(data_dir, sub), label_names=labels)
  if dataset == "sst2":
    return WbSst2, dict(source_dir=os.path.join(data_dir, "sst2"))
  return WbText, dict(source_dir=data_dir, corpus=dataset[5:])


def get_builder(dataset: str, data_dir: str, cache_dir: Optional[str] = None, label_names=None):
  """The prepared TFDS builder of a dataset, building it first if its source files (or labels) changed.

  Args:
    dataset: one of DATASETS.
    data_dir: the shared data folder (holding conll2003/, sst2/, brown/, tinyshakespeare/).
    cache_dir: where prepared array_record files live (default DEFAULT_CACHE_DIR).
    label_names: NER / POS label list; default derived from the data.
  """
  if dataset not in DATASETS:
    raise ValueError(f"unknown dataset {dataset!r}; valid: {list(DATASETS)}")
  cache_dir = os.path.abspath(cache_dir or DEFAULT_CACHE_DIR)
  os.makedirs(cache_dir, exist_ok=True)
  files_hash = source_hash(source_files(dataset, data_dir), dataset)
  cls, fields = _builder_and_config(dataset, data_dir, label_names, files_hash, cache_dir)
  name = "h" + source_hash([], f"{files_hash}|{fields.get('label_names')}")
  config = SourceConfig(name=name, version=cls.VERSION, description=f"{dataset} from {data_dir}", **fields)
  builder = cls(config=config, data_dir=cache_dir, file_format="array_record")
  if not os.path.isdir(builder.data_dir):
    # A file lock makes concurrent builders (pytest-xdist workers, several users) build once.
    with open(os.path.join(cache_dir, f".{cls.name}.{name}.lock"), "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      builder = cls(config=config, data_dir=cache_dir, file_format="array_record")
      if not os.path.isdir(builder.data_dir):
        logging.info("building %s (%s) into %s", dataset, name, builder.data_dir)
        builder.download_and_prepare()
  return builder


def load_split(dataset: str, split: str, data_dir: str, cache_dir: Optional[str] = None, label_names=None):
  """Random-access source (tfds ArrayRecordDataSource) of one split of a dataset, building it if needed.

  Args:
    dataset: 'conll2003', 'sst2', 'brown_pos', 'text:brown', 'text:shakespeare', 'text:conll2003', 'text:sst2'.
    split: 'train', 'validation' or 'test' ('text:shakespeare' has no test).
    data_dir: the shared data folder.
    cache_dir: prepared-data cache (default ~/.cache/workbench_data).
    label_names: label list for conll2003 / brown_pos (default: derived from the data).

  Returns:
    a sequence of example dicts (strings come back as bytes, class labels as ints) in file order.
  """
  builder = get_builder(dataset, data_dir, cache_dir, label_names)
  splits = builder.info.splits
  if split not in splits:
    raise ValueError(f"{dataset}: unknown split {split!r}; valid: {sorted(splits.keys())}")
  return builder.as_data_source(split=split)


def label_names_of(dataset: str, data_dir: str, cache_dir: Optional[str] = None, label_names=None) -> list:
  """The label list stored in a prepared dataset (the one its integer labels index)."""
  return stored_label_names(get_builder(dataset, data_dir, cache_dir, label_names))


def stored_label_names(builder) -> list:
  """The label list of a prepared builder: a ClassLabel's names, else metadata (empty for text)."""
  info = builder.info
  if "label" in info.features and isinstance(info.features["label"], tfds.features.ClassLabel):
    return list(info.features["label"].names)
  return list(info.metadata.get("label_names", [])) if info.metadata else []
