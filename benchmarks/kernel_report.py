"""Compile every Triton attention variant the Engine can launch for each GPU target, with no GPU.

    python benchmarks/kernel_report.py [--targets 61,75,80,86,89,90] [--json OUT] [--ci] [--no-docs]

Each variant goes through ``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cc,
32))``. Shared memory comes from the compiled metadata; registers, stack and spill bytes from ``ptxas -v`` on
the compiled PTX (the ptxas shipped in Triton's backends/nvidia/bin, the one Triton itself runs); resident
blocks per SM from the target's limits (``TARGET_LIMITS`` in rmt_fast.kernels.targets). The ``.cu``
kernels go through ``nvcc -Xptxas -v`` for each target the installed nvcc supports. The table is written into
docs/KERNELS.md between the generated-section markers.

--ci compiles only the default config (key lengths on, the worst case) of each dtype and head_dim per target,
and exits 1 on a compile error, a spill at head_dim <= 128 in float16/bfloat16 on a tensor-core target, or
shared memory over the target's limit (tests/test_kernel_report.py runs it). Must run without
TRITON_INTERPRET: the kernel has to be a compiled ``triton.jit`` function.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from rmt_fast import files

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
HEAD_DIMS = (32, 64, 128)
TARGETS = (61, 75, 80, 86, 89, 90)
TK = 522               # an uneven key length (Tk % 64 != 0: an input_size off the block grid) for the tail variant
TQ_SUBSET = 11         # the last layer's read rows: [CLS] + 10 memory
BEGIN, END = "<!-- kernel-report:begin -->", "<!-- kernel-report:end -->"
_POINTERS = ("Q", "K", "V", "KL", "Out")
_DIVISIBLE = _POINTERS + ("stride_qb", "stride_qt", "stride_kb", "stride_kt", "stride_vb", "stride_vt",
                          "stride_ob", "stride_ot")


def dtypes_for(cc: int):
    return ("fp32", "fp16") if cc < 80 else ("fp32", "fp16", "bf16")   # no bf16 before sm_80


def variants(cc: int, dtype: str, head_dim: int, ci: bool, autotune: bool = False):
    """(label, config tuple, constexpr flags) for one target/dtype/head_dim; config = (BM, BN, warps, stages)."""
    import torch
    from rmt_fast.kernels import attention as A

    tdt = getattr(torch, DTYPES[dtype])
    masked = dict(HAS_KL=True, EVEN_M=False, EVEN_N=False)
    big = 10 ** 4  # batch * heads: enough programs that the default keeps its full BLOCK_M

    def cfg(d):
        return (d["BLOCK_M"], d["BLOCK_N"], d["num_warps"], d["num_stages"])

    long_default = cfg(A._default_config(TK, big, head_dim, None, tdt, cc))
    out = [("default, key lengths", long_default, masked)]
    if ci:
        return out
    before = cfg(A._default_config(TK, big, head_dim, None, tdt, None))   # the shape-only default of before
    short_default = cfg(A._default_config(TQ_SUBSET, big, head_dim, None, tdt, cc))
    out += [("default, no mask, Tk % BLOCK_N != 0", long_default, dict(HAS_KL=False, EVEN_M=False, EVEN_N=False)),
            ("default, no mask, even (Tk = 512)", long_default, dict(HAS_KL=False, EVEN_M=True, EVEN_N=True)),
            ("default subset (Tq = 11), key lengths", short_default, masked),
            ("before: shape-only default, key lengths", before, masked)]
    tuples = list(dict.fromkeys(A._TUNE_LONG + A._TUNE_SHORT + A._TUNE_SMALL))
    for tq in (TK, TQ_SUBSET) if autotune else ():
        for c in A.prune_for_target(tuples, tq, TK, head_dim, tdt, cc):
            if c not in (long_default, short_default):
                out.append((f"autotune (Tq = {tq}), key lengths", c, masked))
    merged = {}   # one compile per distinct kernel; its row names every variant it serves
    for label, c, flags in out:
        key = (c, tuple(sorted(flags.items())))
        merged[key] = (merged[key][0] + " = " + label if key in merged else label, c, flags)
    return list(merged.values())


def compile_one(job):
    """Compile one variant; returns a result row (dict). Runs in a worker process."""
    cc, dtype, head_dim, label, (bm, bn, warps, stages), flags = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from rmt_fast.kernels import attention as A

    fn = A._attn_fwd_kernel
    row = dict(target=cc, dtype=dtype, head_dim=head_dim, variant=label, BLOCK_M=bm, BLOCK_N=bn,
               num_warps=warps, num_stages=stages, **flags)
    consts = dict(HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn, DOT_PRECISION="ieee" if dtype == "fp32" else None,
                  **flags)
    sig = {n: "i32" for n in fn.arg_names}
    sig.update({n: "*" + dtype for n in ("Q", "K", "V", "Out")}, KL="*i64", qk_scale="fp32")
    sig.update({k: "constexpr" for k in consts})
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in _DIVISIBLE}
    t0 = time.perf_counter()
    triton.knobs.nvidia.dump_ptxas_log = True   # Triton prints its own ptxas -v log: read it, don't rerun ptxas
    triton.knobs.compilation.always_compile = True   # a cache hit would print no log
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", cc, 32),
                               options=dict(num_warps=warps, num_stages=stages))
    except Exception as e:  # noqa: BLE001 - the report records any compile failure
        row.update(compiled=False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}")
        return row
    usage = parse_ptxas(log.getvalue())
    if not usage["registers"]:
        row.update(compiled=False, error="no ptxas log found in Triton's output")
        return row
    row.update(compiled=True, error=None, compile_s=round(time.perf_counter() - t0, 1),
               shared=int(k.metadata.shared), **usage)
    lim = A.target_limits(cc)
    row["smem_limit"] = lim.smem_per_block
    row["smem_estimate"] = A.shared_memory_estimate(bm, bn, stages, head_dim, 4 if dtype == "fp32" else 2)
    row["blocks_per_sm"] = resident_blocks(lim, warps, row["registers"], row["shared"])
    return row


def parse_ptxas(text: str) -> dict:
    def num(pattern):
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0
    return dict(registers=num(r"Used (\d+) registers"), stack=num(r"(\d+) bytes stack frame"),
                spill_stores=num(r"(\d+) bytes spill stores"), spill_loads=num(r"(\d+) bytes spill loads"))


def resident_blocks(lim, warps: int, registers: int, shared: int) -> int:
    """Blocks per SM: the least of the block, thread, register (256-per-warp granules) and smem limits."""
    threads = 32 * warps
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = (lim.regs_per_sm // regs_per_warp) // warps
    by_smem = lim.smem_per_sm // (shared + lim.smem_reserved_per_block) if shared else lim.max_blocks_per_sm
    return max(0, min(lim.max_blocks_per_sm, lim.max_threads_per_sm // threads, by_regs, by_smem))


def problems(row: dict) -> list:
    """What the CI test fails on."""
    if not row["compiled"]:
        return [f"compile error: {row['error']}"]
    out = []
    if row["shared"] > row["smem_limit"]:
        out.append(f"shared memory {row['shared']} B > {row['smem_limit']} B")
    spills = row["spill_stores"] + row["spill_loads"]
    if spills and row["dtype"] in ("fp16", "bf16") and row["target"] >= 80 and row["head_dim"] <= 128:
        out.append(f"spills {row['spill_stores']} B stores / {row['spill_loads']} B loads")
    return out


# -- the .cu kernels ----------------------------------------------------------------------------------

def find_nvccs() -> dict:
    """{'12': path, '13': path} of the nvcc installs found (PATH, /usr/local/cuda*, the nvidia-cuda-nvcc wheel)."""
    found = {}
    candidates = [shutil.which("nvcc"), *glob.glob("/usr/local/cuda*/bin/nvcc"),
                  *glob.glob(os.path.join(sys.prefix, "lib", "python*", "site-packages", "nvidia", "cuda_nvcc",
                                          "bin", "nvcc")), os.environ.get("RMT_FAST_NVCC12")]
    for path in filter(None, candidates):
        try:
            v = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
        except OSError:
            continue
        m = re.search(r"release (\d+)\.", v)
        if m:
            found.setdefault(m.group(1), path)
    return found


def cu_report(targets) -> list:
    """nvcc -Xptxas -v per .cu kernel and target; 'absent' where no installed nvcc supports the target."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths
    nvccs = find_nvccs()
    rows = []
    for cc in targets:
        major = "13" if cc >= 75 and "13" in nvccs else "12" if "12" in nvccs else None
        for src in sorted(glob.glob(str(ROOT / "csrc" / "cuda" / "*.cu"))):
            if major is None:
                rows.append(dict(target=cc, source=os.path.basename(src), status="absent: sm_%d needs a CUDA 12 "
                                 "nvcc (CUDA 13 dropped it); none installed" % cc if cc < 75 else "absent: no nvcc"))
                continue
            with tempfile.TemporaryDirectory() as d:
                cmd = [nvccs[major], "-c", src, "-o", os.path.join(d, "k.o"), "-std=c++17", "-O3",
                       "-Xcompiler", "-fPIC", f"-gencode=arch=compute_{cc},code=sm_{cc}", "-Xptxas", "-v",
                       "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-DRMT_FAST_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C",
                       "-DTORCH_API_INCLUDE_EXTENSION_H", *COMMON_NVCC_FLAGS,
                       *(f"-I{p}" for p in include_paths()), f"-I{ROOT / 'csrc'}"]
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            if proc.returncode:
                rows.append(dict(target=cc, source=os.path.basename(src), status="error: "
                                 + proc.stderr.strip().splitlines()[-1][:200]))
                continue
            for fn, body in re.findall(r"Compiling entry function '(\w+)'.*?\n(.*?)(?=ptxas info    : Compiling|\Z)",
                                       proc.stderr, re.S):
                rows.append(dict(target=cc, source=os.path.basename(src), nvcc=major, function=demangle(fn),
                                 status="compiled", **parse_ptxas(body)))
    return rows


_ITANIUM = {"f": "float", "d": "double", "i": "int32", "l": "int64", "s": "int16", "a": "int8", "h": "uint8",
            "b": "bool"}


def demangle(name: str) -> str:
    """``_ZN..segment_embed_kernelIfN3c104HalfEEvP..`` -> ``segment_embed_kernel<float, Half>``."""
    m = re.search(r"(segment_embed|memory_write|memory_reset)_kernelI(.*?)EvP", name)
    if not m:
        return name[:60]
    args = []
    for c10, again, builtin in re.findall(r"N3c10\d+(Half|BFloat16)E|(S\d*_)|([a-z])", m.group(2)):
        args.append(c10 or (args[-1] if again and args else "") or _ITANIUM.get(builtin, builtin))
    return f"{m.group(1)}_kernel<{', '.join(args)}>"


# -- output -------------------------------------------------------------------------------------------

def markdown(rows, cu_rows, seconds: float) -> str:
    lines = [BEGIN, "", f"Generated by `python benchmarks/kernel_report.py` ({len(rows)} Triton variants, "
             f"{seconds:.0f} s on this CPU, no GPU). Registers and stack per thread (ptxas); spills = spill "
             "stores + loads in bytes; shared memory per block against the target's limit; blocks = resident "
             "blocks per SM. Tk = 522 (masked tail), subset Tq = 11.", "",
             "| target | dtype | D | variant | BM, BN, warps, stages | regs | stack | spills | smem / limit (KiB) "
             "| blocks/SM |", "|---|---|---:|---|---|---:|---:|---:|---|---:|"]
    for r in rows:
        cfg = f"{r['BLOCK_M']}, {r['BLOCK_N']}, {r['num_warps']}, {r['num_stages']}"
        if not r["compiled"]:
            lines.append(f"| sm_{r['target']} | {r['dtype']} | {r['head_dim']} | {r['variant']} | {cfg} | "
                         f"**not compiled**: {r['error']} | | | | |")
            continue
        spill = r["spill_stores"] + r["spill_loads"]
        lines.append(f"| sm_{r['target']} | {r['dtype']} | {r['head_dim']} | {r['variant']} | {cfg} | "
                     f"{r['registers']} | {r['stack']} | {'**%d**' % spill if spill else 0} | "
                     f"{r['shared'] / 1024:.0f} / {r['smem_limit'] / 1024:.0f} | {r['blocks_per_sm']} |")
    lines += ["", "`.cu` kernels (`nvcc -Xptxas -v`):", "",
              "| target | source | function | nvcc | regs | stack | spills |", "|---|---|---|---|---:|---:|---:|"]
    for r in cu_rows:
        if r["status"] != "compiled":
            lines.append(f"| sm_{r['target']} | {r['source']} | {r['status']} | | | | |")
        else:
            lines.append(f"| sm_{r['target']} | {r['source']} | {r['function']} | {r['nvcc']} | {r['registers']} "
                         f"| {r['stack']} | {r['spill_stores'] + r['spill_loads']} |")
    return "\n".join(lines + ["", END])


def write_docs(section: str, path: Path = ROOT / "docs" / "KERNELS.md") -> None:
    text = path.read_text(encoding="utf-8")
    if BEGIN in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n## Compiled for every target (generated)\n\n" + section + "\n"
    files.write_text(path, text)       # atomic: temp, fsync, rename


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default=",".join(map(str, TARGETS)), help="compute capabilities, e.g. 80,90")
    p.add_argument("--json", help="write every row to this JSON file")
    p.add_argument("--ci", action="store_true", help="default configs only; exit 1 on an error, spill or smem excess")
    p.add_argument("--no-docs", action="store_true", help="do not rewrite docs/KERNELS.md")
    p.add_argument("--jobs", type=int, default=2, help="compiler processes")
    p.add_argument("--autotune", default="80:fp16,90:bf16",
                   help="target:dtype pairs whose pruned autotune configs are compiled too ('all' for every one; "
                        "each costs ~10 compiles per head_dim)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("kernel_report: unset TRITON_INTERPRET (the kernel must be compiled, not interpreted)", file=sys.stderr)
        return 2
    try:
        targets = [int(t) for t in args.targets.split(",") if t.strip()]
    except ValueError:
        print(f"kernel_report: --targets must be comma-separated integers, got {args.targets!r}", file=sys.stderr)
        return 2
    bad = [t for t in targets if t not in TARGETS]
    if bad:
        print(f"kernel_report: --targets {bad} not among {TARGETS}", file=sys.stderr)
        return 2
    tuned = {(int(t.split(":")[0]), t.split(":")[1]) for t in args.autotune.split(",") if ":" in t}
    jobs = [(cc, dt, d, label, cfg, flags) for cc in targets for dt in dtypes_for(cc) for d in HEAD_DIMS
            for label, cfg, flags in variants(cc, dt, d, args.ci, args.autotune == "all" or (cc, dt) in tuned)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(compile_one, jobs))
    seconds = time.perf_counter() - t0
    failed = [(r, why) for r in rows for why in problems(r) if args.ci or r["variant"].startswith("default")]
    for r in rows:
        spills = r.get("spill_stores", 0) + r.get("spill_loads", 0) if r["compiled"] else "-"
        print(f"sm_{r['target']} {r['dtype']} D={r['head_dim']:<3} {r['variant']:<42} "
              f"{(r['BLOCK_M'], r['BLOCK_N'], r['num_warps'], r['num_stages'])} "
              + (f"regs {r['registers']} spills {spills} smem {r['shared']}" if r["compiled"] else r["error"]))
    cu_rows = [] if args.ci else cu_report(targets)
    if args.json:
        Path(args.json).write_text(json.dumps({"seconds": seconds, "triton": rows, "cu": cu_rows}, indent=1))
    if not args.ci and not args.no_docs:
        write_docs(markdown(rows, cu_rows, seconds))
    print(f"{len(rows)} variants in {seconds:.1f} s")
    for r, why in failed:
        print(f"FAIL sm_{r['target']} {r['dtype']} D={r['head_dim']} {r['variant']}: {why}")
    return 1 if args.ci and failed else 0


if __name__ == "__main__":
    sys.exit(main())
