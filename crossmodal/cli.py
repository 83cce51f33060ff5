"""Shared command-line pieces: common flags, argparse value checks, logging, threads, device
choice, error reporting.

Every value a user types is checked when the flags are parsed (the ``type=`` functions
below), so a bad one ends as argparse's usage line plus one line naming the flag and the
value, exit code 2, before any work starts. Failures found later (missing or corrupt files,
mismatches) are the project's errors (:mod:`crossmodal.errors`); :func:`run_script` prints
them as one line, exit code 2. A traceback means a bug.
"""

from __future__ import annotations

import argparse
import errno
import functools
import logging
import os
import subprocess
import sys
from pathlib import Path

from . import __version__
from .errors import DataError
from .splits import DATASETS, parse_split

log = logging.getLogger("crossmodal")

# OpenMP threads waiting for work sleep instead of spinning. With spinning (libgomp's default),
# a process whose cores are shared (other jobs, a second extraction) burns them in busy-waits:
# on the 2-core machine here, under load, 200 demo images took 68-130 s alone and 270 s each as
# two concurrent extractions, against 13-26 s and 30 s with PASSIVE (README "Several jobs on one
# machine"). Read when torch loads libgomp, so it is set here, before the scripts import torch;
# OMP_WAIT_POLICY=ACTIVE in the environment restores spinning.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

MAX_TEXT_CHARS = 1000  # a typed query sentence


# --- argparse value checks ----------------------------------------------------------------
# Each raises argparse.ArgumentTypeError, which argparse prints as
# "error: argument --flag: <message>" (exit code 2); the message repeats the value.


def _int(text: str) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _float(text: str) -> float:
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return v


def positive_int(text: str) -> int:
    """An integer >= 1."""
    v = _int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer (>= 1)")
    return v


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    v = _int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be an integer >= 0")
    return v


def int_in_range(lo: int, hi: int):
    """An integer in [lo, hi]."""

    def check(text: str) -> int:
        v = _int(text)
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{text!r} is out of range: give an integer from {lo} to {hi}")
        return v

    check.__name__ = f"int_in_range({lo}, {hi})"
    return check


def positive_float(text: str) -> float:
    """A finite number > 0."""
    v = _float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number > 0")
    return v


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    v = _float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number >= 0")
    return v


def probability(text: str) -> float:
    """A number in [0, 1): a dropout rate (1 would drop everything)."""
    v = _float(text)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number in [0, 1)")
    return v


def existing_file(text: str) -> str:
    """A path to an existing file."""
    if not text or not text.strip():
        raise argparse.ArgumentTypeError("an empty path was given")
    p = Path(text)
    if not p.exists():
        raise argparse.ArgumentTypeError(f"{text!r}: no such file")
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a file")
    return text


def existing_dir(text: str) -> str:
    """A path to an existing folder."""
    if not text or not text.strip():
        raise argparse.ArgumentTypeError("an empty path was given")
    p = Path(text)
    if not p.exists():
        raise argparse.ArgumentTypeError(f"{text!r}: no such folder")
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a folder")
    return text


# Unicode categories that print nothing on their own: separators (Z*), controls and format characters
# such as the zero-width space (Cc, Cf), unassigned and private-use code points (Cn, Co), surrogates
# (Cs), and combining marks (M*), which only decorate a base character.
_INVISIBLE = ("Z", "Cc", "Cf", "Cn", "Co", "Cs", "M")


def has_visible_text(text) -> bool:
    """True when ``text`` is a string with at least one printing character: a letter, digit,
    punctuation or symbol (Unicode-aware: zero-width spaces, no-break spaces or combining accents
    alone are none)."""
    import unicodedata

    return isinstance(text, str) and any(not unicodedata.category(c).startswith(_INVISIBLE) for c in text)


def non_blank_text(max_chars: int = MAX_TEXT_CHARS):
    """A string with a visible character (not only white space or zero-width ones), at most ``max_chars`` long."""

    def check(text: str) -> str:
        if not has_visible_text(text):
            raise argparse.ArgumentTypeError(f"{text!r} is blank (no visible character): give some words")
        if len(text) > max_chars:
            raise argparse.ArgumentTypeError(f"{text[:40]!r}... is {len(text)} characters long, at most {max_chars}")
        return text

    check.__name__ = "non_blank_text"
    return check


def run_name(text: str) -> str:
    """A run name: one folder name inside ``--runs-dir``, never a path (no ``/``, ``\\``, ``..``,
    control characters, and not blank), so nothing is written outside the runs folder."""
    if not has_visible_text(text):
        raise argparse.ArgumentTypeError(f"{text!r} is blank: give a folder name")
    bad = [c for c in ("/", "\\") if c in text]
    if bad or text in (".", "..") or text != text.strip() or any(ord(c) < 32 or ord(c) == 127 for c in text):
        why = f"contains {bad[0]!r}" if bad else "is not a plain folder name"
        raise argparse.ArgumentTypeError(f"{text!r} {why}: a run name is a name, not a path (use --runs-dir to "
                                         "choose the folder runs go in)")
    if len(text.encode()) > 200:
        raise argparse.ArgumentTypeError(f"{text[:40]!r}... is longer than 200 bytes")
    return text


def split_name(text: str) -> str:
    """``NAME`` or ``NAME[start:stop]`` (Karpathy and Flickr8k splits joined with ``+``)."""
    try:
        parse_split(text)
    except DataError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


# --- logging, threads ---------------------------------------------------------------------


def setup_logging(verbose: bool = False) -> None:
    """Configure logging once; a later call with ``verbose=True`` still turns on debug lines
    (the scripts set logging up before the stage has parsed its ``-v``)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    if verbose:  # the project's loggers only: third-party debug output (matplotlib, PIL) stays quiet
        for name in ("crossmodal", "__main__"):
            logging.getLogger(name).setLevel(logging.DEBUG)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity: ``taskset``, cgroups cpusets), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def set_threads(n: int | None = None) -> int:
    """Intra-op threads of torch = the cores available to this process (``OMP_NUM_THREADS``
    wins when set). torch's default counts the machine's cores, so processes pinned with
    ``taskset`` to a share of them would each run more threads than they have cores."""
    import torch

    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if n is None and env.isdigit() and int(env) > 0:
        n = int(env)
    n = n or available_cores()
    torch.set_num_threads(n)
    log.debug("torch intra-op threads: %d (cores available to this process: %d)", n, available_cores())
    return n


# --- common flags -------------------------------------------------------------------------


def add_data_args(p: argparse.ArgumentParser, split_default: str | None = None) -> None:
    p.add_argument("--coco-root", required=True, type=existing_dir,
                   help="dataset folder: COCO (annotations/ and one folder per split), or Flickr8k / Flickr30k "
                        "as downloaded (docs/datasets.md)")
    p.add_argument("--split", default=split_default, required=split_default is None, type=split_name,
                   help="split name (COCO: train2014, val2017, ...; Flickr8k: train/dev/test; Flickr30k: all), "
                        "optionally sliced: NAME[a:b]")
    add_dataset_arg(p)
    p.add_argument("--karpathy-file", default=None, type=existing_file,
                   help="Karpathy dataset_{coco,flickr8k,flickr30k}.json; --split is then train/restval/val/test "
                        "(joined by +)")
    p.add_argument("--skip-bad", action="store_true",
                   help="drop unreadable images, images without captions and empty captions (counted, logged)")


def add_dataset_arg(p: argparse.ArgumentParser) -> None:
    """``--dataset``: which loader reads ``--coco-root`` (:func:`crossmodal.coco.load_split`)."""
    p.add_argument("--dataset", default="auto", choices=DATASETS,
                   help="auto (default): read from the root's files (Flickr8k.token.txt: flickr8k; "
                        "results_20130124.token or results.csv: flickr30k; annotations/: coco) or the Karpathy file")


def add_run_args(p: argparse.ArgumentParser, batch_size: int | None) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-size", type=positive_int, default=batch_size,
                   help=None if batch_size else "default: 4 on the CPU, 32 on a GPU")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--force", action="store_true", help="redo the work even if its outputs exist")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def resolve_device(name: str):
    """``auto`` -> CUDA when available; under torchrun each process takes GPU ``LOCAL_RANK``."""
    import torch

    env_int("LOCAL_RANK", 0)  # a malformed value is refused on every device, not only where a GPU reads it
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            from .errors import ModelError

            raise ModelError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
        return torch.device("cuda", env_int("LOCAL_RANK", 0) % torch.cuda.device_count())
    return torch.device(name)


def env_int(name: str, default: int, minimum: int = 0) -> int:
    """An integer environment variable set by a launcher (torchrun's ``LOCAL_RANK``, ``RANK``,
    ``WORLD_SIZE``): ``default`` when unset; a value that is not an integer >= ``minimum`` is one
    :class:`~crossmodal.errors.DataError` line naming it."""
    from .errors import DataError

    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        v = int(text)
    except ValueError:
        v = None
    if v is None or v < minimum:
        raise DataError(f"environment variable {name}={text!r} is not an integer >= {minimum} (it is set by "
                        "torchrun; unset it or give a number)")
    return v


@functools.cache
def code_version() -> str:
    """Package version plus the git commit when run from a checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


# --- the scripts' entry point ---------------------------------------------------------------

# OS failures that are the environment's, not the code's: always one line
_ENV_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EMFILE}
# failures on a named path: one line when the error names the file
_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError)


def free_mb(path) -> float | None:
    """Free megabytes on the file system that holds ``path`` (its nearest existing folder), None when unknown."""
    import shutil

    try:
        where = next(p for p in (Path(path), *Path(path).parents) if p.exists())
        return shutil.disk_usage(where).free / 1e6
    except (OSError, StopIteration, TypeError, ValueError):
        return None


def _free_space(path) -> str:
    """`` (12.3 MB free there)`` for the file system of ``path``, or '' when unknown."""
    free = free_mb(path)
    return "" if free is None else f" ({free:.1f} MB free there)"


def os_error_line(e: OSError) -> str | None:
    """One line for an OS error a user can fix (disk full, permission, missing path), naming the
    file; None for anything else (a bug: it keeps its traceback)."""
    name = e.filename if e.filename is not None else None
    where = f"{name}" + (f" -> {e.filename2}" if e.filename2 else "") if name is not None else None
    reason = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device while writing {where or 'an output file'}{_free_space(name)}: free some "
                "space and rerun")
    if e.errno in _ENV_ERRNOS and where:
        return f"{where}: {reason}"
    if e.errno in _ENV_ERRNOS and isinstance(e, PermissionError):
        return f"permission denied: {reason}"
    if isinstance(e, FileExistsError | NotADirectoryError) and where:
        return f"{where}: {reason} (a file stands where a folder is needed: check the output path)"
    if isinstance(e, _PATH_ERRORS) and where:
        return f"{where}: {reason}"
    return None


def _close_progress_bars() -> None:
    """Close open tqdm bars, so that the error line comes after them, as the last line."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        bar.close()


def _fail(line: str) -> None:
    _close_progress_bars()
    log.error("%s", line)
    log.debug("traceback of the error above", exc_info=True)
    sys.exit(2)


def run_script(main) -> None:
    """``if __name__ == "__main__"`` helper: known errors become one clear line, exit code 2.

    Sets logging up (``-v``/``--verbose`` on the command line: debug lines) and torch's thread
    count from the cores available to the process, then runs ``main()``. The project's errors and
    OS errors a user can fix (disk full, permission denied, a missing file) end as one line
    naming the value or file; with ``-v`` the traceback follows at debug level. Anything else
    is a bug and keeps its traceback."""
    from .errors import CrossmodalError

    setup_logging(verbose=any(a in ("-v", "--verbose") for a in sys.argv[1:]))
    set_threads()
    try:
        main()
    except CrossmodalError as e:
        _fail(str(e))
    except OSError as e:
        line = os_error_line(e)
        if line is None:
            raise
        _fail(line)
    except KeyboardInterrupt:
        _close_progress_bars()
        log.error("interrupted; finished work is kept and a rerun resumes")
        sys.exit(130)
