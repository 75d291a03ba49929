"""``igpt info``: versions, devices and which backend each kernel's "auto" picks here."""

from __future__ import annotations


def add_arguments(parser) -> None:
    """Arguments of ``igpt info`` (none)."""


def rows() -> list[tuple[str, str]]:
    """(what, value) pairs: the versions, the GPU, and the backend each op runs on."""
    import platform

    import torch

    import igpt
    from igpt_kernels import palette
    from igpt_kernels._triton import HAS_TRITON

    cuda = torch.cuda.is_available()
    pixels = torch.zeros(1, 3, dtype=torch.uint8)
    cpu_quantize = palette.compiled_unavailable("cpu", pixels)
    out = [
        ("igpt", igpt.__version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("triton", "installed" if HAS_TRITON else "not installed"),
        ("gpu", torch.cuda.get_device_name() if cuda else "none"),
        ("attention, ln_mlp on CPU", "PyTorch reference"),
        ("quantize on CPU", "C++ kernel" if cpu_quantize is None else f"reference: {cpu_quantize}"),
        ("quantizer module", palette.extension_status()["summary"]),
    ]
    if cuda:
        gpu_quantize = palette.compiled_unavailable("cuda", pixels.cuda())
        gpu_ops = (
            "Triton kernels once verified per kind of call, else PyTorch's"
            if HAS_TRITON
            else "PyTorch reference (Triton missing)"
        )
        out += [
            ("attention, ln_mlp on GPU", gpu_ops),
            (
                "quantize on GPU",
                "CUDA kernel, checked against the reference on first use per palette"
                if gpu_quantize is None
                else f"reference: {gpu_quantize}",
            ),
        ]
    return out


def _verdicts(row: dict) -> str:
    """PyTorch's verdict on each candidate of one learned kind of call, in a few words."""
    parts = []
    for name, v in sorted((row.get("verdicts") or {}).items()):
        word = "verified" if v.get("ok") else "FAILED"
        ratio = ""
        if v.get("ratio") is not None:
            ratio = f" x{v['ratio']:g} of PyTorch's error in {v['tensor']}"
        parts.append(f"{name} {word}{ratio}")
    return "; ".join(parts) or "no verdicts"


def run(args) -> None:
    """``igpt info``: one ``what: value`` line each, aligned, then the choices the measured
    ``backend="auto"`` has learned on this machine's GPUs, with PyTorch's verdicts."""
    from igpt_kernels import dispatch_table
    from igpt_kernels._dispatch import DISPATCH

    learned = dispatch_table()
    failed = sum(not v.get("ok") for r in learned for v in (r.get("verdicts") or {}).values())
    table = rows() + [
        ("auto on GPU", f"{DISPATCH.mode} (IGPT_DISPATCH), {len(learned)} kinds of call learned"),
        ("auto trusts", "a kernel of ours only once PyTorch verified it on this GPU"),
    ]
    if failed:
        table.append(("failed PyTorch's check", f"{failed} (not used by auto; see below)"))
    width = max(len(k) for k, _ in table)
    for key, value in table:
        print(f"{key:>{width}}: {value}")
    for row in learned:
        chosen = row.get("backend", "(verdicts only, from igpt selftest)")
        print(f"  {row['gpu']}: {row['key']} -> {chosen} (ms {row.get('ms')}); {_verdicts(row)}")
