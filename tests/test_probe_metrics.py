"""research/causal_probe.py's metrics.json (lib/probe/experiments.metrics): the headline numbers
of each mode against hand-picked summaries, and (slow) an IG run whose metrics.json holds the
completeness errors the script printed."""

import json
import os
import re
import subprocess
import sys

import pytest

from lib.probe import experiments

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_probe_metrics_pick_the_best_layer_per_task_in_run_order():
  summary = {"pos": dict(accuracy=[0.5, 0.9, 0.7], selectivity=[0.1, 0.3, 0.2], majority=0.2,
                         expected_layer=1.4, mix_accuracy=0.88),
             "ner": dict(accuracy=[0.6, 0.7, 0.95], selectivity=[0.05, 0.02, 0.01],
                         majority=0.8, expected_layer=2.1, mix_accuracy=0.9)}
  m = experiments.metrics("probe", summary, 12.5)
  assert m["mode"] == "probe" and m["wall_s"] == 12.5
  assert m["probes"] == [
      dict(task="pos", best_layer=1, best_accuracy=0.9, majority=0.2, expected_layer=1.4,
           max_selectivity=0.3, mix_accuracy=0.88),
      dict(task="ner", best_layer=2, best_accuracy=0.95, majority=0.8, expected_layer=2.1,
           max_selectivity=0.05, mix_accuracy=0.9)]


def _peaks(v):
  return dict(peak_value=v, peak_layer=0, peak_role="last", avg_indirect_effect=[[v]])


def test_patch_facts_inlp_ig_metrics():
  bench = dict(speedup=9.6, max_abs_diff=2e-7, examples=2, cells=12, per_cell_s=9.6,
               prefix_reuse_s=1.0)
  rho = {"resid": 0.5, "attn": 0.8, "mlp": 0.7, "all": 0.9}
  patch = dict(benchmark=bench, spearman=rho, grid_s=3.0, examples=8, resid=_peaks(0.7),
               mlp=_peaks(0.3), attn=_peaks(0.4))
  g = experiments.metrics("patch", patch, 1.0)["grid"]
  assert (g["speedup"], g["max_abs_diff"], g["spearman"], g["examples"]) == (9.6, 2e-7, 0.9, 8)
  assert (g["spearman_attn"], g["peak_resid"], g["peak_mlp"]) == (0.8, 0.7, 0.3)
  facts = dict(patch, recall=623 / 630, held_out=630, traced=500)
  del facts["examples"]
  f = experiments.metrics("facts", facts, 1238.0)
  assert f["facts"] == dict(recall=623 / 630, held_out=630, recalled=623)
  assert f["grid"]["examples"] == 500
  # No recalled fact: nothing traced, recall still reported.
  assert "grid" not in experiments.metrics("facts", dict(recall=0.0, held_out=630), 1.0)
  inlp = dict(property="ner", target="pos", layer=2, rank=90, property_accuracy=[0.922, 0.85],
              property_final=0.779, majority=0.781,
              target_probe={"none": dict(loss=0.9, accuracy=0.811),
                            "inlp": dict(loss=1.25, accuracy=0.709),
                            "random": dict(loss=0.93, accuracy=0.804)})
  i = experiments.metrics("inlp", inlp, 171.0)["inlp"]
  assert (i["iterations"], i["rank"], i["property_before"], i["property_last"],
          i["property_after"]) == (2, 90, 0.922, 0.85, 0.779)
  assert (i["target_none"], i["target_inlp"], i["target_random"], i["target_inlp_loss"]) == (
      0.811, 0.709, 0.804, 1.25)
  ig = experiments.metrics("ig", dict(completeness_error_max=0.0019, completeness_error_mean=4e-4,
                                      sentences=12, steps=64), 5.0)["ig"]
  assert ig["completeness_error_max_percent"] == pytest.approx(0.19)
  assert ig["completeness_error_mean_percent"] == pytest.approx(0.04)


@pytest.mark.slow
def test_ig_run_writes_the_printed_completeness_errors(tmp_path):
  out = tmp_path / "ig"
  cmd = [sys.executable, "research/causal_probe.py", "--config=configs/probe.py",
         "--config.mode=ig", "--config.ig.examples=2", "--config.ig.train=40",
         "--config.ig.steps=8", "--config.probe.steps=20", f"--out={out}"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  printed = re.search(r"completeness error max ([\d.]+)%, mean ([\d.]+)% over (\d+) sentences",
                      proc.stdout)
  with open(out / "metrics.json", encoding="utf-8") as f:
    m = json.load(f)
  assert m["mode"] == "ig" and m["ig"]["sentences"] == int(printed.group(3)) == 2
  assert f"{m['ig']['completeness_error_max_percent']:.4f}" == printed.group(1)
  assert f"{m['ig']['completeness_error_mean_percent']:.4f}" == printed.group(2)
  assert float(re.search(r"ig: (\d+) s", proc.stdout).group(1)) == pytest.approx(m["wall_s"],
                                                                                  abs=1)
