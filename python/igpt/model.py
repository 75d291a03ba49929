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

Sampling (``IGPT.generate``) keeps every layer's keys and values in a cache allocated once
for the whole image, (L, 2, B, H, n_px^2, hd): the prefix is run in one causal pass that
fills it, then each new token is a single query attending to the cached keys, which is the
bottom-right-aligned causal case of ``attention`` (Nq = 1 <= Nk).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from igpt.config import IGPTConfig
from igpt.generation import FixedShapeStep, check_generate_args, check_prefix, next_token
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

    def forward(self, x, causal: bool, kv=None, pos=0, visible=None):
        """x (B, n, d) at positions pos..pos+n-1. With ``kv``, this layer's cache slice
        (2, B, H, n_px^2, hd), the new keys and values are stored in it and the queries
        attend to every cached position up to pos + n - 1. For fixed shapes (CUDA graphs)
        ``pos`` may be a (1,) tensor: then the first Nk cached positions are attended, with
        ``visible`` (B, Nk) bool masking the ones not written yet."""
        B, n, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)  # 3 x (B, n, d)
        q, k, v = (
            t.view(B, n, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v)
        )  # 3 x (B, H, n, hd)
        if kv is not None and visible is None:
            kv[:, :, :, pos : pos + n] = torch.stack((k, v))
            k, v = kv[:, :, :, : pos + n]  # 2 x (B, H, pos + n, hd), views of the cache
        elif kv is not None:
            kv.index_copy_(3, pos, torch.stack((k, v)))
            k, v = kv[:, :, :, : visible.shape[1]]  # 2 x (B, H, Nk, hd)
        y = attention(q, k, v, causal=causal, key_padding_mask=visible)  # (B, H, n, hd)
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

    def forward(self, x, causal: bool = True, kv=None, pos=0, visible=None):
        x = x + self.attn(self.ln_1(x), causal, kv, pos, visible)
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

    def trunk(self, tokens, bert_mask=None, *, pool_layers=(), run_all: bool = True):
        """The one pass through the blocks that forward, features and classifiers share.

        Returns ``(n_L, pooled)``: n_L = ln_f(h^L) (B, n, d), or None when ``run_all`` is
        False; pooled (B, len(pool_layers), d) float32, or None without ``pool_layers``,
        where layer l < L pools ln_1 of block l's input and l = L pools n_L (see
        ``features``). With ``run_all=False`` the loop stops after the last pooled layer.
        """
        L = self.config.n_layer
        want = sorted(set(pool_layers))
        if want and not 0 <= want[0] <= want[-1] <= L:
            raise ValueError(f"pool_layers must lie in [0, {L}], got {list(pool_layers)}")
        stop = L if run_all or not want else want[-1]
        h = self.embed(tokens, bert_mask)  # (B, n, d)
        pooled = {}
        for i, block in enumerate(self.transformer.h):
            if i in want:
                pooled[i] = block.ln_1(h).float().mean(dim=1)  # (B, d)
            if i == stop:
                break
            h = self._run_block(i, block, h, bert_mask is None)
        n_L = self.transformer.ln_f(h) if stop == L else None  # (B, n, d)
        if L in want:
            pooled[L] = n_L.float().mean(dim=1)
        if not want:
            return n_L, None
        return n_L, torch.stack([pooled[i] for i in pool_layers], dim=1)  # (B, P, d)

    def hidden_states(self, tokens, bert_mask=None):
        """ln_f(h^L): the final normalised hidden states (B, n, d)."""
        return self.trunk(tokens, bert_mask)[0]

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
        return self.trunk(tokens, bert_mask, pool_layers=range(self.config.n_layer + 1))[1]

    # ----------------------------------------------------------------------------------
    # sampling
    # ----------------------------------------------------------------------------------

    def kv_cache(self, batch_size: int, device=None, dtype=None) -> torch.Tensor:
        """A zeroed key/value cache for whole images: (L, 2, B, H, n_px^2, hd).

        Allocated once per ``generate`` call; each step writes one position of it in place.
        Zeroed, not empty: the fixed-shape (CUDA graph) step multiplies the unwritten values
        by zero attention weights, and 0 * NaN from uninitialised memory would be NaN.
        """
        c = self.config
        shape = (c.n_layer, 2, batch_size, c.n_head, c.n_positions, c.head_dim)
        w = self.transformer.wte.weight
        return torch.zeros(shape, device=device or w.device, dtype=dtype or w.dtype)

    def _decode(self, ids, pos, cache, visible=None):
        """Logits (B, n_colors) after the last of ``ids`` (B, m), the *input* ids (SOS or
        colours) at positions pos..pos+m-1, writing their keys and values into ``cache``.
        ``pos`` is an int, or a (1,) tensor together with ``visible`` (see SelfAttention)."""
        wte, wpe = self.transformer.wte, self.transformer.wpe
        if visible is None:
            positions = torch.arange(pos, pos + ids.shape[1], device=ids.device)
        else:
            positions = pos
        h = wte(ids) + wpe(positions)  # (B, m, d)
        for block, kv in zip(self.transformer.h, cache, strict=True):
            h = block(h, True, kv, pos, visible)
        return self.lm_head(self.transformer.ln_f(h[:, -1]))  # (B, n_colors)

    @torch.no_grad()  # not inference_mode: callers may edit the returned tokens in place
    def generate(
        self,
        n: int,
        *,
        prefix=None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        device=None,
        progress: bool = False,
        cuda_graph: bool = False,
    ) -> torch.Tensor:
        """Sample ``n`` whole images, left to right, with a key/value cache (AR models only).

        Args:
            n: number of images.
            prefix: optional integer tensor (n, p) or (p,) (shared by all images) of palette
                ids for the first p raster positions; they are copied unchanged into the
                output and the model samples the remaining n_px^2 - p.
            temperature: logits are divided by it; 0 means greedy (argmax).
            top_k: sample among the k most likely colours only.
            top_p: nucleus sampling, among the smallest set of colours whose probability
                reaches top_p, 0 < top_p <= 1.
            seed: seeds a private ``torch.Generator``, so the same seed, inputs and device
                give the same images; None draws from torch's global generator.
            device: where to sample; the model must already be there (default: its device).
            progress: show a tqdm bar over the positions.
            cuda_graph: replay each one-token step as a captured CUDA graph (no Python
                between kernels; a step then attends to one of 8 fixed cache lengths,
                masked). Off the GPU the same fixed-shape steps run eagerly (for tests).

        Returns:
            int64 tensor (n, n_px^2) of palette ids on ``device``.

        The prefix is run in one causal pass that fills the cache; then each position costs
        one query per layer against the cached keys. A model trained with the BERT
        objective has no left-to-right distribution to sample from: do not use this for it.
        """
        N = self.config.n_positions
        device = check_generate_args(self, n, temperature, top_k, top_p, device)
        prefix = check_prefix(self, prefix, n, device)
        p = prefix.shape[1]
        out = torch.empty(n, N, dtype=torch.long, device=device)
        out[:, :p] = prefix
        if p == N:
            return out
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device).manual_seed(int(seed))
        cache = self.kv_cache(n, device)
        sos = torch.full((n, 1), self.config.sos_id, dtype=torch.long, device=device)
        logits = self._decode(torch.cat([sos, prefix], dim=1), 0, cache)  # prefill
        step = FixedShapeStep(self, cache, p + 1) if cuda_graph and p + 1 < N else self._decode
        for t in tqdm(range(p, N), desc="sampling", unit="px", disable=not progress):
            out[:, t] = next_token(logits, temperature, top_k, top_p, generator)
            if t + 1 < N:
                logits = step(out[:, t : t + 1], t + 1, cache)
        return out
