"""Report writers: CoNLL prediction files, conlleval-style summaries, atomic JSON, training-curve plots."""

import io
import json
import logging
import os
import platform
from typing import Any, Sequence

import numpy as np

from lib import atomic, metrics

log = logging.getLogger(__name__)


# (vendor, family) -> [(first model, last model, core)]: the cores our machines have shown or
# may show. A hypervisor can hide the marketing name ('AMD EPYC' for every generation) while the
# core decides the speed ratios: Zen 4 runs AVX-512 on 256-bit units, Zen 5 on 512-bit ones
# (twice the float32 FLOP per cycle), Sapphire/Emerald Rapids add AMX tiles.
_CORES = {
    ("AuthenticAMD", 25): [(0x00, 0x0F, "Zen 3"), (0x10, 0x1F, "Zen 4"), (0x20, 0x2F, "Zen 3"),
                           (0x40, 0x4F, "Zen 3+"), (0x50, 0x5F, "Zen 3"), (0x60, 0x7F, "Zen 4"),
                           (0xA0, 0xAF, "Zen 4c")],
    ("AuthenticAMD", 26): [(0x00, 0x7F, "Zen 5")],
    ("GenuineIntel", 6): [(0x55, 0x55, "Skylake/Cascade Lake"), (0x6A, 0x6C, "Ice Lake"),
                          (0x8F, 0x8F, "Sapphire Rapids"), (0xCF, 0xCF, "Emerald Rapids"),
                          (0xAD, 0xAE, "Granite Rapids")],
}


def _cpuinfo() -> dict:
  """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
  fields = {}
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if not line.strip():
          break
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
  except OSError:
    pass
  return fields


def cpu_core(fields: dict) -> str:
  """'Zen 4, family 25 model 17' from /proc/cpuinfo fields ('' without family/model): the name
  of the core where we know it, always the raw family and model."""
  try:
    family, model = int(fields["cpu family"]), int(fields["model"])
  except (KeyError, ValueError):
    return ""
  core = next((name for lo, hi, name in _CORES.get((fields.get("vendor_id"), family), ())
               if lo <= model <= hi), "")
  return f"{core + ', ' if core else ''}family {family} model {model}"


def cpu_model() -> str:
  """This machine's CPU for every timing we print or record, e.g. 'AMD EPYC (Zen 4, family 25
  model 17)': /proc/cpuinfo's model name and the core it is (the name alone can hide it; speed
  ratios against PyTorch differ between cores)."""
  fields = _cpuinfo()
  name = fields.get("model name") or platform.processor() or "unknown CPU"
  core = cpu_core(fields)
  return f"{name} ({core})" if core else name


def _check_field(value: str, where: str) -> None:
  """A CoNLL field must be a non-empty string without whitespace, or conlleval would mis-split the line."""
  if not isinstance(value, str) or not value or any(c.isspace() for c in value):
    raise ValueError(f"{where}: expected a non-empty string without whitespace, got {value!r}")


def write_conll_predictions(path: str, sentences: Sequence[Sequence[str]], gold: Sequence[Sequence[str]],
                            pred: Sequence[Sequence[str]]) -> dict:
  """Writes `word gold predicted` per line, a blank line after each sentence (conlleval input), atomically.

  Empty sentences have no lines to write; they are skipped, counted and logged.

  Args:
    path: output file.
    sentences: words, one list per sentence.
    gold: gold tags, same shape as `sentences`.
    pred: predicted tags, same shape as `sentences`.

  Returns:
    {'sentences': written, 'tokens': written, 'skipped_empty': count}.

  Raises:
    ValueError: shapes differ, or a word/tag is empty or contains whitespace (names sentence and token).
  """
  if not len(sentences) == len(gold) == len(pred):
    raise ValueError(f"{path}: {len(sentences)} sentences, {len(gold)} gold and {len(pred)} pred sequences")
  lines, stats = [], {"sentences": 0, "tokens": 0, "skipped_empty": 0}
  for i, (words, g_seq, p_seq) in enumerate(zip(sentences, gold, pred)):
    if not len(words) == len(g_seq) == len(p_seq):
      raise ValueError(f"{path}: sentence {i} has {len(words)} words, {len(g_seq)} gold, {len(p_seq)} pred tags")
    if not words:
      stats["skipped_empty"] += 1
      continue
    for j, fields in enumerate(zip(words, g_seq, p_seq)):
      for name, value in zip(("word", "gold", "pred"), fields):
        _check_field(value, f"{path}: sentence {i} token {j} {name}")
      lines.append(" ".join(fields) + "\n")
    lines.append("\n")
    stats["sentences"] += 1
    stats["tokens"] += len(words)
  if stats["skipped_empty"]:
    log.warning("%s: skipped %d empty sentences", path, stats["skipped_empty"])
  atomic.write_bytes(path, "".join(lines).encode("utf-8"))
  return stats


def _json_default(obj: Any) -> Any:
  """numpy/jax scalars and arrays -> Python numbers and lists; anything else is an error."""
  if isinstance(obj, np.generic):
    return obj.item()
  if hasattr(obj, "__array__"):
    return np.asarray(obj).tolist()
  raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes `obj` as indented JSON (numpy/jax values converted), via a temp file and os.replace.

  Raises:
    TypeError: `obj` holds a value JSON cannot represent (the message names `path`).
  """
  try:
    text = json.dumps(obj, indent=2, default=_json_default)
  except TypeError as e:
    raise TypeError(f"{path}: {e}") from e
  atomic.write_bytes(path, (text + "\n").encode("utf-8"))


def conlleval_summary(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> str:
  """The summary conlleval.pl prints for these tags (same counts, same line formats).

  Args:
    gold: gold tag sequences, one list per sentence.
    pred: predicted tag sequences.

  Returns:
    'processed N tokens with M phrases; found: K phrases; correct: C.', the accuracy/precision/recall/FB1
    line (percentages) and one line per type ending with the number of predicted phrases, as conlleval.
  """
  res = metrics.span_prf(gold, pred)
  num_tokens = sum(len(s) for s in gold)
  out = [f"processed {num_tokens} tokens with {res['num_gold']} phrases; "
         f"found: {res['num_pred']} phrases; correct: {res['num_correct']}."]
  if num_tokens:
    acc = 100.0 * metrics.accuracy(gold, pred)
    out.append(f"accuracy: {acc:6.2f}%; " + _conll_prf(res["num_correct"], res["num_pred"], res["num_gold"]))
  for t, v in res["per_type"].items():
    out.append(f"{t:>17s}: " + _conll_prf(v["num_correct"], v["num_pred"], v["support"]) + f"  {v['num_pred']}")
  return "\n".join(out) + "\n"


def _conll_prf(correct: int, found: int, support: int) -> str:
  """conlleval's 'precision: P%; recall: R%; FB1: F' with its percentage arithmetic."""
  p = 100.0 * correct / found if found else 0.0
  r = 100.0 * correct / support if support else 0.0
  f = 2 * p * r / (p + r) if p + r else 0.0
  return f"precision: {p:6.2f}%; recall: {r:6.2f}%; FB1: {f:6.2f}"


def _series(name: str, points: Sequence) -> tuple[list, list]:
  """(steps, values) of one history series; each point must be a (step, value) pair of numbers."""
  steps, values = [], []
  for i, point in enumerate(points):
    try:
      step, value = point
      steps.append(float(step))
      values.append(float(value))
    except (TypeError, ValueError) as e:
      raise ValueError(f"history[{name!r}][{i}]: expected a (step, value) pair of numbers, got {point!r}") from e
  return steps, values


def plot_curves(path_png: str, history: dict[str, Sequence[tuple[float, float]]]) -> None:
  """Plots training curves into a two-panel PNG: losses vs step (left), other metrics vs step (right).

  Series whose name contains 'loss' (e.g. 'train_loss', 'dev_loss') go left, all others (e.g. 'dev_f1',
  'dev_accuracy') go right. Empty series are skipped and counted in the log.

  Args:
    path_png: output PNG path (written atomically).
    history: series name -> [(step, value), ...].

  Raises:
    ValueError: a point is not a (step, value) pair of numbers.
  """
  # Imported here so that importing lib.reporting (e.g. in eval workers) does not load matplotlib.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  # Figure + Agg canvas directly: no pyplot global state, no GUI backend, safe in threads.
  fig = Figure(figsize=(11, 4), dpi=100)
  FigureCanvasAgg(fig)
  ax_loss, ax_metric = fig.subplots(1, 2)
  empty = 0
  for name in sorted(history):
    steps, values = _series(name, history[name])
    if not steps:
      empty += 1
      continue
    ax = ax_loss if "loss" in name.lower() else ax_metric
    ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=name)
  if empty:
    log.warning("%s: skipped %d empty history series", path_png, empty)
  for ax, title in ((ax_loss, "loss"), (ax_metric, "dev metrics")):
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=8)
    else:
      ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  atomic.write_bytes(path_png, buf.getvalue())


def write_text_atomic(path: str, text: str) -> None:
  """Writes UTF-8 text via a temp file and os.replace (readers never see half a file)."""
  atomic.write_bytes(path, text.encode("utf-8"))


def write_tsv_predictions(path: str, inputs: Sequence[str], gold: Sequence[str], pred: Sequence[str]) -> None:
  """`input<TAB>gold<TAB>predicted` per example with a header line (classification predictions)."""
  if not len(inputs) == len(gold) == len(pred):
    raise ValueError(f"{path}: {len(inputs)} inputs, {len(gold)} gold and {len(pred)} predictions")
  rows = ["input\tgold\tpredicted"]
  for i, (x, g, p) in enumerate(zip(inputs, gold, pred)):
    if "\t" in x or "\n" in x:
      raise ValueError(f"{path}: example {i} contains a tab or newline: {x!r}")
    rows.append(f"{x}\t{g}\t{p}")
  write_text_atomic(path, "\n".join(rows) + "\n")


def read_jsonl_history(path: str) -> list:
  """Rows of a metrics.jsonl (lib.train's log); a step logged twice (resumed run) keeps the last row."""
  if not os.path.exists(path):
    return []
  rows = {}
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if line.strip():
        try:
          row = json.loads(line)
        except ValueError as e:
          raise ValueError(f"{path}:{n}: not JSON: {e}") from e
        rows[(row["kind"], row["step"])] = row
  return sorted(rows.values(), key=lambda r: (r["step"], r["kind"]))
