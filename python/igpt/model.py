"""The iGPT model: GPT-2 with pre-norm blocks over palette tokens (Chen et al., 2020).

    h^0     = wte(x) + wpe(positions)
    a       = h + c_proj(attention(ln_1(h)))          (causal for AR, full for BERT)
    h^{l+1} = a + mlp(ln_2(a))                        (one fused ln_mlp call)
    logits  = lm_head(ln_f(h^L))

AR: the start-of-sequence id is prepended inside, so logits[:, i] predicts tokens[:, i].
BERT: token embeddings at masked positions are zeroed and attention sees both directions.
Attention and the norm-MLP are the ``igpt_kernels`` ops, which run the Triton kernels on a
GPU and the PyTorch reference elsewhere. Parameter names follow GPT-2 and transformers'
ImageGPT, so ``igpt.hf`` converts weights by name.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from igpt.config import IGPTConfig
from igpt_kernels import attention, ln_mlp


class Norm(nn.Module):
    """RMS norm (x / sqrt(mean(x^2) + eps) * w, no bias) or LayerNorm, per config.norm."""

    def __init__(self, config: IGPTConfig):
        super().__init__()
        self.kind, self.eps = config.norm, config.eps
        self.weight = nn.Parameter(torch.ones(config.n_embd))
        has_bias = config.norm == "layer" and config.bias
        self.bias = nn.Parameter(torch.zeros(config.n_embd)) if has_bias else None

    def forward(self, x):
        if self.kind == "rms":
            return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


class SelfAttention(nn.Module):
    def __init__(self, config: IGPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x, causal: bool):
        B, n, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)  # 3 x (B, n, d)
        q, k, v = (
            t.view(B, n, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v)
        )  # 3 x (B, H, n, hd)
        y = attention(q, k, v, causal=causal)  # (B, H, n, hd)
        y = y.transpose(1, 2).reshape(B, n, d)  # (B, n, d)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: IGPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.activation = config.activation

    def forward(self, x, norm: Norm):
        """x + c_proj(act(c_fc(norm(x)))), fused into one kernel call."""
        return ln_mlp(
            x,
            norm.weight,
            norm.bias,
            self.c_fc.weight,
            self.c_fc.bias,
            self.c_proj.weight,
            self.c_proj.bias,
            norm=norm.kind,
            eps=norm.eps,
            activation=self.activation,
            residual=True,
        )


class Block(nn.Module):
    def __init__(self, config: IGPTConfig):
        super().__init__()
        self.ln_1 = Norm(config)
        self.attn = SelfAttention(config)
        self.ln_2 = Norm(config)
        self.mlp = MLP(config)

    def forward(self, x, causal: bool = True):
        x = x + self.attn(self.ln_1(x), causal)
        return self.mlp(x, self.ln_2)


class IGPT(nn.Module):
    """Image GPT over palette tokens. See the module docstring for the computation."""

    def __init__(self, config: IGPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.n_positions, config.n_embd),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=Norm(config),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.n_colors, bias=False)
        self.checkpoint_every = 0  # activation checkpointing: 0 off, k = every k-th block
        self.reset_parameters()

    def reset_parameters(self):
        """GPT-2 init with depth-scaled residual projections and a zero logit head.

        Linear and token embeddings ~ N(0, 0.02), position embeddings ~ N(0, 0.01); the two
        projections that write into the residual stream per block get std 0.02 / sqrt(2L)
        so the stream's variance does not grow with depth; the output head starts at zero,
        so the first logits are uniform.
        """
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * self.config.n_layer))
            elif name.endswith("wpe.weight"):
                nn.init.normal_(p, 0.0, 0.01)
            elif name == "lm_head.weight" or name.endswith(".bias"):
                nn.init.zeros_(p)
            elif "ln_" in name:
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, 0.0, 0.02)

    def set_checkpointing(self, every: int) -> None:
        """Recompute block activations in the backward: 0 off, 1 every block, k every k-th."""
        if not isinstance(every, int) or every < 0:
            raise ValueError(f"every must be an int >= 0, got {every!r}")
        self.checkpoint_every = every

    def num_params(self, position_embeddings: bool = True) -> int:
        """Number of parameters; the paper's sizes match the count without ``wpe``."""
        n = sum(p.numel() for p in self.parameters())
        return n if position_embeddings else n - self.transformer.wpe.weight.numel()

    def _check_inputs(self, tokens, bert_mask):
        if (
            not isinstance(tokens, torch.Tensor)
            or tokens.dtype.is_floating_point
            or tokens.dtype == torch.bool
            or tokens.dim() != 2
        ):
            got = (
                f"{tokens.dtype} {tuple(tokens.shape)}"
                if isinstance(tokens, torch.Tensor)
                else type(tokens).__name__
            )
            raise TypeError(f"tokens must be an integer tensor (B, n), got {got}")
        n = tokens.shape[1]
        if not 1 <= n <= self.config.n_positions:
            raise ValueError(
                f"tokens must have 1 <= n <= n_px^2 = {self.config.n_positions} positions, got {n}"
            )
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.n_colors):
            raise ValueError(
                f"tokens must lie in [0, n_colors={self.config.n_colors}), got "
                f"values in [{int(tokens.min())}, {int(tokens.max())}]"
            )
        if bert_mask is not None:
            if not isinstance(bert_mask, torch.Tensor) or bert_mask.dtype != torch.bool:
                raise TypeError("bert_mask must be a bool tensor (B, n), True = masked")
            if bert_mask.shape != tokens.shape:
                raise ValueError(
                    f"bert_mask must have tokens' shape {tuple(tokens.shape)}, "
                    f"got {tuple(bert_mask.shape)}"
                )

    def embed(self, tokens, bert_mask=None):
        """h^0 (B, n, d). AR input is [SOS] + tokens[:, :-1]; BERT zeroes masked tokens."""
        self._check_inputs(tokens, bert_mask)
        B, n = tokens.shape
        wte, wpe = self.transformer.wte, self.transformer.wpe
        if bert_mask is None:
            sos = tokens.new_full((B, 1), self.config.sos_id)
            h = wte(torch.cat([sos, tokens[:, :-1]], dim=1))  # (B, n, d)
        else:
            h = wte(tokens) * (~bert_mask).unsqueeze(-1).to(wte.weight.dtype)  # (B, n, d)
        return h + wpe(torch.arange(n, device=tokens.device))

    def _run_block(self, i, block, h, causal):
        k = self.checkpoint_every
        if k and self.training and torch.is_grad_enabled() and i % k == 0:
            return checkpoint(block, h, causal, use_reentrant=False)
        return block(h, causal)

    def hidden_states(self, tokens, bert_mask=None):
        """ln_f(h^L): the final normalised hidden states (B, n, d)."""
        h = self.embed(tokens, bert_mask)
        for i, block in enumerate(self.transformer.h):
            h = self._run_block(i, block, h, bert_mask is None)
        return self.transformer.ln_f(h)

    def forward(self, tokens, bert_mask=None):
        """Logits (B, n, n_colors). tokens: int (B, n), n <= n_px^2; bert_mask: bool (B, n).

        AR (bert_mask None): logits[:, i] predicts tokens[:, i] from tokens[:, :i].
        BERT: no causal mask; logits at masked positions predict the masked tokens.
        """
        return self.lm_head(self.hidden_states(tokens, bert_mask))

    def features(self, tokens, bert_mask=None):
        """Average-pooled features of every layer in one pass: (B, L + 1, d), float32.

        f^l = mean_i ln_1^l(h^l)_i for l < L (the block's own norm of its input) and
        f^L = mean_i ln_f(h^L)_i, as in the paper's linear probes (sec. 2.3-2.4). The input
        is the same as ``forward``'s: [SOS] + tokens[:, :-1] for AR.
        """
        h = self.embed(tokens, bert_mask)
        feats = []
        for block in self.transformer.h:
            feats.append(block.ln_1(h).float().mean(dim=1))  # (B, d)
            h = block(h, bert_mask is None)
        feats.append(self.transformer.ln_f(h).float().mean(dim=1))
        return torch.stack(feats, dim=1)  # (B, L + 1, d)
