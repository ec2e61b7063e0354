"""What `model.fsdp_load_on: cpu` costs a checkpoint: bitsandbytes quantizing a Llama-2-7B layer on the CPU.

    python3 benchmarks/quantize_on_cpu.py [--layers 2]

Under FSDP each rank loads its base into CPU memory, where transformers quantizes every weight on the device
it loads it to: the CPU (a random:<shape> base is quantized on the GPU and only kept on the CPU). This times
NF4 + double quantization of one decoder layer's seven weights (bf16 storage, as under FSDP) on the CPU with
all its threads, and on the GPU when there is one, extrapolates to the 32 layers of a 7B, and checks that the
CPU's packed weights and scales dequantize to the GPU's (the same model either way).
"""

from __future__ import annotations

import argparse
import time

import torch

# one Llama-2-7B decoder layer: q, k, v, o, gate, up, down (out_features, in_features)
LAYER = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]


def quantize(w: torch.Tensor):
    from bitsandbytes.functional import quantize_4bit

    return quantize_4bit(w, quant_type="nf4", compress_statistics=True, quant_storage=torch.bfloat16)


def main() -> None:
    from bitsandbytes.functional import dequantize_4bit

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2, help="layers timed (the first is also the warm-up)")
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    gen = torch.Generator().manual_seed(0)
    times = {"cpu": 0.0, "cuda": 0.0}
    worst = 0.0
    for layer in range(a.layers):
        for shape in LAYER:
            w = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
            t0 = time.perf_counter()
            q_cpu, s_cpu = quantize(w)
            if layer or a.layers == 1:
                times["cpu"] += time.perf_counter() - t0
            if cuda:
                wg = w.cuda()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                q_gpu, s_gpu = quantize(wg)
                torch.cuda.synchronize()
                if layer or a.layers == 1:
                    times["cuda"] += time.perf_counter() - t0
                s_cpu.to("cuda")
                a_cpu = dequantize_4bit(q_cpu.cuda(), s_cpu).float()
                a_gpu = dequantize_4bit(q_gpu, s_gpu).float()
                worst = max(worst, (a_cpu - a_gpu).abs().max().item())
    timed = max(1, a.layers - 1)
    print(f"CPU threads {torch.get_num_threads()}: {times['cpu'] / timed:.2f} s a 7B layer, "
          f"{32 * times['cpu'] / timed:.0f} s for the 32 layers")
    if cuda:
        print(f"GPU ({torch.cuda.get_device_name()}): {times['cuda'] / timed * 1e3:.1f} ms a layer; "
              f"max |CPU - GPU| of the dequantized weights: {worst:.3g}")


if __name__ == "__main__":
    main()
