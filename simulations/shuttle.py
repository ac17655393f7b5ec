"""Read UCI Statlog (Shuttle) from the R data file of the mlbench package.

The data set (Catlett, NASA; UCI Machine Learning Repository, "Statlog
(Shuttle)") holds 58,000 readings of 9 numeric sensor attributes of the space
shuttle's radiators, each labelled with one of 7 states; about 80 % are
``Rad.Flow``, the smallest class has 17 rows. fedge uses it as its
predictive-maintenance data set: tabular, numeric, very imbalanced.

fedge reads ``Shuttle.rda`` of the CRAN package mlbench, which Debian ships as
``r-cran-mlbench`` under ``/usr/lib/R/site-library/mlbench/data``; the directory
can be overridden with an argument or the ``FEDGE_SHUTTLE_DIR`` environment
variable. The file holds one R data frame ``Shuttle``: numeric columns ``V1`` to
``V9`` and the factor ``Class``. Its rows are UCI's ``shuttle.trn`` (43,500 rows)
followed by ``shuttle.tst`` (14,500 rows).

Preprocessing
-------------
- Split: the last quarter of the rows is the test split, the rest the train
  split. For the real file that is exactly UCI's original split (43,500 /
  14,500); it is deterministic and involves no random numbers.
- Features: standardised per column, ``(x - mean) / std``, with the mean and
  the (population) standard deviation of the **train split only**, so nothing
  of the test split leaks into training; a constant column gets std 1. The
  statistics are kept in :class:`Shuttle` (``mean``, ``std``) so raw readings
  can be transformed the same way at inference. Stored as float32 ``(N, 9)``.
- Labels: the factor's codes, 0-based, as uint8 ``(N,)``; the class names are
  the factor's levels in order (``Rad.Flow``, ``Fpv.Close``, ``Fpv.Open``,
  ``High``, ``Bypass``, ``Bpv.Close``, ``Bpv.Open``: UCI's classes 1..7).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fedge.errors import DataError
from simulations.data import Split

__all__ = [
    "DEFAULT_SHUTTLE_DIR",
    "FEATURE_NAMES",
    "HOW_TO_GET",
    "SHUTTLE_DIR_ENV",
    "SHUTTLE_FILE",
    "Shuttle",
    "load_shuttle",
    "resolve_shuttle_dir",
]

DEFAULT_SHUTTLE_DIR = Path("/usr/lib/R/site-library/mlbench/data")
SHUTTLE_DIR_ENV = "FEDGE_SHUTTLE_DIR"
SHUTTLE_FILE = "Shuttle.rda"
FEATURE_NAMES = tuple(f"V{i}" for i in range(1, 10))
_OBJECT = "Shuttle"
_CLASS_COLUMN = "Class"
# The test split is the last 1/_TEST_DENOMINATOR of the rows: 14,500 of 58,000.
_TEST_DENOMINATOR = 4
_MIN_ROWS = _TEST_DENOMINATOR

HOW_TO_GET = (
    "Get it with `sudo apt-get install r-cran-mlbench` (Debian/Ubuntu, installs "
    f"{DEFAULT_SHUTTLE_DIR / SHUTTLE_FILE}), or take {SHUTTLE_FILE} from the data/ folder "
    "of the CRAN package mlbench (cran.r-project.org/package=mlbench), put it in a "
    f"directory and pass --data-dir DIR or set {SHUTTLE_DIR_ENV}=DIR."
)


@dataclass(frozen=True, slots=True)
class Shuttle:
    """Both splits, preprocessed, with the class names and the standardisation statistics.

    ``train.images`` / ``test.images`` hold the standardised float32 (N, 9)
    features (the field name is historical, see :class:`~simulations.data.Split`),
    ``labels`` uint8 class indices. ``mean`` and ``std`` are the train split's
    per-feature statistics the features were standardised with.
    """

    train: Split
    test: Split
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class _Factor:
    codes: Any
    levels: Any


@dataclass(frozen=True, slots=True)
class _Frame:
    columns: dict[str, Any]


def _factor(obj: Any, attrs: Mapping[str, Any]) -> _Factor:
    return _Factor(codes=obj, levels=attrs.get("levels"))


def _frame(obj: Any, attrs: Mapping[str, Any]) -> _Frame:
    if not isinstance(obj, Mapping):
        raise TypeError("a data frame without column names")
    return _Frame(columns={str(name): value for name, value in obj.items()})


def resolve_shuttle_dir(explicit: Path | str | None = None) -> Path:
    """Return the directory of ``Shuttle.rda``: ``explicit``, ``$FEDGE_SHUTTLE_DIR``, the default.

    Parameters
    ----------
    explicit
        A directory given by the caller; ``None`` or ``""`` to fall through.

    Returns
    -------
    pathlib.Path
        The directory (not checked).
    """
    if explicit is not None and str(explicit) != "":
        return Path(explicit)
    from_env = os.environ.get(SHUTTLE_DIR_ENV, "")
    return Path(from_env) if from_env else DEFAULT_SHUTTLE_DIR


def _read(path: Path) -> _Frame:
    # rdata is imported here: it pulls in pandas and xarray, which only this data
    # set needs.
    import rdata

    try:
        with warnings.catch_warnings():
            # rdata warns about what it guesses on a damaged file ("Unknown file type:
            # assumed RDS"); the checks below reject such a file with one clear error.
            warnings.simplefilter("ignore", UserWarning)
            objects = rdata.read_rda(
                path,
                # Plain numpy instead of pandas: a data frame becomes a dict of columns,
                # a factor its codes and levels, so every check below is explicit.
                constructor_dict={"data.frame": _frame, "factor": _factor},
                default_encoding="utf-8",
            )
    except Exception as exc:
        # A parser of a binary format raises whatever a damaged file makes it hit
        # (EOFError, lzma.LZMAError, ValueError, NotImplementedError, KeyError, ...);
        # all of them mean the same to the caller: this file cannot be used.
        raise DataError(
            f"cannot read {path}: {type(exc).__name__}: {exc}. The file is corrupt "
            f"or not an R data file. {HOW_TO_GET}"
        ) from exc
    frame = objects.get(_OBJECT)
    if not isinstance(frame, _Frame):
        found = ", ".join(sorted(map(str, objects))) or "nothing"
        raise DataError(
            f"{path} holds no data frame named {_OBJECT!r} (found: {found}). {HOW_TO_GET}"
        )
    return frame


def _features(path: Path, frame: _Frame) -> npt.NDArray[np.float64]:
    expected = [*FEATURE_NAMES, _CLASS_COLUMN]
    if list(frame.columns) != expected:
        raise DataError(
            f"{path}: the data frame has columns {list(frame.columns)}, expected {expected}"
        )
    columns = []
    for name in FEATURE_NAMES:
        column = frame.columns[name]
        if not isinstance(column, np.ndarray) or column.ndim != 1:
            raise DataError(f"{path}: column {name} is not a numeric vector")
        if not (
            np.issubdtype(column.dtype, np.floating) or np.issubdtype(column.dtype, np.integer)
        ):
            raise DataError(f"{path}: column {name} holds {column.dtype}, not numbers")
        values = np.ma.filled(np.ma.asarray(column, dtype=np.float64), np.nan)
        # R's NA_integer_ is the smallest int32; rdata may leave it unmasked.
        if np.issubdtype(column.dtype, np.integer):
            values[np.ma.getdata(column) == np.iinfo(np.int32).min] = np.nan
        bad = int((~np.isfinite(values)).sum())
        if bad:
            raise DataError(f"{path}: column {name} holds {bad} missing or non-finite values")
        columns.append(values)
    lengths = {len(c) for c in columns}
    if len(lengths) != 1:
        raise DataError(f"{path}: the feature columns differ in length: {sorted(lengths)}")
    return np.stack(columns, axis=1)


def _labels(
    path: Path, frame: _Frame, num_rows: int
) -> tuple[npt.NDArray[np.uint8], tuple[str, ...]]:
    factor = frame.columns[_CLASS_COLUMN]
    if not isinstance(factor, _Factor):
        raise DataError(f"{path}: column {_CLASS_COLUMN} is not a factor")
    levels = factor.levels
    if not isinstance(levels, np.ndarray) or levels.ndim != 1 or levels.dtype.kind != "U":
        raise DataError(f"{path}: the {_CLASS_COLUMN} factor has no levels")
    class_names = tuple(str(level) for level in levels)
    if len(class_names) < 2 or len(class_names) > np.iinfo(np.uint8).max:
        raise DataError(f"{path}: the {_CLASS_COLUMN} factor has {len(class_names)} levels")
    if len(set(class_names)) != len(class_names) or not all(class_names):
        raise DataError(f"{path}: the {_CLASS_COLUMN} factor's levels are not distinct names")
    codes = factor.codes
    if not isinstance(codes, np.ndarray) or codes.ndim != 1 or codes.dtype.kind not in "iu":
        raise DataError(f"{path}: the {_CLASS_COLUMN} factor's codes are not integers")
    if len(codes) != num_rows:
        raise DataError(f"{path}: {len(codes)} labels for {num_rows} rows")
    raw = np.ma.getdata(codes).astype(np.int64)
    # R's factor codes are 1-based; NA is masked or the smallest int32 (< 1 either way).
    unusable = np.ma.getmaskarray(codes) | (raw < 1) | (raw > len(class_names))
    missing = int(unusable.sum())
    if missing:
        raise DataError(f"{path}: {missing} rows have a missing or unknown {_CLASS_COLUMN}")
    return (raw - 1).astype(np.uint8), class_names


def _frozen(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    array.setflags(write=False)
    return array


def load_shuttle(data_dir: Path | str | None = None) -> Shuttle:
    """Load, check, split and standardise UCI Shuttle from ``Shuttle.rda``.

    Parameters
    ----------
    data_dir
        The directory holding ``Shuttle.rda``; ``None`` resolves it with
        :func:`resolve_shuttle_dir`.

    Returns
    -------
    Shuttle
        Read-only arrays: the first three quarters of the rows as the train split,
        the last quarter as the test split, features standardised with the train
        split's statistics (see the module's docstring).

    Raises
    ------
    DataError
        If the directory or the file is missing (the message says how to get it),
        the file cannot be parsed, or it does not hold a ``Shuttle`` data frame of
        9 finite numeric columns and a factor without missing values.
    """
    directory = resolve_shuttle_dir(data_dir)
    path = directory / SHUTTLE_FILE
    if not directory.is_dir():
        raise DataError(f"Shuttle directory {directory} does not exist. {HOW_TO_GET}")
    if not path.is_file():
        raise DataError(f"{SHUTTLE_FILE} not found in {directory}. {HOW_TO_GET}")
    frame = _read(path)
    features = _features(path, frame)
    num_rows = features.shape[0]
    if num_rows < _MIN_ROWS:
        raise DataError(f"{path} holds {num_rows} rows, fewer than {_MIN_ROWS}")
    labels, class_names = _labels(path, frame, num_rows)
    num_train = num_rows - num_rows // _TEST_DENOMINATOR
    mean = features[:num_train].mean(axis=0)
    std = features[:num_train].std(axis=0)
    std[std == 0] = 1.0
    scaled = ((features - mean) / std).astype(np.float32)
    return Shuttle(
        train=Split(images=_frozen(scaled[:num_train]), labels=_frozen(labels[:num_train])),
        test=Split(images=_frozen(scaled[num_train:]), labels=_frozen(labels[num_train:])),
        class_names=class_names,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
    )
