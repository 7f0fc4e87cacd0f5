"""Argument validation shared by every op and every backend.

Every public op in h1r_ops validates its arguments here before it reaches a kernel, so that bad input
raises a ``ValueError`` naming the argument, what was expected and what was got, whatever the backend.

The core helper is :class:`Shapes`, which binds symbolic dimension names to sizes as arguments are
checked, so that a mismatch is reported in the op's own notation::

    s = Shapes("selective_scan")
    s.check("x", x, ("b", "l", "h", "p"))
    s.check("dt", dt, ("b", "l", "h"))        # ValueError: selective_scan: argument 'dt': expected
                                              # shape (b, l, h) = (2, 7, 4), got (2, 7, 5)
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)


def _fmt_shape(shape: Iterable) -> str:
    shape = tuple(shape)
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


class Shapes:
    """Checks tensors of one op call against symbolic shapes, binding each name on first use."""

    def __init__(self, op: str, **known: int):
        self.op = op
        self.dims: dict[str, int] = dict(known)
        self.device: torch.device | None = None
        self.device_arg: str | None = None

    def error(self, name: str, msg: str) -> ValueError:
        return ValueError(f"{self.op}: argument '{name}': {msg}")

    def check(
        self,
        name: str,
        t,
        shape: Sequence[str | int],
        *,
        dtypes: Sequence[torch.dtype] | None = FLOAT_DTYPES,
        optional: bool = False,
        same_device: bool = True,
    ):
        """Validate ``t`` (named ``name``) against ``shape``; returns ``t``.

        ``shape`` entries are ints (exact), names (bound on first use, then checked) or ``"*"`` (any)."""
        if t is None:
            if optional:
                return None
            raise self.error(name, "expected a tensor, got None")
        if not isinstance(t, torch.Tensor):
            raise self.error(name, f"expected a torch.Tensor, got {type(t).__name__}")
        if dtypes is not None and t.dtype not in dtypes:
            want = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise self.error(name, f"expected dtype in ({want}), got {str(t.dtype).replace('torch.', '')}")
        if same_device:
            if self.device is None:
                self.device, self.device_arg = t.device, name
            elif t.device != self.device:
                raise self.error(name, f"expected device {self.device} (that of '{self.device_arg}'), got {t.device}")
        if t.dim() != len(shape):
            raise self.error(name, f"expected {len(shape)} dimensions {_fmt_shape(shape)}, got shape {_fmt_shape(t.shape)}")
        ok = True
        for d, size in zip(shape, t.shape):
            if d == "*":
                continue
            if isinstance(d, int):
                ok &= size == d
            elif d in self.dims:
                ok &= size == self.dims[d]
        if not ok:
            expected = tuple(self.dims.get(d, "?") if isinstance(d, str) and d != "*" else d for d in shape)
            raise self.error(name, f"expected shape {_fmt_shape(shape)} = {_fmt_shape(expected)}, got {_fmt_shape(t.shape)}")
        for d, size in zip(shape, t.shape):
            if isinstance(d, str) and d != "*":
                self.dims.setdefault(d, size)
        return t

    def require(self, cond: bool, name: str, msg: str):
        """Raise ``ValueError`` about argument ``name`` unless ``cond``."""
        if not cond:
            raise self.error(name, msg)

    def __getitem__(self, d: str) -> int:
        return self.dims[d]


def check_choice(op: str, name: str, value, choices: Sequence):
    if value not in choices:
        raise ValueError(f"{op}: argument '{name}': expected one of {list(choices)}, got {value!r}")
    return value


def check_positive(op: str, name: str, value, *, strict: bool = True):
    bad = value <= 0 if strict else value < 0
    if bad or value != value:
        raise ValueError(f"{op}: argument '{name}': expected a {'positive' if strict else 'non-negative'} number, got {value!r}")
    return value
