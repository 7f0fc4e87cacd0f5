"""The references of the scan and the conv against transformers' Falcon-H1 mixer on random weights.

transformers' FalconH1Mixer (eval, no cache) runs its own pure-torch conv (``causal_conv1d_fn``) and
chunked scan (``mamba2_chunk_scan``); here the same mixer is recomputed with h1r_ops.reference only."""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.models.falcon_h1 import modeling_falcon_h1 as hf  # noqa: E402

from h1r_ops import reference as ref  # noqa: E402


def _mixer(seed, **over):
    kw = dict(hidden_size=48, mamba_d_ssm=64, mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=2, mamba_d_state=12,
              mamba_d_conv=4, mamba_chunk_size=8, ssm_multipliers=[0.4, 0.7, 0.5, 1.3, 0.6], ssm_in_multiplier=1.3,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=32, num_hidden_layers=1, mamba_rms_norm=False)
    kw.update(over)
    cfg = transformers.FalconH1Config(**kw)
    torch.manual_seed(seed)
    m = hf.FalconH1Mixer(cfg, layer_idx=0).eval()
    m.register_buffer("mup_vector", hf.compute_mup_vector(cfg), persistent=False)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name == "A_log":
                p.copy_(torch.log(torch.rand_like(p) * 3 + 0.5))
            elif name == "dt_bias":
                p.copy_(torch.randn_like(p) * 0.5 - 1)
            elif p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))
    return cfg, m


def _mixer_via_reference(cfg, m, h):
    """FalconH1Mixer.forward (no cache, no mask) recomputed with the reference conv and scan."""
    b, l, _ = h.shape
    H, P, G, N = cfg.mamba_n_heads, cfg.mamba_d_head, cfg.mamba_n_groups, cfg.mamba_d_state
    d_ssm = cfg.mamba_d_ssm
    conv_dim = d_ssm + 2 * G * N
    zxbcdt = m.in_proj(h * cfg.ssm_in_multiplier) * m.mup_vector
    z, xBC, dt = zxbcdt.split([d_ssm, conv_dim, H], dim=-1)
    xBC = ref.causal_conv1d_ref(xBC.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, activation="silu").transpose(1, 2)
    x, B, C = xBC.split([d_ssm, G * N, G * N], dim=-1)
    y = ref.selective_scan_ref(
        x.reshape(b, l, H, P), dt, -torch.exp(m.A_log.float()), B.reshape(b, l, G, N), C.reshape(b, l, G, N),
        cfg.mamba_chunk_size, D=m.D, z=None if cfg.mamba_rms_norm else z.reshape(b, l, H, P), dt_bias=m.dt_bias,
        dt_softplus=True, dt_limit=cfg.time_step_limit)
    y = y.reshape(b, l, d_ssm)
    if cfg.mamba_rms_norm:
        y = m.norm(y, z)  # the gated norm is checked on its own in its family's tests
    return m.out_proj(y)


@pytest.mark.parametrize("length", [1, 7, 8, 9, 29])
@pytest.mark.parametrize("rms_norm", [False, True])
def test_mixer_matches_transformers(length, rms_norm):
    cfg, m = _mixer(length, mamba_rms_norm=rms_norm)
    h = torch.randn(2, length, cfg.hidden_size)
    with torch.no_grad():
        want = m(h)
        got = _mixer_via_reference(cfg, m, h)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("length", [3, 16, 21])
def test_scan_final_state_matches_transformers_chunk_scan(length):
    torch.manual_seed(length)
    b, h, p, g, n = 2, 4, 8, 2, 6
    x, dt = torch.randn(b, length, h, p), torch.randn(b, length, h)
    A, B, C = -torch.rand(h) * 3, torch.randn(b, length, g, n), torch.randn(b, length, g, n)
    D, dt_bias, init = torch.randn(h), torch.randn(h), torch.randn(b, h, p, n)
    kw = dict(D=D, dt_bias=dt_bias, initial_states=init, dt_softplus=True, dt_limit=(0.01, 2.0), return_final_states=True)
    want_y, want_s = hf.mamba2_chunk_scan(x, dt, A, B, C, 8, **kw)
    got_y, got_s = ref.selective_scan_ref(x, dt, A, B, C, 8, **kw)
    torch.testing.assert_close(got_y, want_y.to(got_y.dtype), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_s, want_s.float(), atol=1e-4, rtol=1e-4)


def test_conv_and_state_update_match_transformers_decode_helpers():
    torch.manual_seed(0)
    b, d, w = 3, 20, 4
    x_seq = torch.randn(b, d, 9)
    weight, bias = torch.randn(d, w), torch.randn(d)
    want = hf.causal_conv1d_fn(x_seq, weight, bias, activation="silu")
    torch.testing.assert_close(ref.causal_conv1d_ref(x_seq, weight, bias, activation="silu"), want)
    # decode: transformers keeps a state of width w, the causal-conv1d convention is w - 1
    state_hf = torch.randn(b, d, w)
    state_ours = state_hf[:, :, 1:].clone()
    xt = torch.randn(b, d, 1)
    want = hf.causal_conv1d_update(xt, state_hf, weight, bias, activation="silu")
    got = ref.causal_conv1d_update_ref(xt, state_ours, weight, bias, activation="silu")
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(state_ours, state_hf[:, :, 1:])
    # one SSM decode step
    H, P, G, N = 4, 8, 2, 6
    state = torch.randn(b, H, P, N)
    xs, dt, A = torch.randn(b, H, P), torch.randn(b, H), -torch.rand(H) * 2
    Bs, Cs, Dv, dtb, z = torch.randn(b, G, N), torch.randn(b, G, N), torch.randn(H), torch.randn(H), torch.randn(b, H, P)
    s_hf = state.clone()
    want = hf.mamba2_selective_state_update(
        s_hf, xs, dt[..., None].expand(b, H, P), A[:, None, None].expand(H, P, N), Bs, Cs, Dv[:, None].expand(H, P),
        dt_bias=dtb[:, None].expand(H, P), dt_softplus=True, z=z)
    s_ours = state.clone()
    got = ref.selective_state_update_ref(s_ours, xs, dt, A, Bs, Cs, D=Dv, z=z, dt_bias=dtb, dt_softplus=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_ours, s_hf, atol=1e-5, rtol=1e-5)
