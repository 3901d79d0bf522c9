"""The README and docs/ pages: every relative link and #anchor resolves, every `--config.KEY` flag
and quoted `config.KEY` that they or the code name is a config key, every flag of a command line
that they or the code quote is one its program takes, and the README fits on a screen or two."""

import itertools
import pathlib
import re
import subprocess
import sys

import ml_collections
import pytest

from preflmr_jax import config_files

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "launch" / "README.md", *(ROOT / "docs").glob("*.md"),
                *(ROOT / "benchmarks").glob("*.md")])
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
  text = re.sub(r"[`*]", "", heading.strip().lower())
  return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: pathlib.Path) -> set[str]:
  text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
  return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
  text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
  broken = []
  for target in LINK.findall(text):
    if re.match(r"[a-z]+:", target):  # https:, mailto:
      continue
    file, _, anchor = target.partition("#")
    dest = (page.parent / file).resolve() if file else page
    if not dest.exists():
      broken.append(target)
    elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
      broken.append(target)
  assert not broken, f"{page.relative_to(ROOT)}: {broken}"


# `--config.KEY`, and `config.KEY` quoted (not `config.json`, a checkpoint's file). In the code,
# `config` can be another object (a model's PreFLMRConfig): only quoted names under a top-level key
# of a config (`config.data.x`) count there.
CONFIG_KEY = re.compile(r"(--|`)config\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")
# The pages, and the code's files that may quote a command or a config key.
SOURCES = [*PAGES, *(p for folder in ("preflmr_jax", "configs", "launch", "benchmarks")
                     for p in sorted((ROOT / folder).rglob("*"))
                     if p.suffix in (".py", ".sh") or p.name == "Dockerfile")]
CONFIGS = ("configs/tiny.py", "configs/release.py", "configs/stage.py:3", "configs/scaling.py")


def _has_key(config, key: str) -> bool:
  for part in key.split("."):
    if not (isinstance(config, ml_collections.ConfigDict) and part in config):
      return False
    config = config[part]
  return True


def test_every_config_flag_named_is_a_config_key():
  """A renamed or removed key leaves no flag behind that would fail with "no such config key"."""
  configs = [config_files.load_config(str(ROOT / spec)) for spec in CONFIGS]
  top = {key for config in configs for key in config}
  named = {(m.group(2), source.relative_to(ROOT)) for source in SOURCES
           for m in CONFIG_KEY.finditer(source.read_text())
           if source in PAGES or m.group(1) == "--" or m.group(2).split(".")[0] in top}
  assert len(named) > 50  # the pattern finds them
  unknown = sorted((key, str(where)) for key, where in named if key not in ("key", "KEY", "json")
                   and not any(_has_key(config, key) for config in configs))
  assert not unknown, unknown


# A command line: the program, then its arguments up to the end of the line or of the code span
# (backslash continuations included).
COMMAND = re.compile(r"python3? (?:-m )?(preflmr_jax(?:\.\w+)+|launch/\w+\.py|benchmarks/\w+\.py)"
                     r"((?:\\\n|[^\n`|;&\"'])*)")
FLAG = re.compile(r"(?<![\w-])--([a-z][\w-]*)(?![\w.-])")  # not --config.KEY (above)


def _commands(text: str):
  """(program, its arguments) of each command line in `text`; after a lone `--` comes the program
  a launcher runs, a command line of its own."""
  for m in COMMAND.finditer(text):
    own, *launched = re.split(r"\s--(?=\s|$)", m.group(2).replace("\\\n", " "), maxsplit=1)
    yield m.group(1), own
    yield from _commands(" ".join(launched))


def _quoted_commands() -> dict[tuple[str, ...], dict[str, str]]:
  """{what to ask for help: {flag: where it is quoted}}. A launcher's leading words (a subcommand)
  and a sweep's --backend decide which flags it takes."""
  found = {}
  for source in SOURCES:
    for program, args in _commands(source.read_text()):
      lead = itertools.takewhile(lambda w: not w.startswith(("-", "[")), args.split())
      backend = re.findall(r"--backend[= ](\S+)", args)
      absl = program.startswith("preflmr_jax")  # no positional arguments
      key = (program, *([] if absl else lead), *(f"--backend={b}" for b in backend))
      for flag in FLAG.findall(args):
        found.setdefault(key, {}).setdefault(flag, str(source.relative_to(ROOT)))
  return found


QUOTED = _quoted_commands()


def _options(help_text: str, absl: bool) -> set[str]:
  """The options a help text defines (not the flags its usage examples quote): absl's
  "  --[no]flag: ...", argparse's "  -h, --help" under "options:"."""
  if absl:  # also "-v,--verbosity:"
    return set(re.findall(r"^\s+(?:-\S,)?--(?:\[no\])?([a-z][\w-]*):", help_text, re.M))
  # Two spaces: deeper lines are wrapped help text. Also "-n N, --nodes N".
  return set(re.findall(r"^  (?:-\w(?: \S+)?, )?--([a-z][\w-]*)",
                        help_text.partition("\noptions:\n")[2], re.M))


@pytest.mark.parametrize("command", sorted(QUOTED), ids=" ".join)
def test_every_flag_of_a_quoted_command_exists(command):
  flags, (program, *words) = QUOTED[command], command
  absl = program.startswith("preflmr_jax")
  argv = [sys.executable, *(["-m"] * absl), program, *words, "--helpfull" if absl else "--help"]
  out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  listed = _options(out.stdout, absl)
  unknown = {flag: where for flag, where in flags.items()
             if flag not in listed and flag.removeprefix("no") not in listed}
  assert not unknown, f"{' '.join(command)}: {unknown}"


def test_the_readme_is_short():
  assert (ROOT / "README.md").stat().st_size <= 10_000
