"""Verifiable rewards: the answer is the content of the last ``\\boxed{...}`` of a completion.

``extract_boxed`` takes the brace-balanced content after the LAST ``\\boxed`` (as DeepConf's
``extract_answer``); ``answers_match`` compares exactly after light normalization, then numerically
(fractions and decimals), then with ``math_verify`` when it is installed (gold first, as its README says).
"""

from __future__ import annotations

from fractions import Fraction

try:  # optional: symbolic equivalence for real math data
    from math_verify import parse as _mv_parse, verify as _mv_verify
except Exception:  # pragma: no cover - depends on the environment
    _mv_parse = _mv_verify = None


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (nested braces balanced), or None when there is none or
    it is not closed."""
    i = text.rfind("\\boxed")
    if i < 0:
        return None
    j = i + len("\\boxed")
    while j < len(text) and text[j] == " ":
        j += 1
    if j >= len(text) or text[j] != "{":
        return None
    depth, start = 0, j + 1
    for k in range(j, len(text)):
        if text[k] == "{":
            depth += 1
        elif text[k] == "}":
            depth -= 1
            if depth == 0:
                return text[start:k]
    return None


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
