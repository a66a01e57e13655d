"""Own data files (lib.data.own, sources): CoNLL-style tagging, TSV/CSV/JSONL classification, plain
text; tag schemes, file quirks, errors with file:line, labels absent from train, read_gold."""

import json
import logging
import os
import tempfile

import numpy as np
import pytest

from lib import data, hf
from lib.data import own

DATA = data.DEFAULT_DATA_DIR
CACHE = os.environ.get("WORKBENCH_TEST_DATA_CACHE",
                       os.path.join(tempfile.gettempdir(), "workbench_data_test"))
BOM = "\ufeff"


@pytest.fixture(scope="module")
def tok():
  return hf.load_bert_tokenizer("minilm")


def _write(path, text, mode="w", newline=None):
  os.makedirs(os.path.dirname(str(path)), exist_ok=True)
  with open(path, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": newline})) as f:
    f.write(text)
  return str(path)


def _dir(root, **files):
  for name, text in files.items():
    _write(os.path.join(root, name.replace("_", ".")), text)
  return str(root)


def _sents(dataset, split="train", **kw):
  return [(list(e["tokens"]), list(e["tag_names"])) for e in data.load_split(dataset, split, **kw)]


def _all(it):
  return [dict(b) for b in it]


def _assert_same_batches(xs, ys):
  assert len(xs) == len(ys) > 0
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ---------------------------------------------------------------- tag schemes and columns

def test_iob1_tab_separated_two_columns_become_iob2(tmp_path):
  # IOB1: I- starts a chunk unless it continues one of the same type; B- only between two chunks
  # of one type. Expected IOB2 written by hand.
  train = "EU\tI-ORG\nrejects\tO\nGerman\tI-MISC\nBritish\tI-MISC\n\nPeter\tI-PER\nPaul\tB-PER\n" \
          "Smith\tI-PER\nin\tO\nNew\tI-LOC\nYork\tI-LOC\n"
  root = _dir(tmp_path / "d", train_txt=train, valid_txt="A\tI-PER\n", test_txt="B\tO\n")
  assert _sents(f"conll:{root}") == [
      (["EU", "rejects", "German", "British"], ["B-ORG", "O", "B-MISC", "I-MISC"]),
      (["Peter", "Paul", "Smith", "in", "New", "York"],
       ["B-PER", "B-PER", "I-PER", "O", "B-LOC", "I-LOC"])]
  assert data.label_names_of(f"conll:{root}") == [
      "O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
  assert _sents(f"conll:{root}", "validation") == [(["A"], ["B-PER"])]


def test_bioes_and_bilou_become_iob2(tmp_path):
  bioes = ("Ann S-PER\nBob S-PER\nvisited O\nBank B-ORG\nof I-ORG\nAmerica E-ORG\nin O\n"
           "Los B-LOC\nAngeles E-LOC\n")
  path = _write(tmp_path / "bioes.txt", bioes)
  want = (["Ann", "Bob", "visited", "Bank", "of", "America", "in", "Los", "Angeles"],
          ["B-PER", "B-PER", "O", "B-ORG", "I-ORG", "I-ORG", "O", "B-LOC", "I-LOC"])
  for scheme in ("auto", "bioes"):
    assert _sents("conll", train_file=path, tag_scheme=scheme) == [want]
  bilou = bioes.replace("S-", "U-").replace("E-", "L-")
  bilou_path = _write(tmp_path / "bilou.txt", bilou)
  assert _sents("conll", train_file=bilou_path, tag_scheme="bilou") == [want]
  with pytest.raises(data.DataFormatError, match=r"bioes\.txt:1: tag 'S-PER' is not IOB2"):
    data.load_split("conll", "train", train_file=path, tag_scheme="iob2")
  pos = _write(tmp_path / "pos.txt", "The DT\ndog NN\n")     # plain tags: no scheme
  assert _sents("conll", train_file=pos, tag_scheme="none") == [(["The", "dog"], ["DT", "NN"])]
  assert data.label_names_of("conll", train_file=pos, tag_scheme="none") == ["DT", "NN"]


def test_word_and_tag_columns_are_selectable(tmp_path):
  text = "1 EU NNP B-ORG x\n2 rejects VBZ O x\n\n1 Peter NNP B-PER x\n"
  path = _write(tmp_path / "four.txt", text)
  assert _sents("conll", train_file=path, word_column=1, tag_column=3) == [
      (["EU", "rejects"], ["B-ORG", "O"]), (["Peter"], ["B-PER"])]
  assert _sents("conll", train_file=path, word_column=-4, tag_column=-2) == [
      (["EU", "rejects"], ["B-ORG", "O"]), (["Peter"], ["B-PER"])]
  # A tab-separated file splits at tabs only: a word may hold a space.
  tabbed = _write(tmp_path / "tab.txt", "B-LOC\tNew York\nO\tcity\n")
  assert _sents("conll", train_file=tabbed, word_column=1, tag_column=0) == [
      (["New York", "city"], ["B-LOC", "O"])]


def test_file_quirks_are_taken_in_stride(tmp_path):
  # BOM at the start and on a line of its own, trailing spaces/tabs, blank lines of spaces/tabs,
  # CRLF line ends, -DOCSTART- lines (with or without columns), no final newline.
  text = (f"{BOM}-DOCSTART- O\r\n\r\nEU B-ORG  \r\nrejects O\t\r\n   \r\nPeter B-PER\r\n{BOM}\r\n"
          "-DOCSTART-\r\n \t \r\nLondon B-LOC")
  path = _write(tmp_path / "q.txt", text, newline="")
  sents = data.load_split("conll", "train", train_file=path)
  assert [(s["tokens"], s["tag_names"], s["doc_id"], s["line"]) for s in sents] == [
      (["EU", "rejects"], ["B-ORG", "O"], 0, 3), (["Peter"], ["B-PER"], 0, 6),
      (["London"], ["B-LOC"], 1, 10)]
  csv_text = f'{BOM}sentence,label\r\n"a, b" ,1  \r\n  \r\n{BOM}\r\nc,0\r\n"two\r\nlines",0\r\n'
  path = _write(tmp_path / "q.csv", csv_text, newline="")
  ex = data.load_split("csv", "train", train_file=path)
  assert [(e["sentence"], e["label_name"]) for e in ex] == [("a, b", "1"), ("c", "0"),
                                                          ("two\nlines", "0")]
  assert data.read_gold({"dataset": "csv", "train": path}, "train")[0][2] == "two lines"
  tsv_text = f"{BOM}label\tsentence\r\n1\tgood film  \t\r\n\t \r\n0\tbad\r\n"
  ex = data.load_split("tsv", "train", train_file=_write(tmp_path / "q.tsv", tsv_text, newline=""))
  assert [(e["sentence"], e["label_name"], e["line"]) for e in ex] == [
      ("good film", "1", 2), ("bad", "0", 4)]
  jsonl_text = f'{BOM}{{"text": "x", "label": 1}}\r\n  \r\n{{"text": "y ", "label": 0}}  \r\n'
  path = _write(tmp_path / "q.jsonl", jsonl_text, newline="")
  ex = data.load_split("jsonl", "train", train_file=path)
  assert [(e["sentence"], e["label_name"]) for e in ex] == [("x", "1"), ("y", "0")]


# ---------------------------------------------------------------- errors name file:line

def test_errors_name_file_line_and_what_was_expected(tmp_path):
  two = _write(tmp_path / "two.txt", "EU B-ORG\nrejects O\nx y O\n")
  with pytest.raises(data.DataFormatError,
                     match=r"two\.txt:3: expected 2 columns \(as on line 1\), got 3"):
    data.load_split("conll", "train", train_file=two)
  with pytest.raises(data.DataFormatError,
                     match=r"two\.txt:1: data\.tag_column=5 but the line has 2 columns"):
    data.load_split("conll", "train", train_file=two, tag_column=5)
  bad = _write(tmp_path / "bad.txt", "EU B-ORG\nrejects X-PER\n")
  with pytest.raises(data.DataFormatError,
                     match=r"bad\.txt:2: tag 'X-PER' is not AUTO .*tag_scheme='none'"):
    data.load_split("conll", "train", train_file=bad)
  with pytest.raises(ValueError, match=r"data\.tag_scheme='bio'; valid: \['auto', 'iob1'"):
    data.load_split("conll", "train", train_file=two, tag_scheme="bio")
  tsv = _write(tmp_path / "t.tsv", "sentence\tlabel\ngood\t1\nbad\t0\tx\n")
  with pytest.raises(data.DataFormatError,
                     match=r"t\.tsv:3: expected 2 TSV fields \(sentence, label\), got 3"):
    data.load_split("tsv", "train", train_file=tsv)
  with pytest.raises(data.DataFormatError, match=r"t\.tsv:2: no label column "
                                                 r"\(data\.label_column\) 'y'; "
                                                 r"columns: \['sentence', 'label'\]"):
    data.load_split("tsv", "train", train_file=tsv, label_column="y")
  empty = _write(tmp_path / "e.tsv", "sentence\tlabel\ngood\t1\n \t0\n")
  with pytest.raises(data.DataFormatError, match=r"e\.tsv:3: empty text in column 'sentence'"):
    data.load_split("tsv", "train", train_file=empty)
  unterminated = _write(tmp_path / "q.csv", 'text,label\n"a,1\nb,0\n')   # the quote eats the rest
  with pytest.raises(data.DataFormatError,
                     match=r"q\.csv:2: expected 2 CSV fields \(text, label\), got 1: '\"a,1'"):
    data.load_split("csv", "train", train_file=unterminated)
  js = _write(tmp_path / "j.jsonl", '{"text": "a", "label": 1}\n{"text": "b", label: 0}\n')
  with pytest.raises(data.DataFormatError, match=r"j\.jsonl:2: not valid JSON"):
    data.load_split("jsonl", "train", train_file=js)
  with pytest.raises(FileNotFoundError, match=r"data\.train='.*nope\.txt': data file not found"):
    data.load_split("conll", "train", train_file=str(tmp_path / "nope.txt"))
  with pytest.raises(ValueError, match=r"no training file in .* \(looked for \['train\.txt'"):
    data.load_split("conll:" + _dir(tmp_path / "only_dev", dev_txt="a O\n"), "train")
  both = _dir(tmp_path / "both", train_txt="a O\n", dev_txt="a O\n", valid_txt="a O\n")
  with pytest.raises(ValueError,
                     match=r"holds \['valid\.txt', 'dev\.txt'\] for the validation split"):
    data.load_split(f"conll:{both}", "train")
  with pytest.raises(ValueError, match=r"data\.word_column=2 does not apply to tsv: datasets"):
    data.load_split("tsv", "train", train_file=tsv, word_column=2)


# ---------------------------------------------------------------- labels absent from train

def test_dev_only_tag_warns_naming_tag_and_file_and_is_still_scored(tmp_path, caplog):
  root = _dir(tmp_path / "d", train_txt="EU B-ORG\nsaid O\n",
              dev_txt="Paris B-LOC\nsaid O\nEU B-ORG\n", test_txt="x O\n")
  with caplog.at_level(logging.WARNING):
    names = data.label_names_of(f"conll:{root}")
  assert names == ["O", "B-ORG", "I-ORG"]
  assert "dev.txt: label(s) 'B-LOC' (1x) do not occur in the training data" in caplog.text
  assert os.path.join(root, "train.txt") in caplog.text and "test.txt" not in caplog.text
  words, gold = data.read_gold({"dataset": f"conll:{root}"}, "validation")
  assert words == [["Paris", "said", "EU"]]
  assert gold == [["B-LOC", "O", "B-ORG"]]           # scored as B-LOC
  assert list(data.load_split(f"conll:{root}", "validation")[0]["tag_ids"]) == [-1, 0, 1]


def test_named_conll_layout_also_warns_of_test_only_tags(tmp_path, caplog):
  sent = "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n"
  root = tmp_path / "data"
  test = sent + "\nRome NNP B-NP B-LOC\n"
  for name, text in (("train.txt", sent), ("valid.txt", sent), ("test.txt", test)):
    _write(root / "conll2003" / name, text)
  with caplog.at_level(logging.WARNING):
    data.load_split("conll2003", "test", str(root), str(tmp_path / "cache"))
  assert ("conll2003/test.txt: label(s) 'B-LOC' (1x) do not occur in the training data"
          in caplog.text)


def test_classification_labels_sorted_numerically_and_unseen_scored(tmp_path, caplog):
  root = _dir(tmp_path / "c", train_csv="text,stars\na,10\nb,2\nc,1\n",
              dev_csv="text,stars\nd,5\ne,2\n")
  with caplog.at_level(logging.WARNING):
    assert data.label_names_of(f"csv:{root}", label_column="stars") == ["1", "2", "10"]
  assert "dev.csv: label(s) '5' (1x)" in caplog.text
  dev = data.load_split(f"csv:{root}", "validation", label_column="stars")
  assert [e["label"] for e in dev] == [-1, 1]
  gold = data.read_gold({"dataset": f"csv:{root}", "label_column": "stars"}, "validation")
  assert gold == (["d", "e"], ["5", "2"])


# ---------------------------------------------------------------- batches

def test_own_conll_copy_gives_the_named_batches(tmp_path, tok):
  """A copy of real CoNLL-2003 sentences read as own files batches exactly like the named path."""
  lines = open(os.path.join(DATA, "conll2003", "train.txt"), encoding="utf-8").read().split("\n")
  blocks = "\n".join(lines[:1200]).split("\n\n")     # -DOCSTART-, then sentences
  parts = {"train.txt": blocks[:40], "valid.txt": [blocks[0]] + blocks[40:52],
           "test.txt": [blocks[0]] + blocks[52:60]}
  named, mine = tmp_path / "named", tmp_path / "own"
  for name, b in parts.items():
    _write(named / "conll2003" / name, "\n\n".join(b) + "\n")
    _write(mine / name, "\n\n".join(b) + "\n")
  kw = dict(batch_size=4, max_len=24, cache_dir=str(tmp_path / "cache"))
  for split, train in (("train", True), ("validation", False), ("test", False)):
    a = data.make_batches("conll2003", split, tok, train=train, data_dir=str(named), **kw)
    b = data.make_batches(f"conll:{mine}", split, tok, train=train, **kw)
    assert a.info["label_names"] == b.info["label_names"]
    assert a.info["long_sentences"] == b.info["long_sentences"] > 0      # windows too
    _assert_same_batches([next(a) for _ in range(len(a))], [next(b) for _ in range(len(b))])
  named_cfg = {"dataset": "conll2003", "dir": str(named), "cache_dir": kw["cache_dir"]}
  assert data.read_gold(named_cfg, "test") == data.read_gold({"dataset": f"conll:{mine}"}, "test")


def test_own_tsv_copy_gives_the_named_sst2_batches(tmp_path, tok):
  lines = open(os.path.join(DATA, "sst2", "dev.tsv"), encoding="utf-8").read().split("\n")
  parts = {"train.tsv": lines[:41], "dev.tsv": [lines[0]] + lines[41:61],
           "test.tsv": [lines[0]] + lines[61:70]}
  named, mine = tmp_path / "named", tmp_path / "own"
  for name, rows in parts.items():
    _write(named / "sst2" / name, "\n".join(rows) + "\n")
    _write(mine / name, "\n".join(rows) + "\n")
  kw = dict(batch_size=8, max_len=24, cache_dir=str(tmp_path / "cache"))  # some are truncated
  for split, train in (("train", True), ("validation", False)):
    a = data.make_batches("sst2", split, tok, train=train, data_dir=str(named), **kw)
    b = data.make_batches(f"tsv:{mine}", split, tok, train=train, **kw)
    _assert_same_batches([next(a) for _ in range(len(a))], [next(b) for _ in range(len(b))])
  assert b.info["label_names"] == ["0", "1"]


def test_sentence_pairs_get_token_type_ids_as_bert(tmp_path, tok):
  rows = [{"premise": "A man sleeps.", "hypothesis": "Nobody sleeps.", "gold": "contradiction"},
          {"premise": "A dog runs in the park.", "hypothesis": "An animal moves.",
           "gold": "entailment"},
          {"premise": "It rains.", "hypothesis": "The street is wet.", "gold": "neutral"}]
  root = _dir(tmp_path / "p", train_jsonl="\n".join(json.dumps(r) for r in rows) + "\n")
  cfg = dict(dataset=f"jsonl:{root}", text_columns="premise,hypothesis", label_column="gold",
             batch_size=4, max_len=32, cache_dir=str(tmp_path / "cache"))
  batch = next(iter(data.from_config(dict(cfg, eval_batch_size=4), tok, "train", train=False)))
  names = ["contradiction", "entailment", "neutral"]     # sorted
  assert sorted(batch["example_ids"].tolist()) == [-1, 0, 1, 2]
  for r, row in enumerate(batch["example_ids"][:3]):
    assert batch["label"][r] == names.index(rows[row]["gold"])
    ref = tok(rows[row]["premise"], rows[row]["hypothesis"])
    n = len(ref["input_ids"])
    assert batch["input_ids"][r, :n].tolist() == ref["input_ids"]
    assert batch["token_type_ids"][r, :n].tolist() == ref["token_type_ids"]
    assert 1 in ref["token_type_ids"]
    assert batch["input_mask"][r].sum() == n
  inputs, gold = data.read_gold(cfg, "train")
  assert inputs[0] == "A man sleeps." + data.PAIR_SEPARATOR + "Nobody sleeps."
  assert gold[0] == "contradiction"


def test_max_eval_examples_limits_eval_batches_and_gold_alike(tmp_path, tok):
  train = "".join(f"w{i} O\nx B-PER\n\n" for i in range(6))
  dev = "".join(f"d{i} O\n\n" for i in range(7))
  root = _dir(tmp_path / "m", train_txt=train, valid_txt=dev)
  cfg = dict(dataset=f"conll:{root}", batch_size=2, max_len=16, max_eval_examples=3,
             cache_dir=str(tmp_path / "cache"))
  def seen(**kw):
    it = data.from_config(cfg, tok, "validation", train=False, **kw)
    return {int(e) for b in it for e in b["example_ids"] if e >= 0}
  assert seen() == {0, 1, 2}
  words, _ = data.read_gold(cfg, "validation")
  assert words == [["d0"], ["d1"], ["d2"]]
  shards = [seen(shard_index=i, shard_count=2) for i in range(2)]
  assert shards == [{0}, {1, 2}]                       # the first 3 of the split, then sharded
  train_it = data.from_config(cfg, tok, "train", train=True)
  assert len(train_it.info["example_ids"]) == 6        # training uses all
  assert len(data.read_gold(dict(cfg, max_eval_examples=0), "validation")[0]) == 7


def test_windowed_sentences_are_counted_in_the_log(tmp_path, tok, caplog):
  long = "".join(f"word{i} O\n" for i in range(30))
  root = _dir(tmp_path / "w", train_txt="a O\n\n" + long + "\nb B-PER\n")
  with caplog.at_level(logging.INFO):
    it = data.make_batches(f"conll:{root}", "train", tok, batch_size=1, max_len=16,
                           cache_dir=str(tmp_path / "c"))
  assert it.info["long_sentences"] == 1
  pieces = sum(len(tok(f"word{i}", add_special_tokens=False)["input_ids"]) for i in range(30))
  assert it.info["longest_sentence"] == dict(pieces=pieces, words=30, example_id=1)
  assert f"1 of 3 sentences exceed one window of max_len=16" in caplog.text
  assert f"the longest, example 1, has 30 words, {pieces} word pieces" in caplog.text


# ---------------------------------------------------------------- config keys, text, named gold

def test_config_keys_of_own_files_are_checked(tmp_path, tok):
  root = _dir(tmp_path / "k", train_tsv="sentence\tlabel\na\t1\nb\t0\n")
  base = dict(batch_size=2, max_len=16, cache_dir=CACHE)
  defaults = dict(data.CONFIG_DEFAULTS)           # one config block serves named and own data
  it = data.from_config(dict(base, dataset="sst2", **defaults), tok, "validation", train=False)
  assert len(it) == 436
  with pytest.raises(ValueError, match=r"unknown keys \['word_column'\] for dataset 'sst2'"):
    data.from_config(dict(base, dataset="sst2", word_column=1), tok, "validation", train=False)
  with pytest.raises(ValueError, match=r"unknown keys \['tag_column'\] for dataset 'tsv:"):
    data.from_config(dict(base, dataset=f"tsv:{root}", tag_column=1), tok, "train", train=False)
  path = os.path.join(root, "train.tsv")
  explicit = dict(base, dataset="tsv", train=path, validation=path)
  assert len(data.from_config(explicit, tok, "validation", train=False).info["example_ids"]) == 2
  with pytest.raises(ValueError, match="unknown dataset 'imdb'"):
    data.from_config(dict(base, dataset="imdb"), tok, "train", train=True)


def test_plain_text_file_and_folder(tmp_path, tok):
  paras = [f"Paragraph {i} line one.\nline two of {i}." for i in range(10)]
  path = _write(tmp_path / "corpus.txt", BOM + "\n\n  \n".join(paras) + "\n")
  train = [e["text"] for e in data.load_split(f"text:{path}", "train")]
  held = [e["text"] for e in data.load_split(f"text:{path}", "validation")]
  assert train == paras[:9] and held == paras[9:]
  folder = _dir(tmp_path / "txt", a_txt=paras[0], b_txt=paras[1] + "\n\n" + paras[2], notes_md="x")
  assert [e["text"] for e in data.load_split(f"text:{folder}", "train")] == paras[:2]
  it = data.make_batches(f"text:{path}", "train", tok, batch_size=2, max_len=16, train=True,
                         cache_dir=str(tmp_path / "c"))
  assert data.task_of(f"text:{path}") == "lm" and it.info["documents"] == 9
  n = sum(len(tok(p, add_special_tokens=False)["input_ids"]) + 2 for p in paras[:9])  # [CLS] [SEP]
  assert it.info["tokens"] == n and it.get_state()["pipeline"].startswith(f"text:{path}/train/mlm")


def test_read_gold_of_the_named_datasets():
  words, tags = data.read_gold({"dataset": "conll2003", "dir": DATA, "cache_dir": CACHE}, "test")
  assert len(words) == len(tags) == 3453 and sum(map(len, words)) == sum(map(len, tags)) == 46435
  assert words[0][:2] == ["SOCCER", "-"] and tags[0][:3] == ["O", "O", "B-LOC"]
  sst2 = {"dataset": "sst2", "data_dir": DATA, "cache_dir": CACHE}
  texts, labels = data.read_gold(sst2, "validation")
  assert len(texts) == len(labels) == 872 and labels.count("positive") == 444
  assert texts[0] == "it 's a charming and often affecting journey ." and labels[0] == "positive"
  with pytest.raises(ValueError, match="plain-text corpus has no gold labels"):
    data.read_gold({"dataset": "text:sst2", "cache_dir": CACHE}, "validation")
