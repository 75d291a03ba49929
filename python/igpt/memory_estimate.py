"""How much GPU memory a training step takes: the estimator behind ``igpt.memory``.

``estimate`` predicts the bytes of one training step of ``igpt.IGPT`` (AR or BERT loss, Adam,
bf16 autocast over fp32 master weights, optional activation checkpointing, activation
offload, data parallel or FSDP); ``activation_offload`` is the context manager the trainer
enters around forward + loss; ``parse_size``/``format_size`` read and write byte counts.
``igpt.memory`` re-exports all of it beside the planner (``plan``), which is what callers
import: ``igpt.memory.estimate`` is the public name.

Where the activation bytes come from. Every term is a tensor that autograd saves for the
backward in today's model (``igpt.model``), counted once per storage (q, k and v are views
of one qkv tensor; a reshape that is a view shares its input's storage). Per token and per
block, with d = n_embd, H = n_head, r = bytes of the residual stream (4: fp32 weights and
fp32 residual under autocast), g = bytes of the GEMM outputs (2 under bf16/fp16 autocast,
4 in fp32):

``device="cuda"`` (Triton attention and ln_mlp, CUDA's fused RMS norm):
    ln_1 (F.rms_norm)          x r d, rstd 4                 (LayerNorm: x r d, mean 4, rstd 4)
    c_attn (nn.Linear)         autocast's copy of norm(x) g d
    attention (igpt::attention) q, k, v: one storage 3 g d; o g d; lse 4 H (fp32)
    c_proj (nn.Linear)         the (B, n, d) copy of o's transpose g d (none when H = 1)
    ln_mlp (_LnMlp)            x r d, rstd 4 (+ mean 4), z 4 g d
    = (2 r + 10 g) d + 8 + 4 H   (+ 8 for LayerNorm): 28 d + 8 + 4 H bytes under bf16
plus, per block and independent of tokens, autocast's bf16 copies of the four weight
matrices (12 d^2 g; none in fp32, where the parameters themselves are saved).

``device="cpu"`` (the reference ops in fp32; F.rms_norm's composite CPU implementation):
    ln_1                       x 4 d, rstd 4, x * rstd 4 d   (LayerNorm: x 4 d, mean, rstd 8)
    c_attn                     norm(x) 4 d
    attention (SDPA, CPU)      q, k, v 12 d; o 4 d (its (B, n, H, hd) layout makes the
                               transpose for c_proj a view); lse 4 H
    reference ln_mlp           the same norm again, norm(x) 4 d, z 16 d, sigmoid(1.702 z)
                               16 d (quick GELU; exact GELU saves only z), act(z) 16 d
    = 88 d + 8 + 4 H  (quick GELU, RMS norm)

``kernels="sdpa"`` (device "cuda"): the nanoGPT-style model of ``benchmarks/bench_train.py``
(nn.RMSNorm, nn.Linear, F.scaled_dot_product_attention, quick GELU written out) under
bf16 autocast: x 4 d + rstd 4, norm copy 2 d, qkv 6 d, o 2 d, lse 4 H, x 4 d + rstd 4,
norm copy 2 d, fc out 8 d, sigmoid 8 d, product 8 d = 44 d + 8 + 4 H. Counted exactly on the
CPU under fp16 autocast (with the CPU's composite norm); never counted on a GPU.

Outside the blocks: the embedding saves its int64 ids (AR: the shifted ids, 8 per token)
and the position ids (8 n); BERT saves the float mask factor (4 per token) instead of a
copy of the ids. The head saves ln_f's tensors, the lm_head input (g d) and weight copy
(g d V), log_softmax's fp32 output (4 V per loss token) and the int64 targets. A block run
under checkpointing saves only its input (r d per token; the recompute re-creates the rest).

The tests (``tests/test_memory.py``) count these bytes with
``torch.autograd.graph.saved_tensors_hooks`` in real forwards: on the CPU for the reference
path, and under ``TRITON_INTERPRET=1`` with the Triton kernels and a simulated autocast
(fp16, the same 2 bytes as bf16) for the CUDA path, where the one difference, the CPU's
composite RMS norm, is swapped in (``KernelPath.rms_fused=False``).

The peak. Model states (fp32 parameters, fp32 gradients, Adam's two fp32 moments) plus the
largest of: the end of the forward (saved activations, the head's and the loss's
transients: the logits, their fp32 copy and log_softmax's output), and each block's
backward (the activations of the blocks below it, the gradients written so far, and the
transient of the block itself: its saved tensors re-created by recompute or brought back
from the host, and the backward's workspace). Gradients are counted in full from the start
of the backward when accumulating (they persist across micro-batches) and as they are
written otherwise (``zero_grad(set_to_none=True)``). ``estimate``'s ``batch_size`` is the
micro-batch on one GPU. Not modelled: the CUDA context (outside ``max_memory_allocated``),
cuBLAS's workspace (tens of MiB), Triton's autotuning buffers (first steps only), allocator
fragmentation, and the extra copies ``torch.compile`` or other kernels would make (an
attention backend whose output is laid out (B, n, H, hd), as SDPA's is, would save the 2 d
of o's transposed copy less).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from dataclasses import dataclass

import torch

from igpt.config import IGPTConfig

PRECISIONS = {"bf16": 2, "fp16": 2, "fp32": 4}  # -> bytes of a GEMM output
OBJECTIVES = ("ar", "bert")
OPTIMIZERS = {"adam": 8, "sgd": 0}  # -> bytes of state per parameter (fp32)
DEVICES = ("cuda", "cpu")
KERNELS = ("igpt", "sdpa")
SMS = 132  # streaming multiprocessors of the GPU the workspace terms assume (H100/H200)


@dataclass(frozen=True)
class KernelPath:
    """Which kernels run and in which dtypes: what the saved-tensor coefficients depend on.

    kernels: "triton" (igpt's kernels), "reference" (the PyTorch reference ops) or "sdpa"
    (the nanoGPT-style benchmark model). gemm_bytes: bytes of GEMM outputs (autocast's
    dtype). resid_bytes: bytes of the residual stream and the weights. rms_fused: F.rms_norm
    saves (x, rstd) (CUDA) rather than (x, rstd, x * rstd) (the CPU's composite).
    """

    kernels: str
    gemm_bytes: int
    resid_bytes: int = 4
    rms_fused: bool = True

    @property
    def autocast(self) -> bool:
        return self.gemm_bytes < self.resid_bytes


def path(device: str = "cuda", precision: str = "bf16", kernels: str = "igpt") -> KernelPath:
    """The ``KernelPath`` that ``estimate`` models for a device, precision and kernel choice."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    if device == "cpu":
        if precision != "fp32" or kernels != "igpt":
            raise ValueError(
                "device='cpu' models the reference path in fp32 (the trainer's CPU default): "
                f"pass precision='fp32' and kernels='igpt', got {precision!r}, {kernels!r}"
            )
        return KernelPath("reference", 4, 4, rms_fused=False)
    return KernelPath("triton" if kernels == "igpt" else "sdpa", PRECISIONS[precision])


@dataclass(frozen=True)
class Estimate:
    """Predicted bytes of one training step on one GPU (see the module docstring).

    parameters, gradients, optimizer: the model states (fp32; sharded under FSDP).
    activations: saved for the backward by the embedding and all blocks at the end of the
    forward (resident on the GPU; 0 with offload, where they live in ``host``).
    activations_per_block: what one block without checkpointing saves.
    per_token_block: its per-token part, bytes per token (the coefficient of the path).
    logits: the head's saved tensors plus the loss's transient buffers (logits, fp32 copy,
    log_softmax output, their gradients); the saved part goes to the host with offload.
    transient: the largest per-block transient of the backward (recompute or reload of one
    block's saved tensors, plus the backward's workspace; FSDP's gathered weights).
    peak: the predicted ``torch.cuda.max_memory_allocated`` of a step.
    host: pinned host bytes that activation offload holds.
    """

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    activations_per_block: int
    per_token_block: int
    logits: int
    transient: int
    peak: int
    host: int = 0

    def to_dict(self) -> dict:
        """The fields as a plain dict (for JSON)."""
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------ counts


def _norm_parameters(config: IGPTConfig) -> int:
    return config.n_embd * (2 if config.norm == "layer" and config.bias else 1)


def _block_parameters(config: IGPTConfig) -> int:
    """Parameters of one block: two norms, four weight matrices and their biases."""
    d = config.n_embd
    return 2 * _norm_parameters(config) + 12 * d * d + (9 * d if config.bias else 0)


def parameter_count(config: IGPTConfig) -> int:
    """The model's parameter count (``IGPT.num_params()``), from the config alone."""
    d = config.n_embd
    outside = (config.vocab_size + config.n_positions + config.n_colors) * d
    return outside + _norm_parameters(config) + config.n_layer * _block_parameters(config)


def parameter_tensors(config: IGPTConfig) -> int:
    """How many parameter tensors the model has (Adam keeps a step counter for each)."""
    norm = 2 if config.norm == "layer" and config.bias else 1
    return 3 + norm + config.n_layer * (2 * norm + (8 if config.bias else 4))


def _block_weights(config: IGPTConfig) -> int:
    """Elements of one block's four weight matrices (what autocast copies)."""
    return 12 * config.n_embd * config.n_embd


def _norm_saved(config: IGPTConfig, p: KernelPath, x_bytes: int) -> int:
    """Bytes per token a Norm module (F.rms_norm / F.layer_norm) saves on an input of
    ``x_bytes`` per element: x and its fp32 statistics (and x * rstd in the composite)."""
    d = config.n_embd
    if config.norm == "layer":
        return x_bytes * d + 8
    return x_bytes * d + 4 + (0 if p.rms_fused else 4 * d)


def block_coefficients(config: IGPTConfig, p: KernelPath) -> tuple[int, int]:
    """(bytes per token, bytes per block independent of tokens) one block saves."""
    d, H, g, r = config.n_embd, config.n_head, p.gemm_bytes, p.resid_bytes
    stats = 8 if config.norm == "layer" else 4
    copies = g * _block_weights(config) if p.autocast else 0
    if p.kernels == "triton":
        o_copy = g * d if H > 1 else 0  # one head: o's transpose is already (B, n, d)
        per_token = _norm_saved(config, p, r) + g * d + 3 * g * d + g * d + 4 * H + o_copy
        per_token += r * d + stats + 4 * g * d  # ln_mlp: x, row stats, z
        return per_token, copies
    act = 2 if config.activation == "quick_gelu" else 1  # z * sigmoid(1.702 z) also saves
    if p.kernels == "reference":  # fp32 throughout
        per_token = 2 * _norm_saved(config, p, 4) + 4 * d + 12 * d + 4 * d + 4 * H
        per_token += 4 * d + act * 16 * d + 16 * d  # norm(x) for c_fc, z (+ sigmoid), act(z)
        return per_token, 0
    # sdpa: nn.RMSNorm + autocast linears; the ln_2 norm is a separate module as well
    per_token = 2 * _norm_saved(config, p, r) + 2 * g * d + 3 * g * d + g * d + 4 * H
    per_token += 4 * g * d * (act + 1)  # fc output (+ sigmoid), product
    return per_token, copies


def flops_per_token(config: IGPTConfig, objective: str) -> tuple[float, float]:
    """(forward FLOPs per token of one block, of the head): matmuls, and attention's two
    n x n products (half of them under the causal mask)."""
    d, n = config.n_embd, config.n_positions
    keys = n / 2 if objective == "ar" else n
    return 2 * _block_weights(config) + 4 * keys * d, 2 * d * config.n_colors


# ------------------------------------------------------------------------------ estimate


def _check(config, batch_size, objective, checkpointing, optimizer, world_size, mask_prob):
    if not isinstance(config, IGPTConfig):
        raise TypeError(f"config must be an IGPTConfig, got {type(config).__name__}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if not isinstance(checkpointing, int) or isinstance(checkpointing, bool) or checkpointing < 0:
        raise ValueError(f"checkpointing must be an int >= 0 (0 off), got {checkpointing!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {optimizer!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must lie in [0, 1], got {mask_prob!r}")


def checkpointed_blocks(n_layer: int, every: int) -> list[bool]:
    """Which blocks recompute under ``checkpointing=every``: block i when i % every == 0
    (the model's policy: 1 = all blocks, k = every k-th, 0 = none)."""
    return [bool(every) and i % every == 0 for i in range(n_layer)]


def activations_saved(
    config: IGPTConfig,
    p: KernelPath,
    *,
    batch_size: int,
    objective: str = "ar",
    checkpointing: int = 0,
    mask_prob: float = 0.15,
    weight_copies: bool = True,
) -> dict:
    """The saved-tensor bytes of one forward, by part: embed, blocks (a list), head.

    This is what ``torch.autograd.graph.saved_tensors_hooks`` sees, counted once per
    storage, parameters excluded (the tests compare against it).
    """
    c = config
    n, d, V = c.n_positions, c.n_embd, c.n_colors
    T = batch_size * n
    loss_tokens = T if objective == "ar" else round(mask_prob * T)
    per_token, per_block = block_coefficients(c, p)
    full = per_token * T + (per_block if weight_copies else 0)
    recomputed = checkpointed_blocks(c.n_layer, checkpointing)
    blocks = [p.resid_bytes * d * T if ck else full for ck in recomputed]
    # embedding: int64 ids (the shifted copy for AR; BERT reuses the tokens, saved by the
    # loss's targets below) and the position ids; BERT's float mask factor
    embed = 8 * n + (8 * T if objective == "ar" else 4 * T)
    head = _norm_saved(c, p, p.resid_bytes) * T + p.gemm_bytes * d * T
    head += p.gemm_bytes * V * d if p.autocast and weight_copies else 0  # lm_head's copy
    head += 4 * V * loss_tokens + 4  # log_softmax output, nll's total weight
    if objective == "ar":
        head += 8 * T  # the targets: the tokens tensor itself
    else:
        head += 8 * T + T + 8 * loss_tokens  # tokens (wte ids), bool mask, gathered targets
    return {"embed": embed, "blocks": blocks, "head": head, "per_token": per_token, "full": full}


def _workspace(config: IGPTConfig, p: KernelPath, T: int) -> int:
    """The backward's largest temporary of one block, beyond its saved tensors: ln_mlp's
    gradients (dy, its GEMM-dtype copy, dz, the recomputed activation, fp32 dn, dx) and
    the weight-gradient partials, or attention's dq, dk, dv and the concatenated dqkv."""
    d, g, r = config.n_embd, p.gemm_bytes, p.resid_bytes
    mlp = (2 * r + g + 8 * g + 4) * d * T
    tiles = math.ceil(4 * d / 128) * math.ceil(d / 128)
    splits = max(1, min(math.ceil(2 * SMS / tiles), T // 1024))
    mlp += (splits + 1) * 4 * 4 * d * d + g * 4 * d * d  # fp32 partials, their sum, the cast
    attn = (r * d + 6 * g * d + 4 * config.n_head) * T + 4 * 3 * d * d
    return max(mlp, attn)


def estimate(
    config: IGPTConfig,
    *,
    batch_size: int,
    objective: str = "ar",
    precision: str = "bf16",
    checkpointing: int = 0,
    offload: bool = False,
    optimizer: str = "adam",
    world_size: int = 1,
    fsdp: bool = False,
    device: str = "cuda",
    accumulation: int = 1,
    kernels: str = "igpt",
    mask_prob: float = 0.15,
) -> Estimate:
    """Predicted memory of one training step of ``IGPT(config)``; see the module docstring.

    Args:
        config: the model.
        batch_size: images per micro-batch on this GPU (the global batch divided by
            world_size and accumulation).
        objective: "ar" or "bert" (BERT computes the loss on ``mask_prob`` of the tokens).
        precision: "bf16" or "fp16" (autocast over fp32 weights) or "fp32".
        checkpointing: 0 off; k recomputes every k-th block (blocks i with i % k == 0).
        offload: saved activations go to pinned host memory (``activation_offload``).
        optimizer: "adam" (two fp32 moments per parameter) or "sgd" (none).
        world_size: data-parallel GPUs; without FSDP, DDP's gradient buckets (4 bytes per
            parameter) are added when it is above 1.
        fsdp: FSDP2 ``fully_shard`` per block: states sharded over world_size, two blocks'
            gathered bf16 weights and their gradients transient, no autocast weight copies
            (the weights are bf16 already). With accumulation, FSDP keeps unsharded fp32
            gradients between micro-batches (``set_requires_gradient_sync(False)``).
        device: "cuda" (the Triton kernels) or "cpu" (the reference ops, fp32 only).
        accumulation: micro-batches per optimizer step (gradients persist across them).
        kernels: "igpt", or "sdpa" for the benchmark's nanoGPT-style eager model.
        mask_prob: BERT's masked fraction (its loss runs on those tokens only).

    Returns:
        an ``Estimate`` (bytes).
    """
    _check(config, batch_size, objective, checkpointing, optimizer, world_size, mask_prob)
    if not isinstance(accumulation, int) or accumulation < 1:
        raise ValueError(f"accumulation must be a positive int, got {accumulation!r}")
    p = path(device, precision, kernels)
    return _estimate(
        config,
        p,
        batch_size=batch_size,
        objective=objective,
        checkpointing=checkpointing,
        offload=offload,
        optimizer=optimizer,
        world_size=world_size,
        fsdp=fsdp,
        accumulation=accumulation,
        mask_prob=mask_prob,
    )


def _estimate(
    config, p, *, batch_size, objective, checkpointing, offload, optimizer, world_size, fsdp,
    accumulation, mask_prob,
) -> Estimate:  # fmt: skip
    """``estimate`` for a given ``KernelPath`` (the tests swap in the CPU's composite norm)."""
    c = config
    T = batch_size * c.n_positions
    P = parameter_count(c)
    sharded = fsdp and world_size > 1
    shard = world_size if sharded else 1
    params, grads = 4 * P // shard, 4 * P // shard
    optim = OPTIMIZERS[optimizer] * P // shard
    if optimizer == "adam":  # one fp32 step counter per parameter tensor
        optim += 4 * parameter_tensors(c)
    buckets = 4 * P if world_size > 1 and not fsdp else 0
    # FSDP2 frees each block's gathered (bf16) weights after its forward: no copies held
    saved = activations_saved(
        c,
        p,
        batch_size=batch_size,
        objective=objective,
        checkpointing=checkpointing,
        mask_prob=mask_prob,
        weight_copies=not sharded,
    )
    full, blocks = saved["full"], saved["blocks"]
    recomputed = checkpointed_blocks(c.n_layer, checkpointing)
    loss_tokens = T if objective == "ar" else round(mask_prob * T)
    # the logits (GEMM dtype), their fp32 copy beside log_softmax's output; in the backward
    # the two fp32 gradients of the log-probabilities
    loss_transient = p.gemm_bytes * c.n_colors * T + 2 * 4 * c.n_colors * loss_tokens
    head_saved, embed_saved = saved["head"], saved["embed"]
    activations = embed_saved + sum(blocks)
    host = 0
    if offload:  # everything saved goes to the host; the GPU keeps only transients
        host = activations + head_saved
        activations, head_saved = 0, 0
    block_params = _block_parameters(c)
    gathered = (2 * 2 + 4) * block_params if sharded else 0  # two blocks: bf16 w, fp32 grad
    work = _workspace(c, p, T)
    unsharded_grads = 4 * P if sharded and accumulation > 1 else 0
    states = params + optim + buckets + unsharded_grads
    head_grads = 4 * (c.n_colors * c.n_embd + _norm_parameters(c)) // shard  # lm_head, ln_f
    block_grad = 4 * block_params // shard
    accumulated = grads if accumulation > 1 else 0
    peak = states + accumulated + activations + head_saved + loss_transient + gathered
    below = activations  # the saved bytes of the embedding and the blocks below block j
    transient = 0
    for j in range(c.n_layer - 1, -1, -1):
        own = 0 if offload else blocks[j]
        below -= own
        # block j's full saved set must be on the GPU while its backward runs: re-created
        # by the recompute, or brought back from the host; else it is `own` already
        t = (full if recomputed[j] or offload else 0) + work + gathered
        transient = max(transient, t)
        written = grads if accumulation > 1 else head_grads + (c.n_layer - j) * block_grad
        peak = max(peak, states + written + below + own + t)
    peak = max(peak, states + grads + (0 if offload else embed_saved))
    return Estimate(
        parameters=params,
        gradients=grads,
        optimizer=optim,
        activations=activations,
        activations_per_block=full,
        per_token_block=saved["per_token"],
        logits=saved["head"] + loss_transient,
        transient=transient,
        peak=int(peak),
        host=host,
    )


# ------------------------------------------------------------------------------ offload


@contextlib.contextmanager
def activation_offload(enabled: bool = True, *, pin_memory: bool | None = None):
    """Keep every tensor autograd saves in (pinned) host memory until the backward needs it.

    Enter it around forward + loss, not around the backward; combinable with activation
    checkpointing (a checkpointed block's input goes to the host, its recompute stays on
    the GPU). ``pin_memory`` defaults to whether CUDA is available. A thin wrapper over
    ``torch.autograd.graph.save_on_cpu``: the copies are synchronous, so every saved byte
    crosses PCIe twice per step on the critical path (``plan`` charges that).
    """
    if not enabled:
        yield
        return
    pin = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
    with torch.autograd.graph.save_on_cpu(pin_memory=pin):
        yield


# ------------------------------------------------------------------------------ sizes

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}  # fmt: skip


def parse_size(text) -> int:
    """Bytes from "40GiB", "40GB", "24G" (G = GB = 10^9; GiB = 2^30), "512MiB" or "123"."""
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(
            f"memory size must be a positive number with an optional unit (B, KB, MB, GB, TB, "
            f"KiB, MiB, GiB, TiB; K/M/G/T mean KB/MB/GB/TB), like 40GiB or 24G; got {text!r}"
        )
    return int(float(m.group(1)) * _UNITS[unit])


def format_size(n: float) -> str:
    """Bytes as GiB (or MiB below one GiB), one decimal."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
