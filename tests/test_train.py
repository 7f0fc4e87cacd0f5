"""h1r_ops.train: the demo task, SFT/GRPO loss math against hand-computed cases, one optimizer step
against a plain-torch reimplementation on the reference ops, bit-identical resume, rollout sampling, and
2-process (gloo) data parallelism equal to one process on the concatenated batch."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

import h1r_ops
import h1r_ops.reference as ref
from h1r_ops.train import dist
from h1r_ops.train.cli import tiny_model
from h1r_ops.train.grpo import (EngineRolloutBackend, GRPOConfig, GRPOTrainer, ModelRolloutBackend,
                                Sample, build_rollout_batch, token_logprobs)
from h1r_ops.train.losses import grpo_advantages, grpo_token_losses, ppo_clip_token_loss, truncated_is_weights
from h1r_ops.train.sft import OptimConfig, SFTTrainer, sft_token_loss_sum, warmup_cosine
from h1r_ops.train.tasks import (BOS, EOS, PAD, CharTokenizer, PackedBatcher, ProblemStream,
                                 heldout_problems, is_heldout, make_problem, pack_documents)
from h1r_ops.infer.answers import extract_answer
from h1r_ops.train.verifier import answers_match, boxed_reward, extract_boxed

SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             head_dim=16, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=16)
TOK = CharTokenizer()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # the tiny models gain nothing from threads, and on a busy machine OpenMP barriers make them far slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_model(seed=0):
    return tiny_model(TOK.vocab_size, seed=seed, **SMALL)


# ----------------------------------------------------------------------------------------------------
# task, tokenizer, packing, verifier
# ----------------------------------------------------------------------------------------------------
def test_tokenizer_roundtrip_and_errors():
    text = "Q: Solve for x: 3x - 4 = 11\nA: \\boxed{5}"
    ids = TOK.encode(text, bos=True, eos=True)
    assert ids[0] == BOS and ids[-1] == EOS and TOK.decode(ids) == text
    assert TOK.decode(ids, skip_special=False).startswith("<s>")
    with pytest.raises(ValueError, match="'text'"):
        TOK.encode("é")


def _check_solution(p):
    # every "a = b = c" line of the solution is true arithmetic (sides without x), the box holds the
    # answer, and a linear equation's answer solves it
    for line in p.solution.splitlines()[:-1]:
        vals = [eval(side) for side in line.split("=") if "x" not in side]
        assert all(v == vals[-1] for v in vals), line
    assert extract_boxed(p.solution) == p.answer
    if p.question.startswith("Solve for x: "):
        lhs, rhs = p.question[len("Solve for x: "):].split("=")
        assert eval(lhs.replace("x", f"*({p.answer})")) == int(rhs)


def test_problems_are_deterministic_correct_and_split():
    for i in range(300):
        p = make_problem(7, i)
        assert p == make_problem(7, i)
        _check_solution(p)
        TOK.encode(p.prompt + p.solution)  # in the alphabet
    held = {p.question for p in heldout_problems(50)}
    s = ProblemStream(12345)
    train = {next(s).question for _ in range(2000)}
    assert not held & train and all(is_heldout(p) for p in heldout_problems(50))


def test_stream_ranks_are_disjoint_and_resumable():
    a, b = ProblemStream(3, 0, 2), ProblemStream(3, 1, 2)
    [next(a) for _ in range(20)], [next(b) for _ in range(20)]
    assert a.pos % 2 == 0 and b.pos % 2 == 1  # rank r reads indices r, r + world, ...
    pos = a.pos
    more = [next(a) for _ in range(5)]
    again = ProblemStream(3, 0, 2, pos=pos)
    assert [next(again) for _ in range(5)] == more


def test_pack_documents_hand_case():
    docs = iter([([1, 10, 11, 2], [False, False, True, True]), ([1, 12, 2], [False, True, True]),
                 ([1, 13, 14, 15, 2], [False, False, True, True, True]), ([1, 16], [False, True])])
    ids, labels, seq_idx, left = pack_documents(docs, row_len=8, n_rows=2)
    assert ids.tolist() == [[1, 10, 11, 2, 1, 12, 2, PAD], [1, 13, 14, 15, 2, 1, 16, PAD]]
    assert labels.tolist() == [[-100, -100, 11, 2, -100, 12, 2, -100], [-100, -100, 14, 15, 2, -100, 16, -100]]
    assert seq_idx.tolist() == [[0, 0, 0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 0, 1, 1, 2]]
    assert left is None  # the source ran out: no document left over
    ids, _, _, left = pack_documents(iter([([1, 10, 2], [False, True, True])] * 3), row_len=8, n_rows=1)
    assert left == ([1, 10, 2], [False, True, True]) and ids[0].tolist() == [1, 10, 2, 1, 10, 2, PAD, PAD]
    with pytest.raises(ValueError, match="row_len"):
        pack_documents(iter([([1] * 9, [True] * 9)]), 8, 1)


def test_packed_batcher_loses_no_document():
    s = ProblemStream(5)
    b = PackedBatcher(TOK, s, row_len=160, rows=2)
    seen = []
    for _ in range(3):
        ids = b.next()["input_ids"]
        for row in ids.tolist():
            text = TOK.decode(row, skip_special=False).replace("<pad>", "")
            seen += [d for d in text.split("<s>") if d]
    ref_s = ProblemStream(5)
    expect = [next(ref_s) for _ in range(len(seen))]
    assert seen == [p.prompt + p.solution + "</s>" for p in expect]


@pytest.mark.parametrize("text,box", [("so \\boxed{12}", "12"), ("\\boxed{1} then \\boxed{-3}", "-3"),
                                      ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"), ("no box", None),
                                      ("\\boxed{12", None), ("\\boxed 7", None), ("\\boxed {5}", "5"),
                                      ("\\boxed{ 12 }", "12"), ("\\boxed{}", None), ("", None)])
def test_extract_boxed(text, box):
    # the reward's rule is the voting's extract_answer with braced_only (one implementation)
    assert extract_boxed(text) == box
    assert extract_boxed(text) == extract_answer(text, braced_only=True)


def test_answers_match():
    assert answers_match("12", "12") and answers_match(" 12.0 ", "12") and answers_match("\\frac{1}{2}", "0.5")
    assert answers_match("1,000", "1000") and not answers_match("13", "12") and not answers_match(None, "1")
    assert boxed_reward("x = 4\n\\boxed{4}", "4") == 1.0 and boxed_reward("\\boxed{5}", "4") == 0.0


# ----------------------------------------------------------------------------------------------------
# SFT: masking, normalization, schedule
# ----------------------------------------------------------------------------------------------------
def _batch(seed, rows=2, row_len=192):
    return PackedBatcher(TOK, ProblemStream(seed), row_len, rows).next()


def test_sft_loss_sums_only_response_tokens():
    torch.manual_seed(0)
    m = small_model()
    ids = torch.randint(3, TOK.vocab_size, (2, 9))
    labels = torch.full_like(ids, -100)
    labels[0, 3:6] = ids[0, 3:6]  # 3 targets predicted from positions 2..4
    labels[1, 8] = ids[1, 8]
    got = sft_token_loss_sum(m, {"input_ids": ids, "labels": labels})
    with torch.no_grad():
        logp = torch.log_softmax(m.logits(m.hidden_states(ids)).float(), -1)
    want = -(logp[0, 2, ids[0, 3]] + logp[0, 3, ids[0, 4]] + logp[0, 4, ids[0, 5]] + logp[1, 7, ids[1, 8]])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_token_normalization_weighs_every_token_equally():
    # micro-batches with 1 and 3 response tokens: the accumulated grad is that of the mean over all 4
    # tokens (per-token weight 1/4), not the mean of the two micro-batch means
    torch.manual_seed(1)
    m = small_model()
    ids = torch.randint(3, TOK.vocab_size, (1, 8))
    l1, l2 = torch.full_like(ids, -100), torch.full_like(ids, -100)
    l1[0, 2] = ids[0, 2]
    l2[0, 4:7] = ids[0, 4:7]
    tr = SFTTrainer(m, OptimConfig())
    r = tr.accumulate([{"input_ids": ids, "labels": l1}, {"input_ids": ids, "labels": l2}])
    assert r["tokens"] == 4
    g = [p.grad.clone() for p in tr.params]
    m.zero_grad()
    both = l1.clone()
    both[0, 4:7] = ids[0, 4:7]
    (sft_token_loss_sum(m, {"input_ids": ids, "labels": both}) / 4).backward()
    for a, p in zip(g, tr.params):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-5)


def test_bf16_autocast_step_close_to_fp32():
    batch = _batch(13, rows=1, row_len=128)
    out = []
    for bf16 in (False, True):
        tr = SFTTrainer(small_model(2), OptimConfig(bf16=bf16))
        out.append(tr.train_step([batch]))
    assert out[1]["loss"] == pytest.approx(out[0]["loss"], rel=2e-2)
    assert out[1]["grad_norm"] == pytest.approx(out[0]["grad_norm"], rel=5e-2)


def test_warmup_cosine_values():
    assert warmup_cosine(0, 4, 14, 0.1) == pytest.approx(0.25)
    assert warmup_cosine(3, 4, 14, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(4, 4, 14, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(9, 4, 14, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert warmup_cosine(14, 4, 14, 0.1) == pytest.approx(0.1) == warmup_cosine(99, 4, 14, 0.1)


REF_OPS = {"rms_norm": ref.rms_norm, "gated_rms_norm": ref.gated_rms_norm, "rotary": ref.rotary,
           "causal_conv1d": ref.causal_conv1d_ref, "selective_scan": ref.selective_scan_ref}


def test_sft_step_equals_plain_torch_on_reference_ops(monkeypatch):
    cfg = OptimConfig(lr=1e-2, warmup_steps=2, total_steps=10, weight_decay=0.1, grad_clip=0.5)
    batches = [_batch(11), _batch(12)]
    ours = small_model(3)
    base = small_model(3)
    tr = SFTTrainer(ours, cfg)
    for _ in range(2):
        tr.train_step(batches)

    # plain torch: reference ops, full logits, F.cross_entropy, torch AdamW, manual schedule and clipping
    for k, f in REF_OPS.items():
        monkeypatch.setattr(h1r_ops, k, f)
    decay = [p for p in base.parameters() if p.dim() >= 2]
    no_decay = [p for p in base.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for step in range(2):
        for g in opt.param_groups:
            g["lr"] = 1e-2 * (step + 1) / 2
        n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        for b in batches:
            logits = base(b["input_ids"], seq_idx=b["seq_idx"], return_logits=True)["logits"][:, :-1]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), b["labels"][:, 1:].reshape(-1),
                                   ignore_index=-100, reduction="sum") / n
            loss.backward()
        params = list(base.parameters())
        norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params))
        for p in params:
            p.grad.mul_(min(1.0, 0.5 / (float(norm) + 1e-6)))
        opt.step()
        opt.zero_grad()
    for (name, a), b in zip(ours.named_parameters(), base.parameters()):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_sft_resume_is_bit_identical(tmp_path):
    cfg = OptimConfig(lr=5e-3, warmup_steps=2, total_steps=6)

    def run(steps, model=None, ckpt_in=None, ckpt_out=None):
        model = model or small_model(4)
        tr = SFTTrainer(model, cfg)
        stream = ProblemStream(9)
        b = PackedBatcher(TOK, stream, 128, 1)
        if ckpt_in:
            stream.pos = tr.load(ckpt_in)["pos"]
        losses = []
        while tr.step < steps:
            losses.append(tr.train_step([b.next(), b.next()])["loss"])
            torch.rand(3)  # consume the global RNG: its state must be restored too
        if ckpt_out:
            tr.save(ckpt_out, {"pos": stream.pos})
        return model, losses, torch.rand(1)

    full, l_full, r_full = run(4)
    _, l_a, _ = run(2, ckpt_out=str(tmp_path))
    torch.manual_seed(123)  # disturb the RNG: load() must restore it
    resumed, l_b, r_b = run(4, model=small_model(99), ckpt_in=str(tmp_path))
    assert l_a + l_b == l_full and torch.equal(r_full, r_b)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------
# GRPO math against hand-computed values
# ----------------------------------------------------------------------------------------------------
def test_grpo_advantages_hand_case():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    a = grpo_advantages(r, scale_by_std=True, eps=0.0)
    s = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]: sqrt(4 * 0.25 / 3)
    torch.testing.assert_close(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / s)
    assert torch.all(grpo_advantages(r)[1] == 0)
    torch.testing.assert_close(a[2], torch.tensor([2.25, -0.75, -0.75, -0.75]) / 1.5)  # std of [3,0,0,0] = 1.5
    torch.testing.assert_close(grpo_advantages(r, scale_by_std=False)[2], torch.tensor([2.25, -0.75, -0.75, -0.75]))
    assert torch.all(grpo_advantages(torch.tensor([[5.0]])) == 0)


def test_ppo_clip_hand_case():
    rho = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0])
    logp = torch.log(rho).requires_grad_()
    pg, clipped = ppo_clip_token_loss(logp, torch.zeros(5), adv, eps_low=0.2, eps_high=0.28)
    # A>0, rho 1.5 > 1.28: clipped to -1.28; A<0 rho 1.5: -A rho = 1.5 (unclipped, the pessimistic side);
    # A>0 rho 0.5: -0.5 (unclipped); A<0 rho 0.5: clip to 0.8 -> 0.8; inside the band: -2.2
    torch.testing.assert_close(pg.detach(), torch.tensor([-1.28, 1.5, -0.5, 0.8, -2.2]))
    assert clipped.tolist() == [True, False, False, True, False]
    pg.sum().backward()  # d/dlogp (-A rho) = -A rho where unclipped, 0 where clipped
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, 1.5, -0.5, 0.0, -2.2]))


def test_truncated_is_hand_case():
    old = torch.tensor([math.log(3.0), math.log(0.5), 0.0, 50.0])
    w = truncated_is_weights(old, torch.zeros(4), cap=2.0)
    torch.testing.assert_close(w, torch.tensor([2.0, 0.5, 1.0, 2.0]))
    assert torch.all(truncated_is_weights(old, torch.zeros(4), None) == 1)


def test_grpo_token_losses_hand_case():
    # two rollouts: 2 and 1 response tokens; one padded position. Token-mean over 3 tokens.
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.1], [0.2, 0.9, 0.3]])).requires_grad_()
    old = logp.detach().clone()
    old[0, 1] = math.log(0.2)  # rho = 1.25 on that token
    roll = old.clone()
    roll[0, 0] = old[0, 0] - math.log(3.0)  # TIS weight min(3, 2) = 2
    adv = torch.tensor([[1.0, 1.0, 1.0], [-0.5, -0.5, -0.5]])
    mask = torch.tensor([[True, True, False], [False, True, False]])
    L, st = grpo_token_losses(logp, old, roll, adv, mask, eps_low=0.2, eps_high=0.2, tis_cap=2.0)
    # token (0,0): rho 1, w 2 -> -2; (0,1): rho 1.25 clipped to 1.2 -> -1.2; (1,1): rho 1, A -0.5 -> 0.5
    torch.testing.assert_close(L.detach(), torch.tensor([[-2.0, -1.2, 0.0], [0.0, 0.5, 0.0]]))
    assert st["clip_frac"].item() == 1 and st["tis_weight"].item() == pytest.approx(4.0)
    (L.sum() / 3).backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-2.0 / 3, 0.0, 0.0], [0.0, 0.5 / 3, 0.0]]))
    # KL (k3) and entropy terms, off by default
    ref_lp = logp.detach() + math.log(2.0)
    ent = torch.ones(2, 3)
    L2, st2 = grpo_token_losses(logp, logp.detach(), logp.detach(), torch.zeros(2, 3), mask, kl_coef=0.1,
                                ref_logp=ref_lp, entropy_coef=0.01, entropy=ent)
    k3 = 2.0 - math.log(2.0) - 1.0
    torch.testing.assert_close(L2.detach(), mask.float() * (0.1 * k3 - 0.01))
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_token_losses(logp, old, roll, adv, mask, kl_coef=0.1)


# ----------------------------------------------------------------------------------------------------
# rollouts and the GRPO trainer
# ----------------------------------------------------------------------------------------------------
def _prompts(n, seed=0):
    ps = [make_problem(seed, i) for i in range(n)]
    return [TOK.encode(p.prompt, bos=True) for p in ps], [p.answer for p in ps]


def test_rollout_backend_per_sequence_seeds_and_logprobs():
    m = small_model(5)
    be = ModelRolloutBackend(m, EOS)
    (p0, p1), _ = _prompts(2)
    a = be.generate([p0, p1], 3, max_new_tokens=12, temperature=1.3, seed=7)
    b = be.generate([p0], 3, max_new_tokens=12, temperature=1.3, seed=7)
    assert [s.tokens for s in a[0]] == [s.tokens for s in b[0]]  # independent of the batch it ran in
    assert len({tuple(s.tokens) for s in a[0]}) > 1  # different seeds per rollout
    # the sampler's log-probs equal the trainer's recompute (full forward, fused log-probs) closely
    batch = build_rollout_batch([p0, p1], a, torch.zeros(2, 3))
    lp, _ = token_logprobs(m, batch.input_ids, batch.mask, 1.3)
    torch.testing.assert_close(lp[batch.mask], batch.rollout_logp[batch.mask], atol=2e-4, rtol=1e-4)
    for i, p in enumerate([p0, p1]):
        for s in a[i]:
            assert len(s.tokens) == len(s.logprobs) and (s.finished == (s.tokens[-1] == EOS))


def test_grpo_micro_loss_equals_reference_logprobs():
    m = small_model(6)
    cfg = GRPOConfig(temperature=0.8, tis_cap=2.0)
    tr = GRPOTrainer(m, cfg, ModelRolloutBackend(m, EOS), lambda t, g: 0.0)
    ps, _ = _prompts(2, seed=1)
    samples = [[Sample([5, 6, 7, EOS], [-1.0, -2.0, -0.5, -0.1], True), Sample([8, 9], [-3.0, -1.0], False)]
               for _ in ps]
    batch = build_rollout_batch(ps, samples, torch.tensor([[1.0, -1.0], [0.5, -0.5]]))
    loss, _ = tr.micro_loss(batch)
    h = m.hidden_states(batch.input_ids)[:, :-1]
    tgt = torch.where(batch.mask, batch.input_ids[:, 1:], -100)
    lp, _ = ref.fused_linear_logprobs(h, m.lm_head_weight, tgt, temperature=0.8, logit_scale=m.config.lm_head_multiplier)
    w = torch.exp(lp.detach() - batch.rollout_logp).clamp(max=2.0)
    want = (-(batch.adv * w) * batch.mask).sum()  # on-policy: rho = 1, so pg = -A
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)


def test_grpo_resume_is_bit_identical(tmp_path):
    cfg = GRPOConfig(lr=1e-3, warmup_steps=1, total_steps=4, group_size=3, max_new_tokens=10, temperature=1.5,
                     minibatches=2)
    reward = lambda toks, gold: float(len(toks) % 2)  # noqa: E731  (any verifiable signal will do)

    def run(steps, model, ckpt_in=None, ckpt_out=None):
        tr = GRPOTrainer(model, cfg, ModelRolloutBackend(model, EOS), reward)
        stream = ProblemStream(2)
        if ckpt_in:
            stream.pos = tr.load(ckpt_in)["pos"]
        ms = []
        while tr.step < steps * 2:
            probs = [next(stream) for _ in range(2)]
            ms.append(tr.train_step([TOK.encode(p.prompt, bos=True) for p in probs], [p.answer for p in probs]))
        if ckpt_out:
            tr.save(ckpt_out, {"pos": stream.pos})
        return ms

    full = small_model(8)
    m_full = run(2, full)
    part = small_model(8)
    run(1, part, ckpt_out=str(tmp_path))
    resumed = small_model(77)
    m_res = run(2, resumed, ckpt_in=str(tmp_path))
    assert m_res[-1]["loss"] == m_full[-1]["loss"] and m_res[-1]["reward"] == m_full[-1]["reward"]
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_evaluate_greedy_engine_equals_model_decode():
    from h1r_ops.train.sft import evaluate_greedy

    m = small_model(5)
    probs = heldout_problems(4)
    a = evaluate_greedy(m, TOK, probs, max_new_tokens=10, engine=True)
    b = evaluate_greedy(m, TOK, probs, max_new_tokens=10, engine=False)
    assert a == b and m.training


def test_engine_backend_seeds_logprobs_and_weight_push():
    m = small_model(5)
    be = EngineRolloutBackend(m, EOS, max_num_seqs=6, max_model_len=160)
    (p0, p1), _ = _prompts(2)
    a = be.generate([p0, p1], 3, max_new_tokens=12, temperature=1.3, seed=7)
    b = be.generate([p0], 3, max_new_tokens=12, temperature=1.3, seed=7)
    assert [s.tokens for s in a[0]] == [s.tokens for s in b[0]]  # independent of the traces it ran with
    assert len({tuple(s.tokens) for s in a[0]}) > 1
    for ss in a:
        for s in ss:
            assert len(s.tokens) == len(s.logprobs) and s.finished == (s.tokens[-1] == EOS)
            assert s.finished or len(s.tokens) == 12
    # the engine reports raw (temperature-1) log-probs: equal to the trainer's temperature-1 recompute
    assert be.logprobs_temperature == 1.0
    batch = build_rollout_batch([p0, p1], a, torch.zeros(2, 3))
    lp, _ = token_logprobs(m, batch.input_ids, batch.mask, 1.0)
    torch.testing.assert_close(lp[batch.mask], batch.rollout_logp[batch.mask], atol=2e-4, rtol=1e-4)
    # the engine decodes its own copy: a weight change reaches it only through sync_weights
    with torch.no_grad():
        m.lm_head_weight.mul_(3.0)
    assert be.generate([p0], 3, max_new_tokens=12, temperature=1.3, seed=7) == b
    be.sync_weights(m)
    fresh = EngineRolloutBackend(m, EOS, max_num_seqs=6, max_model_len=160)
    c = be.generate([p0], 3, max_new_tokens=12, temperature=1.3, seed=7)
    assert c == fresh.generate([p0], 3, max_new_tokens=12, temperature=1.3, seed=7) and c != b


def test_grpo_with_engine_tis_at_engine_temperature_and_push():
    m = small_model(6)
    be = EngineRolloutBackend(m, EOS, max_num_seqs=8, max_model_len=160)
    cfg = GRPOConfig(lr=1e-3, warmup_steps=1, temperature=0.8, tis_cap=1.5, group_size=4, max_new_tokens=8)
    tr = GRPOTrainer(m, cfg, be, lambda t, g: float(len(t) % 2))
    assert tr.tis_temperature == 1.0
    ps, golds = _prompts(2, seed=1)
    batch, _ = tr.rollout(ps, golds)
    loss, _ = tr.micro_loss(batch)
    # by hand: rho = 1 on policy; TIS weight from the trainer's temperature-1 log-probs vs the engine's
    h = m.hidden_states(batch.input_ids)[:, :-1]
    tgt = torch.where(batch.mask, batch.input_ids[:, 1:], -100)
    lp1, _ = ref.fused_linear_logprobs(h, m.lm_head_weight, tgt, temperature=1.0, logit_scale=m.config.lm_head_multiplier)
    w = torch.exp(lp1.detach() - batch.rollout_logp).clamp(max=1.5)
    torch.testing.assert_close(loss, (-(batch.adv * w) * batch.mask).sum(), atol=1e-5, rtol=1e-5)
    # after a step the engine holds the trainer's new weights
    tr.train_step(ps, golds)
    assert be.version == 2 and tr.backend_version == tr.step == 1
    for k, v in m.state_dict().items():
        assert torch.equal(be.model.state_dict()[k], v), k


# ----------------------------------------------------------------------------------------------------
# 2 processes (gloo) == 1 process on the concatenated batch
# ----------------------------------------------------------------------------------------------------
def _dist_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _dist_run(rank, world, out_dir, fsdp=False)
        if world == 2:
            _dist_run(rank, world, out_dir, fsdp=True)
    finally:
        torch.distributed.destroy_process_group()


def _dist_run(rank, world, out_dir, fsdp):
    """One SFT step and one GRPO update on this rank's share; rank 0 saves the full weights."""
    wrap = dist.shard_model if fsdp else (lambda m: m)
    sft_batches = [_batch(21 + i, rows=1) for i in range(4)]  # 4 micro-batches in all
    mine = sft_batches[rank * 2:(rank + 1) * 2] if world == 2 else sft_batches
    m = wrap(small_model(10))
    tr = SFTTrainer(m, OptimConfig(lr=1e-2, warmup_steps=1, total_steps=4, grad_clip=0.3))
    tr.train_step(mine)

    g = wrap(small_model(11))
    gt = GRPOTrainer(g, GRPOConfig(lr=1e-2, warmup_steps=1, micro_batch=2), ModelRolloutBackend(g, EOS),
                     lambda t, a: 0.0)
    ps, _ = _prompts(2, seed=3)
    samples = [[Sample([5, 6, 7, EOS], [-1.0, -2.0, -0.5, -0.1], True), Sample([8, 9, 10], [-3.0, -1.0, -2.0], False),
                Sample([11], [-0.7], False)] for _ in ps]
    full = build_rollout_batch(ps, samples, torch.tensor([[1.0, -1.0, 0.3], [0.5, -0.5, 2.0]]))
    # unequal shares for plain data parallelism; FSDP needs the same number of micro-batches per rank
    cut = 3 if fsdp else 2
    part = full if world == 1 else full.slice(slice(0, cut) if rank == 0 else slice(cut, 6))
    gt.update(part)
    sd = {"sft": dist.full_state_dict(m), "grpo": dist.full_state_dict(g)}
    if fsdp:
        # checkpoint round trip of the sharded trainer (full tensors on disk) and a weight push to an
        # engine from the sharded model
        tr.save(os.path.join(out_dir, "fsdp_ckpt"), {"pos": 0})
        m2 = wrap(small_model(12))
        tr2 = SFTTrainer(m2, OptimConfig(lr=1e-2, warmup_steps=1, total_steps=4, grad_clip=0.3))
        tr2.load(os.path.join(out_dir, "fsdp_ckpt"))
        for k, v in dist.full_state_dict(m2).items():
            assert torch.equal(v, sd["sft"][k]), k
        assert tr2.step == 1
        be = EngineRolloutBackend(m2, EOS, max_num_seqs=2, max_model_len=160)
        be.sync_weights(m2)
        for k, v in be.model.state_dict().items():
            assert torch.equal(v, sd["sft"][k]), k
    if rank == 0:
        torch.save(sd, os.path.join(out_dir, f"w{world}{'fsdp' if fsdp else ''}.pt"))


def test_two_ranks_equal_one_rank_on_concatenated_batch(tmp_path):
    import torch.multiprocessing as mp

    for world in (1, 2):  # world 2 runs plain data parallelism, then FSDP2
        mp.spawn(_dist_worker, args=(world, str(tmp_path / f"init{world}"), str(tmp_path)), nprocs=world, join=True)
    one = torch.load(tmp_path / "w1.pt")
    for name in ("w2.pt", "w2fsdp.pt"):  # plain data parallel, and FSDP2 (fully_shard) over gloo
        two = torch.load(tmp_path / name)
        for part in ("sft", "grpo"):
            changed = False
            for k in one[part]:
                torch.testing.assert_close(two[part][k], one[part][k], atol=2e-6, rtol=2e-5,
                                           msg=lambda m: f"{name} {part} {k}: {m}")
                changed |= not torch.equal(one[part][k], small_model(10 if part == "sft" else 11).state_dict()[k])
            assert changed


# ----------------------------------------------------------------------------------------------------
# CLI smoke
# ----------------------------------------------------------------------------------------------------
def test_cli_sft_then_grpo(tmp_path, capsys):
    import json

    from h1r_ops.cli import main

    sft = tmp_path / "sft"
    assert main(["train", "sft", "--out", str(sft), "--steps", "2", "--rows", "1", "--row-len", "128",
                 "--eval-n", "1", "--warmup", "1"]) == 0
    recs = [json.loads(line) for line in open(sft / "metrics.jsonl")]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2] and "eval_accuracy" in recs[-1]
    assert (sft / "model" / "config.json").exists() and (sft / "ckpt" / "trainer.pt").exists()
    grpo = tmp_path / "grpo"
    assert main(["train", "grpo", "--out", str(grpo), "--init", str(sft / "model"), "--steps", "1", "--prompts", "1",
                 "--group-size", "2", "--max-new-tokens", "4", "--eval-n", "0"]) == 0
    recs = [json.loads(line) for line in open(grpo / "metrics.jsonl")]
    assert {"reward", "response_len", "tokens_per_s", "loss"} <= set(recs[0])


def test_cli_demo_quick(tmp_path):
    # the whole demo pipeline (SFT -> GRPO with engine rollouts -> eval -> DeepConf vs majority) at tiny sizes
    import json

    from h1r_ops.cli import main

    out = tmp_path / "out"
    assert main(["train", "demo", "--quick", "--out", str(out), "--work", str(tmp_path / "work"), "--threads", "1"]) == 0
    res = json.load(open(out / "demo_results.json"))
    assert set(res["deepconf"]) >= {"majority", "deepconf_offline", "deepconf_online"}
    assert res["deepconf"]["deepconf_online"]["tokens"] <= res["deepconf"]["majority"]["tokens"]
    assert res["grpo"]["steps"] == 2 and 0 <= res["sft"]["accuracy"] <= 1
    stages = {json.loads(line)["stage"] for line in open(out / "demo_metrics.jsonl")}
    assert stages == {"sft", "grpo", "deepconf"}
    md = (out / "demo_results.md").read_text()
    assert md.startswith("# h1r train demo") and "DeepConf-high online" in md and "DeepConf-low online" in md
    dc = res["deepconf"]
    assert [v["name"] for v in dc["variants"]] == ["DeepConf-high", "DeepConf-low"]
    for v in dc["variants"]:
        for mode in ("offline", "online"):
            pr = v[mode]["paired"]
            assert sum(pr[k] for k in ("deepconf_right_majority_wrong", "majority_right_deepconf_wrong", "both_right",
                                       "both_wrong")) == dc["problems"] and 0 <= pr["sign_test_p"] <= 1
    assert "not the demo's tuned defaults" in dc["settings_chosen_on"]   # --quick changes the budget
    pytest.importorskip("matplotlib")
    assert (out / "demo_curves.png").stat().st_size > 1000

    # --model: the DeepConf stage alone on the trained model, to its own file (the demo's files untouched)
    only = tmp_path / "only"
    assert main(["train", "demo", "--model", str(tmp_path / "work" / "grpo" / "model"), "--out", str(only),
                 "--dc-problems", "3", "--dc-offset", "5", "--dc-budget", "4", "--dc-warmup", "2", "--dc-eta", "50",
                 "--threads", "1"]) == 0
    dc = json.load(open(only / "deepconf_results.json"))["deepconf"]
    assert dc["problems"] == 3 and dc["first_problem"] == 5 and [v["eta"] for v in dc["variants"]] == [50]
    assert [r["problem"] for r in dc["per_problem"]] == [5, 6, 7]
    assert sorted(os.listdir(only)) == ["deepconf_results.json"]


def test_deepconf_tuning_rule():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "deepconf_tuning.py")
    spec = importlib.util.spec_from_file_location("deepconf_tuning", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def dc(maj, acc, tokens):
        return {"majority": {"accuracy": maj}, "variants": [{"eta": 10, "online": {"accuracy": 1.0, "tokens": 1}},
                                                            {"eta": 90, "online": {"accuracy": acc, "tokens": tokens}}]}

    rows = [("a", dc(0.7, 0.7, 90)), ("b", dc(0.7, 0.72, 80)), ("c", dc(0.7, 0.69, 10))]
    assert mod.choose(rows)[0] == "b"                       # fewest tokens among those >= majority
    rows = [("a", dc(0.7, 0.6, 90)), ("b", dc(0.7, 0.65, 80)), ("c", dc(0.7, 0.65, 70))]
    assert mod.choose(rows)[0] == "c"                       # none: the most accurate, then fewer tokens


def test_demo_markdown_reads_results_files_from_before_the_variants():
    # --replot of a results file written before DeepConf-high/-low: its one eta, no paired counts
    from h1r_ops.train.demo import _deepconf_markdown

    old = {"problems": 80, "first_problem": 0, "budget": 16, "warmup": 8, "eta": 50, "tau": 0.95, "window": 16,
           "temperature": 1.0, "single_trace_accuracy": 0.5, "majority": {"accuracy": 0.6, "tokens": 100},
           "deepconf_offline": {"accuracy": 0.5, "tokens": 100, "method": "top50_bottom_window_filtered"},
           "deepconf_online": {"accuracy": 0.55, "tokens": 80, "tokens_saved_vs_majority": 0.2, "mean_traces": 12.0,
                               "pruned_traces": 3}}
    md = "\n".join(_deepconf_markdown(old))
    assert "| DeepConf online (eta 50) | **55.0%** | 80 (**20% fewer**" in md


def test_demo_settings_note_flags_overlap_with_the_tuning_slice():
    from h1r_ops.train.demo import DC_TUNE, _args, _settings_note

    assert "WARNING" not in _settings_note(_args([]))   # defaults: reported slice after the tuning slice
    assert "WARNING" in _settings_note(_args(["--dc-offset", str(DC_TUNE["first"])]))
    assert "not the demo's tuned defaults" in _settings_note(_args(["--dc-eta", "50"]))


def test_demo_paired_interval_and_verdict_against_hand_computed_cases():
    # paired difference of proportions on the same problems: a = DeepConf right only, b = majority right only;
    # var = (a + b - (a - b)^2 / n) / n^2, Wald 95% interval; verdict against the non-inferiority margin
    import math

    from h1r_ops.train.demo import DC_MATCH_MARGIN, _paired, _verdict_line

    def rows(a, b, both_right, both_wrong):
        return ([{"majority": False, "dc": True}] * a + [{"majority": True, "dc": False}] * b
                + [{"majority": True, "dc": True}] * both_right + [{"majority": False, "dc": False}] * both_wrong)

    pr = _paired(rows(1, 4, 294, 101), "dc")                       # 400 problems, the demo's 1 / 4
    half = 1.96 * math.sqrt(5 - 9 / 400) / 400
    assert pr["difference"] == pytest.approx(-3 / 400)
    assert pr["difference_ci95"] == pytest.approx([-3 / 400 - half, -3 / 400 + half])
    assert pr["sign_test_p"] == pytest.approx(2 * (1 + 5) / 32)   # P(X <= 1), X ~ Bin(5, 1/2), two-sided
    assert pr["verdict"] == "matches" and pr["difference_ci95"][0] > -DC_MATCH_MARGIN
    assert _paired(rows(30, 2, 300, 68), "dc")["verdict"] == "beats"
    assert _paired(rows(2, 30, 300, 68), "dc")["verdict"] == "below"
    assert _paired(rows(0, 0, 10, 0), "dc")["difference_ci95"] == [0.0, 0.0]   # no discordant problem
    assert _paired([], "dc")["verdict"] == "matches"                           # no problem: no division by 0
    d = {"variants": [{"name": "DeepConf-high", "eta": 90.0, "offline": {},
                       "online": {"tokens_saved_vs_majority": 0.19, "paired": pr}}]}
    assert _verdict_line(d).startswith("**Verdict: DeepConf-high online matches majority voting** with 19% fewer")


def test_demo_replot_recomputes_the_paired_statistics_from_per_problem_rows():
    from h1r_ops.train.demo import _repaired

    per = [{"majority": True, "offline_90": True, "online_90": False}] * 3 + \
          [{"majority": False, "offline_90": True, "online_90": True}]
    old = {"variants": [{"name": "DeepConf-high", "eta": 90.0, "offline": {"accuracy": 1.0},
                         "online": {"accuracy": 0.25, "paired": {"sign_test_p": 1.0}}}]}
    dc = _repaired(old, per)
    assert dc["deepconf_online"]["paired"]["majority_right_deepconf_wrong"] == 3
    assert dc["deepconf_offline"]["paired"]["deepconf_right_majority_wrong"] == 1
    assert dc["deepconf_online"]["paired"]["verdict"] == "below"
