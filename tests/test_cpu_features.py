"""Which quantization preset runs exactly on which CPU."""

from fedlite.cpu_features import bundle_saturates_here, cpu_info, host_isa, u8s8_saturates
from fedlite.export.quantize import QuantSettings

HASWELL = frozenset({"sse4_2", "avx", "avx2", "fma"})
SKYLAKE_SERVER = HASWELL | {"avx512f", "avx512bw"}
CASCADE_LAKE = SKYLAKE_SERVER | {"avx512_vnni"}
ALDER_LAKE = HASWELL | {"avx_vnni"}


def test_vnni_cpus_take_signed_weights_and_others_unsigned():
    assert [host_isa(flags, "x86_64") for flags in (HASWELL, SKYLAKE_SERVER, CASCADE_LAKE, ALDER_LAKE)] == \
        ["avx2", "avx2", "avx512_vnni", "avx512_vnni"]
    assert host_isa(frozenset({"asimd", "asimddp"}), "aarch64") == "arm64"
    assert u8s8_saturates(SKYLAKE_SERVER, "x86_64") and not u8s8_saturates(CASCADE_LAKE, "x86_64")
    assert not u8s8_saturates(frozenset(), "aarch64")


def test_only_signed_weights_on_unsigned_activations_saturate():
    vnni, avx2 = QuantSettings(isa="avx512_vnni").to_dict(), QuantSettings(isa="avx2").to_dict()
    assert bundle_saturates_here(vnni, HASWELL, "x86_64")
    assert not bundle_saturates_here(vnni, CASCADE_LAKE, "x86_64")
    assert not bundle_saturates_here(avx2, HASWELL, "x86_64")
    assert not bundle_saturates_here(None, HASWELL, "x86_64")  # an FP32 bundle


def test_cpuinfo_is_read_for_model_and_flags(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R)\nflags\t\t: fpu avx2 avx512_vnni\n\n"
                    "processor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n")
    assert cpu_info(path) == ("Intel(R) Xeon(R)", frozenset({"fpu", "avx2", "avx512_vnni"}))
