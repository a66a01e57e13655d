"""lib/tables.py and research/reproduce.py: statistics against hand computations and scipy's own
tests, cells skipped / rerun / resumed, emitted commands equal to the ones run, README blocks,
and the `quick` table end to end (slow)."""

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import shlex
import subprocess
import sys
import textwrap

import pytest
from scipy import stats

from lib import errors, tables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T975_DF2 = 4.302652729911275   # Student's t, 0.975 quantile, 2 degrees of freedom (printed tables)

# A stand-in research script: records its argv, writes metrics.json (dev.f1 = 0.5 + seed / 100),
# exits with the code named in $FAKE_EXIT_<seed> if set (75 = preempted).
FAKE_SCRIPT = textwrap.dedent("""\
    import json, os, sys
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if "=" in a)
    seed = int(args["seed"])
    with open(os.environ["FAKE_CALLS"], "a") as f:
      f.write(json.dumps(sys.argv) + "\\n")
    code = int(os.environ.get(f"FAKE_EXIT_{seed}", "0"))
    if code:
      sys.exit(code)
    os.makedirs(args["workdir"], exist_ok=True)
    with open(os.path.join(args["workdir"], "metrics.json"), "w") as f:
      json.dump({"dev": {"f1": 0.5 + seed / 100}, "rows": [{"x": seed}]}, f)
    """)


def _declaration(tmp_path, body: str) -> str:
  script = tmp_path / "fake_script.py"
  script.write_text(FAKE_SCRIPT)
  path = tmp_path / "fake_table.py"
  path.write_text("from lib import tables\nSCRIPT = %r\n" % str(script) + textwrap.dedent(body))
  return str(path)


FAKE_TABLE = """\
    TABLE = tables.Table(
        name="fake", title="fake", columns=(tables.Column("dev.f1", "dev F1"),),
        rows=(tables.Row("b", "B", args=("--init={workdir:a}",), seeds=(0, 1), script=SCRIPT,
                         seed_flag="--seed", claim=True, vs="a"),
              tables.Row("a", "A", seeds=(0, 1, 2), script=SCRIPT, seed_flag="--seed"),
              tables.Row("c", "C", args=("--variant=c",), seeds=(0,), script=SCRIPT,
                         seed_flag="--seed")))
    """


# ----------------------------------------------------------------------------- statistics

def test_summarize_by_hand():
  s = tables.summarize([0.80, 0.82, 0.87])
  assert s.n == 3 and s.mean == pytest.approx(0.83)
  std = math.sqrt((0.03 ** 2 + 0.01 ** 2 + 0.04 ** 2) / 2)      # sample std, ddof 1
  assert s.std == pytest.approx(std)
  assert s.half_width == pytest.approx(T975_DF2 * std / math.sqrt(3))
  assert s.interval == pytest.approx((0.83 - s.half_width, 0.83 + s.half_width))
  one = tables.summarize([0.7])
  assert (one.n, one.mean, one.std, one.half_width, one.interval) == (1, 0.7, None, None, None)
  assert tables.summarize([]) is None


def test_interval_matches_scipy_one_sample_test():
  vals = [0.861, 0.8579, 0.8620, 0.8623]
  s = tables.summarize(vals)
  ci = stats.ttest_1samp(vals, 0.86).confidence_interval(0.95)
  assert s.interval == pytest.approx((ci.low, ci.high), rel=1e-9)


def test_compare_against_a_reported_value():
  s = tables.summarize([0.80, 0.82, 0.87])     # half width 0.08957
  inside = tables.compare(s, 0.90)
  assert inside["delta"] == pytest.approx(-0.07) and inside["within_noise"] is True
  outside = tables.compare(s, 0.95)
  assert outside["delta"] == pytest.approx(-0.12) and outside["within_noise"] is False
  assert tables.compare(tables.summarize([0.8]), 0.9)["within_noise"] is None
  assert tables.compare(tables.summarize([0.8]), 0.9)["delta"] == pytest.approx(-0.1)


def test_compare_welch_matches_scipy():
  ours, ref = [0.80, 0.82, 0.87], [0.86, 0.90, 0.93, 0.95]
  r = tables.summarize(ref)
  out = tables.compare(tables.summarize(ours), r.mean, r.std, r.n)
  ci = stats.ttest_ind(ours, ref, equal_var=False).confidence_interval(0.95)
  assert out["delta"] == pytest.approx(0.83 - 0.91)
  assert (out["delta"] - out["half_width"], out["delta"] + out["half_width"]) == pytest.approx(
      (ci.low, ci.high), rel=1e-9)
  assert out["within_noise"] == (ci.low <= 0 <= ci.high)
  far = tables.compare(tables.summarize([0.50, 0.51, 0.52]), r.mean, r.std, r.n)
  assert far["within_noise"] is False


# ----------------------------------------------------------------------------- declarations, cells

def test_cells_order_placeholders_and_workdirs(tmp_path):
  table = tables.load(_declaration(tmp_path, FAKE_TABLE))
  cells = tables.cells(table, str(tmp_path / "w"), python="PY")
  # Row b is the claim, but starts from row a: a's cells come first within the claims group
  # (seed-major), then the rest.
  assert [c.name for c in cells] == ["a/seed_0", "b/seed_0", "a/seed_1", "b/seed_1", "a/seed_2",
                                     "c/seed_0"]
  b1 = cells[3]
  a1 = cells[2]
  assert f"--init={a1.workdir}" in b1.argv and b1.deps == (a1.workdir,)
  assert b1.argv[:2] == ("PY", table.rows[0].script)
  assert b1.argv[-2:] == (f"--workdir={b1.workdir}", "--seed=1")
  assert b1.workdir.startswith(str(tmp_path / "w" / "fake_script-"))
  assert b1.workdir.endswith("seed_1")
  assert len({c.workdir for c in cells}) == len(cells)
  picked = tables.cells(table, str(tmp_path / "w"), python="PY", rows=["a", "b"], seeds=[1, 2])
  assert [c.name for c in picked] == ["a/seed_1", "b/seed_1", "a/seed_2"]
  # A row picked alone brings the cells it starts from (run only where they have no workdir).
  alone = tables.cells(table, str(tmp_path / "w"), python="PY", rows=["b"], seeds=[1])
  assert [c.name for c in alone] == ["a/seed_1", "b/seed_1"]
  assert [c.name for c in tables.cells(table, rows=["c"])] == ["c/seed_0"]
  # A claim compared with (vs) a row that is no claim itself pulls that row into the claims
  # group: both sides of the comparison have seed 0 before anything else runs.
  vs_only = tables.load(_declaration(tmp_path, FAKE_TABLE.replace(
      '"--init={workdir:a}"', '"--variant=b"').replace(
      'tables.Row("c", "C", args=("--variant=c",), seeds=(0,)',
      'tables.Row("c", "C", args=("--variant=c",), seeds=(0, 1)')))
  assert [c.name for c in tables.cells(vs_only)] == ["a/seed_0", "b/seed_0", "a/seed_1",
                                                     "b/seed_1", "a/seed_2", "c/seed_0",
                                                     "c/seed_1"]
  claims_vs_later_row = tables.load(_declaration(tmp_path, """\
      TABLE = tables.Table(
          name="v", title="v", columns=(tables.Column("dev.f1", "dev F1"),),
          rows=(tables.Row("x", "X", seeds=(0, 1), script=SCRIPT, seed_flag="--seed"),
                tables.Row("b", "B", args=("--variant=b",), seeds=(0, 1), script=SCRIPT,
                           seed_flag="--seed", claim=True, vs="a"),
                tables.Row("a", "A", args=("--variant=a",), seeds=(0, 1), script=SCRIPT,
                           seed_flag="--seed")))
      """))
  assert [c.name for c in tables.cells(claims_vs_later_row)] == [
      "a/seed_0", "b/seed_0", "a/seed_1", "b/seed_1", "x/seed_0", "x/seed_1"]



def test_workdir_flag_names_the_output_flag_and_keeps_the_cells(tmp_path):
  # A script whose output directory is --out (research/causal_probe.py): the cell's workdir goes
  # there, the workdir is the one the same command with --workdir would get, and the cell is done
  # once the script wrote metrics.json into it.
  script = tmp_path / "out_script.py"
  script.write_text(FAKE_SCRIPT.replace('args["workdir"]', 'args["out"]'))
  rows = [tables.Row("a", "A", script=str(script), seed_flag="--seed", **kw)
          for kw in ({}, {"workdir_flag": "--out"})]
  plain, out = (tables.Table("t", "t", (tables.Column("dev.f1", "F1"),), (r,)) for r in rows)
  cell = tables.cells(out, str(tmp_path / "w"), python=sys.executable)[0]
  assert cell.workdir == tables.cells(plain, str(tmp_path / "w"))[0].workdir
  assert cell.argv[-2:] == (f"--out={cell.workdir}", "--seed=0")
  assert not any(a.startswith("--workdir") for a in cell.argv)
  env = dict(os.environ, FAKE_CALLS=str(tmp_path / "calls"))
  assert tables.run_cell(cell, cwd=str(tmp_path), env=env) == 0
  assert tables.status(cell, cwd=str(tmp_path)) == "done"
  assert tables.read_metrics(str(tmp_path / cell.workdir))["dev"]["f1"] == 0.5

def test_declaration_errors(tmp_path):
  bad = _declaration(tmp_path, """\
      TABLE = tables.Table(name="bad", title="t", columns=(tables.Column("dev.f1", "F1"),),
          rows=(tables.Row("a", "A", vs="zz"), tables.Row("a", "A2"),
                tables.Row("b", "B", args=("--x={workdir:nope}",)), tables.Row("d", "D")))
      """)
  with pytest.raises(errors.ConfigError, match=r"declared twice.*unknown row 'zz'.*unknown row "
                     r"'nope'.*rows \['a', 'a', 'd'\] run the same command"):
    tables.load(bad)
  with pytest.raises(errors.MissingFileError, match="no declaration file"):
    tables.load(str(tmp_path / "absent"))


def test_get_path():
  m = {"test": {"accuracy": 0.9}, "rows": [{"x": 1}, {"x": 2}]}
  assert tables.get_path(m, "rows.1.x") == 2 and tables.get_path(m, "rows.2.x") is None
  assert tables.get_path(m, "test.f1|test.accuracy") == 0.9
  assert tables.get_path(m, "test.f1") is None and tables.get_path(m, "dev.f1|test.f1") is None


def _reproduce(args, tmp_path, env_extra=None):
  env = dict(os.environ, FAKE_CALLS=str(tmp_path / "calls.jsonl"), **(env_extra or {}))
  proc = subprocess.run([sys.executable, os.path.join(REPO, "research", "reproduce.py"), *args,
                         f"--workdir_root={tmp_path / 'w'}", f"--python={sys.executable}",
                         f"--out_dir={tmp_path / 'out'}"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  return proc


def _calls(tmp_path):
  path = tmp_path / "calls.jsonl"
  if not path.exists():
    return []
  calls = [json.loads(line) for line in path.read_text().splitlines()]
  path.unlink()
  return calls


def test_emitted_commands_are_the_ones_run_then_finished_cells_are_skipped(tmp_path):
  decl = _declaration(tmp_path, FAKE_TABLE)
  emitted = _reproduce([f"--table={decl}", "--emit=commands"], tmp_path)
  assert emitted.returncode == 0, emitted.stderr
  # b's cells start from a's workdirs: they are emitted once a's cells are done.
  lines = [shlex.split(x) for x in emitted.stdout.splitlines()]
  assert "2 cells wait" in emitted.stderr and len(lines) == 4
  first = _reproduce([f"--table={decl}", "--max_cells=1"], tmp_path)
  assert first.returncode == 0, first.stdout + first.stderr
  assert "0 done, 1 to run now, 5 left for a later run (--max_cells)" in first.stdout
  run = _reproduce([f"--table={decl}"], tmp_path)
  assert run.returncode == 0, run.stdout + run.stderr
  assert "1 done, 5 to run" in run.stdout
  ran = _calls(tmp_path)
  assert [[sys.executable] + c for c in ran if "--init" not in " ".join(c)] == lines
  assert len(ran) == 6   # the --max_cells=1 run's cell and the 5 after it
  again = _reproduce([f"--table={decl}"], tmp_path)
  assert again.returncode == 0 and "6 done, 0 to run" in again.stdout and not _calls(tmp_path)
  assert _reproduce([f"--table={decl}", "--emit=commands"], tmp_path).stdout == ""
  with open(tmp_path / "out" / "fake.csv") as f:
    rows = {r["row"]: r for r in csv.DictReader(f)}
  assert float(rows["a"]["dev.f1:mean"]) == pytest.approx(0.51)   # seeds 0, 1, 2
  assert float(rows["b"]["delta"]) == pytest.approx(0.505 - 0.51)
  assert (tmp_path / "out" / "fake.png").stat().st_size > 1000


def test_slurm_array_task_runs_the_emitted_command(tmp_path):
  decl = _declaration(tmp_path, FAKE_TABLE)
  lines = _reproduce([f"--table={decl}", "--emit=commands"], tmp_path).stdout.splitlines()
  script = _reproduce([f"--table={decl}", "--emit=slurm"], tmp_path).stdout
  assert "#SBATCH --array=0-3" in script
  (tmp_path / "job.sbatch").write_text(script)
  env = dict(os.environ, FAKE_CALLS=str(tmp_path / "calls.jsonl"), SLURM_ARRAY_TASK_ID="1",
             WORKBENCH_ROOT=REPO)
  subprocess.run(["bash", str(tmp_path / "job.sbatch")], env=env, check=True, timeout=120)
  assert [[sys.executable] + c for c in _calls(tmp_path)] == [shlex.split(lines[1])]


def test_corrupt_or_missing_metrics_rerun_and_partial_resumes(tmp_path):
  decl = _declaration(tmp_path, FAKE_TABLE)
  assert _reproduce([f"--table={decl}"], tmp_path).returncode == 0
  _calls(tmp_path)
  cells = {c.name: c for c in tables.cells(tables.load(decl), str(tmp_path / "w"))}
  (open(os.path.join(cells["a/seed_2"].workdir, "metrics.json"), "w")).write('{"dev": {"f1"')
  os.remove(os.path.join(cells["c/seed_0"].workdir, "metrics.json"))
  assert tables.status(cells["a/seed_2"]) == "corrupt"
  assert tables.status(cells["c/seed_0"]) == "partial"
  run = _reproduce([f"--table={decl}"], tmp_path)
  assert run.returncode == 0, run.stdout + run.stderr
  ran = sorted((c[-2], c[-1]) for c in _calls(tmp_path))
  assert ran == sorted([(f"--workdir={cells['a/seed_2'].workdir}", "--seed=2"),
                        (f"--workdir={cells['c/seed_0'].workdir}", "--seed=0")])
  assert [f for f in os.listdir(cells["a/seed_2"].workdir) if f.startswith("metrics.json.corrupt")]
  assert tables.status(cells["a/seed_2"]) == "done"
  with open(os.path.join(cells["c/seed_0"].workdir, "cell.json")) as f:
    assert json.load(f)["returncode"] == 0


def test_preempted_cell_stops_the_run(tmp_path):
  decl = _declaration(tmp_path, FAKE_TABLE)
  run = _reproduce([f"--table={decl}"], tmp_path, {"FAKE_EXIT_1": "75"})
  assert run.returncode == 75, run.stdout + run.stderr
  assert [c[-1] for c in _calls(tmp_path)] == ["--seed=0", "--seed=0", "--seed=1"]   # a0, b0, a1
  failed = _reproduce([f"--table={decl}"], tmp_path, {"FAKE_EXIT_2": "1"})
  assert failed.returncode == 1 and "failed: a/seed_2" in failed.stderr


def test_rows_for_another_cpu_are_left_for_a_machine_with_it(tmp_path):
  # A speed row names the CPU its cells must run on: the runner leaves it (and says so) where the
  # CPU differs; naming a CPU gives the row its own cells, a row without one keeps its hash.
  here = tables.Row("a", "A", script="s.py", seed_flag="--seed")
  pinned = tables.Row("a", "A", script="s.py", seed_flag="--seed", cpu="Zen 9")
  t = lambda r: tables.Table("t", "t", (tables.Column("dev.f1", "F1"),), (r,))
  old_key = hashlib.sha1(json.dumps(["s.py", "", [], "--seed"]).encode()).hexdigest()[:8]
  assert tables.row_dir(t(here), here, "w") == os.path.join("w", f"s-{old_key}")  # unchanged
  assert tables.row_dir(t(pinned), pinned, "w") != tables.row_dir(t(here), here, "w")
  assert tables.runs_here(here, "AMD EPYC (Zen 4, family 25 model 17)")
  assert not tables.runs_here(pinned, "AMD EPYC (Zen 4, family 25 model 17)")
  assert tables.runs_here(pinned, "AMD EPYC (Zen 9, family 99 model 1)")
  decl = _declaration(tmp_path, """\
      TABLE = tables.Table(
          name="fake", title="fake", columns=(tables.Column("dev.f1", "dev F1"),),
          rows=(tables.Row("a", "A", seeds=(0, 1), script=SCRIPT, seed_flag="--seed"),
                tables.Row("z", "Z", seeds=(0,), script=SCRIPT, seed_flag="--seed",
                           cpu="no such CPU")))
      """)
  listed = _reproduce([f"--table={decl}", "--list"], tmp_path)
  assert "(runs on no such CPU only)" in listed.stdout
  run = _reproduce([f"--table={decl}"], tmp_path)
  assert run.returncode == 0, run.stdout + run.stderr
  assert "1 missing cells run on another CPU (no such CPU; this one: " in run.stderr
  assert "3 cells, 0 done, 2 to run" in run.stdout
  assert sorted(c[-1] for c in _calls(tmp_path)) == ["--seed=0", "--seed=1"]
  assert _reproduce([f"--table={decl}", "--emit=commands"], tmp_path).stdout == ""


# ----------------------------------------------------------------------------- ledger

def test_pooled_summary_equals_the_summary_of_all_values():
  vals = [0.80, 0.82, 0.87, 0.79]
  whole = tables.summarize(vals)
  group = tables.summarize(vals[1:])
  pooled = tables.pooled_summary([vals[0]], [{"seeds": [1, 2, 3], "mean": group.mean,
                                              "std": group.std}])
  assert (pooled.n, pooled.mean) == (4, pytest.approx(whole.mean))
  assert pooled.std == pytest.approx(whole.std) and pooled.half_width == pytest.approx(
      whole.half_width)
  one = tables.pooled_summary([], [{"seeds": [5], "mean": 0.7, "std": None}])
  assert (one.n, one.mean, one.std) == (1, 0.7, None)


def test_a_fresh_clone_keeps_the_ledger_values_and_runs_only_new_cells(tmp_path):
  """Workdirs gone (another machine): the committed ledger still holds every cell; a new seed
  runs alone and joins them; a dependent cell reruns the stored cell it starts from."""
  decl = _declaration(tmp_path, FAKE_TABLE)
  assert _reproduce([f"--table={decl}"], tmp_path).returncode == 0
  _calls(tmp_path)
  before = (tmp_path / "out" / "fake.csv").read_text()
  ledger = json.loads((tmp_path / "out" / "fake.cells.json").read_text())
  assert ledger["rows"]["a"]["seeds"]["2"]["values"] == {"dev.f1": pytest.approx(0.52)}
  os.rename(tmp_path / "w", tmp_path / "w_gone")
  listed = _reproduce([f"--table={decl}", "--list"], tmp_path).stdout.split("\n")
  assert sum(line.startswith("stored ") for line in listed) == 6
  run = _reproduce([f"--table={decl}"], tmp_path)
  assert run.returncode == 0 and "6 done, 0 to run" in run.stdout and not _calls(tmp_path)
  assert (tmp_path / "out" / "fake.csv").read_text() == before   # nothing lost
  # seed 3 of b: starts from a's seed-3 workdir? a has no seed 3 -> a's seed 0 (stored) reruns,
  # also when only b's seed 3 is asked for.
  grown = decl.replace(".py", "_grown.py")
  with open(grown, "w") as f:
    f.write(open(decl).read().replace("seeds=(0, 1), script=SCRIPT",
                                      "seeds=(0, 1, 3), script=SCRIPT"))
  os.makedirs(tmp_path / "out2")
  (tmp_path / "out2" / "fake.cells.json").write_text(json.dumps(ledger))
  run = subprocess.run([sys.executable, os.path.join(REPO, "research", "reproduce.py"),
                        f"--table={grown}", "--rows=b", "--seeds=3",
                        f"--workdir_root={tmp_path / 'w'}",
                        f"--python={sys.executable}", f"--out_dir={tmp_path / 'out2'}"],
                       cwd=REPO, env=dict(os.environ, FAKE_CALLS=str(tmp_path / "calls.jsonl")),
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stdout + run.stderr
  assert "a/seed_0 (stored: rerun, a cell starts from its workdir)" in run.stdout
  ran = [(c[-2].split("/")[-2].split("-")[0], c[-1]) for c in _calls(tmp_path)]
  assert ran == [("fake_script", "--seed=0"), ("fake_script", "--seed=3")]
  rows = {r["row"]: r for r in csv.DictReader(open(tmp_path / "out2" / "fake.csv"))}
  assert rows["b"]["seeds"] == "0 1 3" and rows["a"]["seeds"] == "0 1 2"
  assert float(rows["b"]["dev.f1:mean"]) == pytest.approx((0.50 + 0.51 + 0.53) / 3)


def test_ledger_groups_changed_rows_and_a_broken_ledger(tmp_path):
  """A group recovered from an old aggregate counts until all its seeds ran again; an entry whose
  command changed is retired, not used; an unreadable ledger is a one-line error."""
  decl = _declaration(tmp_path, FAKE_TABLE)
  table = tables.load(decl)
  key = {r.id: os.path.basename(tables.row_dir(table, r, "")) for r in table.rows}
  ledger = {"format": 1, "rows": {
      "a": {"cells": key["a"], "seeds": {"0": {"commits": ["c0"], "values": {"dev.f1": 0.40}}},
            "pooled": {"dev.f1": {"seeds": [1, 2], "mean": 0.45, "std": 0.01,
                                  "commits": ["old"]}}},
      "c": {"cells": "fake_script-00000000", "seeds": {"0": {"values": {"dev.f1": 0.9}}}}}}
  res = {r.row.id: r for r in tables.aggregate(table, str(tmp_path / "w"), ledger=ledger)}
  whole = tables.pooled_summary([0.40], [ledger["rows"]["a"]["pooled"]["dev.f1"]])
  assert res["a"].summaries["dev.f1"] == whole and res["a"].seeds == [0, 1, 2]
  assert res["a"].commits == ["c0", "old"]
  assert res["c"].seeds == [] and res["b"].seeds == []
  paths = tables.write_aggregates(table, list(res.values()), str(tmp_path), "cmd", ledger)
  written = tables.read_ledger(paths[3])
  assert written["rows"]["a"]["pooled"] == ledger["rows"]["a"]["pooled"]
  assert written["retired"]["fake_script-00000000"]["row"] == "c" and "c" not in written["rows"]
  # seed 1 ran again here: the group stays (seed 2 has not); both ran: their own values win.
  for seed, ok in ((1, False), (2, True)):
    w = tables.cells(table, str(tmp_path / "w"))
    wd = next(c.workdir for c in w if c.name == f"a/seed_{seed}")
    os.makedirs(wd)
    with open(os.path.join(wd, "metrics.json"), "w") as f:
      json.dump({"dev": {"f1": 0.6}}, f)
    a = tables.aggregate(table, str(tmp_path / "w"), cwd=str(tmp_path), ledger=ledger)[1]
    assert ("dev.f1" not in a.pooled) == ok
  assert a.values["dev.f1"] == {0: 0.40, 1: 0.6, 2: 0.6}
  (tmp_path / "bad.cells.json").write_text("{")
  with pytest.raises(errors.ConfigError, match="bad.cells.json: unreadable ledger"):
    tables.read_ledger(str(tmp_path / "bad.cells.json"))


# ----------------------------------------------------------------------------- aggregation

def test_aggregate_uses_cells_then_recorded_values(tmp_path):
  decl = _declaration(tmp_path, """\
      TABLE = tables.Table(
          name="agg", title="agg", columns=(tables.Column("dev.f1", "dev F1"),
                                            tables.Column("rows.0.x", "x", digits=1)),
          rows=(tables.Row("a", "A", seeds=(0, 1, 2), script=SCRIPT, seed_flag="--seed",
                           reported=tables.Reported(0.90, "paper, Table 1"),
                           recorded=tables.Recorded({"dev.f1": {1: 0.82, 2: 0.87}}, "old log")),
                tables.Row("b", "B `k5|k10`", args=("--variant=b",), seeds=(0,), script=SCRIPT,
                           seed_flag="--seed")))
      """)
  table = tables.load(decl)
  cells = tables.cells(table, str(tmp_path / "w"))
  a0 = cells[0].workdir
  os.makedirs(a0)
  with open(os.path.join(a0, "metrics.json"), "w") as f:
    json.dump({"dev": {"f1": 0.80}, "rows": [{"x": 7}]}, f)
  a, b = tables.aggregate(table, str(tmp_path / "w"))
  assert a.values["dev.f1"] == {0: 0.80, 1: 0.82, 2: 0.87} and a.recorded_seeds == [1, 2]
  assert a.summaries["rows.0.x"].n == 1 and a.summaries["rows.0.x"].mean == 7
  assert a.comparison["delta"] == pytest.approx(-0.07) and a.comparison["within_noise"] is True
  assert b.seeds == [] and b.summaries["dev.f1"] is None and b.comparison is None
  info = dict(command="cmd", commit="abc", date="today", python="3", packages={"jax": "1"},
              host="h")
  md = tables.markdown(table, [a, b], info)
  assert ("| A [1][2] | 3 | 0.8300 ± 0.0361 | 7.0 | [0.7404, 0.9196] | reported 0.9000 | -0.0700 "
          "| yes |") in md
  assert "| B `k5\\|k10` | not run | – | – | – | – | – | – |" in md   # '|' escaped: one cell
  assert "[1] reported: paper, Table 1" in md and "recorded outside the table runner: old log" in md
  rows = list(csv.DictReader(io.StringIO(tables.csv_text(table, [a, b]))))
  assert rows[0]["within_noise"] == "True" and float(rows[0]["ci_low"]) == pytest.approx(0.740434,
                                                                                         abs=1e-6)


def test_readme_blocks(tmp_path):
  text = ("intro\n<!-- table:x -->\nold x\n<!-- /table -->\nmiddle\n"
          "<!-- table:y -->\n<!-- /table -->\nend\n")
  new, names = tables.replace_blocks(text, {"x": "NEW X\n", "y": "NEW Y"})
  assert names == ["x", "y"]
  assert new == ("intro\n<!-- table:x -->\nNEW X\n<!-- /table -->\nmiddle\n"
                 "<!-- table:y -->\nNEW Y\n<!-- /table -->\nend\n")
  with pytest.raises(errors.ConfigError, match=r"README.md:6: block table:y has no aggregate"):
    tables.replace_blocks(text, {"x": "X"})
  with pytest.raises(errors.ConfigError, match="markers but 0 closed"):
    tables.replace_blocks("<!-- table:x -->\nno end\n", {"x": "X"})
  readme = tmp_path / "README.md"
  readme.write_text(text)
  (tmp_path / "x.md").write_text("X TABLE\n")
  (tmp_path / "y.md").write_text("Y TABLE\n")
  assert tables.update_readme(str(readme), str(tmp_path)) == ["x", "y"]
  assert "<!-- table:x -->\nX TABLE\n<!-- /table -->" in readme.read_text()


# ----------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_quick_table_end_to_end(tmp_path):
  """tables/quick.py with research/finetune.py in every cell (4 tiny runs), then skipped."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "device_count" not in f)
  cmd = [sys.executable, "research/reproduce.py", "--table=tables/quick",
         f"--workdir_root={tmp_path / 'w'}", f"--out_dir={tmp_path}"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  with open(tmp_path / "quick.csv") as f:
    rows = {r["row"]: r for r in csv.DictReader(f)}
  assert set(rows) == {"lr3e-3", "lr1e-4"} and all(r["n"] == "2" for r in rows.values())
  for r in rows.values():
    assert 0 <= float(r["dev.token_accuracy:mean"]) <= 1 and float(r["train.steps:mean"]) > 0
  md = (tmp_path / "quick.md").read_text()
  assert md.count("| lr ") == 2 and "row lr3e-3" in md and "Cells run at commits" in md
  assert (tmp_path / "quick.png").stat().st_size > 1000
  again = subprocess.run(cmd + ["--emit=commands"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
  assert again.returncode == 0 and again.stdout == ""


@pytest.mark.slow
@pytest.mark.parametrize("config,trainable", [
    # 25 LoRA modules (attention q/k/v/out x 6 layers + the pooler) x r 8 x (384 + 384), the
    # classifier 384 x 2 + 2, the pooler bias 384: our count for configs/sst2.py:lora.
    ("configs/sst2.py:quick+lora", 25 * 8 * 768 + 770 + 384),
    # 24 AdaLoRA modules x (12 x 768 + 12 singular values), the classifier 384 x 9 + 9.
    ("configs/ner.py:quick+adalora", 24 * (12 * 768 + 12) + 384 * 9 + 9),
    # No adapters: full fine-tuning of the plain HF model, every parameter (our count for
    # configs/ner.py: MiniLM without the pooler, 22,565,376, + the classifier 384 x 9 + 9).
    ("configs/ner.py:quick", 22_565_376 + 384 * 9 + 9),
])
def test_reference_peft_runs_and_trains_what_ours_trains(tmp_path, config, trainable):
  """research/reference_peft.py on a few batches: HF PEFT trains exactly our parameter count."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "device_count" not in f)
  cmd = [sys.executable, "research/reference_peft.py", f"--config={config}",
         f"--workdir={tmp_path}", "--config.data.max_train_examples=48",
         "--config.data.max_eval_examples=16", "--config.data.max_len=32",
         "--config.train.epochs=1", "--config.data.batch_size=16", "--config.train.eval_every=0"]
  cmd += ["--config.data.stride=8"] if "ner" in config else []
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  with open(tmp_path / "metrics.json") as f:
    m = json.load(f)
  assert m["train"]["trainable_params"] == trainable
  metric = "f1" if "ner" in config else "accuracy"
  assert 0 <= m["test"][metric] <= 1 and 0 <= m["dev"][metric] <= 1
  assert m["train"]["steps"] >= 3 and 1 <= m["train"]["best_step"] <= m["train"]["steps"]
  assert m["train"]["eval_s"] > 0 and m["train"]["peak_rss_gb"] > 0.1   # tables/finetune columns
  assert m["train"]["mean_step_s"] == pytest.approx(m["train"]["train_s"] / m["train"]["steps"])


def test_reference_peft_refuses_packed_rows(tmp_path):
  """HF BERT has no segment ids: the reference loop refuses a packed config (exit 2, one line)."""
  proc = subprocess.run([sys.executable, "research/reference_peft.py",
                         "--config=configs/ner.py:quick+packed", f"--workdir={tmp_path}"],
                        cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "config.data.pack_rows=5: the reference loop" in proc.stderr
  assert "Traceback" not in proc.stderr and not os.listdir(tmp_path)


def test_a_table_figure_replaces_the_default_bars(tmp_path):
  """Table.figure(table, results) gives the PNG write_aggregates writes; without it, bars."""
  decl = _declaration(tmp_path, FAKE_TABLE)
  table = tables.load(decl)
  seen = []

  def figure(t, results):
    seen.append((t.name, [r.row.id for r in results]))
    return b"\x89PNG custom"

  res = tables.aggregate(table, str(tmp_path / "w"))
  custom = dataclasses.replace(table, figure=figure)
  paths = tables.write_aggregates(custom, res, str(tmp_path / "c"), "cmd")
  assert open(paths[2], "rb").read() == b"\x89PNG custom"
  assert seen == [("fake", ["b", "a", "c"])]
  default = tables.write_aggregates(table, res, str(tmp_path / "d"), "cmd")
  assert open(default[2], "rb").read()[:4] == b"\x89PNG" and len(seen) == 1
