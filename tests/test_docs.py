"""The documentation agrees with the code: the README's length, every command's flags, relative
links, and a runner for every runnable command block. Fast: no server, no build."""

from __future__ import annotations

import contextlib
import functools
import io
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
README = PROJECT / "README.md"
MAX_README_LINES = 260

# Every runnable command block (an HTML comment "<!-- runnable: NAME -->" on the line right before
# its fence) and the test that runs it, as "tests/FILE.py::TEST". A new runnable block without a
# runner here fails this suite; so does a runner whose block is gone.
RUNNERS = {
    "new-catalogue": "tests/test_readme_commands.py::test_a_store_built_from_judgments",
    "milvus": "tests/test_milvus.py::test_the_documented_commands_load_serve_and_detach",
    "audit": "tests/test_audit.py::test_the_home_depot_audit_reproduces_from_its_rankings",
    "gpu-check": "tests/test_gpu_path.py::test_a_gpu_target_build_writes_the_qdq_graph_and_gpu_configs",
    "cpu-kinds": "tests/test_readme_commands.py::test_the_documented_cpu_kinds_check_runs",
    "verify": "tests/test_repository.py::test_the_documented_verify_command_finds_a_damaged_file",
}

# Each documented command: the program that prints its help, and the documents where every flag of
# that help must appear (in at least one of them).
EXPORT, SHOPSERVE = "python -m shopserve.export", "shopserve"
COMMANDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "build": (EXPORT, ("docs/building.md",)),
    "evaluate": (EXPORT, ("docs/building.md",)),
    "transfer": (EXPORT, ("docs/building.md",)),
    "instacart": (EXPORT, ("docs/building.md",)),
    "cut": (EXPORT, ("docs/building.md",)),
    "milvus": (EXPORT, ("docs/milvus.md",)),
    "audit": (EXPORT, ("docs/fairness.md",)),
    "serve": (SHOPSERVE, ("docs/serving.md",)),
    "rollout": (SHOPSERVE, ("docs/serving.md",)),
    "verify": (SHOPSERVE, ("docs/serving.md",)),
    "keys": (SHOPSERVE, ("docs/serving.md",)),
    "events": (SHOPSERVE, ("docs/serving.md",)),
    "events export": (SHOPSERVE, ("docs/serving.md",)),
    "events compact": (SHOPSERVE, ("docs/serving.md",)),
    "forget": (SHOPSERVE, ("docs/serving.md",)),
    "catalogue": (SHOPSERVE, ("docs/catalogue.md",)),
    "catalogue export": (SHOPSERVE, ("docs/catalogue.md",)),
    "search": (SHOPSERVE, ("docs/api.md", "README.md")),
    "recommend": (SHOPSERVE, ("docs/api.md", "README.md")),
}
# Where a command is named in the docs: "python -m shopserve.export build", "shopserve serve".
_COMMAND = re.compile(
    r"shopserve\.export (?P<export>build|evaluate|transfer|instacart|cut|milvus|audit)\b"
    r"|(?<![\w.-])shopserve (?P<shopserve>serve|rollout|verify|search|recommend|keys|events export"
    r"|events compact|events|forget|catalogue export|catalogue)\b"
)
# A command's own flags end where the shell line goes on to something else.
_END_OF_COMMAND = re.compile(r"\s(?:#|&&|\|\||\||;|&)(?:\s|$)")
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
_CODE_SPAN = re.compile(r"`([^`\n]+)`")
_FENCE = re.compile(r"^\s*(```|~~~)")
_RUNNABLE = re.compile(r"^<!-- runnable: ([A-Za-z0-9_-]+) -->$")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")


def _documents() -> list[Path]:
    return [README, PROJECT / "CHANGELOG.md", *sorted((PROJECT / "docs").glob("*.md"))]


def _printed_help(parse: Callable[[list[str]], object], argv: list[str]) -> str:
    """What ``parse(argv)`` prints for ``--help`` (argparse prints, then exits 0)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as exited:
        parse(argv)
    assert exited.value.code in (0, None), f"{argv}: exit {exited.value.code}"
    return printed.getvalue()


@functools.cache
def command_flags(command: str) -> frozenset[str]:
    """The long flags a command's ``--help`` prints (the real parsers, in-process)."""
    program, _ = COMMANDS[command]
    if program == EXPORT:
        from shopserve.export.cli import parser

        text = _printed_help(parser().parse_args, [command, "--help"])
    else:
        from shopserve.cli import main

        text = _printed_help(main, [*command.split(), "--help"])
    assert f"usage: {program} {command}" in " ".join(text.split()), text[:200]
    return frozenset(_FLAG.findall(text)) - {"--help"}


def _mentions(text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


def _code_lines(path: Path) -> Iterator[tuple[int, str, bool]]:
    """(line number, text, inside a fenced block) of a Markdown file, with a fenced block's shell
    continuation lines (ending in a backslash) joined into one."""
    fenced, pending, start = False, "", 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if fenced and line.rstrip().endswith("\\"):
            start = start or number
            pending += line.rstrip()[:-1] + " "
            continue
        yield (start or number), pending + line, fenced
        pending, start = "", 0


def _written_commands(path: Path) -> Iterator[tuple[int, str, str]]:
    """(line number, command, the text written after it) for every command in a fenced block or an
    inline code span of ``path``."""
    for number, line, fenced in _code_lines(path):
        for code in [line] if fenced else _CODE_SPAN.findall(line):
            found = list(_COMMAND.finditer(code))
            ends = [after.start() for after in found[1:]] + [len(code)] if found else []
            for here, stop in zip(found, ends, strict=True):
                rest = code[here.end() : stop]
                end = _END_OF_COMMAND.search(rest)
                yield (
                    number,
                    here.group("export") or here.group("shopserve"),
                    rest[: end.start()] if end else rest,
                )


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines; keep it at most {MAX_README_LINES} and move details "
        "into docs/"
    )


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_flag_of_a_command_is_documented(command: str) -> None:
    _, documents = COMMANDS[command]
    texts = [(PROJECT / name).read_text(encoding="utf-8") for name in documents]
    missing = sorted(f for f in command_flags(command) if not any(_mentions(t, f) for t in texts))
    assert not missing, f"{command}: flags its --help prints but {' or '.join(documents)} does not"


def test_every_documented_flag_exists() -> None:
    unknown = []
    for path in _documents():
        for number, command, written in _written_commands(path):
            for flag in _FLAG.findall(written):
                if flag not in command_flags(command):
                    where = f"{path.relative_to(PROJECT)}:{number}"
                    unknown.append(f"{where}: {COMMANDS[command][0]} {command} {flag}")
    assert not unknown, "flags the docs give that the command does not have:\n" + "\n".join(unknown)


def test_the_flag_check_sees_commands() -> None:
    """The checks above must find what they check: commands in blocks and in code spans."""
    written = {
        (command, flag)
        for path in _documents()
        for _, command, rest in _written_commands(path)
        for flag in _FLAG.findall(rest)
    }
    assert ("build", "--catalogue") in written
    assert ("serve", "--admin-key-file") in written
    assert ("forget", "--admin-key-file") in written


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: the text without Markdown, lower case, punctuation dropped,
    spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


@functools.cache
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    for _, line, fenced in _code_lines(path):
        heading = None if fenced else _HEADING.match(line)
        if heading:
            slug = _slug(heading.group(2))
            seen[slug] = seen.get(slug, -1) + 1
            if seen[slug]:
                seen[f"{slug}-{seen[slug]}"] = 0
    return frozenset(seen)


def test_relative_links_resolve() -> None:
    broken = []
    for path in _documents():
        for number, line, fenced in _code_lines(path):
            if fenced:
                continue
            for target in _LINK.findall(_CODE_SPAN.sub("", line)):
                if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                    continue
                file_part, _, anchor = target.partition("#")
                linked = (path.parent / file_part).resolve() if file_part else path
                where = f"{path.relative_to(PROJECT)}:{number}: {target}"
                if not linked.exists():
                    broken.append(f"{where} (no such file)")
                elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                    broken.append(f"{where} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def runnable_blocks() -> dict[str, list[str]]:
    """Each runnable block's name and where it is."""
    blocks: dict[str, list[str]] = {}
    for path in _documents():
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, start=1):
            marker = _RUNNABLE.match(line.strip())
            if marker:
                where = f"{path.relative_to(PROJECT)}:{number}"
                assert number < len(lines) and _FENCE.match(lines[number]), (
                    f"{where}: a runnable marker must sit on the line right before a fence"
                )
                blocks.setdefault(marker.group(1), []).append(where)
    return blocks


def test_every_runnable_block_has_a_runner() -> None:
    blocks = runnable_blocks()
    assert blocks, "no runnable blocks found: the marker format changed?"
    twice = {name: places for name, places in blocks.items() if len(places) > 1}
    assert not twice, f"runnable block names used more than once: {twice}"
    without = {name: places for name, places in blocks.items() if name not in RUNNERS}
    assert not without, f"runnable blocks without a runner in RUNNERS: {without}"
    stale = sorted(set(RUNNERS) - set(blocks))
    assert not stale, f"RUNNERS names blocks that no document holds: {stale}"


@pytest.mark.parametrize("name", sorted(RUNNERS))
def test_each_runner_exists(name: str) -> None:
    file_name, _, test_name = RUNNERS[name].partition("::")
    source = PROJECT / file_name
    assert source.is_file(), f"{name}: {file_name} does not exist"
    text = source.read_text(encoding="utf-8")
    assert re.search(rf"^def {re.escape(test_name)}\(", text, re.M), f"{name}: no {test_name}"
    assert name in text, f"{name}: {file_name} does not name the block it runs"
