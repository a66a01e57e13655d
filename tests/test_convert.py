"""research/convert.py and lib/model_io.py: outputs never destroy a source or a run, and a run
workdir as a model source means the checkpoint its metrics.json reports (or the one asked for).

The workdir is a tiny fine-tuning run (tests/test_finetune.py's ANIMAL/FOOD data, random-init
encoder) whose dev set has no entities: its dev F1 is 0 at every evaluation, so the best
checkpoint (ties: the earliest) is the first evaluated one, not the last.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from lib import atomic, checkpoint, errors, model_io, models
from test_finetune import REPO, _animal_sentences, _env, _write_conll

EPOCHS = 3   # 32 sentences, batch 16: 2 steps per epoch, evaluated and saved at steps 2, 4, 6


def _tiny_run(root, name, source="", variant="quick"):
  """configs/ner.py:<variant> on an ANIMAL/FOOD dataset whose dev set has no entities."""
  from configs import ner as ner_config  # pylint: disable=g-import-not-at-top
  from lib import finetune  # pylint: disable=g-import-not-at-top
  src = root / "data" / "conll2003"
  if not src.exists():
    src.mkdir(parents=True)
    _write_conll(src / "train.txt", _animal_sentences(32, 0))
    _write_conll(src / "valid.txt", [(w, ["O"] * len(w)) for w, _ in _animal_sentences(8, 1)])
    _write_conll(src / "test.txt", _animal_sentences(8, 2))
  cfg = ner_config.get_config(variant)
  cfg.data.dir, cfg.data.cache_dir = str(root / "data"), str(root / "cache")
  cfg.data.max_train_examples, cfg.data.batch_size, cfg.data.eval_batch_size = 0, 16, 16
  cfg.data.max_len, cfg.train.epochs, cfg.train.keep = 16, EPOCHS, 1
  cfg.optim.lr = 3e-3
  args = None if source else models.ModelArgs(
      hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64, max_len=32, dropout_rate=0.0,
      attention_dropout_rate=0.0)
  workdir = str(root / name)
  out = finetune.run(cfg, workdir, source=source, model_args=args)
  return workdir, out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(workdir, best step, latest step) of the tiny run."""
  workdir, out = _tiny_run(tmp_path_factory.mktemp("convert"), "run")
  steps = checkpoint.saved_steps(os.path.join(workdir, "checkpoints"))
  return workdir, out["train"]["best_step"], steps[-1]


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
  """The run exported to a HF directory (the default: its best checkpoint)."""
  out = str(tmp_path_factory.mktemp("export") / "hf")
  model_io.ours_to_hf(run[0], out, "")
  return out


def _restore(workdir, step, like):
  """The params of checkpoint `step`, restored directly (not through model_io)."""
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), like)
  tree = checkpoint.restore_params(os.path.join(workdir, "checkpoints", str(step)), abstract)
  return jax.tree.map(np.asarray, tree)


def _equal(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _hashes(path) -> dict:
  """{relative path: sha256} of every file under `path` (directories included as entries)."""
  out = {}
  for root, dirs, files in os.walk(path):
    for d in dirs:
      out[os.path.relpath(os.path.join(root, d), path) + "/"] = "dir"
    for name in files:
      full = os.path.join(root, name)
      out[os.path.relpath(full, path)] = hashlib.sha256(open(full, "rb").read()).hexdigest()
  return out


def _convert(*flags):
  return subprocess.run([sys.executable, os.path.join(REPO, "research", "convert.py"), *flags],
                        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)


def test_the_run_has_a_best_step_before_its_last(run):
  workdir, best, latest = run
  assert best == 2 and latest == 2 * EPOCHS, (best, latest)
  assert checkpoint.saved_steps(os.path.join(workdir, "checkpoints")) == [best, latest]


def test_convert_to_its_own_source_is_refused_and_changes_nothing(run):
  workdir, _, _ = run
  before = _hashes(workdir)
  res = _convert("--to=hf", f"--src={workdir}", f"--dst={workdir}")
  assert res.returncode != 0
  lines = [l for l in (res.stdout + res.stderr).splitlines() if "replace the source" in l]
  assert lines and all(l.count(workdir) == 2 for l in lines), res.stdout + res.stderr
  assert _hashes(workdir) == before
  assert not [n for n in os.listdir(os.path.dirname(workdir)) if n.startswith(".tmp")]


def test_swapped_source_and_destination_are_refused(run, exported):
  workdir, _, _ = run
  before = _hashes(workdir)
  # The HF export "converted back" onto the run, with and without --overwrite: never.
  for overwrite in (False, True):
    with pytest.raises(atomic.OutputExistsError, match="never replaced.*checkpoints"):
      model_io.to_ours(exported, workdir, overwrite=overwrite)
    with pytest.raises(atomic.OutputExistsError, match="never replaced.*checkpoints"):
      model_io.ours_to_hf(exported, workdir, "", overwrite=overwrite)
  res = _convert("--to=ours", f"--src={exported}", f"--dst={workdir}", "--overwrite")
  assert res.returncode != 0 and "never replaced" in res.stdout + res.stderr
  assert _hashes(workdir) == before
  # The destination inside the source, or the source inside the destination.
  with pytest.raises(atomic.OutputExistsError, match="inside the source"):
    model_io.ours_to_hf(workdir, os.path.join(workdir, "hf"), "")
  with pytest.raises(atomic.OutputExistsError, match="contains the source") as e:
    model_io.ours_to_hf(workdir, os.path.dirname(workdir), "", overwrite=True)
  assert isinstance(e.value, errors.UserError)
  assert _hashes(workdir) == before


def test_existing_destination_needs_overwrite_and_run_outputs_are_kept(run, tmp_path):
  workdir, _, _ = run
  dst = tmp_path / "out"
  dst.mkdir()
  (dst / "notes.txt").write_text("mine")
  with pytest.raises(atomic.OutputExistsError, match="not empty.*--overwrite"):
    model_io.ours_to_hf(workdir, str(dst), "")
  assert os.listdir(dst) == ["notes.txt"]
  model_io.ours_to_hf(workdir, str(dst), "", overwrite=True)
  assert "notes.txt" not in os.listdir(dst) and (dst / "config.json").exists()
  # A directory holding checkpoints is never deleted, --overwrite or not.
  other = tmp_path / "other_run"
  (other / "checkpoints" / "5").mkdir(parents=True)
  (other / "checkpoints" / "5" / "state").write_text("weights")
  before = _hashes(other)
  with pytest.raises(atomic.OutputExistsError, match="checkpoints"):
    model_io.ours_to_hf(workdir, str(other), "", overwrite=True)
  assert _hashes(other) == before


def test_a_workdir_means_its_best_checkpoint_unless_asked_otherwise(run, exported, tmp_path):
  workdir, best, latest = run
  meta = model_io.read_model_json(workdir)
  loaded = model_io.load_model(workdir, meta["head"], meta["num_labels"])
  at_best = _restore(workdir, best, loaded.params)
  at_latest = _restore(workdir, latest, loaded.params)
  assert not _equal(at_best, at_latest)   # the two checkpoints differ: the test can tell them apart
  assert loaded.step == best and _equal(loaded.params, at_best)
  for suffix, step, want in (("@latest", latest, at_latest), (f"@{best}", best, at_best),
                             (f"@{latest}", latest, at_latest), ("@best", best, at_best)):
    other = model_io.load_model(workdir + suffix, meta["head"], meta["num_labels"])
    assert other.step == step and _equal(other.params, want), suffix
  for bad, what in (("@last", "bad checkpoint suffix"), ("@3", "no checkpoint step 3")):
    with pytest.raises(errors.ModelSourceError, match=what) as e:
      model_io.load_model(workdir + bad, meta["head"], meta["num_labels"])
    assert f"{[best, latest]}" in str(e.value)
  # The HF export holds the best step's weights and says so in config.json.
  config = json.load(open(os.path.join(exported, "config.json")))
  assert config["workbench_source"] == {"path": os.path.abspath(workdir), "step": best}
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  weights = load_file(os.path.join(exported, "model.safetensors"))
  np.testing.assert_array_equal(weights["classifier.weight"], at_best["classifier"]["kernel"].T)
  # ... and our model directory records the step too.
  model_io.to_ours(f"{workdir}@latest", str(tmp_path / "ours"))
  assert model_io.read_model_json(str(tmp_path / "ours"))["source_step"] == latest
  again = model_io.load_model(str(tmp_path / "ours"), meta["head"], meta["num_labels"])
  assert again.step is None and _equal(again.params, at_latest)


def test_a_damaged_chosen_checkpoint_falls_back_to_the_latest(run, tmp_path):
  workdir, best, latest = run
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  os.remove(os.path.join(copy, "checkpoints", str(best), "commit_success.txt"))
  meta = model_io.read_model_json(copy)
  loaded = model_io.load_model(copy, meta["head"], meta["num_labels"])
  assert loaded.step == latest
  assert _equal(loaded.params, _restore(workdir, latest, loaded.params))
  with pytest.raises(checkpoint.CorruptCheckpointError, match=f"{best}.*commit_success"):
    model_io.load_model(f"{copy}@{best}", meta["head"], meta["num_labels"])   # asked for: no


def test_finetuning_from_a_workdir_records_the_step_it_started_from(run, tmp_path):
  workdir, best, _ = run
  ft, out = _tiny_run(tmp_path, "lora", source=workdir, variant="quick+lora")
  assert model_io.read_model_json(ft)["init_from"] == f"{workdir}@{best}"
  adapter = json.load(open(os.path.join(ft, "adapter", "adapter.json")))
  assert adapter["source_step"] == out["train"]["best_step"]
  assert adapter["source"] == os.path.abspath(ft)
