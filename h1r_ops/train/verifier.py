"""Verifiable rewards: the answer is the content of the last ``\\boxed{...}`` of a completion.

``extract_boxed`` takes the brace-balanced content after the LAST ``\\boxed`` (``h1r_ops.infer``'s
``extract_answer``, as DeepConf's); ``answers_match`` compares exactly after light normalization, then numerically
(fractions and decimals), then with ``math_verify`` when it is installed (gold first, as its README says).
"""

from __future__ import annotations

from fractions import Fraction

from h1r_ops.infer.answers import extract_answer

try:  # optional: symbolic equivalence for real math data
    from math_verify import parse as _mv_parse, verify as _mv_verify
except Exception:  # pragma: no cover - depends on the environment
    _mv_parse = _mv_verify = None


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (nested braces balanced, stripped), or None when there is
    none, it is not closed or it is empty: :func:`h1r_ops.infer.extract_answer` with ``braced_only=True``
    (one extraction rule for rewards and for voting)."""
    return extract_answer(text, braced_only=True)


def _normalize(s: str) -> str:
    s = s.strip().replace(" ", "").replace("\\text{", "{").replace("\\!", "").replace("$", "")
    while s.startswith("{") and s.endswith("}"):
        s = s[1:-1]
    return s.rstrip(".")


def _as_number(s: str):
    s = s.replace(",", "")
    if s.startswith("\\frac{") and "}{" in s and s.endswith("}"):
        num, den = s[len("\\frac{"):-1].split("}{", 1)
        s = f"{num}/{den}"
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(pred: str | None, gold: str) -> bool:
    """Exact match after normalization, else numeric equality, else math_verify (when installed)."""
    if pred is None:
        return False
    p, g = _normalize(pred), _normalize(gold)
    if p == g:
        return True
    np_, ng = _as_number(p), _as_number(g)
    if np_ is not None and ng is not None:
        return np_ == ng
    if _mv_verify is not None:
        try:
            return bool(_mv_verify(_mv_parse(f"${gold}$"), _mv_parse(f"\\boxed{{{pred}}}")))
        except Exception:
            return False
    return False


def boxed_reward(completion: str, gold: str) -> float:
    """1.0 when the last \\boxed{} of ``completion`` matches ``gold``, else 0.0."""
    return 1.0 if answers_match(extract_boxed(completion), gold) else 0.0
