"""Unpickling limited to what the official CIFAR files hold: numpy arrays and plain data."""

import codecs
import io
import pickle

import numpy as np


class DataError(ValueError):
    """A dataset that cannot be read; the message is one line naming the file and the cause."""

    # Defined here, the lowest module of deepres.data, so that readers.py can import it without
    # a cycle. Newlines are flattened because the CLI prints the message as its one error line.
    def __init__(self, message: str) -> None:
        super().__init__(message.replace("\n", " "))


# np.ndarray's own __reduce__ names the array rebuilder wherever this numpy keeps it
# (numpy.core before 2.0, numpy._core after), without importing a deprecated module.
_RECONSTRUCT = np.ndarray(0).__reduce__()[0]


def _empty_bytes() -> bytes:
    # Only the empty call: bytes(n) from an untrusted file could ask for any amount of memory.
    return b""


class _ArrayClass:
    """What numpy.ndarray names in a pickle: not the class, which would make any shape on call."""


class _CheckedArray(np.ndarray):
    """An array being unpickled: its pickled state is checked before numpy takes it."""

    def __setstate__(self, state: tuple) -> None:
        # (version, shape, dtype, Fortran order, data). numpy allocates the shape, then fills
        # it: from raw bytes, whose length it checks, or, for Python objects, from a list, with
        # no such check (a short one crashes numpy). Only numbers as raw bytes are taken, with
        # a dtype of the array's own: the pickle's dtype object could be changed by a later
        # step of the same pickle (its flags can make an int64 an object dtype).
        *head, dtype, fortran, data = state
        plain = isinstance(dtype, np.dtype) and dtype.fields is None and dtype.subdtype is None
        if not (plain and dtype.kind in "biufc" and isinstance(data, bytes)):
            raise pickle.UnpicklingError("an array may hold only numbers, as its raw bytes")
        super().__setstate__((*head, np.dtype(dtype.str), fortran, data))


def _reconstruct(cls: object, shape: tuple, typecode: object) -> np.ndarray:
    # numpy's own pickles rebuild an array as an empty one, then fill it from its pickled state,
    # whose bytes must match the shape it declares: so a file cannot ask for more memory than
    # it holds. Any other call (ndarray((10**9, 3072)) with no data) is refused.
    if cls is not _ArrayClass or tuple(shape) != (0,) or typecode not in (b"b", "b"):
        raise pickle.UnpicklingError("an array may be rebuilt only from its own pickled data")
    return _RECONSTRUCT(_CheckedArray, (0,), b"b")


def _plain(value: object) -> object:
    """The loaded value with every checked array a plain ndarray again."""
    if isinstance(value, _CheckedArray):
        return value.view(np.ndarray)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item) for item in value)
    return value


# Every global a CIFAR pickle may name: a module.name outside this table is never imported.
# _codecs.encode is how protocol-2 pickles written by Python 3 spell a bytes object, and
# __builtin__.bytes() how they spell an empty one (the buffer of an empty array).
_ALLOWED = {
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _ArrayClass,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, source: str) -> None:
        # The official files are Python 2 pickles: "bytes" keeps their str objects as bytes
        # (numpy needs the raw array buffers that way) instead of guessing a text encoding.
        super().__init__(io.BytesIO(data), encoding="bytes")
        self._source = source

    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise DataError(
                f"{self._source}: refusing to unpickle {module}.{name}"
                " (a dataset pickle may hold only numpy arrays and plain data)"
            ) from None


def restricted_loads(data: bytes, source: str = "<pickle>") -> object:
    """Unpickle untrusted bytes that may hold only numpy arrays, containers, numbers and bytes."""
    try:
        return _plain(_RestrictedUnpickler(data, source).load())
    except DataError:
        raise
    except Exception as error:
        # Malformed pickles fail with many exception types (EOFError, KeyError, TypeError...);
        # all of them mean the same thing to the caller.
        raise DataError(
            f"{source}: not a readable pickle ({type(error).__name__}: {error})"
        ) from error
