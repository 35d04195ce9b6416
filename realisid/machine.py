"""What a result was computed on: the CPU (model and the vector kernels torch runs), torch, the GPU.

The CPU matters beyond speed: torch picks its CPU kernels by the instruction set (AVX2, AVX-512), and their
floating-point rounding differs, so the same code, seed and data train a different run on another kind of CPU.
Over a 1000-step branch run the difference grows as large as a change of seed (docs/embedded.md, "Runs differ
between machines"). Every training result and benchmark header records this line, and
``benchmarks/compare_benches.py`` warns when runs it compares were trained on different ones.
"""
from __future__ import annotations

import os
import platform

import torch


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; elsewhere what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_kernels() -> str:
    """The CPU kernel level torch dispatches to (e.g. AVX2, AVX512), which decides the rounding of CPU training."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


def describe_machine(host: bool = True) -> str:
    """One line: ``[host] x86_64 2 CPUs (AMD EPYC, AVX2 kernels), torch 2.14.1, no GPU``."""
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    name = f"{platform.node()} " if host else ""
    return (f"{name}{platform.machine()} {os.cpu_count()} CPUs ({cpu_model()}, {cpu_kernels()} kernels), "
            f"torch {torch.__version__}{gpu}")
