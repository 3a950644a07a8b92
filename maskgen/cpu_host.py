"""XLA:CPU host settings a CPU-only machine gets by default: huge pages and XLA's own convolutions.

Why huge pages: XLA:CPU allocates each executable's temporary buffer (tens to hundreds of MB
for a training step) with malloc on every call. Above glibc's mmap threshold (at most 32 MiB)
every such block is a fresh mapping, so each step faults its pages in again, 4 KiB at a time:
40k (tokenizer) and 72k (transformer) page faults per step on the default job, ~25% of the CPU
time spent in the kernel. glibc's `glibc.malloc.hugetlb=1` tunable makes malloc advise
transparent huge pages on those mappings: 2 MiB per fault, ~50x fewer faults.

Why XLA's convolutions: XLA:CPU hands convolutions to YNNPACK by default; on the tokenizer's
small 3x3 convolutions its own (Eigen) kernels are faster, so `--xla_cpu_experimental_ynn_fusion_type`
keeps YNNPACK for dots only. Measured side by side (`bench/cpu_host.py`, README "Training
step"): the default job's tokenizer step 1.43x and transformer step 1.31x faster with both.

glibc reads tunables only when a process starts, so `restart_with_cpu_settings()` starts the
interpreter again, same PID, arguments and environment plus these settings, before JAX is
imported. Nothing is changed when:
- `MASKGEN_CPU_HUGEPAGES=0` (opt out of both), or a setting is already in the environment;
- the machine has an accelerator (NVIDIA or TPU device nodes) or `JAX_PLATFORMS` names a
  platform other than cpu: these are tuned for XLA:CPU and are never the default elsewhere;
- huge pages: the C library is not glibc >= 2.35, or transparent huge pages are `never`;
- the XLA flag: jaxlib is not a version it was tested with (an unknown flag stops XLA).
"""
import glob
import importlib.metadata
import os
import platform
import sys
from typing import Mapping, Optional

TUNABLE = "glibc.malloc.hugetlb"
TUNABLE_SETTING = f"{TUNABLE}=1"
OPT_OUT = "MASKGEN_CPU_HUGEPAGES"
XLA_CONV_FLAG_NAME = "--xla_cpu_experimental_ynn_fusion_type"
XLA_CONV_FLAG = f"{XLA_CONV_FLAG_NAME}=dot,individual_dot"  # YNNPACK for dots, not convolutions
# jaxlib versions whose XLA has the flag (XLA refuses to start on a flag it does not know).
XLA_CONV_FLAG_JAXLIB = ("0.10.2",)
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
# Device nodes of accelerators JAX can use: NVIDIA GPUs, TPU v4+ (accel) and older TPUs (vfio).
_ACCELERATOR_NODES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")


def thp_mode(path: str = _THP_MODE) -> str:
    """The kernel's transparent-huge-page mode (always / madvise / never), "unknown" if unreadable."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return "unknown"
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else "unknown"


def accelerator_nodes() -> list[str]:
    """Accelerator device nodes on this machine (empty on a CPU-only host)."""
    return sorted(p for pattern in _ACCELERATOR_NODES for p in glob.glob(pattern))


def glibc_version() -> Optional[tuple[int, int]]:
    """(major, minor) of the running glibc, None for another C library."""
    name, version = platform.libc_ver()
    if name != "glibc" or not version:
        return None
    major, minor = (int(x) for x in version.split(".")[:2])
    return major, minor


def decide(environ: Mapping[str, str], thp: str, libc: Optional[tuple[int, int]],
           accelerators: list[str]) -> tuple[bool, str]:
    """(whether to turn huge pages on, why): the huge-page policy, as a pure function of the host."""
    host_ok, why = cpu_only_host(environ, accelerators)
    if not host_ok:
        return False, why
    if TUNABLE in environ.get("GLIBC_TUNABLES", ""):
        return False, f"GLIBC_TUNABLES already sets {TUNABLE}"
    if libc is None or libc < (2, 35):
        return False, "needs glibc >= 2.35"
    if thp not in ("always", "madvise"):
        return False, f"transparent huge pages are {thp!r}"
    return True, f"{TUNABLE_SETTING} (transparent huge pages: {thp})"


def decide_xla_convs(environ: Mapping[str, str], accelerators: list[str],
                     jaxlib: Optional[str]) -> tuple[bool, str]:
    """(whether to keep convolutions off YNNPACK, why)."""
    host_ok, why = cpu_only_host(environ, accelerators)
    if not host_ok:
        return False, why
    if XLA_CONV_FLAG_NAME in environ.get("XLA_FLAGS", ""):
        return False, f"XLA_FLAGS already sets {XLA_CONV_FLAG_NAME}"
    if jaxlib not in XLA_CONV_FLAG_JAXLIB:
        return False, f"jaxlib {jaxlib} is not one the flag was tested with {XLA_CONV_FLAG_JAXLIB}"
    return True, XLA_CONV_FLAG


def cpu_only_host(environ: Mapping[str, str], accelerators: list[str]) -> tuple[bool, str]:
    """Whether this process runs XLA:CPU only and has not opted out (and why not)."""
    if environ.get(OPT_OUT, "1") == "0":
        return False, f"{OPT_OUT}=0"
    platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms and platforms != ["cpu"]:
        return False, f"JAX_PLATFORMS={environ['JAX_PLATFORMS']} is not CPU-only"
    if accelerators:
        return False, f"accelerator host ({accelerators[0]}): a CPU-only setting"
    return True, "CPU-only host"


def jaxlib_version() -> Optional[str]:
    """The installed jaxlib's version, without importing it."""
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None


def with_tunable(environ: Mapping[str, str]) -> dict[str, str]:
    """A copy of `environ` whose GLIBC_TUNABLES also sets the huge-page tunable."""
    env = dict(environ)
    current = env.get("GLIBC_TUNABLES", "")
    env["GLIBC_TUNABLES"] = f"{current}:{TUNABLE_SETTING}" if current else TUNABLE_SETTING
    return env


def active() -> bool:
    """True when this process started with the huge-page tunable (run summaries and bench rows record it)."""
    return TUNABLE_SETTING in os.environ.get("GLIBC_TUNABLES", "").split(":")


def xla_convs_active() -> bool:
    """True when XLA_FLAGS keeps convolutions off YNNPACK in this process."""
    return XLA_CONV_FLAG in os.environ.get("XLA_FLAGS", "").split()


def restart_with_cpu_settings() -> None:
    """Apply the CPU-only settings the policy allows; call before importing JAX.

    The XLA flag goes into this process's XLA_FLAGS (read when the CPU backend starts); the
    huge-page tunable needs a restart: same PID, arguments and environment (plus GLIBC_TUNABLES).
    Returns only when no restart is needed.
    """
    accelerators = accelerator_nodes()
    convs, _ = decide_xla_convs(os.environ, accelerators, jaxlib_version())
    if convs:
        os.environ["XLA_FLAGS"] = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), XLA_CONV_FLAG) if f)
    hugepages, _ = decide(os.environ, thp_mode(), glibc_version(), accelerators)
    if not hugepages:
        return
    env = with_tunable(os.environ)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
