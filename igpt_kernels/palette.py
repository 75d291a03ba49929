"""Nearest-colour palette quantization: RGB pixels -> token ids, and back.

tokens[...] = argmin_k |pixels[..., :] - palette[k, :]|^2, the lowest k on exact ties.
pixels: uint8 (..., 3); palette: float32 (K, 3) in 0..255, 1 <= K <= 65536.

Backends:

- ``"cpu"``: C++ kernel (csrc/palette_cpu.cpp), OpenMP over pixels, the palette as padded
  structure-of-arrays compared 16 entries at a time in SIMD, distance and argmin fused.
- ``"cuda"``: CUDA kernel (csrc/palette_cuda.cu), palette tiles in shared memory, 8 pixels
  per thread, fp32.
- ``"torch"``: the reference (``reference.quantize``), chunked (n, K) distances.

Both compiled kernels compute (x - c)^2 in fp32 and re-scan in fp64 any pixel whose best and
runner-up distances lie within the fp32 error bound, so their tokens are the exact nearest
colour (lowest index on exact fp64 ties). transformers' ImageGPT processor computes
a^2 - 2ab + b^2, which may differ only where two colours are (nearly) equally near.

Lookup table: ``lut[(r << 16) | (g << 8) | b]`` is the token of every one of the 2^24 RGB
colours (int16 for K <= 32768, else int32; 32 or 64 MiB), built by the kernel itself and
cached per palette content and device (at most ``LUT_CACHE_SIZE`` tables). Quantizing is
then one gather. Building costs about as much as quantizing ``LUT_WORK[device] / K`` pixels
directly, so with ``lut=None`` the table is built once the pixels quantized with a palette
reach that amount (a rent-or-buy rule: never more than twice the better choice's cost) and
used from then on. The CPU constant is measured (benchmarks/bench_palette.py); the CUDA one
is an unmeasured estimate.

The compiled module is ``igpt_kernels._C`` where ``pip install --no-build-isolation`` built it
for the running torch; otherwise it is compiled at first use from the sources shipped in the
package and cached per torch version (``igpt_kernels._build``; ``IGPT_NO_JIT=1`` forbids
that). Where neither works, ``"auto"`` uses the reference after one warning that says why
and what to install. ``extension_status()`` says which module runs.
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from collections import OrderedDict

import torch
from torch import Tensor

from igpt_kernels import _build, reference, trust
from igpt_kernels._dispatch import gpu_name, resolve
from igpt_kernels._seen import MISSING, SeenTensors

LUT_CACHE_SIZE = 4
# Pixel x colour work after which building the table has paid for itself (see above).
# CPU: the table builds in about the time of 2^32 direct (pixel, colour) distances.
# CUDA: unmeasured; the build is one direct pass over 2^24 colours, so 2^24 * K.
LUT_WORK = {"cpu": 1 << 32, "cuda": None}

_ext = None
_ext_error: str | None = None
_ext_status: dict | None = None
_ext_lock = threading.Lock()
_warned = False
_luts: OrderedDict = OrderedDict()  # (device, K, digest) -> {"seen": int, "lut": Tensor | None}
_verdicts: dict = {}  # _palette_key -> whether the kernel's tokens were exact there
_verified_devices: set = set()  # devices where a check passed (compile may use the kernel)
_warned_wrong = False
# What was read from a palette tensor (its content digest, that it is finite), kept while the
# same tensor is unchanged: a GPU palette is copied to the host once, not on every call.
_palettes = SeenTensors(most=4 * LUT_CACHE_SIZE)


def _load_ext():
    """The compiled module, or None with ``_ext_error`` saying why (cached, thread-safe)."""
    global _ext, _ext_error, _ext_status
    if _ext is not None or _ext_error is not None:
        return _ext  # settled: no lock, which torch.compile could not trace
    with _ext_lock:
        if _ext is None and _ext_error is None:
            _ext, _ext_status = _build.load()
            _ext_error = _ext_status["error"]
    return _ext


def extension_status() -> dict:
    """Which compiled palette module this process uses, loading (maybe compiling) it first.

    Keys: ``source`` ("prebuilt" igpt_kernels._C, "cache" or "compiled" by the run-time
    build, None without one), ``path``, ``cuda`` (whether it has the CUDA kernels),
    ``cuda_note`` (why not), ``error`` (why there is no module, and the fix), and ``summary``,
    one line for ``igpt info``.
    """
    _load_ext()
    status = dict(_ext_status) if _ext_status else {"source": None, "error": _ext_error}
    status.setdefault("cuda", False)
    if _ext is None:
        status["summary"] = f"not available, quantize uses the reference: {_ext_error}"
    else:
        kernels = "C++ and CUDA" if status["cuda"] else "C++ only"
        origin = {
            "prebuilt": "prebuilt igpt_kernels._C",
            "cache": "compiled at first use, from the cache",
            "compiled": "compiled at first use, now",
        }.get(status.get("source"), str(status.get("source")))
        status["summary"] = f"{kernels}, {origin} ({status.get('path')})"
        if status.get("cuda_note") and torch.cuda.is_available():
            status["summary"] += f"; no CUDA kernels: {status['cuda_note']}"
    return status


def compiled_unavailable(kind: str, pixels) -> str | None:
    """Why the ``kind`` ("cpu" or "cuda") kernel cannot run on ``pixels``, or None."""
    if kind == "cuda" and not pixels.is_cuda:
        return f"pixels are on {pixels.device}; the CUDA kernel needs CUDA tensors"
    if kind == "cpu" and pixels.device.type != "cpu":
        return f"pixels are on {pixels.device}; the C++ kernel needs CPU tensors"
    ext = _load_ext()
    if ext is None:
        return _ext_error
    if kind == "cuda" and not ext.has_cuda():
        note = (_ext_status or {}).get("cuda_note") or "it was built without them"
        return f"the compiled palette module has no CUDA kernels: {note}"
    return None


def _digest(palette: torch.Tensor) -> bytes:
    """The palette's content digest: a host copy on first sight of this tensor (and after
    each in-place change), a look-up later (``_seen``)."""
    digest = _palettes.get(palette)
    if digest is MISSING:
        digest = hashlib.blake2b(palette.detach().cpu().numpy().tobytes(), digest_size=16).digest()
        _palettes.put(palette, digest)
    return digest


def _check_values_once(palette: torch.Tensor) -> bool:
    """Whether the palette's values still need the finiteness check (first sight of this
    tensor, or changed since); a caller that checked them records it with
    ``_palettes.put(palette, True, "finite")``, so the GPU's values are read once."""
    return _palettes.get(palette, "finite") is MISSING


def _lut_entry(palette: torch.Tensor) -> dict:
    key = (str(palette.device), palette.shape[0], _digest(palette))
    entry = _luts.get(key)
    if entry is None:
        entry = _luts[key] = {"seen": 0, "lut": None}
        while len(_luts) > LUT_CACHE_SIZE:
            _luts.popitem(last=False)
    _luts.move_to_end(key)
    return entry


def get_lut(palette: torch.Tensor) -> torch.Tensor:
    """The (2^24,) token table of ``palette`` on its device, built once and cached.

    ``get_lut(palette)[(r << 16) | (g << 8) | b]`` is the token of colour (r, g, b); int16 when
    K <= 32768, else int32. Needs the compiled module.
    """
    first = _check_values_once(palette)
    reference.check_palette(palette, values=first)
    if first:
        _palettes.put(palette, True, "finite")
    ext = _load_ext()
    if ext is None:
        raise ValueError(f"the lookup table needs the compiled kernels: {_ext_error}")
    if palette.is_cuda and not ext.has_cuda():
        raise ValueError("the lookup table on CUDA needs igpt_kernels._C built with CUDA")
    entry = _lut_entry(palette)
    if entry["lut"] is None:
        entry["lut"] = ext.build_lut(palette.contiguous())
    return entry["lut"]


def _use_lut(palette: torch.Tensor, n: int, lut_arg) -> bool:
    if lut_arg is not None:
        return bool(lut_arg)
    entry = _lut_entry(palette)
    if entry["lut"] is not None:
        return True
    entry["seen"] += n
    work = LUT_WORK[palette.device.type]
    threshold = (1 << 24) if work is None else work // palette.shape[0]
    return entry["seen"] >= threshold


def quantize_compiled(pixels: Tensor, palette: Tensor, lut: bool | None) -> Tensor:
    """Nearest-colour tokens (...) int64 of uint8 pixels (..., 3) by the compiled kernel of
    their device (C++ or CUDA); ``lut`` as in ``quantize`` (the lookup table and its cache
    live here). Not differentiable. ``quantize_op`` is this as one custom op."""
    ext = _load_ext()
    if ext is None:
        raise ValueError(f"igpt::quantize needs the compiled kernels: {_ext_error}")
    flat = pixels.reshape(-1, 3).contiguous()
    if flat.shape[0] == 0:
        return torch.empty(pixels.shape[:-1], dtype=torch.int64, device=pixels.device)
    # the caller's tensor, not a contiguous copy, is what _seen knows from earlier calls
    if _use_lut(palette, flat.shape[0], lut):
        tokens = ext.lut_gather(flat, get_lut(palette))
    else:
        tokens = ext.quantize(flat, palette.contiguous())
    return tokens.reshape(pixels.shape[:-1])


# one node for torch.compile and torch.export
quantize_op = torch.library.custom_op("igpt::quantize", mutates_args=())(quantize_compiled)


def _run_compiled(pixels: Tensor, palette: Tensor, lut) -> Tensor:
    """The compiled kernel: called directly on plain tensors in eager mode (the op's first
    call in a process imports torch._dynamo, about 1.5 s, which a fresh worker or a
    processor's first call would otherwise pay), through ``quantize_op`` while tracing."""
    if torch.compiler.is_compiling() or type(pixels) is not Tensor or type(palette) is not Tensor:
        return quantize_op(pixels, palette, lut)
    return quantize_compiled(pixels, palette, lut)


@quantize_op.register_fake
def _(pixels, palette, lut):
    return pixels.new_empty(pixels.shape[:-1], dtype=torch.int64)


def quantize(pixels, palette, *, backend="auto", lut=None):
    """Map each RGB pixel to the index of its nearest palette colour.

    Args:
        pixels: uint8 tensor (..., 3), RGB in 0..255.
        palette: float32 (K, 3) in 0..255 RGB, 1 <= K <= 65536, finite, on pixels' device.
        backend: "auto", "cuda", "cpu" or "torch". "auto" takes the CUDA kernel for CUDA
            tensors and the C++ kernel for CPU tensors where built, else the reference. On
            a GPU "auto" checks the kernel's tokens on first use per palette (and again once
            the lookup table serves it) against exact float64 nearest colours on a sample of
            the call's pixels (up to 4096); a wrong token warns once and the reference
            quantizes with that palette from then on. While ``torch.compile`` traces, the
            kernel runs only where such a check passed on the device. A named backend runs
            as named, unchecked.
        lut: compiled backends only. True: through the cached 2^24-entry table (built now
            if missing); False: the direct kernel; None: the table once it pays off.

    Returns:
        int64 tensor (...) of palette indices, on pixels' device.
    """
    global _warned
    first = not torch.compiler.is_compiling() and _check_values_once(palette)
    reference.check_quantize(pixels, palette, values=first)
    if first:
        _palettes.put(palette, True, "finite")
    reasons = {
        "cuda": compiled_unavailable("cuda", pixels),
        "cpu": compiled_unavailable("cpu", pixels),
    }
    name = resolve("quantize", backend, reasons, ("cuda", "cpu"))
    if name == "torch":
        if backend == "auto" and not _warned:
            _warned = True
            why = reasons["cuda" if pixels.is_cuda else "cpu"]
            warnings.warn(
                f"igpt_kernels.quantize is using the slow reference: {why}",
                RuntimeWarning,
                stacklevel=2,
            )
        return reference.quantize(pixels, palette, backend="torch")
    if backend != "auto" or gpu_name(pixels.device) is None:
        return _run_compiled(pixels, palette, lut)
    return _checked(pixels, palette, lut)


def _palette_key(palette):
    """(device, K, content digest, whether its lookup table is built): what a check covers."""
    digest = _digest(palette)
    entry = _luts.get((str(palette.device), palette.shape[0], digest))
    return str(palette.device), palette.shape[0], digest, bool(entry and entry["lut"] is not None)


def _checked(pixels, palette, lut):
    """ "auto" on a GPU: the compiled kernel, checked on first use per palette (and again once
    its lookup table serves) against ``trust.exact_tokens`` on a sample of the call's pixels.
    A mismatch warns once and the reference quantizes with that palette from then on. While
    ``torch.compile`` traces, the kernel runs only where a check passed on this device."""
    global _warned_wrong
    if torch.compiler.is_compiling():
        if str(pixels.device) in _verified_devices:
            return _run_compiled(pixels, palette, lut)
        return reference.quantize(pixels, palette, backend="torch")
    if _verdicts.get(_palette_key(palette)) is False:
        return reference.quantize(pixels, palette, backend="torch")
    tokens = _run_compiled(pixels, palette, lut)
    key = _palette_key(palette)  # after the call: it may have built the lookup table
    if key in _verdicts:
        return tokens
    result = trust.check_tokens(pixels, palette, tokens)
    _verdicts[key] = result["ok"]
    if result["ok"]:
        _verified_devices.add(str(pixels.device))
        return tokens
    if not _warned_wrong:
        _warned_wrong = True
        kind = "CUDA" if pixels.is_cuda else "C++"
        warnings.warn(
            f"igpt_kernels.quantize: the {kind} kernel gave {result['wrong']} wrong token(s) "
            f"in {result['checked']} checked pixels on this device ({result['first']}); "
            "quantize uses the reference with this palette from now on. Run `igpt selftest` "
            f"and report its output; backend={'cuda' if pixels.is_cuda else 'cpu'!r} still "
            "forces the kernel.",
            RuntimeWarning,
            stacklevel=3,
        )
    return reference.quantize(pixels, palette, backend="torch")


_compiled_unavailable = compiled_unavailable  # the name tests/ and benchmarks/ still use


CLEAR_CHUNK = 1 << 15  # rows per reference call: a (rows, 32, 3) float64 temporary is 25 MiB


def clear_nearest(x, centres, best, near, near_dist, beyond, margin: float):
    """(n,) bool: whether ``centres[best]`` beats every other centre by more than ``margin``
    (float64 squared distances), proven with ``reference.neighbour_table``'s tables; the
    reference ``reference.clear_nearest`` states the rule. On the CPU the C++ check visits
    each centre's neighbours nearest first and stops as soon as the triangle inequality
    clears the rest (csrc/nearest_check.cpp): the same verdicts, as a neighbour the bound
    clears also clears the margin itself. Elsewhere, or without the compiled module, the
    reference runs, ``CLEAR_CHUNK`` rows at a time (its (rows, m, 3) float64 temporary)."""
    ext = _load_ext()
    if ext is None or x.is_cuda:
        table = near, near_dist, beyond
        return torch.cat(
            [
                reference.clear_nearest(x[s : s + CLEAR_CHUNK], centres,
                                        best[s : s + CLEAR_CHUNK], *table, margin)
                for s in range(0, len(best), CLEAR_CHUNK)
            ]
            or [torch.zeros(0, dtype=torch.bool, device=x.device)]
        )  # fmt: skip
    return ext.clear_nearest(
        x.contiguous(), centres.contiguous(), best.contiguous(), near, near_dist, beyond,
        float(margin),
    )  # fmt: skip


def dequantize(tokens, palette):
    """Map palette indices (...) of any integer dtype (uint16, the token cache's, included)
    back to uint8 RGB (..., 3), colours rounded and clamped. Ids outside [0, K) raise a
    ValueError (a check skipped while ``torch.compile`` traces)."""
    return reference.dequantize(tokens, palette)
