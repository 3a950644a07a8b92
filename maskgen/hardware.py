"""What machine a measurement ran on: CPU model, its widest vector ISA, and any ISA cap in force.

Benchmarks record this beside every row: the same step differs 2-3x between an
AVX-512 Sapphire Rapids and an AVX2-only Zen 3, and `--xla_cpu_max_isa` /
`ONEDNN_MAX_CPU_ISA` can make one emulate the other, so a figure without these
fields cannot be compared with another.
"""
import os
import platform
import re

# Widest first: the first ISA whose flags are all present names the machine.
_ISA_FLAGS = (
    ("AMX", ("amx_tile", "amx_bf16")),
    ("AVX512", ("avx512f", "avx512bw", "avx512vl")),
    ("AVX2", ("avx2", "fma")),
    ("AVX", ("avx",)),
    ("SSE4_2", ("sse4_2",)),
)


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def widest_isa(flags: set[str]) -> str:
    """The widest vector ISA a set of /proc/cpuinfo flags supports ("unknown" when none match)."""
    for name, needed in _ISA_FLAGS:
        if all(flag in flags for flag in needed):
            return name
    return "unknown"


def isa_cap() -> str | None:
    """The ISA limit set for XLA:CPU (and oneDNN) in this process's environment, if any."""
    match = re.search(r"--xla_cpu_max_isa=(\w+)", os.environ.get("XLA_FLAGS", ""))
    if match:
        return match.group(1).upper()
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return onednn.upper() if onednn else None


def cpu_info() -> dict:
    """{cpu_model, cpu_isa (widest the hardware has), cpu_isa_cap (None, or the emulated limit), cpu_count}."""
    text = _cpuinfo()
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    return {
        "cpu_model": model.group(1).strip() if model else platform.processor() or platform.machine(),
        "cpu_isa": widest_isa(set(flags.group(1).split())) if flags else "unknown",
        "cpu_isa_cap": isa_cap(),
        "cpu_count": os.cpu_count(),
    }
