"""Tests for lib/metrics.py against seqeval, sklearn, hand counts and the real CoNLL-2003 test set."""

import collections
import math
import os
import random
import warnings

import numpy as np
import pytest
import sklearn.metrics as skm
from hypothesis import given, settings, strategies as st
from seqeval import metrics as sq
from seqeval.metrics.sequence_labeling import get_entities as sq_get_entities

from lib import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONLL_TEST = os.path.join(os.path.dirname(REPO), "shared", "data", "conll2003", "test.txt")


def read_conll_tags(path):
  """Tiny independent reader: 4th column, blank lines end sentences, -DOCSTART- lines skipped."""
  sents, cur = [], []
  with open(path, encoding="utf-8") as f:
    for line in f:
      fields = line.split()
      if not fields:
        if cur:
          sents.append(cur)
        cur = []
      elif fields[0] != "-DOCSTART-":
        cur.append(fields[3])
  if cur:
    sents.append(cur)
  return sents


@pytest.fixture(scope="module")
def conll_gold():
  if not os.path.exists(CONLL_TEST):
    pytest.skip(f"CoNLL-2003 test split not found at {CONLL_TEST}")
  return read_conll_tags(CONLL_TEST)


def _types(sents):
  return sorted({t[2:] for s in sents for t in s if t != "O"})


def perturb(sents, rng, types, rate):
  """Copies `sents` with random tag noise: type changes, B/I flips, I- after O, drops to O, boundary shifts."""
  out = []
  for s in sents:
    s = list(s)
    for i in range(len(s)):
      if rng.random() >= rate:
        continue
      op = rng.randrange(6)
      if op == 0 and s[i] != "O":  # change type
        s[i] = s[i][:2] + rng.choice(types)
      elif op == 1 and s[i] != "O":  # flip B <-> I
        s[i] = ("I-" if s[i][0] == "B" else "B-") + s[i][2:]
      elif op == 2 and s[i] == "O":  # ill-formed I-X after O (or mid-sentence O -> I-X)
        s[i] = "I-" + rng.choice(types)
      elif op == 3:  # drop to O
        s[i] = "O"
      elif op == 4 and i + 1 < len(s):  # shift a boundary right: copy the tag onto the next token
        s[i + 1] = ("I-" + s[i][2:]) if s[i] != "O" else "O"
      elif op == 5 and i > 0 and s[i - 1] != "O":  # shift a boundary left: extend the previous entity
        s[i] = "I-" + s[i - 1][2:]
    out.append(s)
  return out


def assert_matches_seqeval(gold, pred):
  """Micro P/R/F1, per-type and average rows, and the text report equal seqeval's exactly."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    want_p, want_r, want_f = sq.precision_score(gold, pred), sq.recall_score(gold, pred), sq.f1_score(gold, pred)
    report = sq.classification_report(gold, pred, output_dict=True)
    text = sq.classification_report(gold, pred, digits=4)
  res = metrics.span_prf(gold, pred)
  assert (res["precision"], res["recall"], res["f1"]) == (want_p, want_r, want_f)
  rows = {t: v for t, v in report.items() if not t.endswith(" avg")}
  assert sorted(rows) == sorted(res["per_type"])
  for t, want in rows.items():
    got = res["per_type"][t]
    assert (got["precision"], got["recall"], got["f1"], got["support"]) == (
        want["precision"], want["recall"], want["f1-score"], want["support"]), t
  for ours, theirs in (("macro", "macro avg"), ("weighted", "weighted avg")):
    got, want = res[ours], report[theirs]
    assert (got["precision"], got["recall"], got["f1"], got["support"]) == (
        want["precision"], want["recall"], want["f1-score"], want["support"]), ours
  assert report["micro avg"]["f1-score"] == res["f1"]
  assert metrics.classification_report_entities(gold, pred, digits=4) == text


def test_conll_test_entity_counts(conll_gold):
  assert len(conll_gold) == 3453
  assert sum(map(len, conll_gold)) == 46435
  res = metrics.span_prf(conll_gold, conll_gold)
  assert res["num_gold"] == 5648
  assert {t: v["support"] for t, v in res["per_type"].items()} == {
      "PER": 1617, "LOC": 1668, "ORG": 1661, "MISC": 702}
  assert res["f1"] == 1.0


def test_random_perturbations_equal_seqeval(conll_gold):
  rng = random.Random(0)
  types = _types(conll_gold)  # from the data, not a hard-coded list
  for trial in range(200):
    start = rng.randrange(len(conll_gold) - 60)
    gold = conll_gold[start:start + rng.randrange(5, 60)]
    pred = perturb(gold, rng, types, rate=rng.choice([0.02, 0.1, 0.3, 0.8]))
    assert_matches_seqeval(gold, pred)
    for g, p in zip(gold, pred):
      assert metrics.get_entities(p) == sq_get_entities(p), (trial, p)


def test_full_test_set_noisy_prediction_equals_seqeval(conll_gold):
  pred = perturb(conll_gold, random.Random(1), _types(conll_gold), rate=0.05)
  assert_matches_seqeval(conll_gold, pred)
  # Swapping roles swaps precision and recall; a second, independent check of the counting.
  res, rev = metrics.span_prf(conll_gold, pred), metrics.span_prf(pred, conll_gold)
  assert (res["precision"], res["recall"]) == (rev["recall"], rev["precision"])


def _to_iob1(sent):
  """IOB2 -> IOB1: B- only where an entity directly follows another of the same type."""
  out = []
  for i, t in enumerate(sent):
    if t.startswith("B-") and not (i and sent[i - 1] != "O" and sent[i - 1][2:] == t[2:]):
      t = "I-" + t[2:]
    out.append(t)
  return out


def _to_iobes(sent):
  """IOB2 -> IOBES via the entity spans."""
  out = ["O"] * len(sent)
  for t, s, e in sq_get_entities(sent):
    if s == e:
      out[s] = "S-" + t
    else:
      out[s], out[e] = "B-" + t, "E-" + t
      for k in range(s + 1, e):
        out[k] = "I-" + t
  return out


@pytest.mark.parametrize("convert", [_to_iob1, _to_iobes])
def test_other_schemes_same_entities_and_equal_seqeval(conll_gold, convert):
  gold = conll_gold[:400]
  conv = [convert(s) for s in gold]
  assert [metrics.get_entities(s) for s in conv] == [metrics.get_entities(s) for s in gold]
  rng = random.Random(2)
  pred = perturb(gold, rng, _types(gold), rate=0.1)
  assert_matches_seqeval([convert(s) for s in gold], [convert(s) for s in pred])
  # Raw noise directly on the converted tags (mixes E-/S- with I-/B- in ill-formed ways).
  assert_matches_seqeval(conv, perturb(conv, rng, _types(gold), rate=0.2))


TAGS = ["O", "B-A", "I-A", "E-A", "S-A", "B-B", "I-B", "E-B", "S-B", "B", "I", "E", "S"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.sampled_from(TAGS), max_size=12), min_size=1, max_size=4),
       st.randoms(use_true_random=False))
def test_arbitrary_tag_sequences_equal_seqeval(gold, rnd):
  pred = [[rnd.choice(TAGS) for _ in s] for s in gold]
  for s in gold:
    assert metrics.get_entities(s) == sq_get_entities(s), s
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    want = (sq.precision_score(gold, pred), sq.recall_score(gold, pred), sq.f1_score(gold, pred))
  res = metrics.span_prf(gold, pred)
  assert (res["precision"], res["recall"], res["f1"]) == want


def test_hand_checked_example():
  gold = [["B-PER", "I-PER", "O", "B-LOC", "O"], ["B-ORG", "I-ORG", "I-ORG", "O", "B-PER"]]
  pred = [["B-PER", "I-PER", "O", "I-LOC", "I-LOC"], ["B-ORG", "I-ORG", "O", "I-MISC", "B-PER"]]
  # gold entities: PER(0,1) LOC(3,3) | ORG(0,2) PER(4,4)                        -> 4 gold
  # pred entities: PER(0,1) LOC(3,4) [I-LOC after O starts one] | ORG(0,1) MISC(3,3) PER(4,4) -> 5 pred
  # correct: PER(0,1), PER(4,4)                                                  -> 2 correct
  # micro P = 2/5 = 0.4, R = 2/4 = 0.5, F1 = 2*0.4*0.5/0.9 = 4/9
  # PER: P 2/2 R 2/2 F 1; LOC: P 0/1 R 0/1; ORG: P 0/1 R 0/1; MISC: P 0/1 R 0/0 (support 0)
  assert metrics.get_entities(pred[0]) == [("PER", 0, 1), ("LOC", 3, 4)]
  res = metrics.span_prf(gold, pred)
  assert (res["num_gold"], res["num_pred"], res["num_correct"]) == (4, 5, 2)
  assert res["precision"] == 0.4 and res["recall"] == 0.5
  assert math.isclose(res["f1"], 4 / 9, rel_tol=1e-15)
  assert res["per_type"]["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2,
                                    "num_pred": 2, "num_correct": 2}
  assert res["per_type"]["MISC"]["support"] == 0 and res["per_type"]["MISC"]["f1"] == 0.0
  # macro over 4 types: P = (1+0+0+0)/4, weighted by support (2,1,1,0)/4: P = 2/4
  assert res["macro"]["precision"] == 0.25 and res["weighted"]["precision"] == 0.5


def test_streaming_counter_equals_one_shot(conll_gold):
  gold = conll_gold[:300]
  pred = perturb(gold, random.Random(3), _types(gold), rate=0.1)
  counter = metrics.EntityCounter()
  for i in range(0, len(gold), 64):
    counter.update(gold[i:i + 64], pred[i:i + 64])
  assert counter.num_sentences == 300
  assert counter.result() == metrics.span_prf(gold, pred)


def test_bad_input_names_location():
  with pytest.raises(ValueError, match=r"sentence 1 pred token 2.*'X-PER'"):
    metrics.span_prf([["O"], ["O", "O", "O"]], [["O"], ["O", "O", "X-PER"]])
  with pytest.raises(ValueError, match="sentence 0: gold has 2 tags but pred has 1"):
    metrics.span_prf([["O", "O"]], [["O"]])
  with pytest.raises(ValueError, match="'U-LOC'"):
    metrics.get_entities(["U-LOC"])


def _plain_token_counts(gold, pred, labels):
  """Independent per-label reference: counts of (gold, pred) pairs, then textbook formulas."""
  pairs = collections.Counter((g, p) for gs, ps in zip(gold, pred) for g, p in zip(gs, ps))
  rows = {}
  for lab in labels:
    tp = pairs[(lab, lab)]
    n_gold = sum(c for (g, _), c in pairs.items() if g == lab)
    n_pred = sum(c for (_, p), c in pairs.items() if p == lab)
    prec = tp / n_pred if n_pred else 0.0
    rec = tp / n_gold if n_gold else 0.0
    rows[lab] = (prec, rec, 2 * prec * rec / (prec + rec) if prec + rec else 0.0, n_gold)
  return rows, sum(pairs[(lab, lab)] for lab in labels) / sum(pairs.values())


def test_token_report_matches_counting_and_sklearn(conll_gold):
  gold = conll_gold[:500]
  pred = perturb(gold, random.Random(4), _types(gold), rate=0.15)
  labels = sorted({t for s in gold + pred for t in s})  # from the data, 'O' included
  res = metrics.token_prf(gold, pred, labels)
  want_rows, want_acc = _plain_token_counts(gold, pred, labels)
  assert res["accuracy"] == want_acc
  for lab, (p, r, f, s) in want_rows.items():
    got = res["per_label"][lab]
    assert (got["precision"], got["recall"], got["support"]) == (p, r, s)
    assert abs(got["f1"] - f) < 1e-12
  flat_g = [t for s in gold for t in s]
  flat_p = [t for s in pred for t in s]
  want = skm.classification_report(flat_g, flat_p, labels=labels, digits=4, zero_division=0)
  assert metrics.token_report(gold, pred, labels, digits=4) == want
  as_dict = skm.classification_report(flat_g, flat_p, labels=labels, output_dict=True, zero_division=0)
  for ours, theirs in (("macro", "macro avg"), ("weighted", "weighted avg")):
    assert abs(res[ours]["f1"] - as_dict[theirs]["f1-score"]) < 1e-12
  assert "O" in metrics.token_report(gold, pred, labels)


def test_token_report_unknown_label():
  with pytest.raises(ValueError, match="sentence 0 token 1 pred: label 'B-X' is not in labels"):
    metrics.token_prf([["O", "O"]], [["O", "B-X"]], labels=["O"])


def test_accuracy_and_perplexity():
  assert metrics.accuracy([["a", "b"], ["c"]], [["a", "x"], ["c"]]) == 2 / 3
  assert metrics.accuracy([1, 0, 1, 1], np.array([1, 1, 1, 1])) == 0.75
  assert metrics.accuracy([], []) == 0.0
  assert math.isclose(metrics.perplexity(10 * math.log(7.0), 10), 7.0, rel_tol=1e-12)
  assert metrics.perplexity(0.0, 5) == 1.0
  assert metrics.perplexity(1e6, 1) == math.inf
  with pytest.raises(ValueError, match="total_tokens"):
    metrics.perplexity(1.0, 0)
