"""LoRA's train-step cost relative to full fine-tuning (research/benchmark.py --peft), MiniLM, batch
32: attention-only LoRA and LoRA on every linear layer, float32 and bfloat16.

  ./run.sh reproduce --table=tables/peft_step

Each cell is one `research/benchmark.py --peft=full,lora_attention,lora_all` invocation: the three
steps timed interleaved in one process (a ratio, robust to a shared machine's load), with XLA's
FLOPs and bytes of each compiled step. The benchmark has no seed: "seeds" are repeats.
"""

from lib import tables

AFTER = ("issue 19 (commit f98ed37, LoRA's hand-written backward), `research/benchmark.py "
         "--models=minilm --peft=full,lora_attention,lora_all ...`, AMD EPYC, 2 cores at load "
         "5-10, 2026-11-30")
# (attention-only LoRA / full, all-linear LoRA / full) after the fix; before it (commit 37fa3b9,
# the same command from a `git archive` copy, the same session) in each row's note.
ROWS = (
    ("f32_128", "float32, length 128", "float32", 128, 5, (0.698, 0.753), (0.763, 0.963)),
    ("f32_32", "float32, length 32 (NER-like)", "float32", 32, 10, (0.560, 0.641), (0.646, 1.151)),
    ("bf16_32", "bfloat16, length 32", "bfloat16", 32, 8, (0.683, 0.818), (0.735, 0.846)),
)


def _row(rid, label, dtype, seq_len, steps, after, before) -> tables.Row:
  # The float32 rows' cells ran in the runner (repeat 0); the measurement made with the fix is
  # repeat 1 of the same command. The bf16 row has only that measurement.
  rep = 0 if dtype == "bfloat16" else 1
  recorded = tables.Recorded({"peft_rows.1.vs_full": {rep: after[0]},
                              "peft_rows.2.vs_full": {rep: after[1]}}, AFTER)
  return tables.Row(
      rid, f"MiniLM, {label}", "", ("--models=minilm", f"--seq_len={seq_len}", "--batch=32",
                                    f"--dtype={dtype}", "--peft=full,lora_attention,lora_all",
                                    f"--steps={steps}", "--warmup=1"),
      script="research/benchmark.py", seed_flag="", recorded=recorded, seeds=tuple(range(rep + 1)),
      note=f"before the fix (commit 37fa3b9): attention-only {before[0]:.2f}x, all-linear "
           f"{before[1]:.2f}x")


TABLE = tables.Table(
    name="peft_step",
    title="LoRA's train step relative to full fine-tuning (MiniLM, batch 32, interleaved)",
    columns=(tables.Column("peft_rows.1.vs_full", "attention-only LoRA r=8 / full", digits=2),
             tables.Column("peft_rows.2.vs_full", "all-linear LoRA r=8 / full", digits=2),
             tables.Column("peft_rows.2.flop_vs_full", "all-linear XLA FLOPs / full", digits=2),
             tables.Column("peft_rows.2.bytes_vs_full", "all-linear XLA bytes / full", digits=2)),
    rows=tuple(_row(*r) for r in ROWS),
    setting="The issue's target: all-linear LoRA <= 0.8x the full fine-tuning step. Repeat 0 of "
            "the float32 rows ran in the table runner beside training jobs (load ~11).",
)
