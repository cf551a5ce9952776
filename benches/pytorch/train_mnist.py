#!/usr/bin/env python3
"""`mila train`'s default run in PyTorch: the same model, data and recipe, for a side-by-side timing.

Recipe (nn/src/trainer.rs, src/lib.rs `train`, nn/src/data/loader.rs):
- data: the embedded MNIST-10k IDX files (data/mnist-10k, 8,000 train / 2,000 test), read with gzip + numpy;
- model: MllaConfig::mnist (32x32x1, embed 16, depths 1,1,1,1, heads 1,2,4,8, 10 classes; 444,002
  parameters), the port in mlla_reference.py with MLLA's init, drop path rates 0 to 0.1 over the blocks
  (`mila train --drop-path`, the official MLLA class's default);
- input: pixels (v / 255 - 0.1307) / 0.3081, zero-padded 28 -> 32 (2 px each side; padding is a zero pixel
  before normalisation); training images shifted by (dy, dx) uniform in [-2, 2]^2 per image (a random crop of
  the image padded by 2 more), test images not shifted;
- batches of 128, reshuffled every epoch, the last (smaller) batch kept: 63 steps per epoch;
- AdamW lr 2e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0.05 on weights of rank >= 2 only (none on
  biases, norms, 1-D parameters);
- schedule per step: warmup = max(1, round(0.05 total)) steps linear (lr (s + 1) / warmup), then cosine from
  lr to 0 at `total` steps;
- cross-entropy with label smoothing 0.1; evaluation after every epoch (plain cross-entropy, accuracy);
- 20 epochs.

The random streams (shuffle, shifts, init) are numpy's and torch's, not mila-rs's: the same distributions, not
the same draws. A step is timed as `mila bench train` does: from the end of the previous step to the end of this
one (batch preparation included), and it ends with the loss and the correct count on the host.

    python3 train_mnist.py --threads 2 --json out.json            # the whole run
    python3 train_mnist.py --threads 2 --steps 20 --json t.json   # time 20 steps and stop
    taskset -c 0,1 python3 train_mnist.py --threads 2 ...         # pinned, beside `taskset -c 0,1 mila bench train`
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mlla_reference import MLLA, MllaConfig, num_params, param_groups  # noqa: E402

MEAN, STD = 0.1307, 0.3081


def read_idx(path: str) -> np.ndarray:
    """An IDX file (raw or gzipped): magic (2049 labels / 2051 images), counts, then bytes."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[0:4], "big")
    if magic == 2049:
        n = int.from_bytes(raw[4:8], "big")
        return np.frombuffer(raw, dtype=np.uint8, count=n, offset=8)
    if magic == 2051:
        n, rows, cols = (int.from_bytes(raw[o : o + 4], "big") for o in (4, 8, 12))
        return np.frombuffer(raw, dtype=np.uint8, count=n * rows * cols, offset=16).reshape(n, rows, cols)
    raise ValueError(f"{path}: magic {magic} is not an IDX label (2049) or image (2051) file")


def load_mnist10k(data_dir: str):
    def pair(split):
        images = read_idx(os.path.join(data_dir, f"{split}-images-idx3-ubyte.gz"))
        labels = read_idx(os.path.join(data_dir, f"{split}-labels-idx1-ubyte.gz"))
        assert len(images) == len(labels)
        return images, labels.astype(np.int64)

    return pair("train"), pair("test")


def padded_canvas(images: np.ndarray, pad: int) -> np.ndarray:
    """Normalised float32 images with `pad` zero pixels (normalised) on every side."""
    lut = ((np.arange(256, dtype=np.float32) / np.float32(255.0)) - np.float32(MEAN)) / np.float32(STD)
    return lut[np.pad(images, ((0, 0), (pad, pad), (pad, pad)))]


class Batches:
    """Shuffled (train) or ordered (test) batches of 32x32 crops of the padded canvas."""

    def __init__(self, images, labels, batch_size, pad, shift, shuffle, seed):
        self.canvas = padded_canvas(images, pad + shift)  # (N, 28 + 2 (pad + shift), ...)
        self.labels = labels
        self.n, self.b, self.shift, self.shuffle, self.seed = len(labels), batch_size, shift, shuffle, seed
        self.side = images.shape[1] + 2 * pad

    def __len__(self):
        return math.ceil(self.n / self.b)

    def epoch(self, epoch: int):
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        span = np.arange(self.side)
        for i in range(len(self)):
            ids = order[i * self.b : (i + 1) * self.b]
            if self.shift > 0:
                oy = rng.integers(0, 2 * self.shift + 1, size=len(ids))
                ox = rng.integers(0, 2 * self.shift + 1, size=len(ids))
            else:
                oy = ox = np.full(len(ids), 0)
            rows = (oy[:, None] + span)[:, :, None]
            cols = (ox[:, None] + span)[:, None, :]
            x = self.canvas[ids[:, None, None], rows, cols][:, None]  # (B, 1, side, side)
            yield np.ascontiguousarray(x), self.labels[ids]


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warmup to `base` over `warmup` steps, then cosine to 0 at `total` (nn/src/schedule.rs)."""
    if step < warmup:
        return base * (step + 1) / warmup
    span = max(total - warmup, 1)
    t = min((step - warmup) / span, 1.0)
    return 0.5 * base * (1.0 + math.cos(math.pi * t))


def set_tf32(enabled: bool):
    """TF32 in matrix products and convolutions on (enabled) or off: plain fp32 otherwise."""
    precision = "tf32" if enabled else "ieee"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
    else:
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def evaluate(model, batches, device):
    model.eval()
    loss_sum, hits, n = 0.0, 0, 0
    with torch.no_grad():
        for x, y in batches.epoch(0):
            x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
            logits = model(x)
            loss_sum += F.cross_entropy(logits, y).item() * len(y)
            hits += (logits.argmax(1) == y).sum().item()
            n += len(y)
    model.train()
    return loss_sum / max(n, 1), hits / max(n, 1)


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.path.normpath(os.path.join(here, "..", "..", "data", "mnist-10k")))
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--steps", type=int, default=None, help="stop after this many steps (for timing)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--drop-path", type=float, default=0.1, help="drop path rate of the last block")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--tf32", action="store_true", help="TF32 matmuls and convs on CUDA (off: plain fp32)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        set_tf32(args.tf32)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    (train_x, train_y), (test_x, test_y) = load_mnist10k(args.data_dir)
    train = Batches(train_x, train_y, args.batch_size, pad=2, shift=2, shuffle=True, seed=args.seed)
    test = Batches(test_x, test_y, args.batch_size, pad=2, shift=0, shuffle=False, seed=args.seed)

    cfg = MllaConfig.mnist()
    cfg.drop_path_rate = args.drop_path
    model = MLLA(cfg).to(device=device, dtype=torch.float32)
    fwd = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    steps_per_epoch = len(train)
    total = steps_per_epoch * args.epochs
    warmup = max(1, round(total * 0.05))
    print(
        f"training MLLA 'mnist' ({num_params(model):,} parameters) on mnist10k ({train.n} train / {test.n} test) "
        f"on {device} with {torch.get_num_threads()} threads, torch {torch.__version__}"
        + (", torch.compile" if args.compile else "")
    )

    step, step_ms, epochs = 0, [], []
    done = False
    for epoch in range(args.epochs):
        model.train()
        t_epoch = time.perf_counter()
        loss_sum, hits, seen, ms_epoch = 0.0, 0, 0, []
        t_step = time.perf_counter()
        for xb, yb in train.epoch(epoch):
            lr = lr_at(step, args.lr, warmup, total)
            for g in opt.param_groups:
                g["lr"] = lr
            x = torch.from_numpy(xb).to(device, non_blocking=True)
            y = torch.from_numpy(yb).to(device, non_blocking=True)
            logits = fwd(x)
            loss = F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            l = loss.item()
            if not math.isfinite(l):
                raise SystemExit(f"the loss is {l} at step {step}; stopped")
            hits += (logits.detach().argmax(1) == y).sum().item()
            loss_sum += l * len(yb)
            seen += len(yb)
            step += 1
            now = time.perf_counter()
            ms_epoch.append((now - t_step) * 1e3)
            t_step = now
            if args.steps is not None and step >= args.steps:
                done = True
                break
        seconds = time.perf_counter() - t_epoch
        test_loss, test_acc = evaluate(fwd, test, device)
        step_ms += ms_epoch
        m = {
            "epoch": epoch + 1,
            "step": step,
            "lr": lr_at(max(step - 1, 0), args.lr, warmup, total),
            "train_loss": loss_sum / max(seen, 1),
            "train_acc": hits / max(seen, 1),
            "test_loss": test_loss,
            "test_acc": test_acc,
            "images_per_s": seen / max(seconds, 1e-9),
            "seconds": seconds,
            "step_ms_median": statistics.median(ms_epoch) if ms_epoch else float("nan"),
            "partial": done and len(ms_epoch) < steps_per_epoch,
        }
        epochs.append(m)
        print(
            f"epoch {m['epoch']:>3}/{args.epochs}  loss {m['train_loss']:.4f}  train acc {m['train_acc']:.4f}  "
            f"test loss {test_loss:.4f}  test acc {test_acc:.4f}  {m['images_per_s']:.0f} img/s  "
            f"{seconds:.1f} s  step {m['step_ms_median']:.1f} ms (median)" + ("  [stopped by --steps]" if m["partial"] else "")
        )
        if done:
            break
    total_seconds = time.perf_counter() - started
    train_seconds = sum(m["seconds"] for m in epochs)
    images = sum(m["images_per_s"] * m["seconds"] for m in epochs)
    srt = sorted(step_ms)
    report = {
        "stack": "pytorch",
        "torch": torch.__version__,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "compile": args.compile,
        "dtype": "f32",
        "tf32": bool(args.tf32 and device.type == "cuda"),
        "epochs": len(epochs),
        "steps": len(step_ms),
        "batch_size": args.batch_size,
        "total_seconds": total_seconds,
        "train_seconds": train_seconds,
        "step_ms_median": statistics.median(step_ms) if step_ms else float("nan"),
        "step_ms_min": srt[0] if srt else float("nan"),
        "step_ms_max": srt[-1] if srt else float("nan"),
        "images_per_s": images / max(train_seconds, 1e-9),
        "final_test_acc": epochs[-1]["test_acc"] if epochs else float("nan"),
        "final_train_loss": epochs[-1]["train_loss"] if epochs else float("nan"),
        "per_epoch": epochs,
    }
    print(
        f"\n| stack | device | threads | epochs | steps | batch | total s | train-loop s | step ms (median) | "
        f"step ms min / max | images/s | test acc |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
        f"| pytorch {torch.__version__}{' compile' if args.compile else ''} | {report['device']} | {report['threads']} | "
        f"{report['epochs']} | {report['steps']} | {args.batch_size} | {total_seconds:.1f} | {train_seconds:.1f} | "
        f"{report['step_ms_median']:.1f} | {report['step_ms_min']:.1f} / {report['step_ms_max']:.1f} | "
        f"{report['images_per_s']:.0f} | {100 * report['final_test_acc']:.2f}% |"
    )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
