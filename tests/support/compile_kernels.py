"""Compile every Triton kernel for an NVIDIA architecture without a GPU (run as a script, not under
TRITON_INTERPRET): catches what the interpreter cannot (unsupported ops, layouts, shared memory).

    python tests/support/compile_kernels.py 90     # one line per kernel: registers per thread, spills
"""

import os
import subprocess
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from blackmamba.ops.triton import moe as triton_moe
from blackmamba.ops.triton import norm as triton_norm
from blackmamba.ops.triton import scan as triton_scan
from blackmamba.ops.triton import step as triton_step

MODULES = (triton_moe, triton_norm, triton_scan, triton_step)

BF, F32, I64 = "*bf16", "*fp32", "*i64"


UNIT_STRIDES = {"sx_d", "sdt_d", "sz_d", "sB_n", "sC_n", "sA_n", "sy_d", "sdy_d", "ss_n", "sst_k", "sw_k"}


def compile_one(fn, pointer_types: dict, constexprs: dict, num_warps: int, arch: int):
    """Compile as a launch on realistic shapes would specialise it: unit strides become the constant 1,
    pointers and the other integers (sizes, strides: multiples of 16 on the released models) are
    marked 16-divisible, which is what lets Triton vectorise the loads."""
    constexprs = dict(constexprs)
    constexprs.update({name: 1 for name in fn.arg_names if name in UNIT_STRIDES})
    signature = {name: "constexpr" if name in constexprs else pointer_types.get(name, "i32") for name in fn.arg_names}
    positions = {(fn.arg_names.index(name),): value for name, value in constexprs.items()}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if signature[name] != "constexpr" and signature[name] != "fp32"}
    src = ASTSource(fn=fn, signature=signature, constexprs=positions, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def resource_usage(kernel) -> str:
    """Registers and spill (stack) bytes per thread, from the cubin via the bundled cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return "(no cuobjdump)"
    path = f"/tmp/blackmamba_kernel_{os.getpid()}.cubin"
    with open(path, "wb") as f:
        f.write(kernel.asm["cubin"])
    out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    os.remove(path)
    fields = dict(f.split(":") for line in out.splitlines() if "REG:" in line for f in line.split() if ":" in f)
    return f"registers {fields.get('REG')}, spill stack {fields.get('STACK')} bytes"


def kernels():
    """(name, kernel, pointer dtypes, constexprs, num_warps) as the launchers use them on bf16 models."""
    ts, st, tm = triton_scan, triton_step, triton_moe
    fwd = dict(x_ptr=BF, dt_ptr=F32, A_ptr=F32, B_ptr=BF, C_ptr=BF, D_ptr=F32, z_ptr=BF, h0_ptr=F32,
               y_ptr=BF, hT_ptr=F32, ck_ptr=F32)
    bwd = dict(x_ptr=BF, dt_ptr=F32, A_ptr=F32, B_ptr=BF, C_ptr=BF, D_ptr=F32, z_ptr=BF, dy_ptr=BF, dhT_ptr=F32,
               ck_ptr=F32, dx_ptr=BF, ddt_ptr=F32, dz_ptr=BF, dB_ptr=F32, dC_ptr=F32, dA_ptr=F32, dD_ptr=F32,
               dh0_ptr=F32)
    for bd in (16, 8):
        yield (f"scan forward BD={bd}", ts._scan_fwd_kernel, fwd,
               dict(HAS_D=True, HAS_Z=True, HAS_H0=True, SAVE_CK=True, T=ts.CHUNK, BD=bd, BN=16), ts.NUM_WARPS)
    yield ("scan backward BD=8", ts._scan_bwd_kernel, bwd,
           dict(HAS_D=True, HAS_Z=True, HAS_DHT=True, HAS_H0=True, T=ts.CHUNK, BD=8, BN=16), ts.NUM_WARPS)
    yield ("ssm update", st._ssm_update_kernel,
           dict(s_ptr=F32, x_ptr=BF, dt_ptr=BF, A_ptr=F32, B_ptr=BF, C_ptr=BF, D_ptr=F32, z_ptr=BF, dtb_ptr=BF, y_ptr=BF),
           dict(HAS_D=True, HAS_Z=True, HAS_DT_BIAS=True, SOFTPLUS=True, BD=st.BLOCK_D, BN=16), 4)
    yield ("conv update", st._conv_update_kernel, dict(st_ptr=BF, x_ptr=BF, w_ptr=F32, bias_ptr=F32, y_ptr=BF),
           dict(HAS_BIAS=True, SILU=True, BD=st.BLOCK_D, BK=4), 4)
    yield ("expert fc1", tm._fc1_kernel, dict(x_ptr=BF, idx_ptr=I64, tab_ptr=I64, out_ptr=BF),
           dict(W_DTYPE=tl.bfloat16, ALIGNED=True, GELU=False, BR=tm.BLOCK_ROWS, BK=tm.BLOCK_K), 4)
    yield ("router top-1", tm._router_kernel, dict(x_ptr=BF, w_ptr=BF, b_ptr=BF, gate_ptr=BF, idx_ptr=I64),
           dict(BE=8, BK=512), 4)
    yield ("add + rmsnorm", triton_norm._add_rmsnorm_kernel,
           dict(h_ptr=BF, res_ptr=F32, w_ptr=BF, out_ptr=BF, res_out_ptr=F32, eps="fp32"),
           dict(HAS_RES=True, BH=2048), 4)
    yield ("expert fc2", tm._fc2_kernel, dict(a_ptr=BF, idx_ptr=I64, gate_ptr=BF, tab_ptr=I64, out_ptr=BF),
           dict(W_DTYPE=tl.bfloat16, ALIGNED=True, BR=tm.BLOCK_ROWS, BK=tm.BLOCK_K), 4)


def main(arch: int) -> int:
    """Compile every kernel; print one line each, then the ``@triton.jit`` kernels of the modules not compiled."""
    compiled = set()
    for name, fn, ptrs, constexprs, warps in kernels():
        kernel = compile_one(fn, ptrs, constexprs, warps, arch)
        compiled.add(fn.fn.__qualname__)
        print(f"sm_{arch} {name}: {resource_usage(kernel)}", flush=True)
    defined = {f"{m.__name__}.{name}" for m in MODULES for name, obj in vars(m).items()
               if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel")}
    names = {f"{m.__name__}.{n}" for m in MODULES for n in vars(m) if n in compiled}
    print("not compiled:", " ".join(sorted(defined - names)) or "none")
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
