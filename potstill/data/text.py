"""Reading text files: UTF-8, Latin-1 for older files (said so), and never a binary file taken for text."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

#: control characters that text files hold (tab, newlines, form feed); any other below 0x20 is suspect
_TEXT_CONTROLS = {9, 10, 12, 13}
#: the share of other control bytes above which a file is not text (real text has almost none)
MAX_CONTROL_SHARE = 0.01


def read_text(path: str | Path) -> str:
    """A text file as str: UTF-8, or Latin-1 for the older files that are not (with a log line).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not text (it holds NUL bytes, or more than 1% control bytes):
            Latin-1 decodes any bytes, so a binary file would otherwise train as "text".
    """
    raw = Path(path).read_bytes()
    if b"\0" in raw:
        raise ValueError(f"{path} is not a text file (it holds NUL bytes): give plain text files")
    controls = sum(raw.count(bytes([c])) for c in range(32) if c not in _TEXT_CONTROLS) + raw.count(b"\x7f")
    if raw and controls / len(raw) > MAX_CONTROL_SHARE:
        raise ValueError(f"{path} is not a text file ({controls:,} of its {len(raw):,} bytes are control "
                         "characters): give plain text files")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        log.info("%s is not UTF-8; reading it as Latin-1", path)
        return raw.decode("latin-1")
