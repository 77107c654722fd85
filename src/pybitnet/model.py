"""Transformer: embedding -> blocks -> final norm -> logits.

One `forward` runs every layer, with or without a KV cache; the public entry points are thin callers:
    forward_full           all tokens of all rows through each layer at once (the hot path)
    prefill, decode_step   a full-sequence pass that fills a cache, then one token per row
    forward_step_by_step   one position at a time through a KV cache (the reference for forward_full)
No I/O and no sampling here: loaders build the weights, generate/evaluate consume the logits.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from . import kernels, native, runtime
from .cache import KVCache
from .config import ModelConfig
from .errors import ConfigError, InputError
from .head import LMHead, check_head_mode, head_table
from .layers import Attention, AttentionMask, BitLinear, Block, DecodeStack, FeedForward, RMSNorm, RotaryTables
from .quant.ggml_blocks import QuantizedTable
from .weights import PROJECTIONS, TernaryWeight, Weights, check_weights

# Longer sequences are prefilled in chunks of this many tokens, bounding activation memory.
DEFAULT_CHUNK = 1024
# Float dtypes a model runs in. Half precision is refused: relu² of the FFN accumulators overflows
# float16 (all-NaN logits), and bfloat16's 8-bit mantissa moves logits by ~0.1 and makes a row's
# result depend on the rest of its batch. Checkpoints stored in bf16 still load (into float32).
DTYPES = (torch.float32, torch.float64)


def check_dtype(dtype: torch.dtype) -> torch.dtype:
    """`dtype` if the model can run in it, else a ConfigError saying which can."""
    if dtype not in DTYPES:
        raise ConfigError(
            f"unsupported model dtype {dtype!r}: use torch.float32 (fast) or torch.float64 (exactness checks); "
            "half precision overflows (float16) or loses the accuracy BitNet's activations need (bfloat16)"
        )
    return dtype


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, weights: Weights, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", backend: str = kernels.AUTO, release_weights: bool = False,
                 lm_head: str = "exact"):
        """Build from a weight set. `release_weights` empties `weights` as each layer is built, so a
        loader's copy and the model's fused copy of a layer never both exist for the whole model."""
        super().__init__()
        check_dtype(dtype)
        check_head_mode(lm_head)
        runtime.tune_allocator()
        check_weights(config, weights, source="weights")
        # A block lm_head mode quantizes the float head table (tied: the embedding) first, before the layers are
        # built, so the float table is gone (with release_weights) before any fused layer adds to memory.
        # The loaders hand over the blocks already, read from the file a few rows at a time.
        head_name = "embed_tokens" if config.tie_word_embeddings else "lm_head"
        head_weight = head_table(weights[head_name], lm_head, repr(head_name))
        if release_weights:
            weights[head_name] = head_weight
        self.config = config
        self.dtype = dtype
        device = torch.device(device)
        backend = kernels.check_backend(backend)
        eps = config.rms_norm_eps

        def floats(name: str) -> torch.Tensor:
            return weights[name].to(device=device, dtype=dtype)

        def ternary(names: list[str]) -> BitLinear:
            linear = BitLinear([_on(weights[n], device) for n in names], backend)
            if release_weights:
                for n in names:
                    del weights[n]
            return linear

        blocks = []
        for i in range(config.num_layers):
            p = f"layers.{i}."
            attention = Attention(
                RMSNorm(floats(p + "input_layernorm"), eps),
                ternary([p + "q_proj", p + "k_proj", p + "v_proj"]),
                ternary([p + "o_proj"]),
                RMSNorm(floats(p + "attn_sub_norm"), eps) if config.sub_norms else None,
                config.num_heads, config.num_kv_heads, config.head_dim,
            )
            ffn = FeedForward(
                RMSNorm(floats(p + "post_attention_layernorm"), eps),
                ternary([p + "gate_proj", p + "up_proj"]),
                ternary([p + "down_proj"]),
                RMSNorm(floats(p + "ffn_sub_norm"), eps) if config.sub_norms else None,
                config.hidden_act,
            )
            blocks.append(Block(attention, ffn))
        self.layers = nn.ModuleList(blocks)
        self._decode_stack = DecodeStack(self.layers)
        self.norm = RMSNorm(floats("norm"), eps)
        # The embedding stays in its checkpoint dtype (bf16 for 2B-4T) unless the model runs in a
        # wider float that the exactness tests need; rows are upcast as they are looked up.
        embedding = head_weight if config.tie_word_embeddings else weights["embed_tokens"]
        self.embed_tokens = _embedding_table(_embedding_storage(embedding, dtype, device))
        if config.tie_word_embeddings:
            self.lm_head = LMHead(self.embed_tokens, lm_head)
        else:
            self.lm_head = LMHead(_embedding_storage(head_weight, dtype, device), lm_head)
        self.rope = RotaryTables(config.head_dim, config.rope_theta, dtype, device,
                                 min(config.max_position_embeddings, 8192))

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    def set_backend(self, backend: str) -> None:
        """Run every BitLinear with `backend` ('auto' picks per row count)."""
        kernels.check_backend(backend)
        for module in self.modules():
            if isinstance(module, BitLinear):
                module.backend = backend

    def decode_is_row_independent(self) -> bool:
        """Whether decode_step gives each row the same bits whatever the rest of the batch holds: the
        native float32 CPU path, where every step of a row (quantization, attention over its own
        positions, the head: LMHead.row_independent) runs on that row alone and the projections sum
        exact integers."""
        return (self.dtype == torch.float32 and self.device.type == "cpu" and kernels.native_available()
                and self.lm_head.row_independent(self.dtype))

    # ------------------------------------------------------------------ the one forward
    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """tokens (B, T) long, already checked -> final-normed hidden states (B, T, H).

        Without a cache the tokens are a whole sequence from position 0. With one, row b's tokens
        continue after the cache.lengths[b] positions it holds (rows may hold different lengths),
        their K/V are written in place, and cache.lengths advances by T.
        """
        bsz, seq = tokens.shape
        if cache is None:
            windows, mask = [None] * len(self.layers), AttentionMask(own_block=True)
            cos, sin = self.rope.span(0, seq)  # (T, D)
            cos, sin = cos[None, :, None, :], sin[None, :, None, :]
        else:
            windows, positions = cache.windows(seq)  # positions (B, T)
            cos, sin = self._rope_at(positions, windows[0].write_at)
            mask = self._mask(positions, windows[0].length)
        h = self._embed(tokens)  # (B, T, H)
        plan = self._decode_stack.plan(h, windows, mask) if cache is not None else None
        if plan is not None:  # one token per row on the native path: every layer in one call
            h = self._decode_stack.run(plan, h, cos, sin, windows, mask)
        else:
            for layer, window in zip(self.layers, windows):
                h = layer(h, cos, sin, window, mask)
        if cache is not None:
            cache.lengths += seq
        return self.norm(h)

    # ------------------------------------------------------------------ callers
    def forward_full(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                     logits: str | torch.Tensor = "all", chunk_size: int | None = None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V) for "all", (B, V) for "last" (each row's last real token),
        (B, len(index), V) for a LongTensor of positions. No cache is kept after the call.

        attention_mask (B, T): 1 for real tokens, 0 for right padding; padded positions may hold any
        value and never influence real ones. Sequences longer than `chunk_size` (default 1024) run
        in chunks through a temporary KV cache, bounding activation memory.
        """
        tokens, lengths = self._check_tokens(tokens, attention_mask)
        hidden = torch.cat([h for _, h in self._chunks(tokens, chunk_size)], dim=1)  # (B, T, H)
        return self._logits(hidden, lengths, logits)

    def hidden_states(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                      chunk_size: int | None = None):
        """Yield (start, final-normed hidden (B, C, H)) chunk by chunk: for scoring without a (T, V) tensor."""
        tokens, _ = self._check_tokens(tokens, attention_mask)
        yield from self._chunks(tokens, chunk_size)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden (..., H) -> logits (..., V) in the model dtype."""
        lead = hidden.shape[:-1]
        return self.lm_head(hidden.reshape(-1, hidden.shape[-1])).reshape(*lead, -1)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        c = self.config
        return KVCache(c.num_layers, batch_size, max_len, c.num_kv_heads, c.head_dim, self.dtype, self.device)

    def prefill(self, tokens: torch.Tensor, cache: KVCache, attention_mask: torch.Tensor | None = None, *,
                logits: str | torch.Tensor = "last", chunk_size: int | None = None) -> torch.Tensor:
        """Run tokens (B, T) full-sequence after what `cache` holds, appending their K/V, and return
        logits as in forward_full (default: each row's last real token). Afterwards cache.lengths[b]
        counts row b's real tokens, so decoding continues right after them."""
        tokens, lengths = self._check_tokens(tokens, attention_mask)
        bsz, seq = tokens.shape
        if bsz != cache.batch_size:
            raise InputError(f"prefill: tokens have batch size {bsz} but the cache was made for {cache.batch_size}")
        offsets = cache.lengths.clone()  # (B,)
        cache.check_room(int(offsets.max()) + seq)
        hidden = torch.cat([h for _, h in self._chunks(tokens, chunk_size, cache)], dim=1)  # (B, T, H)
        cache.lengths.copy_(offsets + lengths)  # padded positions are overwritten by later tokens
        return self._logits(hidden, lengths, logits)

    def decode_step(self, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """token (B,) -> logits (B, V); row b's token goes to position cache.lengths[b]."""
        token = torch.as_tensor(token, device=self.device)
        if token.dim() == 2 and token.shape[1] == 1:
            token = token[:, 0]
        if token.dim() != 1 or token.shape[0] != cache.batch_size:
            raise InputError(f"decode_step expects one token per cache row, shape ({cache.batch_size},), got {tuple(token.shape)}")
        self._check_ids(token)
        return self.project(self.forward(token.long()[:, None], cache)[:, 0])

    def forward_step_by_step(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Same contract as forward_full(logits="all"), one position at a time through a KV cache."""
        tokens, _ = self._check_tokens(tokens, attention_mask)
        bsz, seq = tokens.shape
        cache = self.new_cache(bsz, seq)
        out = torch.empty(bsz, seq, self.config.vocab_size, dtype=self.dtype, device=self.device)
        for t in range(seq):
            out[:, t] = self.decode_step(tokens[:, t], cache)
        return out

    # ------------------------------------------------------------------ weights out
    def export_weights(self) -> Weights:
        """The weight set this model was built from: int8 ternaries + β and float tensors."""
        w: Weights = {"embed_tokens": self.embed_tokens.detach(), "norm": self.norm.weight.detach()}
        if not self.config.tie_word_embeddings:
            w["lm_head"] = self.lm_head.weight.detach()
        for i, block in enumerate(self.layers):
            p = f"layers.{i}."
            w[p + "input_layernorm"] = block.attention.input_norm.weight.detach()
            w[p + "post_attention_layernorm"] = block.ffn.input_norm.weight.detach()
            if block.attention.sub_norm is not None:
                w[p + "attn_sub_norm"] = block.attention.sub_norm.weight.detach()
                w[p + "ffn_sub_norm"] = block.ffn.sub_norm.weight.detach()
            fused = [(block.attention.qkv, 0), (block.attention.qkv, 1), (block.attention.qkv, 2),
                     (block.attention.o_proj, 0), (block.ffn.gate_up, 0), (block.ffn.gate_up, 1), (block.ffn.down, 0)]
            for name, (linear, part) in zip(PROJECTIONS, fused):
                w[p + name] = linear.part(part)
        return w

    def fingerprint(self) -> str:
        """A digest of what decides the bits of K/V and logits: the config, the dtype, the kernel path, and
        samples of every weight (each tensor's shape, its first and last 64 KiB, the ternary scales). Another
        checkpoint of the same shape differs in these with overwhelming probability; reading them takes
        milliseconds where hashing every weight would take seconds."""
        digest = hashlib.sha256()
        digest.update(json.dumps(self.config.__dict__, sort_keys=True, default=str).encode())
        ops = native.ops()
        path = f"native:{native.isa()}:{int(ops.cpu_features())}" if ops is not None else "torch"
        digest.update(f"{self.dtype}|{self.device}|{path}|{kernels.NATIVE_MAX_ROWS}".encode())
        for name, tensor in list(self.named_parameters()) + list(self.named_buffers()):
            flat = tensor.detach().reshape(-1).contiguous().cpu()
            raw = flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(raw[:65536].numpy().tobytes())
            digest.update(raw[-65536:].numpy().tobytes())
        for module in self.modules():
            if isinstance(module, BitLinear):
                digest.update(repr(module.betas).encode())
        return digest.hexdigest()

    # ------------------------------------------------------------------ internals
    def _chunks(self, tokens: torch.Tensor, chunk_size: int | None, cache: KVCache | None = None):
        """Yield (start, final-normed hidden (B, C, H)) for tokens (B, T), `chunk_size` tokens at a time.

        Without a cache, a sequence that fits one chunk runs as one causal block and keeps nothing;
        a longer one goes through a temporary cache. With a cache, the tokens continue after what it
        holds and their K/V are appended.
        """
        bsz, seq = tokens.shape
        chunk = self._chunk_size(chunk_size)
        if cache is None and chunk >= seq:
            yield 0, self.forward(tokens)
            return
        cache = cache if cache is not None else self.new_cache(bsz, seq)
        for s in range(0, seq, chunk):
            yield s, self.forward(tokens[:, s : s + chunk], cache)

    def _rope_at(self, positions: torch.Tensor, write_at: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin broadcastable to (B, T, 1, D) for positions (B, T)."""
        if isinstance(write_at, int):  # every row at the same positions: one (T, D) slice
            cos, sin = self.rope.span(write_at, positions.shape[1])
            return cos[None, :, None, :], sin[None, :, None, :]
        cos, sin = self.rope.at(positions)  # (B, T, D)
        return cos[:, :, None, :], sin[:, :, None, :]

    @staticmethod
    def _mask(positions: torch.Tensor, length: int) -> AttentionMask:
        """Queries at positions (B, T) over cache keys [0, length): each sees the keys at or before it."""
        bsz, seq = positions.shape
        starts = positions[:, 0]  # (B,)
        if int(starts.max()) == 0:  # every row starts a sequence: its own block, causal
            return AttentionMask(own_block=True, starts=starts)
        if seq == 1:  # one query per row sees its cache up to its own position
            rows_end_together = bool((positions[:, 0] == length - 1).all())
            allowed = None if rows_end_together else \
                (torch.arange(length, device=positions.device)[None, None, :] <= positions[:, :, None])[:, None]
            return AttentionMask(own_block=False, allowed=allowed, positions=starts, starts=starts)
        keys = torch.arange(length, device=positions.device)
        if bool((positions[:, -1] == length - 1).all()):  # rows end together: a (T, S) causal mask
            return AttentionMask(own_block=False, allowed=keys[None, :] <= positions[0, :, None], starts=starts)  # (T, S)
        return AttentionMask(own_block=False, allowed=(keys[None, None, :] <= positions[:, :, None])[:, None],
                             starts=starts)  # (B, 1, T, S)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens[tokens].to(self.dtype)

    def _logits(self, hidden: torch.Tensor, lengths: torch.Tensor, which: str | torch.Tensor) -> torch.Tensor:
        if isinstance(which, str):
            if which == "all":
                return self.project(hidden)
            if which == "last":
                rows = torch.arange(hidden.shape[0], device=hidden.device)
                return self.project(hidden[rows, lengths - 1])  # (B, V)
            raise InputError(f"logits must be 'all', 'last' or a LongTensor of positions, got {which!r}")
        index = torch.as_tensor(which, device=hidden.device)
        seq = hidden.shape[1]
        if index.is_floating_point() or index.dtype == torch.bool or index.dim() != 1:
            raise InputError(f"logits index must be a 1-D integer tensor of positions, got {index.dtype} {tuple(index.shape)}")
        if index.numel() and (int(index.max()) >= seq or int(index.min()) < -seq):
            raise InputError(f"logits index out of range: positions must lie in [{-seq}, {seq})")
        if index.numel() == 0:  # nothing asked for: an empty (B, 0, V), not a reshape of nothing
            return hidden.new_empty(hidden.shape[0], 0, self.config.vocab_size)
        return self.project(hidden[:, index.long()])

    def _chunk_size(self, chunk_size: int | None) -> int:
        if chunk_size is None:
            return DEFAULT_CHUNK
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
            raise InputError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        return chunk_size

    def _check_ids(self, tokens: torch.Tensor) -> None:
        if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise InputError(f"token ids must be an integer tensor, got {tokens.dtype}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size):
            raise InputError(
                f"token id out of range: ids must lie in [0, {self.config.vocab_size}), got "
                f"min {int(tokens.min())}, max {int(tokens.max())}"
            )

    def _check_tokens(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate (B, T) ids and a right-padded mask; return (tokens, real length per row (B,))."""
        tokens = torch.as_tensor(tokens, device=self.device)
        if tokens.dim() == 1:
            tokens = tokens[None]
        if tokens.dim() != 2:
            raise InputError(f"tokens must have shape (batch, seq), got {tuple(tokens.shape)}")
        if tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise InputError(f"empty input: tokens have shape {tuple(tokens.shape)}")
        bsz, seq = tokens.shape
        if attention_mask is None:
            self._check_ids(tokens)
            return tokens.long(), torch.full((bsz,), seq, dtype=torch.long, device=self.device)
        mask = torch.as_tensor(attention_mask, device=self.device)
        if mask.dim() == 1:
            mask = mask[None]
        if tuple(mask.shape) != (bsz, seq):
            raise InputError(f"attention_mask has shape {tuple(mask.shape)}, expected {(bsz, seq)} like tokens")
        if bool(((mask != 0) & (mask != 1)).any()):
            raise InputError("attention_mask must hold only 0 and 1")
        mask = mask.long()
        lengths = mask.sum(dim=1)  # (B,)
        positions = torch.arange(seq, device=self.device)
        if not torch.equal(mask, (positions[None, :] < lengths[:, None]).long()):
            raise InputError("attention_mask must be right-padded: each row's 1s first, then 0s")
        if bool((lengths == 0).any()):
            raise InputError("attention_mask has a row with no real tokens (an empty prompt)")
        if tokens.is_floating_point() or tokens.dtype == torch.bool:
            self._check_ids(tokens)  # raises: ids must be integers
        tokens = tokens.long().masked_fill(mask == 0, 0)  # padding may hold any value (-100, ...)
        self._check_ids(tokens)
        return tokens, lengths


def _on(weight: TernaryWeight, device: torch.device) -> TernaryWeight:
    return weight.to(device)  # packed on CPU as loaded (no int8 round trip), int8 elsewhere


def _embedding_storage(weight: torch.Tensor | QuantizedTable, dtype: torch.dtype,
                       device: torch.device) -> torch.Tensor | QuantizedTable:
    """Keep 16-bit embeddings as they are for fp32 models (memory); widen for float64 models. A GGUF block
    table (QuantizedTable) stays as stored for any dtype: its rows are dequantized (to float32, exact in
    float64) as used."""
    if isinstance(weight, QuantizedTable):
        return weight.to(device)
    if weight.dtype in (torch.bfloat16, torch.float16) and dtype == torch.float32:
        return weight.to(device)
    return weight.to(device=device, dtype=dtype)


def _embedding_table(weight: torch.Tensor | QuantizedTable) -> nn.Parameter | QuantizedTable:
    return weight if isinstance(weight, QuantizedTable) else nn.Parameter(weight, requires_grad=False)
