"""Every value a rule pastes into a shell command is quoted (`{x:q}`), `onerror` included: a run path
or a results folder with a space or a bracket must reach `python -m ofe` as one argument."""

from __future__ import annotations

import re

from tests.helpers import REPO

PLACEHOLDER = re.compile(r"(?<!\{)\{([^{}]+)\}(?!\})")  # {x} but not {{x}} (an escaped brace)


def shell_strings(text: str) -> list[str]:
    """The string literals of every `shell:` directive and `shell(...)` call in a Snakemake file."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if re.match(r"\s*shell:\s*$", line) or re.search(r"\bshell\($", line.rstrip()):
            indent = len(line) - len(line.lstrip())
            i += 1
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                out += re.findall(r'"((?:[^"\\]|\\.)*)"', lines[i])
                i += 1
            continue
        i += 1
    return out


def test_every_shell_value_is_quoted():
    files = [REPO / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk"))]
    checked, unquoted = 0, []
    for path in files:
        for string in shell_strings(path.read_text()):
            for name in PLACEHOLDER.findall(string):
                checked += 1
                if not name.endswith(":q"):
                    unquoted.append(f"{path.name}: {{{name}}} in {string!r}")
    assert checked >= 20  # the parser found the rules' commands
    assert not unquoted, "\n".join(unquoted)


def test_the_checker_sees_an_unquoted_value():
    rule = 'rule x:\n    shell:\n        "python -m ofe train --out {params.out:q}"\n        " > {log} 2>&1"\n'
    names = [n for s in shell_strings(rule) for n in PLACEHOLDER.findall(s)]
    assert names == ["params.out:q", "log"]
