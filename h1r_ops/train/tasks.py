"""A small verifiable math task for the demo trainer: word problems with step-by-step solutions.

Every problem is a deterministic function of an integer index and a seed (``make_problem(seed, i)``), so a
data stream is reproducible and resumable from its position alone. Problems are split into train and
held-out by a hash of their question text (``is_heldout``): the held-out questions never appear in the
training stream, whatever its length.

The answer of every solution is the content of its last ``\\boxed{...}``; :mod:`h1r_ops.train.verifier`
checks a model's output against it.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import torch

PAD, BOS, EOS = 0, 1, 2
_SPECIALS = ["<pad>", "<s>", "</s>"]
_CHARS = (" \n0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
          "+-*/=().,?:;!'\"{}\\_^<>%$#&|")


class CharTokenizer:
    """A character-level tokenizer: ids 0/1/2 are pad/bos/eos (Falcon-H1's defaults), then one id per
    character of a fixed alphabet. Unknown characters raise ValueError (the tasks use only the alphabet)."""

    pad_token_id, bos_token_id, eos_token_id = PAD, BOS, EOS

    def __init__(self, chars: str = _CHARS):
        self.chars = chars
        self._id = {c: i + len(_SPECIALS) for i, c in enumerate(chars)}

    @property
    def vocab_size(self) -> int:
        return len(_SPECIALS) + len(self.chars)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        try:
            ids = [self._id[c] for c in text]
        except KeyError as e:
            raise ValueError(f"CharTokenizer.encode: argument 'text': character {e.args[0]!r} is not in the alphabet") from None
        return ([BOS] if bos else []) + ids + ([EOS] if eos else [])

    def decode(self, ids, skip_special: bool = True) -> str:
        out = []
        for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
            if i < len(_SPECIALS):
                if not skip_special:
                    out.append(_SPECIALS[i])
            else:
                out.append(self.chars[i - len(_SPECIALS)])
        return "".join(out)


@dataclass(frozen=True)
class Problem:
    """A question, its step-by-step solution (ending in \\boxed{answer}) and the answer string."""

    question: str
    solution: str
    answer: str

    @property
    def prompt(self) -> str:
        return f"Q: {self.question}\nA: "


_NAMES = ["Ann", "Bob", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivy", "Jon", "Kai", "Lea"]
_ITEMS = ["apples", "books", "coins", "pens", "cards", "eggs", "shells", "stamps", "marbles", "cups"]


def _add(r: random.Random) -> Problem:
    n, item = r.choice(_NAMES), r.choice(_ITEMS)
    a, b = r.randint(2, 60), r.randint(2, 40)
    return Problem(f"{n} has {a} {item} and gets {b} more. How many {item} does {n} have now?",
                   f"{a} + {b} = {a + b}\n\\boxed{{{a + b}}}", str(a + b))


def _sub(r: random.Random) -> Problem:
    n, item = r.choice(_NAMES), r.choice(_ITEMS)
    a = r.randint(10, 90)
    b = r.randint(1, a - 1)
    return Problem(f"{n} had {a} {item} and gave away {b}. How many {item} are left?",
                   f"{a} - {b} = {a - b}\n\\boxed{{{a - b}}}", str(a - b))


def _mul_add(r: random.Random) -> Problem:
    n, item = r.choice(_NAMES), r.choice(_ITEMS)
    k, per, extra = r.randint(2, 9), r.randint(2, 9), r.randint(1, 20)
    t = k * per
    return Problem(f"{n} buys {k} boxes of {per} {item} and finds {extra} more. How many {item} in total?",
                   f"{k} * {per} = {t}\n{t} + {extra} = {t + extra}\n\\boxed{{{t + extra}}}", str(t + extra))


def _linear(r: random.Random) -> Problem:
    a, x, b = r.randint(2, 9), r.randint(-9, 12), r.randint(-20, 20)
    c = a * x + b
    sb = f"+ {b}" if b >= 0 else f"- {-b}"
    rhs = c - b
    move = f"{c} - {b}" if b >= 0 else f"{c} + {-b}"
    return Problem(f"Solve for x: {a}x {sb} = {c}",
                   f"{a}x = {move} = {rhs}\nx = {rhs} / {a} = {x}\n\\boxed{{{x}}}", str(x))


KINDS = {"add": _add, "sub": _sub, "mul_add": _mul_add, "linear": _linear}


def make_problem(seed: int, index: int, kinds=tuple(KINDS)) -> Problem:
    """The ``index``-th problem of the stream ``seed`` (a pure function of both)."""
    r = random.Random((seed << 32) ^ index)
    return KINDS[kinds[r.randrange(len(kinds))]](r)


def is_heldout(p: Problem, fraction: float = 0.1) -> bool:
    """True for the held-out share of all questions (a hash of the question text, stable across runs)."""
    h = int.from_bytes(hashlib.blake2b(p.question.encode(), digest_size=8).digest(), "little")
    return (h % 10_000) < fraction * 10_000


class ProblemStream:
    """Training problems of stream ``seed`` (held-out questions skipped), from position ``pos`` on.

    With several data-parallel ranks, rank ``r`` of ``world`` reads indices r, r + world, ... so the ranks
    see disjoint problems; ``pos`` (the next index to read) is the whole state to save for resumption."""

    def __init__(self, seed: int, rank: int = 0, world: int = 1, pos: int | None = None, kinds=tuple(KINDS)):
        self.seed, self.rank, self.world, self.kinds = seed, rank, world, kinds
        self.pos = rank if pos is None else pos

    def __iter__(self):
        return self

    def __next__(self) -> Problem:
        while True:
            p = make_problem(self.seed, self.pos, self.kinds)
            self.pos += self.world
            if not is_heldout(p):
                return p


def heldout_problems(n: int, seed: int = 12345, kinds=tuple(KINDS)) -> list[Problem]:
    """The first ``n`` held-out problems of stream ``seed`` (an evaluation set disjoint from training)."""
    out, i = [], 0
    while len(out) < n:
        p = make_problem(seed, i, kinds)
        i += 1
        if is_heldout(p):
            out.append(p)
    return out


def encode_sft(tok: CharTokenizer, p: Problem) -> tuple[list[int], list[bool]]:
    """A document ``<s> prompt solution </s>`` and its loss mask (True on the solution and the EOS)."""
    prompt = tok.encode(p.prompt, bos=True)
    resp = tok.encode(p.solution, eos=True)
    return prompt + resp, [False] * len(prompt) + [True] * len(resp)


def pack_documents(docs, row_len: int, n_rows: int):
    """Pack (ids, mask) documents greedily into ``n_rows`` rows of ``row_len`` tokens.

    Returns ``input_ids`` (n_rows, row_len) int64, ``labels`` (same; -100 outside the loss mask, aligned
    as HF: the loss predicts labels[:, t] from position t - 1), ``seq_idx`` (int32, a new value per
    document; the tail padding of a row gets its own value so nothing attends across it) and the one
    document drawn from the iterator ``docs`` that did not fit (or None): the caller puts it back.
    When ``docs`` runs out, the remaining space is padding.
    A document longer than ``row_len`` raises ValueError.

    The first token of every document is ``<s>`` and never a target, so no loss crosses a boundary."""
    ids = torch.full((n_rows, row_len), PAD, dtype=torch.long)
    labels = torch.full((n_rows, row_len), -100, dtype=torch.long)
    seq_idx = torch.zeros((n_rows, row_len), dtype=torch.int32)
    row, col, doc_no = 0, 0, 0
    while True:
        try:
            d, m = next(docs)
        except StopIteration:  # a finite source ran out: pad the rest
            seq_idx[row, col:] = doc_no
            return ids, labels, seq_idx, None
        if len(d) > row_len:
            raise ValueError(f"pack_documents: a document of {len(d)} tokens exceeds row_len={row_len}")
        if col + len(d) > row_len:  # close this row: its padding is one more "document"
            seq_idx[row, col:] = doc_no
            row, col, doc_no = row + 1, 0, 0
            if row == n_rows:
                return ids, labels, seq_idx, (d, m)
        t = torch.tensor(d)
        ids[row, col:col + len(d)] = t
        labels[row, col:col + len(d)] = torch.where(torch.tensor(m), t, -100)
        seq_idx[row, col:col + len(d)] = doc_no
        col, doc_no = col + len(d), doc_no + 1


class PackedBatcher:
    """Packed SFT micro-batches from a :class:`ProblemStream`; its ``stream.pos`` is the resumable state
    (a document that did not fit a batch is drawn again by the next one)."""

    def __init__(self, tok: CharTokenizer, stream: ProblemStream, row_len: int, rows: int):
        self.tok, self.stream, self.row_len, self.rows = tok, stream, row_len, rows

    def next(self) -> dict:
        last = [self.stream.pos]

        def docs():
            while True:
                last[0] = self.stream.pos
                yield encode_sft(self.tok, next(self.stream))

        ids, labels, seq_idx, left = pack_documents(docs(), self.row_len, self.rows)
        self.stream.pos = last[0]  # put the unplaced document back
        return {"input_ids": ids, "labels": labels, "seq_idx": seq_idx}
