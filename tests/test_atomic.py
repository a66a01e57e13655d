"""lib/atomic.py: outputs never replace their source or a run's outputs, a non-empty destination
only with overwrite, and written files and directories get the umask's ordinary modes."""

import json
import os
import stat

import numpy as np
import pytest

from lib import atomic, errors, peft
from lib.models import ModelArgs


def _write(out_dir, name="new.txt", text="new", **kw):
  with atomic.directory(str(out_dir), **kw) as tmp:
    with open(os.path.join(tmp, name), "w") as f:
      f.write(text)


def _tree(path) -> dict:
  """{relative path: bytes} of every file under `path`."""
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      out[os.path.relpath(full, path)] = open(full, "rb").read()
  return out


def _mode(path) -> int:
  return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_modes_follow_the_umask(tmp_path, mask):
  old = os.umask(mask)
  try:
    assert atomic.umask() == mask
    _write(tmp_path / "out")
    atomic.write_bytes(str(tmp_path / "file.bin"), b"x")
  finally:
    os.umask(old)
  # What plain mkdir/open give under the umask (mkdtemp/mkstemp would give 0700/0600).
  assert _mode(tmp_path / "out") == 0o777 & ~mask
  assert _mode(tmp_path / "out" / "new.txt") == 0o666 & ~mask
  assert _mode(tmp_path / "file.bin") == 0o666 & ~mask


def test_refuses_its_own_source_and_nested_paths(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  (src / "a.txt").write_text("keep")
  for dst in (src, tmp_path / "." / "src", src / "inner", tmp_path):
    with pytest.raises(atomic.OutputExistsError, match=str(src)) as e:
      _write(dst, sources=[str(src)], overwrite=True)
    assert "\n" not in str(e.value)
  assert _tree(src) == {"a.txt": b"keep"}
  assert sorted(os.listdir(tmp_path)) == ["src"]   # no temporary directory left behind


def test_non_empty_destination_needs_overwrite(tmp_path):
  dst = tmp_path / "dst"
  dst.mkdir()
  (dst / "old.txt").write_text("old")
  with pytest.raises(atomic.OutputExistsError, match="overwrite") as e:
    _write(dst)
  assert isinstance(e.value, errors.UserError) and isinstance(e.value, ValueError)
  assert _tree(dst) == {"old.txt": b"old"}
  _write(dst, overwrite=True)
  assert _tree(dst) == {"new.txt": b"new"}
  (tmp_path / "empty").mkdir()
  _write(tmp_path / "empty")       # an empty directory holds nothing to lose
  assert _tree(tmp_path / "empty") == {"new.txt": b"new"}


@pytest.mark.parametrize("marker", ["checkpoints", "metrics.json", "metrics.jsonl", ".git"])
def test_run_outputs_are_never_replaced_even_with_overwrite(tmp_path, marker):
  dst = tmp_path / "run"
  dst.mkdir()
  if marker in ("checkpoints", ".git"):
    (dst / marker).mkdir()
    (dst / marker / "1").write_text("state")
  else:
    (dst / marker).write_text("{}")
  before = _tree(dst)
  with pytest.raises(atomic.OutputExistsError, match=f"never replaced.*{marker}"):
    _write(dst, overwrite=True)
  assert _tree(dst) == before


def test_current_directory_and_its_parents_are_never_replaced(tmp_path, monkeypatch):
  work = tmp_path / "a" / "b"
  work.mkdir(parents=True)
  monkeypatch.chdir(work)
  for dst in (work, tmp_path / "a"):
    with pytest.raises(atomic.OutputExistsError, match="current directory"):
      _write(dst, overwrite=True)
  assert work.is_dir()


def test_a_failed_write_leaves_the_old_directory(tmp_path):
  dst = tmp_path / "dst"
  _write(dst, text="v1")
  with pytest.raises(RuntimeError):
    with atomic.directory(str(dst), overwrite=True) as tmp:
      open(os.path.join(tmp, "new.txt"), "w").write("v2")
      raise RuntimeError("crash")
  assert _tree(dst) == {"new.txt": b"v1"}
  assert sorted(os.listdir(tmp_path)) == ["dst"]


def test_save_adapter_refuses_an_existing_adapter_unless_overwrite(tmp_path):
  params = {"w": np.ones((2, 2), np.float32), "lora_a": np.full((2, 1), 3.0, np.float32)}
  labels = {"w": "freeze", "lora_a": "train"}
  out = str(tmp_path / "adapter")
  peft.save_adapter(out, params, labels, ModelArgs(), source_step=7)
  with pytest.raises(atomic.OutputExistsError, match="adapter"):
    peft.save_adapter(out, params, labels, ModelArgs())
  params["lora_a"] = params["lora_a"] * 2
  peft.save_adapter(out, params, labels, ModelArgs(), overwrite=True, source_step=8)
  loaded = peft.load_adapter(out, {"w": np.zeros((2, 2), np.float32),
                                   "lora_a": np.zeros((2, 1), np.float32)})
  np.testing.assert_array_equal(loaded["lora_a"], np.full((2, 1), 6.0))
  np.testing.assert_array_equal(loaded["w"], np.zeros((2, 2)))
  assert json.load(open(os.path.join(out, "adapter.json")))["source_step"] == 8
