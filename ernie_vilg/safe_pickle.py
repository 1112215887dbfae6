"""The one allow-list unpickler: every reader of a pickle in the project builds on it.

Unpickling runs code chosen by the file (any global it names is imported and may be called), so
`AllowListUnpickler` resolves only the `(module, name)` pairs of its subclass's allow-list and
refuses persistent ids unless the subclass handles them. Readers built on it:

- `PaddlePickleReader` / `safe_load` here: Paddle's own `.pdparams` / `.pdopt` / `.pd` files
  (numpy arrays, dtypes, the RNG state object), checked before `paddle.load` reads them;
- `convert.torch_pickle.RestrictedUnpickler`: PyTorch zip checkpoints, without torch;
- `convert.dalle.SkeletonUnpickler`: pickled DALL-E modules as inert skeletons.

Floor 0: imports nothing of the package (Paddle only inside `safe_load`).
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, Mapping


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asked for something outside the allow-list."""


class UnreadablePickleError(ValueError):
    """Not a readable pickle (truncated, corrupt, or not a pickle at all)."""


class AllowListUnpickler(pickle.Unpickler):
    """Unpickler that resolves only `allowed` globals; subclasses set `allowed` and `what`.

    `allowed` maps `(module, name)` to the object handed to the pickle, or to None for "the real
    global, imported by pickle" (for plain data types such as numpy's array rebuilder).
    `resolve_other` is the hook for names outside the table (default: refuse)."""

    allowed: Mapping[tuple[str, str], Any] = {}
    what = "this reader"  # named in the refusal: which allow-list refused

    def __init__(self, file: io.BufferedIOBase, source: str = "pickle") -> None:
        super().__init__(file)
        self._source = source

    def refuse(self, message: str) -> UnsafePickleError:
        return UnsafePickleError(f"{self._source}: {message}")

    def resolve_other(self, module: str, name: str) -> Any:
        raise self.refuse(f"refusing global '{module}.{name}': not on the allow-list of {self.what}")

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in self.allowed:
            found = self.allowed[key]
            return super().find_class(module, name) if found is None else found
        return self.resolve_other(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise self.refuse(f"unsupported persistent id {pid!r:.80}")


# What paddle.save's pickles reference: array reconstruction, dtypes, and the RNG state object of
# trainer_state.pd. Nothing here runs code chosen by the file.
PADDLE_PICKLE_ALLOWED: dict[tuple[str, str], None] = dict.fromkeys([
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("builtins", "tuple"),
    ("collections", "OrderedDict"),
    ("paddle.base.libpaddle", "GeneratorState"),
])


class PaddlePickleReader(AllowListUnpickler):
    allowed = PADDLE_PICKLE_ALLOWED
    what = "Paddle weight files (numpy arrays, dtypes, RNG state)"


def check_paddle_pickle(path: str | Path) -> None:
    """Unpickle `path` with the allow-list (result discarded); raise UnsafePickleError if it asks
    for any other global, UnreadablePickleError if it is not a readable pickle."""
    path = Path(path)
    with path.open("rb") as fh:
        try:
            PaddlePickleReader(fh, str(path)).load()
        except UnsafePickleError:
            raise
        except Exception as exc:  # truncated / corrupt pickles raise all kinds of errors
            raise UnreadablePickleError(f"{path}: not a readable Paddle weight file "
                                        f"({type(exc).__name__}: {exc})") from None


def safe_load(path: str | Path) -> Any:
    """`paddle.load` guarded by the allow-list: the file is checked first, then loaded."""
    import paddle

    check_paddle_pickle(path)
    return paddle.load(str(path))
