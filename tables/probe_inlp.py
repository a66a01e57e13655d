"""Amnesic probing with INLP (issue 15): remove NER from MiniLM's hidden state 2 inside the
forward pass, then score the last-layer POS probe with that projection, with a random projection
of the same rank (the control) and with none.

  ./run.sh reproduce --table=tables/probe_inlp              # 3 cells, ~3 min each, 2 idle cores

Setting (configs/probe.py defaults): the first 1,000 CoNLL-2003 training / 300 validation
sentences, at most 20 INLP iterations of 600-step linear probes, stopping once the NER probe is at
the majority baseline. Claim: the POS probe loses more to the INLP projection than to the random
one (the two are columns of one cell: compare them across seeds; the seed sets the probes' init
and the random directions).
"""

from lib import tables

BEFORE = ("README 'Causal probe' at commit 37fa3b9 and configs/probe.py's docstring: "
          "`research/causal_probe.py --config=configs/probe.py --config.mode=inlp`, seed 0, 171 s, "
          "AMD EPYC, 2 cores shared at load ~10, 2026-11-30")
# The README's "NER probe 0.922 -> 0.779" is the probe of the last iteration (inlp.property_last),
# not the fresh probe after the projection (inlp.property_after): that one was not reported.
RECORDED = {"inlp.target_inlp": 0.709, "inlp.target_random": 0.804, "inlp.target_none": 0.811,
            "inlp.property_before": 0.922, "inlp.property_last": 0.779, "inlp.majority": 0.781,
            "inlp.rank": 90, "inlp.iterations": 11, "wall_s": 171}

TABLE = tables.Table(
    name="probe_inlp",
    title="INLP on MiniLM-L6: NER removed at hidden state 2; the last-layer POS probe with the "
          "INLP projection, a same-rank random one, and none",
    columns=(tables.Column("inlp.target_inlp", "POS probe, INLP projection", digits=3),
             tables.Column("inlp.target_random", "POS probe, random same rank", digits=3),
             tables.Column("inlp.target_none", "POS probe, no projection", digits=3),
             tables.Column("inlp.property_before", "NER probe before", digits=3),
             tables.Column("inlp.property_last", "NER probe, last iteration", digits=3),
             tables.Column("inlp.property_after", "fresh NER probe after", digits=3),
             tables.Column("inlp.majority", "NER majority", digits=3),
             tables.Column("inlp.rank", "rank removed (of 384)", digits=0),
             tables.Column("inlp.iterations", "probes trained", digits=0),
             tables.Column("wall_s", "wall s", digits=0)),
    rows=(tables.Row("inlp", "NER removed at state 2 (configs/probe.py)", "configs/probe.py",
                     args=("--config.mode=inlp", "--overwrite"), script="research/causal_probe.py",
                     workdir_flag="--out", claim=True, seeds=(0, 1, 2),
                     recorded=tables.Recorded({k: {0: v} for k, v in RECORDED.items()}, BEFORE)),),
    setting="MiniLM-L6, not BERT-base (Elazar et al.); 1,000 / 300 CoNLL-2003 sentences. "
            "Removing POS instead (45 tags) takes all 384 dimensions, which leaves no same-rank "
            "control.",
)
