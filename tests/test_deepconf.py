"""DeepConf: confidences, voting methods, answer extraction, and the online/offline drivers on synthetic
confidence streams (a scripted stand-in for the engine) and on the real engine."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from _engine_helpers import one_thread  # noqa: E402

from h1r_ops.infer.answers import AnswerGroups, answers_equal, extract_answer, normalize_answer  # noqa: E402
from h1r_ops.infer.confidence import (WindowStop, bottom_percent_confidence, group_confidences,  # noqa: E402
                                      lowest_group_confidence, tail_confidence)
from h1r_ops.infer.deepconf import compute_all_voting_results, deepconf, top_confidence_mask, weighted_vote  # noqa: E402
from h1r_ops.infer.engine import TraceOutput  # noqa: E402
from h1r_ops.infer.sampling import SamplingParams  # noqa: E402


_threads = pytest.fixture(scope="module", autouse=True)(one_thread)


# -- confidences ---------------------------------------------------------------------------------------------
def test_group_confidences_against_loops():
    rng = np.random.default_rng(0)
    c = rng.random(37)
    for w in (1, 5, 36, 37):
        want = [c[i : i + w].mean() for i in range(len(c) - w + 1)]
        np.testing.assert_allclose(group_confidences(c, w), want, rtol=1e-12)
        assert lowest_group_confidence(c, w) == pytest.approx(min(want))
        k = max(1, int(0.1 * len(want)))
        assert bottom_percent_confidence(c, w) == pytest.approx(np.mean(sorted(want)[:k]))
    assert list(group_confidences(c, 50)) == pytest.approx([c.mean()])   # shorter than the window
    assert tail_confidence(c, 4) == pytest.approx(c[-4:].mean())
    assert lowest_group_confidence([], 4) == 0.0


def test_window_stop_fires_exactly_at_definition():
    rng = np.random.default_rng(1)
    for _ in range(50):
        c = rng.random(40) + 1
        w, s = int(rng.integers(1, 12)), 1.4
        st = WindowStop(s, w)
        fired = next((i for i, x in enumerate(c) if st.push(x)), None)
        want = next((i for i in range(w - 1, len(c)) if c[i - w + 1 : i + 1].mean() < s), None)
        assert fired == want


# -- voting ----------------------------------------------------------------------------------------------------
def test_weighted_vote_and_filter():
    a, sh = weighted_vote(["1", "2", "2", None, "1"], [0.9, 0.3, 0.4, 5.0, 0.2])
    assert a == "1" and sh == pytest.approx({"1": 1.1 / 1.8, "2": 0.7 / 1.8})
    assert weighted_vote([None], [1.0]) == (None, {})
    assert weighted_vote(["x", "y"], [1, 1])[0] == "x"   # ties: first seen
    assert list(top_confidence_mask([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 10)) == [False] * 9 + [True]   # >= 9.1
    assert top_confidence_mask([1, 2, 3, 4], 50).tolist() == [False, False, True, True]                  # >= 2.5


def test_all_voting_methods_hand_computed():
    T = [dict(answer="A", confs=[1, 1, 1, 1]), dict(answer="B", confs=[3, 3, 0, 0]), dict(answer="B", confs=[0.5, 0.5]),
         dict(answer=None, confs=[9, 9]), dict(answer="A", confs=[2, 2]), dict(answer="B", confs=[0.1, 0.1])]
    r = compute_all_voting_results(T, window=2, tail=2, eta=50)
    assert r["majority"]["answer"] == "B" and r["majority"]["num_votes"] == 5
    assert r["mean_confidence_weighted"]["shares"] == pytest.approx({"A": 3 / 5.1, "B": 2.1 / 5.1})   # 1+2 vs 1.5+.5+.1
    assert r["tail_confidence_weighted"]["shares"] == pytest.approx({"A": 3 / 3.6, "B": 0.6 / 3.6})   # tails 1,0,.5,2,.1
    # groups of 2: t1 [3, 1.5, 0] -> bottom-10% = min = 0; the others are constant
    assert r["bottom_window_weighted"]["shares"] == pytest.approx({"A": 3 / 3.6, "B": 0.6 / 3.6})
    assert r["min_window_weighted"]["answer"] == "A"
    # top 50% by tail: percentile([1, 0, .5, 2, .1], 50) = .5 -> t0, t2, t4 vote with their tails
    assert r["top50_tail_filtered"]["shares"] == pytest.approx({"A": 3 / 3.5, "B": 0.5 / 3.5})
    assert r["top50_tail_filtered"]["num_votes"] == 3
    assert r["top50_bottom_window_filtered"]["answer"] == "A"
    assert set(compute_all_voting_results(T)) == {"majority", "mean_confidence_weighted", "tail_confidence_weighted",
                                                 "bottom_window_weighted", "min_window_weighted", "top10_tail_filtered",
                                                 "top10_bottom_window_filtered"}
    assert compute_all_voting_results([dict(answer=None, confs=[1])])["majority"]["answer"] is None


# -- answers -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,want", [
    ("so \\boxed{42}.", "42"),
    ("\\boxed{1} then \\boxed{\\frac{a}{b^{2}}}", "\\frac{a}{b^{2}}"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
    ("cut off \\boxed{\\frac{1}{2", None),
    ("no answer here", None),
    ("$\\boxed 7$ done", "7"),
    ("\\boxed{}", None),
    ("\\boxed{ 12 }", "12"),
    ("\\fbox{3}", "3"),
    ("\\boxed {5}", "5"),
    ("", None),
    (None, None),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_extract_answer_braced_only():
    assert extract_answer("$\\boxed 7$", braced_only=True) is None
    assert extract_answer("\\boxed 7 \\boxed{8}", braced_only=True) == "8"


@pytest.mark.parametrize("a,b,eq", [
    ("\\dfrac{1}{2}", "\\frac12", True), ("1,000", "1000", True), ("\\text{B}", "b", True), ("x = 5", "5", True),
    ("5.0", "5", True), ("0.50", ".5", False), ("90^\\circ", "90", True), ("\\frac{4}{2}", "2", True),
    ("3", "4", False), ("\\left(1,2\\right)", "(1,2)", True), ("50\\%", "50", True),
])
def test_answers_equal_fallback(a, b, eq):
    assert answers_equal(a, b, use_math_verify=False) == eq


def test_answer_groups_pool_equivalent_answers():
    g = AnswerGroups(lambda a, b: answers_equal(a, b, use_math_verify=False))
    assert [g.key(x) for x in ["\\frac{1}{2}", "1/2", "3", "\\dfrac12", "3.0"]] == ["\\frac{1}{2}", "\\frac{1}{2}", "3",
                                                                                   "\\frac{1}{2}", "3"]
    assert normalize_answer("\\text{(A)}") == "(A)"


# -- the online driver on scripted confidence streams ------------------------------------------------------
class ScriptedEngine:
    """Engine stand-in: trace number seed + i of a request replays SCRIPT[seed + i] = (confs, text), one
    token per step for every live trace; the online stop rule is the engine's (WindowStop)."""

    tokenizer = None

    def __init__(self, script):
        self.script, self.live, self.rid = script, [], 0
        self.started = []

    def add_request(self, prompt, params):
        self.rid += 1
        for i in range(params.n):
            k = params.seed + i
            self.live.append(dict(rid=self.rid, i=i, k=k, t=0, p=params,
                                  stop=None if params.conf_threshold is None else WindowStop(params.conf_threshold,
                                                                                             params.conf_window)))
            self.started.append(k)
        return self.rid

    def _out(self, s, reason):
        confs, text = self.script[s["k"]]
        return TraceOutput(s["rid"], s["i"], [], [0] * s["t"], reason, list(confs[: s["t"]]), text)

    def has_unfinished(self):
        return bool(self.live)

    def step(self):
        done, keep = [], []
        for s in self.live:
            confs, _ = self.script[s["k"]]
            s["t"] += 1
            if s["stop"] is not None and s["stop"].push(confs[s["t"] - 1]):
                done.append(self._out(s, "pruned"))
            elif s["t"] == len(confs):
                done.append(self._out(s, "stop"))
            else:
                keep.append(s)
        self.live = keep
        return done

    def abort(self, rid):
        out = [self._out(s, "aborted") for s in self.live if s["rid"] == rid]
        self.live = [s for s in self.live if s["rid"] != rid]
        return out


def _script(w1_answer="1", f2_answer="2"):
    b = lambda x: f"... \\boxed{{{x}}}"  # noqa: E731
    return [
        ([5] * 6, b("1")), ([4] * 6, b(w1_answer)), ([3] * 6, b("2")), ([2] * 6, b("3")),   # warm-up: min 5, 4, 3, 2
        ([5, 5, 5, 5, 1, 1, 1, 1, 1], b("9")),   # windows of 4: 5, 4, 3 < s at token 6 -> pruned there
        ([1, 1, 1], b("9")),                     # shorter than the window: never stopped, min = mean = 1 < s: dropped
        ([4] * 5, b(f2_answer)),                 # kept, weight 4
        ([3.6] * 5, b("1")),                     # kept, weight 3.6
    ]


def test_online_stops_exactly_the_defined_traces():
    eng = ScriptedEngine(_script())
    r = deepconf(eng, [1], mode="online", budget=8, warmup=4, eta=50, window=4, tau=None,
                 params=SamplingParams(seed=0))
    assert r.threshold == pytest.approx(3.5)   # percentile([5, 4, 3, 2], 100 - 50)
    st = {t.index: (t.status, t.num_tokens) for t in r.traces}
    assert st == {0: ("kept", 6), 1: ("kept", 6), 2: ("dropped", 6), 3: ("dropped", 6), 4: ("pruned", 6),
                  5: ("dropped", 3), 6: ("kept", 5), 7: ("kept", 5)}
    assert r.answer == "1" and r.shares == pytest.approx({"1": 12.6 / 16.6, "2": 4 / 16.6})
    assert r.tokens_generated == 6 * 4 + 6 + 3 + 5 + 5
    assert not r.stopped_early


def test_online_adaptive_stop_at_tau():
    # warm-up votes 1: 5, 2: 4; then trace 5 (dropped), traces 6 (2: 4) and 7 finish together: after
    # trace 6 the consensus is 8 / 13 >= 0.6 -> traces 7 and 4 are aborted
    eng = ScriptedEngine(_script(w1_answer="2"))
    r = deepconf(eng, [1], mode="online", budget=8, warmup=4, eta=50, window=4, tau=0.6, params=SamplingParams(seed=0))
    st = {t.index: t.status for t in r.traces}
    assert st[6] == "kept" and st[7] == "aborted" and st[4] == "aborted" and r.stopped_early
    assert r.answer == "2" and r.shares == pytest.approx({"2": 8 / 13, "1": 5 / 13})
    # consensus already reached by the warm-up: nothing more is generated
    eng = ScriptedEngine(_script())
    r = deepconf(eng, [1], mode="online", budget=8, warmup=4, eta=50, window=4, tau=0.9, params=SamplingParams(seed=0))
    assert eng.started == [0, 1, 2, 3] and r.stopped_early and r.answer == "1"


def test_offline_driver():
    eng = ScriptedEngine(_script())
    r = deepconf(eng, [1], mode="offline", budget=8, eta=50, window=4, params=SamplingParams(seed=0))
    assert r.voting["majority"]["answer"] in ("1", "9", "2")
    assert r.answer == r.voting["top50_bottom_window_filtered"]["answer"]
    assert sum(t.status == "kept" for t in r.traces) == 4


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        deepconf(None, [1], mode="x")
    with pytest.raises(ValueError, match="warmup"):
        deepconf(None, [1], budget=4, warmup=8)


# -- on the real engine -------------------------------------------------------------------------------------------
def test_online_on_engine_prunes_and_frees_everything():
    from _engine_helpers import tiny_model

    from h1r_ops.infer import Engine

    eng = Engine(tiny_model(), max_num_seqs=8, block_size=4, max_model_len=64)
    sp = SamplingParams(temperature=1.0, max_tokens=24, seed=3, ignore_eos=True)
    r = deepconf(eng, [5, 6, 7, 8], mode="online", budget=12, warmup=4, eta=50, window=8, tau=None, params=sp,
                 answer_fn=lambda text: "x")
    pruned = [t for t in r.traces if t.status == "pruned"]
    for t in pruned:   # stopped exactly at the first full window below s
        c = t.confs
        assert np.mean(c[-8:]) < r.threshold and all(np.mean(c[i - 8 : i]) >= r.threshold for i in range(8, len(c)))
    assert len(r.traces) == 12 and r.tokens_generated == sum(t.num_tokens for t in r.traces)
    a = eng.allocator
    assert a.num_free == a.num_blocks and a.num_allocated == a.num_freed and eng.states.num_free == eng.states.num_slots
