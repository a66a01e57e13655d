"""Train steps, the fit loop, exact resume after SIGKILL, SIGTERM saves, any-mesh restore, multi-process.

Run as a script (`python tests/test_train.py --workdir D ...`) this file is the worker that the
subprocess tests start; the parent sets XLA_FLAGS / JAX_PLATFORMS / PYTHONPATH in its environment.
"""

import argparse
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lib import checkpoint, distributed, flops, models, peft, sharding, train, tree
from training_helpers import (EVAL_SEEDS, SyntheticIterator, eval_step_fn, make_loss_fn, setup,
                              synthetic_batch, train_config)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH = (2, 2, 2)
DROPOUT = 0.1      # fit tests train with dropout, so the per-step keys must resume exactly too


def _copy(state):
  """A fresh copy (fit donates/frees the state it is given)."""
  return jax.tree.map(jnp.copy, state)


def _losses(rows) -> dict:
  """{step: loss} from history rows / metrics.jsonl lines; a step logged twice keeps the last."""
  return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _flat_host(params) -> dict:
  return {k: np.asarray(v) for k, v in peft.flatten_paths(train.to_host(params)).items()}


# ------------------------------------------------------------------------------------ in-process

def test_accumulating_4_micro_batches_of_8_equals_one_batch_of_32():
  s = setup((1, 1, 1), devices=jax.devices()[:1], warmup_steps=0, schedule="constant")
  step4 = train.make_train_step(make_loss_fn(s.module), s.tx, labels=s.labels, accum_steps=4,
                                schedule=s.schedule)
  batch = sharding.shard_batch(synthetic_batch(3, 32), s.batch_sharding)
  init = _flat_host(s.state.params)
  st1, m1 = train.jit_train_step(s.train_step, s.state, s.batch_sharding)(_copy(s.state), batch)
  st4, m4 = train.jit_train_step(step4, s.state, s.batch_sharding)(_copy(s.state), batch)
  assert float(m4["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-6)
  assert float(m4["grad_norm"]) == pytest.approx(float(m1["grad_norm"]), rel=1e-5)
  assert int(m4["examples"]) == int(m1["examples"]) == 32    # int metrics are summed
  p1, p4 = _flat_host(st1.params), _flat_host(st4.params)
  for k in p1:  # float32 sums in another order; one Adam step moves a parameter by ~lr = 1e-3
    np.testing.assert_allclose(p4[k], p1[k], rtol=1e-5, atol=2e-6, err_msg=k)
  assert max(np.abs(p1[k] - init[k]).max() for k in p1) > 5e-4


class _SlowInput(SyntheticIterator):
  """Batches that take 0.3 s each to produce: the loop is host-bound."""

  def __next__(self):
    time.sleep(0.3)
    return super().__next__()


def test_input_frac_shows_a_host_bound_loop():
  s = setup(MESH)
  res = train.fit(_copy(s.state), s.train_step, _SlowInput(0), train_config(log_every=2),
                  num_steps=4, batch_sharding=s.batch_sharding)
  rows = [r for r in res.history if r["kind"] == "train"]
  assert rows[-1]["input_frac"] > 0.6, rows[-1]   # 2 x 0.3 s of input against tiny steps


def test_frozen_leaves_bitwise_unchanged_and_stateless_fit_logs(tmp_path):
  rules = [("classifier/.*", "head"), ("encoder/layer_0/mlp/.*", "train"), (".*", peft.FREEZE)]
  s = setup(MESH, peft_rules=rules, dropout=DROPOUT, lr_mult={"head": 10.0})
  init = _flat_host(s.state.params)
  labels = peft.flatten_paths(s.labels)
  cfg = train_config(log_every=2, peak_flops=1e9)
  res = train.fit(_copy(s.state), s.train_step, SyntheticIterator(0), cfg, num_steps=4,
                  batch_sharding=s.batch_sharding, logdir=str(tmp_path), flops_per_token=1e4)
  after = _flat_host(res.state.params)
  frozen = [k for k, l in labels.items() if l == peft.FREEZE]
  assert len(frozen) > 15
  for k in frozen:
    assert after[k].tobytes() == init[k].tobytes(), k
  for k in (k for k, l in labels.items() if l != peft.FREEZE):
    assert not np.array_equal(after[k], init[k]), k
  opt_paths = list(peft.flatten_paths(res.state.opt_state))
  assert not [p for p in opt_paths for k in frozen if p.endswith(k)]
  # Logged rows: every 2 steps, with throughput, MFU and the loss_fn's own metrics.
  rows = [r for r in res.history if r["kind"] == "train"]
  assert [r["step"] for r in rows] == [2, 4]
  for key in ("loss", "lr", "grad_norm", "tokens", "examples", "steps_per_s", "tokens_per_s",
              "eta_s", "mfu", "input_frac"):
    assert key in rows[-1], key
  assert 0.0 < rows[-1]["input_frac"] < 1.0
  batches = [synthetic_batch(i, 16) for i in range(4)]
  assert rows[-1]["tokens"] == sum(int(b["input_mask"].sum()) for b in batches[2:])
  assert rows[-1]["lr"] == pytest.approx(float(s.schedule(3)))
  assert _read_jsonl(tmp_path / "metrics.jsonl") == res.history
  assert [f for f in os.listdir(tmp_path) if f.startswith("events.out.tfevents")]


def test_fit_that_raises_restores_the_signal_handlers(tmp_path):
  s = setup((1, 1, 1), devices=jax.devices()[:1])
  before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  ck = checkpoint.Checkpointer(tmp_path / "ckpt", save_every=0)

  def failing(batches):
    for i, b in enumerate(batches):
      if i == 2:
        raise RuntimeError("bad batch")
      yield b
  with pytest.raises(RuntimeError, match="bad batch"):
    train.fit(_copy(s.state), s.train_step, failing(SyntheticIterator(0)), train_config(),
              num_steps=10, batch_sharding=s.batch_sharding, checkpointer=ck)
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
  ck.close()


def test_fit_stops_early_on_eval_request_and_when_data_runs_out(tmp_path):
  s = setup((1, 1, 1), devices=jax.devices()[:1])
  ck = checkpoint.Checkpointer(tmp_path / "ckpt", save_every=0)
  evals = lambda st: {"acc": 0.5, "stop": int(st.step) >= 4}
  res = train.fit(_copy(s.state), s.train_step, SyntheticIterator(0), train_config(eval_every=2),
                  num_steps=10, batch_sharding=s.batch_sharding, eval_fn=evals, checkpointer=ck)
  ck.close()
  assert res.early_stopped and not res.preempted and int(res.state.step) == 4
  assert [(r["step"], r) for r in res.history if r["kind"] == "eval"] == [
      (2, {"step": 2, "kind": "eval", "acc": 0.5}), (4, {"step": 4, "kind": "eval", "acc": 0.5})]
  assert ck.all_steps() == [4]
  short = (b for _, b in zip(range(3), SyntheticIterator(0)))   # 3 batches, no get_state
  res = train.fit(_copy(s.state), s.train_step, short, train_config(log_every=5), num_steps=10,
                  batch_sharding=s.batch_sharding, eval_fn=lambda st: {"acc": 1.0})
  assert int(res.state.step) == 3 and not res.early_stopped
  assert [(r["kind"], r["step"]) for r in res.history] == [("train", 3), ("eval", 3)]


def test_flops_per_token_formula():
  # PaLM: 6N + 12 L D T with everything trainable; frozen weights skip their weight gradient.
  assert flops.train_flops_per_token(1000, 2, 8, 16) == 6 * 1000 + 12 * 2 * 8 * 16
  assert flops.train_flops_per_token(1000, 2, 8, 16, num_trainable=10) == 4 * 1000 + 20 + 12 * 2 * 8 * 16


def test_model_flops_count_each_layers_kept_heads():
  # Head pruning: the attention term runs over each layer's kept heads (here 2 + 1 heads of
  # head_dim 4 instead of 2 x 8); the matmul term counts the pruned kernels' own sizes.
  full = models.ModelArgs(vocab_size=50, hidden_size=8, num_layers=2, num_heads=2, mlp_dim=16,
                          max_len=16)
  pruned = dataclasses.replace(full, heads_per_layer=(2, 1))
  for args in (full, pruned):
    shapes = models.abstract_params(models.build(args, "token_cls", 3))[0]
    n = sum(v.size for k, v in tree.flatten(shapes).items() if not k.endswith("embedding"))
    width = 2 * 8 if args is full else (2 + 1) * 4
    assert flops.model_flops_per_token(args, shapes, 16) == 6 * n + 12 * width * 16


def test_combine_metrics_sums_counts_and_weights_means():
  rows = [{"loss": np.float32(1.0), "n": np.int32(3), "weight": np.int32(1)},
          {"loss": np.float32(4.0), "n": np.int32(5), "weight": np.int32(3)}]
  assert train.combine_metrics(rows) == {"loss": 3.25, "n": 8.0, "weight": 4.0}


def test_checkpoint_saved_on_8_devices_restores_on_1_with_same_eval_loss(reference):
  # The reference worker trained 20 steps on the (2, 2, 2) mesh, evaluated, and saved.
  ref_params, _, ref_dir = reference
  want = [r for r in _read_jsonl(ref_dir / "logs" / "metrics.jsonl") if r["kind"] == "eval"]
  assert [r["step"] for r in want] == [20]
  s1 = setup((1, 1, 1), devices=jax.devices()[:1], dropout=DROPOUT, create=False)
  restored, data_state, _ = checkpoint.Checkpointer(ref_dir / "ckpt").restore(s1.abstract)
  assert int(restored.step) == 20 and data_state == {"index": 20}
  assert restored.params["classifier"]["kernel"].sharding.num_devices == 1
  got = train.evaluate(eval_step_fn(s1.module), restored,
                       [synthetic_batch(i, 16) for i in EVAL_SEEDS], s1.batch_sharding)
  assert got["weight"] == 32
  assert got["loss"] == pytest.approx(want[0]["loss"], rel=1e-6)  # f32 sums over 8 shards vs 1
  for k, v in _flat_host(restored.params).items():
    np.testing.assert_array_equal(v, ref_params[20][k], err_msg=k)


# ------------------------------------------------------------------------------- subprocesses

@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
  """A compilation cache shared by the worker processes: the same program is compiled once."""
  return str(tmp_path_factory.mktemp("jax_cache"))


def _env(devices: int, cache: str) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=f"{REPO}{os.pathsep}{REPO}/tests",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def _worker_cmd(workdir, *args):
  return [sys.executable, os.path.abspath(__file__), "--workdir", str(workdir), *map(str, args)]


def _run(cmd, cache, devices=8, timeout=180):
  p = subprocess.run(cmd, env=_env(devices, cache), capture_output=True, text=True, timeout=timeout)
  return p.returncode, p.stdout + p.stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory, jax_cache):
  """The uninterrupted run (a worker on the same 8-device mesh): params after 5 and 20 steps,
  per-step losses, and its directory (an eval row and a final checkpoint at step 20)."""
  d = tmp_path_factory.mktemp("reference")
  rc, out = _run(_worker_cmd(d, "--steps", 20, "--dump-at", 5, "--eval"), jax_cache)
  assert rc == 0, out
  params = {k: dict(np.load(d / f"params{k}.npz")) for k in (5, 20)}
  return params, _losses(_read_jsonl(d / "logs" / "metrics.jsonl")), d


def test_resume_after_sigkill_is_exact(tmp_path, jax_cache, reference):
  # 20 steps; the worker checkpoints every 5 and SIGKILLs itself when fetching the batch of
  # step 13 (after the step-10 save committed); the rerun resumes at 10 and trains 11..20.
  rc, out = _run(_worker_cmd(tmp_path, "--steps", 20, "--save-every", 5, "--kill-at", 12),
                 jax_cache)
  assert rc == -signal.SIGKILL, out
  assert checkpoint.Checkpointer(tmp_path / "ckpt").latest_step() == 10
  killed = _losses(_read_jsonl(tmp_path / "logs" / "metrics.jsonl"))
  assert sorted(killed) == list(range(1, 13))
  rc, out = _run(_worker_cmd(tmp_path, "--steps", 20, "--save-every", 5), jax_cache)
  assert rc == 0, out
  assert "resumed from checkpoint at step 10" in out
  rows = _read_jsonl(tmp_path / "logs" / "metrics.jsonl")
  resumed = _losses(rows[len(killed):])
  assert sorted(resumed) == list(range(11, 21))
  ref_params, ref_losses, _ = reference
  ref_params = ref_params[20]
  assert {**killed, **resumed} == ref_losses                       # bitwise: floats from JSON
  assert {k: killed[k] for k in (11, 12)} == {k: resumed[k] for k in (11, 12)}
  final = dict(np.load(tmp_path / "params20.npz"))
  assert final.keys() == ref_params.keys()
  for k in final:
    np.testing.assert_array_equal(final[k], ref_params[k], err_msg=k)


def test_sigterm_mid_run_leaves_complete_checkpoint_at_current_step(tmp_path, jax_cache):
  cmd = _worker_cmd(tmp_path, "--steps", 20, "--save-every", 0, "--slow", 0.2)
  p = subprocess.Popen(cmd, env=_env(8, jax_cache), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
  try:
    lines = []
    for line in p.stdout:
      lines.append(line)
      if line.startswith("BATCH 5"):
        p.send_signal(signal.SIGTERM)
        break
    out = "".join(lines) + p.communicate(timeout=120)[0]
  finally:
    p.kill()
  assert p.returncode == 0, out
  stopped = int(out.split("PREEMPTED ")[1].split()[0])
  assert 5 <= stopped < 20
  ck = checkpoint.Checkpointer(tmp_path / "ckpt")
  assert ck.all_steps() == [stopped]
  assert checkpoint.invalid_reason(tmp_path / "ckpt" / str(stopped)) is None
  state, data_state, _ = ck.restore(setup(MESH, dropout=DROPOUT, create=False).abstract)
  assert int(state.step) == stopped and data_state == {"index": stopped}


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_of_4_devices_match_one_process_of_8(tmp_path, jax_cache, reference):
  port = _free_port()
  # Each process: 4 devices as a (1, 2, 2) slice; the two processes form the DCN data axis.
  cmds = [_worker_cmd(tmp_path, "--steps", 5, "--mesh", "1,2,2", "--dcn", "2,1,1", "--coordinator",
                      f"localhost:{port}", "--num-processes", 2, "--process-id", i) for i in range(2)]
  procs = [subprocess.Popen(c, env=_env(4, jax_cache), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for c in cmds]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=180)[0])
  finally:
    for p in procs:
      p.kill()
  assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
  ref_params, ref_losses, _ = reference
  ref_params = ref_params[5]
  losses = _losses(_read_jsonl(tmp_path / "logs" / "metrics.jsonl"))
  assert sorted(losses) == list(range(1, 6))
  for k in losses:  # the same sharded program; collectives across processes (gloo) may order sums
    assert losses[k] == pytest.approx(ref_losses[k], rel=1e-6), k
  params = dict(np.load(tmp_path / "params5.npz"))
  for k in params:
    np.testing.assert_allclose(params[k], ref_params[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert checkpoint.Checkpointer(tmp_path / "ckpt").latest_step() == 5


# ------------------------------------------------------------------------------------ worker

class _Interrupting(SyntheticIterator):
  """SIGKILLs its own process when asked for batch `kill_at` (after pending saves commit);
  prints each batch index and sleeps `slow` seconds (for a parent that sends SIGTERM)."""

  def __init__(self, kill_at, slow, ckpt, **kw):
    super().__init__(**kw)
    self.kill_at, self.slow, self.ckpt = kill_at, slow, ckpt

  def __next__(self):
    if self.index == self.kill_at:
      self.ckpt.wait()
      os.kill(os.getpid(), signal.SIGKILL)
    if self.slow:
      print(f"BATCH {self.index}", flush=True)
      time.sleep(self.slow)
    return super().__next__()


def _worker(argv):
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--steps", type=int, required=True)
  ap.add_argument("--save-every", type=int, default=0)
  ap.add_argument("--kill-at", type=int, default=-1)
  ap.add_argument("--slow", type=float, default=0.0)
  ap.add_argument("--mesh", default=",".join(map(str, MESH)))
  ap.add_argument("--dcn", default="1,1,1")
  ap.add_argument("--coordinator")
  ap.add_argument("--num-processes", type=int)
  ap.add_argument("--process-id", type=int)
  ap.add_argument("--eval", action="store_true", help="evaluate at the end (EVAL_SEEDS batches)")
  ap.add_argument("--dump-at", type=int, default=0, help="also write the params at this step")
  a = ap.parse_args(argv)
  distributed.initialize(a.coordinator, a.num_processes, a.process_id)
  s = setup(tuple(int(x) for x in a.mesh.split(",")), dropout=DROPOUT,
            dcn=tuple(int(x) for x in a.dcn.split(",")))
  ck = checkpoint.Checkpointer(os.path.join(a.workdir, "ckpt"), save_every=a.save_every)
  rows = sharding.process_batch_range(s.batch_sharding, 16)
  evals = [{k: v[rows[0]:rows[1]] for k, v in synthetic_batch(i, 16).items()} for i in EVAL_SEEDS]
  eval_step = eval_step_fn(s.module)
  eval_fn = (lambda st: train.evaluate(eval_step, st, evals, s.batch_sharding)) if a.eval else None
  it = _Interrupting(a.kill_at, a.slow, ck, seed=0, batch_size=16, rows=rows)
  state = s.state
  for stop in sorted({a.dump_at, a.steps} - {0}):
    last = stop == a.steps   # an earlier --dump-at segment runs without checkpoints and eval
    res = train.fit(state, s.train_step, it, train_config(), num_steps=stop,
                    batch_sharding=s.batch_sharding, checkpointer=ck if last else None,
                    eval_fn=eval_fn if last else None,
                    logdir=os.path.join(a.workdir, "logs"))
    state = res.state
    params = _flat_host(state.params)          # gathers across processes (all must call)
    if distributed.is_main_process():
      np.savez(os.path.join(a.workdir, f"params{int(state.step)}.npz"), **params)
    if res.preempted:
      break
  ck.close()
  print(f"PREEMPTED {int(state.step)}" if res.preempted else f"DONE {int(state.step)}", flush=True)


if __name__ == "__main__":
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.INFO)
  absl_logging.use_absl_handler()
  _worker(sys.argv[1:])
