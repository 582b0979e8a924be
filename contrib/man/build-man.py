#!/usr/bin/env python3
"""Render the manual page vdiskfs(1) from the argparse help of vdiskfs and of each command.

The page and `vdiskfs COMMAND --help` then come from the same text. Run it after changing a
command's options, and commit the result:

    contrib/man/build-man.py > contrib/man/vdiskfs.1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vdiskfs import __version__  # noqa: E402  (needs the path above)
from vdiskfs.cli import build_parser  # noqa: E402


def escape(text: str) -> str:
    """Escape `text` for roff: backslashes, dashes, and dots or quotes that start a line."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = []
    for line in text.splitlines():
        if line.startswith((".", "'")):
            line = "\\&" + line
        lines.append(line)
    return "\n".join(lines)


def verbatim(text: str) -> str:
    """Return `text` as a block that keeps its line breaks and indentation."""
    return ".PP\n.nf\n" + escape(text.rstrip("\n")) + "\n.fi"


def expand_help(action: argparse.Action, prog: str) -> str:
    text = action.help or ""
    if "%" in text:
        text = text % {"default": action.default, "prog": prog}
    return text


def option_label(action: argparse.Action) -> str:
    """Return '\\fB\\-f\\fR, \\fB\\-\\-format\\fR \\fIFMT\\fR' for an option."""
    names = ", ".join(f"\\fB{escape(name)}\\fR" for name in action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar or action.dest.upper()
    if isinstance(metavar, tuple):
        metavar = " ".join(metavar)
    return f"{names} \\fI{escape(metavar)}\\fR"


def render_command(name: str, parser: argparse.ArgumentParser) -> str:
    # Continuation lines of the usage are indented to follow "usage: ", which is dropped.
    prefix = "usage: "
    usage = parser.format_usage().strip().removeprefix(prefix)
    usage = "\n".join(line.removeprefix(" " * len(prefix)) for line in usage.splitlines())
    parts = [f'.SS "{name}"', verbatim(usage)]
    if parser.description:
        parts.append(".PP\n" + escape(parser.description))
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        if action.option_strings:
            label = option_label(action)
        else:
            label = f"\\fI{escape(action.metavar or action.dest)}\\fR"
        parts.append(f".TP\n{label}\n{escape(expand_help(action, parser.prog))}")
    if parser.epilog:
        parts.append(verbatim(parser.epilog))
    return "\n".join(parts)


def render_page() -> str:
    parser = build_parser()
    subparsers = next(action for action in parser._actions
                      if isinstance(action, argparse._SubParsersAction))
    sections = [
        f'.TH VDISKFS 1 "" "vdiskfs {__version__}" "User Commands"',
        ".SH NAME",
        "vdiskfs \\- " + escape(parser.description.rstrip(".")),
        ".SH SYNOPSIS",
        ".B vdiskfs",
        ".I COMMAND",
        "[\\fIoptions\\fR]",
        ".SH DESCRIPTION",
        escape(parser.description),
        verbatim(parser.epilog or ""),
        ".SH COMMANDS",
    ]
    for name, command in subparsers.choices.items():
        sections.append(render_command(name, command))
    sections += [
        ".SH SEE ALSO",
        "\\fBqemu\\-img\\fR(1), \\fBmount\\fR(8), \\fBfusermount3\\fR(1), \\fBlosetup\\fR(8)",
    ]
    return "\n".join(sections) + "\n"


def main() -> int:
    # argparse wraps help to the terminal width; a fixed width keeps the page reproducible.
    import os
    os.environ["COLUMNS"] = "80"
    sys.stdout.write(render_page())
    return 0


if __name__ == "__main__":
    sys.exit(main())
