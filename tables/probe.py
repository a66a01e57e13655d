"""Layer-wise probes on frozen MiniLM (issue 15): for each task, the hidden state whose linear
probe scores best, its accuracy, the Hewitt-Liang selectivity and the Tenney scalar mix's expected
layer; one cell per task (the features and probes of a task do not depend on the other tasks).

  ./run.sh reproduce --table=tables/probe                   # 9 cells, ~2-4 min each
  ./run.sh reproduce --table=tables/probe --emit=commands

Setting (configs/probe.py's measured run): the first 1,000 training / 300 validation sentences
of CoNLL-2003 (POS, chunk, NER: the word's first sub-word) and Brown POS, 1,000 / 300 SST-2
sentences (mean-pooled), 600 probe steps. Claim: NER sits higher than POS (Tenney et al. for
BERT): Δ of the expected layer, NER - POS, over 3 seeds (the seed sets the probes' init and the
control tasks; the features are fixed).
"""

from lib import tables

SETTING = ("--config.mode=probe", "--config.probe.train_sentences=1000",
           "--config.probe.eval_sentences=300", "--config.probe.sst2_train=1000",
           "--config.probe.sst2_eval=300", "--config.probe.steps=600",
           "--overwrite")   # a crashed cell's directory holds cell.json: rerun into it
BEFORE = ("configs/probe.py docstring at commit 37fa3b9 (README 'Causal probe'): one run of the "
          "five tasks, `research/causal_probe.py --config=configs/probe.py --config.mode=probe` "
          "with the settings above, seed 0, 491 s, AMD EPYC, 2 cores shared at load ~10, "
          "2026-11-30")
BEST, ACC, SEL, EXP = ("probes.0.best_layer", "probes.0.best_accuracy",
                       "probes.0.max_selectivity", "probes.0.expected_layer")
# task: (label, best layer, its accuracy, max selectivity, expected layer) measured before.
TASKS = {"pos": ("CoNLL-2003 POS", 2, 0.883, 0.384, 2.69),
         "chunk": ("CoNLL-2003 chunk", 2, 0.850, 0.268, 2.61),
         "ner": ("CoNLL-2003 NER", 4, 0.915, 0.208, 3.13),
         "brown_pos": ("Brown POS", 2, 0.889, 0.321, 2.75),
         "sst2": ("SST-2 (sentences)", 4, 0.770, 0.310, 3.08)}


def _row(task: str) -> tables.Row:
  label, best, acc, sel, exp = TASKS[task]
  return tables.Row(
      task, label, "configs/probe.py", script="research/causal_probe.py", workdir_flag="--out",
      args=SETTING + (f"--config.probe.tasks={task}",), claim=task in ("pos", "ner"),
      seeds=(0, 1, 2) if task in ("pos", "ner") else (0,),   # the seed: probe init, controls
      vs="pos" if task == "ner" else "",
      recorded=tables.Recorded({BEST: {0: best}, ACC: {0: acc}, SEL: {0: sel}, EXP: {0: exp}},
                               BEFORE))


TABLE = tables.Table(
    name="probe",
    title="Layer-wise linear probes on frozen MiniLM-L6: best layer, selectivity, expected layer",
    columns=(tables.Column(EXP, "expected layer (scalar mix)", digits=2),
             tables.Column(BEST, "best layer (0 = embeddings)", digits=0),
             tables.Column(ACC, "accuracy at the best layer", digits=3),
             tables.Column("probes.0.majority", "majority baseline", digits=3),
             tables.Column(SEL, "max selectivity (task - control)", digits=3),
             tables.Column("wall_s", "wall s", digits=0)),
    rows=tuple(_row(t) for t in TASKS),
    setting="MiniLM-L6 (all-MiniLM-L6-v2), a sentence-transformer, not BERT-base (Tenney et "
            "al.); linear probes on every hidden state at once; 1,000 / 300 sentences per task.",
)
