"""Keys: the same 32-character key the broker derives for (fn, input)."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import blake3

_I64_MIN = -(2**63)
_U64_MAX = 2**64 - 1


def _float(x: float) -> str:
    """A float as serde_json writes it: the shortest digits that read back
    the same, in decimal notation while the leading digit's exponent is
    -5 to 15 (`0.00001`, `123.0`), else as `1.5e+16` / `1e-6`."""
    if x == 0:
        return "-0.0" if str(x).startswith("-") else "0.0"
    sign = "-" if x < 0 else ""
    t = Decimal(repr(abs(x))).normalize().as_tuple()
    digits = "".join(map(str, t.digits))
    length, k = len(digits), int(t.exponent)
    kk = length + k  # the value is 0.DIGITS * 10**kk
    if -4 <= kk <= 16:
        if k >= 0:
            body = digits + "0" * k + ".0"
        elif kk > 0:
            body = digits[:kk] + "." + digits[kk:]
        else:
            body = "0." + "0" * (-kk) + digits
    else:
        e = kk - 1
        mantissa = digits if length == 1 else f"{digits[0]}.{digits[1:]}"
        body = f"{mantissa}e{'+' if e >= 0 else '-'}{abs(e)}"
    return sign + body


def _write(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        # serde_json keeps integers that fit i64 or u64; larger ones become floats.
        out.append(str(value) if _I64_MIN <= value <= _U64_MAX else _float(float(value)))
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("JSON has no NaN or infinity")
        out.append(_float(value))
    elif isinstance(value, str):
        out.append(json.dumps(value, ensure_ascii=False))
    elif isinstance(value, dict):
        out.append("{")
        members = sorted(value.items(), key=lambda kv: kv[0].encode("utf-8"))
        for i, (name, member) in enumerate(members):
            if not isinstance(name, str):
                raise TypeError("JSON object keys are strings")
            if i:
                out.append(",")
            out.append(json.dumps(name, ensure_ascii=False))
            out.append(":")
            _write(member, out)
        out.append("}")
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _write(item, out)
        out.append("]")
    else:
        raise TypeError(f"not JSON: {type(value).__name__}")


def canonical_json(value: Any) -> str:
    """The canonical JSON text of `value`: no whitespace, members sorted by
    key (UTF-8 byte order), strings and numbers written as the broker writes them."""
    out: list[str] = []
    _write(value, out)
    return "".join(out)


def key(input: Any, fn: str = "default") -> str:
    """The key the broker derives for `input` under evaluator `fn`."""
    h = blake3.blake3(fn.encode("utf-8") + b"\0" + canonical_json(input).encode("utf-8"))
    return h.hexdigest()[:32]
