"""lib.data readers and TFDS builders: counts from the real files, every kind of bad input, cache rebuilds."""

import logging
import os
import tempfile

import numpy as np
import pytest
from seqeval.metrics.sequence_labeling import get_entities

from lib import data
from lib.data import readers

DATA = data.DEFAULT_DATA_DIR
# Prepared data is keyed by a content hash of the sources, so reusing one cache across runs is safe.
CACHE = os.environ.get("WORKBENCH_TEST_DATA_CACHE", os.path.join(tempfile.gettempdir(), "workbench_data_test"))

CONLL_OK = "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\nPeter NNP B-NP B-PER\n"


def _write(path, text, mode="w"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, mode) as f:
    f.write(text)
  return str(path)


def _conll_dir(root, train, valid=CONLL_OK, test=CONLL_OK):
  for name, text in (("train.txt", train), ("valid.txt", valid), ("test.txt", test)):
    _write(os.path.join(root, "conll2003", name), text)
  return str(root)


# ---------------------------------------------------------------- real files

def test_conll_counts_from_real_files():
  src = {s: data.load_split("conll2003", s, DATA, CACHE) for s in ("train", "validation", "test")}
  assert [len(src[s]) for s in ("train", "validation", "test")] == [14041, 3250, 3453]
  train = src["train"].__getitems__(range(len(src["train"])))
  assert sum(len(e["tokens"]) for e in train) == 203621
  assert train[0]["doc_id"] == 0 and train[-1]["doc_id"] == 945    # document ids kept (946 documents)
  names = data.label_names_of("conll2003", DATA, CACHE)
  assert names == data.ner_label_names(DATA) == ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG",
                                                  "B-PER", "I-PER"]
  test = src["test"].__getitems__(range(len(src["test"])))
  types = [t for e in test for t, _, _ in get_entities([names[i] for i in e["ner"]])]
  assert len(types) == 5648
  assert {t: types.count(t) for t in set(types)} == {"PER": 1617, "LOC": 1668, "ORG": 1661, "MISC": 702}


def test_sst2_counts_from_real_files():
  assert [len(data.load_split("sst2", s, DATA, CACHE)) for s in ("train", "validation", "test")] == [67349, 872, 1821]
  ex = data.load_split("sst2", "validation", DATA, CACHE)[0]
  assert ex["sentence"].decode() == "it 's a charming and often affecting journey ." and ex["label"] == 1


def test_brown_split_is_fixed_stratified_disjoint_and_complete():
  cats = readers.read_brown_categories(os.path.join(DATA, "brown"))
  split = data.brown_split(cats)
  all_ids = sum(split.values(), [])
  assert sorted(all_ids) == sorted(cats) and len(set(all_ids)) == 500
  for genre in set(cats.values()):   # every genre appears in every split
    assert all(any(cats[f] == genre for f in split[s]) for s in split)
  assert split["test"][:3] == ["ca01", "ca11", "ca21"] and split["validation"][:2] == ["ca02", "ca12"]
  sizes = [len(data.load_split("brown_pos", s, DATA, CACHE)) for s in ("train", "validation", "test")]
  assert sum(sizes) == 57340    # sentences in the Brown corpus


def test_text_corpora():
  brown = data.load_split("text:brown", "train", DATA, CACHE)
  assert len(brown) == 392 and "/" not in brown[0]["text"].decode().split()[0]    # tags stripped
  assert len(data.load_split("text:sst2", "train", DATA, CACHE)) == 67349
  assert len(data.load_split("text:conll2003", "train", DATA, CACHE)) == 946
  shakes = [len(data.load_split("text:shakespeare", s, DATA, CACHE)) for s in ("train", "validation")]
  assert shakes[0] > 8 * shakes[1] > 0
  with pytest.raises(ValueError, match="unknown split 'test'"):
    data.load_split("text:shakespeare", "test", DATA, CACHE)
  with pytest.raises(ValueError, match="unknown dataset"):
    data.load_split("imdb", "train", DATA, CACHE)


# ---------------------------------------------------------------- bad input

def test_wrong_column_count_names_file_line_and_text(tmp_path):
  path = _write(tmp_path / "bad.txt", CONLL_OK + "Blackburn NNP I-PER\n")
  with pytest.raises(data.DataFormatError, match=r"bad\.txt:7: expected 4 columns.*'Blackburn NNP I-PER'"):
    readers.read_conll(path)


def test_unknown_tag_lists_valid_set(tmp_path):
  path = _write(tmp_path / "t.txt", CONLL_OK + "Smith NNP I-NP B-PERSON\n")
  with pytest.raises(data.DataFormatError, match=r"t\.txt:7: NER tag 'B-PERSON' is not in the label set "
                                                 r"\['O', 'B-ORG', 'I-ORG', 'B-PER', 'I-PER'\]"):
    readers.read_conll(path, ["O", "B-ORG", "I-ORG", "B-PER", "I-PER"])
  with pytest.raises(data.DataFormatError, match=r"t\.txt:7: NER tag 'PER' is not IOB"):
    readers.read_conll(_write(tmp_path / "t.txt", CONLL_OK + "Smith NNP I-NP PER\n"))


def test_iob_errors_are_repaired_as_conlleval_and_counted(tmp_path, caplog):
  text = "A x x O\nB x x I-PER\nC x x I-PER\nD x x I-LOC\nE x x B-LOC\nF x x I-LOC\n\nG x x I-ORG\n"
  with caplog.at_level(logging.WARNING):
    sents, stats = readers.read_conll(_write(tmp_path / "r.txt", text))
  assert [s["ner"] for s in sents] == [["O", "B-PER", "I-PER", "B-LOC", "B-LOC", "I-LOC"], ["B-ORG"]]
  assert stats["iob_repairs"] == 3 and "repaired 3 IOB tags" in caplog.text
  # conlleval reads the unrepaired sequence as the same entities.
  raw = ["O", "I-PER", "I-PER", "I-LOC", "B-LOC", "I-LOC"]
  assert get_entities(raw) == get_entities(sents[0]["ner"])


def test_empty_or_missing_file_names_path(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nope\.txt: data file not found"):
    readers.read_conll(str(tmp_path / "nope.txt"))
  with pytest.raises(data.DataFormatError, match=r"empty\.txt: file is empty"):
    readers.read_conll(_write(tmp_path / "empty.txt", "\n\n"))
  root = _conll_dir(tmp_path / "d", CONLL_OK)
  os.remove(os.path.join(root, "conll2003", "test.txt"))
  with pytest.raises(FileNotFoundError, match=r"conll2003/test\.txt"):
    data.load_split("conll2003", "train", root, str(tmp_path / "cache"))


def test_sst2_bad_label_and_header(tmp_path):
  path = _write(tmp_path / "s.tsv", "sentence\tlabel\ngood film\t1\nmeh\t2\n")
  with pytest.raises(data.DataFormatError, match=r"s\.tsv:3: .*label 0 or 1: 'meh\\t2'"):
    readers.read_sst2(path)
  with pytest.raises(data.DataFormatError, match=r"s\.tsv:1: expected the header"):
    readers.read_sst2(_write(tmp_path / "s.tsv", "text\tlabel\nx\t1\n"))


def test_sst2_blank_lines_are_counted_and_logged(tmp_path, caplog):
  with caplog.at_level(logging.WARNING):
    ex, stats = readers.read_sst2(_write(tmp_path / "s.tsv", "sentence\tlabel\r\na\t1\r\n\r\nb\t0\r\n"))
  assert [(e["sentence"], e["label"]) for e in ex] == [("a", 1), ("b", 0)]
  assert stats["blank_lines_skipped"] == 1 and "skipped 1 blank lines" in caplog.text


def test_invalid_utf8_names_file_line(tmp_path):
  path = _write(tmp_path / "u.txt", CONLL_OK.encode() + b"Caf\xe9 NNP B-NP B-ORG\n", "wb")
  with pytest.raises(data.DataFormatError, match=r"u\.txt:7: invalid UTF-8"):
    readers.read_conll(path)
  with pytest.raises(data.DataFormatError, match=r"s\.tsv:2: invalid UTF-8"):
    readers.read_sst2(_write(tmp_path / "s.tsv", b"sentence\tlabel\n\xff\t1\n", "wb"))


def test_brown_token_without_tag(tmp_path):
  with pytest.raises(data.DataFormatError, match=r"cx01:2: token 'word' is not 'word/tag'"):
    readers.read_brown_file(_write(tmp_path / "cx01", "\n\tThe/at word ./.\n"))


# ---------------------------------------------------------------- builders: other label sets, rebuilds

def test_ner_labels_derived_from_other_datasets_and_rebuilt_on_change(tmp_path):
  other = ("-DOCSTART- -X- -X- O\n\nAspirin NN B-NP B-DRUG\nhelps VBZ B-VP O\n\n"
           "New NNP B-NP B-GPE\nYork NNP I-NP I-GPE\n")
  root = _conll_dir(tmp_path / "d", other, valid=other, test=other)
  cache = str(tmp_path / "cache")
  assert data.ner_label_names(root) == ["O", "B-DRUG", "I-DRUG", "B-GPE", "I-GPE"]
  src = data.load_split("conll2003", "train", root, cache)
  assert len(src) == 2 and list(src[1]["ner"]) == [3, 4]
  assert data.label_names_of("conll2003", root, cache) == ["O", "B-DRUG", "I-DRUG", "B-GPE", "I-GPE"]
  _write(os.path.join(root, "conll2003", "train.txt"), other + "\nIbuprofen NN B-NP B-DRUG\n")
  assert len(data.load_split("conll2003", "train", root, cache)) == 3       # source changed -> rebuilt
  with pytest.raises(data.DataFormatError, match="'B-DRUG' is not in the label set"):
    data.load_split("conll2003", "train", root, cache, label_names=["O", "B-GPE", "I-GPE"])
  labels = ["O", "B-GPE", "I-GPE", "B-DRUG", "I-DRUG", "B-X", "I-X"]     # labels from config
  src = data.load_split("conll2003", "train", root, cache, label_names=labels)
  assert list(src[0]["ner"]) == [3, 0] and data.label_names_of("conll2003", root, cache, labels) == labels
