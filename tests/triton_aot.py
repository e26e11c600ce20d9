"""Compile every Triton kernel ahead of time for sm_80 and sm_90, no GPU needed.

    python tests/triton_aot.py 80 90     # prints one JSON line per kernel variant

For each variant: its dtypes, registers and spill bytes from Triton's bundled
``ptxas -v``, the global load/store widths found in the SASS (``cuobjdump -sass``),
and how its bf16 stores round (NOTE [bf16 bits] in largedet_kernels/triton_kernels.py):
the elements the PTX's cvt converts, the SASS's conversions, and the constants of
the integer spelling, 0x7FFF (to nearest) and 0x7FC0 (a NaN).
Runs in its own process: the kernels must not be imported under
TRITON_INTERPRET=1, which tests/conftest.py sets.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from largedet_kernels import triton_kernels as k
from largedet_kernels.backends import triton as backend

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
DTYPES = {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16, "fp64": tl.float64}
# name: (parameter, gradient, moment dtype, fp32 masters). One per parameter dtype with gradients and moments
# of its own (bf16 without masters is the pass 2 that may round stochastically), then two of mixed precision
# (NOTE [master weights] in largedet_kernels/optimizer.py), of which only the two passes differ.
VARIANTS = {
    "fp32": ("fp32", "fp32", "fp32", False),
    "fp16": ("fp16", "fp16", "fp32", False),
    "bf16": ("bf16", "bf16", "fp32", False),
    "fp64": ("fp64", "fp64", "fp64", False),
    "bf16+master": ("bf16", "fp32", "fp32", True),
    "bf16+master+bf16m": ("bf16", "bf16", "bf16", True),
}


def _signature(fn, pointer_types, scalars, constexprs):
    sig = {}
    for name in fn.arg_names:
        sig[name] = "constexpr" if name in constexprs else scalars.get(name) or pointer_types[name]
    return sig


def variants():
    for variant, (x, g, moments, masters) in VARIANTS.items():
        math_ = "fp64" if x == "fp64" else "fp32"
        common = dict(ptrs="*i64", numels="*i64", chunk_tensor="*i32", chunk_index="*i32", first_chunk="*i32",
                      chunk_count="*i32", hyper="*fp64", grad_factor="*fp32", found_inf="*fp32",
                      partials=f"*{math_}", t_now=f"*{math_}", sums=f"*{math_}", records=f"*{math_}")  # fmt: skip
        consts = dict(X_DTYPE=DTYPES[x], G_DTYPE=DTYPES[g], M_DTYPE=DTYPES[moments], MATH=DTYPES[math_],
                      HAS_MASTER=masters, CHUNK=backend.CHUNK, BLOCK=backend.BLOCK,
                      REDUCE_BLOCK=backend.REDUCE_BLOCK, RECORD=False)  # fmt: skip
        kernels = [k.pmd_lamb_moments_kernel, k.pmd_lamb_update_kernel]
        if variant in DTYPES:
            kernels.append(k.grad_sumsq_kernel)
        if variant in ("fp32", "fp64"):  # it sees only the math type
            kernels.append(k.tensor_sums_kernel)
        stored = dict(x=x, g=g, moments=moments, masters=masters)
        for fn in kernels:
            c = {name: v for name, v in consts.items() if name in fn.arg_names}
            yield f"{fn.__name__}[{variant}]", fn, _signature(fn, common, {"n_tensors": "i32"}, c), c, stored


def compile_variant(fn, signature, constexprs, arch: int, tmp: Path) -> dict:
    pointers = [i for i, name in enumerate(fn.arg_names) if signature[name].startswith("*")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in pointers}  # as Triton's JIT specialises torch tensors
    compiled = triton.compile(
        ASTSource(fn, signature, constexprs, attrs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": backend.NUM_WARPS},
    )
    ptx, cubin = tmp / "k.ptx", tmp / "k.cubin"
    ptx.write_text(compiled.asm["ptx"])
    cubin.write_bytes(compiled.asm["cubin"])
    ptx_target = re.search(r"^\.target\s+(\S+)", compiled.asm["ptx"], re.M).group(1)
    ptxas = subprocess.run([BIN / "ptxas", "-v", f"-arch={ptx_target}", ptx, "-o", tmp / "v.cubin"],
                           capture_output=True, text=True, check=True).stderr  # fmt: skip
    sass = subprocess.run([BIN / "cuobjdump", "-sass", cubin], capture_output=True, text=True, check=True).stdout
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", ptxas)]
    cvt = re.findall(r"\bcvt\.rn\.bf16(x2)?\.f32\b", compiled.asm["ptx"])
    return {
        "arch": ptx_target,
        "registers": int(re.search(r"Used (\d+) registers", ptxas).group(1)),
        "spill_bytes": sum(spills),
        "ldg128": len(re.findall(r"\bLDG\.E(?:\.EF)?(?:\.EL)?\.128\b", sass)),
        "stg128": len(re.findall(r"\bSTG\.E(?:\.EF)?\.128\b", sass)),
        "ldg": len(re.findall(r"\bLDG\.", sass)),
        "cvt_bf16": sum(2 if pair else 1 for pair in cvt),
        "f2f_bf16": len(re.findall(r"\bF2FP?\.BF16\b", sass)),
        "nearest_addend": len(re.findall(r"\b(?:32767|0x7FFF)\b", compiled.asm["ptx"], re.I)),
        "quiet_nan": len(re.findall(r"\b(?:32704|0x7FC0)\b", compiled.asm["ptx"], re.I)),
    }


def main(archs):
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            for name, fn, signature, constexprs, stored in variants():
                result = compile_variant(fn, signature, constexprs, arch, Path(tmp))
                print(json.dumps({"kernel": name, **stored, **result}), flush=True)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "compile with the interpreter off"
    main([int(a) for a in sys.argv[1:]] or [80, 90])
