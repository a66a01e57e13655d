"""Atomic writes: a file or a whole directory appears complete, or not at all, and never in the
place of a source or a run's outputs."""

import contextlib
import io
import os
import shutil
import tempfile
from typing import Optional, Sequence

from lib import errors

# What marks a directory as a run's outputs (never replaced, even with overwrite=True).
RUN_MARKERS = ("checkpoints", "metrics.json", "metrics.jsonl")


class OutputExistsError(errors.UserError, ValueError):
  """An output directory would replace its own source, a non-empty directory without
  overwrite=True, or a run's checkpoints and results (never replaced)."""


def umask() -> int:
  """The process umask, read without changing it where the platform allows (Linux /proc).

  Setting and restoring it would briefly give 0 to other threads (orbax writes from threads).
  """
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except OSError:
    pass
  old = os.umask(0o022)
  os.umask(old)
  return old


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to a temp file beside `path`, fsyncs, then os.replace()s it: readers never see
  half a file. The file gets the mode a plain open() would (0o666 minus the umask)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  # Same directory as the target so os.replace is a rename on one filesystem (atomic on POSIX).
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~umask())  # mkstemp creates 0600: others could not read results
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_npz(path: str, **arrays) -> None:
  """`np.savez(path, **arrays)`, atomically (write_bytes)."""
  import numpy as np  # pylint: disable=g-import-not-at-top  # the rest of this module needs none
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  write_bytes(path, buf.getvalue())


def _run_outputs(path: str) -> Optional[str]:
  """Why `path` must never be deleted (a run's checkpoints or results, a repository), or None."""
  found = [m for m in RUN_MARKERS + (".git",) if os.path.exists(os.path.join(path, m))]
  if found:
    return f"it holds {' and '.join(found)} (a run's checkpoints or results)"
  real, cwd = os.path.realpath(path), os.path.realpath(os.getcwd())
  for name, place in (("the current directory", cwd),
                      ("the home directory", os.path.realpath(os.path.expanduser("~")))):
    if place == real or place.startswith(real.rstrip(os.sep) + os.sep):
      return f"it is or contains {name}"
  return None


def _inside(inner: str, outer: str) -> bool:
  return inner.startswith(outer.rstrip(os.sep) + os.sep)


def check_output(out_dir: str, *, sources: Sequence[str] = (), overwrite: bool = False) -> None:
  """Refuses an output directory that would destroy something (see `directory`).

  Raises:
    OutputExistsError: one line naming `out_dir` (and the source) and what to do instead.
  """
  real = os.path.realpath(out_dir)
  for src in sources:
    src_real = os.path.realpath(src)
    if real == src_real:
      raise OutputExistsError(f"output {out_dir} is the source {src}: writing it would replace the "
                              "source; choose another output directory")
    for inner, outer, what in ((real, src_real, "inside the source"),
                               (src_real, real, "contains the source")):
      if _inside(inner, outer):
        raise OutputExistsError(f"output {out_dir} {what} {src}; choose an output directory "
                                "outside the source")
  if not os.path.lexists(out_dir):
    return
  if not os.path.isdir(out_dir):
    raise OutputExistsError(f"output {out_dir} exists and is not a directory; choose another path")
  reason = _run_outputs(out_dir)
  if reason is not None:
    raise OutputExistsError(f"output {out_dir} is never replaced: {reason}; choose another "
                            "output directory")
  if os.listdir(out_dir) and not overwrite:
    raise OutputExistsError(f"output {out_dir} exists and is not empty; choose another output "
                            "directory, or overwrite it explicitly (--overwrite, overwrite=True)")


@contextlib.contextmanager
def directory(out_dir: str, prefix: str = ".tmp-", *, overwrite: bool = False,
              sources: Sequence[str] = ()):
  """Yields a temporary directory beside `out_dir`; on success it replaces `out_dir`.

  A crash (or exception) inside the block leaves `out_dir` as it was and removes the temporary
  directory. An existing `out_dir` is moved aside first and deleted only after the rename.
  The directory gets the mode a plain mkdir would (0o777 minus the umask), not mkdtemp's 0700.

  Args:
    out_dir: the directory to write.
    prefix: name prefix of the temporary directory.
    overwrite: replace a non-empty `out_dir`. Never replaced, even so: a directory holding a
      run's checkpoints or results (checkpoints/, metrics.json, metrics.jsonl), a repository,
      the current or home directory or one above them.
    sources: directories the output is made from: `out_dir` may not be one of them, nor lie
      inside one or contain one.

  Raises:
    OutputExistsError: `out_dir` is refused (checked before anything is written, and again just
      before the rename).
  """
  check_output(out_dir, sources=sources, overwrite=overwrite)
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
  try:
    os.chmod(tmp, 0o777 & ~umask())
    yield tmp
    check_output(out_dir, sources=sources, overwrite=overwrite)   # it may have changed meanwhile
    if os.path.lexists(out_dir):
      old = tmp + ".old"
      os.rename(out_dir, old)
      os.rename(tmp, out_dir)
      shutil.rmtree(old)
    else:
      os.rename(tmp, out_dir)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
