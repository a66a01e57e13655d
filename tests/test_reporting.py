"""Tests for lib/reporting.py: CoNLL prediction files, conlleval summary, atomic JSON, curve plots."""

import json
import os
import random

import numpy as np
import pytest

from lib import metrics, reporting

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONLL_TEST = os.path.join(os.path.dirname(REPO), "shared", "data", "conll2003", "test.txt")


def read_conll(path, word_col=0, tag_cols=(3,)):
  """Tiny independent reader: blank lines end sentences, -DOCSTART- lines skipped."""
  sents, cur = [], []
  with open(path, encoding="utf-8") as f:
    for line in f:
      fields = line.split()
      if not fields:
        if cur:
          sents.append(cur)
        cur = []
      elif fields[0] != "-DOCSTART-":
        cur.append([fields[word_col]] + [fields[c] for c in tag_cols])
  if cur:
    sents.append(cur)
  return sents


@pytest.fixture(scope="module")
def conll():
  if not os.path.exists(CONLL_TEST):
    pytest.skip(f"CoNLL-2003 test split not found at {CONLL_TEST}")
  rows = read_conll(CONLL_TEST)
  words = [[r[0] for r in s] for s in rows]
  tags = [[r[1] for r in s] for s in rows]
  return words, tags


def _noisy(tags, seed):
  rng = random.Random(seed)
  types = sorted({t[2:] for s in tags for t in s if t != "O"})
  return [[("B-" + rng.choice(types)) if rng.random() < 0.05 else t for t in s] for s in tags]


def test_predictions_round_trip(tmp_path, conll):
  words, gold = conll
  pred = _noisy(gold, 0)
  path = str(tmp_path / "preds" / "test.conll")  # parent directory is created
  stats = reporting.write_conll_predictions(path, words, gold, pred)
  assert stats == {"sentences": 3453, "tokens": 46435, "skipped_empty": 0}
  back = read_conll(path, tag_cols=(1, 2))
  assert [[r[0] for r in s] for s in back] == words  # every word once, in order, same sentence breaks
  assert [[r[1] for r in s] for s in back] == gold
  assert [[r[2] for r in s] for s in back] == pred
  with open(path, encoding="utf-8") as f:
    text = f.read()
  assert text.count("\n\n") == 3453 and not text.startswith("\n")
  assert os.listdir(tmp_path / "preds") == ["test.conll"]  # no temp file left behind


def test_predictions_rejects_bad_fields_and_counts_empty(tmp_path):
  path = str(tmp_path / "p.conll")
  with pytest.raises(ValueError, match="sentence 1 token 0 word"):
    reporting.write_conll_predictions(path, [["a"], ["b c"]], [["O"], ["O"]], [["O"], ["O"]])
  with pytest.raises(ValueError, match="sentence 0 has 2 words, 2 gold, 1 pred"):
    reporting.write_conll_predictions(path, [["a", "b"]], [["O", "O"]], [["O"]])
  assert os.listdir(tmp_path) == []
  stats = reporting.write_conll_predictions(path, [["a"], [], ["b"]], [["O"], [], ["B-X"]], [["O"], [], ["O"]])
  assert stats == {"sentences": 2, "tokens": 2, "skipped_empty": 1}
  with open(path, encoding="utf-8") as f:
    assert f.read() == "a O O\n\nb B-X O\n\n"


def test_conlleval_summary_hand_example():
  gold = [["B-PER", "I-PER", "O", "B-LOC", "O"], ["B-ORG", "I-ORG", "I-ORG", "O", "B-PER"]]
  pred = [["B-PER", "I-PER", "O", "I-LOC", "I-LOC"], ["B-ORG", "I-ORG", "O", "I-MISC", "B-PER"]]
  # 10 tokens, 6 tags equal -> accuracy 60%; 4 gold phrases, 5 found, 2 correct (both PER):
  # precision 40%, recall 50%, FB1 = 2*40*50/90 = 44.44; per type the last number is phrases FOUND.
  want = ("processed 10 tokens with 4 phrases; found: 5 phrases; correct: 2.\n"
          "accuracy:  60.00%; precision:  40.00%; recall:  50.00%; FB1:  44.44\n"
          "              LOC: precision:   0.00%; recall:   0.00%; FB1:   0.00  1\n"
          "             MISC: precision:   0.00%; recall:   0.00%; FB1:   0.00  1\n"
          "              ORG: precision:   0.00%; recall:   0.00%; FB1:   0.00  1\n"
          "              PER: precision: 100.00%; recall: 100.00%; FB1: 100.00  2\n")
  assert reporting.conlleval_summary(gold, pred) == want


def test_conlleval_summary_full_test_set(conll):
  _, gold = conll
  first = reporting.conlleval_summary(gold, gold).splitlines()[0]
  assert first == "processed 46435 tokens with 5648 phrases; found: 5648 phrases; correct: 5648."


def test_write_json_atomic(tmp_path, monkeypatch):
  path = str(tmp_path / "m.json")
  obj = {"f1": np.float32(0.5), "counts": np.arange(3), "n": np.int64(7), "name": "dev"}
  reporting.write_json_atomic(path, obj)
  with open(path, encoding="utf-8") as f:
    assert json.load(f) == {"f1": 0.5, "counts": [0, 1, 2], "n": 7, "name": "dev"}
  with pytest.raises(TypeError, match="m.json.*set"):
    reporting.write_json_atomic(path, {"bad": {1, 2}})

  def failing_replace(src, dst):
    raise OSError("disk full")

  monkeypatch.setattr(os, "replace", failing_replace)
  with pytest.raises(OSError, match="disk full"):
    reporting.write_json_atomic(path, {"other": 1})
  monkeypatch.undo()
  assert os.listdir(tmp_path) == ["m.json"]  # temp file removed, old content intact
  with open(path, encoding="utf-8") as f:
    assert json.load(f)["n"] == 7


def test_plot_curves(tmp_path):
  history = {"train_loss": [(s, 3.0 / (1 + s)) for s in range(0, 200, 5)],
             "dev_f1": [(50, 0.61), (100, 0.72), (150, 0.80)],
             "dev_loss": [(50, 1.1), (100, 0.9), (150, 0.8)],
             "unused": []}
  path = str(tmp_path / "plots" / "curves.png")
  reporting.plot_curves(path, history)
  with open(path, "rb") as f:
    data = f.read()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
  assert os.listdir(tmp_path / "plots") == ["curves.png"]
  with pytest.raises(ValueError, match=r"history\['dev_f1'\]\[1\]"):
    reporting.plot_curves(path, {"dev_f1": [(1, 0.5), (2,)]})


def test_summary_agrees_with_span_prf(conll):
  _, gold = conll
  pred = _noisy(gold, 1)
  res = metrics.span_prf(gold, pred)
  first = reporting.conlleval_summary(gold, pred).splitlines()[0]
  assert first == (f"processed 46435 tokens with 5648 phrases; found: {res['num_pred']} phrases; "
                   f"correct: {res['num_correct']}.")


def test_cpu_model_names_this_machines_cpu():
  """The one CPU description every timing carries (benchmark rows, table cells, load tests):
  /proc/cpuinfo's model name, then the core (the hypervisor's name can hide it)."""
  name = reporting.cpu_model()
  assert name and name == name.strip()
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      names = {l.split(":", 1)[1].strip() for l in f if l.startswith("model name")}
    assert any(name == n or name.startswith(n + " (") for n in names) or not names


@pytest.mark.parametrize("vendor,family,model,want", [
    ("AuthenticAMD", "25", "17", "Zen 4, family 25 model 17"),      # EPYC 9004 (Genoa)
    ("AuthenticAMD", "25", "1", "Zen 3, family 25 model 1"),        # EPYC 7003 (Milan)
    ("AuthenticAMD", "26", "2", "Zen 5, family 26 model 2"),        # EPYC 9005 (Turin)
    ("GenuineIntel", "6", "143", "Sapphire Rapids, family 6 model 143"),
    ("GenuineIntel", "6", "999", "family 6 model 999"),             # unknown: raw numbers only
])
def test_cpu_core_names_the_core_from_family_and_model(vendor, family, model, want):
  fields = {"vendor_id": vendor, "cpu family": family, "model": model}
  assert reporting.cpu_core(fields) == want
  assert reporting.cpu_core({"vendor_id": vendor}) == ""
