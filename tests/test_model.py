"""The native Falcon-H1 model against transformers' FalconH1ForCausalLM on the same random weights."""

import contextlib
import json
import math
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from h1r_ops.model import FalconH1Config, FalconH1ForCausalLM  # noqa: E402
from _engine_helpers import TINY  # noqa: E402

# The engine tests' tiny config, without its Mamba-norm choice: every variant below sets its own.
BASE = {k: v for k, v in TINY.items() if k not in ("mamba_rms_norm", "mamba_norm_before_gate")}

VARIANTS = {
    "norm_after_gate_untied": dict(mamba_rms_norm=True, mamba_norm_before_gate=False, tie_word_embeddings=False),
    "norm_before_gate_tied": dict(mamba_rms_norm=True, mamba_norm_before_gate=True, tie_word_embeddings=True),
    "no_norm_theta1e11": dict(mamba_rms_norm=False, tie_word_embeddings=False, rope_theta=1e11,
                              mamba_conv_bias=False, mamba_proj_bias=True, projectors_bias=True),
}


def _hf_model(variant, seed=0):
    kw = {**BASE, **VARIANTS[variant]}
    theta = kw.pop("rope_theta", 1e4)
    cfg = transformers.FalconH1Config(**kw, rope_parameters={"rope_type": "default", "rope_theta": theta})
    torch.manual_seed(seed)
    m = transformers.FalconH1ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand_like(p) * 4 + 0.5))
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn_like(p) * 0.5 - 1.0)
            elif p.dim() == 1:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 / math.sqrt(p.shape[-1])))
    return m


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    hf = _hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    ours = FalconH1ForCausalLM.from_pretrained(path)
    return hf, ours, path


@pytest.mark.parametrize("length", [1, 5, 16, 37])
def test_logits_match_transformers(pair, length):
    hf, ours, _ = pair
    torch.manual_seed(length)
    ids = torch.randint(3, 97, (2, length))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids, return_logits=True)["logits"]
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=2e-4)


def test_greedy_generation_matches_transformers(pair):
    hf, ours, _ = pair
    torch.manual_seed(1)
    ids = torch.randint(3, 97, (1, 7))
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=32, do_sample=False, min_new_tokens=32, pad_token_id=0)
    got = ours.generate_greedy(ids, 32)
    assert got.tolist() == ref.tolist()


def test_loss_and_gradients_match_transformers(pair):
    hf, ours, _ = pair
    torch.manual_seed(2)
    ids = torch.randint(3, 97, (2, 21))
    labels = ids.clone()
    labels[0, :4] = -100
    ref = hf(ids, labels=labels).loss
    ref.backward()
    loss = ours(ids, labels=labels)["loss"]
    loss.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    hp = dict(hf.named_parameters())
    for name in ["model.layers.0.mamba.in_proj.weight", "model.layers.1.mamba.A_log", "model.layers.0.mamba.conv1d.weight",
                 "model.layers.0.mamba.dt_bias", "model.layers.1.self_attn.q_proj.weight", "model.embed_tokens.weight"]:
        g_ours = dict(ours.named_parameters())[name].grad
        torch.testing.assert_close(g_ours, hp[name].grad, atol=1e-4, rtol=1e-3, msg=lambda m: f"{name}: {m}")
    hf.zero_grad()


def test_save_pretrained_reads_back_in_transformers(pair, tmp_path):
    hf, ours, _ = pair
    ours.save_pretrained(tmp_path)
    back = transformers.FalconH1ForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(3, 97, (1, 19))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_sharded_checkpoint_roundtrip(pair, tmp_path):
    _, ours, _ = pair
    ours.save_pretrained(tmp_path, safe_max_shard_bytes=40_000)
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    again = FalconH1ForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(3, 97, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(again(ids, return_logits=True)["logits"], ours(ids, return_logits=True)["logits"])


def test_bf16_load_runs_close_to_fp32(pair):
    _, ours, path = pair
    m16 = FalconH1ForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert m16.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = torch.randint(3, 97, (1, 23))
    with torch.no_grad():
        a = m16(ids, return_logits=True)["logits"].float()
        b = ours(ids, return_logits=True)["logits"]
    assert (a - b).abs().max() < 0.1 * b.abs().max() + 0.05


def test_packed_sequences_equal_separate_ones(pair):
    _, ours, _ = pair
    torch.manual_seed(3)
    a, b = torch.randint(3, 97, (1, 11)), torch.randint(3, 97, (1, 20))
    packed = torch.cat([a, b], dim=1)
    seq_idx = torch.tensor([[0] * 11 + [1] * 20], dtype=torch.int32)
    with torch.no_grad():
        got = ours(packed, seq_idx=seq_idx, return_logits=True)["logits"]
        ra = ours(a, return_logits=True)["logits"]
        rb = ours(b, return_logits=True)["logits"]
    torch.testing.assert_close(got, torch.cat([ra, rb], dim=1), atol=1e-4, rtol=1e-4)


# -- clear errors --------------------------------------------------------------------------------------
def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        FalconH1ForCausalLM.from_pretrained(tmp_path)


def test_wrong_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type': expected 'falcon_h1', got 'llama'"):
        FalconH1ForCausalLM.from_pretrained(tmp_path)


def test_unsupported_field(tmp_path):
    d = FalconH1Config(**{k: v for k, v in BASE.items()}).to_dict()
    d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="rope_type"):
        FalconH1ForCausalLM.from_pretrained(tmp_path)


def test_missing_and_misshaped_tensors(pair, tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, path = pair
    sd = load_file(os.path.join(path, "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    bad = dict(sd)
    del bad["model.layers.1.mamba.D"]
    save_file(bad, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.mamba.D'\]"):
        FalconH1ForCausalLM.from_pretrained(tmp_path)
    bad = dict(sd)
    bad["model.layers.0.mamba.dt_bias"] = torch.zeros(5)
    save_file(bad, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.mamba.dt_bias': expected shape \(8,\), got \(5,\)"):
        FalconH1ForCausalLM.from_pretrained(tmp_path)


# -- the fused inference path (one GEMM for [in_proj | q | k | v], one for [gate | up]) -----------------
def _module_path(model):
    """A context in which ``model`` runs inference on its module path (the unfused reference)."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        model.use_fused = False
        try:
            yield
        finally:
            model.use_fused = True

    return ctx()


def test_fused_path_is_taken_and_weights_are_views(pair):
    _, ours, path = pair
    assert ours.fused_ready(torch.device("cpu")) is False  # autograd records here
    with torch.no_grad():
        assert ours.fused_ready(torch.device("cpu"))
    layer = ours.model.layers[0]
    w = layer.fused_in.weight
    assert layer.mamba.in_proj.weight.data_ptr() == w.data_ptr()
    assert layer.self_attn.v_proj.weight.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
    # fusing moves storage, never values: the state dict is the checkpoint's, tensor for tensor
    from safetensors.torch import load_file

    saved = load_file(os.path.join(path, "model.safetensors"))
    for k, v in ours.state_dict().items():
        assert torch.equal(v, saved[k]), k


@pytest.mark.parametrize("batch", [1, 3])
def test_fused_path_matches_module_path(pair, batch):
    _, ours, _ = pair
    torch.manual_seed(10 + batch)
    ids = torch.randint(3, 97, (batch, 13))
    with torch.no_grad():
        fused = ours(ids, return_logits=True)["logits"]
        c1 = ours.new_cache(batch, 20)
        f_steps = [ours.prefill(ids, c1)] + [ours.step(ids[:, i], c1) for i in range(5)]
        with _module_path(ours):
            ref = ours(ids, return_logits=True)["logits"]
            c2 = ours.new_cache(batch, 20)
            r_steps = [ours.prefill(ids, c2)] + [ours.step(ids[:, i], c2) for i in range(5)]
    torch.testing.assert_close(fused, ref, atol=2e-5, rtol=2e-5)
    for a, b in zip(f_steps, r_steps):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    for l1, l2 in zip(c1.layers, c2.layers):
        torch.testing.assert_close(l1.ssm_state, l2.ssm_state, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(l1.key[:, :18], l2.key[:, :18], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_cache_positions_past_length_are_never_read(pair, fused):
    """new_cache leaves the key/value slots uninitialized: poison them with NaN and the prefill + steps
    must give exactly the logits of a zeroed cache (on both paths)."""
    _, ours, _ = pair
    torch.manual_seed(5)
    ids = torch.randint(3, 97, (2, 9))
    outs = []
    with torch.no_grad(), (contextlib.nullcontext() if fused else _module_path(ours)):
        for fill in (0.0, float("nan")):
            c = ours.new_cache(2, 16)
            for layer in c.layers:
                layer.key.fill_(fill)
                layer.value.fill_(fill)
            steps = [ours.prefill(ids, c)] + [ours.step(ids[:, i], c) for i in range(4)]
            outs.append(torch.stack(steps))
    assert not outs[1].isnan().any()
    assert torch.equal(outs[0], outs[1])


def test_fused_path_packed_sequences_and_positions(pair):
    _, ours, _ = pair
    torch.manual_seed(4)
    ids = torch.randint(3, 97, (2, 17))
    seq_idx = torch.tensor([[0] * 6 + [1] * 11, [0] * 17], dtype=torch.int32)
    pos = torch.arange(5, 22)[None].expand(2, 17)
    with torch.no_grad():
        got = [ours(ids, seq_idx=seq_idx, return_logits=True)["logits"],
               ours(ids, position_ids=pos, return_logits=True)["logits"]]
        with _module_path(ours):
            ref = [ours(ids, seq_idx=seq_idx, return_logits=True)["logits"],
                   ours(ids, position_ids=pos, return_logits=True)["logits"]]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def test_fused_path_sees_training_updates_and_refuses_after_new_storage(tmp_path):
    # one variant (the one with biases in the fused groups) is enough for the storage bookkeeping
    path = tmp_path / "ckpt"
    _hf_model("no_norm_theta1e11").save_pretrained(path)
    m = FalconH1ForCausalLM.from_pretrained(path)
    ids = torch.randint(3, 97, (1, 9))
    # an optimizer-style in-place update of the parameters reaches the fused weights (shared storage)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.01)
        got = m(ids, return_logits=True)["logits"]
        with _module_path(m):
            ref = m(ids, return_logits=True)["logits"]
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)
    # new storage for the parameters: the fused path stands aside until fused again
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    m.load_state_dict(sd, assign=True)
    with torch.no_grad():
        assert not m.fused_ready(torch.device("cpu"))
        torch.testing.assert_close(m(ids, return_logits=True)["logits"], ref, atol=2e-5, rtol=2e-5)
        m.fuse_projections()
        assert m.fused_ready(torch.device("cpu"))
        torch.testing.assert_close(m(ids, return_logits=True)["logits"], ref, atol=2e-5, rtol=2e-5)
    # what a fused model saves is what transformers reads
    m.save_pretrained(tmp_path / "saved")
    back = transformers.FalconH1ForCausalLM.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref, atol=2e-4, rtol=2e-4)
    # .to(dtype) re-fuses by itself
    m16 = m.to(torch.bfloat16)
    with torch.no_grad():
        assert m16.fused_ready(torch.device("cpu"))
        assert m16.model.layers[0].fused_in.weight.dtype == torch.bfloat16
        a = m16(ids, return_logits=True)["logits"].float()
        with _module_path(m16):
            b = m16(ids, return_logits=True)["logits"].float()
    assert (a - b).abs().max() < 0.05 * b.abs().max() + 0.02


def test_prepacked_weights(tmp_path):
    """prepack_weights(): the many-row bf16 GEMMs on oneDNN-blocked copies of the weights give the plain
    fused path's logits (up to bf16 rounding), prefill and decode; an in-place update retires the copy."""
    from h1r_ops.model.falcon_h1 import packed_of

    path = tmp_path / "ckpt"
    _hf_model("no_norm_theta1e11").save_pretrained(path)
    plain = FalconH1ForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    packed = FalconH1ForCausalLM.from_pretrained(path, dtype=torch.bfloat16).prepack_weights()
    layer = packed.model.layers[0]
    if not layer.packs:
        pytest.skip("this torch has no oneDNN")
    ids = torch.randint(3, 97, (6, 11))  # 6 rows per decode step: past the row kernel, on the packed GEMMs

    def run(m):
        c = m.new_cache(6, 16)
        return [m(ids, return_logits=True)["logits"], m.prefill(ids, c)] + [m.step(ids[:, i], c) for i in range(3)]

    def close(xs, ys):
        for x, y in zip(xs, ys):
            x, y = x.float(), y.float()
            assert (x - y).abs().max() <= 0.02 * y.abs().max() + 1e-3

    with torch.no_grad():
        close(run(packed), run(plain))
        for m in (plain, packed):
            m.model.layers[0].feed_forward.down_proj.weight.mul_(2)
        assert packed_of(layer.packs["down"], layer.feed_forward.down_proj.weight) is None
        assert packed_of(layer.packs["in"], layer.fused_in.weight) is not None
        close(run(packed), run(plain))


def test_amx_rows_match_the_blas_path():
    """bf16 batches of 5+ rows on the AMX path of h1r::linear (where the CPU has it: every projection here
    fits its tiles, the input one included) give the BLAS route's logits and states (up to bf16 rounding):
    prefill of 6 x 11 rows and 6-row decode steps, the muP scale / SwiGLU / residual in the epilogue."""
    from _engine_helpers import tiny_model

    from h1r_ops.model import falcon_h1

    if not falcon_h1.amx_rows():
        pytest.skip("no AMX tiles here")
    m = tiny_model(3, mamba_n_heads=16, mamba_d_head=4).to(torch.bfloat16).fuse_projections()
    assert m.model.layers[0].fused_in.weight.shape[0] % 16 == 0
    ids = torch.randint(3, 97, (6, 11))

    def run():
        c = m.new_cache(6, 16)
        out = [m.prefill(ids, c)] + [m.step(ids[:, i], c) for i in range(3)]
        return out + [layer.ssm_state for layer in c.layers]

    with torch.no_grad():
        amx = run()
        falcon_h1._amx = False
        try:
            blas = run()
        finally:
            falcon_h1._amx = None
    for a, b in zip(amx, blas):
        a, b = a.float(), b.float()
        assert (a - b).abs().max() <= 0.02 * b.abs().max() + 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_tokens_equal_argmax_first_max(dtype):
    # generate_greedy's token choice: h1r::sample_top_p at temperature 0 must be argmax's first max, ties included
    from h1r_ops.model.falcon_h1 import greedy_tokens

    g = torch.Generator().manual_seed(0)
    for b, vocab in ((1, 1), (3, 7), (16, 32000), (5, 1000)):
        x = torch.randn(b, vocab, generator=g).to(dtype)
        if vocab > 8:
            x[:, 3] = 50.0    # ties: the first of them wins
            x[:, vocab - 2] = 50.0
        assert torch.equal(greedy_tokens(x), x.argmax(-1))
        assert torch.equal(greedy_tokens(x[:, :vocab]), x.argmax(-1))
    wide = torch.randn(4, 64, generator=g).to(dtype)
    assert torch.equal(greedy_tokens(wide[:, ::2]), wide[:, ::2].argmax(-1))   # strided columns: argmax path


def test_paged_prefill_routing_respects_no_avx512_bf16():
    """With H1R_CPU_NO_AVX512_BF16 set, the paged prefill's tile path is off (it rounds with that instruction
    set) and its vector path is slower than SDPA: the model keeps SDPA (in a fresh process: the kernels read
    the variable once)."""
    import subprocess
    import sys

    code = ("import torch; from h1r_ops.model import falcon_h1; "
            "print(falcon_h1._paged_prefill_ok(torch.zeros(1, dtype=torch.bfloat16), 32))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, H1R_CPU_NO_AVX512_BF16="1", PYTHONPATH=root)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("batch,length", [(1, 45), (3, 20)])
def test_bf16_prefill_attends_through_paged_prefill(batch, length):
    """The fused bf16 prefill from position 0 (head_dim % 32 == 0, AMX tiles) writes the cache and attends
    through h1r::paged_attention_prefill on it (one page of max_len slots per sequence): its logits and the
    decode steps after it match the module path (SDPA) up to bf16 rounding: max abs <= 0.04 max|logit|. The
    two paths round activations to bf16 at different places: the fused path on SDPA differs from the module
    path by 0.023-0.036 here (max|logit| 1.4-2.1, bf16's ulp at 2 is 0.016), the paged prefill by 0.024-0.037
    (it also rounds P to bf16); both are ~0.03 from the fp32 model."""
    from _engine_helpers import tiny_model

    from h1r_ops.model import falcon_h1

    m = tiny_model(5, head_dim=32).to(torch.bfloat16).fuse_projections()
    if not falcon_h1._paged_prefill_ok(torch.zeros(1, dtype=torch.bfloat16), 32):
        pytest.skip("the paged prefill runs on AMX tiles only")
    torch.manual_seed(batch)
    ids = torch.randint(3, 97, (batch, length))
    calls = []
    op = falcon_h1._paged_prefill_op

    def counting(*args):
        calls.append(args[0].shape)
        return op(*args)

    with torch.no_grad():
        falcon_h1._paged_prefill_op = counting
        try:
            c1 = m.new_cache(batch, length + 8)
            fused = [m.prefill(ids, c1)] + [m.step(ids[:, i], c1) for i in range(3)]
        finally:
            falcon_h1._paged_prefill_op = op
        with _module_path(m):
            c2 = m.new_cache(batch, length + 8)
            ref = [m.prefill(ids, c2)] + [m.step(ids[:, i], c2) for i in range(3)]
    assert calls == [(batch * length, 4, 32)] * m.config.num_hidden_layers
    for a, b in zip(fused, ref):
        a, b = a.float(), b.float()
        assert (a - b).abs().max() <= 0.04 * b.abs().max()
    for l1, l2 in zip(c1.layers, c2.layers):
        torch.testing.assert_close(l1.key[:, :length], l2.key[:, :length], atol=0.08, rtol=0.05)
