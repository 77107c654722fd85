"""An independent float64 BitNet b1.58 forward pass in plain numpy, written from docs/exactness.md and docs/formats.md only.

It shares no code with pybitnet (and imports neither pybitnet nor torch): it reads a Hugging Face
directory itself (config.json + *.safetensors via `safetensors.numpy`), unpacks the packed uint8
ternaries itself, and runs the model math step by step in float64. The test suite holds our float64
path to it (max |dlogit| <= 1e-9 * max|logit|, same argmax everywhere) and holds it to transformers.

    ref = ReferenceModel.from_hf_dir(path)
    logits = ref.forward([1, 5, 7])      # (T, V) float64
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

ACT_QMAX = 127.0  # int8 activations: round(x * 127 / absmax), clamped to [-128, 127]  (A.3)
ACT_QMIN = -128.0
ABSMAX_FLOOR = 1e-5  # clamp(min=1e-5) on the per-token absmax                     (A.3)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------- file reading
def _read_safetensors(file: Path) -> dict[str, np.ndarray]:
    """All tensors of one file. numpy has no bfloat16, so BF16 tensors are widened by hand:
    a bf16 is the top 16 bits of a float32."""
    try:
        return dict(load_file(str(file)))
    except (TypeError, ValueError, KeyError):
        pass  # a BF16 tensor: read the container ourselves (8-byte header length, JSON header, data)
    raw = file.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    data = raw[8 + header_len :]
    dtypes = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "U8": np.uint8, "I8": np.int8,
              "I32": np.int32, "I64": np.int64}
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        chunk = data[start:end]
        if meta["dtype"] == "BF16":
            bits = np.frombuffer(chunk, dtype="<u2").astype(np.uint32) << 16
            arr = bits.view(np.float32)
        else:
            arr = np.frombuffer(chunk, dtype=np.dtype(dtypes[meta["dtype"]]).newbyteorder("<"))
        out[name] = arr.reshape(meta["shape"])
    return out


def unpack_hf_ternary(packed: np.ndarray, out_features: int) -> np.ndarray:
    """A.5: byte B[p, c] holds rows p, p+P, p+2P, p+3P of column c in bits 1..0, 3..2, 5..4, 7..6;
    code = value + 1. (P, in) uint8 -> (out_features, in) float64 in {-1, 0, 1}."""
    assert packed.dtype == np.uint8, packed.dtype
    codes = np.concatenate([(packed >> (2 * i)) & 3 for i in range(4)], axis=0)[:out_features]
    assert not (codes == 3).any(), "code 3 is not a ternary value"
    return codes.astype(np.float64) - 1.0


# ----------------------------------------------------------------------------- model math (A.2/A.3)
def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """weight * x / sqrt(mean(x^2) + eps) over the last dim."""
    return weight * (x * (1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)))


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per token absmax int8 (A.3): s = 127 / max(absmax, 1e-5); q = clamp(round_half_even(x*s))."""
    scale = ACT_QMAX / np.maximum(np.max(np.abs(x), axis=-1, keepdims=True), ABSMAX_FLOOR)  # (T, 1)
    q = np.clip(np.rint(x * scale), ACT_QMIN, ACT_QMAX)  # np.rint rounds half to even
    return q, scale


@dataclass
class PackedLinear:
    ternary: np.ndarray  # (out, in) float64 in {-1, 0, 1}
    weight_scale: float  # as stored on disk
    multiply: bool  # autobitlinear: W = T * weight_scale; bitlinear: W = T / weight_scale (A.4)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x (T, in) -> (T, out): (q . T^T) / s_x, then * or / weight_scale."""
        q, act_scale = quantize_activations(x)
        acc = q @ self.ternary.T  # integer-valued, exact in float64
        if self.multiply:
            return acc / act_scale * self.weight_scale
        return acc / (act_scale * self.weight_scale)


def rope_tables(positions: np.ndarray, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """NeoX RoPE: inv_freq[i] = theta^(-2i/D); cos/sin of [ang, ang] -> (T, D) each, float64."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (D/2,)
    angles = positions.astype(np.float64)[:, None] * inv_freq[None, :]  # (T, D/2)
    angles = np.concatenate([angles, angles], axis=-1)  # (T, D)
    return np.cos(angles), np.sin(angles)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x (T, H, D): x*cos + rotate_half(x)*sin, rotate_half(x) = [-x[D/2:], x[:D/2]]."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def causal_gqa_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """q (T, Hq, D), k/v (T, Hkv, D) -> (T, Hq, D). Query head j uses kv head j // (Hq/Hkv)."""
    seq, num_heads, head_dim = q.shape
    group = num_heads // k.shape[1]
    causal = np.tril(np.ones((seq, seq), dtype=bool))
    out = np.empty_like(q)
    for j in range(num_heads):
        kv = j // group
        scores = (q[:, j, :] @ k[:, kv, :].T) / np.sqrt(head_dim)  # (T, T)
        scores = np.where(causal, scores, -np.inf)
        scores = scores - scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        out[:, j, :] = probs @ v[:, kv, :]
    return out


# ----------------------------------------------------------------------------- the model
class ReferenceModel:
    def __init__(self, config: dict, tensors: dict[str, np.ndarray]):
        self.config = config
        c = config
        self.vocab_size = int(c["vocab_size"])
        self.hidden_size = int(c["hidden_size"])
        self.intermediate_size = int(c["intermediate_size"])
        self.num_layers = int(c["num_hidden_layers"])
        self.num_heads = int(c["num_attention_heads"])
        self.num_kv_heads = int(c.get("num_key_value_heads") or self.num_heads)
        self.head_dim = int(c.get("head_dim") or self.hidden_size // self.num_heads)
        rope = c.get("rope_parameters") or {}
        self.rope_theta = float(c.get("rope_theta", rope.get("rope_theta", 10000.0)))
        self.eps = float(c.get("rms_norm_eps", 1e-5))
        self.act = {"relu2": "relu2", "silu": "silu", "swish": "silu"}[c.get("hidden_act", "silu")]
        linear_class = (c.get("quantization_config") or {}).get("linear_class", "bitlinear")
        self.multiply_scale = linear_class == "autobitlinear"

        def floats(name: str) -> np.ndarray:
            return np.asarray(tensors[name], dtype=np.float64)

        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        out_features = {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size, "o_proj": self.hidden_size,
                        "gate_proj": self.intermediate_size, "up_proj": self.intermediate_size,
                        "down_proj": self.hidden_size}
        self.embed = floats("model.embed_tokens.weight")  # (V, H)
        tied = c.get("tie_word_embeddings", "lm_head.weight" not in tensors)
        self.lm_head = self.embed if tied else floats("lm_head.weight")  # (V, H)
        self.final_norm = floats("model.norm.weight")
        self.layers = []
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            layer = {
                "input_layernorm": floats(p + "input_layernorm.weight"),
                "post_attention_layernorm": floats(p + "post_attention_layernorm.weight"),
                "attn_sub_norm": floats(p + "self_attn.attn_sub_norm.weight"),
                "ffn_sub_norm": floats(p + "mlp.ffn_sub_norm.weight"),
            }
            for name in PROJECTIONS:
                prefix = p + ("self_attn." if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp.")
                scale = float(np.asarray(tensors[prefix + name + ".weight_scale"], dtype=np.float64).reshape(-1)[0])
                layer[name] = PackedLinear(unpack_hf_ternary(tensors[prefix + name + ".weight"], out_features[name]),
                                           scale, self.multiply_scale)
            self.layers.append(layer)

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "ReferenceModel":
        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        tensors: dict[str, np.ndarray] = {}
        for file in sorted(path.glob("*.safetensors")):
            tensors.update(_read_safetensors(file))
        return cls(config, tensors)

    def forward(self, tokens) -> np.ndarray:
        """token ids (T,) -> logits (T, V) float64, positions 0..T-1."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        seq = tokens.shape[0]
        cos, sin = rope_tables(np.arange(seq), self.head_dim, self.rope_theta)  # (T, D)
        h = self.embed[tokens]  # (T, H)
        for layer in self.layers:
            a = rms_norm(h, layer["input_layernorm"], self.eps)
            q = layer["q_proj"](a).reshape(seq, self.num_heads, self.head_dim)  # (T, Hq, D)
            k = layer["k_proj"](a).reshape(seq, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
            v = layer["v_proj"](a).reshape(seq, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            o = causal_gqa_attention(q, k, v).reshape(seq, self.num_heads * self.head_dim)  # (T, Hq*D)
            o = rms_norm(o, layer["attn_sub_norm"], self.eps)
            h = h + layer["o_proj"](o)
            m = rms_norm(h, layer["post_attention_layernorm"], self.eps)
            g, u = layer["gate_proj"](m), layer["up_proj"](m)  # (T, F) each
            if self.act == "relu2":
                z = np.maximum(g, 0.0) ** 2 * u
            else:
                with np.errstate(over="ignore"):  # exp(-g) = inf for g << 0 gives silu = -0, as it should
                    z = g / (1.0 + np.exp(-g)) * u  # silu(g) * u
            z = rms_norm(z, layer["ffn_sub_norm"], self.eps)
            h = h + layer["down_proj"](z)
        h = rms_norm(h, self.final_norm, self.eps)
        return h @ self.lm_head.T  # (T, V), full precision: never quantized
