"""The command lines a launcher builds, printed (`--dry-run`: nothing runs) or run in order."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import shlex
import signal
import subprocess
import sys
import threading
from typing import Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _exit_codes():
  """preflmr_jax/exit_codes.py of this checkout, loaded by path: importing the package would import
  JAX, which the launchers do not need."""
  spec = importlib.util.spec_from_file_location(
      "_preflmr_exit_codes", os.path.join(REPO_ROOT, "preflmr_jax", "exit_codes.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# The trainer's statuses. PREEMPTED: after a SIGTERM once its checkpoint is saved (also a shell's
# status for a command ended by SIGTERM): the launchers rerun the command, which resumes from that
# step. INTERRUPTED: the same after Ctrl-C, rerun by nobody. USAGE: a user's mistake.
_CODES = _exit_codes()
PREEMPTED, INTERRUPTED, USAGE = _CODES.PREEMPTED, _CODES.INTERRUPTED, _CODES.USAGE
MAX_RESTARTS = 3  # reruns after a preemption; a run preempted again and again is not endless
SAVE_GRACE_S = 300  # from SIGTERM to the end: a step and a checkpoint save, with room to spare


@dataclasses.dataclass(frozen=True)
class Command:
  argv: tuple[str, ...]
  stdin: Optional[str] = None  # e.g. an sbatch script
  comment: str = ""  # printed above the command

  def __str__(self) -> str:
    lines = [f"# {self.comment}"] if self.comment else []
    text = shlex.join(self.argv)
    if self.stdin is not None:
      text += " <<'EOF'\n" + self.stdin.rstrip("\n") + "\nEOF"
    return "\n".join(lines + [text])


def command(*argv: str, stdin: Optional[str] = None, comment: str = "") -> Command:
  return Command(tuple(argv), stdin, comment)


class ArgumentParser(argparse.ArgumentParser):
  """argparse's parser, taking a flag spelled with '-' or '_' alike (`--max-restarts`,
  `--max_restarts`): the trainer's flags use '_', gcloud's and xpk's '-', and the launchers mix
  the two."""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("epilog", "Flags take '-' or '_' alike: --dry-run, --dry_run.")
    super().__init__(*args, **kwargs)

  def parse_known_args(self, args=None, namespace=None):
    args = sys.argv[1:] if args is None else list(args)
    spelled = {_flag_key(s): s for s in self._option_string_actions if s.startswith("--")}
    respelled, is_value = [], False
    for arg in args:
      name, eq, value = arg.partition("=")
      if is_value or not name.startswith("--") or " " in name:  # e.g. --eval_flags "--k=v x"
        respelled.append(arg)
        is_value = False
        continue
      name = spelled.get(_flag_key(name), name)
      action = self._option_string_actions.get(name)
      is_value = action is not None and not eq and action.nargs != 0  # the next one is its value
      respelled.append(name + eq + value)
    return super().parse_known_args(respelled, namespace)


def _flag_key(name: str) -> str:
  return name.replace("-", "_")


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """`[flags..., "--", command...]` -> (flags, command)."""
  argv = list(argv)
  if "--" not in argv:
    return argv, []
  i = argv.index("--")
  return argv[:i], argv[i + 1:]


def non_negative(text: str) -> int:
  """argparse type: an integer >= 0 (e.g. `--max-restarts`)."""
  value = int(text)
  if value < 0:
    raise ValueError(text)
  return value


def require(parser, args, names: Sequence[str], placeholders: bool = False) -> None:
  """Flags that must be given. With `placeholders` (a dry run), a missing one prints as its name in
  capitals (`--zone=ZONE`) so that the commands can be read before the values are known."""
  for name in names:
    if not getattr(args, name):
      if not placeholders:
        parser.error(f"--{name} is required")
      setattr(args, name, name.upper())


def remote_script(*lines: str) -> str:
  """Shell lines joined for a remote `--command` (each must succeed)."""
  return " && ".join(lines)


def chain(argvs: Sequence[Sequence[str]]) -> str:
  """A shell line that runs the commands in turn while each succeeds (`a && b`); its status is that
  of the last one run, so a preempted train (`PREEMPTED`) skips the eval after it.

  A SIGTERM to the shell running the line is passed on to the command then running, and the shell
  waits for it: the shell may be all a scheduler signals (xpk's container passes SIGTERM to its
  command's first process only) or be signalled with the trainer (SLURM's `--signal` reaches every
  process of the step), and either way the trainer gets the signal and the time to save. (A trainer
  signalled both ways gets SIGTERM twice, which it treats as once.) One command is left as it is:
  a shell runs a lone command with exec, so the signal reaches it directly."""
  if len(argvs) == 1:
    return shlex.join(argvs[0])
  # A SIGTERM between starting a command and `pid=$!` finds no pid to pass on: the trap notes it
  # in `term` and the command is signalled once its pid is known. A trapped SIGTERM ends a `wait`
  # early, with 143: wait again while the command is there. Once it is gone, asking again is not
  # reliable (bash 5.2 may answer -1 for a command that ended while its `wait` was cut short), so
  # the last answer stands: its status, or 143 when the signal came as it ended, which a restart
  # sorts out. 127: the pid was not a child (taken again).
  steps = [f'{{ {shlex.join(a)} & pid=$!; [ -z "$term" ] || kill -TERM "$pid" 2>/dev/null; '
           f'while :; do wait "$pid"; rc=$?; [ "$rc" -ne 127 ] && '
           f'kill -0 "$pid" 2>/dev/null || break; done; [ "$rc" -ge 0 ] || rc={PREEMPTED}; '
           f'(exit "$rc"); }}' for a in argvs]
  return "term=; pid=; trap 'term=1; kill -TERM \"$pid\" 2>/dev/null' TERM; " + " && ".join(steps)


def restart_loop(command: str, max_restarts: int, before_restart: str = "") -> str:
  """A shell command (one `{ ...; }` group) that runs `command` in a subshell and reruns it while it
  exits with `PREEMPTED`, at most `max_restarts` times (after `before_restart`, if given); any
  other status ends it. Each attempt is framed by `[preflmr] start <UTC time>` and `[preflmr] exit
  status <n>`, and a restart, or the end of the restarts, is said. Its status is the last
  attempt's."""
  return ("{ restarts=0; while :; do "
          'echo "[preflmr] start $(date -u +%FT%TZ)"; '
          f"( {command} ); rc=$?; "
          'echo "[preflmr] exit status $rc"; '
          f'[ "$rc" -eq {PREEMPTED} ] || break; '
          f'if [ "$restarts" -ge {max_restarts} ]; then '
          f'echo "[preflmr] preempted; no restarts left (--max-restarts={max_restarts})"; '
          "break; fi; "
          "restarts=$((restarts + 1)); "
          f'echo "[preflmr] preempted: restart $restarts of at most {max_restarts}"; '
          + (f"{before_restart}; " if before_restart else "")
          + 'done; (exit "$rc"); }')


def is_preempted(returncode: int) -> bool:
  """`PREEMPTED`, or ended by SIGTERM (Python's `subprocess` reports that as -15): either way
  rerunning resumes from the newest complete checkpoint."""
  return returncode in (PREEMPTED, -signal.SIGTERM)


def _run(argv: Sequence[str], stdin: Optional[str]) -> int:
  """Runs `argv` from the repository root; returns its exit status. A SIGTERM to this launcher
  is passed on to it (the trainer saves and exits `PREEMPTED`), and the launcher waits for it;
  so it does on Ctrl-C, which the terminal sends to both (the trainer saves and exits
  `INTERRUPTED`)."""
  procs, signalled = [], []

  def forward(*_):
    signalled.append(True)
    for proc in procs:
      proc.send_signal(signal.SIGTERM)

  main_thread = threading.current_thread() is threading.main_thread()  # where handlers can be set
  # A Python handler, not SIG_IGN, for SIGINT: the child would inherit SIG_IGN.
  handlers = {signal.SIGTERM: forward, signal.SIGINT: lambda *_: None} if main_thread else {}
  previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
  try:
    procs.append(subprocess.Popen(list(argv), stdin=None if stdin is None else subprocess.PIPE,
                                  text=True, cwd=REPO_ROOT))
    if signalled:  # before it started
      procs[0].send_signal(signal.SIGTERM)
    procs[0].communicate(stdin)
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, signal.SIG_DFL if handler is None else handler)
  return procs[0].returncode


def execute(commands: Sequence[Command], dry_run: bool) -> None:
  """Prints each command; unless `dry_run`, runs it from the repository root and stops at the
  first failure, naming it. `python` runs as this interpreter. A preempted command (`is_preempted`)
  stops the rest too, is reported as preempted and ends this launcher with `PREEMPTED`, so that
  whatever runs the launcher can tell it from a failure: rerunning resumes (an interrupted one,
  Ctrl-C: the same with `INTERRUPTED`)."""
  for cmd in commands:
    print(cmd, flush=True)
    if dry_run:
      continue
    argv = [sys.executable, *cmd.argv[1:]] if cmd.argv[0] == "python" else list(cmd.argv)
    code = _run(argv, cmd.stdin)
    stopped = ("preempted", PREEMPTED) if is_preempted(code) else (
        ("interrupted", INTERRUPTED) if code in (INTERRUPTED, -signal.SIGINT) else None)
    if stopped:
      print(f"{stopped[0]} (exit status {code}): {shlex.join(cmd.argv)}\nnothing after it ran; "
            "run the same command again to resume from the newest complete checkpoint",
            file=sys.stderr, flush=True)
      raise SystemExit(stopped[1])
    if code:
      raise SystemExit(f"failed with exit status {code}: {shlex.join(cmd.argv)}")
