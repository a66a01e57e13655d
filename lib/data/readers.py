"""Raw-file readers for the source datasets: strict parsing with file:line errors, IOB repair, label sets, splits."""

import collections
import logging
import os
import re
from typing import Iterable, Optional, Sequence

from lib import errors

# Split name -> file name inside each dataset folder.
CONLL_FILES = {"train": "train.txt", "validation": "valid.txt", "test": "test.txt"}
SST2_FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}
BROWN_SPLITS = ("train", "validation", "test")
SHAKESPEARE_SPLITS = ("train", "validation")
SHAKESPEARE_VALIDATION_FRACTION = 0.1

_IOB = re.compile(r"^[BI]-\S+$")


class DataFormatError(errors.UserError, ValueError):
  """A source file does not have the expected format; the message names file:line and the offending text."""


def read_lines(path: str) -> list:
  """Lines of a UTF-8 text file (line terminators and a leading byte-order mark stripped).

  Raises:
    FileNotFoundError: the file does not exist (names the path).
    DataFormatError: the file is empty, or a line is not valid UTF-8 (names file:line).
  """
  if not os.path.isfile(path):
    raise errors.MissingFileError(f"{path}: data file not found")
  with open(path, "rb") as f:
    raw = f.read()
  if not raw.strip():
    raise DataFormatError(f"{path}: file is empty")
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line_no = raw.count(b"\n", 0, e.start) + 1
    start = raw.rfind(b"\n", 0, e.start) + 1
    end = raw.find(b"\n", e.start)
    bad = raw[start:end if end >= 0 else len(raw)]
    raise DataFormatError(f"{path}:{line_no}: invalid UTF-8 ({e.reason} at byte {e.start}): {bad!r}") from None
  lines = text.split("\n")
  if lines and lines[-1] == "":
    lines.pop()  # the file's final newline
  # A byte-order mark opens a file saved by some Windows editors, and sits at the start of a line
  # where such files were concatenated; it is never part of the data.
  return [line.rstrip("\r").lstrip("\ufeff") for line in lines]


# ---------------------------------------------------------------- CoNLL

def _check_tag(tag, label_set, path, line_no, line):
  if tag != "O" and not _IOB.match(tag):
    raise DataFormatError(f"{path}:{line_no}: NER tag {tag!r} is not IOB ('O', 'B-TYPE' or 'I-TYPE'): {line!r}")
  if label_set is not None and tag not in label_set:
    raise DataFormatError(f"{path}:{line_no}: NER tag {tag!r} is not in the label set "
                          f"{sorted(label_set, key=label_sort_key)}: {line!r}")


def repair_iob(tags: Sequence[str]):
  """Repairs an IOB tag sequence as conlleval reads it: `I-X` after `O` or another type starts a chunk.

  Returns:
    (IOB2 tags, number of tags changed from I-X to B-X).
  """
  out, fixed, prev = [], 0, "O"
  for tag in tags:
    if tag.startswith("I-") and (prev == "O" or prev[2:] != tag[2:]):
      tag = "B-" + tag[2:]
      fixed += 1
    out.append(tag)
    prev = tag
  return out, fixed


def _conll_sentences(path: str) -> list:
  """Sentences of a CoNLL file with document ids; checks the column count and the NER tag syntax."""
  sents, cur, doc_id, in_doc, first_line = [], [], -1, 0, 0
  for line_no, line in enumerate(read_lines(path) + [""], 1):   # the sentinel flushes the last sentence
    cols = line.split()
    if cols and len(cols) != 4:
      raise DataFormatError(f"{path}:{line_no}: expected 4 columns (word POS chunk NER), "
                            f"got {len(cols)}: {line!r}")
    if cols and cols[0] != "-DOCSTART-":
      _check_tag(cols[3], None, path, line_no, line)
      first_line = first_line if cur else line_no
      cur.append(cols)
      continue
    if cur:
      sents.append(dict(tokens=[c[0] for c in cur], pos=[c[1] for c in cur], chunk=[c[2] for c in cur],
                        ner=[c[3] for c in cur], doc_id=max(doc_id, 0), sent_in_doc=in_doc, idx=len(sents),
                        line=first_line))
      cur, in_doc = [], in_doc + 1
    if cols:  # -DOCSTART-
      doc_id, in_doc = doc_id + 1, 0
  if not sents:
    raise DataFormatError(f"{path}: no sentences found")
  return sents


def read_conll(path: str, label_names: Optional[Sequence[str]] = None, repair: bool = True):
  """Parses a CoNLL-2003 file (`word POS chunk NER` per line, blank line between sentences).

  Args:
    path: the file.
    label_names: if given, every NER tag (after repair) must be one of these.
    repair: repair IOB errors as conlleval does (counted and logged).

  Returns:
    (sentences, stats): sentences are dicts tokens/pos/chunk/ner (lists of str), doc_id, sent_in_doc,
    idx (sentence index in the file), line (line number of the first word); stats counts documents,
    sentences, tokens and iob_repairs.

  Raises:
    FileNotFoundError, DataFormatError: missing/empty file, wrong column count, bad or unknown tag.
  """
  label_set = set(label_names) if label_names is not None else None
  sents = _conll_sentences(path)
  repairs = 0
  for s in sents:
    if repair:
      s["ner"], fixed = repair_iob(s["ner"])
      repairs += fixed
    if label_set is not None:
      for k, tag in enumerate(s["ner"]):
        if tag not in label_set:  # sentence lines are contiguous, so the word's line is first line + k
          _check_tag(tag, label_set, path, s["line"] + k, read_lines(path)[s["line"] + k - 1])
  if repairs:
    logging.warning("%s: repaired %d IOB tags (I-X after O or another type -> B-X, as conlleval reads them)",
                    path, repairs)
  stats = dict(documents=len({s["doc_id"] for s in sents}), sentences=len(sents),
               tokens=sum(len(s["tokens"]) for s in sents), iob_repairs=repairs)
  return sents, stats


def label_sort_key(tag: str):
  """Deterministic label order: 'O' first, then by type, B- before I-, then anything else."""
  if tag == "O":
    return (0, "", "")
  if _IOB.match(tag):
    return (1, tag[2:], tag[0])
  return (2, tag, "")


def iob_label_names(tags: Iterable[str]) -> list:
  """Label list for IOB tags: 'O', then B-/I- pairs for every type seen (sorted)."""
  types = sorted({t[2:] for t in tags if t != "O"})
  return ["O"] + [f"{p}-{t}" for t in types for p in "BI"]


def conll_label_names(source_dir: str) -> list:
  """NER labels derived from every split file of a CoNLL-format folder (so every split can be encoded)."""
  tags = set()
  for name in CONLL_FILES.values():
    sents, _ = read_conll(os.path.join(source_dir, name), repair=True)
    tags.update(t for s in sents for t in s["ner"])
  return iob_label_names(tags)


# ---------------------------------------------------------------- SST-2

def read_sst2(path: str):
  """Parses a GLUE SST-2 TSV (`sentence<TAB>label` header, label 0/1).

  Returns:
    (examples, stats): examples are dicts sentence (str), label (int), idx; stats counts blank lines skipped.
  """
  lines = read_lines(path)
  if lines[0].split("\t") != ["sentence", "label"]:
    raise DataFormatError(f"{path}:1: expected the header 'sentence<TAB>label', got {lines[0]!r}")
  out, skipped = [], 0
  for line_no, line in enumerate(lines[1:], 2):
    if not line.strip():
      skipped += 1
      continue
    parts = line.rsplit("\t", 1)
    if len(parts) != 2 or parts[1].strip() not in ("0", "1"):
      raise DataFormatError(f"{path}:{line_no}: expected 'sentence<TAB>label' with label 0 or 1: {line!r}")
    sentence = parts[0].strip()
    if not sentence:
      raise DataFormatError(f"{path}:{line_no}: empty sentence: {line!r}")
    out.append(dict(sentence=sentence, label=int(parts[1]), idx=len(out)))
  if skipped:
    logging.warning("%s: skipped %d blank lines", path, skipped)
  return out, {"examples": len(out), "blank_lines_skipped": skipped}


# ---------------------------------------------------------------- Brown

def read_brown_categories(source_dir: str) -> dict:
  """file id -> genre, from `cats.txt`."""
  path = os.path.join(source_dir, "cats.txt")
  cats = {}
  for line_no, line in enumerate(read_lines(path), 1):
    if not line.strip():
      continue
    parts = line.split()
    if len(parts) != 2:
      raise DataFormatError(f"{path}:{line_no}: expected 'fileid genre': {line!r}")
    cats[parts[0]] = parts[1]
  return cats


def brown_split(categories: dict) -> dict:
  """The fixed Brown split: per genre, file ids sorted; position i % 10 == 0 -> test, == 1 -> validation.

  Every genre with at least two files is represented in all three splits (the smallest genre has six);
  about 80/10/10 of the files overall.

  Returns:
    split name -> sorted list of file ids.
  """
  by_genre = collections.defaultdict(list)
  for fid, genre in categories.items():
    by_genre[genre].append(fid)
  split = {s: [] for s in BROWN_SPLITS}
  for genre in sorted(by_genre):
    for i, fid in enumerate(sorted(by_genre[genre])):
      split["test" if i % 10 == 0 else "validation" if i % 10 == 1 else "train"].append(fid)
  return {k: sorted(v) for k, v in split.items()}


def read_brown_file(path: str) -> list:
  """Sentences of one Brown file as lists of (word, tag); tokens are `word/tag`, split at the last '/'."""
  sents = []
  for line_no, line in enumerate(read_lines(path), 1):
    toks = line.split()
    if not toks:
      continue
    sent = []
    for tok in toks:
      word, sep, tag = tok.rpartition("/")
      if not sep or not word or not tag:
        raise DataFormatError(f"{path}:{line_no}: token {tok!r} is not 'word/tag': {line.strip()!r}")
      sent.append((word, tag))
    sents.append(sent)
  if not sents:
    raise DataFormatError(f"{path}: no sentences found")
  return sents


def read_brown(source_dir: str, split: str):
  """Brown POS sentences of one split: dicts tokens, tags, file_id, genre, idx."""
  cats = read_brown_categories(source_dir)
  files = brown_split(cats)[split]
  out = []
  for fid in files:
    for sent in read_brown_file(os.path.join(source_dir, fid)):
      out.append(dict(tokens=[w for w, _ in sent], tags=[t for _, t in sent], file_id=fid,
                      genre=cats[fid], idx=len(out)))
  return out


def brown_label_names(source_dir: str) -> list:
  """Sorted set of every POS tag in the corpus (all splits)."""
  cats = read_brown_categories(source_dir)
  tags = set()
  for fid in cats:
    tags.update(t for sent in read_brown_file(os.path.join(source_dir, fid)) for _, t in sent)
  return sorted(tags)


# ---------------------------------------------------------------- plain text

def read_shakespeare(path: str, split: str) -> list:
  """Shakespeare documents: blank-line separated blocks (speeches); the last 10% of blocks are validation."""
  blocks, cur = [], []
  for line in read_lines(path):
    if line.strip():
      cur.append(line)
    elif cur:
      blocks.append("\n".join(cur))
      cur = []
  if cur:
    blocks.append("\n".join(cur))
  n_train = len(blocks) - int(round(len(blocks) * SHAKESPEARE_VALIDATION_FRACTION))
  return blocks[:n_train] if split == "train" else blocks[n_train:]


def text_documents(corpus: str, source_root: str, split: str) -> list:
  """Documents (str) of a plain-text corpus for LM pretraining.

  Args:
    corpus: 'brown' (one document per file, tags stripped, one sentence per line), 'shakespeare'
      (one per speech), 'conll2003' (one per -DOCSTART- document) or 'sst2' (one per sentence).
    source_root: the shared data folder (with brown/, tinyshakespeare/, conll2003/, sst2/).
    split: train / validation (/ test except for shakespeare).
  """
  if corpus == "brown":
    src = os.path.join(source_root, "brown")
    files = brown_split(read_brown_categories(src))[split]
    return ["\n".join(" ".join(w for w, _ in s) for s in read_brown_file(os.path.join(src, f)))
            for f in files]
  if corpus == "shakespeare":
    return read_shakespeare(os.path.join(source_root, "tinyshakespeare", "input.txt"), split)
  if corpus == "conll2003":
    sents, _ = read_conll(os.path.join(source_root, "conll2003", CONLL_FILES[split]))
    docs = collections.defaultdict(list)
    for s in sents:
      docs[s["doc_id"]].append(" ".join(s["tokens"]))
    return ["\n".join(docs[d]) for d in sorted(docs)]
  if corpus == "sst2":
    return [e["sentence"] for e in read_sst2(os.path.join(source_root, "sst2", SST2_FILES[split]))[0]]
  raise ValueError(f"unknown text corpus {corpus!r}; valid: brown, shakespeare, conll2003, sst2")
