"""profiling/compile_check.py and compile_check_launches.py: the project's Triton kernels compile ahead of time for sm_90 (H100/H200)
with the installed triton, no GPU needed, and a kernel the GPU rejects is reported, not a crash.

The compiles run in the tool's spawned worker, without TRITON_INTERPRET (tests/conftest.py sets it
on CPU; a kernel decorated under the interpreter cannot be compiled for a GPU).
"""
from __future__ import annotations

import pytest

from profiling.compile_check import (SMEM_LIMIT_BYTES, CompileWorkers, ToolMissing, check_toolchain, judge,
                                     parse_ptxas_log, parse_resource_usage)
from profiling.compile_check_launches import KERNEL_MODULES, expand_variants, launchable_kernels, record_launches

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the check below skips with the reason
    triton = None

ARCH = 90


def _toolchain_missing():
    try:
        check_toolchain()
    except ToolMissing as err:
        return str(err)
    return None


MISSING = _toolchain_missing()
needs_nvidia_backend = pytest.mark.skipif(MISSING is not None, reason=f"no triton NVIDIA backend: {MISSING}")

if triton is not None:
    @triton.jit
    def narrow_dot_kernel(a_ptr, b_ptr, c_ptr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """C = A @ B for one tile; with BLOCK_K = 8 on 16-bit inputs NVIDIA's MMA cannot run it (the
        interpreter can: DESIGN.md, known traps)."""
        rm, rk, rn = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_K), tl.arange(0, BLOCK_N)
        a = tl.load(a_ptr + rm[:, None] * BLOCK_K + rk[None, :])
        b = tl.load(b_ptr + rk[:, None] * BLOCK_N + rn[None, :])
        tl.store(c_ptr + rm[:, None] * BLOCK_N + rn[None, :], tl.dot(a, b))


def narrow_dot_job(block_k):
    bf16 = {"tensor": "bfloat16", "aligned": True}
    return {"module": narrow_dot_kernel.fn.__module__, "attr": "narrow_dot_kernel", "kernel": "narrow_dot_kernel",
            "args": [bf16, bf16, bf16], "constexprs": {"BLOCK_M": 64, "BLOCK_K": block_k, "BLOCK_N": 64},
            "options": {"num_warps": 4}}


@pytest.fixture(scope="module")
def compile_all():
    """Compile a list of jobs in one worker (started once: its imports take seconds)."""
    workers = CompileWorkers(1, ARCH)

    def run(jobs):
        results = [None] * len(jobs)
        workers.run(jobs, lambda i, r: results.__setitem__(i, r))
        return results

    yield run
    workers.close()


@pytest.fixture(scope="module")
def launches():
    """The engine's launches at the GPU tests' shapes, bf16 (the training dtype)."""
    return record_launches(["bf16"], ["test"])


def _kernels_of_the_modules():
    import importlib
    return set().union(*(launchable_kernels(importlib.import_module(name)) for name in KERNEL_MODULES))


@needs_nvidia_backend
def test_every_kernel_of_the_kernel_modules_is_launched(launches):
    launched = {rec["kernel"] for rec in launches}
    assert launched == _kernels_of_the_modules(), "a kernel no scenario of profiling/compile_check.py launches"
    gemm = [r for r in launches if r["kernel"] == "_lora_gemm_kernel"]
    assert {r["constexprs"]["MASKED"] for r in gemm} == {False, True}  # forward and backward with dropout
    assert {r["constexprs"]["BLOCK_R"] for r in gemm} >= {16, 64, 256}  # q/k/v at rank 64: 3 * 64 -> 256
    rows = [r for r in launches if r["kernel"] == "_cross_entropy_rows_kernel"]
    assert {r["options"]["num_warps"] for r in rows} == {32}, "the CUDA branch of the launch was not taken"
    # 47 rows is below TUNE_MIN_ROWS: the autotuner keeps one config, which the check must compile
    tuned = [r for r in launches if r["configs"] is not None]
    assert tuned and all(len(r["reachable"]) == 1 for r in tuned)


@needs_nvidia_backend
def test_one_variant_of_each_kernel_compiles_for_sm90(launches, compile_all):
    variants = {}
    for variant in expand_variants(launches, all_configs=False):
        variants.setdefault(variant["kernel"], variant)
    results = compile_all(list(variants.values()))
    for (kernel, variant), result in zip(variants.items(), results):
        assert result["status"] == "compiled", f"{kernel}: {result.get('error')}"
        assert 0 <= result["shared"] <= SMEM_LIMIT_BYTES[ARCH], kernel
        assert 0 < result["regs"] <= 255, f"{kernel}: no register count parsed from ptxas' log"
        assert result["seconds"] > 0
    uses_dot = [r for k, r in zip(variants, results) if k.startswith("_lora")]
    assert all(r["shared"] > 0 for r in uses_dot), "tl.dot kernels stage their operands in shared memory"


@needs_nvidia_backend
def test_a_dot_too_narrow_for_the_gpu_is_an_error_not_a_crash(compile_all):
    narrow, wide = compile_all([narrow_dot_job(8), narrow_dot_job(16)])
    assert narrow["status"] == "error"
    assert "K >= 16" in narrow["error"], narrow["error"]
    assert wide["status"] == "compiled" and wide["shared"] > 0  # the same worker goes on


def test_ptxas_log_and_cuobjdump_usage_are_parsed():
    log = ("ptxas info    : Function properties for _lora_gemm_kernel\n"
           "    888 bytes stack frame, 1240 bytes spill stores, 1244 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 888 bytes cumulative stack size\n")
    assert parse_ptxas_log(log) == {"regs": 255, "spill_stores": 1240, "spill_loads": 1244, "stack": 888}
    usage = " Function _lora_gemm_kernel:\n  REG:168 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:680\n"
    assert parse_resource_usage(usage) == {"regs": 168, "stack": 0}
    assert parse_ptxas_log("no log") == {}


def _launch(configs, reachable):
    return {"scenario": "s", "kernel": "k", "configs": configs, "reachable": reachable}


def test_over_smem_is_pruned_only_where_the_autotuner_has_another_config():
    limit = SMEM_LIMIT_BYTES[ARCH]
    fits, too_big = {"status": "compiled", "shared": limit}, {"status": "compiled", "shared": limit + 1}
    records = [_launch([{}, {}], [0, 1]), _launch([{}, {}], [1]), _launch([{}, {}], [0, 1]), _launch(None, None)]
    variants = [{"launches": [(0, 0)]}, {"launches": [(0, 1), (1, 1)]},  # shared by a tuned and an untuned launch
                {"launches": [(2, 0)]}, {"launches": [(2, 1)]}, {"launches": [(3, None)]}]
    status, failures = judge(records, variants, [fits, too_big, too_big, too_big, fits], limit)
    # variant 1 runs alone when the prune keeps only it (launch 1): over-smem is a failure there
    assert status == ["ok", "over-smem", "over-smem", "over-smem", "ok"]
    assert [f["configs"] for f in failures] == [["over-smem"], ["over-smem", "over-smem"]]
    status, failures = judge(records[:1], [{"launches": [(0, 0)]}, {"launches": [(0, 1)]}], [fits, too_big], limit)
    assert status == ["ok", "pruned"] and failures == []
