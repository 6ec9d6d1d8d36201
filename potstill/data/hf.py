"""Any data set Hugging Face ``datasets`` reads, as the data section of every task.

A recipe's ``data`` section with a ``dataset`` key is a :class:`DatasetSpec`::

    data:
      dataset: csv                 # anything load_dataset takes (csv, json, parquet, text, imagefolder,
                                   # audiofolder, a hub name), a data file, or a save_to_disk folder
      data_files: {train: train.csv, validation: dev.csv}
      train_split: train
      eval_split: validation       # or eval_size: N to hold out N rows of train (fixed seed)
      text_column: text            # the columns a task reads: text / label / image / audio
      num_proc: 2                  # worker processes for preprocessing (Dataset.map)

A task asks for the columns it reads by *role* — ``spec.load(columns=["text", "label"])`` — and
gets the train and eval splits with exactly those columns, renamed to the roles. A column that
is not there is an error that lists the columns that are. :func:`encode_labels` turns a label
column (class names, integers or a ``ClassLabel``) into class ids, refusing a label outside the
model's. :meth:`DatasetSpec.map` preprocesses (tokenises, featurises) with ``Dataset.map(batched=True,
num_proc)``: its progress bar, and its cache — a rerun with the same data and the same
preprocessing reads the result instead of computing it again.

Hub names work for users with the network; local files need none. ``streaming: true`` reads
rows one by one (no Arrow copy of the whole set is written) and stops at ``max_train`` rows.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from pydantic import Discriminator, Field, Tag, model_validator

from ..config import _Section

log = logging.getLogger(__name__)

#: what ``save_to_disk`` writes into a folder (a Dataset, or a DatasetDict)
SAVED_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
#: a data file given as ``dataset:`` → the builder that reads it
BUILDERS_BY_SUFFIX = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
                      ".txt": "text", ".arrow": "arrow"}
#: the column roles with a field of their own (``text_column`` …); any other role: ``columns: {role: column}``
ROLES = ("text", "label", "image", "audio")


class DataError(ValueError):
    """Data that cannot be used: a missing column, an empty split, a bad label, a file that does not parse."""


class Splits(NamedTuple):
    """The rows a task trains and evaluates on (``datasets.Dataset``, columns named by role)."""

    train: Any
    eval: Any | None


class DatasetSpec(_Section):
    """A data set read with ``datasets``: files, a hub name, or a ``save_to_disk`` folder."""

    #: lets a recipe say ``name: dataset``; a ``dataset`` key alone is enough
    name: Literal["dataset"] = "dataset"
    #: what ``load_dataset`` takes: a builder (csv, json, parquet, text, imagefolder, audiofolder), a hub
    #: name or a folder of data files; or one data file (its suffix picks the builder); or a folder
    #: written by ``save_to_disk``
    dataset: str
    #: the builder's files: one path or glob, a list, or ``{split: files}``
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    #: imagefolder / audiofolder: the folder (``train/``, ``validation/`` … subfolders become splits)
    data_dir: str | None = None
    #: a hub data set's configuration (``load_dataset(name, config)``)
    config: str | None = None
    train_split: str = "train"
    #: the held-out split; null = ``eval_size`` rows of the train split, or the task's own default
    eval_split: str | None = None
    #: hold out this many rows of the train split (shuffled with ``split_seed``) for evaluation
    eval_size: int | None = Field(None, ge=1)
    split_seed: int = 0
    #: the columns each task reads, by role
    text_column: str = "text"
    label_column: str = "label"
    image_column: str = "image"
    audio_column: str = "audio"
    #: columns of other roles (``{role: column}``) for tasks that read more
    columns: dict[str, str] = Field(default_factory=dict)
    #: classification: the label names in class-id order; null = from the data (a ClassLabel's names,
    #: or the sorted distinct labels of the train split), or the loaded model's labels
    labels: list[str] | None = None
    #: use only N rows of each split, spread evenly over it (null = all)
    max_train: int | None = Field(None, ge=1)
    max_eval: int | None = Field(None, ge=1)
    #: read rows as a stream, without an Arrow copy of the whole set; stops after the rows used
    #: (``max_train`` + ``eval_size``, ``max_eval``)
    streaming: bool = False
    #: worker processes for preprocessing (``Dataset.map(num_proc=N)``)
    num_proc: int = Field(1, ge=1)
    #: where ``datasets`` keeps its Arrow files and preprocessing cache; null = its own
    #: (``$HF_DATASETS_CACHE``, ~/.cache/huggingface/datasets)
    cache_dir: str | None = None

    @model_validator(mode="after")
    def _one_way_to_evaluate(self) -> DatasetSpec:
        if self.eval_split is not None and self.eval_size is not None:
            raise ValueError("give eval_split (a held-out split) or eval_size (rows held out of the train split), "
                             "not both")
        if self.eval_split is not None and self.eval_split == self.train_split:
            raise ValueError(f"eval_split is the train split ({self.train_split!r}): evaluate on held-out rows "
                             "(another split, or eval_size)")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels repeat a name: {self.labels}")
        return self

    # ----- which columns -------------------------------------------------------------------------

    def column(self, role: str) -> str:
        """The data set's column for ``role`` (``columns[role]``, ``{role}_column``, else the role itself)."""
        if role in self.columns:
            return self.columns[role]
        return getattr(self, f"{role}_column", role) if role in ROLES else role

    def field_of(self, role: str) -> str:
        """The recipe field naming ``role``'s column (for error messages)."""
        return f"data.columns.{role}" if role in self.columns or role not in ROLES else f"data.{role}_column"

    @property
    def source(self) -> str:
        """The data set as errors name it."""
        files = f", data_files={self.data_files}" if self.data_files else ""
        folder = f", data_dir={self.data_dir}" if self.data_dir else ""
        return f"{self.dataset!r}{files}{folder}"

    # ----- loading -------------------------------------------------------------------------------

    def load(self, columns: Sequence[str], *, require_eval: bool = True) -> Splits:
        """The train and eval splits with the columns of ``columns`` (roles), renamed to the roles.

        The eval split is ``eval_split``, else ``eval_size`` rows held out of the train split
        (a fixed permutation by ``split_seed``), else a split called ``validation`` if there is one;
        with none of these, an error names the splits there are (or ``eval`` is None when
        ``require_eval`` is false: the task holds out its own).

        Raises:
            DataError: a split or column that is not there (naming those that are), an empty split,
                a data file that does not parse (naming it).
        """
        splits: Any = None
        if self.streaming:
            train, held_out = self._stream()
        else:
            splits = self._open()
            train = self._split(splits, self.train_split)
            held_out = None
            if self.eval_split is not None:
                held_out = self._split(splits, self.eval_split)
            elif self.eval_size is None and isinstance(splits, Mapping) and "validation" in splits:
                held_out = self._split(splits, "validation")
            elif self.eval_size is not None:
                if self.eval_size >= len(train):
                    raise DataError(f"data.eval_size: {self.eval_size} rows held out of the {len(train)} rows of "
                                    f"split {self.train_split!r} leaves none to train on")
                order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.split_seed)).tolist()
                held_out = train.select(sorted(order[: self.eval_size]))
                train = train.select(sorted(order[self.eval_size:]))
        if held_out is None and require_eval:
            have = ", ".join(self._stream_names() if splits is None else _names(splits)) or "(one, unnamed)"
            raise DataError(f"data: no held-out rows: {self.source} has the splits {have}; set data.eval_split "
                            "to one of them, or data.eval_size: N to hold out N rows of the train split")
        train = self._columns(_spread(train, self.max_train), columns, self.train_split)
        held_out = None if held_out is None else self._columns(_spread(held_out, self.max_eval), columns,
                                                               self.eval_split or "held out")
        return Splits(train, held_out)

    def _open(self) -> Any:
        """The data set: a DatasetDict (or one Dataset, from a save_to_disk folder)."""
        import datasets

        folder = Path(self.dataset).expanduser()
        if folder.is_dir() and any((folder / f).is_file() for f in SAVED_MARKERS):
            if self.data_files or self.config:
                raise DataError(f"data.dataset: {folder} is a folder written by save_to_disk; data_files and config "
                                "do not apply to it")
            try:
                return datasets.load_from_disk(str(folder))
            except Exception as exc:  # a damaged folder: say which
                raise DataError(f"data.dataset: cannot read the saved data set {folder}: "
                                f"{type(exc).__name__}: {exc}") from None
        return self._load_dataset(**self._builder())

    def _builder(self) -> dict[str, Any]:
        """``load_dataset``'s arguments: a data file given as ``dataset`` picks its builder by suffix."""
        path = Path(self.dataset).expanduser()
        name, files = self.dataset, self.data_files
        if path.is_file():
            builder = BUILDERS_BY_SUFFIX.get(path.suffix.lower())
            if builder is None:
                raise DataError(f"data.dataset: {path} is a file of unknown kind (suffix {path.suffix!r}); known: "
                                f"{', '.join(BUILDERS_BY_SUFFIX)}, or name a builder (csv, json, …) with data_files")
            if files is not None:
                raise DataError(f"data.dataset is a file ({path}): give its split files as data_files with "
                                f"dataset: {builder}, not both")
            name, files = builder, {self.train_split: str(path)}
        kwargs: dict[str, Any] = {"path": name, "data_files": files}
        if self.config:
            kwargs["name"] = self.config
        if self.data_dir:
            kwargs["data_dir"] = self.data_dir
        if path.suffix.lower() == ".tsv" or (isinstance(files, str) and files.lower().endswith(".tsv")):
            kwargs["sep"] = "\t"
        return kwargs

    def _load_dataset(self, streaming: bool = False, **kwargs: Any) -> Any:
        import datasets

        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        try:
            with _quiet_datasets():
                return datasets.load_dataset(**kwargs, cache_dir=self.cache_dir, streaming=streaming)
        except FileNotFoundError as exc:
            raise DataError(f"data: {self.source}: {exc}") from None
        except ValueError as exc:
            if "corresponds to no data" in str(exc):  # a file with a header and no rows
                split = re.search(r'Instruction "([^"]+)"', str(exc))
                raise DataError(f"data: split {split.group(1) if split else '?'!r} of {self.source} is empty "
                                "(its files hold no rows)") from None
            raise DataError(f"data: cannot load {self.source}: {exc}") from None
        except Exception as exc:
            raise DataError(f"data: cannot load {self.source}: {self._culprit(kwargs, exc)}") from None

    def _culprit(self, kwargs: dict[str, Any], exc: Exception) -> str:
        """What went wrong, naming the data file that does not parse when there are several."""
        cause = exc.__cause__ or exc
        reason = f"{type(cause).__name__}: {cause}"
        files = _file_list(kwargs.get("data_files"))
        if len(files) == 1:
            return f"{files[0]} does not parse ({reason})"
        import tempfile

        import datasets

        for file in files[:20]:  # read each alone, in a scratch cache, to find the one that fails
            with tempfile.TemporaryDirectory() as scratch, _quiet_datasets():
                try:
                    datasets.load_dataset(kwargs["path"], data_files=[file], cache_dir=scratch,
                                          **{k: v for k, v in kwargs.items() if k not in ("path", "data_files")})
                except Exception as each:
                    inner = each.__cause__ or each
                    return f"{file} does not parse ({type(inner).__name__}: {inner})"
        return reason

    def _split(self, splits: Any, split: str) -> Any:
        import datasets

        if isinstance(splits, datasets.Dataset):  # a save_to_disk folder holding one Dataset
            if split != self.train_split:
                raise DataError(f"data.eval_split: {self.dataset} holds one data set, without splits: hold out "
                                "rows with data.eval_size instead")
            rows = splits
        elif split not in splits:
            close = difflib.get_close_matches(split, list(splits), n=1)
            field = "data.train_split" if split == self.train_split else "data.eval_split"
            raise DataError(f"{field}: {self.source} has no split {split!r}; it has {', '.join(splits)}"
                            + (f"; did you mean {close[0]!r}?" if close else ""))
        else:
            rows = splits[split]
        if len(rows) == 0:
            raise DataError(f"data: split {split!r} of {self.source} is empty")
        return rows

    def _stream_names(self) -> list[str]:
        return list(self._load_dataset(streaming=True, **self._builder()))

    def _stream(self) -> tuple[Any, Any | None]:
        """Streamed rows, read only as far as they are used, as in-memory data sets."""
        from itertools import islice


        if Path(self.dataset).expanduser().is_dir() and any((Path(self.dataset) / f).is_file() for f in SAVED_MARKERS):
            raise DataError("data.streaming: a save_to_disk folder is read from disk as it is; streaming applies to "
                            "load_dataset sources")
        streams = self._load_dataset(streaming=True, **self._builder())
        if self.train_split not in streams:
            raise DataError(f"data.train_split: {self.source} has no split {self.train_split!r}; it has "
                            f"{', '.join(streams)}")
        if self.max_train is None:
            log.warning("data.streaming without data.max_train reads the whole train split (into memory)")
        held_out = None
        eval_split = self.eval_split or ("validation" if self.eval_size is None and "validation" in streams else None)
        if eval_split is not None:
            if eval_split not in streams:
                raise DataError(f"data.eval_split: {self.source} has no split {self.eval_split!r}; it has "
                                f"{', '.join(streams)}")
            held_out = _materialise(islice(streams[eval_split], self.max_eval), streams[eval_split])
        stream = iter(streams[self.train_split])
        if self.eval_size is not None:  # a stream has no length to shuffle over: its first rows are held out
            held_out = _materialise(islice(stream, self.eval_size), streams[self.train_split])
        train = _materialise(islice(stream, self.max_train), streams[self.train_split])
        for split, rows in ((self.train_split, train), ("held out", held_out)):
            if rows is not None and len(rows) == 0:
                raise DataError(f"data: split {split!r} of {self.source} is empty")
        return train, held_out

    def _columns(self, rows: Any, roles: Sequence[str], split: str) -> Any:
        """Only the columns of ``roles``, renamed to them; a missing one names those there are."""
        have = list(rows.column_names)
        wanted = {role: self.column(role) for role in roles}
        for role, column in wanted.items():
            if column not in have:
                close = difflib.get_close_matches(column, have, n=1)
                raise DataError(f"{self.field_of(role)}: column {column!r} is not in split {split!r} of "
                                f"{self.source}; its columns: {', '.join(have)}"
                                + (f"; did you mean {close[0]!r}?" if close else ""))
        taken = list(dict.fromkeys(wanted.values()))
        if len(taken) != len(wanted):
            raise DataError(f"data: the roles {', '.join(wanted)} name the same column twice ({wanted})")
        rows = rows.select_columns(taken)
        # two steps: a rename may swap names (role "text" reads column "label" and the other way round)
        temporary = {column: f"__potstill_{role}" for role, column in wanted.items()}
        rows = rows.rename_columns(temporary)
        return rows.rename_columns({f"__potstill_{role}": role for role in wanted})

    # ----- preprocessing -------------------------------------------------------------------------

    def map(self, rows: Any, function: Callable[..., dict[str, list[Any]]], *, fingerprint: Sequence[Any],
            desc: str, batch_size: int = 256, progress: bool = True, remove_columns: bool = True,
            with_indices: bool = False, features: Any = None) -> Any:
        """``rows.map(function, batched=True, num_proc=num_proc)`` with a progress bar and a cache.

        ``fingerprint`` is what makes the result what it is besides the rows (a tokenizer's
        identity, a maximum length, a version string): the cache key is the rows' fingerprint and
        this, so a rerun with the same data and settings reads the stored result (data sets read
        from files keep it beside their Arrow files; rows held in memory are cached under
        ``cache_dir`` when it is set).
        """
        import datasets
        from datasets.fingerprint import Hasher

        key = Hasher.hash([rows._fingerprint, list(fingerprint), "potstill.data.hf/1"])
        cache: dict[str, Any] = {"new_fingerprint": key}
        if not rows.cache_files:
            if self.cache_dir is None:
                cache["keep_in_memory"] = True
            else:
                Path(self.cache_dir).mkdir(parents=True, exist_ok=True)
                cache["cache_file_name"] = str(Path(self.cache_dir) / f"potstill-{key}.arrow")
        with _progress_bars(progress):
            out = rows.map(function, batched=True, batch_size=batch_size, with_indices=with_indices,
                           num_proc=self.num_proc if self.num_proc > 1 and len(rows) >= self.num_proc else None,
                           remove_columns=rows.column_names if remove_columns else None, desc=desc,
                           features=features, **cache)
        assert isinstance(out, datasets.Dataset)
        return out


def _names(splits: Any) -> list[str]:
    return list(splits) if isinstance(splits, Mapping) else []


def _file_list(files: Any) -> list[str]:
    if files is None:
        return []
    if isinstance(files, str):
        return [files]
    if isinstance(files, Mapping):
        return [f for value in files.values() for f in _file_list(value)]
    return [str(f) for f in files]


def _materialise(rows: Iterator[dict[str, Any]], stream: Any) -> Any:
    from datasets import Dataset

    return Dataset.from_list(list(rows), features=getattr(stream, "features", None))


def _spread(rows: Any, count: int | None) -> Any:
    """``count`` rows evenly spaced over ``rows`` (every part of a sorted split contributes), or all."""
    if count is None or count >= len(rows):
        return rows
    return rows.select([i * len(rows) // count for i in range(count)])


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """datasets' bars off inside when not ``enabled``; otherwise as they are (``--no-progress`` turns
    them off for the whole run)."""
    from datasets.utils import logging as ds_logging

    was = ds_logging.is_progress_bar_enabled()
    if not enabled:
        ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        (ds_logging.enable_progress_bar if was else ds_logging.disable_progress_bar)()


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """datasets logs each file it fails to read at ERROR before raising: potstill's error says it once."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


# ----- labels ----------------------------------------------------------------------------------------


def encode_labels(splits: Splits, names: Sequence[str] | None = None, *, column: str = "label",
                  field: str = "data.label_column") -> tuple[Splits, list[str]]:
    """The label column as class ids (int64), and the class names in id order.

    Labels may be a ``ClassLabel`` (its names), strings (class names) or integers (class ids).
    ``names`` are the classes the model knows (``data.labels``, or a trained classifier's); a label
    outside them is an error naming the row and the labels there are. Without ``names``: the train
    split's ClassLabel names, its sorted distinct strings, or ``0 … max`` for integers.
    """
    from datasets import ClassLabel

    if names is None:
        feature = splits.train.features[column]
        _label_kind(feature, field)
        if isinstance(feature, ClassLabel):
            names = list(feature.names)
        elif _label_kind(feature, field) == "name":
            names = sorted({str(v) for v in splits.train[column] if v is not None})
        else:
            top = max((int(v) for v in splits.train[column] if v is not None), default=0)
            names = [str(i) for i in range(top + 1)]
    names = list(names)
    out = []
    for split, rows in (("train", splits.train), ("eval", splits.eval)):
        if rows is None:
            out.append(None)
            continue
        feature = rows.features[column]
        kind = _label_kind(feature, field)
        if kind == "id" and not (isinstance(feature, ClassLabel) and list(feature.names) != names):
            _check_ids(rows, split, len(names), column, field)
            out.append(_cast_ids(rows, column))
        elif isinstance(feature, ClassLabel):  # its own names, in another order: re-keyed by name
            own = list(feature.names)
            out.append(_by_name(rows, split, names, column, field, lambda v, own=own: own[v]))
        else:
            out.append(_by_name(rows, split, names, column, field, str))
    return Splits(*out), names


def _label_kind(feature: Any, field: str) -> str:
    """"id" (ClassLabel, integers) or "name" (strings); anything else is an error."""
    from datasets import ClassLabel, Value

    if isinstance(feature, ClassLabel):
        return "id"
    if isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
        return "name"
    if isinstance(feature, Value) and (feature.dtype.startswith(("int", "uint")) or feature.dtype == "bool"):
        return "id"
    raise DataError(f"{field}: the label column holds {feature}; expected class names (strings), class ids "
                    "(integers) or a ClassLabel")


def _where(split: str, index: int) -> str:
    return f"row {index} of the {split} split"


def _check_ids(rows: Any, split: str, count: int, column: str, field: str) -> None:
    for index, value in enumerate(rows[column]):
        if value is None or not 0 <= int(value) < count:
            raise DataError(f"{field}: label {value!r} ({_where(split, index)}) is outside the model's "
                            f"{count} classes (0 to {count - 1})")


def _by_name(rows: Any, split: str, names: list[str], column: str, field: str, spell: Callable[[Any], str]) -> Any:
    """Labels stored as names (``spell`` turns a stored value into its name) → their ids in ``names``."""
    index = {name: i for i, name in enumerate(names)}
    ids = []
    for row, value in enumerate(rows[column]):
        name = None if value is None else spell(value)
        if name not in index:
            close = difflib.get_close_matches(str(name), names, n=1)
            raise DataError(f"{field}: label {name!r} ({_where(split, row)}) is not one of the model's labels: "
                            f"{', '.join(names)}" + (f"; did you mean {close[0]!r}?" if close else ""))
        ids.append(index[name])
    with _progress_bars(False):
        order = rows.column_names  # added first, then the old one dropped: a set of one column never has none
        return rows.add_column("__potstill_ids", ids).remove_columns(column) \
            .rename_column("__potstill_ids", column).select_columns(order)


def _cast_ids(rows: Any, column: str) -> Any:
    from datasets import Value

    return rows.cast_column(column, Value("int64"))


# ----- recipe sections -------------------------------------------------------------------------------


def data_section(variants: Mapping[str, type], default: str) -> Any:
    """A recipe's ``data`` field that is one of ``variants`` (tag → section class): a mapping with a
    ``dataset`` key is the ``"dataset"`` variant, any other is chosen by its ``name`` (``default``
    when it has none), so today's sections keep working unchanged beside :class:`DatasetSpec`."""
    from typing import Annotated, Union

    def tag(value: Any) -> str:
        if isinstance(value, Mapping):
            return "dataset" if "dataset" in value else str(value.get("name", default))
        return str(getattr(value, "name", default))

    options = tuple(Annotated[cls, Tag(name)] for name, cls in variants.items())
    return Annotated[Union[options], Discriminator(tag)]  # noqa: UP007 - a runtime-built union


__all__ = ["ROLES", "DataError", "DatasetSpec", "Splits", "data_section", "encode_labels"]
