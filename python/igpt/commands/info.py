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
    cpu_quantize = palette._compiled_unavailable("cpu", pixels)
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
        gpu_quantize = palette._compiled_unavailable("cuda", pixels.cuda())
        gpu_ops = "Triton kernels" if HAS_TRITON else "PyTorch reference (Triton missing)"
        out += [
            ("attention, ln_mlp on GPU", gpu_ops),
            (
                "quantize on GPU",
                "CUDA kernel" if gpu_quantize is None else f"reference: {gpu_quantize}",
            ),
        ]
    return out


def run(args) -> None:
    """``igpt info``: one ``what: value`` line each, aligned, then the choices the measured
    ``backend="auto"`` has learned on this machine's GPUs."""
    from igpt_kernels import dispatch_table
    from igpt_kernels._dispatch import DISPATCH

    learned = dispatch_table()
    table = rows() + [("auto on GPU", f"{DISPATCH.mode} (IGPT_DISPATCH), {len(learned)} learned")]
    width = max(len(k) for k, _ in table)
    for key, value in table:
        print(f"{key:>{width}}: {value}")
    for row in learned:
        print(f"  {row['gpu']}: {row['key']} -> {row['backend']} (ms {row.get('ms')})")
