"""File access for MODEL_DIR and the files in it: local paths and URLs (gs://, ram://, ...).

A local path goes through `os` and `open`, exactly as it always has. A URL (anything with
`://`) goes through `tf.io.gfile`, which TensorFlow imports only then (it is slow to import);
the `gs://` backend is the one orbax checkpoints use too (etils.epath picks tf.io.gfile when
TensorFlow is installed). Before this layer, a `gs://bucket/run` model dir given to `open` became
a local folder `./gs:/bucket/run`.

Object stores cannot append to a file, and a rename there is a copy then a delete; but a new
object appears only once complete, so `write_text` (temporary name, then rename) never shows a
partial file under the final name.
"""
import os
import posixpath
import shutil
from typing import List


def is_url(path) -> bool:
  """True for `scheme://...` paths, which need tf.io.gfile rather than `os`."""
  return "://" in str(path)


def gfile():
  """tf.io.gfile; TensorFlow is imported on the first call."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (slow: only for URLs)
  return tf.io.gfile


def join(path, *parts: str) -> str:
  """`os.path.join` for local paths, '/'-joins for URLs."""
  path = str(path)
  return posixpath.join(path, *parts) if is_url(path) else os.path.join(path, *parts)


def abspath(path) -> str:
  """The absolute local path; a URL is returned unchanged."""
  path = str(path)
  return path if is_url(path) else os.path.abspath(path)


def exists(path) -> bool:
  path = str(path)
  return gfile().exists(path) if is_url(path) else os.path.exists(path)


def isfile(path) -> bool:
  path = str(path)
  if is_url(path):
    return gfile().exists(path) and not gfile().isdir(path)
  return os.path.isfile(path)


def isdir(path) -> bool:
  path = str(path)
  return gfile().isdir(path) if is_url(path) else os.path.isdir(path)


def listdir(path) -> List[str]:
  """Entry names in directory `path` (gfile's trailing '/' on subdirectories removed)."""
  path = str(path)
  if is_url(path):
    return [name.rstrip("/") for name in gfile().listdir(path)]
  return os.listdir(path)


def makedirs(path) -> None:
  """Creates `path` and its parents; nothing if it exists."""
  path = str(path)
  if is_url(path):
    gfile().makedirs(path)
  else:
    os.makedirs(path, exist_ok=True)


def read_text(path) -> str:
  path = str(path)
  if is_url(path):
    with gfile().GFile(path, "r") as f:
      return f.read()
  with open(path) as f:
    return f.read()


def write_text(path, text: str) -> None:
  """Writes `text` to `path.tmp`, then renames it over `path` (replacing an older file).

  A reader sees the old file or the new one, never a partial one.
  """
  path = str(path)
  tmp = path + ".tmp"
  if is_url(path):
    with gfile().GFile(tmp, "w") as f:
      f.write(text)
    gfile().rename(tmp, path, overwrite=True)
  else:
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)


def append_text(path, text: str) -> None:
  """Appends `text` to `path` (created if missing).

  Local files are opened in append mode. Object stores cannot append: the file is read and
  written back whole (`write_text`), which suits small files written once in a while.
  """
  path = str(path)
  if is_url(path):
    old = read_text(path) if exists(path) else ""
    write_text(path, old + text)
  else:
    with open(path, "a") as f:
      f.write(text)


def copy(src, dst) -> None:
  """Copies file `src` to `dst`, replacing it; either may be a URL."""
  src, dst = str(src), str(dst)
  if is_url(src) or is_url(dst):
    gfile().copy(src, dst, overwrite=True)
  else:
    shutil.copyfile(src, dst)


def remove(path) -> None:
  """Deletes file `path` (nothing if it is already gone)."""
  path = str(path)
  try:
    if is_url(path):
      gfile().remove(path)
    else:
      os.remove(path)
  except (FileNotFoundError, OSError) as e:
    if exists(path):
      raise e


def move_dir(src, dst) -> None:
  """Moves directory `src` to `dst` (which must not exist).

  Local: one rename. Object stores have no directory rename: every file is copied, then the
  source is removed, only once the whole copy exists.
  """
  src, dst = str(src), str(dst)
  if not (is_url(src) or is_url(dst)):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.rename(src, dst)
    return
  g = gfile()
  for root, _, files in g.walk(src):
    rel = root[len(src):].lstrip("/")
    g.makedirs(join(dst, rel) if rel else dst)
    for name in files:
      g.copy(join(root, name), join(dst, rel, name) if rel else join(dst, name), overwrite=False)
  g.rmtree(src)


def check_writable_dir(path) -> None:
  """Raises ValueError when `path` cannot become a writable directory (a file is in the way,
  or a local parent is not writable). URLs are not probed: their permissions show on write."""
  path = str(path)
  if is_url(path):
    if exists(path) and not isdir(path):
      raise ValueError(f"{path} is a file, not a directory")
    return
  probe = os.path.abspath(path)
  while not os.path.exists(probe):
    parent = os.path.dirname(probe)
    if parent == probe:
      break
    probe = parent
  if not os.path.isdir(probe):
    raise ValueError(f"{probe} is a file, not a directory" if probe == os.path.abspath(path)
                     else f"{path} cannot be created: {probe} is a file")
  if not os.access(probe, os.W_OK | os.X_OK):
    raise ValueError(f"{path} is not writable (no write permission on {probe})")
