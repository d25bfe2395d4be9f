"""Find `fedraft` / `fedraft-client` command lines in deployment files and check them
against the real CLI (the Click tree Typer builds), so a renamed or removed command or
option breaks the tests instead of a deployment.

Extraction turns each file into token lists (argv-like), then takes every run that starts
at a program token: `fedraft` or `fedraft-client`, bare or as a path ending in
`/bin/fedraft...`. Shell operators end a command; `sh -c '...'` strings are searched too.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import typer.main
import yaml

PROGRAMS = ("fedraft", "fedraft-client")
SHELLS = {"sh", "bash", "/bin/sh", "/bin/bash"}


@dataclass(frozen=True)
class CommandLine:
    """One command line found in a file: argv[0] is 'fedraft' or 'fedraft-client'."""

    argv: tuple[str, ...]
    source: str

    def __str__(self) -> str:
        return f"{self.source}: {' '.join(self.argv)}"


def program_of(token: str) -> str | None:
    for program in PROGRAMS:
        if token == program or token.endswith(f"/bin/{program}"):
            return program
    return None


def is_operator(token: str) -> bool:
    """A shell control or redirection operator, as shlex's punctuation mode yields them."""
    return re.fullmatch(r"[;&|<>]+", token) is not None


def _is_user_name(tokens: list[str], i: int) -> bool:
    """`sudo -u fedraft fedraft ...`, `install -g fedraft ...`, `createdb --owner fedraft`:
    the word is an option's value (a user or group), not the program."""
    before = tokens[i - 1] if i else ""
    if before.startswith("-") and before != "--" and not is_operator(before):
        return True
    return i + 1 < len(tokens) and program_of(tokens[i + 1]) is not None


def commands_in_tokens(tokens: list[str], source: str) -> Iterator[CommandLine]:
    """Every fedraft command in one argv-like token list (shell operators end one)."""
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token in SHELLS and i + 2 < len(tokens) and tokens[i + 1] == "-c":
            yield from commands_in_shell(tokens[i + 2], source)
            i += 3
            continue
        program = program_of(token)
        if program is None or _is_user_name(tokens, i):
            i += 1
            continue
        j = i + 1
        while j < len(tokens) and not is_operator(tokens[j]):
            j += 1
        yield CommandLine((program, *tokens[i + 1:j]), source)
        i = j


def commands_in_shell(text: str, source: str) -> Iterator[CommandLine]:
    """Shell text: comments dropped, backslash continuations joined, one line at a time."""
    text = re.sub(r"\\\n", " ", text)
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line.startswith("$ "):
            line = line[2:]
        if not line or line.startswith("#"):
            continue
        # Separate operators glued to words (`a;b`, `x&&y`) so shlex yields them alone.
        try:
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
            lexer.whitespace_split = True
            lexer.commenters = "#"
            tokens = list(lexer)
        except ValueError as exc:
            raise ValueError(f"{source}:{number}: cannot split {line!r}: {exc}") from None
        yield from commands_in_tokens(tokens, f"{source}:{number}")


# ------------------------------------------------------------------ file kinds


def from_dockerfile(path: Path) -> list[CommandLine]:
    """CMD, ENTRYPOINT, RUN and HEALTHCHECK CMD, in exec (JSON) or shell form."""
    text = re.sub(r"\\\n", " ", path.read_text())
    found: list[CommandLine] = []
    for number, line in enumerate(text.splitlines(), 1):
        m = re.match(r"\s*(CMD|ENTRYPOINT|RUN|HEALTHCHECK)\s+(.*)", line, re.IGNORECASE)
        if not m:
            continue
        body = m.group(2)
        if m.group(1).upper() == "HEALTHCHECK":
            body = re.sub(r"^(--\S+\s+)*", "", body)
            if not body.upper().startswith("CMD"):
                continue
            body = body[3:].strip()
        source = f"{path}:{number}"
        if body.startswith("["):
            found += commands_in_tokens(json.loads(body), source)
        else:
            found += commands_in_shell(body, source)
    return found


def _walk_yaml(node: Any, where: str) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{where}.{key}", value
            yield from _walk_yaml(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield f"{where}[{i}]", value
            yield from _walk_yaml(value, f"{where}[{i}]")


def from_compose(path: Path) -> list[CommandLine]:
    """Each service's entrypoint + command, and healthcheck tests."""
    data = yaml.safe_load(path.read_text())
    found: list[CommandLine] = []
    for name, service in (data.get("services") or {}).items():
        argv: list[str] = []
        for key in ("entrypoint", "command"):
            value = service.get(key)
            if isinstance(value, str):
                argv += shlex.split(value)
            elif isinstance(value, list):
                argv += [str(v) for v in value]
        found += commands_in_tokens(argv, f"{path}:services.{name}")
        test = (service.get("healthcheck") or {}).get("test")
        if isinstance(test, list) and test and test[0] == "CMD-SHELL":
            found += commands_in_shell(" ".join(test[1:]), f"{path}:services.{name}.healthcheck")
        elif isinstance(test, list):
            found += commands_in_tokens([str(t) for t in test[1:]], f"{path}:services.{name}.healthcheck")
    return found


def from_kubernetes(path: Path) -> list[CommandLine]:
    """Every container's command + args, and exec probes / lifecycle hooks."""
    found: list[CommandLine] = []
    for d, doc in enumerate(yaml.safe_load_all(path.read_text())):
        for where, value in _walk_yaml(doc, f"doc{d}"):
            if not isinstance(value, dict):
                continue
            if "image" in value and ("args" in value or "command" in value):
                argv = [str(v) for v in (value.get("command") or []) + (value.get("args") or [])]
                found += commands_in_tokens(argv, f"{path}:{where}")
            if where.endswith(".exec") and isinstance(value.get("command"), list):
                found += commands_in_tokens([str(v) for v in value["command"]], f"{path}:{where}")
    return found


def from_systemd(path: Path) -> list[CommandLine]:
    """Exec*= lines; their prefixes (-, @, +, !, :) are dropped."""
    found: list[CommandLine] = []
    text = re.sub(r"\\\n", " ", path.read_text())
    for number, line in enumerate(text.splitlines(), 1):
        m = re.match(r"\s*Exec\w*=\s*[-@+!:]*(.*)", line)
        if m:
            found += commands_in_tokens(shlex.split(m.group(1)), f"{path}:{number}")
    return found


def from_markdown(path: Path) -> list[CommandLine]:
    """Fenced code blocks (shell ones and unlabelled); TOML and YAML blocks are skipped."""
    found: list[CommandLine] = []
    for block, start in fenced_blocks(path.read_text()):
        if block.language in ("", "bash", "sh", "shell", "console"):
            found += commands_in_shell(block.text, f"{path}:{start}")
    return found


def from_shell_script(path: Path) -> list[CommandLine]:
    return list(commands_in_shell(path.read_text(), str(path)))


@dataclass(frozen=True)
class Block:
    language: str
    text: str


def fenced_blocks(markdown: str) -> Iterator[tuple[Block, int]]:
    """(block, line number of its first line) for every ``` fenced block."""
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"\s*```\s*([\w+-]*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start = i + 1
        j = start
        while j < len(lines) and not re.match(r"\s*```\s*$", lines[j]):
            j += 1
        yield Block(m.group(1).lower(), "\n".join(lines[start:j])), start + 1
        i = j + 1


def extract(path: Path) -> list[CommandLine]:
    name = path.name
    if name.endswith("Dockerfile"):
        return from_dockerfile(path)
    if name.endswith(".service"):
        return from_systemd(path)
    if name.endswith(".md"):
        return from_markdown(path)
    if name.endswith(".sh"):
        return from_shell_script(path)
    if name.endswith((".yaml", ".yml")):
        text = path.read_text()
        if re.search(r"^services:", text, re.MULTILINE):
            return from_compose(path)
        if re.search(r"^apiVersion:", text, re.MULTILINE):
            return from_kubernetes(path)
    return []


# ------------------------------------------------------------------ checking


def cli_roots() -> dict[str, click.Command]:
    from client.cli import app as client_app
    from coordinator.cli import app as coordinator_app

    return {"fedraft": typer.main.get_command(coordinator_app),
            "fedraft-client": typer.main.get_command(client_app)}


def _options(command: click.Command) -> dict[str, click.Parameter]:
    ctx = click.Context(command)
    names: dict[str, click.Parameter] = {}
    for param in command.get_params(ctx):
        if isinstance(param, click.Option):
            for opt in (*param.opts, *param.secondary_opts):
                names[opt] = param
    return names


def check(line: CommandLine, roots: dict[str, click.Command]) -> list[str]:
    """Problems with one command line: unknown subcommand or option; [] when it is fine."""
    command = roots[line.argv[0]]
    path = [line.argv[0]]
    args = list(line.argv[1:])
    problems: list[str] = []
    # Descend the groups: each word names a subcommand until a leaf command is reached.
    while isinstance(command, click.Group) and args:
        word = args[0]
        if word.startswith("-"):
            break
        sub = command.get_command(click.Context(command), word)
        if sub is None:
            known = ", ".join(sorted(command.list_commands(click.Context(command))))
            return [f"{line}: `{' '.join(path)}` has no command {word!r} (it has: {known})"]
        command = sub
        path.append(word)
        args.pop(0)
    options = _options(command)
    expect_value = False
    for arg in args:
        if expect_value:
            expect_value = False
            continue
        if arg == "--":
            break
        if not arg.startswith("-") or arg == "-" or re.fullmatch(r"-\d.*", arg):
            continue
        name = arg.split("=", 1)[0] if arg.startswith("--") else arg[:2]
        param = options.get(name)
        if param is None:
            problems.append(f"{line}: `{' '.join(path)}` has no option {name!r}")
            continue
        takes_value = not (getattr(param, "is_flag", False) or getattr(param, "count", False))
        inline = "=" in arg if arg.startswith("--") else len(arg) > 2
        expect_value = takes_value and not inline
    if isinstance(command, click.Group) and not args and path != [line.argv[0]]:
        problems.append(f"{line}: `{' '.join(path)}` is a group; it needs a command")
    return problems


def check_all(lines: Iterable[CommandLine]) -> list[str]:
    roots = cli_roots()
    problems: list[str] = []
    for line in lines:
        problems += check(line, roots)
    return problems
