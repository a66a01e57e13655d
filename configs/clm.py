"""GPT-2 causal-LM pretraining on packed rows of the plain-text corpora (the MLM code path).

  ./run.sh pretrain --config=configs/clm.py --workdir=workdirs/clm_gpt2_mini
  .venv/bin/python research/pretrain_mlm.py --config=configs/clm.py:quick --workdir=/tmp/clm_quick
  ./run.sh generate --model=workdirs/clm_gpt2_mini --prompt="ROMEO:" --top_k=40 --temperature=0.8

Variants (`--config=configs/clm.py:<variant>`, combine with '+'):
  (none)    gpt2-tiny resized to 4 layers, hidden 256, 4 heads, mlp 1024 ("gpt2-mini", 5.3M
            params) from random init on Shakespeare and Brown, with a byte-level BPE of 8,192
            tokens trained on them (<workdir>/tokenizer), 128-token rows (documents end with
            <|endoftext|>; attention and targets stay inside a document), batch 32, no dropout,
            AdamW lr 1e-3, 6% warmup then linear decay, 1,600 steps; held-out loss and perplexity
            on 10 batches per corpus every 400 steps, with greedy and sampled (T 0.8, top-k 40,
            top-p 0.95) continuations of `samples.prompts` printed at each evaluation. About 25
            minutes on the idle 2-core CPU (1.15 steps/s).
  gpt2bpe   the original GPT-2 BPE (50,257 tokens, ../shared/data/gpt2-bpe) instead: the output
            layer dominates, 0.39 steps/s.
  bf16, remat, accum4, quick   as in configs/mlm.py.
"""

from configs import common
from configs import mlm


def get_config(variant: str = ""):
  c = mlm.base("clm")
  c.model.preset = "gpt2-tiny"
  c.model.size.update(num_layers=4, hidden_size=256, num_heads=4, mlp_dim=1024)   # "gpt2-mini"
  c.vocab.size = 8192
  c.model.dropout_rate = 0.0          # no dropout for a short, under-fitted run
  c.optim.lr = 1e-3
  c.data.dataset = "text:shakespeare,text:brown"
  c.samples.prompts = ["ROMEO:", "The jury said that"]
  return common.apply_variant(c, variant, {
      "gpt2bpe": lambda c: setattr(c.vocab, "size", 0),
      **mlm.efficiency_variants(),
  })
