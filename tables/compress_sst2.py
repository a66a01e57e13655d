"""Unstructured pruning on SST-2 (issue 14): magnitude (Zhu & Gupta's cubic schedule) vs movement
pruning (Sanh et al.'s straight-through top-k) at 50/70/90% zeros in the encoder kernels, each
pruned during fine-tuning from the same 1-epoch source, against a dense control of as many
epochs. The PNG draws the rows' test accuracy: the magnitude vs movement curve.

  ./run.sh reproduce --table=tables/compress_sst2               # 8 cells (~80 min, 2 idle cores)
  ./run.sh reproduce --table=tables/compress_sst2 --emit=commands

Setting (a CPU budget, as configs/compress.py's measured rows): the source is MiniLM-L6
fine-tuned on SST-2's first 2,000 training sentences for 1 epoch (configs/sst2.py); every other
row fine-tunes it 2 more epochs on the same 2,000 sentences (125 steps) and is evaluated once at
the end on the full dev (872) and test (1,821) sets. The pruning schedule (configs/compress.py
`_sparse`): cubic from 10% to 70% of the steps, masks every 10 steps, one global threshold.
Claims: movement vs magnitude at each sparsity (Δ = movement - magnitude).
"""

from lib import tables

SUB = ("--config.data.max_train_examples=2000",)
SEEDS = (0,)


# Measured before this table, the same commands from /tmp/d13/teacher_sst2 (AMD EPYC, 2 shared
# cores; configs/compress.py's docstring): shown until the cells run.
_WHERE = "configs/compress.py docstring (issue 14 rounds 2-3, seed 0)"
RECORDED = {
    "source": tables.Recorded({"test.accuracy": {0: 0.7661}, "dev.accuracy": {0: 0.7511}}, _WHERE),
    "magnitude_70": tables.Recorded({"test.accuracy": {0: 0.7743}, "dev.accuracy": {0: 0.7672}},
                                    _WHERE),
    "movement_70": tables.Recorded({"test.accuracy": {0: 0.4964}, "dev.accuracy": {0: 0.5092}},
                                   _WHERE + "; straight-through fix: the same"),
}


def _pruned(method: str, target: int) -> tables.Row:
  rid = f"{method}_{target}"
  return tables.Row(
      rid, f"{method} {target}% zeros", f"configs/compress.py:{method}+s{target}",
      script="research/compress.py", seed_flag="--config.eval.seed", seeds=SEEDS,
      args=("--model={workdir:source}", "--config.evaluate=False"),
      claim=method == "movement", vs=f"magnitude_{target}" if method == "movement" else "",
      recorded=RECORDED.get(rid))


TABLE = tables.Table(
    name="compress_sst2",
    title="Magnitude vs movement pruning of MiniLM-L6 on SST-2 (2,000 sentences): test accuracy "
          "at 50/70/90% zeros in the encoder kernels",
    columns=(tables.Column("test.accuracy", "test acc"),
             tables.Column("dev.accuracy", "dev acc")),
    rows=(tables.Row("source", "source: 1 epoch (dense)", "configs/sst2.py", args=SUB,
                     seeds=SEEDS, recorded=RECORDED["source"]),
          tables.Row("dense", "dense control: source + 2 epochs", "configs/sst2.py",
                     args=SUB + ("--config.model.init_from={workdir:source}",
                                 "--config.train.epochs=2"), seeds=SEEDS),
          ) + tuple(_pruned(m, t) for m in ("magnitude", "movement") for t in (50, 70, 90)),
    setting="MiniLM-L6 (not BERT-base), 125 pruning steps on 2,000 sentences (Sanh et al.: "
            "BERT-base, 10 epochs of MNLI/SQuAD, from the pretrained model).",
)
