#!/usr/bin/env python3
"""Registers, spills and the instruction mix of a family's CUDA kernels, without a GPU.

Assembles a module's source as ops/src/cuda.rs does (engine prelude, math prelude, the family's .cu), compiles it
with NVRTC for one architecture (through ctypes: any libnvrtc, e.g. the `nvidia-cuda-nvrtc` wheel's), then asks
cuobjdump for each matching kernel's registers, stack and local memory, and with --mix counts nvdisasm's SASS
opcodes between the kernel's first and last barrier (its main loop, for kernels that have one).

    scripts/kernel-sass.py ops/src/conv/conv.cu 'conv_igemm.*_f32' --mix
    NVRTC=/path/libnvrtc.so.13 CUDA_BIN=/path/bin scripts/kernel-sass.py ops/src/linattn/linattn.cu linattn_bwd

Environment: NVRTC (the library; default: the nvidia cu13 wheel of this machine's Python), CUDA_BIN (the folder of
cuobjdump and nvdisasm; default: that wheel's bin), ARCH (default sm_90).
"""
import argparse, collections, ctypes, os, re, subprocess, sys, tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEEL = os.path.join(os.path.dirname(os.__file__), "site-packages", "nvidia", "cu13")


def compile_cubin(source: bytes, arch: str) -> bytes:
    lib = ctypes.CDLL(os.environ.get("NVRTC", os.path.join(WHEEL, "lib", "libnvrtc.so.13")))
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source, b"module.cu", 0, None, None) != 0:
        sys.exit("nvrtcCreateProgram failed")
    opts = [f"--gpu-architecture={arch}".encode()]
    status = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    if status != 0:
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        sys.exit(log.value.decode(errors="replace"))
    lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
    cubin = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetCUBIN(prog, cubin)
    return cubin.raw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cu", help="the family's .cu file")
    ap.add_argument("kernels", help="regular expression over kernel names")
    ap.add_argument("--mix", action="store_true", help="opcode counts between the first and last barrier")
    args = ap.parse_args()
    parts = [os.path.join(ROOT, "engine/src/cuda/prelude.cuh"), os.path.join(ROOT, "ops/src/prelude.cuh"), args.cu]
    source = b"\n".join(open(p, "rb").read() for p in parts)
    bin_dir = os.environ.get("CUDA_BIN", os.path.join(WHEEL, "bin"))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "module.cubin")
        open(path, "wb").write(compile_cubin(source, os.environ.get("ARCH", "sm_90")))
        usage = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-res-usage", path], capture_output=True, text=True).stdout
        sass = subprocess.run([os.path.join(bin_dir, "nvdisasm"), "-c", path], capture_output=True, text=True).stdout if args.mix else ""
    pattern = re.compile(args.kernels)
    lines = usage.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*Function (\S+):", line)
        if not m or not pattern.search(m.group(1)):
            continue
        name = m.group(1)
        res = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", lines[i + 1]))
        print(f"{name}: {res.get('REG')} registers, stack {res.get('STACK')}, local {res.get('LOCAL')}, shared {res.get('SHARED')}")
        if args.mix:
            body = re.search(r"\.text\.%s:(.*?)(?:\n\s*\.section|\Z)" % re.escape(name), sass, re.S)
            text = body.group(1).splitlines() if body else []
            bars = [j for j, l in enumerate(text) if "BAR.SYNC" in l]
            if len(bars) < 2:
                print("  (fewer than two barriers: no loop counted)")
                continue
            ops = collections.Counter()
            for l in text[bars[0] : bars[-1] + 1]:
                m2 = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", l)
                if m2:
                    ops[m2.group(1)] += 1
            total = sum(ops.values())
            top = ", ".join(f"{k} {v}" for k, v in ops.most_common(12))
            print(f"  between its first and last barrier: {total} instructions ({top})")


if __name__ == "__main__":
    main()
