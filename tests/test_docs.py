"""The documentation cannot drift from the code.

Every fenced shell command in README.md and docs/*.md that runs a project script or module
(``python X.py ...``, ``python -m crossmodal.X ...``, ``python -m bench.X ...``, also behind
``torchrun``, ``taskset``, ``flock``, ``timeout``, ``env``) is parsed like a shell would split
it (``\\`` continuations joined, ``#`` comments dropped, ``;``, ``&&``, ``||``, ``|`` and ``&``
split, ``VAR=...`` assignments expanded where ``$VAR`` is used), and each ``--flag`` (and a
literal value of a flag that has ``choices``) must exist in that script's argparse parser,
taken from the code as it is now. ``make TARGET`` must name a target of the Makefile, and the
flags of ``make TARGET ARGS="..."`` must exist in the parser of the command that recipe passes
``$(ARGS)`` to. Every relative link (and ``#anchor``) must resolve.

A script's parser is captured, not parsed out of its help: ``main(argv)`` is called with a
marker argv while ``ArgumentParser.parse_known_args`` is patched to raise at its first call,
handing back the parser it was called on. Nothing runs past argument parsing. A script whose
``main`` never hands its argv to a parser takes no flags.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "zsh", "shell-session"}
PROJECT_PACKAGES = {"crossmodal", "bench"}
PYTHON = re.compile(r"^(?:\S*/)?python(?:3(?:\.\d+)?)?$")
WRAPPERS_WITH_ARG = {"taskset": {"-c", "--cpu-list"}, "flock": {"-w", "--timeout", "-E", "--conflict-exit-code"},
                     "timeout": {"-s", "--signal", "-k", "--kill-after"}, "nice": {"-n", "--adjustment"}}
KEYWORDS = {"do", "then", "else", "elif", "if", "while", "until", "!", "{", "}", "time", "nohup", "exec", "command"}
VAR = re.compile(r"^\$(?:\{(\w+)\}|(\w+))$")
NUMBER = re.compile(r"^-\d")
MARKER = "--docs-test-probe-argv"


# --- reading markdown -------------------------------------------------------------------------

@dataclass
class Block:
    path: Path
    line: int           # 1-based line of the opening fence
    lang: str
    lines: list[str]


def fenced_blocks(text: str, path: Path = Path("doc.md")) -> list[Block]:
    """The fenced code blocks of a markdown text (``` or ~~~, up to 3 spaces of indent)."""
    blocks, cur, fence = [], None, None
    for n, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^ {0,3}(`{3,}|~{3,})\s*([\w+-]*)", line)
        if cur is None:
            if m:
                fence, cur = m.group(1), Block(path, n, m.group(2).lower(), [])
        elif m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and not line.strip()[len(m.group(1)):]:
            blocks.append(cur)
            cur = None
        else:
            cur.lines.append(line)
    if cur is not None:
        raise AssertionError(f"{path}:{cur.line}: code fence never closed")
    return blocks


def prose(text: str, blank_code_spans: bool = True) -> str:
    """The text outside fenced blocks (their lines blank), inline code spans blanked unless asked
    not to (links inside code are not links; headings keep their code)."""
    out, inside, fence = [], False, None
    for line in text.splitlines():
        m = re.match(r"^ {0,3}(`{3,}|~{3,})", line)
        if m and not inside:
            inside, fence = True, m.group(1)
        elif m and inside and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence):
            inside = False
        elif not inside:
            out.append(re.sub(r"`+[^`]*`+", "``", line) if blank_code_spans else line)
            continue
        out.append("")
    return "\n".join(out)


# --- shell commands ---------------------------------------------------------------------------

@dataclass
class Command:
    where: str          # "README.md:42"
    text: str           # the logical line, as written
    kind: str           # "python" or "make"
    target: str         # module name ("crossmodal.serve", "img2text_bert") or make target(s)
    args: list[str] = field(default_factory=list)
    make_vars: dict[str, str] = field(default_factory=dict)


def logical_lines(block: Block) -> list[tuple[int, str]]:
    """Lines of a shell block with ``\\`` continuations joined (console blocks: only ``$ `` lines)."""
    out, buf, start = [], "", None
    for i, raw in enumerate(block.lines):
        line = raw
        if block.lang in ("console", "shell-session"):
            if buf == "" and not line.lstrip().startswith("$ "):
                continue
            if buf == "":
                line = line.lstrip()[2:]
        if start is None:
            start = block.line + 1 + i
        if line.rstrip().endswith("\\") and not line.rstrip().endswith("\\\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        out.append((start, buf + line))
        buf, start = "", None
    if buf:
        out.append((start, buf))
    return out


def tokens(line: str) -> list[str]:
    """Shell words and the operators ; & && | || ( ) of one logical line; comments dropped."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
    lex.whitespace_split = True
    lex.commenters = "#"
    return list(lex)


def split_commands(toks: list[str]) -> list[list[str]]:
    """Simple commands of a token list, split at operators."""
    cmds, cur = [], []
    for t in toks:
        if t and set(t) <= set(";&|()"):
            if cur:
                cmds.append(cur)
            cur = []
        else:
            cur.append(t)
    if cur:
        cmds.append(cur)
    return cmds


def expand(words: list[str], env: dict[str, str]) -> list[str]:
    """``$VAR``/``${VAR}`` words replaced by the words of VAR's value where the docs assigned it;
    redirections dropped; the ``[optional]`` brackets of a usage line removed."""
    out, skip = [], False
    for w in words:
        if skip:
            skip = False
            continue
        if re.match(r"^\d*(>>?|<)&?$", w):      # a redirection operator; its target follows
            skip = True
            continue
        if re.match(r"^\d*(>>?|<)", w):
            continue
        m = VAR.match(w)
        if m and (m.group(1) or m.group(2)) in env:
            out.extend(shlex.split(env[m.group(1) or m.group(2)]))
            continue
        if w.startswith("["):                   # [--host 127.0.0.1 --port 8000]: optional flags of a usage line
            w = w[1:].removesuffix("]")
        elif w.endswith("]") and "[" not in w:
            w = w[:-1]
        if w and w != "...":
            out.append(w)
    return out


def strip_wrappers(words: list[str]) -> list[str]:
    """The command under keywords, ``VAR=x`` prefixes and wrappers (taskset, flock, timeout, env,
    torchrun: what torchrun runs is the script it is given)."""
    while words:
        w = words[0]
        if w in KEYWORDS or w == "env" or re.match(r"^[A-Za-z_]\w*=", w):
            words = words[1:]
        elif w in WRAPPERS_WITH_ARG:
            i, opts = 1, WRAPPERS_WITH_ARG[w]
            while i < len(words) and words[i].startswith("-"):
                i += 2 if words[i] in opts else 1
            # taskset MASK cmd (without -c) / flock FILE cmd / timeout DURATION cmd
            if w in ("flock", "timeout") or (w == "taskset" and not any(x in opts for x in words[1:i])):
                i += 1
            words = words[i:]
        elif w == "torchrun" or w.endswith("/torchrun"):
            rest = words[1:]
            for i, x in enumerate(rest):
                if x == "-m" or x.endswith(".py"):
                    return ["python", *rest[i:]]
            return []
        else:
            return words
    return words


def project_module(name: str) -> bool:
    """A module of this repository: crossmodal.*, bench.*, or a top-level script."""
    top = name.split(".")[0]
    return top in PROJECT_PACKAGES or (ROOT / f"{top}.py").is_file()


def classify(words: list[str], where: str, text: str) -> Command | None:
    """A project command (python script/module or make), or None for anything else."""
    if not words:
        return None
    if words[0] == "make" or words[0].endswith("/make"):
        targets, mvars, i = [], {}, 1
        while i < len(words):
            w = words[i]
            if w in ("-C", "-f", "-j", "-o", "-W", "--directory", "--file"):
                i += 2
                continue
            if w.startswith("-"):
                i += 1
                continue
            m = re.match(r"^([A-Za-z_]\w*)=(.*)$", w, re.S)
            if m:
                mvars[m.group(1)] = m.group(2)
            else:
                targets.append(w)
            i += 1
        return Command(where, text, "make", " ".join(targets), [], mvars)
    if PYTHON.match(words[0]):
        i = 1
        while i < len(words) and words[i].startswith("-") and words[i] not in ("-m", "-c"):
            i += 2 if words[i] in ("-X", "-W") else 1
        if i >= len(words) or words[i] == "-c":
            return None
        if words[i] == "-m":
            if i + 1 >= len(words):
                return None
            mod = words[i + 1]
            return Command(where, text, "python", mod, words[i + 2:]) if project_module(mod) else None
        script = words[i]
        rest = words[i + 1:]
    elif words[0].startswith("./") and words[0].endswith(".py"):      # an executable script run directly
        script, rest = words[0], words[1:]
    else:
        return None
    if not script.endswith(".py") or script.startswith("$"):
        return None
    rel = Path(script.removeprefix("./"))
    if rel.is_absolute() or ".." in rel.parts:
        return None
    return Command(where, text, "python", "script:" + rel.as_posix(), rest)


def commands_in(text: str, path: Path, name: str) -> list[Command]:
    """Every project command in the fenced shell blocks of one markdown text. Shell variables
    assigned in a block (``K="--coco-root COCO"``) stay known for the rest of that file."""
    env: dict[str, str] = {}
    out = []
    for block in fenced_blocks(text, path):
        if block.lang not in SHELL_LANGS:
            continue
        for lineno, line in logical_lines(block):
            where = f"{name}:{lineno}"
            try:
                toks = tokens(line)
            except ValueError as e:          # unbalanced quotes: fine in program output, not in a command
                if re.match(r"^\s*(\S*python\S*|make|torchrun)\s", line):
                    raise AssertionError(f"{where}: cannot split `{line.strip()}` like a shell: {e}") from None
                continue
            for words in split_commands(toks):
                if all(re.match(r"^[A-Za-z_]\w*=", w) for w in words):
                    for w in words:
                        k, _, v = w.partition("=")
                        env[k] = v
                    continue
                if words[0] in ("for", "select", "case"):
                    continue
                cmd = classify(strip_wrappers(expand(words, env)), where, line.strip())
                if cmd is not None:
                    out.append(cmd)
    return out


INLINE_COMMAND = re.compile(r"^(?:\S*/)?(?:python(?:3(?:\.\d+)?)?|make)\s")


def inline_commands_in(text: str, name: str) -> list[Command]:
    """Commands written as inline code on one line of prose or a table (`python X.py --flag`)."""
    out = []
    for n, line in enumerate(prose(text, blank_code_spans=False).splitlines(), 1):
        for m in re.finditer(r"(`+)(.+?)\1", line):
            code = m.group(2).strip()
            if not INLINE_COMMAND.match(code):
                continue
            try:
                words_list = split_commands(tokens(code))
            except ValueError as e:
                raise AssertionError(f"{name}:{n}: cannot split `{code}` like a shell: {e}") from None
            for words in words_list:
                cmd = classify(strip_wrappers(expand(words, {})), f"{name}:{n}", code)
                if cmd is not None:
                    out.append(cmd)
    return out


def all_commands() -> list[Command]:
    out = []
    for path in DOC_FILES:
        text, name = path.read_text(encoding="utf-8"), path.relative_to(ROOT).as_posix()
        out += commands_in(text, path, name) + inline_commands_in(text, name)
    return out


# --- parsers and make targets, from the code as it is --------------------------------------------

class _Captured(BaseException):
    def __init__(self, parser, args):
        super().__init__()
        self.parser, self.args = parser, args


_PARSERS: dict[str, argparse.ArgumentParser | None] = {}


def _import(target: str):
    if target.startswith("script:"):
        rel = target.removeprefix("script:")
        path = ROOT / rel
        if not path.is_file():
            raise AssertionError(f"no such script: {rel}")
        name = rel.removesuffix(".py").replace("/", ".")
        return importlib.import_module(name)
    if importlib.util.find_spec(target) is None:
        raise AssertionError(f"no such module: {target}")
    return importlib.import_module(target)


def parser_of(target: str) -> argparse.ArgumentParser | None:
    """The argparse parser a script or module builds from its argv, or None when it takes none."""
    if target in _PARSERS:
        return _PARSERS[target]
    mod = _import(target)
    main = getattr(mod, "main", None)
    if main is None:
        _PARSERS[target] = None
        return None
    original = argparse.ArgumentParser.parse_known_args

    def capture(self, args=None, namespace=None):
        raise _Captured(self, args)

    import crossmodal.cli as cli

    saved = {k: getattr(cli, k) for k in ("setup_logging", "set_threads") if hasattr(cli, k)}
    saved_argv = sys.argv
    found = None
    try:
        argparse.ArgumentParser.parse_known_args = capture
        for k in saved:
            setattr(cli, k, lambda *a, **kw: None)
        sys.argv = [target, MARKER]
        try:
            if inspect.signature(main).parameters:
                main([MARKER])
            else:
                main()
        except _Captured as c:
            if (c.args is None and sys.argv[1:] == [MARKER]) or (c.args is not None and list(c.args) == [MARKER]):
                found = c.parser
    finally:
        argparse.ArgumentParser.parse_known_args = original
        for k, v in saved.items():
            setattr(cli, k, v)
        sys.argv = saved_argv
    _PARSERS[target] = found
    return found


def check_flags(target: str, args: list[str]) -> list[str]:
    """Problems with ``args`` against the parser of ``target``: unknown flags, literal values
    outside a flag's choices."""
    parser = parser_of(target)
    name = target.removeprefix("script:")
    flags = [a for a in args if a.startswith("-") and len(a) > 1 and not NUMBER.match(a) and a != "--"]
    if parser is None:
        return [f"{name} takes no flags, but is given {' '.join(flags)}"] if flags else []
    problems, i = [], 0
    while i < len(args):
        a = args[i]
        i += 1
        if a == "--":
            break
        if not a.startswith("-") or len(a) == 1 or NUMBER.match(a):
            continue
        opt, eq, value = a.partition("=") if a.startswith("--") else (a, "", "")
        action = parser._option_string_actions.get(opt)
        if action is None:
            problems.append(f"{opt} is not a flag of {name} (its flags: "
                            f"{' '.join(sorted(o for o in parser._option_string_actions if o.startswith('--')))})")
            continue
        nargs = action.nargs
        if nargs == 0:
            continue
        values = []
        if eq:
            values = [value]
        elif nargs in (None, 1, "?"):
            if i < len(args) and not (args[i].startswith("-") and not NUMBER.match(args[i])):
                values, i = [args[i]], i + 1
        else:                                    # "+", "*", N: up to the next flag
            while i < len(args) and not (args[i].startswith("-") and not NUMBER.match(args[i])):
                values.append(args[i])
                i += 1
        if action.choices is not None:
            allowed = {str(c) for c in action.choices}
            for v in values:
                if "$" in v or "<" in v or v in allowed:
                    continue
                try:
                    if callable(action.type) and action.type(v) in action.choices:
                        continue
                except (argparse.ArgumentTypeError, TypeError, ValueError):
                    pass
                problems.append(f"{opt} {v}: {name} allows {', '.join(sorted(allowed))}")
    return problems


def make_targets(makefile: Path = ROOT / "Makefile") -> dict[str, list[str]]:
    """The Makefile's targets and their recipe lines."""
    targets: dict[str, list[str]] = {}
    current: list[str] = []
    for line in makefile.read_text().splitlines():
        if line.startswith("\t"):
            for t in current:
                targets[t].append(line.strip())
            continue
        m = re.match(r"^([^\s:#=][^:=]*?)\s*:(?!=)", line)
        if m and not line.lstrip().startswith("#"):
            current = [t for t in m.group(1).split() if not t.startswith(".")]
            for t in current:
                targets.setdefault(t, [])
        elif line.strip() and not line.startswith("#"):
            current = []
    return targets


def recipe_commands(recipe: list[str], target: str, mvars: dict[str, str]) -> list[Command]:
    """The project commands a make recipe runs, with ``$(ARGS)`` replaced by the given ARGS."""
    out = []
    for line in recipe:
        line = line.lstrip("@-+")
        for var, value in (("$(ARGS)", " __ARGS__ "), ("$(PY)", "python"), ("$(PYTHON)", "python"),
                           ("$(VENV)", ".venv")):
            line = line.replace(var, value)
        try:
            toks = tokens(line)
        except ValueError:
            continue
        for words in split_commands(toks):
            if "__ARGS__" in words:
                i = words.index("__ARGS__")
                words = [*words[:i], *shlex.split(mvars.get("ARGS", "")), *words[i + 1:]]
            cmd = classify(strip_wrappers(words), f"Makefile target {target}", line)
            if cmd is not None:
                out.append(cmd)
    return out


def problems_of(cmd: Command) -> list[str]:
    if cmd.kind == "python":
        try:
            return check_flags(cmd.target, cmd.args)
        except AssertionError as e:
            return [str(e)]
    targets = make_targets()
    problems = []
    for t in cmd.target.split() or ["<default>"]:
        if t not in targets:
            problems.append(f"make {t}: no such target in the Makefile (targets: {', '.join(sorted(targets))})")
            continue
        for sub in recipe_commands(targets[t], t, cmd.make_vars):
            problems += [f"make {t} runs `{sub.target.removeprefix('script:')}`: {p}" for p in problems_of(sub)]
    return problems


# --- links ------------------------------------------------------------------------------------

def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    s = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    s = s.replace("`", "").replace("*", "")
    s = re.sub(r"<[^>]+>", "", s).lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(text, blank_code_spans=False).splitlines():
        m = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(text: str) -> list[tuple[int, str]]:
    """(line, target) of every inline link, image, reference definition and HTML src/href."""
    out = []
    # the text of the original file is used for headings; links are read outside code
    for n, line in enumerate(prose(text).splitlines(), 1):
        for m in re.finditer(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", line):
            out.append((n, m.group(1)))
        m = re.match(r"^ {0,3}\[[^\]]+\]:\s+<?(\S+?)>?(?:\s|$)", line)
        if m:
            out.append((n, m.group(1)))
        for m in re.finditer(r"\b(?:src|href)=\"([^\"]+)\"", line):
            out.append((n, m.group(1)))
    return out


def link_problems(path: Path, text: str | None = None, root: Path = ROOT) -> list[str]:
    text = path.read_text(encoding="utf-8") if text is None else text
    name = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
    problems = []
    for n, target in links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):       # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path.resolve()
        if not dest.is_relative_to(root.resolve()):
            problems.append(f"{name}:{n}: link {target} leaves the repository")
            continue
        if not dest.exists():
            problems.append(f"{name}:{n}: link {target}: {dest.relative_to(root.resolve())} does not exist")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
            problems.append(f"{name}:{n}: link {target}: no heading #{anchor} in {dest.name}")
    return problems


# --- the tests --------------------------------------------------------------------------------

COMMANDS = all_commands()


def test_docs_exist_and_readme_is_short():
    assert (ROOT / "docs").is_dir()
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= 250, f"README.md has {n} lines; keep it at most 250 and move detail into docs/"


def test_the_quick_start_commands_are_found():
    """The extractor sees the README's quick start, and commands in the docs pages too."""
    readme = [c for c in COMMANDS if c.where.startswith("README.md")]
    assert {"demo", "test"} <= {c.target for c in readme if c.kind == "make"}
    assert any(c.kind == "python" for c in readme)
    assert any(c.where.startswith("docs/") and c.kind == "python" for c in COMMANDS)


@pytest.mark.parametrize("cmd", COMMANDS, ids=[f"{c.where} {c.target.removeprefix('script:')}" for c in COMMANDS])
def test_documented_command_parses(cmd):
    problems = problems_of(cmd)
    assert not problems, f"{cmd.where}: `{cmd.text}`:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("path", DOC_FILES, ids=[p.relative_to(ROOT).as_posix() for p in DOC_FILES])
def test_links_resolve(path):
    problems = link_problems(path)
    assert not problems, "\n".join(problems)


# --- the checker itself, on texts made here ------------------------------------------------------

SAMPLE = """
# Title

Some `python img2text.py --inline-flag` prose, | `make demo` | in a table, `img2text.py --x` not a command.

```bash
K="--coco-root COCO --split val"
# a comment: python img2text.py --nope
for s in a b; do
  python make_database_img.py $K --encoder fasterrcnn \\
      --batch-size 8 --workers 8   # trailing comment --nope
done
taskset -c 0 python make_database_img.py $K --shard 0 --num-shards 2 &
wait && python -m crossmodal.pipeline --demo 2>&1 | tail -3
torchrun --nproc-per-node 4 make_database_img.py $K --merge --num-shards 4
make search ARGS="--port 8080"
curl -s 'http://x/api?q=a#b'
```

```
{"output": "not a command"}
```
"""


def test_extractor_reads_continuations_comments_variables_pipes_and_wrappers():
    cmds = commands_in(SAMPLE, Path("s.md"), "s.md")
    got = [(c.kind, c.target, c.args) for c in cmds]
    assert got == [
        ("python", "script:make_database_img.py",
         ["--coco-root", "COCO", "--split", "val", "--encoder", "fasterrcnn", "--batch-size", "8", "--workers", "8"]),
        ("python", "script:make_database_img.py",
         ["--coco-root", "COCO", "--split", "val", "--shard", "0", "--num-shards", "2"]),
        ("python", "crossmodal.pipeline", ["--demo"]),
        ("python", "script:make_database_img.py",
         ["--coco-root", "COCO", "--split", "val", "--merge", "--num-shards", "4"]),
        ("make", "search", []),
    ]
    assert cmds[-1].make_vars == {"ARGS": "--port 8080"}
    assert [c.where for c in cmds] == ["s.md:10", "s.md:13", "s.md:14", "s.md:15", "s.md:16"]
    inline = inline_commands_in(SAMPLE, "s.md")
    assert [(c.where, c.kind, c.target, c.args) for c in inline] == [
        ("s.md:4", "python", "script:img2text.py", ["--inline-flag"]), ("s.md:4", "make", "demo", [])]


def test_checker_catches_a_renamed_flag_a_bad_choice_and_a_missing_target():
    text = "```bash\npython img2text_bert.py --negatives hardest --warmup-epochs 2\n```\n"
    (ok,) = commands_in(text, Path("s.md"), "s.md")
    assert problems_of(ok) == []
    for bad, expected in [
        ("python img2text_bert.py --negative hardest", "--negative is not a flag of img2text_bert.py"),
        ("python img2text_bert.py --negatives hardestt", "--negatives hardestt: img2text_bert.py allows"),
        ("python -m crossmodal.serve --run runs/demo --prot 9", "--prot is not a flag of crossmodal.serve"),
        ("python no_such_script.py --x", "no such script: no_such_script.py"),
        ("python -m crossmodal.no_such_module", "no such module: crossmodal.no_such_module"),
        ("make no-such-target", "make no-such-target: no such target"),
        ("make search ARGS=\"--portt 1\"", "make search runs `crossmodal.serve`: --portt is not a flag"),
        ("python -m bench.run_all --fast", "bench.run_all takes no flags"),
    ]:
        (cmd,) = commands_in(f"```bash\n{bad}\n```\n", Path("s.md"), "s.md")
        problems = problems_of(cmd)
        assert any(expected in p for p in problems), (bad, problems)


def test_link_checker_catches_missing_files_and_anchors(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Two words: `code`!\n\n```\n# not a heading\n```\n")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md) [ok](docs/a.md#two-words-code) [self](#top) ![img](docs/missing.png)\n"
                    "[bad](docs/a.md#not-a-heading) [web](https://example.com/x#y) `[code](nowhere.md)`\n\n# Top\n")
    problems = link_problems(page, root=tmp_path)
    assert len(problems) == 2, problems
    assert "docs/missing.png does not exist" in problems[0]
    assert "no heading #not-a-heading in a.md" in problems[1]
