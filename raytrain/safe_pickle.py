"""A restricted unpickler for the two pickle formats raytrain must read: SMPL model files
and 3DPW sequence files. Both come from outside; the full unpickler would run any code a
crafted file names.

    data = safe_load(path, allow_sparse=True)   # numpy arrays, scipy sparse, containers

It resolves only: numpy arrays, dtypes and scalars (the reconstruct functions numpy's
pickles name, under their numpy 1 and 2 module names), the scipy sparse matrix classes
(with ``allow_sparse``), ``_codecs.encode`` restricted to latin-1 (how Python 3 writes
bytes at protocol 2), and ``copyreg._reconstructor`` for old protocols. Plain containers,
strings and numbers need no global. Anything else raises ``UnsafePickleError`` naming the
file and the refused global.

The BUILD opcode (fill in an object's state) is only ever applied to an instance of the
allowed data types (an array, a dtype, a numpy scalar, a sparse matrix): never to a class
or function, so a crafted file cannot set attributes of one (``csr_matrix.toarray``, a
function's ``__defaults__``) for the rest of the process. The opcode is checked in the
pure-Python unpickler's dispatch table, the one place it can be intercepted.
"""

from __future__ import annotations

import codecs
import copyreg
import importlib
import os
import pickle

import numpy as np


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle names a global outside the allowed set."""


def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    if codecs.lookup(encoding).name != "iso8859-1":
        raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r} (only latin-1 is allowed)")
    return text.encode("latin1", errors)


def _numpy(module: str, name: str):
    for candidate in (module.replace("numpy.core", "numpy._core"), module):
        try:
            return getattr(importlib.import_module(candidate), name)
        except (ImportError, AttributeError):
            continue
    raise UnsafePickleError(f"{module}.{name} not found")


_NUMPY = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}
_SPARSE_CLASSES = ("csc_matrix", "csr_matrix", "coo_matrix")
_SPARSE_MODULES = ("scipy.sparse", "scipy.sparse._csc", "scipy.sparse.csc", "scipy.sparse._csr",
                   "scipy.sparse.csr", "scipy.sparse._coo", "scipy.sparse.coo")


def _buildable(target) -> bool:
    """An instance of a data type the allowed globals make (BUILD may fill it in)."""
    if isinstance(target, type):
        return False
    if isinstance(target, (np.ndarray, np.dtype, np.generic)):
        return True
    module = type(target).__module__
    return module.startswith("scipy.sparse") and type(target).__name__ in _SPARSE_CLASSES


class _RestrictedUnpickler(pickle._Unpickler):  # the Python one: its BUILD can be checked
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, handle, allow_sparse: bool, **kwargs):
        super().__init__(handle, **kwargs)
        self.allow_sparse = allow_sparse

    def load_build(self):
        target = self.stack[-2] if len(self.stack) >= 2 else None
        if not _buildable(target):
            raise UnsafePickleError(f"BUILD on {_name_of(target)} (state is only set on arrays, dtypes "
                                    "and sparse matrices, never on a class or function)")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build

    def find_class(self, module: str, name: str):
        if (module, name) in _NUMPY:
            return _numpy(module, name)
        if module.startswith("numpy.dtypes") and name.endswith("DType"):
            return getattr(np.dtypes, name)  # numpy 2 dtype classes (plain number types)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) == ("copyreg", "_reconstructor"):
            return copyreg._reconstructor
        if (module, name) in (("builtins", "object"), ("__builtin__", "object")):
            return object
        if self.allow_sparse and module in _SPARSE_MODULES and name in _SPARSE_CLASSES:
            import scipy.sparse
            return getattr(scipy.sparse, name)
        raise UnsafePickleError(f"refused global {module}.{name}")


def _name_of(target) -> str:
    if isinstance(target, type) or callable(target):
        return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(target).__name__)}"
    return f"a {type(target).__name__}"


def safe_load(path: str | os.PathLike, allow_sparse: bool = False, encoding: str = "latin1"):
    """Unpickle ``path`` with the restricted unpickler (``encoding`` for Python 2 strings)."""
    with open(path, "rb") as handle:
        try:
            return _RestrictedUnpickler(handle, allow_sparse, encoding=encoding).load()
        except UnsafePickleError as error:
            raise UnsafePickleError(f"{path}: {error} (only numpy arrays"
                                    f"{', scipy sparse matrices' if allow_sparse else ''}, plain "
                                    "containers, strings and numbers are read)") from None
