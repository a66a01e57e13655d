"""Evaluation metrics: seqeval/conlleval-compatible entity span P/R/F1, token reports, accuracy, perplexity."""

import collections
import math
from typing import Hashable, Sequence

import numpy as np

# Chunk prefixes understood by seqeval's default (conlleval-compatible) mode: IOB1, IOB2, IOE1/2, IOBES.
_PREFIXES = ("B", "I", "E", "S")
# seqeval gives 'O' and bare prefixes ('B', 'I', ...) the type '_'; types must agree for the transition rules.
_NO_TYPE = "_"


def _parse_tag(tag: str, where: str) -> tuple[str, str]:
  """Splits a tag into (prefix, type); 'O' -> ('O', '_'), 'B-PER' -> ('B', 'PER'), 'B' -> ('B', '_')."""
  if not isinstance(tag, str):
    raise TypeError(f"{where}: expected a tag string, got {type(tag).__name__} {tag!r}")
  if tag == "O":
    return "O", _NO_TYPE
  if tag in _PREFIXES:
    return tag, _NO_TYPE
  if len(tag) > 2 and tag[0] in _PREFIXES and tag[1] == "-":
    return tag[0], tag[2:]
  raise ValueError(f"{where}: tag {tag!r} is not 'O' or '<B|I|E|S>-TYPE' (IOB1/IOB2/IOE/IOBES)")


def _chunk_ends(prev_tag: str, prev_type: str, tag: str, type_: str) -> bool:
  """True if a chunk ended between the previous and the current token (conlleval's endOfChunk)."""
  if prev_tag == "O":
    return False
  if prev_tag in ("E", "S"):  # E and S always close their chunk.
    return True
  if prev_type != type_:  # A type change closes any open chunk, even I-X -> I-Y.
    return True
  return tag in ("B", "S", "O")


def _chunk_starts(prev_tag: str, prev_type: str, tag: str, type_: str) -> bool:
  """True if a chunk starts at the current token (conlleval's startOfChunk)."""
  if tag == "O":
    return False
  if tag in ("B", "S"):
    return True
  if prev_type != type_:  # Ill-formed I-X after O or after Y starts a new entity, as in conlleval.
    return True
  return prev_tag in ("O", "E", "S")  # I/E continuing nothing (or after a closed chunk) starts one.


def _entities(tags: Sequence[str], where: str) -> list[tuple[str, int, int]]:
  """get_entities with an error location prefix."""
  chunks = []
  prev_tag, prev_type, begin = "O", _NO_TYPE, 0
  # A trailing 'O' closes an entity that runs to the end of the sentence.
  for i, raw in enumerate(list(tags) + ["O"]):
    tag, type_ = _parse_tag(raw, f"{where} token {i}")
    if _chunk_ends(prev_tag, prev_type, tag, type_):
      chunks.append((prev_type, begin, i - 1))
    if _chunk_starts(prev_tag, prev_type, tag, type_):
      begin = i
    prev_tag, prev_type = tag, type_
  return chunks


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
  """Entity spans of one tagged sentence, exactly as seqeval's default mode and conlleval find them.

  Args:
    tags: tags of one sentence, e.g. ['B-PER', 'I-PER', 'O', 'I-LOC'] (IOB1, IOB2, IOE or IOBES).

  Returns:
    (type, start, end) triples in order, `end` INCLUSIVE (seqeval's convention), e.g.
    [('PER', 0, 1), ('LOC', 3, 3)]. Ill-formed I-X after O or after another type starts a new entity.

  Raises:
    ValueError: a tag is not 'O', a bare prefix, or '<B|I|E|S>-TYPE'.
  """
  return _entities(tags, "tags")


def _check_pairs(gold: Sequence[Sequence], pred: Sequence[Sequence]) -> None:
  """Raises ValueError naming the first sentence whose gold and predicted lengths differ."""
  if len(gold) != len(pred):
    raise ValueError(f"gold has {len(gold)} sentences but pred has {len(pred)}")
  for i, (g, p) in enumerate(zip(gold, pred)):
    if len(g) != len(p):
      raise ValueError(f"sentence {i}: gold has {len(g)} tags but pred has {len(p)}")


def _safe_div(num: float, den: float) -> float:
  """num / den, 0.0 when den == 0 (seqeval's and sklearn's zero_division='warn' value)."""
  return num / den if den else 0.0


def _prf(correct: int, found: int, support: int) -> dict:
  """Precision/recall/F1 computed in seqeval's order of float operations (F1 from P and R)."""
  p, r = _safe_div(correct, found), _safe_div(correct, support)
  f1 = 2.0 * p * r / (p + r) if p + r else 0.0
  return {"precision": p, "recall": r, "f1": f1, "support": support}


class EntityCounter:
  """Streaming entity counts; update() with batches of sentences, result() equals span_prf on all of them.

  Entities never cross sentences (seqeval separates sentences by 'O'), so per-sentence counts add up.
  """

  def __init__(self):
    self.correct = collections.Counter()  # type -> exact (type, start, end) matches
    self.found = collections.Counter()  # type -> predicted entities
    self.support = collections.Counter()  # type -> gold entities
    self.num_sentences = 0

  def update(self, gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> None:
    """Adds a batch of gold and predicted tag sequences (same lengths)."""
    _check_pairs(gold, pred)
    for g, p in zip(gold, pred):
      where = f"sentence {self.num_sentences}"
      g_set = set(_entities(g, f"{where} gold"))
      p_set = set(_entities(p, f"{where} pred"))
      self.support.update(t for t, _, _ in g_set)
      self.found.update(t for t, _, _ in p_set)
      self.correct.update(t for t, _, _ in g_set & p_set)
      self.num_sentences += 1

  def result(self) -> dict:
    """Micro P/R/F1 and counts, per-type rows and macro/weighted averages (see span_prf)."""
    types = sorted(set(self.support) | set(self.found))
    per_type = {}
    for t in types:
      per_type[t] = _prf(self.correct[t], self.found[t], self.support[t])
      per_type[t].update(num_pred=self.found[t], num_correct=self.correct[t])
    out = _prf(sum(self.correct.values()), sum(self.found.values()), sum(self.support.values()))
    out.update(num_gold=out["support"], num_pred=sum(self.found.values()),
               num_correct=sum(self.correct.values()), per_type=per_type)
    out["macro"] = _average(per_type, weighted=False)
    out["weighted"] = _average(per_type, weighted=True)
    return out


def _average(rows: dict, weighted: bool) -> dict:
  """Macro or support-weighted average of per-class rows, with numpy's summation (bit-equal to sklearn/seqeval)."""
  support = np.array([rows[k]["support"] for k in rows], dtype=np.int64)
  out = {"support": int(support.sum())}
  for key in ("precision", "recall", "f1"):
    values = np.array([rows[k][key] for k in rows], dtype=np.float64)
    if not len(values) or (weighted and not support.sum()):
      out[key] = 0.0  # seqeval/sklearn return 0 (zero_division) or nan here; 0 keeps JSON clean.
    else:
      out[key] = float(np.average(values, weights=support if weighted else None))
  return out


def span_prf(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict:
  """Entity-level precision/recall/F1, equal to conlleval and seqeval's default (non-strict) mode.

  Args:
    gold: gold tag sequences, one list per sentence.
    pred: predicted tag sequences, same lengths as `gold`.

  Returns:
    {'precision', 'recall', 'f1' (micro), 'support' (= 'num_gold'), 'num_gold', 'num_pred', 'num_correct',
     'per_type': {type: {'precision', 'recall', 'f1', 'support', 'num_pred', 'num_correct'}},
     'macro': {...}, 'weighted': {...}} with types sorted, taken from gold and predictions.
    Ratios with a zero denominator are 0.0.

  Raises:
    ValueError: sentence counts or lengths differ, or a tag is malformed (names sentence and token).
  """
  counter = EntityCounter()
  counter.update(gold, pred)
  return counter.result()


def _format_table(rows: list, digits: int) -> str:
  """sklearn/seqeval text layout: class rows, blank line, average rows (an 'accuracy' row has only f1 and support)."""
  names = [r[0] for r in rows if r is not None]
  width = max([len(n) for n in names] + [len("weighted avg"), digits])
  lines = ["{:>{w}s} ".format("", w=width) + "".join(f" {h:>9}" for h in ("precision", "recall", "f1-score", "support")),
           ""]
  for row in rows:
    if row is None:
      lines.append("")
    elif row[0] == "accuracy" and row[1] is None:
      lines.append("{:>{w}s} ".format(row[0], w=width) + " " * 20 + f" {row[3]:>9.{digits}f} {row[4]:>9}")
    else:
      name, p, r, f, s = row
      lines.append("{:>{w}s} ".format(name, w=width) + f" {p:>9.{digits}f} {r:>9.{digits}f} {f:>9.{digits}f} {s:>9}")
  return "\n".join(lines) + "\n"


def classification_report_entities(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]],
                                   digits: int = 4) -> str:
  """seqeval-style entity report: per type, then micro/macro/weighted averages.

  The numbers (and, for the same `digits`, the text) equal
  `seqeval.metrics.classification_report(gold, pred, digits=digits)`.

  Args:
    gold: gold tag sequences, one list per sentence.
    pred: predicted tag sequences.
    digits: decimals printed.

  Returns:
    The report text with columns precision, recall, f1-score, support.
  """
  res = span_prf(gold, pred)
  rows = [(t, v["precision"], v["recall"], v["f1"], v["support"]) for t, v in res["per_type"].items()]
  rows.append(None)
  rows.append(("micro avg", res["precision"], res["recall"], res["f1"], res["support"]))
  for name in ("macro", "weighted"):
    v = res[name]
    rows.append((f"{name} avg", v["precision"], v["recall"], v["f1"], v["support"]))
  return _format_table(rows, digits)


class TokenCounter:
  """Streaming per-label token counts (tp, predicted, gold) over a fixed label set taken from the data."""

  def __init__(self, labels: Sequence[Hashable]):
    if len(set(labels)) != len(labels):
      raise ValueError(f"labels: duplicate entries in {list(labels)!r}")
    self.labels = list(labels)
    self._index = {label: i for i, label in enumerate(self.labels)}
    self.tp = np.zeros(len(self.labels), np.int64)
    self.pred = np.zeros(len(self.labels), np.int64)
    self.gold = np.zeros(len(self.labels), np.int64)
    self.num_sentences = 0

  def _id(self, label: Hashable, where: str) -> int:
    if label not in self._index:
      raise ValueError(f"{where}: label {label!r} is not in labels {self.labels!r}")
    return self._index[label]

  def update(self, gold: Sequence[Sequence[Hashable]], pred: Sequence[Sequence[Hashable]]) -> None:
    """Adds a batch of gold and predicted label sequences (same lengths)."""
    _check_pairs(gold, pred)
    for g_seq, p_seq in zip(gold, pred):
      for j, (g, p) in enumerate(zip(g_seq, p_seq)):
        gi = self._id(g, f"sentence {self.num_sentences} token {j} gold")
        pi = self._id(p, f"sentence {self.num_sentences} token {j} pred")
        self.gold[gi] += 1
        self.pred[pi] += 1
        self.tp[gi] += gi == pi
      self.num_sentences += 1

  def result(self) -> dict:
    """{'per_label': {label: {precision, recall, f1, support}}, 'accuracy', 'num_tokens', 'macro', 'weighted'}.

    F1 is 2*tp / (gold + pred) as sklearn computes it (not from rounded P and R), so numbers equal
    sklearn.metrics.classification_report(labels=labels).
    """
    per_label = {}
    for i, label in enumerate(self.labels):
      tp, n_pred, n_gold = int(self.tp[i]), int(self.pred[i]), int(self.gold[i])
      per_label[label] = {"precision": _safe_div(tp, n_pred), "recall": _safe_div(tp, n_gold),
                          "f1": _safe_div(2 * tp, n_gold + n_pred), "support": n_gold}
    num_tokens = int(self.gold.sum())
    return {"per_label": per_label, "accuracy": _safe_div(int(self.tp.sum()), num_tokens),
            "num_tokens": num_tokens, "macro": _average(per_label, weighted=False),
            "weighted": _average(per_label, weighted=True)}


def token_prf(gold: Sequence[Sequence[Hashable]], pred: Sequence[Sequence[Hashable]],
              labels: Sequence[Hashable]) -> dict:
  """Token-level per-label precision/recall/F1/support, accuracy and averages (see TokenCounter.result).

  Args:
    gold: gold label sequences, one list per sentence.
    pred: predicted label sequences.
    labels: every label that may occur (e.g. the dataset's tag vocabulary, 'O' included), in report order.

  Raises:
    ValueError: lengths differ, or a label is not in `labels` (names sentence and token).
  """
  counter = TokenCounter(labels)
  counter.update(gold, pred)
  return counter.result()


def token_report(gold: Sequence[Sequence[Hashable]], pred: Sequence[Sequence[Hashable]],
                 labels: Sequence[Hashable], digits: int = 4) -> str:
  """sklearn-style token-level report over `labels` (including 'O'): per label, accuracy, macro/weighted avg.

  For the same `digits` the text equals
  `sklearn.metrics.classification_report(flat_gold, flat_pred, labels=labels, digits=digits)`.

  Args:
    gold: gold label sequences, one list per sentence.
    pred: predicted label sequences.
    labels: all labels, in report order (from the data, never hard-coded).
    digits: decimals printed.

  Returns:
    The report text.
  """
  res = token_prf(gold, pred, labels)
  rows = [(str(k), v["precision"], v["recall"], v["f1"], v["support"]) for k, v in res["per_label"].items()]
  rows.append(None)
  rows.append(("accuracy", None, None, res["accuracy"], res["num_tokens"]))
  for name in ("macro", "weighted"):
    v = res[name]
    rows.append((f"{name} avg", v["precision"], v["recall"], v["f1"], v["support"]))
  return _format_table(rows, digits)


def accuracy(gold: Sequence, pred: Sequence) -> float:
  """Fraction of equal items; sentences (nested sequences) are compared token by token.

  Args:
    gold: labels, either flat (one per example) or one sequence per sentence.
    pred: same structure and lengths as `gold`.

  Returns:
    correct / total, 0.0 for empty input.
  """
  if len(gold) != len(pred):
    raise ValueError(f"gold has {len(gold)} items but pred has {len(pred)}")
  nested = len(gold) and isinstance(gold[0], (list, tuple, np.ndarray))
  if not nested:
    return _safe_div(sum(int(g == p) for g, p in zip(gold, pred)), len(gold))
  _check_pairs(gold, pred)
  correct = sum(int(g == p) for g_seq, p_seq in zip(gold, pred) for g, p in zip(g_seq, p_seq))
  return _safe_div(correct, sum(len(g) for g in gold))


def perplexity(total_nll: float, total_tokens: int) -> float:
  """exp(total_nll / total_tokens) from summed natural-log NLL; inf if it overflows a float.

  Raises:
    ValueError: total_tokens <= 0 or total_nll is negative or not finite.
  """
  if total_tokens <= 0:
    raise ValueError(f"total_tokens: expected > 0, got {total_tokens}")
  if not math.isfinite(total_nll) or total_nll < 0:
    raise ValueError(f"total_nll: expected a finite non-negative sum of NLL (nats), got {total_nll}")
  try:
    return math.exp(total_nll / total_tokens)
  except OverflowError:  # mean NLL above ~709.78 nats: report inf rather than crash an eval loop.
    return math.inf
