"""Final-answer extraction (the last ``\\boxed{...}``, brace-balanced) and answer equivalence for voting.

Equality uses math-verify (``pip install math-verify``) when it is installed, else a normalizing string
comparison (``normalize_answer``). Votes are grouped by equivalence: every answer joins the first earlier
answer it equals, whose text becomes the group's key.
"""

from __future__ import annotations

import re


def extract_answer(text: str | None, braced_only: bool = False) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text`` (nested braces kept, stripped),
    or None.

    ``\\boxed 5`` (no brace) reads up to the next ``$`` as the reference does, unless ``braced_only``
    (the reward's rule, ``h1r_ops.train.verifier.extract_boxed``: only a braced box counts). Spaces between
    ``\\boxed`` and its brace are skipped. An unclosed brace (a trace cut off inside its answer) and an
    empty box give None."""
    if not text:
        return None
    i = text.rfind("\\boxed")
    if i < 0:
        i = text.rfind("\\fbox")
        if i < 0:
            return None
        rest = text[i + len("\\fbox"):]
    else:
        rest = text[i + len("\\boxed"):]
    if rest.lstrip(" ").startswith("{"):
        rest = rest.lstrip(" ")
        depth = 0
        for j, ch in enumerate(rest):
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    ans = rest[1:j].strip()
                    return ans or None
        return None
    if braced_only:
        return None
    ans = rest.split("$")[0].strip()
    return ans or None


_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")


def normalize_answer(a: str) -> str:
    """A canonical string form: \\text{} unwrapped, \\left/\\right, spacing commands, degrees, percent,
    dollars, a leading ``x =``, thousands separators and a trailing period removed, ``dfrac``/``tfrac`` ->
    ``frac``, numbers printed canonically (``0.50`` -> ``0.5``, ``5.0`` -> ``5``), a single letter lowered."""
    s = a.strip()
    prev = None
    while prev != s:
        prev, s = s, _TEXT.sub(r"\1", s)
    for t in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "\\displaystyle", "$", "\\%", "%",
              "^\\circ", "^{\\circ}", "\\circ"):
        s = s.replace(t, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"^[a-zA-Z]\s*=", "", s) if re.match(r"^[a-zA-Z]=.", s) else s
    s = s.rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if re.fullmatch(r"-?\d+(\.\d+)?", s):
        f = float(s)
        s = str(int(f)) if f == int(f) and abs(f) < 1e15 else repr(f)
    m = re.fullmatch(r"\\frac\{?(-?\d+)\}?\{?(\d+)\}?", s)
    if m and int(m.group(2)) != 0:
        from fractions import Fraction

        fr = Fraction(int(m.group(1)), int(m.group(2)))
        s = str(fr.numerator) if fr.denominator == 1 else f"{fr.numerator}/{fr.denominator}"
    elif re.fullmatch(r"-?\d+/\d+", s) and int(s.split("/")[1]) != 0:
        from fractions import Fraction

        fr = Fraction(s)
        s = str(fr.numerator) if fr.denominator == 1 else f"{fr.numerator}/{fr.denominator}"
    if len(s) == 1 and s.isalpha():
        s = s.lower()
    return s


def _math_verify():
    try:
        import math_verify

        return math_verify
    except ImportError:
        return None


def answers_equal(a: str, b: str, use_math_verify: bool | None = None) -> bool:
    """Whether two extracted answers are the same: math-verify (both ways round, no signal timeouts so it
    works off the main thread) when installed and not disabled, else ``normalize_answer`` equality."""
    if a == b:
        return True
    na, nb = normalize_answer(a), normalize_answer(b)
    if na == nb:
        return True
    mv = _math_verify() if use_math_verify is not False else None
    if mv is None:
        return False
    try:
        pa, pb = mv.parse(f"\\boxed{{{a}}}", parsing_timeout=None), mv.parse(f"\\boxed{{{b}}}", parsing_timeout=None)
        return bool(pa and pb and mv.verify(pa, pb, timeout_seconds=None))
    except Exception:  # noqa: BLE001 - a parser failure means "not shown equal"
        return False


class AnswerGroups:
    """Maps answers to the key of their equivalence group (the first answer seen of the group)."""

    def __init__(self, equal=None):
        self.equal = equal or answers_equal
        self.keys: list[str] = []
        self._memo: dict[str, str] = {}

    def key(self, a: str) -> str:
        if a in self._memo:
            return self._memo[a]
        for k in self.keys:
            if self.equal(k, a):
                self._memo[a] = k
                return k
        self.keys.append(a)
        self._memo[a] = a
        return a
