"""Progress that reads well where it lands: a live bar on a terminal, a plain line now and then in a log.

Under ``nohup``, CI or ``> run.log`` a tqdm bar writes a carriage-return update per step, thousands of
them, into the file. :func:`progress` gives a tqdm bar when stderr is a terminal and otherwise a
:class:`LineProgress` that prints one line every ``every`` seconds (and one at the end).
:func:`quiet_libraries` turns off the progress bars of the libraries potstill calls (transformers'
weight loading and saving, datasets' ``map``, the hub's downloads) for ``--no-progress``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

#: seconds between two lines of a :class:`LineProgress`
LINE_EVERY = 30.0


class LineProgress:
    """The part of tqdm's interface potstill uses, printed as occasional plain lines."""

    def __init__(self, iterable: Iterable[Any] | None = None, total: int | None = None, desc: str = "",
                 initial: int = 0, every: float = LINE_EVERY, **_: Any):
        self.iterable, self.desc, self.n, self.every = iterable, desc, initial, every
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)  # type: ignore[arg-type]
        self.postfix = ""
        self.started = self.last = time.monotonic()

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.every:
            self._line()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = " ".join(f"{k} {v}" for k, v in values.items())

    def close(self) -> None:
        if self.n and time.monotonic() - self.started >= self.every:
            self._line()

    def _line(self) -> None:
        self.last = time.monotonic()
        of = f"/{self.total}" if self.total is not None else ""
        elapsed = self.last - self.started
        print(f"[{self.desc}] {self.n}{of} ({elapsed:.0f} s) {self.postfix}".rstrip(), file=sys.stderr, flush=True)


def progress(iterable: Iterable[T] | None = None, *, enabled: bool = True, **kwargs: Any) -> Any:
    """A progress bar over ``iterable`` (or one to ``update()`` by hand): tqdm on a terminal,
    occasional lines elsewhere, nothing when not ``enabled``."""
    if not enabled:
        return tqdm(iterable, disable=True, **kwargs)
    if sys.stderr.isatty():
        return tqdm(iterable, **kwargs)
    return LineProgress(iterable, **kwargs)


def quiet_libraries() -> None:
    """No progress bars from transformers, datasets or the hub (``--no-progress``)."""
    import datasets
    import huggingface_hub
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()
