"""Parsing and printing of byte sizes as qemu-img writes them (512, 64K, 10G)."""

SUFFIXES = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40,
            "P": 1 << 50, "E": 1 << 60}


def parse_size(text: str) -> int:
    """Parse a size with an optional binary suffix K, M, G, T, P or E; raise ValueError."""
    value = text.strip().upper()
    if value.endswith("IB"):
        value = value[:-2]
    number, suffix = value, ""
    if value and value[-1] in SUFFIXES:
        number, suffix = value[:-1], value[-1]
    try:
        amount = float(number) if "." in number else int(number, 10)
    except ValueError:
        raise ValueError(f"invalid size '{text}' (expected a number with an optional K, M, G or T suffix)") from None
    size = int(amount * SUFFIXES[suffix])
    if size < 0 or amount != amount:
        raise ValueError(f"invalid size '{text}' (must not be negative)")
    return size


def format_size(size: int) -> str:
    """Render `size` as qemu-img does in its human output: '1 GiB', '64 KiB', '512 B'."""
    for unit, name in ((1 << 60, "EiB"), (1 << 50, "PiB"), (1 << 40, "TiB"), (1 << 30, "GiB"),
                       (1 << 20, "MiB"), (1 << 10, "KiB")):
        if size >= unit:
            value = size / unit
            text = f"{value:.3g}" if value < 1000 else f"{value:.0f}"
            return f"{text} {name}"
    return f"{size} B"
