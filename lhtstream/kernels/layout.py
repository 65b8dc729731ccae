"""Declared layouts of the kernels' flat float64 arrays, and the compiled-kernel decorator.

A kernel's state is one flat float64 array (one Numba argument instead of many;
counts and flags are small whole numbers, exact in float64). Its fields are
declared once, in order, as a `Layout`; offsets, sizes and a stable digest follow
from the declaration, never from hand-chained arithmetic::

    EW = Layout("change_ewma", [("n", 1), ("v", 1), ("e", N_CHANGE)])
    EW_N = EW.offset("n")   # a plain module-level int: a constant inside @njit code

A field is a scalar (size 1), a vector (an int), an array (a tuple of ints) or
another layout, optionally repeated (a tuple of ints ending with the layout). To
add a field, add one entry to the declaration (and an ``X_NAME = L.offset(...)``
line if a kernel addresses it): every later offset moves with it.

Code above `lhtstream.kernels` uses names, never offsets: `Layout.view` gives a
read-only named view (scalars as floats, arrays as read-only views) and
`Layout.part` one writable field (for the array's owner, e.g. the model's cells).

`kernel` is ``numba.njit(cache=True, nogil=True)`` with one difference: Numba keys
its on-disk cache on the kernel's own source file only, so a changed constant
imported from another module (a layout, say) would leave a stale compiled kernel.
Here the cache's source stamp also carries `KERNEL_SOURCES`, a digest of every
source file of this package: an edit to any of them makes every cached kernel
stale, and it is recompiled on first use.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numba import njit
from numba.core.caching import CompileResultCacheImpl, FunctionCache
from numba.core.dispatcher import Dispatcher


class Field:
    """One declared field: `offset` and `width` in float64 elements, `shape` of a view
    (``()`` for a scalar), `layout` when it holds (repeats of) another layout."""

    __slots__ = ("name", "offset", "width", "shape", "layout")

    def __init__(self, name: str, offset: int, spec: Any) -> None:
        self.name = name
        self.offset = offset
        self.layout: Layout | None = None
        if isinstance(spec, Layout):
            spec = (spec,)
        if isinstance(spec, int):
            dims: tuple[int, ...] = () if spec == 1 else (spec,)
        else:
            dims = tuple(spec)
            if dims and isinstance(dims[-1], Layout):
                self.layout = dims[-1]
                dims = dims[:-1] + (self.layout.size,)
        if not all(isinstance(d, int) and d >= 1 for d in dims):
            raise ValueError(f"field {name!r}: sizes must be positive ints, got {spec!r}")
        self.shape = dims
        self.width = math.prod(dims)

    def spec(self) -> tuple[Any, ...]:
        """What the digest covers: name, shape and the nested layout's own digest."""
        return (self.name, self.shape, self.layout.digest if self.layout else None)


class Layout:
    """An ordered declaration of the named fields of a flat float64 array."""

    size: int  #: float64 elements in all
    digest: str  #: 16 hex digits of SHA-256 over the name and every field's name and shape

    def __init__(self, name: str, fields: Sequence[tuple[str, Any]]) -> None:
        self.name = name
        self.fields: dict[str, Field] = {}
        at = 0
        for fname, spec in fields:
            if fname in self.fields:
                raise ValueError(f"layout {name!r} declares field {fname!r} twice")
            f = Field(fname, at, spec)
            self.fields[fname] = f
            at += f.width
        self.size = at
        h = hashlib.sha256(repr((name, [f.spec() for f in self.fields.values()])).encode())
        self.digest = h.hexdigest()[:16]

    def __repr__(self) -> str:
        return f"Layout({self.name!r}, {self.size} values, digest {self.digest})"

    def __iter__(self) -> Iterator[Field]:
        return iter(self.fields.values())

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.fields)

    def offset(self, name: str) -> int:
        """Index of the field's first element."""
        return self.fields[name].offset

    def width(self, name: str) -> int:
        """Number of float64 elements the field holds."""
        return self.fields[name].width

    def part(self, array: np.ndarray, name: str) -> np.ndarray:
        """Field `name` of `array` (last axis = this layout) as a writable view, shaped
        ``array.shape[:-1] + field.shape`` (a 0-d array for a scalar of a 1-D array)."""
        f = self.fields[name]
        if array.shape[-1] != self.size:
            raise ValueError(f"{self.name} holds {self.size} values, the array "
                             f"{array.shape[-1]}")
        v = array[..., f.offset:f.offset + f.width]
        return np.reshape(v, array.shape[:-1] + f.shape, copy=False)

    def view(self, array: np.ndarray) -> LayoutView:
        """A read-only named view of `array` (see `LayoutView`)."""
        if array.shape[-1] != self.size:
            raise ValueError(f"{self.name} holds {self.size} values, the array "
                             f"{array.shape[-1]}")
        return LayoutView(self, array)

    def set(self, array: np.ndarray, **values: Any) -> None:
        """Write fields by name: ``STREAM.set(state, slot=2, threshold=8.0)``."""
        for name, value in values.items():
            self.part(array, name)[...] = value

    def describe(self) -> str:
        """One line per field: offset, width, name, shape (for docs and debugging)."""
        return "\n".join(f"{f.offset:5d} {f.width:5d}  {f.name} {f.shape}"
                         + (f" of {f.layout.name}" if f.layout else "") for f in self)


class LayoutView:
    """Read-only named view of an array laid out by a `Layout`: ``view.name`` is a float
    for a scalar field of a 1-D array, a read-only array view otherwise, and a
    `LayoutView` for a field holding another layout."""

    __slots__ = ("_layout", "_array")

    def __init__(self, layout: Layout, array: np.ndarray) -> None:
        self._layout = layout
        self._array = array

    def __getattr__(self, name: str) -> Any:
        try:
            f = self._layout.fields[name]
        except KeyError:
            raise AttributeError(f"{self._layout.name} has no field {name!r}") from None
        v = self._layout.part(self._array, name)
        if f.layout is not None:
            return LayoutView(f.layout, v)
        if v.ndim == 0:
            return float(v)
        v = v.view()
        v.flags.writeable = False
        return v

    def __dir__(self) -> list[str]:
        return list(self._layout.names)


def digest_of(*layouts: Layout) -> str:
    """One digest for several layouts (in order)."""
    h = hashlib.sha256("/".join(f"{lay.name}:{lay.digest}" for lay in layouts).encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------ compiled kernels


def _sources_digest() -> str:
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


KERNEL_SOURCES = _sources_digest()
"""Digest of every source file of `lhtstream.kernels`; part of each kernel's cache key."""


def _stamped(locator: type) -> type:
    class Stamped(locator):
        def get_source_stamp(self) -> Any:
            return (super().get_source_stamp(), KERNEL_SOURCES)

    Stamped.__name__ = Stamped.__qualname__ = "Stamped" + locator.__name__
    return Stamped


class _KernelCacheImpl(CompileResultCacheImpl):
    # Numba's own locators (NUMBA_CACHE_DIR, __pycache__, the user's cache dir, ...), in
    # its order, with the package's source digest added to the stamp
    _locator_classes = [_stamped(c) for c in  # type: ignore[misc]
                        CompileResultCacheImpl._locator_classes]


class KernelCache(FunctionCache):
    """Numba's per-function disk cache, stale when any kernel source changed."""

    _impl_class = _KernelCacheImpl


def kernel(func: Any = None, **options: Any) -> Any:
    """``@kernel`` / ``@kernel(inline="always")``: ``njit(nogil=True)`` with the
    on-disk cache keyed on `KERNEL_SOURCES` as well (see the module doc)."""

    def wrap(f: Any) -> Any:
        disp = njit(nogil=True, **options)(f)
        if isinstance(disp, Dispatcher):  # not under NUMBA_DISABLE_JIT
            disp._cache = KernelCache(disp.py_func)  # type: ignore[attr-defined]
        return disp

    return wrap if func is None else wrap(func)
