"""Benchmark the DrasCLR encoder on the 581 patches of one CT.

Measured in one run: the vectorised encoder (grouped convolution over the batch), a naive per-sample loop over
the same weights (what the reference implementation does), the same architecture built from plain ``nn.Conv3d``
(no location conditioning: the floor), and DrasCLR training throughput (forward + backward + SGD step).

    python scripts/benchmark_encoder.py [--batch 581] [--repeats 5] [--device cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch import nn

from drasclr_ext.networks import DrasCLR, DrasCLREncoder


class PlainConvEncoder(nn.Module):
    """The encoder's layer sequence with ordinary convolutions: the speed floor for the same arithmetic."""

    def __init__(self, rep_dim: int = 128) -> None:
        super().__init__()
        plan = [(1, 8, 1), (8, 8, 2)]
        for cin, cout in ((8, 16), (16, 32), (32, 64)):
            plan += [(cin, cout, 1), (cout, cout, 1), (cout, cout, 2)]
        plan += [(64, 128, 1), (128, rep_dim, 2)]
        layers: list[nn.Module] = []
        for cin, cout, stride in plan:
            layers += [nn.Conv3d(cin, cout, 3, stride, 1), nn.BatchNorm3d(cout), nn.ELU()]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.body(x), 1)


def median_seconds(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=581, help="patches of one CT (581 DrasCLR landmarks)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--naive-repeats", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=32, help="patches per forward pass (both encoders)")
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    encoder = DrasCLREncoder().to(device).eval()
    plain = PlainConvEncoder().to(device).eval()
    x = torch.rand(args.batch, 1, 32, 32, 32, device=device) * 2 - 1
    loc = torch.rand(args.batch, 3, device=device) * 2 - 1

    def chunked(fn):
        return lambda: [fn(i, min(i + args.chunk, args.batch)) for i in range(0, args.batch, args.chunk)]

    with torch.no_grad():
        vectorised = median_seconds(chunked(lambda i, j: encoder.represent(x[i:j], loc[i:j])), args.repeats, device)
        naive = median_seconds(
            lambda: [encoder.represent(x[i : i + 1], loc[i : i + 1]) for i in range(args.batch)],
            args.naive_repeats,
            device,
        )
        floor = median_seconds(chunked(lambda i, j: plain(x[i:j])), args.repeats, device)

    model = DrasCLR(queue_size=4096, num_locations=581).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    b = args.train_batch
    batch = {
        "image_q": torch.rand(b, 1, 32, 32, 32, device=device),
        "image_k": torch.rand(b, 1, 32, 32, 32, device=device),
        "location": torch.rand(b, 3, device=device),
        "location_index": torch.randint(0, 581, (b,), device=device),
        "neighbour_images": torch.rand(b, 2, 1, 32, 32, 32, device=device),
        "neighbour_locations": torch.rand(b, 2, 3, device=device),
    }

    def step() -> None:
        optimizer.zero_grad()
        model(**batch)["loss"].backward()
        optimizer.step()

    train_step = median_seconds(step, args.repeats, device)
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch": args.batch,
        "chunk": args.chunk,
        "vectorised_s": vectorised,
        "naive_loop_s": naive,
        "plain_conv3d_s": floor,
        "speedup_vs_naive": naive / vectorised,
        "ratio_vs_plain_conv3d": vectorised / floor,
        "train_step_s": train_step,
        "train_patches_per_s": b / train_step,
        "train_batch": b,
    }
    print(
        f"encoder, {args.batch} patches with random locations, {args.chunk} per pass "
        f"(median of {args.repeats}; naive {args.naive_repeats})"
    )
    print(f"  vectorised CondConv3d : {vectorised:8.3f} s")
    print(f"  naive per-sample loop : {naive:8.3f} s   ({naive / vectorised:.1f}x slower)")
    print(f"  plain nn.Conv3d       : {floor:8.3f} s   (vectorised is {vectorised / floor:.2f}x of it)")
    print(f"training, batch {b} + 2 neighbours each: {train_step:.3f} s/step = {b / train_step:.1f} patches/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
