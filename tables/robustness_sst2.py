"""Adversarial training on SST-2 (issue 17): clean accuracy of plain fine-tuning, FGM and FreeLB, and
the success of the offline character-level attack (DeepWordBug-style, research/attack.py) on each
trained model; every attack cell attacks the fine-tuning cell of the same seed.

  ./run.sh reproduce --table=tables/robustness_sst2 --rows=plain_4k,fgm_4k,pgd_4k,freelb_4k,\
plain_4k_char,fgm_4k_char,pgd_4k_char,freelb_4k_char   # the subsampled rows (~80 min, 2 idle cores)
  ./run.sh reproduce --table=tables/robustness_sst2 --emit=commands    # all cells, for a cluster

Rows `*_4k` train on SST-2's first 4,000 training sentences (lr 1e-4, 125 steps) and evaluate on
the first 400 dev/test sentences: a CPU budget, not the paper setting. The rows without suffix
are the full configs/sst2.py runs with 5 seeds (the issue's protocol). The attacks (character edits,
embedding-neighbour word swaps, HotFlip) take the first 200 test sentences, at most 25% of a
sentence's words changed, seed = the cell's seed.
Claims: FGM/PGD/FreeLB vs plain on clean accuracy (Δ = row - plain, Welch interval over seeds) and
on the attack's success rate.
"""

from lib import tables

SUB = ("--config.data.max_train_examples=4000", "--config.data.max_eval_examples=400",
       "--config.optim.lr=1e-4")
FULL, FEW = (0, 1, 2, 3, 4), (0, 1, 2)
ATTACK = ("--attacks=char,word,hotflip", "--num_examples=200")


def _rows(suffix: str, args, seeds) -> tuple:
  out = []
  for method, variant in (("plain", ""), ("fgm", ":fgm"), ("pgd", ":pgd"), ("freelb", ":freelb")):
    rid = f"{method}{suffix}"
    out.append(tables.Row(rid, f"{method}{' (4k sentences)' if suffix else ''}",
                          f"configs/sst2.py{variant}", args=args, seeds=seeds, claim=True,
                          vs="" if method == "plain" else f"plain{suffix}"))
    out.append(tables.Row(f"{rid}_char", f"char attack on {method}{' (4k)' if suffix else ''}",
                          script="research/attack.py", seed_flag="--seed", seeds=seeds,
                          args=(f"--source={{workdir:{rid}}}",) + ATTACK, claim=True,
                          vs="" if method == "plain" else f"plain{suffix}_char"))
  return tuple(out)


CHAR = "attacks.char."
TABLE = tables.Table(
    name="robustness_sst2",
    title="Adversarial training (FGM, PGD, FreeLB) vs plain fine-tuning on SST-2: clean accuracy "
          "and three offline attacks",
    columns=(tables.Column("test.accuracy|" + CHAR + "attack_success_rate",
                           "clean test acc / char attack success"),
             tables.Column("attacks.word.attack_success_rate", "word attack success"),
             tables.Column("attacks.hotflip.attack_success_rate", "HotFlip success"),
             tables.Column(CHAR + "accuracy_under_attack", "acc under char attack"),
             tables.Column(CHAR + "average_perturbed_word_percent", "% words perturbed (char)",
                           digits=1),
             tables.Column(CHAR + "average_queries", "queries (char)", digits=1),
             tables.Column("train.median_step_s", "median step s", digits=3)),
    rows=_rows("_4k", SUB, FEW) + _rows("", (), FULL),
    setting="MiniLM-L6 (not BERT-base); adversarial hyperparameters untuned "
            "(configs/common.adversarial_variants); attacks are ours, offline (no TextAttack "
            "word vectors or sentence encoder).",
)
