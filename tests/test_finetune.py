"""research/finetune.py end to end: quick NER and SST-2 runs, their outputs, resume after SIGKILL,
a CoNLL dataset with other entity types, and research/convert.py round trips.

The script runs in subprocesses on one CPU device (as a user runs it); the entity-set test runs
in-process on the 8 simulated devices of conftest.py.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import seqeval.metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
# Smaller than configs/ner.py:quick so that the suite stays fast: 320 sentences x 2 epochs = 20
# steps at a higher learning rate; max_len 64 so that some test sentences need several windows.
NER_ARGS = ["--config=configs/ner.py:quick", "--config.data.max_train_examples=320",
            "--config.optim.lr=3e-4", "--config.data.max_len=64", "--config.data.stride=16"]
OUTPUTS = ("metrics.json", "report.txt", "curves.png", "model.json", "metrics.jsonl")


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "device_count" not in f)
  return env


def _finetune(workdir, args, data_cache, **popen):
  cmd = [sys.executable, os.path.join(REPO, "research", "finetune.py"), args[0],
         f"--workdir={workdir}", f"--config.data.cache_dir={data_cache}"] + list(args[1:])
  return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **popen)


def _run(workdir, args, data_cache):
  proc = _finetune(workdir, args, data_cache)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-4000:]
  with open(os.path.join(workdir, "metrics.json")) as f:
    return json.load(f)


def _raw_conll(path):
  """(words, tags) per sentence read straight from the file (independent of lib.data)."""
  sents, words, tags = [], [], []
  with open(path, encoding="utf-8") as f:
    for line in f:
      parts = line.split()
      if not parts or parts[0] == "-DOCSTART-":
        if words:
          sents.append((words, tags))
        words, tags = [], []
        continue
      words.append(parts[0])
      tags.append(parts[-1])
  if words:
    sents.append((words, tags))
  return sents


def _read_predictions(path):
  sents, cur = [], []
  with open(path, encoding="utf-8") as f:
    for line in f:
      if not line.strip():
        if cur:
          sents.append(cur)
        cur = []
        continue
      cur.append(line.split())
  if cur:
    sents.append(cur)
  return sents


def _chance_f1(gold, train_tags, seed=0):
  """Entity F1 of tags drawn independently from the training tag distribution (seqeval)."""
  names, counts = np.unique(np.concatenate([np.array(t) for t in train_tags]), return_counts=True)
  rng = np.random.default_rng(seed)
  pred = [list(rng.choice(names, size=len(g), p=counts / counts.sum())) for g in gold]
  return seqeval.metrics.f1_score(gold, pred)


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data_cache"))


@pytest.fixture(scope="module")
def ner_run(tmp_path_factory, data_cache):
  workdir = str(tmp_path_factory.mktemp("ner") / "run")
  return workdir, _run(workdir, NER_ARGS, data_cache)


@pytest.mark.slow
def test_ner_quick_writes_every_output_and_beats_chance(ner_run):
  workdir, m = ner_run
  for name in OUTPUTS + ("test_predictions.conll",):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(workdir))
  assert os.listdir(os.path.join(workdir, "checkpoints"))
  for block in ("dev", "test"):
    for k in ("f1", "precision", "recall"):
      assert np.isfinite(m[block][k]) and 0 <= m[block][k] <= 1, (block, k)
  for k in ("steps", "wall_s", "examples_per_s", "tokens_per_s"):
    assert np.isfinite(m["train"][k]) and m["train"][k] > 0, k
  assert m["train"]["steps"] == 20
  assert m["train"]["mean_step_s"] == pytest.approx(m["train"]["train_s"] / 20)
  test = _raw_conll(os.path.join(DATA, "conll2003", "test.txt"))
  train_tags = [t for _, t in _raw_conll(os.path.join(DATA, "conll2003", "train.txt"))[:320]]
  chance = _chance_f1([t for _, t in test], train_tags)
  assert m["test"]["f1"] > chance + 0.05, (m["test"]["f1"], chance)
  report = open(os.path.join(workdir, "report.txt")).read()
  assert "processed 46435 tokens with 5648 phrases" in report   # conlleval header, test split
  assert "micro avg" in report and "           O " in report    # entity and token-level reports


@pytest.mark.slow
def test_every_test_word_predicted_exactly_once_and_metrics_match_seqeval(ner_run):
  workdir, m = ner_run
  test = _raw_conll(os.path.join(DATA, "conll2003", "test.txt"))
  pred = _read_predictions(os.path.join(workdir, "test_predictions.conll"))
  assert len(pred) == len(test) == 3453
  for i, ((words, tags), rows) in enumerate(zip(test, pred)):
    assert [r[0] for r in rows] == words, i
    assert [r[1] for r in rows] == tags, i
  # Long sentences (more word-pieces than a 64-token window) are windowed, not cut.
  from lib import hf  # pylint: disable=g-import-not-at-top
  tok = hf.load_bert_tokenizer("minilm")
  long = [i for i, (w, _) in enumerate(test) if len(tok(w, is_split_into_words=True)["input_ids"]) > 64]
  assert len(long) > 10
  gold = [[r[1] for r in s] for s in pred]
  guess = [[r[2] for r in s] for s in pred]
  assert m["test"]["f1"] == pytest.approx(seqeval.metrics.f1_score(gold, guess), abs=1e-12)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_metrics(ner_run, tmp_path, data_cache):
  _, reference = ner_run
  workdir = str(tmp_path / "run")
  proc = _finetune(workdir, NER_ARGS, data_cache, start_new_session=True)
  ckpt = os.path.join(workdir, "checkpoints", "10")   # the first evaluation (epoch 1) saves step 10
  deadline = time.time() + 400
  while not os.path.exists(ckpt) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  assert proc.poll() is None, "the run finished before it could be killed"
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(workdir, "metrics.json"))
  resumed = _run(workdir, NER_ARGS, data_cache)
  log = open(os.path.join(workdir, "metrics.jsonl")).read()
  assert '"step": 20' in log
  for block in ("dev", "test"):
    for k in ("f1", "precision", "recall"):
      assert resumed[block][k] == reference[block][k], (block, k)


@pytest.mark.slow
def test_sst2_quick(tmp_path, data_cache):
  workdir = str(tmp_path / "run")
  m = _run(workdir, ["--config=configs/sst2.py:quick", "--config.data.max_train_examples=640",
                     "--config.optim.lr=1e-4"], data_cache)
  for name in OUTPUTS + ("test_predictions.tsv",):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  rows = open(os.path.join(workdir, "test_predictions.tsv")).read().splitlines()
  assert len(rows) == 1 + 1821
  gold = [r.split("\t")[1] for r in rows[1:]]
  pred = [r.split("\t")[2] for r in rows[1:]]
  majority = max(gold.count(g) for g in set(gold)) / len(gold)
  assert m["test"]["accuracy"] == pytest.approx(np.mean([g == p for g, p in zip(gold, pred)]))
  # 20 steps: clearly above the majority class (4 standard errors of chance on 1,821 examples).
  assert m["test"]["accuracy"] > majority + 0.05, (m["test"]["accuracy"], majority)
  assert 0.5 < m["dev"]["accuracy"] <= 1


def _write_conll(path, sentences):
  with open(path, "w") as f:
    f.write("-DOCSTART- -X- -X- O\n\n")
    for words, tags in sentences:
      for w, t in zip(words, tags):
        f.write(f"{w} NN O {t}\n")
      f.write("\n")


def _animal_sentences(n, seed):
  """Sentences with ANIMAL and FOOD entities (types CoNLL-2003 does not have)."""
  rng = np.random.default_rng(seed)
  animals, foods = ["cat", "dog", "snow leopard"], ["apple pie", "bread", "rice"]
  out = []
  for _ in range(n):
    a, f = animals[rng.integers(3)].split(), foods[rng.integers(3)].split()
    words = ["the"] + a + ["ate"] + f + ["today"]
    tags = (["O"] + ["B-ANIMAL"] + ["I-ANIMAL"] * (len(a) - 1) + ["O"] + ["B-FOOD"]
            + ["I-FOOD"] * (len(f) - 1) + ["O"])
    out.append((words, tags))
  return out


def _animal_run(tmp_path, variant: str, sizes, epochs: int, lr: float = 0.0) -> dict:
  """configs/ner.py:<variant> on a tiny random-init encoder and an ANIMAL/FOOD CoNLL dataset of
  `sizes` (train, valid, test) sentences written under tmp_path (lr 0: the variant's); the run's
  metrics."""
  from configs import ner as ner_config  # pylint: disable=g-import-not-at-top
  from lib import finetune, models  # pylint: disable=g-import-not-at-top
  src = tmp_path / "data" / "conll2003"
  src.mkdir(parents=True)
  for name, n, seed in zip(("train.txt", "valid.txt", "test.txt"), sizes, (0, 1, 2)):
    _write_conll(src / name, _animal_sentences(n, seed))
  cfg = ner_config.get_config(variant)
  cfg.data.dir, cfg.data.cache_dir = str(tmp_path / "data"), str(tmp_path / "cache")
  cfg.data.max_train_examples, cfg.data.batch_size, cfg.data.eval_batch_size = 0, 16, 16
  cfg.data.max_len, cfg.train.epochs = 16, epochs
  cfg.optim.lr = lr or cfg.optim.lr
  args = models.ModelArgs(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64, max_len=32,
                          dropout_rate=0.0, attention_dropout_rate=0.0)
  return finetune.run(cfg, str(tmp_path / "run"), model_args=args)


@pytest.mark.slow
def test_other_entity_types_need_no_code_change(tmp_path):
  out = _animal_run(tmp_path, "quick", (64, 16, 16), epochs=8, lr=3e-3)
  meta = json.load(open(tmp_path / "run" / "model.json"))
  assert meta["label_names"] == ["O", "B-ANIMAL", "I-ANIMAL", "B-FOOD", "I-FOOD"]
  assert set(out["test"]["per_type_f1"]) == {"ANIMAL", "FOOD"}
  assert out["test"]["f1"] > 0.9   # a trivially learnable pattern
  pred = _read_predictions(str(tmp_path / "run" / "test_predictions.conll"))
  assert sum(len(s) for s in pred) == sum(len(w) for w, _ in _animal_sentences(16, 2))
  assert not (tmp_path / "run" / "adapter").exists()   # full fine-tuning: checkpoints suffice


def test_lora_run_writes_an_adapter_of_the_trainable_leaves_only(tmp_path):
  _animal_run(tmp_path, "quick+lora", (32, 8, 8), epochs=2)
  meta = json.load(open(tmp_path / "run" / "adapter" / "adapter.json"))
  saved = set(meta["params"])
  assert saved == ({f"encoder/layer_0/attention/{m}/lora_{f}" for m in ("query", "key", "value",
                                                                          "out") for f in "ab"}
                   | {"classifier/kernel", "classifier/bias"}), saved
  assert meta["peft"]["lora"]
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  weights = load_file(str(tmp_path / "run" / "adapter" / "adapter.safetensors"))
  assert all(np.isfinite(v).all() for v in weights.values())
  assert np.abs(weights["encoder/layer_0/attention/query/lora_b"]).max() > 0   # trained from 0


@pytest.mark.slow
def test_convert_round_trips_minilm_through_ours_and_back(tmp_path):
  """HF MiniLM -> ours -> HF: transformers loads the result with no missing/unexpected keys
  and every tensor equals the original's."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from lib import hf  # pylint: disable=g-import-not-at-top
  ours, back = str(tmp_path / "ours"), str(tmp_path / "hf")
  script = os.path.join(REPO, "research", "convert.py")
  for to, src, dst in (("ours", "minilm", ours), ("hf", ours, back)):
    res = subprocess.run([sys.executable, script, f"--to={to}", f"--src={src}", f"--dst={dst}"],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "max |difference| over all tensors = 0" in res.stdout, res.stdout
  orig = transformers.BertModel.from_pretrained(hf.minilm_dir())
  model, info = transformers.BertModel.from_pretrained(back, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  a, b = orig.state_dict(), model.state_dict()
  assert set(a) == set(b)
  for k in a:
    assert torch.equal(a[k], b[k]), k
  tok = transformers.AutoTokenizer.from_pretrained(back)
  assert tok("Hello world")["input_ids"] == hf.load_bert_tokenizer("minilm")("Hello world")["input_ids"]


@pytest.mark.slow
def test_finetuned_workdir_exports_to_hf_with_equal_logits(ner_run, tmp_path):
  """A fine-tuning workdir -> HF directory -> BertForTokenClassification gives our logits."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from lib import hf, model_io, models  # pylint: disable=g-import-not-at-top
  from lib.tasks import common  # pylint: disable=g-import-not-at-top
  workdir, _ = ner_run
  out = str(tmp_path / "hf")
  model = model_io.ours_to_hf(workdir, out, DATA)
  pt, info = transformers.BertForTokenClassification.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert pt.config.id2label[1] == json.load(open(os.path.join(workdir, "model.json")))["label_names"][1]
  tok = hf.load_bert_tokenizer(out)
  enc = tok(["EU rejects German call to boycott British lamb .", "Peter Blackburn"],
            padding=True, return_tensors="np")
  batch = dict(input_ids=enc["input_ids"].astype(np.int32),
               input_mask=enc["attention_mask"].astype(np.int32),
               token_type_ids=enc["token_type_ids"].astype(np.int32))
  module = models.build(model.args, "token_cls", model.num_labels)
  ours = np.asarray(common.apply_model(module, model.params, batch)[0]["logits"])
  with torch.no_grad():
    theirs = pt.eval()(**{k: torch.tensor(v) for k, v in enc.items()}).logits.numpy()
  mask = enc["attention_mask"].astype(bool)
  # float32 on both sides, different summation orders: 1e-4 on logits of magnitude ~10.
  np.testing.assert_allclose(ours[mask], theirs[mask], atol=1e-4)


_ANIMAL_RUN = """
import pathlib, shutil, sys
sys.path.insert(0, "tests")
import test_finetune
tmp = pathlib.Path(sys.argv[1])
shutil.rmtree(tmp / "data", ignore_errors=True)   # the helper writes its dataset afresh
test_finetune._animal_run(tmp, "quick", (64, 16, 16), epochs=8, lr=3e-3)
"""


def _animal_run_in_subprocess(tmp_path) -> list:
  """The run of `_animal_run` in a fresh process (as a rerun is): its output lines."""
  res = subprocess.run([sys.executable, "-c", _ANIMAL_RUN, str(tmp_path)], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stdout + res.stderr[-4000:]
  return (res.stdout + res.stderr).splitlines()


@pytest.mark.slow
def test_rerun_with_a_damaged_best_checkpoint_uses_the_next_best(tmp_path):
  _animal_run_in_subprocess(tmp_path)
  run = tmp_path / "run"
  best = json.load(open(run / "metrics.json"))["train"]["best_step"]
  kept = sorted(int(p) for p in os.listdir(run / "checkpoints") if p.isdigit())
  assert best in kept and best != kept[-1], (best, kept)  # a checkpoint, not the final state
  rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
  dev = {r["step"]: r["f1"] for r in rows if r["kind"] == "eval"}
  expected = min((s for s in kept if s != best), key=lambda s: (-dev[s], s))  # ties: earlier
  data = [os.path.join(d, f) for d, _, files in os.walk(run / "checkpoints" / str(best) / "state")
          for f in files if os.path.basename(d) == "d"]
  largest = max(data, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 3)
  lines = _animal_run_in_subprocess(tmp_path)   # raised CorruptCheckpointError on every rerun
  m = json.load(open(run / "metrics.json"))
  assert m["train"]["best_step"] == expected
  note = m["train"]["best_checkpoint_note"]
  assert note.startswith(f"best step {best} by f1 could not be restored ("), note
  assert f"using step {expected} " in note, note
  assert any(p.startswith(f"{best}.corrupt-") for p in os.listdir(run / "checkpoints"))
  assert m["dev"]["f1"] == pytest.approx(dev[expected], abs=1e-12)  # as evaluated when trained
  assert len([l for l in lines if f"checkpoint step {best} in" in l]) == 1, lines
  assert not [l for l in lines if "Exception ignored" in l or "Warning:" in l], "\n".join(lines)
  assert len(lines) < 40, "\n".join(lines)  # no orbax tracebacks
