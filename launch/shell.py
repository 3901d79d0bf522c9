"""The command lines a launcher builds, printed (`--dry-run`: nothing runs) or run in order."""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
from typing import Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """`[flags..., "--", command...]` -> (flags, command)."""
  argv = list(argv)
  if "--" not in argv:
    return argv, []
  i = argv.index("--")
  return argv[:i], argv[i + 1:]


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


def execute(commands: Sequence[Command], dry_run: bool) -> None:
  """Prints each command; unless `dry_run`, runs it from the repository root and stops at the
  first failure, naming it. `python` runs as this interpreter."""
  for cmd in commands:
    print(cmd, flush=True)
    if dry_run:
      continue
    argv = [sys.executable, *cmd.argv[1:]] if cmd.argv[0] == "python" else list(cmd.argv)
    result = subprocess.run(argv, input=cmd.stdin, text=True, cwd=REPO_ROOT, check=False)
    if result.returncode:
      raise SystemExit(f"failed with exit status {result.returncode}: {shlex.join(cmd.argv)}")
