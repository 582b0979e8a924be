"""Exceptions raised by the format drivers and turned into messages or errno values.

The CLI prints ``vdiskfs: <context>: <message>`` for any VdiskError and exits non-zero.
The FUSE layer turns CorruptImageError and OSError into EIO and ReadOnlyError into EROFS.
"""


class VdiskError(Exception):
    """Base class of every error that vdiskfs reports to the user in one line.

    Messages often quote names read from the image (backing file, snapshot and feature
    names). str() escapes their control characters, so a hostile image cannot break the
    message into several lines or send escape sequences to a terminal.
    """

    def __str__(self) -> str:
        text = super().__str__()
        if text.isprintable():
            return text
        return "".join(character if character.isprintable() else _escape(character)
                       for character in text)


def _escape(character: str) -> str:
    code = ord(character)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


class InvalidImageError(VdiskError):
    """The image is malformed: a header field or table is out of range."""


class UnsupportedFeatureError(VdiskError):
    """The image uses a feature that vdiskfs does not implement, such as encryption."""


class BackingChainError(VdiskError):
    """A backing file is missing, loops back on the chain, or the chain is too deep."""


class CorruptImageError(VdiskError):
    """Damage met while serving a request, such as an L2 entry that points past the end of the file."""


class FormatChangeError(VdiskError):
    """A write would make a raw image whose format was probed look like another format."""


class ReadOnlyError(VdiskError):
    """A write was requested on an image that is open read-only."""


class ImageLockedError(VdiskError):
    """Another process holds a lock on the image that conflicts with the requested access."""
