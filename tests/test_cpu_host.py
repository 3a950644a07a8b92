"""maskgen.cpu_host: when huge pages are turned on, and that they take XLA:CPU's per-call page faults away."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from maskgen import cpu_host

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = (2, 36)


def test_turned_on_only_on_a_cpu_only_glibc_host_with_huge_pages():
    on, why = cpu_host.decide({}, "madvise", GLIBC, [])
    assert on and "glibc.malloc.hugetlb=1" in why
    assert cpu_host.decide({"JAX_PLATFORMS": "cpu"}, "always", GLIBC, [])[0]
    cases = {
        "MASKGEN_CPU_HUGEPAGES=0": ({"MASKGEN_CPU_HUGEPAGES": "0"}, "madvise", GLIBC, []),
        "already sets": ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", GLIBC, []),
        "not CPU-only": ({"JAX_PLATFORMS": "cuda,cpu"}, "madvise", GLIBC, []),
        "accelerator host (/dev/nvidia0)": ({}, "madvise", GLIBC, ["/dev/nvidia0"]),
        "accelerator host (/dev/accel0)": ({}, "madvise", GLIBC, ["/dev/accel0"]),
        "glibc >= 2.35": ({}, "madvise", (2, 31), []),
        "glibc >= 2.35 ": ({}, "madvise", None, []),  # musl
        "'never'": ({}, "never", GLIBC, []),
    }
    for expected, args in cases.items():
        on, why = cpu_host.decide(*args)
        assert not on and expected.strip() in why, (expected, why)


def test_convolutions_leave_ynnpack_only_on_cpu_only_hosts_with_a_tested_jaxlib():
    on, flag = cpu_host.decide_xla_convs({}, [], "0.10.2")
    assert on and flag == "--xla_cpu_experimental_ynn_fusion_type=dot,individual_dot"
    cases = {
        "MASKGEN_CPU_HUGEPAGES=0": ({"MASKGEN_CPU_HUGEPAGES": "0"}, [], "0.10.2"),
        "already sets": ({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}, [], "0.10.2"),
        "not CPU-only": ({"JAX_PLATFORMS": "tpu"}, [], "0.10.2"),
        "accelerator host": ({}, ["/dev/vfio/0"], "0.10.2"),
        "tested with": ({}, [], "0.11.0"),  # a jaxlib whose XLA may not know the flag
    }
    for expected, args in cases.items():
        on, why = cpu_host.decide_xla_convs(*args)
        assert not on and expected in why, (expected, why)


def test_the_tunable_is_added_to_existing_tunables():
    assert cpu_host.with_tunable({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    env = cpu_host.with_tunable({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    # After the restart the policy says no: the process cannot restart itself twice.
    assert not cpu_host.decide(env, "madvise", GLIBC, [])[0]


def test_thp_mode_reads_the_bracketed_setting(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert cpu_host.thp_mode(str(path)) == "madvise"
    assert cpu_host.thp_mode(str(tmp_path / "missing")) == "unknown"


# A process that restarts itself as train.py does, then counts the page faults of a jitted call whose
# 64 MiB result buffer is above glibc's mmap threshold (a fresh mapping on every call).
_PROBE = textwrap.dedent("""
    import json, os, resource, sys
    pid = os.environ.setdefault("PROBE_FIRST_PID", str(os.getpid()))
    sys.path.insert(0, {repo!r})
    from maskgen import cpu_host
    cpu_host.restart_with_cpu_settings()
    import jax, jax.numpy as jnp
    f = jax.jit(lambda a, b: (a @ b) * 2.0)
    a, b = jnp.ones((8192, 64), jnp.float32), jnp.ones((64, 2048), jnp.float32)
    f(a, b).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        out = f(a, b).block_until_ready()
        del out
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
    print(json.dumps(dict(same_pid=pid == str(os.getpid()), active=cpu_host.active(), faults=faults,
                          convs=cpu_host.xla_convs_active())))
""")


def _probe(**env):
    code = _PROBE.format(repo=REPO)
    full_env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MASKGEN_CPU_HUGEPAGES",
                                                                "PROBE_FIRST_PID")}
    out = subprocess.run([sys.executable, "-c", code], env=dict(full_env, **env), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_restart_turns_huge_pages_on_and_removes_the_page_faults():
    expected, why = cpu_host.decide({k: v for k, v in os.environ.items() if k != "MASKGEN_CPU_HUGEPAGES"},
                                    cpu_host.thp_mode(), cpu_host.glibc_version(), cpu_host.accelerator_nodes())
    if not expected:
        pytest.skip(f"this host does not get huge pages ({why}); the policy is tested above")
    off = _probe(MASKGEN_CPU_HUGEPAGES="0")
    on = _probe()
    assert on["same_pid"] and on["active"] and not off["active"]
    assert on["convs"] == cpu_host.decide_xla_convs({}, [], cpu_host.jaxlib_version())[0] and not off["convs"]
    pages = 8192 * 2048 * 4 // 4096  # the result buffer in 4 KiB pages
    if cpu_host.thp_mode() == "madvise":  # with "always" the kernel already maps it with huge pages
        assert off["faults"] > pages / 2, off
    assert on["faults"] < pages / 20, (on, off)
