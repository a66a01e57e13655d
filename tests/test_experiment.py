"""The run skeleton (lib/experiment.py): a toy task and a toy head defined here run end to end with
no change to lib/; hooks; a rerun with a different config is refused before anything is written."""

import hashlib
import json
import os

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sst2 as sst2_config
from configs import ner as ner_config
from lib import errors, experiment, finetune, metrics, models, reporting, tasks
from lib.models import heads
from lib.tasks import classification, supervised
import training_helpers  # pylint: disable=wrong-import-order

TINY = models.ModelArgs(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64, max_len=32,
                        dropout_rate=0.0, attention_dropout_rate=0.0)


# ----------------------------------------------------------------------------- a toy task

class MeanPoolHead(nn.Module):
  """Mean over the real tokens, then one linear layer: a head lib/ does not have."""
  num_labels: int

  @nn.compact
  def __call__(self, x, mask):                                    # (B, T, D), (B, T)
    m = mask[..., None].astype(x.dtype)
    pooled = (x * m).sum(1) / jnp.maximum(m.sum(1), 1.0)          # (B, D)
    return nn.Dense(self.num_labels, name="toy_out")(pooled)


def _toy_head(h):
  return {"logits": MeanPoolHead(h.num_labels, name="toy")(h.x, h.input_mask)}


if "toy_mean_pool" not in heads.HEADS:
  heads.register_head("toy_mean_pool", _toy_head)


class ToyTask:
  """Sentence classification scored by macro-averaged recall: only the interface, no lib change."""
  HEAD = "toy_mean_pool"
  METRIC, MODE, RESTORE_BEST = "macro_recall", "max", True
  make_data = staticmethod(supervised.make_data)
  written = []

  @staticmethod
  def make_loss(module, cfg):
    return classification.make_loss_fn(module)

  @staticmethod
  def score(gold, pred):
    names = sorted(set(gold))
    recall = [np.mean([p == g for g, p in zip(gold, pred) if g == n]) for n in names]
    return {"macro_recall": float(np.mean(recall)), "accuracy": metrics.accuracy(gold, pred)}

  @classmethod
  def write_predictions(cls, workdir, inputs, gold, pred):
    cls.written.append(len(pred))
    reporting.write_tsv_predictions(os.path.join(workdir, "toy.tsv"), inputs, gold, pred)

  @classmethod
  def make_evaluator(cls, run):
    ops = supervised.TaskOps(classification.collect, cls.score,
                             lambda split, r, names, step: f"{split} {r[0]}",
                             cls.write_predictions, cls.METRIC)
    return supervised.Evaluator(ops, classification.make_predict_fn(run.module), run.cfg,
                                run.data, run.bsh)


def _toy_config(tmp_path):
  d = training_helpers.write_toy_sentiment(tmp_path / "toydata")
  cfg = sst2_config.get_config("quick")
  cfg.task = "toy"
  cfg.data.dataset, cfg.data.cache_dir = f"tsv:{d}", str(tmp_path / "cache")
  cfg.data.max_train_examples, cfg.data.batch_size, cfg.data.eval_batch_size = 0, 16, 16
  cfg.data.max_len, cfg.train.epochs, cfg.optim.lr = 16, 6, 3e-3
  return cfg


def test_toy_task_and_head_run_end_to_end_through_the_skeleton(tmp_path):
  tasks.register("toy", ToyTask)
  cfg = _toy_config(tmp_path)
  seen = []
  every = experiment.Hook(lambda st, step, m: seen.append((step, m)), every=4)
  at_eval = experiment.Hook(lambda st, step, m: seen.append((step, m)), at_eval=True)
  end = experiment.Hook(lambda st, step, m: seen.append(("end", step)), at_end=True)
  out = experiment.run(cfg, str(tmp_path / "run"), tasks.get("toy"), preset_args=TINY,
                       hooks=lambda r: [every, at_eval, end])
  assert out["test"]["macro_recall"] > 0.9, out["test"]   # the first word decides the label
  meta = json.load(open(tmp_path / "run" / "model.json"))
  assert meta["head"] == "toy_mean_pool" and meta["label_names"] == ["neg", "pos"]
  assert meta["init_from"] == "random"
  saved = json.load(open(tmp_path / "run" / "metrics.json"))
  assert saved["dev"]["macro_recall"] == out["dev"]["macro_recall"]
  assert ToyTask.written[-1] == 16 and (tmp_path / "run" / "toy.tsv").exists()
  steps = 6 * 4                                  # 64 examples / 16 per batch, 6 epochs
  by_step = [s for s, m in seen if s != "end" and m is None]
  evals = [s for s, m in seen if s != "end" and m is not None]
  assert by_step == list(range(4, steps + 1, 4))   # every=4
  assert evals == list(range(4, steps + 1, 4))     # one evaluation per epoch (eval_every=0)
  assert all("macro_recall" in m for s, m in seen if s != "end" and m is not None)
  assert seen[-1] == ("end", out["train"]["best_step"])


def test_unknown_task_lists_the_registered_ones():
  with pytest.raises(ValueError, match="valid: .*'classification'.*'ner'"):
    tasks.get("nerr")


# ----------------------------------------------------------------------------- resume mismatch

def _ner_config(tmp_path, tags=("ANIMAL", "FOOD")):
  d = tmp_path / ("data_" + "_".join(tags))
  d.mkdir(exist_ok=True)
  for name in ("train.txt", "valid.txt", "test.txt"):
    with open(d / name, "w") as f:
      for i in range(8):
        f.write(f"the O\ncat B-{tags[0]}\nate O\nrice B-{tags[1]}\nday{i} O\n\n")
  cfg = ner_config.get_config("quick")
  cfg.data.dataset, cfg.data.cache_dir = f"conll:{d}", str(tmp_path / "cache")
  cfg.data.max_train_examples, cfg.data.batch_size, cfg.data.eval_batch_size = 0, 8, 8
  cfg.data.max_len, cfg.train.epochs = 16, 1
  return cfg


def _tree_hashes(root) -> dict:
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      p = os.path.join(dirpath, f)
      out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
  return out


def test_rerun_with_other_label_names_or_model_is_refused_before_writing(tmp_path):
  workdir = str(tmp_path / "run")
  finetune.run(_ner_config(tmp_path), workdir, model_args=TINY)
  before = _tree_hashes(workdir)
  json_bytes = open(os.path.join(workdir, "model.json"), "rb").read()
  # Same number of labels under other names: would silently reinterpret the outputs.
  renamed = _ner_config(tmp_path, tags=("ANIMAL", "DRINK"))
  with pytest.raises(experiment.ResumeMismatchError, match="label_names.*DRINK") as e:
    finetune.run(renamed, workdir, model_args=TINY)
  assert isinstance(e.value, errors.UserError) and "\n" not in str(e.value)
  assert "use a new --workdir" in str(e.value)
  deeper = dataclasses_replace(TINY, num_layers=2)
  with pytest.raises(experiment.ResumeMismatchError, match="model.num_layers: 1 -> 2"):
    finetune.run(_ner_config(tmp_path), workdir, model_args=deeper)
  assert open(os.path.join(workdir, "model.json"), "rb").read() == json_bytes
  assert _tree_hashes(workdir) == before
  # The same config resumes (here: finds the run finished) and leaves model.json as it was.
  finetune.run(_ner_config(tmp_path), workdir, model_args=TINY)
  assert open(os.path.join(workdir, "model.json"), "rb").read() == json_bytes


def dataclasses_replace(args, **kw):
  import dataclasses  # pylint: disable=g-import-not-at-top
  return dataclasses.replace(args, **kw)


def test_check_resume_ignores_runtime_switches_and_fields_an_old_workdir_lacks(tmp_path):
  record = dict(args=dict(num_layers=2, dtype="float32", remat="none"), head="token_cls",
                label_names=["O", "B-X"], peft={"rules": [[".*", "train"]]})
  os.makedirs(tmp_path / "w")
  old = dict(record, args=dict(num_layers=2, dtype="bfloat16", remat="full"))
  del old["peft"]                                   # written before runs recorded PEFT specs
  json.dump(old, open(tmp_path / "w" / "model.json", "w"))
  experiment.check_resume(str(tmp_path / "w"), record)            # no error
  with pytest.raises(experiment.ResumeMismatchError, match="head: \"token_cls\" -> \"seq_cls\""):
    experiment.check_resume(str(tmp_path / "w"), dict(record, head="seq_cls"))


def test_record_diffs_compare_only_shared_keys():
  """What check_resume and fewshot.run_once report: nested keys dotted, one-sided keys skipped."""
  old = {"a": 1, "b": {"c": [1, 2], "d": "x"}, "gone": 0}
  new = {"a": 1, "b": {"c": [1, 3], "d": "x", "added": 5}}
  assert experiment.record_diffs(old, new) == ["b.c: [1, 2] -> [1, 3]"]
  assert experiment.record_diffs(old, old) == []
