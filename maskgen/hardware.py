"""What machine a measurement ran on: CPU model, its widest vector ISA, and any ISA cap in force.

Benchmarks record this beside every row: the same step differs 2-3x between an
AVX-512 Sapphire Rapids and an AVX2-only Zen 3, so a figure without these fields
cannot be compared with another. `--xla_cpu_max_isa` / `ONEDNN_MAX_CPU_ISA` caps
are recorded too, but they do not emulate a narrower machine: they reach XLA's own
generated code and oneDNN, not the YNNPACK kernels XLA:CPU runs its dots and
convolutions with, which pick their ISA from cpuid (README, "Training step").
"""
import os
import platform
import re

from maskgen import cpu_host

# Widest first: the first ISA whose flags are all present names the machine.
_ISA_FLAGS = (
    ("AMX", ("amx_tile", "amx_bf16")),
    ("AVX512", ("avx512f", "avx512bw", "avx512vl")),
    ("AVX2", ("avx2", "fma")),
    ("AVX", ("avx",)),
    ("SSE4_2", ("sse4_2",)),
)


# (vendor, family, model range) -> core microarchitecture. Cloud CPUs often report only "AMD EPYC"
# as their model name, which covers a Zen 3 (AVX2, 256-bit FMA) and a Zen 5 (full-width AVX-512)
# that differ ~3x on the same step; family and model tell them apart.
_UARCH = (
    ("AuthenticAMD", 25, range(0x00, 0x10), "Zen 3"), ("AuthenticAMD", 25, range(0x20, 0x60), "Zen 3"),
    ("AuthenticAMD", 25, range(0x10, 0x20), "Zen 4"), ("AuthenticAMD", 25, range(0x60, 0x80), "Zen 4"),
    ("AuthenticAMD", 25, range(0xA0, 0xB0), "Zen 4"), ("AuthenticAMD", 26, range(0x00, 0x100), "Zen 5"),
    ("AuthenticAMD", 23, range(0x30, 0x40), "Zen 2"), ("AuthenticAMD", 23, range(0x00, 0x30), "Zen / Zen+"),
    ("GenuineIntel", 6, range(0x55, 0x56), "Skylake-SP / Cascade Lake"),
    ("GenuineIntel", 6, range(0x6A, 0x6B), "Ice Lake-SP"),
    ("GenuineIntel", 6, range(0x8F, 0x90), "Sapphire Rapids"),
    ("GenuineIntel", 6, range(0xCF, 0xD0), "Emerald Rapids"),
    ("GenuineIntel", 6, range(0xAD, 0xAF), "Granite Rapids"),
)


def microarchitecture(vendor: str, family: int, model: int) -> str:
    """Core generation for a /proc/cpuinfo vendor, family and model ("unknown" outside the table)."""
    for v, f, models, name in _UARCH:
        if vendor == v and family == f and model in models:
            return name
    return "unknown"


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
    """{cpu_model, cpu_uarch, cpu_isa (widest the hardware has), cpu_isa_cap (None or the cap set), cpu_count,
    cpu_hugepages, cpu_xla_convs (`maskgen.cpu_host`'s settings, on in this process or not)}."""
    text = _cpuinfo()

    def field(name: str) -> str | None:
        found = re.search(rf"^{name}\s*:\s*(.+)$", text, re.M)
        return found.group(1).strip() if found else None

    model, flags, vendor = field("model name"), field("flags"), field("vendor_id")
    family, number = field("cpu family"), field("model")
    uarch = "unknown"
    if vendor and family and number and family.isdigit() and number.isdigit():
        uarch = microarchitecture(vendor, int(family), int(number))
    return {
        "cpu_model": model or platform.processor() or platform.machine(),
        "cpu_uarch": uarch,
        "cpu_isa": widest_isa(set(flags.split())) if flags else "unknown",
        "cpu_isa_cap": isa_cap(),
        "cpu_count": os.cpu_count(),
        "cpu_hugepages": cpu_host.active(),
        "cpu_xla_convs": cpu_host.xla_convs_active(),
    }
