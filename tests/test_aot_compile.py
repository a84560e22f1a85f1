"""Every kernel configuration the launchers can pick compiles for sm_80 and sm_90 with no
register spills, reads/writes the contiguous dimension 16 bytes at a time, and
software-pipelines the loops that walk weights or a split of the big tensor. That
includes the builds a launch gets when an integer argument equals 1 (C = 1, H*W = 1,
one block, one split), which the compiler turns into a constant, and the unaligned
ones: sizes not divisible by 16 (H*W = 49 or 196), pointers off a 16-byte boundary
(aot._unaligned), which must compile spill-free with the register budget the launchers
give them (plan.big_pass_options), but have no 16-byte access to assert.

Builds run in a subprocess: the rest of the suite imports triton with TRITON_INTERPRET=1,
and interpreted kernels cannot be compiled.
"""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("CBAM_TEST_DEVICE", "cpu") != "cpu",
    reason="ahead-of-time builds need no GPU and run in the CPU suite (make test); the CUDA "
           "run compiles every launch it makes for real")

# Kernels whose loops are software-pipelined (tl.range num_stages, kernels/plane.py STAGES):
# their loads must come out as cp.async, or each loop step waits a full memory round trip.
PIPELINED_KERNELS = ("_channel_gate_fwd_kernel", "_channel_gate_fwd_blocks_kernel",
                     "_channel_gate_bwd_blocks_kernel", "_channel_gate_bwd_kernel",
                     "_pool_stats_kernel",
                     "_bwd_gate_sums_kernel", "_bwd_spatial_pool_kernel",
                     "_spatial_gate_fwd_kernel", "_bwd_input_kernel", "_gate_apply_kernel",
                     "_weight_grads_kernel")
B3_KERNELS = ("_bwd_input_kernel", "_bwd_input_rows_kernel")
BIG_TENSOR_KERNELS = ("_pool_stats_kernel", "_gate_apply_kernel", "_bwd_gate_sums_kernel",
                      "_bwd_spatial_pool_kernel")


def _warp_of_vectors(name: str) -> bool:
    """A build of B3 by rows whose block is a warp of 16-byte vectors (plan.b3_rows;
    narrower blocks give each thread fewer than 16 bytes)."""
    if not name.startswith("_bwd_input_rows_kernel["):
        return False
    width = {"fp16": 256, "bf16": 256, "fp32": 128}.get(name.split("[")[1].split("|")[0])
    return f"BLOCK_K={width}," in name


@pytest.mark.parametrize("arch", [80, 90])
def test_all_configs_compile_without_spills(arch, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "cbam_fused.aot", "--arch", str(arch),
                           "--workers", "1", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = json.loads(out.read_text())
    assert len(reports) > 100
    assert any(r.get("ones") for r in reports), "no build with integer arguments equal to 1"
    for odd in (["ints"], ["ptrs"], ["ints", "ptrs"]):
        assert any(r.get("unaligned") == odd for r in reports), f"no build unaligned in {odd}"
    errors = [r for r in reports if "error" in r]
    assert not errors, errors[:3]
    spills = [r["name"] for r in reports if r["spill_stores"] or r["spill_loads"]]
    assert not spills, spills
    # 64-bit addressing: no pointer offset into a big tensor (x, g, out, dx: > 2**31
    # elements is real) is 32-bit. The small-map kernels index weights and per-sample rows
    # from 64-bit sample bases; their 32-bit offsets stay inside one sample's row or one
    # weight, far below 2**31.
    narrow = [r["name"] for r in reports if r["i32_offsets"]
              and r["name"].split("[")[0] in BIG_TENSOR_KERNELS + B3_KERNELS]
    assert not narrow, narrow
    # 16-byte vector accesses on the big tensor: v4 of 32-bit words (fp64 uses v2.f64,
    # which the report does not count, so it is left out here). Builds with a dimension
    # of 1 have no contiguous run to vectorize.
    for r in reports:
        if r["ones"] or r["unaligned"]:
            continue
        kernel = r["name"].split("[")[0]
        if ((kernel in BIG_TENSOR_KERNELS or _warp_of_vectors(r["name"]))
                and "fp64" not in r["name"]):
            assert r["v4_loads"] >= 1, f"{r['name']}: no 16-byte loads"
        if (kernel in PIPELINED_KERNELS and "NUM_STAGES=1" not in r["name"]
                and "LOOP=False" not in r["name"]):
            assert r["cp_async"] >= 1, f"{r['name']}: loop loads not pipelined (no cp.async)"
        if kernel == "_gate_apply_kernel" and "fp64" not in r["name"]:
            assert r["v4_stores"] >= 1, f"{r['name']}: no 16-byte stores"
