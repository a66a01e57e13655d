"""Continual learning with MiniLM (issue 16): SST-2 -> CoNLL-2003 NER -> Brown POS in sequence with
naive fine-tuning, experience replay, EWC and per-task LoRA adapters; average accuracy after the
last task, forgetting (Chaudhry et al.) and backward transfer. One cell per method and seed.

  ./run.sh reproduce --table=tables/continual               # 12 cells, ~2-4 min each
  ./run.sh reproduce --table=tables/continual --emit=commands

Setting (configs/continual.py): 500 training examples per task, 1 epoch (32 steps of 16), 200
test examples per task; replay 1% of each earlier task (5 examples), EWC lambda 1000 with a
diagonal Fisher on 64 examples, LoRA r=8 on the attention projections per task. Claims: each
method vs naive fine-tuning on average accuracy (Δ = method - naive, Welch over seeds).
"""

from lib import tables

SEEDS = (0, 1, 2)
AVG, FORGET, BWT = ("methods.0.average_accuracy", "methods.0.forgetting",
                    "methods.0.backward_transfer")
BEFORE = ("README 'Few-shot and continual learning' at commit 37fa3b9: `research/continual.py "
          "--config=configs/continual.py` (the four methods in one run), seed 0, AMD EPYC, 2 "
          "shared cores, 2026-11-30")
# method: (label, average accuracy, forgetting) measured before; NER's accuracy right after
# learning it (R[1, 1]) was the same 0.7697 for every method.
METHODS = {"naive": ("naive fine-tuning", 0.515, 0.096),
           "replay": ("experience replay (1%)", 0.513, 0.101),
           "ewc": ("EWC (lambda 1000)", 0.515, 0.096),
           "lora": ("per-task LoRA adapters (r=8)", 0.616, 0.0)}


def _row(method: str) -> tables.Row:
  label, avg, forget = METHODS[method]
  return tables.Row(
      method, label, f"configs/continual.py:{method}", script="research/continual.py",
      seeds=SEEDS, claim=True, vs="" if method == "naive" else "naive",
      recorded=tables.Recorded({AVG: {0: avg}, FORGET: {0: forget},
                                "methods.0.learned.ner": {0: 0.7697}}, BEFORE))


TABLE = tables.Table(
    name="continual",
    title="Continual learning SST-2 -> CoNLL-2003 NER -> Brown POS with MiniLM-L6 (500 examples "
          "per task, 1 epoch)",
    columns=(tables.Column(AVG, "average accuracy", digits=3),
             tables.Column(FORGET, "forgetting", digits=3),
             tables.Column(BWT, "backward transfer", digits=3),
             tables.Column("methods.0.learned.sst2", "SST-2 right after learning it",
                           digits=3),
             tables.Column("methods.0.final.sst2", "SST-2 at the end", digits=3),
             tables.Column("methods.0.learned.ner", "NER right after learning it", digits=4),
             tables.Column("methods.0.final.pos", "POS at the end", digits=3),
             tables.Column("methods.0.trainable_params_per_task", "trainable params per task",
                           digits=0)),
    rows=tuple(_row(m) for m in METHODS),
    setting="MiniLM-L6 with one shared output layer (the task is known at test time); 500 "
            "training / 200 test examples per task, 1 epoch: a CPU budget, far below the papers' "
            "settings. Accuracy: sentences (SST-2), words incl. O (NER), words (POS).",
)
