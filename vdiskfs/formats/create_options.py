"""Image creation options as `qemu-img create -o` takes them: `name=value,name=value`.

Each format's creator lists its options as OptionSpec values. parse_options() checks the
names and turns the strings into typed values. The creator then checks the values
against each other. Every error names the option and the value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Mapping, Optional, Sequence

from vdiskfs.errors import VdiskError
from vdiskfs.sizes import parse_size

# Spellings that QEMU's option parser accepts for booleans.
TRUE_WORDS = ("on", "yes", "true", "y")
FALSE_WORDS = ("off", "no", "false", "n")

# Largest image size that QEMU accepts: its sizes are signed 64-bit byte counts.
MAX_IMAGE_SIZE = (1 << 63) - 1

SIZE_SUFFIXES = ((1 << 60, "E"), (1 << 50, "P"), (1 << 40, "T"), (1 << 30, "G"),
                 (1 << 20, "M"), (1 << 10, "K"))


class InvalidOptionError(VdiskError):
    """A creation option is unknown, has an invalid value, or conflicts with another option."""


@dataclass(frozen=True)
class OptionSpec:
    """One creation option: its `-o` name, help text and a parser for its value.

    `parse(name, text)` returns the typed value or raises InvalidOptionError.
    """

    name: str
    help: str
    parse: Callable[[str, str], object]


def split_option_string(text: str) -> Dict[str, str]:
    """Split `name=value,name=value` into a dict, where a later name replaces an earlier one.

    As in QEMU, a doubled comma (`,,`) stands for a comma inside a value. A name without
    `=value` gets the value "on", so that `-o lazy_refcounts` means lazy_refcounts=on.
    """
    options: Dict[str, str] = {}
    for item in _split_on_single_commas(text):
        if not item:
            continue
        name, separator, value = item.partition("=")
        options[name.strip()] = value if separator else "on"
    return options


def _split_on_single_commas(text: str) -> Iterable[str]:
    item = []
    index = 0
    while index < len(text):
        character = text[index]
        if character == "," and text[index + 1:index + 2] == ",":
            item.append(",")
            index += 2
            continue
        if character == ",":
            yield "".join(item)
            item = []
        else:
            item.append(character)
        index += 1
    yield "".join(item)


def parse_options(values: Mapping[str, str], specs: Sequence[OptionSpec],
                  format_name: str) -> Dict[str, object]:
    """Parse every option in `values` with its spec.

    Raises InvalidOptionError for an unknown name or an invalid value.
    """
    specs_by_name = {spec.name: spec for spec in specs}
    parsed: Dict[str, object] = {}
    for name, text in values.items():
        spec = specs_by_name.get(name)
        if spec is None:
            raise InvalidOptionError(
                f"unknown option {name} for format {format_name} (-o help lists the options)")
        parsed[name] = spec.parse(name, text)
    return parsed


def describe_options(specs: Sequence[OptionSpec], format_name: str) -> str:
    """Render the option list that `-o help` prints."""
    width = max(len(spec.name) for spec in specs)
    lines = [f"Supported {format_name} options:"]
    lines += [f"  {spec.name:<{width}}  {spec.help}" for spec in specs]
    return "\n".join(lines)


def parse_string(name: str, text: str) -> str:
    return text


def parse_bool(name: str, text: str) -> bool:
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise InvalidOptionError(f"invalid {name} {text}: must be on or off")


def parse_size_value(name: str, text: str) -> int:
    try:
        return parse_size(text)
    except ValueError:
        raise InvalidOptionError(
            f"invalid {name} {text}: expected a byte count with an optional K, M, G or T suffix"
        ) from None


def parse_integer(name: str, text: str) -> int:
    try:
        return int(text.strip(), 10)
    except ValueError:
        raise InvalidOptionError(f"invalid {name} {text}: expected a whole number") from None


def choice_parser(*choices: str,
                  aliases: Optional[Mapping[str, str]] = None) -> Callable[[str, str], str]:
    """Return a parser that accepts one of `choices`, or an alias that maps to one of them."""
    aliases = aliases or {}

    def parse_choice(name: str, text: str) -> str:
        word = aliases.get(text, text)
        if word not in choices:
            raise InvalidOptionError(f"invalid {name} {text}: must be {join_choices(choices)}")
        return word
    return parse_choice


def join_choices(choices: Sequence[str]) -> str:
    """Join choices as English does: 'a', 'a or b', 'a, b or c'."""
    if len(choices) == 1:
        return choices[0]
    return ", ".join(choices[:-1]) + " or " + choices[-1]


def format_size_value(size: int) -> str:
    """Render a byte count with the largest suffix that divides it exactly: 65536 -> '64K'."""
    for unit, suffix in SIZE_SUFFIXES:
        if size and size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


def on_off(value: bool) -> str:
    return "on" if value else "off"
