"""Causal tracing and attribution checks (issue 15): ROME-style tracing of invented facts in a GPT
trained here, activation patching of NER in MiniLM, and integrated gradients; for each, the exact
patching grid with prefix reuse against a per-cell loop (speedup, max |difference|), attribution
patching against the exact grid (Spearman), and IG's completeness error.

  ./run.sh reproduce --table=tables/probe_tracing --rows=patch_ner,ig   # ~5 min on 2 idle cores
  ./run.sh reproduce --table=tables/probe_tracing --rows=facts          # ~20 min

Settings: configs/probe.py (facts: 150 subjects x 6 relations, a 4-layer width-128 GPT trained
1,000 steps, 500 recalled held-out facts traced, the per-cell loop timed on 6 of them; patch_ner:
the `quick` variant, 8 CoNLL-2003 validation sentences with an entity, the loop timed on 2; ig: 12
SST-2 validation sentences, 64 Gauss-Legendre nodes, zero-embedding baseline).
"""

from lib import tables

WHERE = ("README 'Causal probe' at commit 37fa3b9 and configs/probe.py's docstring: seed 0, AMD "
         "EPYC, 2 cores shared at load ~10, 2026-11-30")
SPEED, DIFF, RHO = "grid.speedup", "grid.max_abs_diff", "grid.spearman"
RECALL, IG_MAX, IG_MEAN = ("facts.recall", "ig.completeness_error_max_percent",
                           "ig.completeness_error_mean_percent")


def _row(rid: str, label: str, variant: str, mode: str, recorded: dict) -> tables.Row:
  return tables.Row(rid, label, f"configs/probe.py{variant}", script="research/causal_probe.py",
                    args=(f"--config.mode={mode}", "--overwrite"), workdir_flag="--out",
                    recorded=tables.Recorded({k: {0: v} for k, v in recorded.items()}, WHERE))


TABLE = tables.Table(
    name="probe_tracing",
    title="Causal tracing and attribution: exact patching grids (prefix reuse vs a per-cell "
          "loop), attribution patching vs exact, integrated gradients' completeness",
    columns=(tables.Column(SPEED, "grid speedup over the per-cell loop", digits=1),
             tables.Column(DIFF, "max abs. difference grid vs loop (1e-6)", digits=1,
                           scale=1e6),
             tables.Column(RHO, "Spearman, attribution vs exact", digits=2),
             tables.Column(RECALL, "held-out fact recall", digits=4),
             tables.Column(IG_MAX, "IG completeness error, max %", digits=2),
             tables.Column(IG_MEAN, "IG completeness error, mean %", digits=3),
             tables.Column("wall_s", "wall s", digits=0)),
    rows=(_row("facts", "facts: GPT 4 x 128, 500 traced facts (ROME)", "", "facts",
               {SPEED: 13.6, DIFF: 1.9e-6, RHO: 0.72, RECALL: 0.9889, "wall_s": 1238}),
          _row("patch_ner", "NER patching on MiniLM (`quick`)", ":quick", "patch",
               {SPEED: 9.6, RHO: 0.90}),
          _row("ig", "integrated gradients of an SST-2 probe on MiniLM", "", "ig",
               {IG_MAX: 0.19, IG_MEAN: 0.04})),
    setting="facts: synthetic subject-relation-object facts and a GPT trained here (not GPT-2 XL "
            "as in ROME); MiniLM-L6 for NER patching and IG. Speedups are measured in one "
            "process; the facts loop is timed on 6 facts and extrapolated.",
)
