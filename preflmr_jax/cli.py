"""How the command-line programs start, print and fail: `run(main)` in place of `absl.app.run`.

- **The console** (stderr) shows the project's own log lines, one per event, and every library's
  warnings and errors. The libraries' INFO lines (Orbax's saves, TFDS, JAX's backend probing) go
  only to the log file, `preflmr_jax.<program>.<host>.<pid>.log` in `--log_dir` (default: the
  temporary folder). `--verbosity=1` puts everything on the console. On a pod only process 0
  prints INFO lines. A long loop shows its `progress`; what a library prints to stdout can be
  sent to the log file (`prints_to_log_file`).
- **User errors**: a `user_errors.UserError` (a bad config value, flag or path) or a bad flag is
  printed as one line, `error: <message>`, and the program exits with status 2
  (`exit_codes.USAGE`). Any other exception keeps its traceback (status 1).
- **Nothing left behind**: an output folder (the flags named in `outputs`) that the program
  created and left without a file is removed when the program fails.
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging as py_logging
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sized
from typing import Callable, Sequence, TypeVar

from absl import app, flags, logging

from preflmr_jax import exit_codes, user_errors

T = TypeVar("T")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _is_main_process() -> bool:
  import jax  # pylint: disable=g-import-not-at-top  (after flags: JAX reads its own)
  return not jax.distributed.is_initialized() or jax.process_index() == 0


# `logging.info(..., extra=FILE_ONLY)`: a line for the log file (and --verbosity=1), not the console.
FILE_ONLY = {"file_only": True}


class _ConsoleFilter(py_logging.Filter):
  """The project's INFO lines (on process 0) and everyone's warnings; everything when verbose."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.WARNING or logging.get_verbosity() >= logging.DEBUG:
      return True
    if getattr(record, "file_only", False):
      return False
    return record.pathname.startswith(_PACKAGE_DIR) and _is_main_process()


class _ConsoleFormatter(py_logging.Formatter):

  def format(self, record: py_logging.LogRecord) -> str:
    text = record.getMessage()
    if record.levelno >= py_logging.WARNING:
      text = f"{record.levelname.lower()}: {text}"
    if record.exc_info:
      text += "\n" + self.formatException(record.exc_info)
    return f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {text}"


def duration(seconds: float) -> str:
  """`1h02m`, `3m05s`; `?` when unknown (NaN or infinite)."""
  if not math.isfinite(seconds):
    return "?"
  minutes, secs = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def progress(items: Iterable[T], what: str, unit: str = "", show: bool = True,
             every: float = 60.0) -> Iterator[T]:
  """`items`, with their progress shown by the main process when `show`: a tqdm bar on a
  terminal; elsewhere (a pipe, a pod's log file), where a bar redrawn with carriage returns is one
  unreadable line, a log line at most every `every` seconds."""
  if not show or not _is_main_process():
    yield from items
    return
  if sys.stderr.isatty():
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    yield from tqdm(items, desc=what, unit=unit)
    return
  total = len(items) if isinstance(items, Sized) else None
  start = last = time.monotonic()
  for done, item in enumerate(items, 1):
    yield item
    now = time.monotonic()
    if now - last >= every and done != total:
      last = now
      left = f", {duration((now - start) / done * (total - done))} left" if total else ""
      logging.info("%s: %d%s%s done%s", what, done, f"/{total}" if total else "", unit, left)


@contextlib.contextmanager
def prints_to_log_file() -> Iterator[None]:
  """What a library prints to stdout inside the block goes to the log file only, each line as it
  is completed (in order with the log's other lines)."""
  lines = _LinesToLog()
  try:
    with contextlib.redirect_stdout(lines):
      yield
  finally:
    lines.close()


class _LinesToLog(io.TextIOBase):
  """A text stream that logs (file only) each line written to it once its end is written."""

  def __init__(self):
    super().__init__()
    self._partial = ""
    self._lock = threading.Lock()  # libraries print from their threads

  def writable(self) -> bool:
    return True

  def write(self, text: str) -> int:
    with self._lock:
      # A last "\r" may be the first half of a "\r\n": the line ends with the next write.
      *complete, last = (self._partial + text).splitlines(keepends=True) or [""]
      if last.endswith("\n"):
        complete, last = complete + [last], ""
      self._partial = last
    for line in complete:
      logging.info("%s", line.rstrip("\r\n"), extra=FILE_ONLY)
    return len(text)

  def close(self) -> None:
    """Logs the line left unfinished, if any."""
    if self._partial and not self.closed:
      self.write("\n")
    super().close()


def log_file_path(program: str) -> str:
  folder = flags.FLAGS.log_dir or tempfile.gettempdir()
  return os.path.join(folder, f"preflmr_jax.{program}.{socket.gethostname()}.{os.getpid()}.log")


def _set_up_logging(program: str) -> str:
  console = logging.get_absl_handler()
  console.setFormatter(_ConsoleFormatter())
  console.addFilter(_ConsoleFilter())
  path = log_file_path(program)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  to_file = py_logging.FileHandler(path)
  to_file.setFormatter(logging.PythonFormatter())
  py_logging.getLogger().addHandler(to_file)
  return path


def _fail(message: str) -> None:
  """One line on stderr, status 2."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(exit_codes.USAGE)


def _flag_error(e: BaseException, argv: Sequence[str] = ()) -> str:
  """One line for a flag parsing error: absl's own message when it names the flag, else the
  innermost cause's, unescaped (ml_collections wraps a config file's error in a traceback, and a
  misspelled key in a quoted KeyError with a suggestion, without the key's path)."""
  outer = str(e).strip()
  missing = re.match(r"flag (--\w+)=None: Flag --\w+ must have a value other than None", outer)
  if missing:  # absl's words for a required flag left out
    return f"{missing.group(1)} is required (--help lists the flags)"
  if outer.startswith("flag --") and "Traceback" not in outer:
    return _one_line(outer[len("flag "):])
  chain = [e]
  while chain[-1].__cause__ or chain[-1].__context__:
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  # ml_collections raises KeyError("'key'") (with a suggestion when it has one) from
  # KeyError('key'), and re-raises a config file's error as its type with the traceback as
  # message: the innermost UserError is the one line.
  keys = [c for c in chain if isinstance(c, KeyError)]
  source = next((c for c in chain if "Did you mean" in str(c)), None)
  source = source or next((c for c in reversed(chain) if isinstance(c, user_errors.UserError)),
                          None)
  text = str(source or (keys[0] if keys else chain[-1])).strip()
  if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
    try:
      text = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      pass
  if isinstance(chain[-1], SyntaxError) and chain[-1].filename:  # its str names the file's basename
    text = f"{chain[-1].filename}, line {chain[-1].lineno}: {chain[-1].msg}"
  if source is None and not keys and outer.startswith("flag --"):
    # Any other error of a config file (or of its get_config call): name the flag that loaded it.
    text = f"{outer[len('flag '):].partition(': ')[0]}: {text}"
  unknown = re.match(r"'([^']*)'(\n|$)", text) if keys else None
  if unknown:
    key = unknown.group(1)
    flag = next((a.partition("=")[0] for a in argv if a.startswith("--config.")
                 and a.partition("=")[0].split(".")[-1] == key), f"--config.{key}")
    text = f"{flag}: no such config key. {text[unknown.end():]}"
  return _one_line(text)


def _one_line(text: str) -> str:
  return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _parse_flags(argv: list[str]) -> list[str]:
  argv = [argv[0]] + ["--help" if a == "-h" else a for a in argv[1:]]
  try:
    return flags.FLAGS(argv)
  except SystemExit as e:  # absl's --help (and --helpfull, ...) prints, then exits 1: not a failure
    raise SystemExit(0 if e.code == 1 else e.code) from None
  except Exception as e:  # pylint: disable=broad-except  (parsing --config.* overrides raises any)
    logging.debug("flags", exc_info=True)
    _fail(_flag_error(e, argv))


def _load_config_flag() -> None:
  """ml_collections loads `--config` and applies its `--config.*` overrides on first use: here,
  so that a missing file, an error in it or a misspelled key is a flag error."""
  if "config" not in flags.FLAGS or flags.FLAGS["config"].value is None:
    return
  try:
    flags.FLAGS["config"].value.get("model")
  except Exception as e:  # pylint: disable=broad-except  (a config file may raise anything)
    spec = flags.FLAGS["config"].serialize()
    path = spec.partition("=")[2].partition(":")[0]
    if path and not os.path.isfile(path):
      _fail(f"--config={path}: no such file")
    if isinstance(e, user_errors.UserError):
      raise
    logging.debug("config flag", exc_info=True)
    _fail(f"{spec}: {_flag_error(e)}")


def _new_local_folders(names: Sequence[str]) -> list[str]:
  """For each local output folder named by flags `names` that does not exist yet, the topmost
  of its missing ancestors (what creating it creates)."""
  created = []
  for name in names:
    path = getattr(flags.FLAGS, name, None)
    if not path or path.startswith("gs://") or os.path.exists(path):
      continue
    path = os.path.abspath(path)
    while not os.path.exists(os.path.dirname(path)):
      path = os.path.dirname(path)
    created.append(path)
  return created


def _holds_a_file(folder: str) -> bool:
  return any(files for _, _, files in os.walk(folder))


def run(main: Callable[[list[str]], object], outputs: Sequence[str] = ()) -> None:
  """`absl.app.run(main)` with the console, errors and clean-up above; `outputs` names the flags
  that give output folders."""

  def wrapped(argv):
    if len(argv) > 1:
      _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    program = os.path.splitext(os.path.basename(argv[0]))[0]
    if program == "__main__":  # python -m preflmr_jax.<module>
      program = sys.modules["__main__"].__spec__.name.rsplit(".", 1)[-1]
    log_file = _set_up_logging(program)
    created = _new_local_folders(outputs)
    try:
      _load_config_flag()
      main(argv)
      logging.info("full log: %s", log_file)
    except BaseException as e:
      for folder in created:
        if os.path.isdir(folder) and not _holds_a_file(folder):
          shutil.rmtree(folder, ignore_errors=True)
      if isinstance(e, KeyboardInterrupt) or (isinstance(e, SystemExit)
                                              and e.code != exit_codes.USAGE):
        logging.info("full log: %s", log_file)  # also a stop (preempted, interrupted) or an exit
      if isinstance(e, (user_errors.UserError, app.UsageError)):
        logging.debug("user error", exc_info=True)
        _fail(str(e))
      raise

  app.run(wrapped, flags_parser=_parse_flags)
