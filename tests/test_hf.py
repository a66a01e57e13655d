"""Parity of our Flax BERT / GPT-2 with Hugging Face PyTorch, checkpoint round trips, tokenizers."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from configs.common import DATA_DIR
from lib import hf, models
from lib.models import ModelArgs

# fp32 on CPU: both sides do the same float32 math in different orders (XLA vs ATen GEMMs,
# erf implementations); measured worst-case differences are ~1e-6 on random weights.
ATOL = 1e-5
# The real MiniLM checkpoint: hidden values reach |10|, and float32 summation-order differences
# (XLA's vs PyTorch's GEMMs, 384-wide dots, six LayerNorms) grow by ~2e-6 per layer (measured:
# 1e-6 after the embeddings, 1.2e-5 at layer 4, i.e. 1e-6 of the largest values), so its
# hidden states get 2e-5 absolute; random-weight tiny models keep 1e-5.
ATOL_MINILM = 2e-5

SENTENCES = ["EU rejects German call to boycott British lamb .",
             "Peter Blackburn",
             "The European Commission said on Thursday it disagreed with German advice to consumers "
             "to shun British lamb until scientists determine whether mad cow disease can be "
             "transmitted to sheep ."]


def _torch(x):
  return torch.from_numpy(np.asarray(x))


def _apply(args, head, params, ids, mask, num_labels=0, **kw):
  module = models.build(args, head, num_labels)
  return module.apply({"params": params}, input_ids=jnp.asarray(ids), input_mask=jnp.asarray(mask),
                      **kw)


@pytest.fixture(scope="module")
def minilm():
  return hf.import_checkpoint("minilm")


def test_minilm_matches_hf_bertmodel(minilm):
  args, params = minilm
  tok = hf.load_bert_tokenizer("minilm")
  enc = tok(SENTENCES, padding=True, return_tensors="np")
  ref = transformers.BertModel.from_pretrained(hf.minilm_dir(), attn_implementation="eager").eval()
  with torch.no_grad():
    want = ref(input_ids=_torch(enc["input_ids"]), attention_mask=_torch(enc["attention_mask"]),
               token_type_ids=_torch(enc["token_type_ids"]), output_hidden_states=True)
  out, inter = _apply(args, None, params, enc["input_ids"], enc["attention_mask"],
                      token_type_ids=jnp.asarray(enc["token_type_ids"]))
  assert len(inter["hidden_states"]) == len(want.hidden_states) == 7
  assert enc["attention_mask"].min() == 0  # the batch really is padded
  for ours, theirs in zip(inter["hidden_states"], want.hidden_states):
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=ATOL_MINILM, rtol=0)
  np.testing.assert_allclose(np.asarray(out["pooled"]), want.pooler_output.numpy(),
                             atol=ATOL_MINILM, rtol=0)


def _bert_config(**kw):
  return transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64,
                                 max_position_embeddings=40, **kw)


def _gpt2_config(**kw):
  return transformers.GPT2Config(vocab_size=120, n_embd=32, n_layer=2, n_head=4, n_positions=40,
                                 bos_token_id=0, eos_token_id=0, **kw)


def _batch(seed=0, b=3, t=11, vocab=120):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, vocab, (b, t)).astype(np.int32)
  mask = np.ones((b, t), np.int32)
  mask[1, 7:] = 0
  mask[2, 3:] = 0
  return ids, mask


def _save_random(tmp_path, cls, config, name):
  torch.manual_seed(0)
  model = cls(config).eval()
  with torch.no_grad():  # non-trivial biases and LayerNorms so a mix-up cannot pass
    for p in model.parameters():
      p.add_(0.02 * torch.randn_like(p))
  path = str(tmp_path / name)
  model.save_pretrained(path)
  return model, path


CASES = [
    ("bert_mlm", transformers.BertForMaskedLM, _bert_config, "mlm", 0),
    ("bert_token", transformers.BertForTokenClassification, _bert_config, "token_cls", 5),
    ("bert_seq", transformers.BertForSequenceClassification, _bert_config, "seq_cls", 3),
    ("gpt2_lm", transformers.GPT2LMHeadModel, _gpt2_config, "lm", 0),
    ("gpt2_token", transformers.GPT2ForTokenClassification, _gpt2_config, "token_cls", 4),
]


@pytest.mark.parametrize("name,cls,make_cfg,head,num_labels", CASES, ids=[c[0] for c in CASES])
def test_random_weights_match_hf_and_round_trip(tmp_path, name, cls, make_cfg, head, num_labels):
  cfg = make_cfg(num_labels=num_labels) if num_labels else make_cfg()
  ref, path = _save_random(tmp_path, cls, cfg, name)
  args, params = hf.import_checkpoint(path, head, num_labels)
  ids, mask = _batch()
  with torch.no_grad():
    want = ref(input_ids=_torch(ids).long(), attention_mask=_torch(mask).long()).logits.numpy()
  out, _ = _apply(args, head, params, ids, mask, num_labels)
  got = np.asarray(out["logits"])
  valid = mask.astype(bool) if got.ndim == 3 else slice(None)
  np.testing.assert_allclose(got[valid], want[valid], atol=ATOL, rtol=0)

  # Round trip: ours -> exported HF dir -> transformers loads it with no missing/unexpected keys.
  exported = hf.export_checkpoint(params, args, str(tmp_path / f"{name}_export"), head, num_labels)
  again, info = cls.from_pretrained(exported, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  with torch.no_grad():
    back = again.eval()(input_ids=_torch(ids).long(), attention_mask=_torch(mask).long()).logits
  np.testing.assert_array_equal(back.numpy()[valid], want[valid])


def test_minilm_round_trip_bitwise(tmp_path, minilm):
  args, params = minilm
  exported = hf.export_checkpoint(params, args, str(tmp_path / "minilm"), None,
                                  tokenizer_dir=hf.minilm_dir())
  original, again = hf.load_hf_state(hf.minilm_dir()), hf.load_hf_state(exported)
  for k, v in again.items():
    np.testing.assert_array_equal(v, original[k], err_msg=k)
  assert set(original) - set(again) == {"embeddings.position_ids"}
  assert hf.load_bert_tokenizer(exported)("hello world")["input_ids"] == [101, 7592, 2088, 102]


def test_gpt2_tokenizer_known_ids():
  tok = hf.load_gpt2_tokenizer(os.path.join(DATA_DIR, "gpt2-bpe"))
  # Ids from the original GPT-2 encoder (openai/gpt-2 encoder.py on these strings).
  assert tok("Hello world")["input_ids"] == [15496, 995]
  assert tok(" the")["input_ids"] == [262]
  assert tok("<|endoftext|>")["input_ids"] == [50256]
  assert tok.decode(tok("Naïve café — 2024!")["input_ids"]) == "Naïve café — 2024!"


def test_bert_tokenizer_matches_checkpoint_tokenizer_json():
  import tokenizers  # the raw Rust tokenizer of the checkpoint, bypassing transformers
  raw = tokenizers.Tokenizer.from_file(os.path.join(hf.minilm_dir(), "tokenizer.json"))
  raw.no_padding()  # the file pads to 128 for sentence-transformers; compare ids only
  raw.no_truncation()
  tok = hf.load_bert_tokenizer("minilm")
  for s in SENTENCES + ["Unaffable naïve résumé"]:
    assert tok(s)["input_ids"] == raw.encode(s).ids


def _corrupt(tmp_path, edit):
  from safetensors.numpy import save_file
  state = hf.load_hf_state(hf.minilm_dir())
  edit(state)
  path = tmp_path / "bad"
  path.mkdir()
  save_file(state, str(path / "model.safetensors"))
  with open(os.path.join(hf.minilm_dir(), "config.json")) as f:
    (path / "config.json").write_text(f.read())
  return str(path)


def test_renamed_tensor_names_both_keys(tmp_path):
  def rename(s):
    s["encoder.layer.3.attention.self.kee.weight"] = s.pop("encoder.layer.3.attention.self.key.weight")
  with pytest.raises(hf.CheckpointMismatchError) as e:
    hf.import_checkpoint(_corrupt(tmp_path, rename))
  msg = str(e.value)
  assert "missing: encoder.layer.3.attention.self.key.weight" in msg
  assert "unexpected: encoder.layer.3.attention.self.kee.weight (384, 384)" in msg


def test_wrong_shape_names_key_and_both_shapes(tmp_path):
  def shrink(s):
    s["encoder.layer.1.intermediate.dense.weight"] = s["encoder.layer.1.intermediate.dense.weight"][:100]
  with pytest.raises(hf.CheckpointMismatchError) as e:
    hf.import_checkpoint(_corrupt(tmp_path, shrink))
  assert ("wrong shape: encoder.layer.1.intermediate.dense.weight has (100, 384) in the checkpoint, "
          "model expects (1536, 384)") in str(e.value)


def test_new_head_needs_permission():
  with pytest.raises(hf.CheckpointMismatchError, match="missing: classifier.weight"):
    hf.import_checkpoint("minilm", "token_cls", 9)
  args, params = hf.import_checkpoint("minilm", "token_cls", 9, allow_new_heads=True)
  assert params["classifier"]["kernel"].shape == (384, 9)
