"""Reading and writing HF-format Falcon-H1 checkpoint folders.

A folder holds ``config.json``, the weights as ``model.safetensors`` or as shards listed in
``model.safetensors.index.json``, and usually ``tokenizer.json``. Loading builds the model on the meta
device and then reads each tensor once from the memory-mapped safetensors files straight into its final
dtype and device, so a checkpoint never needs twice its size in RAM.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import FalconH1Config
from .falcon_h1 import mup_vector, rope_inv_freq

_IGNORED_SUFFIXES = ("mup_vector", "rotary_emb.inv_freq", "rotary_emb.original_inv_freq")


def _weight_files(path: str) -> dict[str, str]:
    """Map every tensor name to the safetensors file holding it."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {k: os.path.join(path, v) for k, v in weight_map.items()}
    if os.path.isfile(single):
        with safe_open(single, framework="pt") as f:
            return {k: single for k in f.keys()}
    raise ValueError(f"from_pretrained: '{path}' has no model.safetensors or model.safetensors.index.json")


def load_pretrained(cls, path, dtype: torch.dtype | None = None, device="cpu"):
    """Build ``cls`` (FalconH1ForCausalLM) from the folder ``path``; see the module docstring."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"from_pretrained: '{path}' is not a folder")
    cfg = FalconH1Config.from_pretrained(path)
    files = _weight_files(path)
    with torch.device("meta"):
        model = cls(cfg)
    expected = model.state_dict()
    missing = [k for k in expected if k not in files]
    unexpected = [k for k in files if k not in expected and not k.endswith(_IGNORED_SUFFIXES)]
    if cfg.tie_word_embeddings:
        unexpected = [k for k in unexpected if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(
            f"from_pretrained: '{path}': the tensors do not match a Falcon-H1 model of this config: "
            f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    by_file: dict[str, list[str]] = {}
    for k in expected:
        by_file.setdefault(files[k], []).append(k)
    loaded = {}
    for fname, names in by_file.items():
        with safe_open(fname, framework="pt", device="cpu") as f:
            for k in names:
                t = f.get_tensor(k)
                want = expected[k]
                if tuple(t.shape) != tuple(want.shape):
                    raise ValueError(f"from_pretrained: tensor '{k}': expected shape {tuple(want.shape)}, "
                                     f"got {tuple(t.shape)}")
                tgt_dtype = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
                loaded[k] = t.to(device=device, dtype=tgt_dtype)
    model.load_state_dict(loaded, strict=True, assign=True)
    # the non-persistent buffers were built on the meta device: rebuild them on the target device
    model.inv_freq = rope_inv_freq(cfg).to(device)
    for layer in model.model.layers:
        layer.mamba.mup_vector = mup_vector(cfg).to(device)
    return model.fuse_projections().eval()


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def save_pretrained(model, path, max_shard_bytes: int = 5 << 30) -> None:
    """Write ``model`` to ``path`` as config.json + safetensors (sharded with an index when larger than
    ``max_shard_bytes``). Tied embeddings are written once, as transformers does."""
    os.makedirs(path, exist_ok=True)
    # fused projections are row views of one tensor: safetensors wants each tensor in its own storage
    sd = {k: _own_storage(v.detach()) for k, v in model.state_dict().items()}
    dtype = next(iter(sd.values())).dtype
    model.config.save_pretrained(path, torch_dtype=str(dtype).replace("torch.", ""))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        for k, v in shard.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def load_tokenizer(path):
    """The folder's ``tokenizer.json`` as a ``tokenizers.Tokenizer``, or None when there is none."""
    f = os.path.join(os.fspath(path), "tokenizer.json")
    if not os.path.isfile(f):
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(f)
