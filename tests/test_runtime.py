"""MKL code-path selection (ernie_vilg/runtime.py): decided from /proc/cpuinfo, before paddle loads."""
import subprocess
import sys

from ernie_vilg.runtime import MKL_CPU_TYPE_VAR, mkl_avx2_on_amd

AMD = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx fma avx2\n\nprocessor\t: 1\n"
INTEL = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx fma avx2 avx512f\n"
OLD_AMD = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx\n"


def test_sets_the_avx2_path_on_an_amd_cpu_with_avx2():
    env = {}
    assert mkl_avx2_on_amd(env, AMD, paddle_loaded=False)
    assert env == {MKL_CPU_TYPE_VAR: "5"}


def test_leaves_intel_old_amd_and_unknown_cpus_alone():
    for info in (INTEL, OLD_AMD, ""):
        env = {}
        assert not mkl_avx2_on_amd(env, info, paddle_loaded=False)
        assert env == {}


def test_respects_a_user_value_and_does_nothing_once_paddle_is_loaded():
    env = {MKL_CPU_TYPE_VAR: "2"}
    assert not mkl_avx2_on_amd(env, AMD, paddle_loaded=False)
    assert env[MKL_CPU_TYPE_VAR] == "2"
    env = {}
    assert not mkl_avx2_on_amd(env, AMD, paddle_loaded=True)
    assert env == {}


def test_importing_the_package_applies_the_rule_of_this_machine():
    # A fresh interpreter: the package import alone must leave the variable exactly as the rule says.
    code = ("import os, ernie_vilg.runtime as r; "
            "expected = r.mkl_avx2_on_amd({}, paddle_loaded=False); "
            f"print(expected, os.environ.get('{MKL_CPU_TYPE_VAR}'))")
    env = {k: v for k, v in __import__("os").environ.items() if k != MKL_CPU_TYPE_VAR}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    expected, value = out.stdout.split()
    assert value == ("5" if expected == "True" else "None")
