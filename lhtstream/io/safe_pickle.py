"""Unpickle plain data from an untrusted file, bounded before anything large is built.

`load_plain` admits plain containers (list, tuple, dict), str, bytes, int, float,
bool, None and numpy numeric scalars; nothing else is looked up or called, so a
hostile pickle cannot run code. It also bounds what a small file can make:

- every opcode counts, memo fetches included, and at most `MAX_PICKLE_OPS` run, so
  the objects built (and the memory they take) grow at most linearly with that bound;
- dict keys must be scalars, so no key is a nested tuple whose hash walks a
  shared-reference "DAG bomb" exponentially;
- sets, byte arrays, out-of-band buffers, persistent ids, extension codes and
  object construction are refused.

What it returns may still share references (a list holding the same list twice,
nested): a caller walking it must count elements with multiplicity and bound them
(`lhtstream.io.dataset.load_metadata` accepts only a dict of flat dicts).

It runs on the pure-Python unpickler (``pickle._Unpickler``), whose memo is a dict:
the C unpickler sizes its memo table by the largest index a ``LONG_BINPUT`` names, so
five bytes can make it allocate and clear gigabytes.
"""

from __future__ import annotations

import io
import pickle
import pickletools
from collections.abc import Callable
from typing import Any

import numpy as np

MAX_PICKLE_OPS = 1_000_000  # a real metadata.pkl runs ~10,000; the whole set in one file ~400,000

_SCALAR_KEYS = (str, bytes, int, float, bool, type(None))
_OPCODE_NAMES = {op.code.encode("latin1")[0]: op.name for op in pickletools.opcodes}
_REFUSED_OPCODES = frozenset({
    "PERSID", "BINPERSID",  # persistent ids: objects from outside the file
    "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX",  # instances of classes
    "EXT1", "EXT2", "EXT4",  # the copyreg extension registry: globals by number
    "EMPTY_SET", "ADDITEMS", "FROZENSET",  # set members are hashed (nested tuples: exponential)
    "BYTEARRAY8", "NEXT_BUFFER", "READONLY_BUFFER",  # mutable and out-of-band buffers
})


def _numpy_scalar_reconstructor() -> Any:
    try:
        from numpy._core.multiarray import scalar  # local import: numpy >= 2 (else numpy 1.x)
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]  # local import: numpy 1.x
    return scalar


def _is_plain_numeric(dtype: np.dtype) -> bool:
    return (
        dtype.kind in "biuf"
        and not dtype.hasobject
        and dtype.fields is None
        and dtype.subdtype is None
    )


def _safe_dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
    # numpy pickles a scalar's dtype as numpy.dtype('i8', False, True); only numeric codes pass.
    if not isinstance(spec, str):
        raise pickle.UnpicklingError(f"numpy.dtype({spec!r:.40}) is not a plain numeric dtype")
    try:
        dt = np.dtype(spec)
    except TypeError as exc:
        raise pickle.UnpicklingError(f"bad numpy dtype {spec!r:.40}") from exc
    if not _is_plain_numeric(dt):
        raise pickle.UnpicklingError(f"numpy dtype {spec!r:.40} is not a number type")
    # Always a copy: BUILD then sets the state of this object, never numpy's shared one.
    return np.dtype(spec, bool(align), True)


def _safe_scalar(dtype: Any, data: Any = None) -> Any:
    # Checked after the dtype's state was restored (BUILD), before numpy interprets the bytes.
    if not isinstance(dtype, np.dtype) or not _is_plain_numeric(dtype):
        raise pickle.UnpicklingError("numpy scalar with a non-numeric dtype")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise pickle.UnpicklingError("numpy scalar with malformed data")
    return _numpy_scalar_reconstructor()(dtype, data)


def _safe_codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    # protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1'); nothing else passes.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("refused _codecs.encode call")
    return text.encode("latin1")


_ALLOWED_GLOBALS = {
    ("_codecs", "encode"): _safe_codecs_encode,
    ("numpy.core.multiarray", "scalar"): _safe_scalar,
    ("numpy._core.multiarray", "scalar"): _safe_scalar,
    ("numpy", "dtype"): _safe_dtype,
}


def _check_keys(keys: list[Any]) -> None:
    for key in keys:
        if not isinstance(key, _SCALAR_KEYS):
            raise pickle.UnpicklingError(
                f"refused dict key of type {type(key).__name__} (keys must be plain scalars)"
            )


def _setitem(self: Any) -> None:
    value = self.stack.pop()
    key = self.stack.pop()
    _check_keys([key])
    self.stack[-1][key] = value


def _setitems(self: Any) -> None:
    items = self.pop_mark()
    _check_keys(items[0::2])
    target = self.stack[-1]
    for i in range(0, len(items), 2):
        target[items[i]] = items[i + 1]


def _dict(self: Any) -> None:
    items = self.pop_mark()
    _check_keys(items[0::2])
    self.append(dict(zip(items[0::2], items[1::2], strict=True)))


def _build(self: Any) -> None:
    # Only a numpy dtype's state is restored, and only from a tuple of scalars.
    state, target = self.stack[-1], self.stack[-2]
    if not isinstance(target, np.dtype) or not (
        isinstance(state, tuple) and all(isinstance(s, _SCALAR_KEYS) for s in state)
    ):
        raise pickle.UnpicklingError(f"refused BUILD of a {type(target).__name__}")
    pickle._Unpickler.dispatch[pickle.BUILD[0]](self)


def _refused(name: str) -> Callable[[Any], None]:
    def refuse(self: Any) -> None:
        raise pickle.UnpicklingError(f"refused pickle opcode {name}")

    return refuse


def _counted(load: Callable[[Any], None]) -> Callable[[Any], None]:
    def op(self: Any) -> None:
        self.ops += 1
        if self.ops > MAX_PICKLE_OPS:
            raise pickle.UnpicklingError(f"more than {MAX_PICKLE_OPS} pickle opcodes")
        load(self)

    return op


def _dispatch() -> dict[int, Callable[[Any], None]]:
    overrides = {pickle.SETITEM[0]: _setitem, pickle.SETITEMS[0]: _setitems,
                 pickle.DICT[0]: _dict, pickle.BUILD[0]: _build}
    table = {}
    for code, load in pickle._Unpickler.dispatch.items():
        name = _OPCODE_NAMES.get(code, f"0x{code:02x}")
        table[code] = _counted(
            _refused(name) if name in _REFUSED_OPCODES else overrides.get(code, load)
        )
    return table


class _BoundedUnpickler(pickle._Unpickler):
    """The pure-Python unpickler with a counted, filtered opcode table (see module doc)."""

    dispatch = _dispatch()

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.ops = 0

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module:.60}.{name:.60}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused persistent id")


def load_plain(data: bytes) -> Any:
    """Unpickle ``data`` admitting only plain data, within `MAX_PICKLE_OPS` opcodes.

    Raises pickle.UnpicklingError for anything refused; a truncated or garbled pickle
    raises what the unpickler met (EOFError, ValueError, KeyError for an unknown
    opcode, ...), so callers catch Exception. Nothing in ``data`` is executed.
    """
    return _BoundedUnpickler(data).load()
