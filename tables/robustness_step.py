"""The training-time cost of adversarial training (research/benchmark.py --adversarial): our full
fine-tuning step under FGM, PGD-3 and FreeLB-3 relative to the plain step, MiniLM 32 x 64.

  ./run.sh reproduce --table=tables/robustness_step

Each cell is one `research/benchmark.py --adversarial=fgm,pgd,freelb` invocation: the four steps
timed interleaved in one process (a ratio, robust to a shared machine's load), with XLA's FLOPs
of each compiled step. The benchmark has no seed: "seeds" are repeats.
"""

from lib import tables

BEFORE = ("README Robustness at commit 985c0db (before this table): `research/benchmark.py "
          "--models=minilm --dtype=float32 --seq_len=64 --adversarial=fgm,pgd,freelb --steps=5`, "
          "AMD EPYC, quiet machine, 2026-11-30")
# (step ratio, XLA FLOPs ratio) to the plain step, measured before the table existed; shown as
# repeat 2 until that cell runs (repeats 0 and 1 ran in the runner).
MEASURED = {"fgm": (2.00, 2.00), "pgd": (3.20, 3.35), "freelb": (2.86, 3.00)}
METHODS = (("fgm", "FGM"), ("pgd", "PGD-3"), ("freelb", "FreeLB-3"))

TABLE = tables.Table(
    name="robustness_step",
    title="Adversarial training's step relative to the plain step (MiniLM float32, 32 x 64, "
          "interleaved)",
    columns=tuple(tables.Column(f"adversarial_rows.{i + 1}.vs_plain", f"{label} / plain",
                                digits=2) for i, (_, label) in enumerate(METHODS))
    + tuple(tables.Column(f"adversarial_rows.{i + 1}.flop_vs_plain", f"{label} XLA FLOPs / plain",
                          digits=2) for i, (_, label) in enumerate(METHODS)),
    rows=(tables.Row(
        "minilm_f32_64", "MiniLM, float32, batch 32, length 64", "",
        ("--models=minilm", "--dtype=float32", "--seq_len=64", "--batch=32",
         "--adversarial=fgm,pgd,freelb", "--steps=5"),
        script="research/benchmark.py", seed_flag="", seeds=(0, 1, 2),
        recorded=tables.Recorded(
            {f"adversarial_rows.{i + 1}.{k}": {2: MEASURED[m][j]}
             for i, (m, _) in enumerate(METHODS)
             for j, k in enumerate(("vs_plain", "flop_vs_plain"))}, BEFORE)),),
    setting="FGM adds one forward/backward pass, PGD-3 and FreeLB-3 three each; the step is "
            "compute-bound on this CPU, so the time ratio follows the FLOPs ratio.",
)
