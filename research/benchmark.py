"""Train-step speed: our jitted token-classification step vs Hugging Face PyTorch, same CPU, same run.

  .venv/bin/python research/benchmark.py --models=minilm,bert-base --batch=32 --seq_len=128,32 \
      --dtype=float32,bfloat16 --steps=5 --warmup=2

One row per model x sequence length x our compute dtype. Our side is the fine-tuning step as
lib.train runs it (make_train_step with the NER loss and the lib.optim AdamW chain: weight decay
0.01, clip_by_global_norm 1.0, dropout on, state donated); HF's is BertForTokenClassification in
train mode with torch.optim.AdamW, clip_grad_norm_ and loss.backward() (float32 unless
--hf_dtype=bfloat16, which uses torch.autocast). Steps alternate between the two sides; the table
has median examples/s, their ratio (ours / HF), our compile time, our achieved FLOP/s (model FLOPs
6 N tokens + 12 L D T tokens; XLA's cost-analysis count beside it) and its fraction of a jitted
2048^2 jnp.dot peak (float32, or bf16 x bf16 -> f32 for bfloat16 rows) measured in the same row;
likewise PyTorch's achieved FLOP/s against its own 2048^2 torch.matmul in its dtype (hf_peak_*).

  .venv/bin/python research/benchmark.py --models=minilm --dtype=float32 \
      --peft=full,lora_attention,lora_all,lora_all_nodropout,head_only

--peft: our step only, under each PEFT setting, interleaved: median step time, XLA's FLOPs and
bytes accessed of the compiled step, each as a ratio to full fine-tuning (why a LoRA step costs
what it does: the FLOPs it saves vs the memory traffic it keeps).
  .venv/bin/python research/benchmark.py --models=minilm --dtype=float32 --seq_len=64 \
      --adversarial=fgm,pgd,freelb

--adversarial: our full fine-tuning step plain and under each adversarial variant of
configs/common.py, interleaved: median step time and XLA's FLOPs, as ratios to the plain step.
  .venv/bin/python research/benchmark.py --models=minilm --batch=5 --dtype=bfloat16,float32 \
      --breakdown

--breakdown: our step only, split into forward, backward and the optimizer update (each jitted
alone, interleaved), with the gradients also timed at twice the batch: the per-step cost that does
not grow with the batch and the marginal cost (and FLOP/s) of more tokens.
The process pins itself to --threads cores (XLA sizes its pool from the affinity; torch gets
set_num_threads) and re-executes itself once under the MALLOC_* equivalents of lib/cli's
allocator settings (--nomalloc_tuning: neither, glibc's defaults).
"""

import os
import sys

from absl import flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
from lib import cli  # pylint: disable=g-import-not-at-top,wrong-import-position  # no jax

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["minilm", "bert-base"],
                  "'minilm' (installed checkpoint) or presets of configs/common.py")
flags.DEFINE_integer("batch", 32, "examples per step")
flags.DEFINE_list("seq_len", ["128"], "sequence lengths, one row each (e.g. 128,32: 32 is the "
                  "length our length-bucketed CoNLL pipeline mostly produces)")
flags.DEFINE_integer("steps", 6, "timed steps per side (medians reported)")
flags.DEFINE_integer("warmup", 2, "untimed steps per side after compilation (the first steps "
                     "still grow the heap)")
flags.DEFINE_integer("block", 1, "steps per side before switching sides")
flags.DEFINE_integer("threads", os.cpu_count(), "CPU threads for both sides (XLA via CPU affinity)")
flags.DEFINE_list("dtype", ["float32", "bfloat16"], "our compute dtypes, one row each (params "
                  "stay float32)")
flags.DEFINE_enum("hf_dtype", "float32", ["float32", "bfloat16"], "HF side: float32 (plain, HF's "
                  "default) or bfloat16 (torch.autocast)")
flags.DEFINE_float("pad_frac", 0.0, "fraction of each row that is padding")
flags.DEFINE_string("prng_impl", "threefry2x32", "jax_default_prng_impl (dropout key bits)")
flags.DEFINE_string("xla_flags", "", "extra XLA_FLAGS")
flags.DEFINE_list("peft", [], "instead of the HF comparison: our step under these PEFT settings "
                  "(lib/bench.PEFT_SETTINGS: full, lora_attention, lora_all, lora_all_nodropout, "
                  "head_only), interleaved, with XLA's FLOPs and bytes accessed per step")
flags.DEFINE_list("adversarial", [], "instead of the HF comparison: our full fine-tuning step "
                  "plain and under these adversarial variants of configs/common.py (fgm, pgd, "
                  "freelb), interleaved: the training-time overhead of each method")
flags.DEFINE_bool("breakdown", False, "instead of the HF comparison: where our step's time goes "
                  "(forward, backward, optimizer update, the per-step fixed cost and the marginal "
                  "cost per 1,000 tokens; lib/bench.breakdown_row)")
flags.DEFINE_string("workdir", "", "also write the rows to <workdir>/metrics.json as {'rows': "
                    "[...]} (a cell of research/reproduce.py)")
flags.DEFINE_enum("omp_wait_policy", "PASSIVE", ["PASSIVE", "ACTIVE", "default"],
                  "torch's OpenMP workers: PASSIVE sleeps at barriers; on a shared, loaded CPU "
                  "spinning workers made HF steps 2-10x slower, so PASSIVE is HF's best case here")


def main(argv):
  del argv
  if FLAGS.malloc_tuning:
    cli.reexec_with_env(cli.MALLOC_ENV)
  cli.pin_cpu_threads(FLAGS.threads, FLAGS.xla_flags, FLAGS.omp_wait_policy)
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_default_prng_impl", FLAGS.prng_impl)
  import transformers  # pylint: disable=g-import-not-at-top
  transformers.logging.set_verbosity_error()
  from lib import bench  # pylint: disable=g-import-not-at-top
  from lib import reporting  # pylint: disable=g-import-not-at-top
  print(f"cpu={reporting.cpu_model()!r} threads={FLAGS.threads} devices={jax.devices()} "
        f"prng={FLAGS.prng_impl} "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} "
        f"malloc={ {k: os.environ.get(k) for k in cli.MALLOC_ENV} } "
        f"XLA_FLAGS={os.environ['XLA_FLAGS']!r}", flush=True)
  rows = []
  if FLAGS.peft:
    return _peft_table(bench)
  if FLAGS.adversarial:
    return _adversarial_table(bench)
  if FLAGS.breakdown:
    return _setting_table(lambda spec, b, t, dt: [bench.breakdown_row(
        spec, b, t, steps=FLAGS.steps, warmup=FLAGS.warmup, dtype=dt)],
                          bench.BREAKDOWN_COLUMNS, "breakdown_rows")
  for name in FLAGS.models:
    spec = bench.token_cls_spec(name)
    for t in FLAGS.seq_len:
      for dtype in FLAGS.dtype:
        row = bench.benchmark_row(spec, FLAGS.batch, int(t), steps=FLAGS.steps,
                                  warmup=FLAGS.warmup, block=FLAGS.block, dtype=dtype,
                                  hf_dtype=FLAGS.hf_dtype, pad_frac=FLAGS.pad_frac)
        print(f"{name} T={t} {row['dtype']}: ours steps {[round(x, 3) for x in row['ours_step_s']]}"
              f" s, hf steps {[round(x, 3) for x in row['hf_step_s']]} s", flush=True)
        rows.append(row)
  _report(rows, bench.COLUMNS, "rows")


def _report(rows: list, columns, key: str):
  """Prints `rows` as a table with the CPU model on each (and writes them to the workdir)."""
  from lib import bench, reporting  # pylint: disable=g-import-not-at-top
  cpu = reporting.cpu_model()
  rows = [dict(r, cpu=cpu) for r in rows]
  print(bench.format_table(rows, tuple(columns) + ("cpu",)))
  if FLAGS.workdir:
    reporting.write_json_atomic(os.path.join(FLAGS.workdir, "metrics.json"), {key: rows})


def _setting_table(rows_fn, columns, key: str):
  """Rows of `rows_fn(spec, batch, seq_len, dtype)` for every model x length x dtype."""
  from lib import bench  # pylint: disable=g-import-not-at-top
  rows = []
  for name in FLAGS.models:
    for t in FLAGS.seq_len:
      for dtype in FLAGS.dtype:
        rows += rows_fn(bench.token_cls_spec(name), FLAGS.batch, int(t), dtype)
  _report(rows, columns, key)


def _peft_table(bench):
  _setting_table(lambda spec, b, t, dt: bench.peft_rows(
      spec, b, t, FLAGS.peft, steps=FLAGS.steps, warmup=FLAGS.warmup, dtype=dt),
                 bench.PEFT_COLUMNS, "peft_rows")


def _adversarial_table(bench):
  from configs import common  # pylint: disable=g-import-not-at-top
  settings = bench.adversarial_settings(FLAGS.adversarial, common.adversarial_variants())
  _setting_table(lambda spec, b, t, dt: bench.adversarial_rows(
      spec, b, t, settings, steps=FLAGS.steps, warmup=FLAGS.warmup, dtype=dt),
                 bench.ADVERSARIAL_COLUMNS, "adversarial_rows")


if __name__ == "__main__":
  cli.run(main, compilation_cache=False)   # compile_s is a column: always a real compile
