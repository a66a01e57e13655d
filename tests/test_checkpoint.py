"""Tests for lib/checkpoint.py and lib/distributed.py: keep, resume, damage, preemption, meshes."""

import glob
import inspect
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lib import checkpoint
from lib import distributed
from lib import preemption

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------ helpers
def _state(k: int) -> dict:
  """Toy train state whose every value is a known function of k (so references are plain numpy)."""
  return {"params": {"w": jnp.asarray(_ref_w(k)), "b": jnp.full((8,), k, jnp.bfloat16)},
          "opt_state": ({"mu": jnp.asarray(_ref_w(k)) * 2}, None), "step": jnp.int32(k)}


def _ref_w(k: int) -> np.ndarray:
  return (np.arange(32, dtype=np.float32).reshape(4, 8) * np.float32(0.25) + np.float32(k))


def _abstract(tree):
  """ShapeDtypeStructs placed like the given arrays (python scalars: left to the Checkpointer)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype,
                                                     sharding=getattr(x, "sharding", None)), tree)


def _assert_state_is(state, k: int) -> None:
  np.testing.assert_array_equal(np.asarray(state["params"]["w"]), _ref_w(k))
  np.testing.assert_array_equal(np.asarray(state["params"]["b"], np.float32),
                                np.full((8,), k, np.float32))
  np.testing.assert_array_equal(np.asarray(state["opt_state"][0]["mu"]), _ref_w(k) * 2)
  assert int(state["step"]) == k


def _save_steps(directory, steps, **kwargs) -> checkpoint.Checkpointer:
  ck = checkpoint.Checkpointer(directory, **kwargs)
  for k in steps:
    assert ck.save(k, _state(k), data_state={"pos": k * 10}, metrics={"loss": 1.0 / k}, force=True)
  ck.wait()
  return ck


def _env(devices: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return env


def _run(code: str, *args, devices: int = 1, timeout: int = 60) -> subprocess.CompletedProcess:
  out = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], cwd=REPO,
                       env=_env(devices), capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, f"rc={out.returncode}\n{out.stdout}\n{out.stderr[-3000:]}"
  return out


# ---------------------------------------------------------------------------- save / restore / keep
def test_roundtrip_restores_latest_with_data_state_and_metrics(tmp_path):
  _save_steps(tmp_path, [1, 2, 3], keep=5).close()
  ck = checkpoint.Checkpointer(tmp_path)
  state, data_state, metrics = ck.restore(_abstract(_state(0)))
  _assert_state_is(state, 3)
  assert data_state == {"pos": 30}
  assert metrics == {"loss": pytest.approx(1 / 3)}
  state1, data_state1, _ = ck.restore(_abstract(_state(0)), step=1)
  _assert_state_is(state1, 1)
  assert data_state1 == {"pos": 10}
  ck.close()


def test_restore_returns_none_for_empty_directory(tmp_path):
  with checkpoint.Checkpointer(tmp_path / "fresh") as ck:
    assert ck.restore(_abstract(_state(0))) is None
    assert ck.latest_step() is None and ck.best_step() is None


def test_flax_train_state_with_optax_roundtrip(tmp_path):
  optax = pytest.importorskip("optax")
  from flax.training import train_state
  params = {"dense": {"kernel": jnp.asarray(_ref_w(1)), "bias": jnp.zeros((8,))}}
  tx = optax.adamw(1e-2)
  ts = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
  grads = jax.tree.map(jnp.ones_like, params)
  ts = ts.apply_gradients(grads=grads)  # non-trivial mu/nu/count
  with checkpoint.Checkpointer(tmp_path) as ck:
    ck.save(1, ts, force=True)
  zeros = jax.tree.map(jnp.zeros_like, params)
  fresh = train_state.TrainState.create(apply_fn=None, params=zeros, tx=tx)
  with checkpoint.Checkpointer(tmp_path) as ck:
    restored, _, _ = ck.restore(_abstract(fresh))
  assert type(restored) is type(ts) and int(restored.step) == 1
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(ts)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("mode,values,best", [("max", [0.1, 0.9, 0.3, 0.2, 0.5, 0.4], 2),
                                              ("min", [0.5, 0.4, 0.1, 0.2, 0.1, 0.3], 3)])
def test_keeps_last_k_and_best(tmp_path, mode, values, best):
  ck = checkpoint.Checkpointer(tmp_path, keep=2, best_metric="acc", best_mode=mode)
  for step, value in enumerate(values, start=1):
    ck.save(step, _state(step), metrics={"acc": value, "other": 1.0}, force=True)
  ck.wait()
  assert ck.all_steps() == sorted({best, 5, 6})
  assert ck.best_step() == best  # ties (min mode: 0.1 at steps 3 and 5) keep the earliest
  on_disk = sorted(int(p) for p in os.listdir(tmp_path) if p.isdigit())
  assert on_disk == sorted({best, 5, 6})
  ck.close()
  reopened = checkpoint.Checkpointer(tmp_path, keep=2, best_metric="acc", best_mode=mode)
  assert reopened.best_step() == best  # from the metrics stored on disk


def test_save_every_force_and_step_order(tmp_path):
  ck = checkpoint.Checkpointer(tmp_path, keep=10, save_every=3)
  saved = [s for s in range(1, 8) if ck.save(s, _state(s))]
  assert saved == [3, 6]
  assert ck.save(7, _state(7), force=True)
  assert not ck.save(7, _state(7), force=True)  # same step again: final save after a periodic one
  with pytest.raises(ValueError, match="already has step 7"):
    ck.save(5, _state(5), force=True)
  metrics = {"vec": np.ones(3), "report": "text", "f1": np.float32(0.5)}
  assert ck.save(8, _state(8), metrics=metrics, force=True)
  ck.wait()
  assert ck.restore(_abstract(_state(0)))[2] == {"f1": 0.5}  # non-scalars skipped (with a warning)
  with pytest.raises(ValueError, match="data_state"):
    ck.save(9, _state(9), data_state={"blob": b"raw"}, force=True)
  ck.close()
  assert checkpoint.Checkpointer(tmp_path).all_steps() == [3, 6, 7, 8]


def test_async_save_is_safe_against_buffer_donation(tmp_path):
  ck = checkpoint.Checkpointer(tmp_path, async_save=True)
  state = _state(4)
  bump = jax.jit(lambda s: jax.tree.map(lambda x: x + 100, s), donate_argnums=0)
  ck.save(4, state, force=True)
  for _ in range(3):
    state = bump(state)  # overwrites (donates) the buffers the save copied from
  ck.close()
  restored, _, _ = checkpoint.Checkpointer(tmp_path).restore(_abstract(_state(0)))
  _assert_state_is(restored, 4)


def test_target_mismatch_is_an_error_not_corruption(tmp_path):
  _save_steps(tmp_path, [1, 2]).close()
  ck = checkpoint.Checkpointer(tmp_path)
  wrong = _state(0)
  wrong["params"]["w"] = jnp.zeros((4, 9))
  with pytest.raises(ValueError, match=r"params/w: checkpoint \(4, 8\), target \(4, 9\)"):
    ck.restore(_abstract(wrong))
  extra = dict(_state(0), extra=jnp.zeros(3))
  with pytest.raises(ValueError, match="not in the checkpoint.*extra"):
    ck.restore(_abstract(extra))
  assert ck.all_steps() == [1, 2]  # nothing set aside
  ck.close()


class _ShuffledBatches:
  """Toy data iterator with get_state/set_state: epoch-seeded permutations of 10, batches of 3."""

  def __init__(self):
    self.epoch, self.pos = 0, 0

  def __next__(self) -> np.ndarray:
    order = np.random.default_rng(self.epoch).permutation(10)
    if self.pos + 3 > 10:
      self.epoch, self.pos = self.epoch + 1, 0
      order = np.random.default_rng(self.epoch).permutation(10)
    batch = order[self.pos:self.pos + 3]
    self.pos += 3
    return batch

  def get_state(self) -> dict:
    return {"epoch": self.epoch, "pos": self.pos}

  def set_state(self, state: dict) -> None:
    self.epoch, self.pos = state["epoch"], state["pos"]


def _toy_run(directory, stop_at: int, total: int = 11):
  """A fit-loop in miniature: resume if possible, train to `stop_at` (preempted) or `total`."""
  update = jax.jit(lambda w, b: w * 0.5 + jnp.sum(b).astype(jnp.float32))
  data, seen = _ShuffledBatches(), []
  w, start = jnp.zeros(()), 0
  with checkpoint.Checkpointer(directory, save_every=4) as ck:
    restored = ck.restore({"w": jax.ShapeDtypeStruct((), jnp.float32)})
    if restored is not None:
      (state, data_state, _), start = restored, ck.latest_step()
      w = state["w"]
      data.set_state(data_state)
    for step in range(start + 1, total + 1):
      batch = next(data)
      seen.append(batch.tolist())
      w = update(w, batch)
      if step == stop_at:  # what the preemption branch does
        ck.save(step, {"w": w}, data_state=data.get_state, force=True)
        return seen, w
      ck.save(step, {"w": w}, data_state=data.get_state)
  return seen, w


def test_resumed_run_sees_the_same_batches_as_an_uninterrupted_one(tmp_path):
  reference_batches, reference_w = _toy_run(tmp_path / "a", stop_at=-1)
  first, _ = _toy_run(tmp_path / "b", stop_at=6)  # periodic save at 4, preempted at 6
  second, w = _toy_run(tmp_path / "b", stop_at=-1)
  assert first + second == reference_batches
  assert float(w) == float(reference_w)


# ---------------------------------------------------------------------------- corruption / fallback
def _truncate(path: str, keep_fraction: float = 0.5) -> None:
  with open(path, "r+b") as f:
    f.truncate(int(os.path.getsize(path) * keep_fraction))


def _truncate_state_files(step_dir: str) -> None:
  for path in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True):
    if os.path.isfile(path) and "commit_success" not in path:
      _truncate(path)


def _swap_state_from_step(step_dir: str) -> None:
  """Complete, readable arrays with the wrong values: only the fingerprints can tell."""
  other = os.path.join(os.path.dirname(step_dir), "1", "state")
  shutil.rmtree(os.path.join(step_dir, "state"))
  shutil.copytree(other, os.path.join(step_dir, "state"))


CORRUPTIONS = {
    "truncated_state_files": _truncate_state_files,
    "truncated_largest_data_file": lambda d: _truncate(
        max(glob.glob(f"{d}/state/**/d/*", recursive=True), key=os.path.getsize), 0.3),
    "no_commit_marker": lambda d: os.remove(os.path.join(d, "commit_success.txt")),
    "truncated_step_metadata": lambda d: _truncate(os.path.join(d, "_CHECKPOINT_METADATA")),
    "truncated_data_state_json": lambda d: _truncate(os.path.join(d, "data_state", "metadata")),
    "missing_state_item": lambda d: shutil.rmtree(os.path.join(d, "state")),
    "values_swapped": _swap_state_from_step,
}


_SAVE_STEPS_WORKER = """
import sys
import jax.numpy as jnp, numpy as np
from lib import checkpoint
{helpers}
ck = checkpoint.Checkpointer(sys.argv[1], keep=3)
for k in (1, 2, 3):
  ck.save(k, _state(k), data_state={{"pos": k * 10}}, metrics={{"loss": 1.0 / k}}, force=True)
ck.close()
"""


@pytest.fixture(scope="module")
def saved_in_other_process(tmp_path_factory):
  """Steps 1-3 written by another process.

  tensorstore caches what this process wrote, which would hide on-disk damage from an in-process
  restore (a resumed run is always a fresh process).
  """
  directory = tmp_path_factory.mktemp("saved") / "ck"
  helpers = inspect.getsource(_ref_w) + inspect.getsource(_state)
  _run(_SAVE_STEPS_WORKER.format(helpers=helpers), directory)
  return directory


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_latest_is_skipped_with_warning(tmp_path, caplog, corruption,
                                                saved_in_other_process):
  shutil.copytree(saved_in_other_process, tmp_path, dirs_exist_ok=True)
  CORRUPTIONS[corruption](str(tmp_path / "3"))
  caplog.set_level("WARNING")
  ck = checkpoint.Checkpointer(tmp_path, keep=3)
  state, data_state, _ = ck.restore(_abstract(_state(0)))
  _assert_state_is(state, 2)
  assert data_state == {"pos": 20}
  assert "step 3" in caplog.text and ("corrupted" in caplog.text)
  assert ck.all_steps() == [1, 2]
  assert glob.glob(str(tmp_path / "3.corrupt-*")), "bad step is kept aside, not deleted"
  assert ck.save(3, _state(3), force=True)  # the run can re-save the step it falls back over
  ck.close()


def test_half_written_save_is_ignored_with_warning(tmp_path, caplog):
  _save_steps(tmp_path, [1, 2]).close()
  shutil.copytree(tmp_path / "2", tmp_path / "3.orbax-checkpoint-tmp")  # killed before the rename
  os.remove(tmp_path / "3.orbax-checkpoint-tmp" / "commit_success.txt")
  caplog.set_level("WARNING")
  with checkpoint.Checkpointer(tmp_path) as ck:
    assert "step 3" in caplog.text and "half-written" in caplog.text
    assert ck.latest_step() == 2
    state, _, _ = ck.restore(_abstract(_state(0)))
    _assert_state_is(state, 2)
    assert ck.save(3, _state(3), force=True)


def test_explicit_corrupt_step_raises(tmp_path, saved_in_other_process):
  shutil.copytree(saved_in_other_process, tmp_path, dirs_exist_ok=True)
  _swap_state_from_step(str(tmp_path / "2"))
  with checkpoint.Checkpointer(tmp_path) as ck:
    with pytest.raises(checkpoint.CorruptCheckpointError, match="fingerprints"):
      ck.restore(_abstract(_state(0)), step=2)
    assert ck.all_steps() == [1, 2, 3]  # an explicit request raises; nothing is moved


def test_all_corrupt_returns_none(tmp_path, caplog, saved_in_other_process):
  shutil.copytree(saved_in_other_process, tmp_path, dirs_exist_ok=True)
  for step in (1, 2, 3):
    _truncate_state_files(str(tmp_path / str(step)))
  with checkpoint.Checkpointer(tmp_path) as ck:
    assert ck.restore(_abstract(_state(0))) is None
  assert all(f"step {k}" in caplog.text for k in (1, 2, 3))


# ----------------------------------------------------------------------- best-checkpoint fallback
def _warnings_naming(caplog, step: int) -> list:
  return [r for r in caplog.records if r.levelname == "WARNING" and f"step {step} " in r.message]


@pytest.mark.parametrize("corruption", ["truncated_largest_data_file", "values_swapped"])
def test_corrupt_best_falls_back_to_next_best_and_is_set_aside(tmp_path, caplog, corruption,
                                                               saved_in_other_process):
  shutil.copytree(saved_in_other_process, tmp_path, dirs_exist_ok=True)  # loss 1, 1/2, 1/3
  CORRUPTIONS[corruption](str(tmp_path / "3"))
  caplog.set_level("INFO")
  with checkpoint.Checkpointer(tmp_path, keep=3, best_metric="loss", best_mode="min") as ck:
    assert ck.best_step() == 3  # damage is found on reading, not on opening
    state, step, note = ck.restore_best(_state(9), 9)
    _assert_state_is(state, 2)
    assert step == 2 and ck.all_steps() == [1, 2]
  moved = glob.glob(str(tmp_path / "3.corrupt-*"))
  assert len(moved) == 1, "the bad step is kept aside, not deleted"
  assert note.startswith("best step 3 by loss could not be restored (")
  assert note.endswith(f"set aside as {os.path.basename(moved[0])}; using step 2 (next best by loss)")
  assert "\n" not in note and len(_warnings_naming(caplog, 3)) == 1


def test_best_damaged_on_open_is_named_in_the_note(tmp_path, saved_in_other_process):
  shutil.copytree(saved_in_other_process, tmp_path, dirs_exist_ok=True)
  CORRUPTIONS["no_commit_marker"](str(tmp_path / "3"))
  with checkpoint.Checkpointer(tmp_path, keep=3, best_metric="loss", best_mode="min") as ck:
    assert ck.best_step() == 2  # step 3 was set aside by the directory scan
    state, step, note = ck.restore_best(_state(9), 9)
  _assert_state_is(state, 2)
  assert step == 2 and "best step 3 by loss could not be restored (no commit_success" in note


def test_all_corrupt_best_gives_the_final_state_with_a_note(tmp_path, caplog,
                                                            saved_in_other_process):
  shutil.copytree(saved_in_other_process, tmp_path, dirs_exist_ok=True)
  for step in (3, 2):
    _swap_state_from_step(str(tmp_path / str(step)))  # step 1's values under steps 2 and 3
  CORRUPTIONS["truncated_largest_data_file"](str(tmp_path / "1"))
  final = _state(9)
  with checkpoint.Checkpointer(tmp_path, keep=3, best_metric="loss", best_mode="min") as ck:
    state, step, note = ck.restore_best(final, 9)
    assert ck.all_steps() == []
  assert state is final and step == 9
  assert note.startswith("best steps 3, 2, 1 by loss could not be restored (3: values differ")
  assert note.endswith("using step 9 (the final state: no other checkpoint with loss remained)")
  assert all(len(_warnings_naming(caplog, k)) == 1 for k in (1, 2, 3))


def test_best_final_step_or_no_metric_reads_nothing(tmp_path, saved_in_other_process):
  shutil.copytree(saved_in_other_process, tmp_path, dirs_exist_ok=True)
  _swap_state_from_step(str(tmp_path / "3"))  # damaged, but the final state is in memory
  final = _state(3)
  with checkpoint.Checkpointer(tmp_path, keep=3, best_metric="loss", best_mode="min") as ck:
    assert ck.restore_best(final, 3) == (final, 3, None)
  with checkpoint.Checkpointer(tmp_path, keep=3, best_metric="f1") as ck:  # never measured
    assert ck.restore_best(final, 3) == (final, 3, None)
    assert ck.all_steps() == [1, 2, 3]


_NOISE_WORKER = """
  import asyncio, contextlib, gc, sys, time
  import jax.numpy as jnp, numpy as np
  from absl import logging
  from lib import checkpoint

  def state(k):  # random values: stored in data files (constant or tiny arrays are inlined)
    rng = np.random.default_rng(k)
    return {f"w{i}": jnp.asarray(rng.normal(size=(64, 64)), jnp.float32) for i in range(8)}

  directory, mode = sys.argv[1], sys.argv[2]
  if mode == "save":
    with checkpoint.Checkpointer(directory, keep=4, best_metric="acc") as ck:
      for k, acc in ((1, 0.5), (2, 0.9), (3, 0.8), (4, 0.6)):
        ck.save(k, state(k), metrics={"acc": acc}, force=True)
    sys.exit(0)
  logging.use_absl_handler()  # as under absl.app.run (the research scripts): INFO to stderr
  logging.set_verbosity(logging.INFO)
  # Healthy reads end after the failing one, so orbax abandons them when it gives up: the race a
  # busy machine produces, where each abandoned read prints a ~60-line traceback.
  from orbax.checkpoint._src.serialization import serialization
  read_shard = serialization._read_shard
  async def slow_read_shard(*args, **kwargs):
    shard = await read_shard(*args, **kwargs)
    await asyncio.sleep(0.5)
    return shard
  serialization._read_shard = slow_read_shard
  if mode == "loud":  # without holding reports back
    held = type("Held", (), {"drop": False, "count": 0})()
    checkpoint._HeldBack = lambda: contextlib.nullcontext(held)
  ck = checkpoint.Checkpointer(directory, keep=4, best_metric="acc")
  _, step, _ = ck.restore_best(state(4), 4)
  ck.close()
  for _ in range(3):  # late reports would come now
    time.sleep(0.3)
    gc.collect()
  print("USED", step)
"""


def test_fallback_prints_one_warning_not_orbax_tracebacks(tmp_path):
  _run(_NOISE_WORKER, tmp_path / "ck", "save")
  data = glob.glob(str(tmp_path / "ck" / "2" / "state" / "ocdbt.process_0" / "d" / "*"))
  lines = {}
  for mode in ("loud", "quiet"):
    shutil.rmtree(tmp_path / mode, ignore_errors=True)
    shutil.copytree(tmp_path / "ck", tmp_path / mode)
    _truncate(max(data, key=os.path.getsize).replace(str(tmp_path / "ck"), str(tmp_path / mode)),
              0.3)
    out = _run(_NOISE_WORKER, tmp_path / mode, mode)
    assert "USED 3" in out.stdout  # best 2 damaged, 3 next best
    lines[mode] = out.stderr.splitlines()
  assert len(lines["loud"]) > 100, "\n".join(lines["loud"])  # the flood this test guards against
  assert len(lines["quiet"]) <= 6, "\n".join(lines["quiet"])
  warnings = [l for l in lines["quiet"] if re.match(r"W\d{4} ", l)]  # absl's WARNING lines
  assert len(warnings) == 1 and "checkpoint step 2 in " in warnings[0]
  hidden = int(warnings[0].split(" orbax/tensorstore failure reports")[0].rsplit("[", 1)[1])
  assert hidden >= 1


def test_fingerprint_is_sharding_independent_and_sensitive():
  x = np.arange(64, dtype=np.float32).reshape(8, 8)
  base = checkpoint.fingerprints({"x": jnp.asarray(x)})["x"]["fp"]
  mesh = jax.make_mesh((len(jax.devices()),), ("d",))
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))
  assert checkpoint.fingerprints({"x": sharded})["x"]["fp"] == base
  swapped = x.copy()
  swapped[0, 0], swapped[0, 1] = x[0, 1], x[0, 0]  # same multiset of values, different positions
  assert checkpoint.fingerprints({"x": jnp.asarray(swapped)})["x"]["fp"] != base
  flipped = x.copy()
  flipped.view(np.uint32)[3, 3] ^= 1  # one bit
  assert checkpoint.fingerprints({"x": jnp.asarray(flipped)})["x"]["fp"] != base


# -------------------------------------------------------------------------------------- params-only
def test_restore_params_from_run_dir_and_step_dir(tmp_path):
  _save_steps(tmp_path / "run", [1, 2]).close()
  abstract_params = _abstract(_state(0)["params"])
  params = checkpoint.restore_params(tmp_path / "run", abstract_params)
  np.testing.assert_array_equal(np.asarray(params["w"]), _ref_w(2))
  assert set(params) == {"w", "b"}
  params1 = checkpoint.restore_params(tmp_path / "run" / "1", {"w": abstract_params["w"]})
  np.testing.assert_array_equal(np.asarray(params1["w"]), _ref_w(1))
  with pytest.raises(ValueError, match="not in the checkpoint.*params/head"):
    checkpoint.restore_params(tmp_path / "run", dict(abstract_params, head=abstract_params["w"]))
  with pytest.raises(ValueError, match="no saved subtree"):
    checkpoint.restore_params(tmp_path / "run", abstract_params, subtree="ema_params")


# --------------------------------------------------------------------------------------- preemption
def test_sigint_sets_flag_and_uninstall_restores_handler():
  # Python's own Ctrl-C handler underneath, whatever an earlier test in this worker left there
  # (the second Ctrl-C is handed to the previous handler).
  outer = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    handler = preemption.install_preemption_handler()
    try:
      assert not handler.preempted()
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.05)
      assert handler.preempted() and handler.received == signal.SIGINT
      with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C still interrupts
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
    finally:
      handler.uninstall()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    signal.signal(signal.SIGINT, outer)


_SIGTERM_WORKER = """
  import sys, time
  import jax, jax.numpy as jnp
  from lib import checkpoint
  directory, progress = sys.argv[1], sys.argv[2]
  ck = checkpoint.Checkpointer(directory, keep=2, save_every=1000)
  ck.install_preemption_handler()
  state = {"w": jnp.zeros((4, 8), jnp.float32), "n": jnp.zeros((), jnp.int32),
           "h": jnp.zeros((3,), jnp.bfloat16)}
  update = jax.jit(lambda s: {"w": s["w"] + 1.0, "n": s["n"] + 1, "h": s["h"] + 1},
                   donate_argnums=0)
  for step in range(1, 250):
    state = update(state)
    if step == 3:
      ck.save(step, state, data_state={"pos": step}, force=True)
    with open(progress, "w") as f:
      f.write(str(step))
    if ck.preempted(step):
      ck.save(step, state, data_state=lambda: {"pos": step}, force=True)
      ck.close()
      print("PREEMPTED", step)
      sys.exit(0)
    time.sleep(0.01)
  sys.exit(3)
"""


def test_sigterm_mid_run_leaves_complete_checkpoint_at_current_step(tmp_path):
  progress = tmp_path / "progress"
  proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_SIGTERM_WORKER),
                           str(tmp_path / "ck"), str(progress)], cwd=REPO, env=_env(1),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 40
  while time.time() < deadline and not (progress.exists() and progress.read_text().strip() and
                                        int(progress.read_text()) >= 6):
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.02)
  signalled_at = int(progress.read_text())
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=40)
  assert proc.returncode == 0, stderr[-3000:]
  step = int(stdout.split("PREEMPTED")[1].split()[0])
  assert step >= signalled_at
  with checkpoint.Checkpointer(tmp_path / "ck") as ck:
    assert ck.all_steps() == [3, step]
    abstract = {"w": jax.ShapeDtypeStruct((4, 8), jnp.float32),
                "n": jax.ShapeDtypeStruct((), jnp.int32),
                "h": jax.ShapeDtypeStruct((3,), jnp.bfloat16)}
    state, data_state, _ = ck.restore(abstract)
  np.testing.assert_array_equal(np.asarray(state["w"]), np.full((4, 8), step, np.float32))
  assert int(state["n"]) == step and data_state == {"pos": step}
  np.testing.assert_array_equal(np.asarray(state["h"], np.float32), np.full((3,), step, np.float32))


# ------------------------------------------------------------------------------------- mesh changes
_SAVE_ON_8 = """
  import sys
  import jax, numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from lib import checkpoint
  assert jax.device_count() == 8, jax.devices()
  mesh = jax.make_mesh((4, 2), ("data", "model"))
  w = np.arange(16 * 6, dtype=np.float32).reshape(16, 6) / 7
  v = (np.arange(10, dtype=np.int32) * 3 - 7)
  state = {"params": {"w": jax.device_put(w, NamedSharding(mesh, P("data", "model"))),
                      "v": jax.device_put(v, NamedSharding(mesh, P("model")))},
           "step": jax.device_put(np.int32(5), NamedSharding(mesh, P()))}
  assert len(state["params"]["w"].sharding.device_set) == 8
  with checkpoint.Checkpointer(sys.argv[1]) as ck:
    ck.save(5, state, data_state={"epoch": 1}, force=True)
"""

_RESTORE_ON_1 = """
  import sys, os
  import jax, jax.numpy as jnp, numpy as np
  from lib import checkpoint
  assert jax.device_count() == 1, jax.devices()
  one = jax.sharding.NamedSharding(jax.make_mesh((1,), ("data",)), jax.sharding.PartitionSpec())
  abstract = {"params": {"w": jax.ShapeDtypeStruct((16, 6), jnp.float32, sharding=one),
                         "v": jax.ShapeDtypeStruct((10,), jnp.int32, sharding=one)},
              "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=one)}
  with checkpoint.Checkpointer(sys.argv[1]) as ck:
    state, data_state, _ = ck.restore(abstract)
  assert data_state == {"epoch": 1}, data_state
  leaves = [("w", state["params"]["w"]), ("v", state["params"]["v"]), ("step", state["step"])]
  for name, x in leaves:
    assert x.sharding == one
    np.save(os.path.join(sys.argv[2], name + ".npy"), np.asarray(x))
  p = checkpoint.restore_params(sys.argv[1], {"w": abstract["params"]["w"]})
  np.save(os.path.join(sys.argv[2], "w_params_only.npy"), np.asarray(p["w"]))
"""


def test_saved_on_8_devices_restores_on_1_bitwise(tmp_path):
  _run(_SAVE_ON_8, tmp_path / "ck", devices=8)
  out = tmp_path / "out"
  out.mkdir()
  _run(_RESTORE_ON_1, tmp_path / "ck", out, devices=1)
  w = np.arange(16 * 6, dtype=np.float32).reshape(16, 6) / 7  # independent reference, same recipe
  for name in ("w", "w_params_only"):
    got = np.load(out / f"{name}.npy")
    assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), w.view(np.uint32))
  np.testing.assert_array_equal(np.load(out / "v.npy"), np.arange(10, dtype=np.int32) * 3 - 7)
  assert int(np.load(out / "step.npy")) == 5


# --------------------------------------------------------------------------------------- multi-host
_TWO_PROCESS_WORKER = """
  import os, signal, sys, time
  from lib import distributed
  assert distributed.initialize()
  import jax, numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from lib import checkpoint
  pid = jax.process_index()
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  w0 = np.arange(32, dtype=np.float32).reshape(8, 4)
  w = jax.make_array_from_callback((8, 4), sharding, lambda idx: w0[idx])
  update = jax.jit(lambda x: x + 1.0, out_shardings=sharding)
  ck = checkpoint.Checkpointer(sys.argv[1], keep=2, save_every=3)
  ck.install_preemption_handler()
  for step in range(1, 400):
    w = update(w)
    ck.save(step, {"w": w}, data_state={"shard": pid, "pos": step})  # periodic, every 3 steps
    if pid == 1 and step == 5:
      os.kill(os.getpid(), signal.SIGTERM)  # only one host is told
    if ck.preempted(step):
      ck.save(step, {"w": w}, data_state={"shard": pid, "pos": step}, force=True)
      ck.close()
      print("PREEMPTED", step, "main" if distributed.is_main_process() else "other", flush=True)
      sys.exit(0)
    time.sleep(0.02)
  sys.exit(3)
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_agree_on_preemption_step_and_save_together(tmp_path):
  port = _free_port()
  procs = []
  for pid in range(2):
    env = dict(_env(2), WORKBENCH_COORDINATOR=f"localhost:{port}", WORKBENCH_NUM_PROCESSES="2",
               WORKBENCH_PROCESS_ID=str(pid))
    cmd = [sys.executable, "-c", textwrap.dedent(_TWO_PROCESS_WORKER), str(tmp_path)]
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  outs = [p.communicate(timeout=90) for p in procs]
  for p, (stdout, stderr) in zip(procs, outs):
    assert p.returncode == 0, stderr[-3000:]
  steps = [int(stdout.split("PREEMPTED")[1].split()[0]) for stdout, _ in outs]
  assert steps[0] == steps[1] >= 5, steps
  step = steps[0]
  on_disk = sorted(int(p) for p in os.listdir(tmp_path) if p.isdigit())
  assert on_disk == [3 * ((step - 1) // 3), step] if step % 3 else [step - 3, step], on_disk
  with open(tmp_path / str(step) / "data_state" / "metadata") as f:
    assert json.load(f)["per_process"] == [{"shard": 0, "pos": step}, {"shard": 1, "pos": step}]
  with checkpoint.Checkpointer(tmp_path) as ck:  # this single process restores the 4-device save
    state, data_state, _ = ck.restore({"w": jax.ShapeDtypeStruct((8, 4), jnp.float32)})
  expected = np.arange(32, dtype=np.float32).reshape(8, 4) + step
  np.testing.assert_array_equal(np.asarray(state["w"]), expected)
  assert data_state is None  # per-process iterator states cannot be mapped onto one process


def test_distributed_single_process_is_noop_and_incomplete_config_raises(monkeypatch):
  for var in ("WORKBENCH_COORDINATOR", "WORKBENCH_NUM_PROCESSES", "WORKBENCH_PROCESS_ID",
              "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES",
              "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(var, raising=False)
  assert distributed.detected_cluster() is None
  assert distributed.initialize() is False
  assert distributed.initialize(num_processes=1) is False
  assert distributed.is_main_process()
  with pytest.raises(ValueError, match="missing .*process_id"):
    distributed.initialize(coordinator_address="localhost:1234", num_processes=2)
  monkeypatch.setenv("WORKBENCH_PROCESS_ID", "x")
  with pytest.raises(ValueError, match="WORKBENCH_PROCESS_ID"):
    distributed.initialize()
  monkeypatch.setenv("SLURM_JOB_ID", "7")
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert distributed.detected_cluster() == "slurm"


def test_late_orbax_reports_are_dropped_and_others_kept(caplog):
  """Reads orbax abandoned may end after the held window (a slow machine): the asyncio logger's
  'Task exception was never retrieved' for an orbax coroutine is dropped, any other record kept."""
  import logging as std_logging
  checkpoint._LateReports.install()
  late = ("Task exception was never retrieved\nfuture: <Task finished coro=<async_deserialize() "
          "done, defined at /venv/site-packages/orbax/checkpoint/_src/serialization.py:394>>")
  with caplog.at_level(std_logging.ERROR, logger="asyncio"):
    std_logging.getLogger("asyncio").error(late)
    std_logging.getLogger("asyncio").error("Task exception was never retrieved: <Task coro=<mine()>>")
  assert [r.getMessage() for r in caplog.records] == [
      "Task exception was never retrieved: <Task coro=<mine()>>"]
