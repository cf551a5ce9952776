#!/usr/bin/env python3
"""PyTorch's half of `mila bench models`: the same workloads timed the same way, written as JSON for
`mila bench models --pytorch-json FILE`, which prints both stacks side by side with the ratios.

Workloads (the model is the port in mlla_reference.py; `--quick` shrinks every size for a smoke run on the CPU,
and `mila bench models --quick` uses the same shrunken sizes):

| key | what | full size | --quick |
| --- | --- | --- | --- |
| mlla_t_train_fp32 / _tf32 | MLLA-T training step: forward, label-smoothed (0.1) cross-entropy, backward, AdamW (lr 2e-3, wd 0.05 on weights of rank >= 2) | MllaConfig::tiny, 224x224x3, 1000 classes, batch 128 | tiny's depths and heads with embed 16, 32x32x3, 10 classes, batch 2 |
| mlla_t_infer_fp32 / _tf32 | MLLA-T forward in eval mode without autograd | as above | as above |
| block_fwd | one MILA block (training mode, drop path 0) forward, without autograd | C 64, 56x56 tokens, 2 heads, batch 64 | C 16, 8x8, 2 heads, batch 2 |
| block_fwd_bwd | the same forward with autograd, then backward of a fixed random cotangent | as above | as above |
| small_train | training step of the small MLLA | 32x32x1, embed 32, depths 1,2,2,1, heads 1,2,4,8, 10 classes (2.0M parameters), batch 256 | batch 8 |

`--compile` adds `small_train` under torch.compile (mode "compile"; the model is compiled, the optimizer step
stays eager); `--compile-mlla` the MLLA-T training steps the same way.

How a number is made (as src/bench.rs's Clock): inputs are random (normal images, uniform labels) and made
once; each case runs `warmup` untimed calls, then `reps` repetitions of `calls` back-to-back calls, with `calls`
chosen after warm-up so that a repetition lasts at least 5 ms (at most 100); the median over repetitions of the
time per call is reported. On CUDA a repetition is bracketed by CUDA events on the current stream. Gradients
are set to None at the start of every training step (before the forward) and before every forward+backward.
Peak memory (CUDA): torch.cuda.max_memory_allocated over the timed repetitions, after the warm-up calls and a
reset; what is live then (weights, optimizer state, inputs) is included. "fp32" runs turn TF32 off for both
matrix products and cuDNN convolutions; "tf32" turns it on for both.

    python3 bench_models.py --device cuda --compile --json out.json
    python3 bench_models.py --quick --device cpu --json quick.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mlla_reference import MLLA, MLLABlock, MllaConfig, init_linear_layers, num_params, param_groups  # noqa: E402

MIN_REP_MS = 5.0
MAX_CALLS_PER_REP = 100


def set_tf32(enabled: bool):
    precision = "tf32" if enabled else "ieee"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
    else:
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def mlla_shape(cfg: MllaConfig, batch: int) -> str:
    """The workload's description; `mila bench models` builds the same string and compares them."""
    dash = lambda v: "-".join(str(x) for x in v)  # noqa: E731
    return (
        f"MLLA embed {cfg.embed_dim}, depths {dash(cfg.depths)}, heads {dash(cfg.num_heads)}, "
        f"{cfg.img_size}x{cfg.img_size}x{cfg.in_chans}, {cfg.num_classes} classes, batch {batch}"
    )


def block_shape(dim, side, heads, batch) -> str:
    return f"MILA block C {dim}, {side}x{side} tokens, {heads} heads, batch {batch}"


def workloads(quick: bool):
    """(MLLA-T config, its batch), (block dim, side, heads, batch), (small config, its batch)."""
    tiny = MllaConfig.tiny()
    small = MllaConfig.small32()
    if quick:
        tiny.embed_dim, tiny.img_size, tiny.num_classes = 16, 32, 10
        return (tiny, 2), (16, 8, 2, 2), (small, 8)
    return (tiny, 128), (64, 56, 2, 64), (small, 256)


class Clock:
    def __init__(self, device, warmup, reps, quick):
        self.device, self.warmup, self.reps, self.quick = device, warmup, reps, quick
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def once(self, calls, f):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                f()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t = time.perf_counter()
        for _ in range(calls):
            f()
        return (time.perf_counter() - t) * 1e3

    def measure(self, f, before_timing=None):
        """Warm-up, then the median over repetitions of the time per call; and the peak bytes allocated
        during the timed repetitions (CUDA)."""
        for _ in range(self.warmup):
            f()
        self.sync()
        if self.quick:
            calls = 1
        else:
            single = self.once(1, f)
            calls = max(1, min(MAX_CALLS_PER_REP, math.ceil(MIN_REP_MS / max(single, 1e-6))))
        if before_timing is not None:
            before_timing()
        peak = reserved = None
        if self.cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)
        per_call = sorted(self.once(calls, f) / calls for _ in range(max(self.reps, 1)))
        if self.cuda:
            peak = torch.cuda.max_memory_allocated(self.device)
            reserved = torch.cuda.max_memory_reserved(self.device)
        return {
            "median_ms": statistics.median(per_call),
            "min_ms": per_call[0],
            "max_ms": per_call[-1],
            "reps": len(per_call),
            "calls_per_rep": calls,
            "peak_bytes": peak,
            "peak_reserved_bytes": reserved,
        }


def free(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def train_case(clock, device, cfg, batch, compile_model=False):
    torch.manual_seed(0)
    model = MLLA(cfg).to(device=device, dtype=torch.float32).train()
    fwd = torch.compile(model) if compile_model else model
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=2e-3, betas=(0.9, 0.999), eps=1e-8)
    x = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)
    y = torch.randint(0, cfg.num_classes, (batch,), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(fwd(x), y, label_smoothing=0.1)
        loss.backward()
        opt.step()

    t = clock.measure(step, before_timing=lambda: opt.zero_grad(set_to_none=True))
    t["params"] = num_params(model)
    del model, fwd, opt, x, y
    free(device)
    return t


def infer_case(clock, device, cfg, batch):
    torch.manual_seed(0)
    model = MLLA(cfg).to(device=device, dtype=torch.float32).eval()
    x = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)

    def forward():
        with torch.no_grad():
            model(x)

    t = clock.measure(forward)
    t["params"] = num_params(model)
    del model, x
    free(device)
    return t


def block_cases(clock, device, dim, side, heads, batch):
    torch.manual_seed(0)
    block = init_linear_layers(MLLABlock(dim, (side, side), heads)).to(device=device, dtype=torch.float32).train()
    x = torch.randn(batch, side * side, dim, device=device, requires_grad=True)
    g = torch.randn(batch, side * side, dim, device=device)
    leaves = [x] + list(block.parameters())

    def forward():
        with torch.no_grad():
            block(x)

    def clear():
        for p in leaves:
            p.grad = None

    def forward_backward():
        clear()
        block(x).backward(g)

    fwd = clock.measure(forward)
    both = clock.measure(forward_backward, before_timing=clear)
    del block, x, g, leaves
    free(device)
    return fwd, both


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, few repetitions: a smoke run")
    ap.add_argument("--compile", action="store_true", help="also time the small model's step under torch.compile")
    ap.add_argument(
        "--compile-mlla",
        action="store_true",
        help="also time the MLLA-T training steps under torch.compile (about 2 minutes of compiling each)",
    )
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 20, 3 with --quick)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3, 1 with --quick)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--only", default=None, help="comma-separated workload keys to run (default: all)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        # "cuda" alone names no index, which set_device refuses: take the current one.
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    reps = args.reps if args.reps is not None else (3 if args.quick else 20)
    clock = Clock(device, warmup, reps, args.quick)
    (tiny, tiny_batch), (bdim, bside, bheads, bbatch), (small, small_batch) = workloads(args.quick)
    only = set(args.only.split(",")) if args.only else None
    want = lambda key: only is None or key in only  # noqa: E731

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        description = f"{props.name} ({device}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.1f} GiB)"
        timing = "CUDA events on the current stream around each repetition"
    else:
        description = f"cpu ({torch.get_num_threads()} threads)"
        timing = f"host wall clock, {torch.get_num_threads()} threads"
    rows = []

    def add(key, name, shape, mode, t, batch=None, tf32=False):
        row = {"key": key, "name": name, "shape": shape, "mode": mode, "tf32": tf32, **t}
        if batch is not None:
            row["images_per_s"] = batch / (t["median_ms"] * 1e-3)
        rows.append(row)
        peak = "" if t["peak_bytes"] is None else f", peak {t['peak_bytes'] / 2**20:.0f} MiB"
        rate = f", {row['images_per_s']:.0f} img/s" if batch is not None else ""
        print(f"{key:<22} {mode:<8} {t['median_ms']:10.3f} ms{rate}{peak}   [{shape}]", flush=True)

    errors = []

    def attempt(key, mode, f):
        """Runs one case; a failure (out of memory, a compile error) is recorded and the others still run."""
        try:
            f()
            return
        except Exception as e:  # noqa: BLE001
            msg = f"{type(e).__name__}: {e}".splitlines()[0][:500]
            errors.append({"key": key, "mode": mode, "error": msg})
            print(f"{key:<22} {mode:<8} FAILED: {msg}", flush=True)
        free(device)  # outside the handler, once the traceback's frames (and their tensors) are gone

    for tf32 in (False, True):
        if device.type != "cuda" and tf32:
            continue  # TF32 is a CUDA setting
        if device.type == "cuda":
            set_tf32(tf32)
        suffix = "tf32" if tf32 else "fp32"
        shape = mlla_shape(tiny, tiny_batch)
        key = f"mlla_t_train_{suffix}"
        if want(key):
            name = f"MLLA-T training step (AdamW), {suffix}"
            attempt(key, "eager", lambda: add(key, name, shape, "eager", train_case(clock, device, tiny, tiny_batch), tiny_batch, tf32))
            if args.compile_mlla:
                attempt(
                    key,
                    "compile",
                    lambda: add(key, name, shape, "compile", train_case(clock, device, tiny, tiny_batch, True), tiny_batch, tf32),
                )
        key = f"mlla_t_infer_{suffix}"
        if want(key):
            name = f"MLLA-T inference, {suffix}"
            attempt(key, "eager", lambda: add(key, name, shape, "eager", infer_case(clock, device, tiny, tiny_batch), tiny_batch, tf32))
    if device.type == "cuda":
        set_tf32(False)
    if want("block_fwd") or want("block_fwd_bwd"):

        def blocks():
            fwd, both = block_cases(clock, device, bdim, bside, bheads, bbatch)
            shape = block_shape(bdim, bside, bheads, bbatch)
            add("block_fwd", "MILA block forward, fp32", shape, "eager", fwd)
            add("block_fwd_bwd", "MILA block forward+backward, fp32", shape, "eager", both)

        attempt("block_fwd", "eager", blocks)
    if want("small_train"):
        name, shape = "small MLLA training step (AdamW), fp32", mlla_shape(small, small_batch)
        attempt("small_train", "eager", lambda: add("small_train", name, shape, "eager", train_case(clock, device, small, small_batch), small_batch))
        if args.compile:
            attempt(
                "small_train",
                "compile",
                lambda: add("small_train", name, shape, "compile", train_case(clock, device, small, small_batch, True), small_batch),
            )

    report = {
        "stack": "pytorch",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": description,
        "quick": args.quick,
        "compile": args.compile,
        "compile_mlla": args.compile_mlla,
        "warmup": warmup,
        "reps": reps,
        "timing": timing,
        "adamw": "torch.optim.AdamW defaults (foreach on CUDA)",
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "rows": rows,
        "errors": errors,
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
