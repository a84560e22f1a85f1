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


# The builds of one arch, in SHARDS interleaved parts (aot.py --shard): separate tests that
# the suite's workers share, so that no single long test holds the suite's end.
SHARDS = 3


_BUILD_LIST = """
import json
from cbam_fused import aot
builds = aot.launch_configs()
print(json.dumps(dict(count=len(builds), ones=sum(bool(b.ones) for b in builds),
                      unaligned=sorted({"+".join(b.unaligned) for b in builds}),
                      row_aligned=sum(dict(b.constexprs).get("ROW_ALIGN") == 4
                                      for b in builds))))
"""


def _compiler_env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_build_list_has_the_special_cases():
    """The configurations to build include integers equal to 1, every kind of unaligned
    launch and the NCHW row hint (what the sharded compile tests below then build). In a
    subprocess: the build list reads the kernels' parameters, which the interpreter's
    functions do not have."""
    proc = subprocess.run([sys.executable, "-c", _BUILD_LIST], env=_compiler_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["count"] > 1000 and info["ones"] > 0 and info["row_aligned"] > 0
    assert {"", "ints", "ptrs", "ints+ptrs"} <= set(info["unaligned"])


@pytest.mark.parametrize("shard", range(SHARDS))
@pytest.mark.parametrize("arch", [80, 90])
def test_all_configs_compile_without_spills(arch, shard, tmp_path):
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "cbam_fused.aot", "--arch", str(arch),
                           "--workers", "1", "--shard", f"{shard}/{SHARDS}", "--json", str(out)],
                          env=_compiler_env(), capture_output=True, text=True, timeout=900)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = json.loads(out.read_text())
    assert len(reports) > 1000 // SHARDS  # one report per build, errors included
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
