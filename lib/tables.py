"""Declared result tables: rows x seeds as cells with workdirs, their status, and the aggregates
(mean ± std, 95% t-interval, Δ vs a reported value, within-noise flag) as Markdown/CSV/PNG.

A declaration is a Python file `tables/<name>.py` defining `TABLE = tables.Table(...)`. Each cell
(one row, one seed) is one run of a research script with `--workdir=<cell workdir>` and a seed
flag; it is finished when its workdir holds a readable `metrics.json`. research/reproduce.py runs,
emits and aggregates them; this module never imports jax.

Workdirs are machine-local and may be gone (a fresh clone, another machine); the values a table
was built from are committed beside it in `tables/<name>.cells.json` (the ledger: per row, the
cells' command hash and each seed's metric values and commit; seeds known only as a group, e.g.
recovered from an earlier aggregate, as that group's mean/std). Aggregating reads a cell's
workdir first, then the ledger, then the row's `recorded` values, and rewrites the ledger, so a
table grows across machines without losing a cell; a cell in the ledger counts as finished.
"""

import csv
import dataclasses
import datetime
import hashlib
import importlib.util
import io
import json
import math
import os
import platform
import re
import shlex
import subprocess
import textwrap
import time
from typing import Callable, Mapping, Optional, Sequence

from lib import atomic, errors, reporting

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_WORKDIR_ROOT = "workdirs/tables"
_PLACEHOLDER = re.compile(r"\{workdir:([A-Za-z0-9_.-]+)\}")
_ID = re.compile(r"^[A-Za-z0-9_.-]+$")


# ----------------------------------------------------------------------------- declarations

@dataclasses.dataclass(frozen=True)
class Reported:
  """A value to compare with: a paper's number or a reference run made outside this runner.

  Attributes:
    value: the reported value (the same scale as the metric in metrics.json).
    source: where it comes from (paper + table, or the reference command and machine).
    std: its seed standard deviation, when known (enables a two-sample comparison).
    n: the number of seeds behind `value`.
  """
  value: float
  source: str
  std: Optional[float] = None
  n: int = 1


@dataclasses.dataclass(frozen=True)
class Recorded:
  """Values of a row measured before the table runner existed: `values[metric path][seed]`.

  A cell's own metrics.json always wins; a recorded value fills in only where the cell has none.
  """
  values: Mapping[str, Mapping[int, float]]
  source: str


@dataclasses.dataclass(frozen=True)
class Column:
  """A metric column: `path` into metrics.json ('test.f1', 'train.trainable_percent', 'rows.0.x';
  'test.f1|test.accuracy': the first present)."""
  path: str
  label: str
  digits: int = 4
  scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class Row:
  """One configuration: a research script, its --config and flags, and the seeds to run.

  Attributes:
    id: short name, unique in the table (letters, digits, '_', '.', '-'); part of the workdir.
    label: the row's name in the table.
    config: the --config value ('configs/ner.py:lora'); '' for a script without one.
    args: further flags; '{workdir:<row id>}' stands for that row's workdir of the same seed.
    seeds: the seeds; each is one cell.
    script: the research script, relative to the repository root.
    seed_flag: the flag that takes the seed ('' when the script has none: seeds are repeats).
    workdir_flag: the flag that takes the cell's workdir (a script whose output directory is
      '--out'); the cell is finished when that directory holds metrics.json.
    claim: the row makes a claim (ours vs a reference, method A vs B): its cells run first.
    reported: the value to compare the table's primary metric with.
    vs: or the id of another row to compare with (Welch's two-sample interval).
    recorded: values measured outside the runner (shown until the cells are run).
    note: a note on the setting, shown under the table.
    cpu: the CPU the cells must run on, a part of reporting.cpu_model() ('Zen 4', 'Sapphire
      Rapids'): speed rows are per CPU type; the runner leaves them to a machine with that CPU.
  """
  id: str
  label: str
  config: str = ""
  args: Sequence[str] = ()
  seeds: Sequence[int] = (0,)
  script: str = "research/finetune.py"
  seed_flag: str = "--config.seed"
  workdir_flag: str = "--workdir"
  claim: bool = False
  reported: Optional[Reported] = None
  vs: str = ""
  recorded: Optional[Recorded] = None
  note: str = ""
  cpu: str = ""


@dataclasses.dataclass(frozen=True)
class Table:
  """A declared table: its rows, its metric columns, and which column is compared (`primary`)."""
  name: str
  title: str
  columns: Sequence[Column]
  rows: Sequence[Row]
  primary: str = ""        # metric path compared with `reported` / `vs`; default columns[0]
  setting: str = ""        # how the setting differs from the papers', shown under the table
  # The table's PNG: figure(table, results) -> PNG bytes (e.g. a learning curve over rows);
  # default: bars of the primary metric per row (png_bytes).
  figure: Optional[Callable[["Table", Sequence["RowResult"]], bytes]] = None

  @property
  def primary_path(self) -> str:
    return self.primary or self.columns[0].path


def _check(table: Table, where: str) -> Table:
  """Refuses duplicate or malformed row ids, unknown `vs`/placeholder rows, an unknown primary."""
  ids = [r.id for r in table.rows]
  problems = [f"row id {i!r} is not letters, digits, '_', '.', '-'"
              for i in ids if not _ID.match(i)]
  problems += [f"row id {i!r} is declared twice" for i in sorted(set(ids)) if ids.count(i) > 1]
  for r in table.rows:
    refs = [m for a in r.args for m in _PLACEHOLDER.findall(a)] + ([r.vs] if r.vs else [])
    problems += [f"row {r.id!r} refers to unknown row {x!r}" for x in refs if x not in ids]
    if not r.seeds:
      problems.append(f"row {r.id!r} has no seeds")
    if r.reported and r.vs:
      problems.append(f"row {r.id!r} has both reported and vs (choose one)")
  dirs = {}
  for r in table.rows:
    dirs.setdefault(row_dir(table, r, ""), []).append(r.id)
  problems += [f"rows {ids_} run the same command" for ids_ in dirs.values() if len(ids_) > 1]
  if table.primary and table.primary not in [c.path for c in table.columns]:
    problems.append(f"primary {table.primary!r} is not one of the columns' paths")
  if problems:
    raise errors.ConfigError(f"{where}: " + "; ".join(problems))
  return table


def resolve_path(spec: str, root: str = REPO_ROOT) -> str:
  """'quick', 'tables/quick' or 'tables/quick.py' -> the declaration file's absolute path."""
  path = spec if spec.endswith(".py") else spec + ".py"
  candidates = [path, os.path.join(root, path), os.path.join(root, "tables", path)]
  for c in candidates:
    if os.path.isfile(c):
      return os.path.abspath(c)
  raise errors.MissingFileError(f"--table={spec}: no declaration file (looked for "
                                f"{', '.join(candidates)})")


def load(spec: str) -> Table:
  """Loads `TABLE` from a declaration file (see `resolve_path`) and checks it.

  Raises:
    errors.MissingFileError: no such file. errors.ConfigError: no TABLE, or a malformed table.
  """
  path = resolve_path(spec)
  module_spec = importlib.util.spec_from_file_location(f"_table_{os.path.basename(path)[:-3]}",
                                                       path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  table = getattr(module, "TABLE", None)
  if not isinstance(table, Table):
    raise errors.ConfigError(f"{path}: expected a module-level TABLE = tables.Table(...)")
  return _check(table, path)


# ----------------------------------------------------------------------------- cells

@dataclasses.dataclass(frozen=True)
class Cell:
  """One run: a row at one seed, its workdir and its command (argv, run from the repo root)."""
  row: Row
  seed: int
  workdir: str
  argv: tuple
  deps: tuple = ()     # workdirs of the cells this one starts from ({workdir:<row>} arguments)

  @property
  def name(self) -> str:
    return f"{self.row.id}/seed_{self.seed}"


def row_dir(table: Table, row: Row, root: str) -> str:
  """`<root>/[<script>.]<config>-<hash>` (the script named unless it is research/finetune.py).

  The hash covers the row's command: a changed row gets fresh cells (the old ones stay), and the
  same command in two tables shares its cells.
  """
  del table  # the command alone names the cells
  key = json.dumps([row.script, row.config, list(row.args), row.seed_flag]
                   + ([row.cpu] if row.cpu else []))   # (rows without a CPU keep their hashes)
  parts = [] if row.script == "research/finetune.py" else [os.path.basename(row.script)]
  parts += [os.path.basename(row.config)] if row.config else []
  name = re.sub(r"[^A-Za-z0-9_.+-]", "_", ".".join(parts).replace(".py", "").replace(":", "."))
  return os.path.join(root, f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:8]}")


def cell_workdir(table: Table, row: Row, seed: int, root: str) -> str:
  return os.path.join(row_dir(table, row, root), f"seed_{seed}")


def _dep_seed(dep: Row, seed: int) -> int:
  return seed if seed in dep.seeds else dep.seeds[0]


def make_cell(table: Table, row: Row, seed: int, root: str, python: str) -> Cell:
  """The cell's workdir and argv: `python script --config=... args --workdir=... <seed_flag>=s`
  (`row.workdir_flag` instead of --workdir where set; not part of the cells' hash: it names where
  the script writes, not what it runs)."""
  by_id = {r.id: r for r in table.rows}

  def sub(arg):
    return _PLACEHOLDER.sub(
        lambda m: cell_workdir(table, by_id[m.group(1)], _dep_seed(by_id[m.group(1)], seed), root),
        arg)
  workdir = cell_workdir(table, row, seed, root)
  deps = tuple(cell_workdir(table, by_id[d], _dep_seed(by_id[d], seed), root)
               for a in row.args for d in _PLACEHOLDER.findall(a))
  argv = [python, row.script] + ([f"--config={row.config}"] if row.config else [])
  argv += [sub(a) for a in row.args] + [f"{row.workdir_flag}={workdir}"]
  if row.seed_flag:
    argv.append(f"{row.seed_flag}={seed}")
  return Cell(row, seed, workdir, tuple(argv), deps)


def _order(table: Table) -> list:
  """Rows in run order: claim rows first, each after the rows its placeholders name and the row
  it is compared with (`vs`)."""
  by_id, out = {r.id: r for r in table.rows}, []

  def visit(row, stack=()):
    if row.id in stack:
      raise errors.ConfigError(f"table {table.name}: rows depend on each other in a cycle: "
                               f"{' -> '.join(stack + (row.id,))}")
    for dep in [m for a in row.args for m in _PLACEHOLDER.findall(a)]:
      visit(by_id[dep], stack + (row.id,))
    if row not in out:
      out.append(row)
  for row in [r for r in table.rows if r.claim]:
    if row.vs:              # the row a claim is compared with runs in the claims group too
      visit(by_id[row.vs])  # (an ordering, not a dependency: its cells may run in any order)
    visit(row)
  for row in [r for r in table.rows if not r.claim]:
    visit(row)
  return out


def cells(table: Table, root: str = DEFAULT_WORKDIR_ROOT, python: str = "python",
          rows: Sequence[str] = (), seeds: Sequence[int] = ()) -> list:
  """Every cell in run order: claim rows (and what they depend on) first, seed-major within each
  group so that a comparison has one seed of each side before either has two. `rows`, `seeds`:
  only those (e.g. to split a table's seeds between machines), plus the cells they start from
  (`{workdir:<row>}`, transitively): `unfinished` runs those only where they have no workdir."""
  unknown = sorted(set(rows) - {r.id for r in table.rows})
  if unknown:
    raise errors.ConfigError(f"--rows: unknown row ids {unknown}; table {table.name} has "
                             f"{[r.id for r in table.rows]}")
  ordered = _order(table)
  claims = {r.id for r in ordered[:_claim_prefix(table, ordered)]}
  out = []
  for group in ([r for r in ordered if r.id in claims], [r for r in ordered if r.id not in claims]):
    for k in range(max((len(r.seeds) for r in group), default=0)):
      out += [make_cell(table, r, r.seeds[k], root, python) for r in group if k < len(r.seeds)]
  picked = {c.workdir for c in out
            if (not rows or c.row.id in rows) and (not seeds or c.seed in seeds)}
  needed = {d for c in out if c.workdir in picked for d in c.deps}
  while True:
    more = {d for c in out if c.workdir in needed for d in c.deps} - needed
    if not more:
      break
    needed |= more
  return [c for c in out if c.workdir in picked or c.workdir in needed]


def _claim_prefix(table: Table, ordered: list) -> int:
  """How many rows of `ordered` belong to the claims group (claims and their dependencies)."""
  last = max((i for i, r in enumerate(ordered) if r.claim), default=-1)
  return last + 1


def read_metrics(workdir: str) -> Optional[dict]:
  """The cell's metrics.json, or None when it is missing or unreadable (the cell must run)."""
  try:
    with open(os.path.join(workdir, "metrics.json"), encoding="utf-8") as f:
      out = json.load(f)
  except (OSError, ValueError):
    return None
  return out if isinstance(out, dict) else None


def status(cell: Cell, cwd: str = REPO_ROOT, ledger: Optional[dict] = None) -> str:
  """'done' (readable metrics.json), 'corrupt' (there but unreadable), 'partial' (a workdir
  without metrics.json: a crashed or preempted run, resumed by rerunning), 'stored' (no workdir
  here, but the cell's values are in the table's ledger) or 'missing'."""
  workdir = os.path.join(cwd, cell.workdir)
  metrics = os.path.join(workdir, "metrics.json")
  if os.path.exists(metrics):
    return "done" if read_metrics(workdir) is not None else "corrupt"
  if os.path.isdir(workdir):
    return "partial"
  return "stored" if cell.seed in stored_seeds(ledger, cell.row) else "missing"


def unfinished(cells_: Sequence[Cell], cwd: str = REPO_ROOT,
               ledger: Optional[dict] = None) -> list:
  """The cells to run: those neither done nor stored, each preceded by any stored cell whose
  workdir it starts from (a ledger holds values, not the checkpoints a dependent cell needs)."""
  todo = [c for c in cells_ if status(c, cwd, ledger) not in ("done", "stored")]
  needed = {d for c in todo for d in c.deps}
  by_workdir = {c.workdir: c for c in cells_}
  rerun = [by_workdir[d] for d in sorted(needed) if d in by_workdir
           and read_metrics(os.path.join(cwd, d)) is None and by_workdir[d] not in todo]
  return [c for c in cells_ if c in rerun or c in todo]


def runs_here(row: Row, cpu: Optional[str] = None) -> bool:
  """Whether this machine (`cpu`: reporting.cpu_model() by default) may run the row's cells."""
  return not row.cpu or row.cpu in (reporting.cpu_model() if cpu is None else cpu)


def ready(cell: Cell, cwd: str = REPO_ROOT) -> bool:
  """Whether every cell this one starts from has finished."""
  return all(read_metrics(os.path.join(cwd, d)) is not None for d in cell.deps)


def get_path(metrics: dict, path: str):
  """metrics['a']['b'][0] for 'a.b.0' (list indices as integers); None where absent. 'p|q': the
  first of the paths present (one column for NER's test.f1 and SST-2's test.accuracy)."""
  if "|" in path:
    found = [v for v in (get_path(metrics, p) for p in path.split("|")) if v is not None]
    return found[0] if found else None
  node = metrics
  for part in path.split("."):
    if isinstance(node, list) and part.isdigit() and int(part) < len(node):
      node = node[int(part)]
    elif isinstance(node, dict) and part in node:
      node = node[part]
    else:
      return None
  return node


# ----------------------------------------------------------------------------- running

EXIT_PREEMPTED = 75


def versions() -> dict:
  """The commit (with '+dirty' when the tree has changes), Python and package versions, host."""
  def git(*args):
    try:
      return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
      return ""
  commit = git("rev-parse", "--short=12", "HEAD")
  if commit and git("status", "--porcelain", "--untracked-files=no"):
    commit += "+dirty"
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  pkgs = {}
  for name in ("jax", "flax", "optax", "orbax-checkpoint", "torch", "transformers", "peft"):
    try:
      pkgs[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return dict(commit=commit or "unknown", python=platform.python_version(), packages=pkgs,
              host=f"{platform.machine()} {reporting.cpu_model()}, {os.cpu_count()} CPUs")


def run_cell(cell: Cell, cwd: str = REPO_ROOT, env: Optional[dict] = None) -> int:
  """Runs one cell (resuming a partial one); returns the script's exit code.

  An unreadable metrics.json is renamed `metrics.json.corrupt-<time>` first (never deleted). The
  output goes to `<workdir>.log` (appended); `<workdir>/cell.json` records the command, the
  versions and the times.
  """
  workdir = os.path.join(cwd, cell.workdir)
  metrics = os.path.join(workdir, "metrics.json")
  if os.path.exists(metrics) and read_metrics(workdir) is None:
    os.replace(metrics, f"{metrics}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
  os.makedirs(workdir, exist_ok=True)
  record = dict(argv=list(cell.argv), row=cell.row.id, seed=cell.seed,
                started=_now(), **versions())
  t0 = time.time()
  with open(workdir + ".log", "a", encoding="utf-8") as log:
    log.write(f"# {_now()} {shlex.join(cell.argv)}\n")
    log.flush()
    rc = subprocess.run(list(cell.argv), cwd=cwd, env=env, stdout=log,
                        stderr=subprocess.STDOUT, check=False).returncode
  record.update(returncode=rc, wall_s=round(time.time() - t0, 1), finished=_now())
  atomic.write_bytes(os.path.join(workdir, "cell.json"),
                     (json.dumps(record, indent=2) + "\n").encode())
  return rc


def _now() -> str:
  return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def emit(todo: Sequence[Cell], kind: str, table: Table) -> str:
  """The commands of `todo`, one shell line each ('commands') or a Slurm array script ('slurm').

  The lines are exactly the argv that `run_cell` runs, to be run from the repository root.
  """
  lines = [shlex.join(c.argv) for c in todo]
  if kind not in ("commands", "slurm"):
    raise errors.ConfigError(f"--emit={kind}: expected 'commands' or 'slurm'")
  if kind == "commands" or not lines:      # nothing to run: no job script either
    return "".join(line + "\n" for line in lines)
  body = "\n".join(f"  {shlex.quote(line)}" for line in lines)
  return (f"#!/bin/bash\n#SBATCH --job-name=table-{table.name}\n"
          f"#SBATCH --array=0-{len(lines) - 1}\n#SBATCH --output=slurm-%A_%a.out\n"
          f"# One array task per missing cell of tables/{table.name}.py; run from the repo root.\n"
          f"cd \"${{WORKBENCH_ROOT:-$SLURM_SUBMIT_DIR}}\"\nCMDS=(\n{body}\n)\n"
          f"eval \"${{CMDS[$SLURM_ARRAY_TASK_ID]}}\"\n")


# ----------------------------------------------------------------------------- statistics

def t_quantile(p: float, df: float) -> float:
  """The p-quantile of Student's t with df degrees of freedom."""
  from scipy import stats  # pylint: disable=g-import-not-at-top  # jax depends on scipy
  return float(stats.t.ppf(p, df))


@dataclasses.dataclass(frozen=True)
class Summary:
  """Seeds' values of one metric: mean, sample std (ddof 1), 95% t-interval half-width."""
  n: int
  mean: float
  std: Optional[float]        # None for one value
  half_width: Optional[float]

  @property
  def interval(self):
    if self.half_width is None:
      return None
    return (self.mean - self.half_width, self.mean + self.half_width)


def summarize(values: Sequence[float], confidence: float = 0.95) -> Optional[Summary]:
  """Mean, sample standard deviation and the t-interval mean ± t_{(1+c)/2, n-1} std / sqrt(n)."""
  values = [float(v) for v in values]
  n = len(values)
  if n == 0:
    return None
  mean = sum(values) / n
  if n == 1:
    return Summary(1, mean, None, None)
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
  return Summary(n, mean, std, t_quantile((1 + confidence) / 2, n - 1) * std / math.sqrt(n))


def compare(ours: Summary, ref_value: float, ref_std: Optional[float] = None, ref_n: int = 1,
            confidence: float = 0.95) -> dict:
  """Δ = our mean - the reference, and whether it is within noise.

  With the reference's spread (std and n >= 2): Welch's interval of the difference,
  Δ ± t_{(1+c)/2, ν} sqrt(s1²/n1 + s2²/n2) (Welch-Satterthwaite ν), within noise when it holds 0.
  Without it: within noise when the reference lies inside our t-interval. One seed of ours:
  within_noise None (not decidable).
  """
  delta = ours.mean - ref_value
  if ours.n < 2:
    return dict(delta=delta, within_noise=None, half_width=None)
  if ref_std is not None and ref_n >= 2:
    a, b = ours.std ** 2 / ours.n, ref_std ** 2 / ref_n
    if a + b == 0:
      return dict(delta=delta, within_noise=delta == 0, half_width=0.0)
    df = (a + b) ** 2 / (a ** 2 / (ours.n - 1) + b ** 2 / (ref_n - 1))
    half = t_quantile((1 + confidence) / 2, df) * math.sqrt(a + b)
  else:
    half = ours.half_width
  return dict(delta=delta, within_noise=abs(delta) <= half, half_width=half)


def pooled_summary(values: Sequence[float], groups: Sequence[dict] = (),
                   confidence: float = 0.95) -> Optional[Summary]:
  """`summarize` over `values` plus groups of seeds known only by {'seeds', 'mean', 'std'}: the
  same mean, sample std and t-interval as over all the seeds' values (pooled sums of squares)."""
  if not groups:
    return summarize(values, confidence)
  n = len(values) + sum(len(g["seeds"]) for g in groups)
  total = sum(values) + sum(len(g["seeds"]) * g["mean"] for g in groups)
  mean = total / n
  ss = sum((v - mean) ** 2 for v in values) + sum(
      (len(g["seeds"]) - 1) * (g["std"] or 0.0) ** 2 + len(g["seeds"]) * (g["mean"] - mean) ** 2
      for g in groups)
  if n == 1:
    return Summary(1, mean, None, None)
  std = math.sqrt(max(ss, 0.0) / (n - 1))
  return Summary(n, mean, std, t_quantile((1 + confidence) / 2, n - 1) * std / math.sqrt(n))


# ----------------------------------------------------------------------------- ledger

LEDGER_FORMAT = 1


def ledger_path(out_dir: str, table: Table) -> str:
  return os.path.join(out_dir, f"{table.name}.cells.json")


def read_ledger(path: str) -> dict:
  """The table's ledger ({} when there is none yet).

  Raises:
    errors.ConfigError: unreadable, or not a ledger (names the file; it is never overwritten then).
  """
  if not os.path.exists(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      out = json.load(f)
  except (OSError, ValueError) as e:
    raise errors.ConfigError(f"{path}: unreadable ledger ({e}); restore it from git") from e
  if not isinstance(out, dict) or out.get("format") != LEDGER_FORMAT:
    raise errors.ConfigError(f"{path}: not a format-{LEDGER_FORMAT} table ledger")
  return out


def _cells_key(row: Row) -> str:
  return os.path.basename(row_dir(None, row, ""))


def _ledger_row(ledger: Optional[dict], row: Row) -> dict:
  """The row's ledger entry when it is for the row's current command (its cells' hash)."""
  entry = (ledger or {}).get("rows", {}).get(row.id)
  return entry if entry and entry.get("cells") == _cells_key(row) else {}


def stored_seeds(ledger: Optional[dict], row: Row) -> set:
  """Seeds of `row` with values in the ledger (one by one or in a group)."""
  entry = _ledger_row(ledger, row)
  seeds = {int(s) for s in entry.get("seeds", {})}
  return seeds | {s for g in entry.get("pooled", {}).values() for s in g["seeds"]}


def ledger_json(table: Table, results: Sequence["RowResult"], previous: dict) -> dict:
  """The ledger for `results`; entries of rows whose command changed (or that left the table)
  are kept under 'retired', keyed by their cells' hash."""
  retired = dict(previous.get("retired", {}))
  for rid, entry in previous.get("rows", {}).items():
    row = next((r for r in table.rows if r.id == rid), None)
    if row is None or entry.get("cells") != _cells_key(row):
      retired[entry.get("cells", rid)] = dict(entry, row=rid)
  rows = {}
  for res in results:
    seeds = {}
    for path, vals in res.values.items():
      for seed, v in vals.items():
        if seed not in res.recorded_by_path.get(path, ()):
          seeds.setdefault(str(seed), {"commits": res.seed_commits.get(seed, ["unknown"]),
                                       "values": {}})["values"][path] = v
    if seeds or res.pooled:
      rows[res.row.id] = {"cells": _cells_key(res.row), "seeds": dict(sorted(seeds.items())),
                          "pooled": res.pooled}
  out = {"format": LEDGER_FORMAT, "table": table.name,
         "about": "values behind tables/" + table.name + ".md (lib/tables.py): per row, the "
                  "cells' command hash; per seed, each column's value and the commits that ran "
                  "it; 'pooled': seeds known only as a group (mean, std).",
         **({"recovered": previous["recovered"]} if "recovered" in previous else {}),
         "rows": rows}
  if retired:
    out["retired"] = retired
  return out


# ----------------------------------------------------------------------------- aggregation

@dataclasses.dataclass
class RowResult:
  """A row's aggregate: per-column summaries, the comparison of the primary metric, provenance."""
  row: Row
  seeds: list                      # seeds with a value in some column
  summaries: dict                  # column path -> Summary or None
  values: dict                     # column path -> {seed: value} (one by one)
  recorded_seeds: list             # seeds whose values came from row.recorded
  commits: list                    # commits of the runs (cell.json) behind the values
  comparison: Optional[dict] = None  # delta, within_noise, half_width, ref, ref_label, ref_std
  pooled: dict = dataclasses.field(default_factory=dict)  # path -> ledger group (seeds, mean, std)
  seed_commits: dict = dataclasses.field(default_factory=dict)      # seed -> [commits]
  recorded_by_path: dict = dataclasses.field(default_factory=dict)  # path -> recorded seeds


def _number(x) -> Optional[float]:
  if isinstance(x, bool) or not isinstance(x, (int, float)) or math.isnan(x):
    return None
  return float(x)


def _row_values(table: Table, row: Row, root: str, cwd: str, ledger: Optional[dict]) -> RowResult:
  """Each column's values: a cell's metrics.json, else the ledger (a seed's own value, or its
  group's unless every seed of the group has a metrics.json now), else row.recorded."""
  entry = _ledger_row(ledger, row)
  stored = {int(s): e for s, e in entry.get("seeds", {}).items()}
  metrics = {s: read_metrics(os.path.join(cwd, cell_workdir(table, row, s, root)))
             for s in row.seeds}
  res = RowResult(row, [], {}, {c.path: {} for c in table.columns}, [], [])
  recorded = set()
  for col in table.columns:
    group = entry.get("pooled", {}).get(col.path)
    fresh = {s: _number(get_path(m, col.path)) for s, m in metrics.items() if m}
    if group and all(fresh.get(s) is not None for s in group["seeds"]):
      group = None                       # every seed of the group ran again here: use those
    for seed in row.seeds:
      if group and seed in group["seeds"]:
        continue
      v, commit = fresh.get(seed), None
      if v is not None:
        commit = [_cell_commit(os.path.join(cwd, cell_workdir(table, row, seed, root)))]
      elif seed in stored and _number(stored[seed]["values"].get(col.path)) is not None:
        v, commit = float(stored[seed]["values"][col.path]), stored[seed].get("commits", ["?"])
      elif row.recorded is not None:
        v = _number(row.recorded.values.get(col.path, {}).get(seed))
        if v is not None:
          recorded.add(seed)
          res.recorded_by_path.setdefault(col.path, set()).add(seed)
      if v is not None:
        res.values[col.path][seed] = v
        if commit:
          res.seed_commits[seed] = commit
    if group:
      res.pooled[col.path] = group
  res.summaries = {p: pooled_summary(list(v.values()), [res.pooled[p]] if p in res.pooled else [])
                   for p, v in res.values.items()}
  res.seeds = sorted({s for v in res.values.values() for s in v}
                     | {s for g in res.pooled.values() for s in g["seeds"]})
  res.recorded_seeds = sorted(recorded)
  res.commits = sorted({c for cs in res.seed_commits.values() for c in cs}
                       | {c for g in res.pooled.values() for c in g.get("commits", [])})
  return res


def _cell_commit(workdir: str) -> str:
  try:
    with open(os.path.join(workdir, "cell.json"), encoding="utf-8") as f:
      return json.load(f).get("commit", "unknown")
  except (OSError, ValueError):
    return "unknown (run outside the table runner)"


def aggregate(table: Table, root: str = DEFAULT_WORKDIR_ROOT, cwd: str = REPO_ROOT,
              ledger: Optional[dict] = None) -> list:
  """Every row's RowResult: summaries of each column, Δ and within-noise of the primary metric
  against the row's `reported` value or its `vs` row."""
  results = {row.id: _row_values(table, row, root, cwd, ledger) for row in table.rows}
  for res in results.values():
    res.comparison = _comparison(table, res, results)
  return [results[r.id] for r in table.rows]


def _comparison(table: Table, res: RowResult, results: dict) -> Optional[dict]:
  ours = res.summaries[table.primary_path]
  row = res.row
  if ours is None or not (row.reported or row.vs):
    return None
  if row.reported:
    ref = row.reported
    ref_value, ref_std, ref_n, label = ref.value, ref.std, ref.n, "reported"
  else:
    other = results[row.vs].summaries[table.primary_path]
    if other is None:
      return None
    ref_value, ref_std, ref_n, label = other.mean, other.std, other.n, f"row {row.vs}"
  return dict(compare(ours, ref_value, ref_std, ref_n), ref=ref_value, ref_std=ref_std,
              ref_n=ref_n, ref_label=label)


# ----------------------------------------------------------------------------- writers

def _fmt(x: Optional[float], col: Column, signed: bool = False) -> str:
  if x is None:
    return "–"
  return f"{x * col.scale:{'+' if signed else ''},.{col.digits}f}"


def _fmt_summary(s: Optional[Summary], col: Column) -> str:
  if s is None:
    return "–"
  if s.std is None:
    return _fmt(s.mean, col)
  return f"{_fmt(s.mean, col)} ± {_fmt(s.std, col)}"


def _primary_col(table: Table) -> Column:
  return next(c for c in table.columns if c.path == table.primary_path)


def _noise_text(cmp: Optional[dict]) -> str:
  if cmp is None:
    return "–"
  return {None: "n/a (1 seed)", True: "yes", False: "**no**"}[cmp["within_noise"]]


def _seeds_text(n: int, declared: int) -> str:
  if n == 0:
    return "not run"
  text = str(n) if n == declared else f"{n} of {declared}"
  return text + " (single seed)" if n == 1 else text


def _row_notes(res: RowResult, notes: list) -> str:
  """Footnote marks for the row's reported source, recorded values and note (appended to notes)."""
  texts = []
  if res.row.reported:
    texts.append(f"reported: {res.row.reported.source}")
  if res.recorded_seeds:
    seeds = res.recorded_seeds
    texts.append(f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} recorded "
                 f"outside the table runner: {res.row.recorded.source}")
  if res.row.note:
    texts.append(res.row.note)
  marks = []
  for t in texts:
    if t not in notes:
      notes.append(t)
    marks.append(f"[{notes.index(t) + 1}]")
  return " " + "".join(marks) if marks else ""


def markdown(table: Table, results: Sequence[RowResult], info: dict) -> str:
  """The table as a Markdown block: mean ± std per column, the primary metric's 95% interval,
  the reference, Δ and within-noise; notes (sources, setting) and the producing versions."""
  pcol, notes = _primary_col(table), []
  head = (["row", "seeds"] + [c.label for c in table.columns]
          + [f"95% interval ({pcol.label})", "compared with", "Δ", "within noise"])
  lines = [f"**{table.title}**", "", "| " + " | ".join(map(_cell_text, head)) + " |",
           "|" + "---|" * len(head)]
  for res in results:
    s, cmp = res.summaries[table.primary_path], res.comparison
    seeds = _seeds_text(len(res.seeds), len(res.row.seeds))
    ci = (f"[{_fmt(s.interval[0], pcol)}, {_fmt(s.interval[1], pcol)}]"
          if s is not None and s.interval else "–")
    ref = "–"
    if cmp is not None:
      ref = f"{cmp['ref_label']} {_fmt(cmp['ref'], pcol)}"
      if cmp["ref_std"] is not None:
        ref += f" ± {_fmt(cmp['ref_std'], pcol)} ({cmp['ref_n']} seeds)"
    cells_ = ([res.row.label + _row_notes(res, notes), seeds]
              + [_fmt_summary(res.summaries[c.path], c) for c in table.columns]
              + [ci, ref, _fmt(cmp["delta"], pcol, signed=True) if cmp else "–",
                 _noise_text(cmp)])
    lines.append("| " + " | ".join(map(_cell_text, cells_)) + " |")
  lines.append("")
  lines += [f"[{i + 1}] {t}" for i, t in enumerate(notes)]
  if table.setting:
    lines += ["", f"Setting: {table.setting}"]
  lines += ["", _method_text(), "", _provenance(results, info)]
  return "\n".join(lines) + "\n"


def _cell_text(text: str) -> str:
  """A Markdown table cell: a '|' in a label (e.g. `ner.py:k5|k10`) would split the cell."""
  return text.replace("|", "\\|")


def _method_text() -> str:
  return ("Mean ± sample standard deviation over seeds; 95% interval: Student's t over seeds. "
          "Within noise: the reported value lies inside our interval, or (when the other side "
          "has seeds too) Welch's 95% interval of the difference holds 0.")


def _provenance(results: Sequence[RowResult], info: dict) -> str:
  commits = sorted({c for r in results for c in r.commits})
  pkgs = ", ".join(f"{k} {v}" for k, v in info["packages"].items())
  return (f"Generated by `{info['command']}` at commit {info['commit']} on {info['date']} "
          f"(Python {info['python']}, {pkgs}; {info['host']}). Cells run at commits: "
          f"{', '.join(commits) if commits else 'none'}.")


def csv_text(table: Table, results: Sequence[RowResult]) -> str:
  """One line per row: n, seeds, mean/std per column, interval and comparison of the primary."""
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["row", "label", "n", "seeds", "recorded_seeds"]
             + [f"{c.path}:{k}" for c in table.columns for k in ("mean", "std")]
             + ["ci_low", "ci_high", "compared_with", "reference", "delta", "within_noise"])
  for res in results:
    s, cmp = res.summaries[table.primary_path], res.comparison
    ci = s.interval if s is not None and s.interval else ("", "")
    w.writerow([res.row.id, res.row.label, len(res.seeds), " ".join(map(str, res.seeds)),
                " ".join(map(str, res.recorded_seeds))]
               + [x for c in table.columns for x in _mean_std(res.summaries[c.path])]
               + list(ci) + ([cmp["ref_label"], cmp["ref"], cmp["delta"],
                              "" if cmp["within_noise"] is None else cmp["within_noise"]]
                             if cmp else ["", "", "", ""]))
  return buf.getvalue()


def _mean_std(s: Optional[Summary]) -> tuple:
  if s is None:
    return ("", "")
  return (s.mean, "" if s.std is None else s.std)


def png_bytes(table: Table, results: Sequence[RowResult]) -> bytes:
  """Horizontal bars of the primary metric's mean per row, 95% intervals as error bars (std when
  the row has one seed: none), the compared-with value as a red mark; or the table's own
  `figure`."""
  if table.figure is not None:
    return table.figure(table, results)
  plt = pyplot()
  pcol = _primary_col(table)
  shown = [r for r in results if r.summaries[table.primary_path] is not None]
  fig, ax = plt.subplots(figsize=(7, 0.45 * max(len(shown), 1) + 1.2))
  ys = list(range(len(shown)))[::-1]
  for y, res in zip(ys, shown):
    s = res.summaries[table.primary_path]
    ax.barh(y, s.mean * pcol.scale, xerr=(s.half_width or 0) * pcol.scale, color="#4c72b0",
            capsize=3)
    if res.comparison:
      ax.plot(res.comparison["ref"] * pcol.scale, y, "x", color="#c44e52", markersize=8)
  ax.set_yticks(ys, [r.row.label[:48] for r in shown], fontsize=8)
  ax.set_xlabel(f"{pcol.label} (mean, 95% interval; x = compared with)")
  ax.set_title(textwrap.fill(table.title, 70), fontsize=9)
  lo = min([r.summaries[table.primary_path].mean * pcol.scale for r in shown], default=0)
  ax.set_xlim(left=max(0.0, lo - 0.1 * abs(lo)) if lo > 0 else None)
  return figure_png(fig)


def pyplot():
  """matplotlib.pyplot on the Agg backend (no display needed)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def figure_png(fig) -> bytes:
  """A matplotlib figure as PNG bytes (tight layout, 100 dpi); closes the figure."""
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  pyplot().close(fig)
  return buf.getvalue()


def write_aggregates(table: Table, results: Sequence[RowResult], out_dir: str,
                     command: str, previous_ledger: Optional[dict] = None) -> list:
  """Writes <out_dir>/<name>.md, .csv, .png and the ledger .cells.json atomically; returns their
  paths. `previous_ledger`: the ledger `results` were aggregated with (its retired entries and
  those of rows that changed command are kept)."""
  info = dict(versions(), command=command, date=_now())
  paths = [os.path.join(out_dir, f"{table.name}.{ext}") for ext in ("md", "csv", "png")]
  atomic.write_bytes(paths[0], markdown(table, results, info).encode())
  atomic.write_bytes(paths[1], csv_text(table, results).encode())
  atomic.write_bytes(paths[2], png_bytes(table, results))
  ledger = ledger_json(table, results, previous_ledger or {})
  paths.append(ledger_path(out_dir, table))
  atomic.write_bytes(paths[3], (json.dumps(ledger, indent=1) + "\n").encode())
  return paths


# ----------------------------------------------------------------------------- README blocks

_BLOCK = re.compile(r"(<!-- table:([A-Za-z0-9_.-]+) -->\n)(.*?)(<!-- /table -->)", re.S)


def replace_blocks(text: str, blocks: Mapping[str, str], where: str = "README.md") -> tuple:
  """Replaces the body of every `<!-- table:NAME -->` ... `<!-- /table -->` block with
  blocks[NAME]; returns (new text, names replaced).

  Raises:
    errors.ConfigError: an opening marker without its closing one, or a block whose table has
      no aggregate in `blocks` (names the line).
  """
  opened = len(re.findall(r"<!-- table:[A-Za-z0-9_.-]+ -->", text))
  if opened != len(_BLOCK.findall(text)):
    raise errors.ConfigError(f"{where}: {opened} '<!-- table:NAME -->' markers but "
                             f"{len(_BLOCK.findall(text))} closed by '<!-- /table -->'")
  replaced = []

  def sub(m):
    name = m.group(2)
    if name not in blocks:
      line = text[:m.start()].count("\n") + 1
      raise errors.ConfigError(f"{where}:{line}: block table:{name} has no aggregate "
                               f"(run research/reproduce.py --table=tables/{name} --aggregate)")
    replaced.append(name)
    return m.group(1) + blocks[name].rstrip("\n") + "\n" + m.group(4)
  return _BLOCK.sub(sub, text), replaced


def update_readme(readme: str, tables_dir: str) -> list:
  """Fills README.md's marked blocks from `<tables_dir>/<name>.md`; returns the names filled."""
  with open(readme, encoding="utf-8") as f:
    text = f.read()
  names = [m.group(2) for m in _BLOCK.finditer(text)]
  blocks = {}
  for n in names:
    path = os.path.join(tables_dir, f"{n}.md")
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        blocks[n] = f.read()
  new, replaced = replace_blocks(text, blocks, readme)
  if new != text:
    atomic.write_bytes(readme, new.encode("utf-8"))
  return replaced
