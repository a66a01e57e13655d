"""Every declared table in tables/ loads, and each of its cells names a script and a config that
exist, a variant the config knows and `--config.*` overrides whose keys are in that config: a
typo in a declaration fails here, not hours into a reproduce run."""

import csv
import glob
import io
import importlib
import os

import pytest

from lib import tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DECLARED = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "tables", "*.py")))


def _config(spec: str):
  path, _, variant = spec.partition(":")
  module = importlib.import_module(path[:-3].replace("/", "."))
  return module.get_config(variant)


def _has_key(cfg, dotted: str) -> bool:
  node = cfg
  for part in dotted.split("."):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      return False
  return True


def test_every_declaration_is_found():
  assert {"finetune", "distill", "compress_ner", "quick"} <= set(DECLARED)


@pytest.mark.parametrize("name", DECLARED)
def test_declared_cells_name_real_scripts_configs_and_keys(name):
  table = tables.load(os.path.join(ROOT, "tables", name + ".py"))
  cells = tables.cells(table, root="/tmp/unused_root")
  assert cells, name
  for cell in cells:
    row = cell.row
    assert os.path.isfile(os.path.join(ROOT, row.script)), (name, row.id, row.script)
    if not row.config:
      continue
    assert os.path.isfile(os.path.join(ROOT, row.config.partition(":")[0])), (name, row.id)
    cfg = _config(row.config)
    overrides = [a for a in cell.argv if a.startswith("--config.")]
    for arg in overrides:
      key = arg[len("--config."):].partition("=")[0]
      assert _has_key(cfg, key), f"{name}: row {row.id}: {arg} names no key of {row.config}"


def test_a_misspelt_override_is_caught():
  cfg = _config("configs/compress.py:ner+qat")
  assert _has_key(cfg, "eval.data.max_train_examples")
  assert not _has_key(cfg, "eval.data.max_train_example")


@pytest.mark.parametrize("name", DECLARED)
def test_committed_ledger_reproduces_the_committed_table(name):
  """tables/<name>.cells.json alone (no workdirs: a fresh clone) gives tables/<name>.csv: the
  ledger and the table it stands behind were committed together."""
  table = tables.load(os.path.join(ROOT, "tables", name + ".py"))
  out_dir = os.path.join(ROOT, "tables")
  if not os.path.exists(os.path.join(out_dir, f"{name}.csv")):
    pytest.skip("no aggregate committed yet")
  ledger = tables.read_ledger(tables.ledger_path(out_dir, table))
  results = tables.aggregate(table, root="/tmp/no_workdirs_here", ledger=ledger)
  got = list(csv.DictReader(io.StringIO(tables.csv_text(table, results))))
  with open(os.path.join(out_dir, f"{name}.csv"), encoding="utf-8") as f:
    want = list(csv.DictReader(f))
  assert [r["row"] for r in got] == [r["row"] for r in want]
  for g, w in zip(got, want):
    for key, value in w.items():
      try:
        assert float(g[key]) == pytest.approx(float(value), rel=1e-9, abs=1e-12), (g["row"], key)
      except ValueError:
        assert g[key] == value, (g["row"], key)


@pytest.mark.parametrize("name", DECLARED)
def test_committed_ledger_renders_the_figure(name):
  """Each table's PNG (its own `figure` or the default bars) renders from the committed ledger."""
  table = tables.load(os.path.join(ROOT, "tables", name + ".py"))
  ledger = tables.read_ledger(tables.ledger_path(os.path.join(ROOT, "tables"), table))
  results = tables.aggregate(table, root="/tmp/no_workdirs_here", ledger=ledger)
  png = tables.png_bytes(table, results)
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_fewshot_learning_curve_reads_the_full_data_reference():
  """The few-shot curve's full-data band is the finetune table's committed sst2 / ner row."""
  fewshot = importlib.import_module("tables.fewshot")
  with open(os.path.join(ROOT, "tables", "finetune.csv"), encoding="utf-8") as f:
    rows = {r["row"]: r for r in csv.DictReader(f)}
  for row in ("sst2", "ner"):
    mean, std, n = fewshot._full_data(row)  # pylint: disable=protected-access
    assert mean == float(rows[row]["test.f1|test.accuracy:mean"]) and n == int(rows[row]["n"])
    assert 0.8 < mean < 0.95 and std > 0
  assert fewshot._full_data("no_such_row") is None  # pylint: disable=protected-access
