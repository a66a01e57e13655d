"""Train-step speed, ours vs Hugging Face PyTorch (research/benchmark.py), one row per setting.

  ./run.sh reproduce --table=tables/step_benchmark

Each cell is one `research/benchmark.py` invocation (BertForTokenClassification + AdamW + clipping
on both sides, batch 32 x 128, steps interleaved in one process, 2 threads each, median step).
The benchmark has no seed: a row's "seeds" are repeats, and their spread is the machine's noise.
Run it on an otherwise idle machine: the numbers measure the CPU as much as the code.
"""

from lib import tables

BEFORE = ("README Results at commit d417692 (before the table runner), `./run.sh benchmark` on "
          "the project's 2-core AMD EPYC")
KEYS = ("ours_ex_s", "hf_ex_s", "ratio", "compile_s", "model_gflop", "ours_gflop_s",
        "peak_gflop_s", "peak_frac")
COLUMNS = (tables.Column("rows.0.ratio", "ratio (ours / HF)", digits=2),
           tables.Column("rows.0.ours_ex_s", "ours ex/s", digits=2),
           tables.Column("rows.0.hf_ex_s", "HF ex/s", digits=2),
           tables.Column("rows.0.compile_s", "compile s", digits=1),
           tables.Column("rows.0.model_gflop", "model GFLOP/step", digits=0),
           tables.Column("rows.0.ours_gflop_s", "our GFLOP/s", digits=0),
           tables.Column("rows.0.peak_gflop_s", "matmul peak GFLOP/s", digits=0),
           tables.Column("rows.0.peak_frac", "fraction of peak", digits=2))


BESIDE = ("seed 0 ran beside two table runs on the 2 cores (2026-11-30, AMD EPYC; see the matmul "
          "peak column): only the ratio, ours and PyTorch's steps interleaved, compares")


def _row(id_, label, model, dtype, before=None, hf_dtype="float32", steps=6, warmup=2,
         seq_len=128, **kw):
  """One benchmark setting; `before` = the README's (ours ex/s, HF ex/s, ratio, compile s,
  GFLOP/step, our GFLOP/s, peak GFLOP/s, fraction) of its one run, if any."""
  args = (f"--models={model}", f"--seq_len={seq_len}", "--batch=32", f"--dtype={dtype}",
          f"--hf_dtype={hf_dtype}", f"--steps={steps}", f"--warmup={warmup}", "--threads=2")
  recorded = before and tables.Recorded({f"rows.0.{k}": {0: v} for k, v in zip(KEYS, before)},
                                        BEFORE)
  return tables.Row(id_, label, "", args, script="research/benchmark.py", seed_flag="",
                    recorded=recorded, **kw)


TABLE = tables.Table(
    name="step_benchmark",
    title="Train-step speed, ours (JAX) vs Hugging Face PyTorch, batch 32 x 128 (unless the "
          "row says otherwise), 2 threads",
    columns=COLUMNS,
    rows=(
        _row("minilm_f32", "MiniLM (L6/H384), float32 vs float32", "minilm", "float32",
             (25.6, 15.5, 1.65, 5.2, 276, 221, 428, 0.52), seeds=(0, 1, 2), claim=True),
        _row("bert-base_f32", "BERT-base, float32 vs float32", "bert-base", "float32",
             (3.69, 2.48, 1.49, 8.4, 2149, 248, 441, 0.56), seeds=(0, 1, 2), claim=True),
        _row("minilm_bf16", "MiniLM, bfloat16 vs float32", "minilm", "bfloat16",
             (41.8, 15.8, 2.65, 6.9, 276, 361, 891, 0.41)),
        _row("bert-base_bf16", "BERT-base, bfloat16 vs float32", "bert-base", "bfloat16",
             (7.71, 2.54, 3.03, 9.5, 2149, 518, 892, 0.58)),
        _row("bert-base_f32_w4", "BERT-base, float32 vs float32, warmup 4, 8 steps", "bert-base",
             "float32", (4.17, 2.46, 1.69, 8.8, 2149, 280, 429, 0.65), steps=8, warmup=4,
             note="the first steps still grow the heap: steady state is what a 1,000-step "
                  "fine-tune sees"),
        _row("minilm_bf16_autocast", "MiniLM, bfloat16 vs bfloat16 (autocast)", "minilm",
             "bfloat16", (33.5, 26.0, 1.29, 7.2, 276, 289, 647, 0.45), hf_dtype="bfloat16",
             steps=5),
        _row("bert-base_bf16_autocast", "BERT-base, bfloat16 vs bfloat16 (autocast)",
             "bert-base", "bfloat16", (7.32, 6.50, 1.13, 9.9, 2149, 491, 806, 0.61),
             hf_dtype="bfloat16", steps=5),
        # The CoNLL-2003 fine-tune's dominant batch shapes: its length buckets of 16 and 32
        # word-pieces hold ~80% of its batches (configs/ner.py, the first 200 batches).
        _row("minilm_f32_t16", "MiniLM, float32 vs float32, 32 x 16 (NER's commonest bucket)",
             "minilm", "float32", seq_len=16, seeds=(0, 1, 2), note=BESIDE),
        _row("minilm_f32_t32", "MiniLM, float32 vs float32, 32 x 32", "minilm", "float32",
             seq_len=32, seeds=(0, 1, 2), note=BESIDE),
    ),
    setting="FLOP/s from 6N + 12LDT per token against a jitted 2048^2 matmul measured in the same "
            "row (bf16 x bf16 -> f32 for the bfloat16 rows).",
)
