"""Causal probe: layer-wise probes with controls, activation patching, INLP, IG, causal tracing.

  ./run.sh probe --config=configs/probe.py --out=workdirs/probe
  .venv/bin/python research/causal_probe.py --config=configs/probe.py:quick --out=/tmp/probe_q
  .venv/bin/python research/causal_probe.py --config=configs/probe.py --config.mode=patch \
      --out=workdirs/patch

The modes and what they write: configs/probe.py; every mode also writes metrics.json (its
headline numbers, lib/probe/experiments.metrics: what tables/probe*.py read). The output directory
is written atomically (a half-finished run leaves nothing); an existing non-empty one is refused
without --overwrite.
"""

import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lib import atomic, cli, errors, reporting  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configs/probe.py[:variant]", lock_config=True)
flags.DEFINE_string("out", None, "output directory (written atomically)")
flags.DEFINE_bool("overwrite", False, "replace a non-empty --out")
flags.mark_flags_as_required(["config", "out"])

MODES = ("probe", "patch", "inlp", "ig", "facts")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cfg = FLAGS.config
  if cfg.mode not in MODES:
    raise errors.ConfigError(f"--config.mode={cfg.mode!r}; valid: {', '.join(MODES)}")
  atomic.check_output(FLAGS.out, overwrite=FLAGS.overwrite)
  # pylint: disable-next=g-import-not-at-top  # jax only after the flags and the output check
  from lib.probe import experiments
  lines = []

  def log(msg):
    print(msg, flush=True)
    lines.append(msg)

  env = f"CPU: {reporting.cpu_model()} ({os.cpu_count()} cores); command: {' '.join(sys.argv)}"
  log(env)
  t0 = time.perf_counter()
  with atomic.directory(FLAGS.out, overwrite=FLAGS.overwrite) as tmp:
    summary = getattr(experiments, f"run_{cfg.mode}")(cfg, tmp, log)
    wall_s = time.perf_counter() - t0
    log(f"{cfg.mode}: {wall_s:.0f} s")
    reporting.write_text_atomic(os.path.join(tmp, "log.txt"), "\n".join(lines) + "\n")
    reporting.write_json_atomic(os.path.join(tmp, "summary.json"),
                                dict(mode=cfg.mode, env=env, wall_s=wall_s, summary=summary))
    # Last: a declared table's cell (tables/probe*.py) is finished when this file exists.
    reporting.write_json_atomic(os.path.join(tmp, "metrics.json"),
                                experiments.metrics(cfg.mode, summary, wall_s))
  print(f"-> {FLAGS.out}")


if __name__ == "__main__":
  cli.run(main)
