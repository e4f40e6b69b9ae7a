"""MoT layer linear work: per-modality weights applied five ways, against one dense layer of equal FLOPs.

    OMP_NUM_THREADS=1 python benchmarks/mot_layer.py                     # CPU, small sizes (well under a minute)
    OMP_NUM_THREADS=1 python benchmarks/mot_layer.py --compile           # + torch.compile rows
    python benchmarks/mot_layer.py --device cuda --dtype bfloat16 --size nano --compile --repeats 20

A packed stream x [N, D] holds the tokens of M modalities (segments). Each modality has its own QKV projection
(D -> D + 2*Dkv) and its own SiLU-GLU MLP (gate/up D -> F, down F -> D); attention itself is left out. Variants:

* (a) dense: one weight set for all N tokens; same FLOPs, the lower bound;
* (b) contiguous: tokens sorted by modality; `torch.mm(..., out=)` on views straight into the output's row slices;
* (b') contiguous + cat: the same, each modality's result concatenated with `torch.cat` (one extra copy);
* (c) gather/scatter: tokens interleaved; per modality `index_select`, apply, `index_copy_` back (BAGEL style);
* (d) boolean mask: interleaved; `x[mask]` and `out[mask] = ...` per modality (the reference MoT's way);
* (e) grouped: tokens sorted by modality; `torch._grouped_mm` with offsets, one call per projection.

Modes: eager; with `--compile`, `torch.compile` of each variant; on CUDA, a `torch.cuda.CUDAGraph` capture of the
eager variant with static inputs (not (d): boolean indexing calls nonzero(), a host sync that capture forbids).
Every row's output is first checked against (b) (for (c) and (d) after undoing the interleaving; for (a), whose
weights are modality 0's, on modality 0's rows only). Times are medians of `--repeats` after one warm-up call; the
ratio is to (a) in the same mode; TFLOP/s counts 2 * N * (weights applied per token). `--size nano` takes hidden,
MLP and head sizes from the Cosmos3-Nano preset and splits 20,264 tokens as 512 text (und) + 18,720 video (gen) +
1,000 audio + 32 action.
"""

from __future__ import annotations

import argparse
import logging

import torch
import torch.nn.functional as F
from timing import timed

from cosmos3.models.transformer_cosmos3 import COSMOS3_PRESETS

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}
SIZES = {
    # name: (hidden, intermediate, heads, kv heads, head dim, segments "name:tokens,...")
    "cpu": (512, 1536, 8, 2, 64, "text:300,video:3600,audio:164,action:32"),
    "nano": (COSMOS3_PRESETS["nano"]["hidden_size"], COSMOS3_PRESETS["nano"]["intermediate_size"],
             COSMOS3_PRESETS["nano"]["num_attention_heads"], COSMOS3_PRESETS["nano"]["num_key_value_heads"],
             COSMOS3_PRESETS["nano"]["head_dim"], "text:512,video:18720,audio:1000,action:32"),
}


class MoTLinear:
    """The weights of M modalities, stacked `[M, out, in]` (nn.Linear layout), and the variants that apply them."""

    def __init__(self, lengths, hidden, intermediate, q_dim, kv_dim, device, dtype, seed=0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        m, self.f = len(lengths), intermediate

        def weight(out_features, in_features):
            w = torch.randn(m, out_features, in_features, generator=g) * in_features**-0.5
            return w.to(device, dtype)

        self.w_qkv = weight(q_dim + 2 * kv_dim, hidden)
        self.w_gate_up = weight(2 * intermediate, hidden)
        self.w_down = weight(hidden, intermediate)
        self.params = sum(w[0].numel() for w in (self.w_qkv, self.w_gate_up, self.w_down))
        ends = torch.tensor(lengths).cumsum(0)
        self.bounds = list(zip([0, *ends[:-1].tolist()], ends.tolist()))
        self.offs = ends.to(device, torch.int32)
        # The interleaved stream: position i holds sorted token perm[i]; modality ids in that order.
        self.perm = torch.randperm(int(ends[-1]), generator=g).to(device)
        modality = torch.repeat_interleave(torch.arange(m), torch.tensor(lengths)).to(device)[self.perm]
        self.index = [torch.nonzero(modality == i).flatten() for i in range(m)]
        self.mask = [modality == i for i in range(m)]

    def mlp(self, x, i):
        gate, up = F.linear(x, self.w_gate_up[i]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.w_down[i])

    def dense(self, x):
        return F.linear(x, self.w_qkv[0]), self.mlp(x, 0)

    def contiguous(self, x):
        qkv = x.new_empty(x.shape[0], self.w_qkv.shape[1])
        out = torch.empty_like(x)
        for i, (s, e) in enumerate(self.bounds):
            xs = x[s:e]
            torch.mm(xs, self.w_qkv[i].t(), out=qkv[s:e])
            gate, up = torch.mm(xs, self.w_gate_up[i].t()).chunk(2, dim=-1)
            torch.mm(F.silu(gate) * up, self.w_down[i].t(), out=out[s:e])
        return qkv, out

    def contiguous_cat(self, x):
        parts = [(F.linear(x[s:e], self.w_qkv[i]), self.mlp(x[s:e], i)) for i, (s, e) in enumerate(self.bounds)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def gather_scatter(self, x):
        qkv = x.new_empty(x.shape[0], self.w_qkv.shape[1])
        out = torch.empty_like(x)
        for i, index in enumerate(self.index):
            xs = x.index_select(0, index)
            qkv.index_copy_(0, index, F.linear(xs, self.w_qkv[i]))
            out.index_copy_(0, index, self.mlp(xs, i))
        return qkv, out

    def boolean_mask(self, x):
        qkv = x.new_empty(x.shape[0], self.w_qkv.shape[1])
        out = torch.empty_like(x)
        for i, mask in enumerate(self.mask):
            xs = x[mask]
            qkv[mask] = F.linear(xs, self.w_qkv[i])
            out[mask] = self.mlp(xs, i)
        return qkv, out

    def grouped(self, x):
        qkv = torch._grouped_mm(x, self.w_qkv.transpose(-2, -1), offs=self.offs)
        gate, up = torch._grouped_mm(x, self.w_gate_up.transpose(-2, -1), offs=self.offs).chunk(2, dim=-1)
        out = torch._grouped_mm(F.silu(gate) * up, self.w_down.transpose(-2, -1), offs=self.offs)
        return qkv, out


def cuda_graphed(fn, x):
    """Capture `fn(x)` (x static) in a CUDA graph; the returned callable replays it and returns its static outputs."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn(x)

    def replay(_x):
        graph.replay()
        return outputs

    return replay


def gemm_ceiling(device, dtype, n: int, repeats: int) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, device, repeats) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--size", default="cpu", choices=sorted(SIZES), help="hidden/MLP/head sizes and segments")
    parser.add_argument("--segments", default=None, help='override the segments, e.g. "text:512,video:18720"')
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="also time each variant under torch.compile")
    parser.add_argument("--ceiling", type=int, default=None, help="n of the n^3 GEMM ceiling (cuda 8192, cpu 1024)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    logging.getLogger("torch._subclasses.fake_tensor").setLevel(logging.CRITICAL)  # a failed row prints its reason
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    hidden, intermediate, heads, kv_heads, head_dim, segments = SIZES[args.size]
    segments = [(name, int(n)) for name, n in (s.split(":") for s in (args.segments or segments).split(","))]
    lengths = [n for _, n in segments]
    n_tokens = sum(lengths)

    layer = MoTLinear(lengths, hidden, intermediate, heads * head_dim, kv_heads * head_dim, device, dtype)
    x = torch.randn(n_tokens, hidden, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    x_inter = x[layer.perm].contiguous()
    flops = 2 * n_tokens * layer.params
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    ceiling_n = args.ceiling or (8192 if device.type == "cuda" else 1024)
    ceiling = gemm_ceiling(device, dtype, ceiling_n, args.repeats)
    print(f"device={name} dtype={args.dtype} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"repeats={args.repeats}")
    print(f"N={n_tokens} ({', '.join(f'{k} {n}' for k, n in segments)}) D={hidden} F={intermediate} "
          f"heads={heads}/{kv_heads}x{head_dim} params/modality={layer.params / 1e6:.1f}M "
          f"GFLOP/call={flops / 1e9:.1f} GEMM ceiling {ceiling:.2f} TFLOP/s ({ceiling_n}^3)"
          + (f" resident {torch.cuda.memory_allocated(device) / 2**30:.2f} GB" if device.type == "cuda" else ""))

    with torch.inference_mode():
        expected = layer.contiguous(x)
    rows0 = slice(*layer.bounds[0])
    unperm = torch.empty_like(layer.perm)
    unperm[layer.perm] = torch.arange(n_tokens, device=device)
    # name: (function, input, output -> the same output in sorted order, restricted to the rows it can match)
    variants = {
        "(a) dense": (layer.dense, x, lambda o: o[rows0]),
        "(b) contiguous, mm out=": (layer.contiguous, x, lambda o: o),
        "(b') contiguous, cat": (layer.contiguous_cat, x, lambda o: o),
        "(c) index_select/copy_": (layer.gather_scatter, x_inter, lambda o: o[unperm]),
        "(d) boolean mask": (layer.boolean_mask, x_inter, lambda o: o[unperm]),
        "(e) _grouped_mm": (layer.grouped, x, lambda o: o),
    }
    modes = ["eager"] + (["compile"] if args.compile else []) + (["cuda graph"] if device.type == "cuda" else [])
    tol = TOLERANCE[dtype]
    mem = device.type == "cuda"
    print(f"{'variant':26s} {'mode':10s} {'ms':>9s} {'/dense':>7s} {'TFLOP/s':>8s}"
          + (f" {'peak GB':>8s}" if mem else "") + f" {'max |diff|':>10s}")
    for mode in modes:
        dense_time = None
        for label, (fn, inp, reorder) in variants.items():
            if mode == "cuda graph" and label.startswith("(d)"):
                print(f"{label:26s} {mode:10s} skipped: boolean indexing syncs the host (nonzero), not capturable")
                continue
            if mem:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            try:
                with torch.inference_mode():
                    if mode == "compile":
                        fn = torch.compile(fn, dynamic=False)
                    elif mode == "cuda graph":
                        fn = cuda_graphed(fn, inp)
                    got = fn(inp)
                    want = tuple(o[rows0] for o in expected) if label.startswith("(a)") else expected
                    got = tuple(reorder(o) for o in got)
                    diff = max((g.float() - w.float()).abs().max().item() for g, w in zip(got, want))
                    for g, w in zip(got, want):
                        torch.testing.assert_close(g.float(), w.float(), atol=tol, rtol=tol)
                    del got
                    seconds = timed(lambda fn=fn, inp=inp: fn(inp), device, args.repeats)
            except Exception as error:  # an unsupported op/dtype/device, or a wrong result: say so, keep going
                while (error.__cause__ or error.__context__) is not None:  # torch.compile wraps the op's error
                    error = error.__cause__ or error.__context__
                reason = (str(error).strip().splitlines() or [""])[0][:100]
                print(f"{label:26s} {mode:10s} skipped: {type(error).__name__}: {reason}")
                continue
            if label.startswith("(a)"):
                dense_time = seconds
            ratio = f"{seconds / dense_time:6.2f}x" if dense_time else f"{'-':>7s}"
            peak = f" {torch.cuda.max_memory_allocated(device) / 2**30:8.2f}" if mem else ""
            print(f"{label:26s} {mode:10s} {seconds * 1e3:9.2f} {ratio:>7s} {flops / seconds / 1e12:8.3f}{peak} "
                  f"{diff:10.1e}")
            del fn


if __name__ == "__main__":
    main()
