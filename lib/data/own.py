"""A user's own files as datasets: conll:/tsv:/csv:/jsonl:/text: specs, split files, readers."""

import collections
import csv
import dataclasses
import hashlib
import json
import logging
import os
import re
from typing import Optional, Sequence

import numpy as np

from lib.data import readers
from lib.data.readers import DataFormatError

# Dataset spec prefix -> task. `conll:` is token classification (tagging), `tsv:`/`csv:`/`jsonl:`
# sequence classification (single texts or pairs), `text:` plain text for LM pretraining.
KIND_TASK = {"conll": "token_cls", "tsv": "seq_cls", "csv": "seq_cls", "jsonl": "seq_cls",
             "text": "lm"}
SPLITS = ("train", "validation", "test")
# File names accepted for each split in a dataset folder: a stem and one of the kind's extensions.
SPLIT_STEMS = {"train": ("train",), "validation": ("validation", "valid", "dev"),
               "test": ("test",)}
EXTENSIONS = {"conll": (".txt", ".conll", ".iob", ".bio", ".tsv", ""), "tsv": (".tsv",),
              "csv": (".csv",), "jsonl": (".jsonl",), "text": (".txt",)}
TAG_SCHEMES = ("auto", "iob1", "iob2", "bioes", "bilou", "none")
_SCHEME_PREFIXES = {"auto": "BIESLU", "iob1": "BI", "iob2": "BI", "bioes": "BIES", "bilou": "BILU"}
_TAG = re.compile(r"^([A-Z])-(\S+)$")
DOCSTART = "-DOCSTART-"
# The options of own datasets (make_batches keywords) and their defaults.
OPTION_DEFAULTS = dict(train_file="", validation_file="", test_file="", word_column=0,
                       tag_column=-1, tag_scheme="auto", text_columns="", label_column="label")
KIND_OPTIONS = {"token_cls": ("word_column", "tag_column", "tag_scheme"),
                "seq_cls": ("text_columns", "label_column"), "lm": ()}
# Plain text without a validation file: the last 10% of its documents are held out.
TEXT_HELD_OUT_FRACTION = 0.1
# Joins the two texts of a sentence pair where one string is needed (gold inputs, predictions).
PAIR_SEPARATOR = " ||| "


def parse(dataset: str) -> Optional[tuple]:
  """(kind, path) of an own-files spec like 'conll:/data/ner' ('conll' alone: path ''), or None."""
  kind, _, path = dataset.partition(":")
  return (kind, path) if kind in KIND_TASK else None


@dataclasses.dataclass(frozen=True)
class Spec:
  """An own dataset: its kind, the files of each split and how to read them."""
  dataset: str
  kind: str
  files: tuple                  # ((split, (path, ...)), ...) in SPLITS order
  word_column: int = 0
  tag_column: int = -1
  tag_scheme: str = "auto"
  text_columns: tuple = ()
  label_column: str = "label"
  label_names: tuple = ()       # a fixed label list (default: the training split's labels)

  @property
  def task(self) -> str:
    return KIND_TASK[self.kind]

  def paths(self, split: str) -> tuple:
    return dict(self.files).get(split, ())

  def fingerprint(self) -> str:
    """Hash of the files' contents and the reading options: a changed file gives a new identity."""
    h = hashlib.blake2b(digest_size=8)
    h.update(repr((self.kind, self.word_column, self.tag_column, self.tag_scheme,
                   self.text_columns, self.label_column, self.label_names)).encode())
    for split, paths in self.files:
      for path in paths:
        h.update(f"|{split}|{os.path.basename(path)}|".encode())
        with open(path, "rb") as f:
          h.update(f.read())
    return h.hexdigest()


def resolve(dataset: str, label_names=None, **options) -> Spec:
  """The Spec of an own-files dataset.

  Args:
    dataset: '<kind>:<folder or file>' (a file is the training file) or '<kind>' alone, with the
      files given as options; kinds: conll, tsv, csv, jsonl, text.
    label_names: a fixed label list (default: the labels of the training split).
    **options: OPTION_DEFAULTS keys (train_file, validation_file, test_file override the folder's).

  Raises:
    ValueError: not an own-files spec, an unknown option or value, no training file.
    FileNotFoundError: a named file or folder that does not exist.
  """
  kind, path = parse(dataset) or (None, None)
  if kind is None:
    raise ValueError(f"unknown dataset {dataset!r}")
  unknown = sorted(set(options) - set(OPTION_DEFAULTS))
  if unknown:
    raise ValueError(f"data config: unknown keys {unknown} for dataset {dataset!r}")
  opt = dict(OPTION_DEFAULTS, **{k: v for k, v in options.items() if v is not None})
  for k in sorted(set(OPTION_DEFAULTS) - set(KIND_OPTIONS[KIND_TASK[kind]])):
    if not k.endswith("_file") and opt[k] != OPTION_DEFAULTS[k]:
      raise ValueError(f"data.{k}={opt[k]!r} does not apply to {kind}: datasets (their options: "
                       f"{list(KIND_OPTIONS[KIND_TASK[kind]])})")
  files = _split_files(dataset, kind, path, opt)
  if opt["tag_scheme"] not in TAG_SCHEMES:
    raise ValueError(f"data.tag_scheme={opt['tag_scheme']!r}; valid: {list(TAG_SCHEMES)}")
  cols = opt["text_columns"]
  cols = tuple(c.strip() for c in (cols.split(",") if isinstance(cols, str) else cols) if c.strip())
  if len(cols) > 2:
    raise ValueError(f"data.text_columns={opt['text_columns']!r}: one column, or two for pairs")
  return Spec(dataset, kind, tuple((s, files[s]) for s in SPLITS if s in files),
              int(opt["word_column"]), int(opt["tag_column"]), opt["tag_scheme"], cols,
              str(opt["label_column"]), tuple(label_names or ()))


def _split_files(dataset, kind, path, opt) -> dict:
  """split -> paths: the folder's split files (or the file as train), then the explicit ones."""
  files = {}
  if path and os.path.isdir(path):
    files = _folder_files(dataset, kind, path)
  elif path and os.path.isfile(path):
    files = {"train": (path,)}
  elif path:
    raise FileNotFoundError(f"data.dataset={dataset!r}: {path} is neither a file nor a folder")
  for split in SPLITS:
    given = opt[f"{split}_file"]
    if given:
      key = "data." + split
      if not os.path.isfile(given):
        raise FileNotFoundError(f"{key}={given!r}: data file not found")
      files[split] = (given,)
  if "train" not in files:
    where = f" in {path}" if path else ""
    raise ValueError(f"data.dataset={dataset!r}: no training file{where} (looked for "
                     f"{_candidates(kind, 'train')}); name one with data.train")
  return files


def _candidates(kind, split) -> list:
  return [stem + ext for stem in SPLIT_STEMS[split] for ext in EXTENSIONS[kind]]


def _folder_files(dataset, kind, folder) -> dict:
  files = {}
  for split in SPLITS:
    found = [n for n in _candidates(kind, split) if os.path.isfile(os.path.join(folder, n))]
    if len(found) > 1:
      raise ValueError(f"data.dataset={dataset!r}: {folder} holds {found} for the {split} split; "
                       f"keep one, or name it with data.{split}")
    if found:
      files[split] = (os.path.join(folder, found[0]),)
  if kind == "text" and "train" not in files:   # a folder of .txt files: all are training text
    txt = sorted(n for n in os.listdir(folder) if n.endswith(".txt")
                 and os.path.isfile(os.path.join(folder, n)))
    if txt:
      files["train"] = tuple(os.path.join(folder, n) for n in txt)
  return files


# ---------------------------------------------------------------- token classification (CoNLL)

def _columns(line: str, tab: bool) -> list:
  """Columns of a data line: tab-separated files split at tabs (a word may hold spaces), others at
  runs of whitespace; surrounding whitespace never belongs to a column."""
  return [c.strip() for c in line.strip().split("\t")] if tab else line.split()


def _column_index(spec_value, name, ncols, path, line_no, raw) -> int:
  if not -ncols <= spec_value < ncols:
    raise DataFormatError(f"{path}:{line_no}: data.{name}={spec_value} but the line has {ncols} "
                          f"columns: {raw!r}")
  return spec_value % ncols


def _tagged_rows(path: str, word_column: int, tag_column: int):
  """Yields (line_no, word, tag) per data line and (line_no, None, None) per break (blank line or
  -DOCSTART-: `tag` is DOCSTART for the latter); checks that every line has the same columns."""
  lines = readers.read_lines(path)
  tab = any("\t" in line.strip() for line in lines)   # a trailing tab does not make a TSV
  ncols = first = None
  for line_no, raw in enumerate(lines, 1):
    cols = _columns(raw, tab)
    if not cols or not any(cols):
      yield line_no, None, None
      continue
    if cols[0] == DOCSTART:
      yield line_no, None, DOCSTART
      continue
    if ncols is None:
      ncols, first = len(cols), line_no
      if ncols < 2:
        raise DataFormatError(f"{path}:{line_no}: expected a word and a tag column, got 1 column: "
                              f"{raw!r}")
      w = _column_index(word_column, "word_column", ncols, path, line_no, raw)
      t = _column_index(tag_column, "tag_column", ncols, path, line_no, raw)
      if w == t:
        raise ValueError(f"{path}: data.word_column={word_column} and data.tag_column="
                         f"{tag_column} name the same column")
    if len(cols) != ncols:
      raise DataFormatError(f"{path}:{line_no}: expected {ncols} columns (as on line {first}), "
                            f"got {len(cols)}: {raw!r}")
    if not cols[w] or not cols[t]:
      raise DataFormatError(f"{path}:{line_no}: empty {'word' if not cols[w] else 'tag'} "
                            f"column: {raw!r}")
    yield line_no, cols[w], cols[t]


def read_tagged(path: str, word_column: int = 0, tag_column: int = -1, scheme: str = "auto"):
  """Sentences of a CoNLL-style file: one word per line, blank lines between sentences.

  Columns are tab-separated (when any line holds a tab) or whitespace-separated; `-DOCSTART-`
  lines (optional) separate documents. Tags are converted to IOB2 (see to_iob2).

  Returns:
    (sentences, stats): dicts tokens, tag_names (IOB2 unless scheme 'none'), doc_id, idx, line
    (of the first word); stats counts documents, sentences, tokens and converted tags.

  Raises:
    FileNotFoundError, DataFormatError: missing/empty file; a line with another column count, an
      empty word or tag, a column index out of range, a tag outside the scheme (file:line).
  """
  sents, cur, doc_id, converted = [], [], 0, 0
  for line_no, word, tag in list(_tagged_rows(path, word_column, tag_column)) + [(0, None, None)]:
    if word is not None:
      cur.append((line_no, word, tag))
      continue
    if cur:
      tags, n = to_iob2([t for _, _, t in cur], scheme, path, [ln for ln, _, _ in cur])
      converted += n
      sents.append(dict(tokens=[w for _, w, _ in cur], tag_names=tags, doc_id=doc_id,
                        idx=len(sents), line=cur[0][0]))
      cur = []
    if tag == DOCSTART and sents:
      doc_id += 1
  if not sents:
    raise DataFormatError(f"{path}: no sentences found")
  if converted:
    logging.info("%s: %d tags changed converting them (tag_scheme=%s) to IOB2, the scheme the "
                 "model trains on", path, converted, scheme)
  return sents, dict(documents=len({s["doc_id"] for s in sents}), sentences=len(sents),
                     tokens=sum(len(s["tokens"]) for s in sents), converted_tags=converted)


def to_iob2(tags: Sequence[str], scheme: str, path: str = "", lines: Sequence[int] = ()):
  """Converts one sentence's tags to IOB2: S-/U- -> B-, E-/L- -> I-, I-X after O or another type
  -> B-X (IOB1, and the repair conlleval applies to IOB2). 'auto' accepts all of these prefixes.

  Args:
    tags: the sentence's tags.
    scheme: one of TAG_SCHEMES; 'none' returns the tags unchanged (e.g. POS tags).
    path, lines: the file and the tags' line numbers, for errors.

  Returns:
    (IOB2 tags, number of tags changed).

  Raises:
    DataFormatError: a tag that is not 'O' or PREFIX-TYPE with a prefix of the scheme.
  """
  if scheme == "none":
    return list(tags), 0
  allowed = _SCHEME_PREFIXES[scheme]
  out = []
  for k, tag in enumerate(tags):
    m = _TAG.match(tag)
    if tag != "O" and (not m or m.group(1) not in allowed):
      where = f"{path}:{lines[k]}" if lines else path
      raise DataFormatError(
          f"{where}: tag {tag!r} is not {scheme.upper()} ('O', or one of "
          f"{', '.join(p + '-' for p in allowed)} then the type); data.tag_scheme='none' reads "
          f"tags as they are (e.g. POS)")
    out.append(tag if tag == "O" else ("B-" if m.group(1) in "BSU" else "I-") + m.group(2))
  out, _ = readers.repair_iob(out)
  return out, sum(a != b for a, b in zip(tags, out))


# ---------------------------------------------------------------- sequence classification

def _tsv_rows(path: str):
  """(line_no, fields, line) of a TSV file's non-blank lines: fields stripped, trailing empty ones
  dropped."""
  for line_no, raw in enumerate(readers.read_lines(path), 1):
    if raw.strip():
      fields = [f.strip() for f in raw.split("\t")]
      while len(fields) > 1 and not fields[-1]:
        fields.pop()
      yield line_no, fields, raw


def _csv_rows(path: str):
  """(line_no, fields, line) of a CSV file's records (a quoted field may hold commas and line
  breaks; line_no is where the record starts)."""
  lines = readers.read_lines(path)
  # Line ends given back, so that a quoted field spanning lines keeps its line break.
  reader = csv.reader(line + "\n" for line in lines)
  end = 0
  try:
    for fields in reader:
      start, end = end + 1, reader.line_num
      fields = [f.strip() for f in fields]
      while len(fields) > 1 and not fields[-1]:
        fields.pop()
      if any(fields):
        yield start, fields, lines[start - 1]
  except csv.Error as e:
    raise DataFormatError(f"{path}:{end + 1}: not valid CSV ({e})") from None


def _table_records(path: str, kind: str):
  """(line_no, {column: value}, raw line) per data row of a TSV/CSV (header line) or JSONL file."""
  if kind == "jsonl":
    for line_no, raw in enumerate(readers.read_lines(path), 1):
      if not raw.strip():
        continue
      try:
        obj = json.loads(raw)
      except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{line_no}: not valid JSON ({e.msg}): {raw!r}") from None
      if not isinstance(obj, dict):
        raise DataFormatError(f"{path}:{line_no}: expected a JSON object per line: {raw!r}")
      yield line_no, obj, raw
    return
  rows = _tsv_rows(path) if kind == "tsv" else _csv_rows(path)
  _, header, _ = next(rows, (0, None, ""))
  if not header:
    raise DataFormatError(f"{path}: file is empty")
  for line_no, fields, raw in rows:
    if len(fields) != len(header):
      raise DataFormatError(f"{path}:{line_no}: expected {len(header)} {kind.upper()} fields "
                            f"({', '.join(header)}), got {len(fields)}: {raw!r}")
    yield line_no, dict(zip(header, fields)), raw


def _text_columns(columns, record, label_column, path, line_no) -> tuple:
  """The configured text columns, or the obvious one ('sentence', 'text', or the only other)."""
  if columns:
    return columns
  names = [c for c in ("sentence", "text") if c in record]
  names = names[:1] or [c for c in record if c != label_column]
  if len(names) != 1:
    raise DataFormatError(f"{path}:{line_no}: which column holds the text? columns: "
                          f"{list(record)}; set data.text_columns (one name, or two for pairs)")
  return tuple(names)


def read_table(path: str, kind: str, text_columns: Sequence[str] = (), label_column="label"):
  """Examples of a classification file: TSV or CSV with a header line, or JSON lines.

  Returns:
    list of dicts texts (tuple of one or two stripped strings), label_name (str), line.

  Raises:
    DataFormatError: a row with another field count, a missing column, an empty text or label,
      bad JSON/CSV (file:line, with what was expected).
  """
  out = []
  for line_no, rec, raw in _table_records(path, kind):
    cols = _text_columns(tuple(text_columns), rec, label_column, path, line_no)
    for c in cols + (label_column,):
      if c not in rec:
        what = "label column (data.label_column)" if c == label_column else "text column"
        raise DataFormatError(f"{path}:{line_no}: no {what} {c!r}; columns: {list(rec)}")
    texts = tuple(str(rec[c]).strip() if rec[c] is not None else "" for c in cols)
    label = rec[label_column]
    label = "" if label is None else str(label).strip()
    for c, t in zip(cols + (label_column,), texts + (label,)):
      if not t:
        raise DataFormatError(f"{path}:{line_no}: empty {'label' if c == label_column else 'text'}"
                              f" in column {c!r}: {raw!r}")
    out.append(dict(texts=texts, label_name=label, line=line_no))
  if not out:
    raise DataFormatError(f"{path}: no examples found")
  return out


# ---------------------------------------------------------------- plain text

def read_documents(paths: Sequence[str]) -> list:
  """Documents of plain-text files: blocks of non-blank lines (blank lines separate documents)."""
  docs = []
  for path in paths:
    cur = []
    for line in readers.read_lines(path) + [""]:
      if line.strip():
        cur.append(line.rstrip())
      elif cur:
        docs.append("\n".join(cur))
        cur = []
  return docs


# ---------------------------------------------------------------- loading (labels from train)

@dataclasses.dataclass
class Loaded:
  """An own dataset read into memory: label names and per split example dicts (see load)."""
  spec: Spec
  fingerprint: str
  label_names: list
  splits: dict
  counts: dict     # split -> {label: count}


_LOADED = {}


def load(spec: Spec) -> Loaded:
  """Reads every split of an own dataset (memoised by content); labels from the training split.

  Examples are dicts with idx (position in the split) and line, and per task:
    token_cls: tokens, tag_names (IOB2 unless tag_scheme 'none'), tag_ids (int32; -1 for a tag
      outside the label set), doc_id;
    seq_cls: sentence (and sentence_b for pairs), label_name, label (id; -1 outside the set);
    lm: text.
  """
  key = (spec, spec.fingerprint())
  if key not in _LOADED:
    raw = {split: _read_split(spec, paths) for split, paths in spec.files}
    if spec.task == "lm":
      _LOADED[key] = Loaded(spec, key[1], [], _text_splits(spec, raw), {})
    else:
      names = list(spec.label_names) or _train_labels(spec, raw["train"])
      counts = {s: dict(sorted(collections.Counter(t for e in examples
                                                   for t in _names(e, spec.task)).items()))
                for s, examples in raw.items()}
      _LOADED[key] = Loaded(spec, key[1], names, _with_label_ids(spec, raw, names), counts)
  return _LOADED[key]


def _read_split(spec, paths):
  if spec.task == "token_cls":
    return read_tagged(paths[0], spec.word_column, spec.tag_column, spec.tag_scheme)[0]
  if spec.task == "seq_cls":
    return read_table(paths[0], spec.kind, spec.text_columns, spec.label_column)
  return read_documents(paths)


def _names(e, task) -> list:
  return e["tag_names"] if task == "token_cls" else [e["label_name"]]


def _train_labels(spec, examples) -> list:
  """Label list from the training split: IOB tags as 'O' + B-/I- per type (types sorted), plain
  tags sorted, class labels sorted (numerically when all are integers)."""
  seen = {t for e in examples for t in _names(e, spec.task)}
  if spec.task == "token_cls":
    return readers.iob_label_names(seen) if spec.tag_scheme != "none" else sorted(seen)
  if all(re.fullmatch(r"-?\d+", s) for s in seen):
    return sorted(seen, key=int)
  return sorted(seen)


def _with_label_ids(spec, raw, names) -> dict:
  """split -> examples with label ids (-1: not in `names`); a training label outside a fixed label
  list is an error (file:line)."""
  index = {n: i for i, n in enumerate(names)}
  for e in raw["train"]:
    bad = [t for t in _names(e, spec.task) if t not in index]
    if bad:
      raise DataFormatError(f"{spec.paths('train')[0]}:{e['line']}: label {bad[0]!r} is not in "
                            f"data.label_names={names}")
  return {split: [_example(spec.task, e, index, i) for i, e in enumerate(examples)]
          for split, examples in raw.items()}


def _example(task, e, index, idx) -> dict:
  if task == "token_cls":
    ids = np.array([index.get(t, -1) for t in e["tag_names"]], np.int32)
    return dict(e, tag_ids=ids, idx=idx)
  out = dict(sentence=e["texts"][0], label_name=e["label_name"],
             label=index.get(e["label_name"], -1), idx=idx, line=e["line"])
  if len(e["texts"]) > 1:
    out["sentence_b"] = e["texts"][1]
  return out


def _text_splits(spec, raw) -> dict:
  """Plain-text splits; without a validation file the last 10% of the training documents."""
  splits = dict(raw)
  if "validation" not in splits:
    docs = splits["train"]
    if len(docs) < 2:
      raise DataFormatError(f"{spec.paths('train')[0]}: {len(docs)} document(s); the held-out "
                            f"split needs at least two (blank lines separate documents) or "
                            f"data.validation")
    n = max(1, int(round(len(docs) * TEXT_HELD_OUT_FRACTION)))
    splits = dict(splits, train=docs[:-n], validation=docs[-n:])
    logging.info("%s: the last %d of %d documents are the validation split", spec.dataset, n,
                 len(docs))
  return {s: [dict(text=t, idx=i) for i, t in enumerate(docs)] for s, docs in splits.items()}
