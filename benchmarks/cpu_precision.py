"""``python -m benchmarks.cpu_precision``: which precision and memory layout train fastest on this CPU?

In one process, in alternating rounds, the same training steps (forward, loss, backward,
AdamW step) of one model at the quick profile's size, in float32 and in bfloat16 autocast,
each with the default (contiguous) and the channels_last memory layout. Prints images per
second and each one's ratio to float32 contiguous (training's default on CPUs without native
bfloat16), and what ``training.engine.Precision`` chooses here. Writes
benchmarks/results/cpu_precision.json (see ``--out``).
"""
from __future__ import annotations

import argparse
import contextlib
import sys

import torch
from torch import nn

from benchmarks.common import RESULTS_DIR, command_line, interleaved, machine, markdown_table, median_ms, write_json
from training.config import QUICK_PROFILE
from training.engine import Precision, native_bfloat16
from training.models import MODEL_NAMES, create_model


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu_precision", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet34", choices=MODEL_NAMES)
    parser.add_argument("--image-size", type=int, default=QUICK_PROFILE["image_size"])
    parser.add_argument("--batch-size", type=int, default=QUICK_PROFILE["batch_size"])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each kind (default: 5)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per round (default: 3)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "cpu_precision.json"), help="JSON results file")
    return parser.parse_args(argv)


def step_function(model: nn.Module, bf16: bool, channels_last: bool, images, labels):
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    x = images.contiguous(memory_format=layout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    criterion = nn.CrossEntropyLoss()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = criterion(model(x), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    labels = torch.randint(0, 5, (args.batch_size,))
    contenders = {}
    for bf16 in (False, True):
        for channels_last in (False, True):
            name = f"{'bfloat16' if bf16 else 'float32'}, {'channels_last' if channels_last else 'contiguous'}"
            model = create_model(args.model, 5).train()  # one model each: layouts stay put
            contenders[name] = step_function(model, bf16, channels_last, images, labels)
    for step in contenders.values():  # warm-up (oneDNN builds its kernels on first use)
        step()
    samples = interleaved(contenders, rounds=args.rounds, per_block=args.steps)
    base = median_ms(samples["float32, contiguous"])
    rows, results = [], {}
    for name, times in samples.items():
        ms = median_ms(times)
        results[name] = {"median_ms_per_step": ms, "images_per_second": args.batch_size / ms * 1000,
                         "vs_float32_contiguous": base / ms}
        rows.append([name, f"{ms:.0f}", f"{results[name]['images_per_second']:.0f}", f"{base / ms:.2f}x"])
    chosen = Precision(torch.device("cpu"))
    print(f"Training steps: {args.model}, batch {args.batch_size} at {args.image_size} px, "
          f"{torch.get_num_threads()} threads; native bfloat16: {native_bfloat16()}")
    print(markdown_table(["precision, layout", "ms / step", "images/s", "vs float32 contiguous"], rows))
    print(f"training.engine.Precision chooses here: {chosen.describe()}")
    out = write_json(RESULTS_DIR / "cpu_precision.json" if args.out is None else args.out, {
        "command": command_line(argv, "benchmarks.cpu_precision"), "machine": machine(),
        "model": args.model, "image_size": args.image_size, "batch_size": args.batch_size,
        "native_bfloat16": native_bfloat16(), "chosen": chosen.describe(), "results": results})
    print(f"Wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
