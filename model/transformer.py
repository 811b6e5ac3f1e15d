"""A small decoder-only transformer: attention-only by default, optional MLPs.

One attention implementation with two paths: the fused
`scaled_dot_product_attention` for training (it never materialises the
[query, key] matrix) and an explicit softmax that returns the attention
pattern for analysis. `tests/test_transformer.py` checks they agree.

Padding: windows mark pad positions with a negative token id. Pads are masked
as keys, but every query may always attend to itself, so a row whose real keys
are all masked still has one finite logit and never produces NaN (the study's
NaN came from fully masked rows of `key_padding_mask`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

PAD_ID = -1  # marks padding inside token windows; never a real token id


def attention_mask(tokens: torch.Tensor, padded: bool | None = None) -> torch.Tensor | None:
    """Boolean [batch, 1, query, key] mask (True = may attend), or None when nothing is padded.

    `padded`: whether the batch may hold padding, when the caller knows (the trainer knows it of its data); None
    looks, which costs a host sync on a GPU, once a forward pass.
    """
    key_is_real = tokens >= 0
    if padded is False or (padded is None and bool(key_is_real.all())):
        return None  # plain causal attention: the fused kernel's fastest path
    seq_len = tokens.shape[1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=tokens.device).tril()
    diagonal = torch.eye(seq_len, dtype=torch.bool, device=tokens.device)
    allowed = causal & (key_is_real[:, None, :] | diagonal)  # (B, T, T)
    return allowed[:, None, :, :]  # (B, 1, T, T)


# On CPU, attention written out (two batched matmuls and a softmax) beats every fused kernel up to
# 256 tokens: forward + backward it is 3.7-6.5x faster than the flash kernel up to 128 tokens at the
# study's heads, 5-8x at the induction preset's, and 1.5-2.6x faster than both kernels at 192; the
# math kernel spends much of its time guarding against fully masked rows, which this mask never has.
# From 512 tokens on the flash kernel is faster (benchmarks/attention_kernels.py).
CPU_EXPLICIT_ATTENTION_MAX_LEN = 256


def _use_explicit_attention(device: torch.device, seq_len: int) -> bool:
    return device.type == "cpu" and seq_len <= CPU_EXPLICIT_ATTENTION_MAX_LEN


_CAUSAL_BIAS: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}


def causal_bias(seq_len: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[seq_len, seq_len]: 0 where a query may attend (key <= query), -inf above the diagonal; cached."""
    key = (seq_len, device, dtype)
    if key not in _CAUSAL_BIAS:
        _CAUSAL_BIAS[key] = torch.full((seq_len, seq_len), float("-inf"), device=device, dtype=dtype).triu(1)
    return _CAUSAL_BIAS[key]


class Attention(nn.Module):
    """Multi-head causal self-attention without biases (cleaner circuits)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.d_head = cfg.d_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, return_pattern: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, seq_len, d_model = x.shape
        q, k, v = self.qkv(x).split(d_model, dim=2)  # 3 x (B, T, C)
        q = q.view(batch, seq_len, self.n_heads, self.d_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(batch, seq_len, self.n_heads, self.d_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(batch, seq_len, self.n_heads, self.d_head).transpose(1, 2)  # (B, nh, T, hs)
        pattern = None
        if return_pattern:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.d_head)  # (B, nh, T, T)
            if mask is None:
                mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=x.device).tril()
            scores = scores.masked_fill(~mask, float("-inf"))
            pattern = scores.float().softmax(dim=-1)  # (B, nh, T, T), rows sum to 1
            z = pattern.to(v.dtype) @ v  # (B, nh, T, hs)
        elif _use_explicit_attention(x.device, seq_len):
            # Scores in the matmul dtype; the softmax kernels compute in fp32 and store in that dtype,
            # as a fused kernel's probabilities are before they meet V.
            scores = (q * (1.0 / math.sqrt(self.d_head))) @ k.transpose(-2, -1)  # (B, nh, T, T)
            if mask is None:
                scores = scores + causal_bias(seq_len, x.device, scores.dtype)
            else:
                scores = scores.masked_fill(~mask, float("-inf"))
            z = scores.softmax(dim=-1) @ v  # (B, nh, T, hs)
        else:
            if mask is None:
                z = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
            else:
                z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hs)
        z = z.transpose(1, 2).reshape(batch, seq_len, d_model)  # (B, T, nh * hs)
        return self.out(z), pattern

    # Per-head views of the weights, TransformerLens layout, for analysis.
    @property
    def W_Q(self) -> torch.Tensor:
        """[n_heads, d_model, d_head]"""
        return self._input_weight(0)

    @property
    def W_K(self) -> torch.Tensor:
        """[n_heads, d_model, d_head]"""
        return self._input_weight(1)

    @property
    def W_V(self) -> torch.Tensor:
        """[n_heads, d_model, d_head]"""
        return self._input_weight(2)

    @property
    def W_O(self) -> torch.Tensor:
        """[n_heads, d_head, d_model]"""
        d_model = self.out.weight.shape[0]
        # out(z) = z @ out.weight.T, with z's columns grouped by head
        return self.out.weight.T.reshape(self.n_heads, self.d_head, d_model)

    def _input_weight(self, index: int) -> torch.Tensor:
        d_model = self.out.weight.shape[0]
        weight = self.qkv.weight[index * d_model : (index + 1) * d_model]  # (C_out, C_in)
        # x @ weight.T gives (..., nh * hs); split the output columns by head
        return weight.T.reshape(d_model, self.n_heads, self.d_head).permute(1, 0, 2)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.mlp_width)
        self.down = nn.Linear(cfg.mlp_width, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


def _norm(cfg: ModelConfig) -> nn.Module:
    return nn.LayerNorm(cfg.d_model) if cfg.norm == "ln" else nn.Identity()


class Block(nn.Module):
    """Pre-norm residual block: x + attn(ln(x)), then x + mlp(ln(x)) when enabled."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_attn = _norm(cfg)
        self.attn = Attention(cfg)
        self.ln_mlp = _norm(cfg) if cfg.mlp else None
        self.mlp = MLP(cfg) if cfg.mlp else None

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, return_pattern: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_out, pattern = self.attn(self.ln_attn(x), mask, return_pattern)
        x = x + attn_out
        if self.mlp is not None:
            x = x + self.mlp(self.ln_mlp(x))
        return x, pattern


class Transformer(nn.Module):
    """Token + learned positional embedding, blocks, final norm, unembedding."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_final = _norm(cfg)
        self.unembed = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2 style: scale residual writes down with depth
        for name, param in self.named_parameters():
            if name.endswith("attn.out.weight") or name.endswith("mlp.down.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _residual(
        self, tokens: torch.Tensor, return_patterns: bool, padded: bool | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The normalised final residual stream [batch, pos, d_model] and the patterns (`padded`: attention_mask)."""
        batch, seq_len = tokens.shape
        if seq_len > self.cfg.seq_len:
            raise ValueError(
                f"sequence of {seq_len} tokens is longer than the model's context ({self.cfg.seq_len})"
            )
        mask = attention_mask(tokens, padded)
        positions = torch.arange(seq_len, device=tokens.device)
        x = self.embed(tokens.clamp_min(0)) + self.pos_embed(positions)  # (B, T, C)
        patterns = []
        for block in self.blocks:
            x, pattern = block(x, mask, return_patterns)
            if pattern is not None:
                patterns.append(pattern)
        return self.ln_final(x), patterns

    def _run(
        self, tokens: torch.Tensor, return_patterns: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        residual, patterns = self._residual(tokens, return_patterns)
        return self.unembed(residual), patterns  # (B, T, vocab)

    def forward(
        self, tokens: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [batch, pos, vocab]; with targets, (logits, mean loss over non-pad targets)."""
        logits, _ = self._run(tokens, return_patterns=False)
        if targets is None:
            return logits
        return logits, next_token_loss(logits, targets)

    def training_loss(self, tokens: torch.Tensor, targets: torch.Tensor, padded: bool | None = None) -> torch.Tensor:
        """The mean next-token loss of `forward`, without ever forming the [tokens, vocab] logits.

        The unembedding and cross entropy run fused, chunk by chunk (see
        `UnembedCrossEntropy`): at the study's vocabulary of 50257 the
        logits, their fp32 copy and the log-softmax were most of a step.
        `padded`: whether the batch may hold padding (None: look; attention_mask).
        """
        residual, _ = self._residual(tokens, return_patterns=False, padded=padded)
        return unembed_cross_entropy(residual.reshape(-1, residual.shape[-1]), self.unembed.weight, targets.reshape(-1))

    @torch.no_grad()
    def run_with_patterns(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and one attention pattern [batch, heads, query, key] per layer."""
        return self._run(tokens, return_patterns=True)

    @torch.no_grad()
    def attention_patterns(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """One attention pattern [batch, heads, query, key] per layer, without the unembedding (at the GPT-2
        vocabulary most of a forward pass, and head scores never read the logits)."""
        return self._residual(tokens, return_patterns=True)[1]


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over positions whose target is not padding."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1).long(), ignore_index=PAD_ID
    )


class UnembedCrossEntropy(torch.autograd.Function):
    """Mean cross entropy of `hidden @ weight.T` against `targets`, fused and chunked.

    The loss is the last node of the graph, so its gradients can be computed
    in the forward pass (as in Liger-Kernel's fused linear cross entropy):
    per chunk of tokens the logits are formed in the matmul dtype and the
    softmax in fp32, in place, while the chunk is in cache; softmax - one_hot
    is kept in the matmul dtype and the two gradients are one matmul each.
    Backward only scales them. The fp32 [tokens, vocab] logits, their
    log-softmax and its gradient are never formed.
    """

    @staticmethod
    def forward(
        ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int
    ) -> torch.Tensor:
        compute_dtype = (
            torch.get_autocast_dtype(hidden.device.type)
            if torch.is_autocast_enabled(hidden.device.type)
            else hidden.dtype
        )
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.to(compute_dtype)
            w = weight.to(compute_dtype)
            real = targets != PAD_ID
            count = real.sum().clamp_min(1)
            safe_targets = targets.clamp_min(0)
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_logits = torch.empty(h.shape[0], w.shape[0], dtype=compute_dtype, device=h.device)
            for start in range(0, h.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                chunk_targets = safe_targets[rows, None]
                logits = (h[rows] @ w.T).float()  # (n, vocab)
                target_logits = logits.gather(1, chunk_targets)
                # softmax in place: one max, one subtract, one exp, one sum over the chunk
                row_max = logits.amax(dim=-1, keepdim=True)
                probs = logits.sub_(row_max).exp_()
                row_sum = probs.sum(dim=-1, keepdim=True)
                loss += ((row_max + row_sum.log() - target_logits) * real[rows, None]).sum()
                # d(sum of losses)/d(logits) = softmax - one_hot
                probs.div_(row_sum).scatter_add_(1, chunk_targets, torch.full_like(row_sum, -1.0))
                grad_logits[rows] = probs
            # Padded targets contribute nothing: zero their rows on the [tokens, d_model] side,
            # far cheaper than masking [tokens, vocab]. One large matmul each for both gradients.
            grad_hidden = (grad_logits @ w) * real[:, None]
            grad_weight = (grad_logits.T @ (h * real[:, None])).float()
            ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
            ctx.save_for_backward(grad_hidden / count, grad_weight / count)
            return loss / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.hidden_dtype, ctx.weight_dtype
        return (grad_hidden * grad_loss).to(hidden_dtype), (grad_weight * grad_loss).to(weight_dtype), None, None


def unembed_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """Mean cross entropy of the logits `hidden @ weight.T` over non-pad targets (see UnembedCrossEntropy), in
    chunks of `logit_chunk_rows` positions by default."""
    if chunk_size is None:
        chunk_size = logit_chunk_rows(weight.shape[0], hidden.device)
    return UnembedCrossEntropy.apply(hidden, weight, targets, chunk_size)


def logit_chunk_rows(vocab_size: int, device: torch.device) -> int:
    """Positions a chunk where logits are formed piecewise (the training loss, the evaluation): about 2M fp32
    values (8 MB) on CPU, which stay in cache (the fastest size measured at vocab 8192 and 50257,
    benchmarks/RESULTS.md); 256M (1 GB) on a GPU, which has the memory and wants few large kernels: a whole batch of
    the study's is one chunk."""
    values = 2**21 if device.type == "cpu" else 2**28
    return max(128, values // vocab_size)
