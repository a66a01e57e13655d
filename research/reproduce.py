"""Reproduce a declared result table (tables/<name>.py): run its missing cells, or emit them as
commands for another machine, and aggregate the finished ones into tables/<name>.md/.csv/.png.

  ./run.sh reproduce --table=tables/quick                 # run missing cells, then aggregate
  ./run.sh reproduce --table=tables/peft_ner --list       # every cell and its status
  ./run.sh reproduce --table=tables/peft_ner --emit=commands   # one shell line per missing cell
  ./run.sh reproduce --table=tables/peft_ner --emit=slurm > peft_ner.sbatch   # a Slurm array
  ./run.sh reproduce --table=tables/peft_ner --aggregate --readme=README.md

A cell (row x seed) is finished when its workdir (<workdir_root>/[<script>.]<config>-<hash of
the command>/seed_<s>; tables declaring the same command share it) holds a readable metrics.json,
or when the table's committed ledger (<out_dir>/<name>.cells.json, rewritten by every aggregate)
holds its values: it is skipped (a stored cell reruns only when a missing cell starts from its
workdir). A workdir without one (a crashed or preempted run)
is resumed by rerunning the same command; an unreadable metrics.json is renamed aside and the
cell rerun. Claim rows run first. A preempted cell (exit 75) stops the run with exit 75: rerun to
continue. Emitted lines are exactly the commands this script runs, from the repository root.
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lib import cli, reporting, tables  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("table", None, "a declaration: tables/<name>[.py] or <name>")
flags.DEFINE_string("workdir_root", tables.DEFAULT_WORKDIR_ROOT, "where the cells' workdirs go "
                    "(relative to the repository root unless absolute)")
flags.DEFINE_enum("emit", "", ["", "commands", "slurm"], "print the missing cells' commands "
                  "instead of running them")
flags.DEFINE_bool("aggregate", False, "only aggregate the finished cells (run nothing)")
flags.DEFINE_bool("list", False, "print every cell with its status and exit")
flags.DEFINE_list("rows", [], "only these row ids (default: all), with the cells they start "
                  "from ({workdir:<row>}: run only where this machine lacks them)")
flags.DEFINE_list("seeds", [], "only these seeds (default: every row's declared seeds)")
flags.DEFINE_integer("max_cells", 0, "run at most this many cells now (0: all missing)")
flags.DEFINE_string("python", "", "interpreter in the cells' commands (default: .venv/bin/python "
                    "when the repository has one, else this interpreter)")
flags.DEFINE_string("out_dir", "", "where <name>.md/.csv/.png go (default: the declaration's "
                    "folder)")
flags.DEFINE_string("readme", "", "also fill this file's <!-- table:NAME --> blocks from "
                    "<out_dir>/NAME.md")
flags.mark_flags_as_required(["table"])


def _python() -> str:
  if FLAGS.python:
    return FLAGS.python
  venv = os.path.join(".venv", "bin", "python")
  return venv if os.path.exists(os.path.join(tables.REPO_ROOT, venv)) else sys.executable


def _aggregate(table, out_dir: str, readme: str, ledger: dict) -> None:
  results = tables.aggregate(table, FLAGS.workdir_root, ledger=ledger)
  command = f"research/reproduce.py --table=tables/{table.name} --aggregate"
  for path in tables.write_aggregates(table, results, out_dir, command, ledger):
    print(f"wrote {path}")
  if readme:
    filled = tables.update_readme(readme, out_dir)
    print(f"{readme}: filled blocks {filled or 'none'}")


def _run(todo: list, ledger: dict) -> int:
  """Runs the cells in order; returns 75 when one was preempted, 1 when any failed, else 0."""
  failed, waiting = [], []
  for i, cell in enumerate(todo):
    if not tables.ready(cell):
      waiting.append(cell.name)
      print(f"[{i + 1}/{len(todo)}] {cell.name}: waits for {', '.join(cell.deps)}", flush=True)
      continue
    state = tables.status(cell, ledger=ledger)
    if state == "stored":   # values in the ledger, but a dependent cell needs its workdir
      state = "stored: rerun, a cell starts from its workdir"
    print(f"[{i + 1}/{len(todo)}] {cell.name} ({state}) -> {cell.workdir}.log", flush=True)
    rc = tables.run_cell(cell)
    if rc == tables.EXIT_PREEMPTED:
      print(f"{cell.name}: preempted; rerun the same command to continue", flush=True)
      return tables.EXIT_PREEMPTED
    if rc != 0 or tables.status(cell) != "done":
      failed.append(f"{cell.name} (exit {rc}; log {cell.workdir}.log)")
  for name in failed:
    print(f"failed: {name}", file=sys.stderr)
  if waiting:
    print(f"not run (dependencies unfinished): {', '.join(waiting)}", file=sys.stderr)
  return 1 if failed or waiting else 0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  table = tables.load(FLAGS.table)
  # Paths the user typed are relative to where they are; the cells' to the repository root.
  out_dir = os.path.abspath(FLAGS.out_dir or os.path.dirname(tables.resolve_path(FLAGS.table)))
  readme = os.path.abspath(FLAGS.readme) if FLAGS.readme else ""
  os.chdir(tables.REPO_ROOT)  # the cells' commands and workdirs are relative to the repo root
  try:
    seeds = [int(s) for s in FLAGS.seeds]
  except ValueError as e:
    raise app.UsageError(f"--seeds={','.join(FLAGS.seeds)}: not integers") from e
  cells = tables.cells(table, FLAGS.workdir_root, _python(), FLAGS.rows, seeds)
  ledger = tables.read_ledger(tables.ledger_path(out_dir, table))
  if FLAGS.list:
    for c in cells:
      elsewhere = "" if tables.runs_here(c.row) else f"  (runs on {c.row.cpu} only)"
      print(f"{tables.status(c, ledger=ledger):8s} {c.name:32s} {c.workdir}{elsewhere}")
    return 0
  if FLAGS.aggregate:
    _aggregate(table, out_dir, readme, ledger)
    return 0
  todo = tables.unfinished(cells, ledger=ledger)
  n_done = len(cells) - len(todo)
  elsewhere = [c for c in todo if not tables.runs_here(c.row)]
  if elsewhere:
    cpus = sorted({c.row.cpu for c in elsewhere})
    print(f"{len(elsewhere)} missing cells run on another CPU ({', '.join(cpus)}; this one: "
          f"{reporting.cpu_model()}): left for a machine with it", file=sys.stderr, flush=True)
    todo = [c for c in todo if tables.runs_here(c.row)]
  runnable = len(todo)
  if FLAGS.max_cells:
    todo = todo[:FLAGS.max_cells]
  if FLAGS.emit:
    ready = [c for c in todo if tables.ready(c)]
    if len(ready) < len(todo):
      print(f"# {len(todo) - len(ready)} cells wait for unfinished cells they start from: emit "
            "again once those ran", file=sys.stderr)
    sys.stdout.write(tables.emit(ready, FLAGS.emit, table))
    return 0
  later = runnable - len(todo)
  print(f"table {table.name}: {len(cells)} cells, {n_done} done, {len(todo)} to run"
        + (f" now, {later} left for a later run (--max_cells)" if later else ""), flush=True)
  rc = _run(todo, ledger)
  if rc != tables.EXIT_PREEMPTED:
    _aggregate(table, out_dir, readme, ledger)
  return rc


if __name__ == "__main__":
  cli.run(main)
