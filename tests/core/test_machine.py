from ampq_pass.core.machine import cpu_flags, cpu_name

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx2 fma
processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx2 fma avx512_vnni
"""


def test_the_first_cpus_name_and_flags_are_read(tmp_path):
    p = tmp_path / "cpuinfo"
    p.write_text(CPUINFO)
    assert cpu_name(str(p)) == "AMD EPYC 7B13"
    assert cpu_flags(str(p)) == {"fpu", "sse2", "avx2", "fma"}


def test_a_file_without_flags_or_no_file_gives_none_and_a_name_from_platform(tmp_path):
    p = tmp_path / "cpuinfo"
    p.write_text("processor\t: 0\nFeatures\t: fp asimd\n")  # ARM
    assert cpu_flags(str(p)) is None
    assert cpu_flags(str(tmp_path / "absent")) is None
    assert cpu_name(str(p)) and cpu_name(str(tmp_path / "absent"))
