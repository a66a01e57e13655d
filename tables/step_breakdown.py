"""Where our train step's time goes (research/benchmark.py --breakdown), MiniLM, the main job's
step shapes, per CPU core.

  ./run.sh reproduce --table=tables/step_breakdown

Each cell is one `research/benchmark.py --breakdown` invocation: the whole step, the training loss
alone, its gradients and the optimizer update alone, each jitted on its own and timed interleaved
(medians), plus the gradients at twice the batch (the per-step fixed cost, and the marginal cost
of more tokens). The benchmark has no seed: "seeds" are repeats. Run it on an otherwise idle
machine. Why it exists: issue 19's main-job target (0.3x the PyTorch reference's wall) asks what
is left of a packed bf16 step once padding is gone.
"""

from lib import tables

COLUMNS = (tables.Column("breakdown_rows.0.step_ms", "step ms", digits=1),
           tables.Column("breakdown_rows.0.forward_ms", "forward ms", digits=1),
           tables.Column("breakdown_rows.0.backward_ms", "backward ms", digits=1),
           tables.Column("breakdown_rows.0.rest_ms", "step - (fwd + bwd) ms", digits=1),
           tables.Column("breakdown_rows.0.update_ms", "update alone ms", digits=1),
           tables.Column("breakdown_rows.0.fixed_ms", "fixed ms (fwd + bwd)", digits=1),
           tables.Column("breakdown_rows.0.ms_per_1k_tokens", "ms per 1k more tokens",
                         digits=0),
           tables.Column("breakdown_rows.0.marginal_gflop_s", "marginal GFLOP/s", digits=0),
           tables.Column("breakdown_rows.0.peak_gflop_s", "matmul peak GFLOP/s", digits=0),
           tables.Column("breakdown_rows.0.marginal_peak_frac", "marginal fraction of peak",
                         digits=2))


def _row(id_, label, dtype, batch, seq_len, cpu="Zen 4", **kw):
  args = ("--models=minilm", f"--batch={batch}", f"--seq_len={seq_len}", f"--dtype={dtype}",
          "--breakdown", "--steps=10", "--warmup=2", "--threads=2")
  return tables.Row(id_, label, "", args, script="research/benchmark.py", seed_flag="", cpu=cpu,
                    **kw)


TABLE = tables.Table(
    name="step_breakdown",
    title="Where our MiniLM train step's time goes (2 threads, per CPU core)",
    columns=COLUMNS,
    rows=(
        _row("ner_packed_bf16", "Zen 4: NER packed step, 5 x 128, bfloat16 "
             "(`configs/ner.py:packed+bf16`, the main job)", "bfloat16", 5, 128),
        _row("ner_packed_f32", "Zen 4: NER packed step, 5 x 128, float32 (`:packed`)",
             "float32", 5, 128),
        _row("sst2_packed_bf16", "Zen 4: SST-2 packed step, 7 x 66, bfloat16 "
             "(`configs/sst2.py:packed+bf16`)", "bfloat16", 7, 66),
        _row("b32_bf16", "Zen 4: 32 x 128, bfloat16 (the step benchmark's shape)", "bfloat16",
             32, 128),
    ),
    setting="MiniLM-L6-H384 with a 9-label token-classification head (SST-2's shape timed on the "
            "same head: the pooler is a few hundred FLOPs), lib.optim AdamW chain, dropout on, "
            "synthetic batches without padding. 'step - (fwd + bwd)': what the whole step adds "
            "to a forward + backward (the optimizer update and metrics, fused by XLA into the "
            "step), against 'update alone' (the same update as its own program). 'fixed': 2 x "
            "grads(B) - grads(2B), the part of a forward + backward that does not grow with the "
            "batch (the 11.7M-entry word-embedding gradient, small ops, dispatch). 'marginal "
            "GFLOP/s': model FLOPs (6N + 12LDT per token) of B more examples over their extra "
            "time, against a jitted 2048^2 matmul in the row's dtype measured in the same cell.",
)
