"""Falcon-H1 configuration: reads and writes the HF ``config.json`` (model_type "falcon_h1")."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field


def _json_float(v) -> float:
    """A float from config.json: a number, "Infinity"-like strings, or transformers 5's {"__float__": "Infinity"}."""
    if isinstance(v, dict) and "__float__" in v:
        v = v["__float__"]
    return float(v)


@dataclass
class FalconH1Config:
    """The fields of transformers' ``FalconH1Config`` that define the network (same names and defaults)."""

    vocab_size: int = 128000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    mamba_d_ssm: int | None = 1024
    mamba_n_heads: int = 128
    mamba_d_head: int | str = "auto"
    mamba_n_groups: int = 1
    mamba_d_state: int = 256
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_chunk_size: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    mamba_norm_before_gate: bool = True
    mamba_rms_norm: bool = False
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    projectors_bias: bool = False
    lm_head_multiplier: float = 1.0
    embedding_multiplier: float = 1.0
    mlp_multipliers: list[float] = field(default_factory=lambda: [1.0, 1.0])
    key_multiplier: float = 1.0
    attention_out_multiplier: float = 1.0
    attention_in_multiplier: float = 1.0
    ssm_multipliers: list[float] = field(default_factory=lambda: [1.0] * 5)
    ssm_in_multiplier: float = 1.0
    ssm_out_multiplier: float = 1.0

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.mamba_d_ssm is None:
            self.mamba_d_ssm = int(self.mamba_expand * self.hidden_size)
        if self.mamba_d_head == "auto":
            self.mamba_d_head = self.mamba_d_ssm // self.mamba_n_heads
        self.time_step_limit = tuple(self.time_step_limit) if self.time_step_limit is not None else (0.0, math.inf)
        if self.mlp_multipliers is None:
            self.mlp_multipliers = [1.0, 1.0]
        if self.ssm_multipliers is None:
            self.ssm_multipliers = [1.0] * 5
        self.validate()

    # -- derived sizes --------------------------------------------------------------------------------
    @property
    def conv_dim(self) -> int:
        """Channels of the depthwise conv: x, B and C."""
        return self.mamba_d_ssm + 2 * self.mamba_n_groups * self.mamba_d_state

    @property
    def in_proj_size(self) -> int:
        """Output of the mixer's in_proj: [z (d_ssm) | xBC (conv_dim) | dt (heads)]."""
        return self.mamba_d_ssm + self.conv_dim + self.mamba_n_heads

    def validate(self) -> None:
        def bad(name, msg):
            raise ValueError(f"FalconH1Config: field '{name}': {msg}")

        if self.hidden_act not in ("silu", "swish"):
            bad("hidden_act", f"expected 'silu', got {self.hidden_act!r} (not supported)")
        if self.mamba_d_ssm % self.mamba_n_heads:
            bad("mamba_n_heads", f"expected a divisor of mamba_d_ssm={self.mamba_d_ssm}, got {self.mamba_n_heads}")
        if self.mamba_d_head * self.mamba_n_heads != self.mamba_d_ssm:
            bad("mamba_d_head", f"expected mamba_d_ssm / mamba_n_heads = {self.mamba_d_ssm // self.mamba_n_heads}, "
                f"got {self.mamba_d_head}")
        if self.mamba_n_heads % self.mamba_n_groups:
            bad("mamba_n_groups", f"expected a divisor of mamba_n_heads={self.mamba_n_heads}, got {self.mamba_n_groups}")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_key_value_heads", f"expected a divisor of num_attention_heads={self.num_attention_heads}, "
                f"got {self.num_key_value_heads}")
        if not 2 <= self.mamba_d_conv <= 4:
            bad("mamba_d_conv", f"expected 2..4 (the conv kernels' widths), got {self.mamba_d_conv}")
        if self.head_dim % 2:
            bad("head_dim", f"expected an even size (rotary), got {self.head_dim}")
        if len(self.mlp_multipliers) != 2:
            bad("mlp_multipliers", f"expected 2 values, got {len(self.mlp_multipliers)}")
        if len(self.ssm_multipliers) != 5:
            bad("ssm_multipliers", f"expected 5 values, got {len(self.ssm_multipliers)}")

    # -- HF config.json I/O -----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "FalconH1Config":
        """Build from an HF config dict; raises ValueError for another model type or unsupported options."""
        mt = d.get("model_type")
        if mt != "falcon_h1":
            raise ValueError(f"FalconH1Config: field 'model_type': expected 'falcon_h1', got {mt!r}")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"FalconH1Config: field 'rope_parameters.rope_type': expected 'default', got {rope_type!r} "
                             "(scaled RoPE variants are not supported)")
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d and f.name != "rope_theta"}
        theta = rope.get("rope_theta", d.get("rope_theta"))
        if theta is not None:
            kw["rope_theta"] = float(theta)
        if kw.get("time_step_limit") is not None:
            kw["time_step_limit"] = tuple(_json_float(v) for v in kw["time_step_limit"])
        return cls(**kw)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "FalconH1Config":
        cfg = os.path.join(path, "config.json")
        if not os.path.isfile(cfg):
            raise ValueError(f"from_pretrained: '{path}' is not a Falcon-H1 checkpoint folder (no config.json)")
        with open(cfg) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict:
        """An HF-format config dict that transformers' FalconH1Config reads back."""
        d = dataclasses.asdict(self)
        theta = d.pop("rope_theta")
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
        d["time_step_limit"] = list(d["time_step_limit"])
        d["model_type"] = "falcon_h1"
        d["architectures"] = ["FalconH1ForCausalLM"]
        return d

    def save_pretrained(self, path: str | os.PathLike, torch_dtype: str | None = None) -> None:
        os.makedirs(path, exist_ok=True)
        d = self.to_dict()
        if torch_dtype:
            d["dtype"] = torch_dtype
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(d, f, indent=2)  # inf is written as Infinity, which HF reads back
