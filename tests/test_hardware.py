"""maskgen.hardware: the CPU fields every benchmark row carries."""
import os

from maskgen import hardware


def test_widest_isa_ranks_flag_sets():
    assert hardware.widest_isa({"avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl"}) == "AVX512"
    assert hardware.widest_isa({"avx", "avx2", "fma", "sse4_2"}) == "AVX2"  # Zen 3
    assert hardware.widest_isa({"avx2"}) == "unknown"  # AVX2 without FMA/AVX is not a real machine
    assert hardware.widest_isa({"avx", "sse4_2"}) == "AVX"
    assert hardware.widest_isa(set()) == "unknown"


def test_isa_cap_reads_xla_and_onednn_limits(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_cpu_max_isa=avx2")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert hardware.isa_cap() == "AVX2"
    monkeypatch.setenv("XLA_FLAGS", "")
    assert hardware.isa_cap() is None
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert hardware.isa_cap() == "AVX2"


def test_cpu_info_names_this_machine():
    info = hardware.cpu_info()
    assert set(info) == {"cpu_model", "cpu_uarch", "cpu_isa", "cpu_isa_cap", "cpu_count", "cpu_hugepages",
                         "cpu_xla_convs"}
    assert info["cpu_model"] and info["cpu_count"] >= 1
    # The host settings are read from this process's environment (maskgen.cpu_host).
    assert info["cpu_hugepages"] == ("glibc.malloc.hugetlb=1" in os.environ.get("GLIBC_TUNABLES", "").split(":"))
    assert info["cpu_xla_convs"] == ("--xla_cpu_experimental_ynn_fusion_type=dot,individual_dot"
                                     in os.environ.get("XLA_FLAGS", "").split())


def test_microarchitecture_tells_apart_cpus_with_one_model_name():
    # All three report "AMD EPYC" on the clouds these benchmarks ran on.
    assert hardware.microarchitecture("AuthenticAMD", 25, 0x01) == "Zen 3"
    assert hardware.microarchitecture("AuthenticAMD", 25, 0x11) == "Zen 4"
    assert hardware.microarchitecture("AuthenticAMD", 26, 0x02) == "Zen 5"
    assert hardware.microarchitecture("GenuineIntel", 6, 0x8F) == "Sapphire Rapids"
    assert hardware.microarchitecture("GenuineIntel", 6, 0x8F + 1) == "unknown"
    assert hardware.microarchitecture("AuthenticAMD", 6, 0x8F) == "unknown"  # vendor matters
