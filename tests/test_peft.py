"""PEFT (lib/peft): LoRA/AdaLoRA/BitFit/adapters/prefix/prompt on the tiny model; merge, adapter
files, label rules, padding masks, an 8-device mesh, and HF PEFT export checked with PyTorch peft.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from lib import hf, model_io, models, optim, peft, sharding, train
from lib.peft import adalora, hf_export
from lib.tasks import classification, ner
from training_helpers import make_loss_fn, optim_config, synthetic_batch, tiny_args

HEAD = [["classifier/.*", "train"]]
QV = ".*/attention/(query|value)/kernel"
FREEZE_REST = [[".*", "freeze"]]


def _build(rules, options=(), args=None, head="seq_cls", num_labels=2, seed=0):
  """(spec, PEFT args, PEFT module, params, labels, base module, base params)."""
  args = args or tiny_args()
  spec = peft.parse_spec(rules, options)
  base_module = models.build(args, head, num_labels)
  base = jax.tree.map(np.asarray, models.init_params(base_module, jax.random.key(seed))[0])
  pargs = peft.configure(args, spec)
  module = models.build(pargs, head, num_labels)
  params = peft.add_params(base, module, jax.random.key(seed + 1))
  labels = peft.label_params(params, rules, log=False)
  return spec, pargs, module, params, labels, base_module, base


def _train(module, params, labels, spec, steps, lr=1e-2, dropout_seed=0):
  """`steps` AdamW steps of the tiny seq_cls loss with the library's train step."""
  tx, _ = optim.make_optimizer(optim_config(lr=lr, warmup_steps=0, schedule="constant"),
                               labels, steps)
  tx = peft.wrap_optimizer(tx, spec, steps)
  trainable = peft.split_trainable(params, labels)[0]
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(trainable))
  step = jax.jit(peft.with_rank_metrics(train.make_train_step(
      make_loss_fn(module), tx, labels=labels, seed=dropout_seed)))
  for i in range(steps):
    state, metrics = step(state, synthetic_batch(i))
  return state, metrics


def _logits(module, params, batch=None, **kw):
  batch = batch or synthetic_batch(99)
  out, _ = module.apply({"params": params}, input_ids=batch["input_ids"],
                        input_mask=batch["input_mask"], **kw)
  return np.asarray(out["logits"])


# ----------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("arch,head", [("bert", "seq_cls"), ("bert", "mlm"), ("gpt2", "lm")])
def test_lora_and_adapters_start_identical_to_base(arch, head):
  args = dataclasses.replace(tiny_args(), arch=arch, type_vocab_size=2 if arch == "bert" else 0)
  rules = ([["classifier/.*", "train"]] if head == "seq_cls" else []) + [
      [".*/(query|key|value|out|mlp_in|mlp_out|dense)/kernel", "lora(4, 8)"], [".*", "freeze"]]
  _, _, module, params, _, base_module, base = _build(rules, ["adapter(8)"], args, head)
  assert any(p.endswith("lora_b") for p in peft.flatten_paths(params))
  np.testing.assert_array_equal(_logits(module, params), _logits(base_module, base))


def test_lora_dropout_is_on_the_low_rank_path_only():
  rules = HEAD + [[QV, "lora(4, 8, 0.5)"]] + FREEZE_REST
  _, _, module, params, _, base_module, base = _build(rules)   # model dropout is 0
  train_mode = lambda p, k: _logits(module, p, deterministic=False, rngs={"dropout": k})
  want = _logits(base_module, base)
  for k in range(3):   # B = 0: the low-rank path adds exactly zero whatever its dropout mask
    np.testing.assert_array_equal(train_mode(params, jax.random.key(k)), want)
  flat = peft.flatten_paths(params)
  flat = {p: np.full_like(v, 0.05) if p.endswith("lora_b") else v for p, v in flat.items()}
  moved = peft.unflatten_paths(flat)
  a, b = train_mode(moved, jax.random.key(0)), train_mode(moved, jax.random.key(1))
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, train_mode(moved, jax.random.key(0)))


@pytest.mark.parametrize("method", ["lora(4, 8, 0.1)", "adalora(4, 2, 8.0, 0.1, 0.2, 0.2, 2)"])
def test_merged_equals_unmerged_after_training_and_unmerge_inverts(method):
  rules = HEAD + [[QV + "|.*/mlp/mlp_in/kernel|pooler/dense/kernel", method]] + FREEZE_REST
  spec, pargs, module, params, labels, base_module, _ = _build(rules)
  state, _ = _train(module, params, labels, spec, 6)
  trained = jax.tree.map(np.asarray, state.params)
  assert all(np.any(v != 0) for p, v in peft.flatten_paths(trained).items()
             if p.endswith("lora_b"))
  merged, margs = peft.merge(trained, pargs)
  assert margs == tiny_args() and not any(peft.peft_kind(p) for p in peft.flatten_paths(merged))
  np.testing.assert_allclose(_logits(base_module, merged), _logits(module, trained), atol=1e-5)
  back = peft.unmerge(merged, trained, pargs)
  for p, v in peft.flatten_paths(trained).items():
    np.testing.assert_allclose(peft.flatten_paths(back)[p], v, atol=1e-6, err_msg=p)


def test_adapter_file_holds_only_trainable_leaves_and_round_trips(tmp_path):
  rules = HEAD + [[QV, "lora(4, 8)"], [".*/bias", "bitfit"]] + FREEZE_REST
  spec, pargs, module, params, labels, _, _ = _build(rules)
  state, _ = _train(module, params, labels, spec, 3)
  trained = jax.tree.map(np.asarray, state.params)
  d = peft.save_adapter(str(tmp_path / "adapter"), trained, labels, pargs)
  meta = json.load(open(os.path.join(d, "adapter.json")))
  trainable = {p for p, l in peft.flatten_paths(labels).items() if peft.is_trainable(l)}
  assert set(meta["params"]) == trainable
  assert sum(np.prod(m["shape"]) for m in meta["params"].values()) == peft.trainable_count(
      params, labels) < models.param_count(params) / 5
  fresh = peft.add_params(_build(rules)[6], module, jax.random.key(7))   # other LoRA init
  loaded = peft.load_adapter(d, fresh)
  np.testing.assert_array_equal(_logits(module, loaded), _logits(module, trained))
  flat = peft.flatten_paths(fresh)
  flat["encoder/layer_0/attention/query/lora_a"] = np.zeros((64, 2), np.float32)   # rank 2
  with pytest.raises(ValueError, match=r"query/lora_a: saved \(64, 4\), params have \(64, 2\)"):
    peft.load_adapter(d, peft.unflatten_paths(flat))


def test_remat_keeps_peft_paths_and_outputs():
  """nn.remat's lifted Block takes the prefixes of the MLP reparameterisation as an argument."""
  rules = HEAD + [[QV, "lora(4, 8)"]] + FREEZE_REST
  _, pargs, module, params, _, _, _ = _build(rules, ["prefix(2, 8)"])
  remat = models.build(dataclasses.replace(pargs, remat="full"), "seq_cls", 2)
  assert jax.tree.structure(models.abstract_params(remat)[0]) == jax.tree.structure(params)
  np.testing.assert_allclose(_logits(remat, params), _logits(module, params), atol=1e-6)


# ----------------------------------------------------------------------------- every method

D, L, H, F, C = 64, 1, 4, 128, 2          # tiny_args(): hidden, layers, heads, mlp, + 2 labels
HEAD_COUNT = D * C + C
METHODS = {   # rules, options, closed-form trainable count
    "full": ([[".*", "train"]], [], None),
    "lora": (HEAD + [[QV, "lora(rank=4, alpha=8)"]] + FREEZE_REST, [],
             HEAD_COUNT + L * 2 * (D * 4 + 4 * D)),
    "adalora": (HEAD + [[QV, "adalora(init_rank=4, target_rank=2, t_init=0.2, t_final=0.2, "
                        "delta_t=1)"]] + FREEZE_REST, [],
                HEAD_COUNT + L * 2 * (D * 4 + 4 + 4 * D)),
    # every bias: q, k, v, out, mlp_in, mlp_out, 2 LayerNorms per layer; embedding LN; pooler.
    "bitfit": (HEAD + [[".*", "bitfit"]], [], HEAD_COUNT + L * (3 * D + D + F + D + 2 * D) + D + D),
    "adapter": (HEAD + FREEZE_REST, ["adapter(8)"], HEAD_COUNT + L * 2 * (D * 8 + 8 + 8 * D + D)),
    "prefix": (HEAD + FREEZE_REST, ["prefix(3)"], HEAD_COUNT + L * 2 * 3 * D),
    "prefix_mlp": (HEAD + FREEZE_REST, ["prefix(3, 16)"],
                   HEAD_COUNT + 3 * D + (D * 16 + 16) + (16 * L * 2 * D + L * 2 * D)),
    "prompt": (HEAD + FREEZE_REST, ["prompt(5)"], HEAD_COUNT + 5 * D),
}


def _opt_state_param_paths(opt_state, param_paths) -> set:
  """Parameter paths that have a copy in the optimizer state (Adam's mu/nu, AdaLoRA's EMAs)."""
  found = set()
  for kp, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    path = peft.path_str(kp)
    found.update(p for p in param_paths if path == p or path.endswith("/" + p))
  return found


@pytest.mark.parametrize("name", list(METHODS))
def test_frozen_leaves_bitwise_unchanged_without_optimizer_state(name):
  rules, options, count = METHODS[name]
  spec, _, module, params, labels, _, base = _build(rules, options)
  lab = peft.flatten_paths(labels)
  trainable = {p for p, l in lab.items() if peft.is_trainable(l)}
  assert peft.trainable_count(params, labels) == (count or models.param_count(base))
  state, _ = _train(module, params, labels, spec, 3, lr=1e-3)
  before, after = peft.flatten_paths(params), peft.flatten_paths(state.params)
  for p in lab:
    if p in trainable:
      assert np.any(np.asarray(after[p]) != before[p]) or p.endswith("lora_e"), p
    else:
      np.testing.assert_array_equal(np.asarray(after[p]), before[p], err_msg=p)
  assert _opt_state_param_paths(state.opt_state, set(lab)) == trainable


# ----------------------------------------------------------------------------- AdaLoRA


def test_adalora_budget_schedule_is_cubic():
  m = peft.parse_method("adalora(init_rank=6, target_rank=2, t_init=0.1, t_final=0.2)")
  got = [int(adalora.budget(m, 100, 3, s)) for s in (0, 9, 10, 45, 79, 80, 99)]
  # 18 until step 10, then 6 + 12 * (1 - (s - 10) / 70) ** 3, 6 from step 80 on.
  assert got == [18, 18, 18, int(6 + 12 * (1 - 35 / 70) ** 3), int(6 + 12 * (1 / 70) ** 3), 6, 6]


def test_adalora_reaches_target_total_rank_and_reports_it():
  rules = HEAD + [[QV + "|.*/mlp/mlp_(in|out)/kernel", "adalora(init_rank=6, target_rank=2, "
                   "t_init=0.1, t_final=0.3, delta_t=2)"]] + FREEZE_REST
  spec, _, module, params, labels, _, _ = _build(rules)
  state, metrics = _train(module, params, labels, spec, 20, lr=5e-3)
  ranks = peft.adalora_ranks(state.params)
  assert len(ranks) == 4 and sum(ranks.values()) == 2 * 4, ranks
  assert int(metrics["adalora_rank/total"]) == 8
  assert {int(metrics[f"adalora_rank/{m}"]) for m in ranks} == set(ranks.values())
  kept = np.asarray(state.opt_state.mask[sorted(ranks)[0]]).sum()
  assert kept == ranks[sorted(ranks)[0]]


def test_adalora_orthogonality_penalty_by_hand():
  rules = HEAD + [[QV, "adalora(4, 2, orth_reg=1.0, t_init=0.2, t_final=0.2)"]] + FREEZE_REST
  _, _, _, params, _, _, _ = _build(rules)
  flat = {p: jnp.asarray(v) for p, v in peft.flatten_paths(params).items()}
  mods = adalora._modules(flat)
  a = np.asarray(flat[f"{mods[0]}/lora_a"])
  want = np.sqrt(np.sum((a.T @ a - np.eye(4)) ** 2))          # by hand for one factor
  one = adalora.orth_penalty({f"{mods[0]}/lora_a": flat[f"{mods[0]}/lora_a"],
                              f"{mods[0]}/lora_b": jnp.eye(4, D).reshape(4, H, D // H)},
                             [mods[0]])
  np.testing.assert_allclose(float(one), want / 2, rtol=1e-5)   # B is orthonormal: 0


# ----------------------------------------------------------------------------- prefix, prompt


def _padded(ids, n_pad, pad_id=0):
  b, t = ids.shape
  mask = np.concatenate([np.ones((b, t), np.int32), np.zeros((b, n_pad), np.int32)], 1)
  return np.concatenate([ids, np.full((b, n_pad), pad_id, np.int32)], 1), mask


@pytest.mark.parametrize("arch,options", [
    ("bert", ["prefix(3)", "prompt(4)"]), ("bert", ["prefix(3, 16)"]), ("gpt2", ["prompt(4)"]),
    ("gpt2", ["prefix(2, 16)", "prompt(3)", "adapter(4)"])])
def test_prefix_and_prompt_ignore_padding(arch, options):
  """Real positions give the same outputs with or without padding after them, and padded keys
  get no attention from any query (prefix columns do)."""
  args = dataclasses.replace(tiny_args(), arch=arch, type_vocab_size=2 if arch == "bert" else 0)
  _, pargs, module, params, _, _, _ = _build(FREEZE_REST, options, args, head=None)
  params = jax.tree.map(lambda x: x + 0.02 * np.random.default_rng(0).normal(size=x.shape)
                        .astype(x.dtype), params)   # non-trivial prefixes, prompts, adapters
  ids = np.random.default_rng(1).integers(1, 100, (2, 6)).astype(np.int32)
  run = lambda i, m: module.apply({"params": params}, input_ids=i, input_mask=m,
                                  output_attentions=True)
  short, _ = run(ids, np.ones_like(ids))
  padded_ids, mask = _padded(ids, 3, pad_id=7)
  long, inter = run(padded_ids, mask)
  np.testing.assert_allclose(long["last_hidden_state"][:, :6], short["last_hidden_state"],
                             atol=1e-5)
  assert long["last_hidden_state"].shape[1] == 9                      # prompt positions stripped
  probs = np.asarray(inter["attentions"][0])                            # (B, H, Q, K)
  n_front = pargs.prefix_len + pargs.prompt_len                         # prefix/prompt keys first
  assert probs.shape[-1] == n_front + 9
  np.testing.assert_array_equal(probs[..., n_front + 6:], 0)           # padded keys: never
  assert np.all(probs[..., 0] > 0)               # a prefix / prompt key: seen by every query


def test_prompt_rejects_packed_rows_and_prefix_keeps_segments_apart():
  args = dataclasses.replace(tiny_args(), arch="gpt2", type_vocab_size=0)
  _, _, module, params, _, _, _ = _build(FREEZE_REST, ["prefix(2)"], args, head=None)
  a, b = np.array([[3, 4, 5, 6]]), np.array([[7, 8, 9]])
  row = np.concatenate([a, b, np.zeros((1, 1), np.int64)], 1)
  seg = np.array([[1, 1, 1, 1, 2, 2, 2, 0]])
  pos = np.array([[0, 1, 2, 3, 0, 1, 2, 0]])
  packed, _ = module.apply({"params": params}, input_ids=row, input_mask=(seg > 0).astype(int),
                           segment_ids=seg, position_ids=pos)
  for doc, sl in [(a, slice(0, 4)), (b, slice(4, 7))]:
    alone, _ = module.apply({"params": params}, input_ids=doc)
    np.testing.assert_allclose(packed["last_hidden_state"][:, sl], alone["last_hidden_state"],
                               atol=1e-5)
  _, _, module, params, _, _, _ = _build(FREEZE_REST, ["prompt(2)"], args, head=None)
  with pytest.raises(ValueError, match="prompt tuning needs one document per row"):
    module.apply({"params": params}, input_ids=row, input_mask=(seg > 0).astype(int),
                 segment_ids=seg, position_ids=pos)


def test_prefix_mlp_folds_into_direct_prefixes():
  spec, pargs, module, params, labels, _, _ = _build(HEAD + FREEZE_REST, ["prefix(3, 16)"])
  state, _ = _train(module, params, labels, spec, 3)
  merged, margs = peft.merge(jax.tree.map(np.asarray, state.params), pargs)
  assert (margs.prefix_len, margs.prefix_hidden) == (3, 0)
  assert "encoder/layer_0/attention/prefix_key" in peft.flatten_paths(merged)
  folded = models.build(margs, "seq_cls", 2)
  np.testing.assert_allclose(_logits(folded, merged), _logits(module, state.params), atol=1e-5)


def test_peft_params_shard_on_8_devices_like_one_device():
  rules = HEAD + [[QV, "lora(4, 8, 0.1)"]] + FREEZE_REST
  spec, pargs, module, params, labels, _, _ = _build(rules, ["prefix(2, 16)", "prompt(3)"],
                                                     dataclasses.replace(tiny_args(0.1)))
  _, logical = models.abstract_params(module)
  specs = peft.flatten_paths(logical)
  assert tuple(specs["encoder/layer_0/attention/query/lora_a"]) == ("embed", None)
  assert tuple(specs["encoder/layer_0/attention/query/lora_b"]) == (None, "heads", "head_dim")
  assert tuple(specs["encoder/prompt/embedding"]) == (None, "embed")
  tx, _ = optim.make_optimizer(optim_config(), labels, 4)
  step = train.make_train_step(make_loss_fn(module), tx, labels=labels, seed=3)
  results = []
  for shape, devices in (((2, 2, 2), jax.devices()[:8]), ((1, 1, 1), jax.devices()[:1])):
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(zip(sharding.MESH_AXES, shape))),
                              devices)
    state = train.train_state_from_params(params, tx, mesh, sharding.DEFAULT_RULES, logical,
                                          labels)
    if shape == (2, 2, 2):
      spec_of = lambda *path: tuple(peft.flatten_paths(state.params)["/".join(path)].sharding.spec)
      assert spec_of("encoder", "prompt", "embedding") == (None, "fsdp")
      assert spec_of("encoder", "layer_0", "attention", "query", "lora_b")[:2] == (None, "tensor")
    jstep = train.jit_train_step(step, state, sharding.batch_sharding(mesh, sharding.DEFAULT_RULES))
    for i in range(2):
      batch = sharding.shard_batch(synthetic_batch(i), sharding.batch_sharding(
          mesh, sharding.DEFAULT_RULES))
      state, metrics = jstep(state, batch)
    results.append((float(metrics["loss"]), train.to_host(state.params)))
  assert abs(results[0][0] - results[1][0]) < 1e-5
  for p, v in peft.flatten_paths(results[0][1]).items():
    np.testing.assert_allclose(v, peft.flatten_paths(results[1][1])[p], atol=1e-5, err_msg=p)


# ----------------------------------------------------------------------------- rules, spec


def test_lora_rule_on_a_non_dense_parameter_is_an_error():
  rules = [["classifier/kernel", "lora(4)"], [".*", "freeze"]]
  with pytest.raises(ValueError, match="classifier/kernel, which is not a Dense kernel"):
    _build(rules)


def test_lora_rules_need_a_model_built_for_them():
  params = models.abstract_params(models.build(tiny_args(), "seq_cls", 2))[0]
  with pytest.raises(ValueError, match="query/kernel, which is not a Dense kernel"):
    peft.label_params(params, [[QV, "lora"], [".*", "freeze"]], log=False)


def test_unmatched_parameters_and_unused_rules_are_errors_with_peft_params():
  with pytest.raises(ValueError, match=r"match no peft rule(.|\n)*pooler/dense/kernel"):
    _build([["classifier/.*", "train"], [QV, "lora(4)"], [".*/bias", "freeze"],
            ["encoder/.*", "freeze"]])
  with pytest.raises(ValueError, match=r"match no parameter.*'.*/nothing/kernel'"):
    _build(HEAD + [[".*/nothing/kernel", "lora(4)"]] + FREEZE_REST)


@pytest.mark.parametrize("text,match", [
    ("lorra(4)", "unknown method 'lorra'"), ("lora(4, rank=3)", "'rank' given twice"),
    ("lora(0)", "rank >= 1"), ("lora(4, wd=1)", "no argument 'wd'"),
    ("lora(4.5)", "rank=4.5 must be a int"), ("lora(x)", "literals"),
    ("adalora(4, 8)", "target_rank in"), ("lora(4", "name\\(arg")])
def test_bad_methods_name_the_rule(text, match):
  with pytest.raises(ValueError, match=match):
    peft.parse_spec([[".*", text]])


def test_options_and_defaults():
  spec = peft.parse_spec([[".*", "train"]], ["prefix(4, reparam_hidden=32)", "prompt"])
  args = peft.configure(tiny_args(), spec)
  assert (args.prefix_len, args.prefix_hidden, args.prompt_len, args.adapter_dim) == (4, 32, 20, 0)
  assert peft.configure(tiny_args(), peft.parse_spec([[".*", "train"]])) == tiny_args()
  with pytest.raises(ValueError, match="each option at most once"):
    peft.parse_spec([[".*", "train"]], ["prompt(2)", "prompt(3)"])
  with pytest.raises(ValueError, match="unknown option 'adaptor'"):
    peft.parse_spec([[".*", "train"]], ["adaptor(3)"])


def test_model_json_round_trips_peft_args(tmp_path):
  spec = peft.parse_spec(HEAD + [[QV, "adalora(4, 2)"]] + FREEZE_REST, ["adapter(8)"])
  args = peft.configure(tiny_args(), spec)
  model_io.write_model_json(str(tmp_path), args, "seq_cls", 2)
  again = model_io.read_model_json(str(tmp_path))["args"]
  assert again == args and hash(again) == hash(args)


@pytest.mark.parametrize("config", ["ner", "sst2"])
def test_config_variants_cover_minilm(config):
  """Every PEFT variant's rules fit the MiniLM model (abstract: nothing allocated); LoRA trains
  under 1% of it."""
  import importlib
  mod = importlib.import_module(f"configs.{config}")
  head, n = ("token_cls", 9) if config == "ner" else ("seq_cls", 2)
  base = models.args_from_config(common.model_config("minilm-l6-h384"))
  for variant in ("lora", "adalora", "bitfit", "adapter", "prefix", "prompt"):
    cfg = mod.get_config(f"quick+{variant}")
    spec = peft.spec_from_config(cfg.peft)
    abstract, _ = models.abstract_params(models.build(peft.configure(base, spec), head, n))
    labels = peft.label_params(abstract, [tuple(r) for r in cfg.peft.rules], log=False)
    frac = peft.trainable_count(abstract, labels) / models.param_count(abstract)
    assert 0 < frac < (0.01 if variant == "lora" else 0.1), (variant, frac)


# ----------------------------------------------------------------------------- HF PEFT export

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf_peft = pytest.importorskip("peft")

EXPORT_CASES = [
    # name, HF class, config, head, labels, rules
    ("bert_seq_lora", "BertForSequenceClassification", "bert", "seq_cls", 3,
     [["classifier/.*", "train"], ["pooler/dense/bias", "train"],
      [".*/attention/(query|value|out)/kernel|.*/mlp_in/kernel|pooler/dense/kernel",
       "lora(4, 8, 0.1)"], [".*_ln/.*", "train"], [".*", "freeze"]]),
    ("bert_token_adalora", "BertForTokenClassification", "bert", "token_cls", 5,
     [["classifier/.*", "train"], [".*/attention/(query|key|value)/kernel",
                                   "adalora(4, 2, 8.0, 0.0, 0.2, 0.2, 2)"], [".*", "freeze"]]),
    ("gpt2_lm_lora", "GPT2LMHeadModel", "gpt2", "lm", 0,
     [[".*/attention/(query|value)/kernel|.*/mlp_out/kernel", "lora(4, 16)"],
      [".*/attention/key/kernel", "lora(2, 4)"], [".*", "freeze"]]),
]


def test_pinned_torch_and_peft_versions():
  """requirements-test.txt pins peft==0.21.2 beside torch==2.13.0 (the CPU wheel)."""
  assert hf_peft.__version__ == "0.21.2"
  assert torch.__version__.split("+")[0] == "2.13.0"


def _hf_config(arch, num_labels):
  if arch == "bert":
    return transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=64,
                                   max_position_embeddings=40, num_labels=num_labels or 2)
  return transformers.GPT2Config(vocab_size=120, n_embd=32, n_layer=2, n_head=4, n_positions=40,
                                 bos_token_id=0, eos_token_id=0)


def _randomise(params, labels, seed):
  """Trained-looking values for every trainable leaf (LoRA B non-zero, AdaLoRA E with zeros)."""
  rng = np.random.default_rng(seed)
  lab = peft.flatten_paths(labels)
  out = {}
  for p, v in peft.flatten_paths(params).items():
    if peft.is_trainable(lab[p]):
      v = v + 0.05 * rng.normal(size=v.shape).astype(v.dtype)
      if p.endswith("lora_e"):
        v[::2] = 0    # pruned triplets
    out[p] = v
  return peft.unflatten_paths(out)


@pytest.mark.parametrize("name,cls,arch,head,num_labels,rules", EXPORT_CASES,
                         ids=[c[0] for c in EXPORT_CASES])
def test_hf_peft_loads_our_adapter_with_the_same_logits(tmp_path, name, cls, arch, head,
                                                        num_labels, rules):
  torch.manual_seed(0)
  ref = getattr(transformers, cls)(_hf_config(arch, num_labels)).eval()
  base_dir = str(tmp_path / "base")
  ref.save_pretrained(base_dir)
  args, base = hf.import_checkpoint(base_dir, head, num_labels)
  spec = peft.parse_spec(rules)
  pargs = peft.configure(args, spec)
  module = models.build(pargs, head, num_labels)
  params = peft.add_params(base, module, jax.random.key(0))
  labels = peft.label_params(params, rules, log=False)
  params = _randomise(params, labels, 1)
  adapter = hf_export.export_hf_adapter(str(tmp_path / "adapter"), params, labels, pargs, head,
                                        base_model_name_or_path=base_dir)
  ids = np.random.default_rng(0).integers(1, 120, (2, 9)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 6:] = 0
  ours = np.asarray(module.apply({"params": params}, input_ids=ids, input_mask=mask)[0]["logits"])
  model = hf_peft.PeftModel.from_pretrained(getattr(transformers, cls).from_pretrained(base_dir),
                                            adapter).eval()
  with torch.no_grad():
    theirs = model(input_ids=torch.from_numpy(ids).long(),
                   attention_mask=torch.from_numpy(mask).long()).logits.numpy()
  valid = mask.astype(bool) if ours.ndim == 3 else slice(None)
  np.testing.assert_allclose(ours[valid], theirs[valid], atol=1e-4, rtol=0)
  assert not np.allclose(ours, np.asarray(models.build(args, head, num_labels).apply(
      {"params": base}, input_ids=ids, input_mask=mask)[0]["logits"]), atol=1e-3)

  # The merged model through the plain exporter: transformers alone gives the same logits.
  with pytest.raises(ValueError, match="merge"):
    hf.export_checkpoint(params, args, str(tmp_path / "unmerged"), head, num_labels)
  merged, margs = peft.merge(params, pargs)
  out = hf.export_checkpoint(merged, margs, str(tmp_path / "merged"), head, num_labels)
  with torch.no_grad():
    again = getattr(transformers, cls).from_pretrained(out).eval()(
        input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
  np.testing.assert_allclose(ours[valid], again.logits.numpy()[valid], atol=1e-4, rtol=0)


def test_hf_export_refuses_what_lora_format_cannot_hold(tmp_path):
  rules = HEAD + [[QV, "lora(4)"]] + FREEZE_REST
  _, pargs, _, params, labels, _, _ = _build(rules, ["adapter(4)"])
  with pytest.raises(ValueError, match="attention_adapter/down/bias: trainable, but has no"):
    hf_export.export_hf_adapter(str(tmp_path / "a"), params, labels, pargs, "seq_cls")


def _trajectory_batches(n, batch_size=8, seq=12, vocab=120, tokens=False):
  """Random SST-2-like batches (padding, token types, labels, example ids) for both frameworks;
  `tokens`: NER-like (B, T) labels over 3 classes, -1 on padding and on ~1/4 of the tokens."""
  rng = np.random.default_rng(5)
  out = []
  for i in range(n):
    lengths = rng.integers(3, seq + 1, batch_size)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
    out.append(dict(input_ids=rng.integers(1, vocab, (batch_size, seq)).astype(np.int32) * mask,
                    input_mask=mask, token_type_ids=np.zeros_like(mask),
                    label=rng.integers(0, 2, batch_size).astype(np.int32),
                    example_ids=np.arange(i * batch_size, (i + 1) * batch_size, dtype=np.int32)))
    if tokens:
      y = rng.integers(0, 3, (batch_size, seq)).astype(np.int32)
      out[-1]["labels"] = np.where(mask.astype(bool) & (rng.random(y.shape) > 0.25), y, -1)
      del out[-1]["label"]
  return out


@pytest.mark.slow
@pytest.mark.parametrize("method,head", [("lora", "seq_cls"), ("full", "seq_cls"),
                                         ("full", "token_cls")])
def test_training_trajectory_matches_the_hf_reference_loop(tmp_path, method, head):
  """Ours and research/reference_peft.py's loop (lib/peft_reference: HF PEFT LoRA, or the plain
  HF model for full fine-tuning; torch AdamW) from the same initial weights (our LoRA A copied
  into PEFT's), dropout off, on the same batches with warmup + linear decay, weight decay (not on
  biases, LayerNorms, embeddings) and clipping: the same loss at every step and the same trained
  parameters. What is left between the two frameworks' real runs is then only their random
  streams (initialisation, dropout masks). Tolerance: measured 2e-5 relative on the losses (LoRA,
  30 steps), 1.5e-5 absolute on the parameters: float32 sums in another order (XLA vs oneDNN)
  drift ~1e-6 per step, and Adam's sign-like first steps amplify it. Weight decay 0.1 makes a
  decay on the wrong leaves (e.g. the embeddings) move them by > 1e-4."""
  from lib import peft_reference as ref   # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  num_labels = 2 if head == "seq_cls" else 3
  hf_cfg = _hf_config("bert", num_labels)
  hf_cfg.hidden_dropout_prob = hf_cfg.attention_probs_dropout_prob = 0.0
  base_dir = str(tmp_path / "base")
  hf_cls = (transformers.BertForSequenceClassification if head == "seq_cls"
            else transformers.BertForTokenClassification)
  hf_cls(hf_cfg).save_pretrained(base_dir)
  rules = ([["classifier/.*", "train"], ["pooler/dense/bias", "train"],
            [".*/attention/(query|key|value|out)/kernel|pooler/dense/kernel",
             "lora(rank=4, alpha=8, dropout=0.0)"], [".*", "freeze"]] if method == "lora"
           else [list(r) for r in peft.FULL_FINETUNE])
  cfg = ml_collections.ConfigDict(dict(
      task="classification" if head == "seq_cls" else "ner", peft=dict(rules=rules, options=()),
      optim=optim_config(lr=1e-2, warmup_steps=0, warmup_frac=0.1, weight_decay=0.1,
                         clip_norm=1.0)))
  steps = 30
  batches = _trajectory_batches(3, tokens=head == "token_cls") * 10   # repeated: learnable

  args, base = hf.import_checkpoint(base_dir, head, num_labels)
  spec = peft.spec_from_config(cfg.peft)
  pargs = peft.configure(args, spec)
  module = models.build(pargs, head, num_labels)
  params = peft.add_params(base, module, jax.random.key(3))
  labels = peft.label_params(params, rules, log=False)
  tx, schedule = optim.make_optimizer(cfg.optim, labels, steps)
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(peft.split_trainable(params, labels)[0]))
  task = classification if head == "seq_cls" else ner
  step = jax.jit(train.make_train_step(task.make_loss_fn(module), tx, labels=labels,
                                       schedule=schedule))
  ours = []
  for b in batches:
    state, m = step(state, b)
    ours.append(float(m["loss"]))

  model = ref.wrap(hf_cls.from_pretrained(base_dir), cfg, steps)
  from safetensors.numpy import load_file   # pylint: disable=g-import-not-at-top
  if method == "lora":
    adapter = hf_export.export_hf_adapter(str(tmp_path / "init"), params, labels, pargs,
                                          "seq_cls")
    lora = {k: torch.from_numpy(v) for k, v in
            load_file(os.path.join(adapter, "adapter_model.safetensors")).items() if ".lora_" in k}
    assert len(lora) == 2 * (4 * 2 + 1)   # A and B of 4 projections x 2 layers + the pooler
    hf_peft.set_peft_model_state_dict(model, lora)
  _, _, theirs = ref.fit(cfg, model, iter(batches), steps, steps, lambda: 0.0)

  np.testing.assert_allclose(ours, theirs, rtol=2e-4)
  assert ours[-1] < 0.8 * ours[0]       # it trained: a drift would have shown
  named = {n.replace(".default", ""): p.detach().numpy() for n, p in model.named_parameters()}
  if method == "lora":
    trained = hf_export.export_hf_adapter(str(tmp_path / "trained"), state.params, labels, pargs,
                                          "seq_cls")
    want = load_file(os.path.join(trained, "adapter_model.safetensors"))
  else:
    want = hf.params_to_hf(jax.tree.map(np.asarray, state.params), args, head)
  for k, v in want.items():
    np.testing.assert_allclose(v, named[k], atol=1e-4, err_msg=k)
