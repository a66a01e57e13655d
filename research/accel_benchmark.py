"""One accelerator session's measurements (issue 19), in one run of under ~10 minutes.

  python research/accel_benchmark.py --out=$OUT/accel.json              # on the GPU/TPU machine
  .venv/bin/python research/accel_benchmark.py --quick --out=/tmp/a.json  # tiny smoke run on CPU

Sections (--sections, in this order; a failing section is reported and the others still run):
  bert_step  BERT-base token classification, our bf16 train step vs Hugging Face PyTorch bf16
             autocast, eager (SDPA attention) and torch.compile, at 32x128 and 16x512: step
             time, ratio, MFU.
  clm        GPT-2 124M causal-LM pretraining step at 8x1024 (our CLM loss): tokens/s and MFU,
             beside HF GPT2LMHeadModel eager and compiled.
  mlm        BERT-base MLM step at 16x512 (the loss on the 15% prediction slots, as
             pretraining runs it): MFU, beside HF BertForMaskedLM.
  finetune   the main job, `research/finetune.py --config=configs/ner.py:bf16` end to end on the
             device (host input pipeline and evaluations included): wall, examples/s, test F1
             and `input_frac` (the share of the training wall the loop spent reading and placing
             batches; near 1 = host-bound).
MFU = model FLOPs (lib/flops: 6N + 12LDT per token, the tied decoder on the positions it runs
on) / step time / the device's dense bf16 peak from its datasheet (lib/bench.DATASHEET_BF16; a
measured matmul peak on unknown devices). Steps of all sides alternate (lib/bench).

The device machine has jax, torch and transformers but no network: carry a wheelhouse of the
other requirements (flax, optax, orbax, ml_collections, grain, tfds, seqeval, ...) and, for
`finetune`, the CoNLL-2003 files (--data_dir). The JSON holds every row with the date, the
device and the versions; the tables are printed as each section ends.
"""

import datetime
import json
import os
import subprocess
import sys
import time
import traceback

from absl import flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
from lib import cli, errors  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
SECTIONS = ("bert_step", "clm", "mlm", "finetune")
flags.DEFINE_list("sections", list(SECTIONS), f"any of {list(SECTIONS)}")
flags.DEFINE_string("out", None, "the JSON of all rows (refused if it exists)")
flags.DEFINE_bool("quick", False, "tiny presets and shapes, HF eager only, a 1,000-sentence NER "
                  "run: a smoke test that runs on CPU in a few minutes")
flags.DEFINE_integer("steps", 10, "timed steps per side")
flags.DEFINE_integer("warmup", 3, "untimed steps per side after compilation")
flags.DEFINE_list("hf_sides", ["eager", "compile"], "HF PyTorch variants: eager, compile")
flags.DEFINE_string("data_dir", "", "the shared data folder for `finetune` (default: the "
                    "configs' ../shared/data)")
flags.mark_flags_as_required(["out"])

# section -> [(preset, head, batch, seq_len)]; --quick swaps in tiny presets and shapes.
PLAN = {"bert_step": [("bert-base", "token_cls", 32, 128), ("bert-base", "token_cls", 16, 512)],
        "clm": [("gpt2", "lm", 8, 1024)],
        "mlm": [("bert-base", "mlm", 16, 512)]}
QUICK = {"bert-base": "bert-tiny", "gpt2": "gpt2-tiny"}


def _spec(preset: str, head: str):
  from configs import common  # pylint: disable=g-import-not-at-top
  from lib import bench, hf, models  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  args = models.args_from_config(common.model_config(preset))
  cls = {"token_cls": transformers.BertForTokenClassification,
         "mlm": transformers.BertForMaskedLM, "lm": transformers.GPT2LMHeadModel}[head]
  num_labels = 9 if head == "token_cls" else 0
  factory = lambda: cls(hf.hf_config(args, head, num_labels))
  return bench.ModelSpec(preset, args, None, factory, num_labels=num_labels, head=head)


def _step_section(name: str, device: str) -> list:
  from lib import bench  # pylint: disable=g-import-not-at-top
  rows = []
  for preset, head, batch, seq_len in PLAN[name]:
    if FLAGS.quick:
      preset, batch, seq_len = QUICK[preset], 4, seq_len // 8
    rows += bench.accelerator_rows(_spec(preset, head), batch, seq_len, steps=FLAGS.steps,
                                   warmup=FLAGS.warmup, hf_sides=FLAGS.hf_sides, device=device)
  print(bench.format_table(rows, bench.ACCEL_COLUMNS), flush=True)
  return rows


def _finetune_section(out_dir: str) -> list:
  workdir = os.path.join(out_dir, "finetune_ner")
  cmd = [sys.executable, os.path.join(REPO_ROOT, "research", "finetune.py"),
         f"--config=configs/ner.py:{'quick+' if FLAGS.quick else ''}bf16",
         f"--workdir={workdir}"]
  if FLAGS.data_dir:
    cmd.append(f"--config.data.dir={FLAGS.data_dir}")
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - t0
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-2000:]}")
  m = json.load(open(os.path.join(workdir, "metrics.json")))
  t = m["train"]
  row = dict(section="finetune", command=" ".join(cmd[1:]), process_wall_s=wall,
             run_wall_s=t["wall_s"], train_s=t["train_s"], eval_s=t["eval_s"],
             steps=t["steps"], examples_per_s=t["examples_per_s"],
             median_step_s=t["median_step_s"], input_frac=t.get("input_frac"),
             test_f1=m.get("test", {}).get("f1"), dev_f1=m.get("dev", {}).get("f1"))
  print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                   for k, v in row.items()), flush=True)
  return [row]


def _environment() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              jax_device=jax.devices()[0].device_kind, jax_devices=len(jax.devices()),
              torch_device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              jax=jax.__version__, torch=torch.__version__, transformers=transformers.__version__)


def main(argv):
  del argv
  unknown = sorted(set(FLAGS.sections) - set(SECTIONS))
  if unknown:
    raise errors.UserError(f"--sections: unknown {unknown}; valid: {list(SECTIONS)}")
  if os.path.exists(FLAGS.out):
    raise errors.UserError(f"--out={FLAGS.out} exists; choose another path (results are never "
                           "overwritten)")
  import torch  # pylint: disable=g-import-not-at-top
  device = "cuda" if torch.cuda.is_available() else "cpu"
  result = dict(environment=_environment(), quick=FLAGS.quick, sections={}, failed={})
  print(json.dumps(result["environment"]), flush=True)
  out_dir = os.path.dirname(os.path.abspath(FLAGS.out))
  for name in (s for s in SECTIONS if s in FLAGS.sections):
    t0 = time.perf_counter()
    print(f"== {name}", flush=True)
    try:
      rows = _finetune_section(out_dir) if name == "finetune" else _step_section(name, device)
      result["sections"][name] = dict(rows=rows, seconds=time.perf_counter() - t0)
    except Exception:  # pylint: disable=broad-except  # one short device session: keep the rest
      result["failed"][name] = traceback.format_exc()[-3000:]
      print(f"{name} failed:\n{result['failed'][name]}", file=sys.stderr, flush=True)
  from lib import reporting  # pylint: disable=g-import-not-at-top
  reporting.write_json_atomic(FLAGS.out, result)
  print(f"-> {FLAGS.out}")
  return 1 if result["failed"] else 0


if __name__ == "__main__":
  cli.run(main, compilation_cache=False)   # compile_s is a column: always a real compile
