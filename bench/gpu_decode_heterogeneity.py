"""Decode attention time against the spread of context lengths in a batch, timed on a GPU.

Why: the GPU profile's `heterogeneity` term (`docs/design/cost-model.md`) says how much of a
batch's padding `n * Lmax - S` costs time, and it is the term that rewards length stages. It was
an assumption (0.35). This script measures it: it times decode attention for one layer of the
Llama-3-8B geometry (32 query heads, 8 KV heads, head_dim 128, bf16) over batches with the same
number of requests and the same or different total context but different longest contexts, and
fits `T = a_n + c * S + e * (n * Lmax - S)` by least squares; `h = e / c`.

Kernels timed (each a real GPU kernel, on KV stored contiguously per sequence; paging changes
addresses, not how the work is split across multiprocessors):

- `fa2-varlen`: FlashAttention-2 as built into PyTorch (`aten::_flash_attention_forward`,
  varlen, one query per sequence), with its own choice of KV splits.
- `fa2-varlen-nosplit`: the same with `num_splits=1` where this PyTorch accepts the argument.
- `triton-split512`: a flash-decoding kernel written here after vLLM's `paged_attention_v2`
  design: the KV of each sequence cut into 512-token partitions, a grid over the batch's
  largest partition count (programs past a sequence's end return at once), then a reduction.
- `triton-nosplit`: the same kernel with one partition per sequence (`paged_attention_v1`).

It also times the step's matrix products for a batch of n tokens with Llama-3-8B's weights
(32 layers of QKV, O, gate/up and down projections, and the LM head), which bound the per-step
and per-sequence terms from below (norms, rotary embedding and sampling are left out).

Runs on one CUDA GPU with PyTorch and Triton (`python3 bench/gpu_decode_heterogeneity.py
--out result.json`); with `--check-only` under `TRITON_INTERPRET=1` it checks the Triton kernels
against a PyTorch reference on the CPU. Not part of the project's runtime or tests.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl

Q_HEADS = 32
KV_HEADS = 8
HEAD_DIM = 128
GROUP = Q_HEADS // KV_HEADS
GROUP_PAD = 16  # tl.dot needs at least 16 rows
LAYERS = 32
HIDDEN = 4096
INTERMEDIATE = 14336
VOCAB = 128256


@triton.jit
def _decode_partial(
    q_ptr,
    k_ptr,
    v_ptr,
    seq_start_ptr,
    seq_len_ptr,
    m_ptr,
    l_ptr,
    acc_ptr,
    scale,
    max_parts,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    KV_HEADS: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PARTITION: tl.constexpr,
):
    """One program: one sequence, one KV head, one partition of the sequence's KV."""
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    seq_len = tl.load(seq_len_ptr + seq)
    lo = part * PARTITION
    if lo < seq_len:
        hi = tl.minimum(lo + PARTITION, seq_len)
        start = tl.load(seq_start_ptr + seq).to(tl.int64)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, D)
        q_rows = (seq * KV_HEADS * GROUP + kvh * GROUP + g).to(tl.int64)
        q = tl.load(q_ptr + q_rows[:, None] * D + d[None, :], mask=(g < GROUP)[:, None], other=0.0)
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, D], tl.float32)
        for off in range(lo, hi, BLOCK_N):
            t = off + tl.arange(0, BLOCK_N)
            valid = t < hi
            rows = (start + t) * KV_HEADS + kvh
            kv_off = rows[:, None] * D + d[None, :]
            k = tl.load(k_ptr + kv_off, mask=valid[:, None], other=0.0)
            v = tl.load(v_ptr + kv_off, mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        slot = ((seq * KV_HEADS + kvh) * max_parts + part).to(tl.int64) * GROUP_PAD + g
        tl.store(m_ptr + slot, m_i)
        tl.store(l_ptr + slot, l_i)
        tl.store(acc_ptr + slot[:, None] * D + d[None, :], acc)


@triton.jit
def _decode_reduce(
    m_ptr,
    l_ptr,
    acc_ptr,
    out_ptr,
    seq_len_ptr,
    max_parts,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    KV_HEADS: tl.constexpr,
    D: tl.constexpr,
    PARTITION: tl.constexpr,
):
    """One program: one sequence, one KV head; merges the partitions' softmax states."""
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    seq_len = tl.load(seq_len_ptr + seq)
    n_parts = tl.cdiv(seq_len, PARTITION)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D)
    m_g = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_g = tl.zeros([GROUP_PAD], tl.float32)
    acc_g = tl.zeros([GROUP_PAD, D], tl.float32)
    for part in range(0, n_parts):
        slot = ((seq * KV_HEADS + kvh) * max_parts + part).to(tl.int64) * GROUP_PAD + g
        m_p = tl.load(m_ptr + slot)
        l_p = tl.load(l_ptr + slot)
        a_p = tl.load(acc_ptr + slot[:, None] * D + d[None, :])
        m_new = tl.maximum(m_g, m_p)
        a_old = tl.exp(m_g - m_new)
        a_new = tl.exp(m_p - m_new)
        l_g = l_g * a_old + l_p * a_new
        acc_g = acc_g * a_old[:, None] + a_p * a_new[:, None]
        m_g = m_new
    out = acc_g / l_g[:, None]
    q_rows = (seq * KV_HEADS * GROUP + kvh * GROUP + g).to(tl.int64)
    tl.store(out_ptr + q_rows[:, None] * D + d[None, :], out, mask=(g < GROUP)[:, None])


class Batch:
    """One decode batch: its context lengths and the tensors every kernel reads."""

    def __init__(
        self, lengths: list[int], device: str, dtype: torch.dtype = torch.bfloat16
    ) -> None:
        self.lengths = lengths
        n = len(lengths)
        total = sum(lengths)
        gen = torch.Generator(device=device).manual_seed(n * 7919 + total)

        def rand(*shape: int) -> torch.Tensor:
            return (torch.randn(*shape, generator=gen, device=device) * 0.5).to(dtype)

        self.q = rand(n, Q_HEADS, HEAD_DIM)
        self.k = rand(total, KV_HEADS, HEAD_DIM)
        self.v = rand(total, KV_HEADS, HEAD_DIM)
        lens = torch.tensor(lengths, dtype=torch.int32)
        starts = torch.zeros(n, dtype=torch.int32)
        starts[1:] = torch.cumsum(lens, 0)[:-1].to(torch.int32)
        self.seq_len = lens.to(device)
        self.seq_start = starts.to(device)
        self.cu_q = torch.arange(n + 1, dtype=torch.int32).to(device)
        self.cu_k = torch.cat([starts, torch.tensor([total], dtype=torch.int32)]).to(device)
        self.out = torch.empty(n, Q_HEADS, HEAD_DIM, dtype=torch.float32, device=device)
        self.partials: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = {}

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def padding(self) -> int:
        return len(self.lengths) * max(self.lengths) - self.total

    def partial_buffers(
        self, partition: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        if partition not in self.partials:
            n = len(self.lengths)
            parts = math.ceil(max(self.lengths) / partition)
            dev = self.q.device
            m = torch.empty(n, KV_HEADS, parts, GROUP_PAD, dtype=torch.float32, device=dev)
            lse = torch.empty_like(m)
            acc = torch.empty(
                n, KV_HEADS, parts, GROUP_PAD, HEAD_DIM, dtype=torch.float32, device=dev
            )
            self.partials[partition] = (m, lse, acc, parts)
        return self.partials[partition]


def triton_decode(batch: Batch, partition: int) -> torch.Tensor:
    """Flash-decoding over `partition`-token pieces of each sequence's KV, then a merge."""
    m, lse, acc, parts = batch.partial_buffers(partition)
    n = len(batch.lengths)
    scale = 1.0 / math.sqrt(HEAD_DIM)
    _decode_partial[(n, KV_HEADS, parts)](
        batch.q,
        batch.k,
        batch.v,
        batch.seq_start,
        batch.seq_len,
        m,
        lse,
        acc,
        scale,
        parts,
        GROUP=GROUP,
        GROUP_PAD=GROUP_PAD,
        KV_HEADS=KV_HEADS,
        D=HEAD_DIM,
        BLOCK_N=64,
        PARTITION=partition,
    )
    _decode_reduce[(n, KV_HEADS)](
        m,
        lse,
        acc,
        batch.out,
        batch.seq_len,
        parts,
        GROUP=GROUP,
        GROUP_PAD=GROUP_PAD,
        KV_HEADS=KV_HEADS,
        D=HEAD_DIM,
        PARTITION=partition,
    )
    return batch.out


def fa2_varlen(batch: Batch, num_splits: int | None) -> torch.Tensor:
    kwargs: dict[str, Any] = {"scale": 1.0 / math.sqrt(HEAD_DIM)}
    if num_splits is not None:
        kwargs["num_splits"] = num_splits
    out = torch.ops.aten._flash_attention_forward(
        batch.q,
        batch.k,
        batch.v,
        batch.cu_q,
        batch.cu_k,
        1,
        max(batch.lengths),
        0.0,
        False,
        False,
        **kwargs,
    )
    return out[0]  # type: ignore[no-any-return]


def reference(batch: Batch) -> torch.Tensor:
    """Plain PyTorch attention, one sequence at a time, in float32."""
    outs = []
    start = 0
    for i, length in enumerate(batch.lengths):
        q = batch.q[i].float()  # [H, D]
        k = batch.k[start : start + length].float().repeat_interleave(GROUP, dim=1)  # [L, H, D]
        v = batch.v[start : start + length].float().repeat_interleave(GROUP, dim=1)
        scores = torch.einsum("hd,lhd->hl", q, k) / math.sqrt(HEAD_DIM)
        outs.append(torch.einsum("hl,lhd->hd", scores.softmax(-1), v))
        start += length
    return torch.stack(outs)


def time_ms(fn: Any) -> float:
    """Median time of `fn` in ms, with the L2 cache cleared between runs."""
    return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))


def batches_for(n: int) -> list[tuple[str, list[int]]]:
    """Uniform batches (for c) and skewed ones (for h) with n requests each."""
    few = max(1, n // 8)
    half = n // 2
    return [
        ("uniform-512", [512] * n),
        ("uniform-2048", [2048] * n),
        ("uniform-8192", [8192] * n),
        ("one-long-32768", [256] * (n - 1) + [32768]),
        ("eighth-long-16384", [512] * (n - few) + [16384] * few),
        ("half-8192", [256] * (n - half) + [8192] * half),
        ("same-S-as-2048", [1024] * (n - few) + [2048 + (2048 - 1024) * (n - few) // few] * few),
    ]


def critical_batches_for(n: int) -> list[tuple[str, list[int]]]:
    """One or four long requests among short ones: where the longest request sets the time."""
    out = [("uniform-256", [256] * n), ("uniform-4096", [4096] * n)]
    for long in (4096, 8192, 16384, 32768, 65536):
        out.append((f"one-long-{long}", [256] * (n - 1) + [long]))
    if n > 4:
        out.append(("four-long-32768", [256] * (n - 4) + [32768] * 4))
    return out


def fit(
    rows: list[dict[str, Any]], kernel: str, min_n: int = 0, capped: bool = True
) -> dict[str, float]:
    """The cost model's attention term fitted to one kernel's rows of at least `min_n` requests:
    T = a_n + c * max(S + h * padding, f' * Lmax), f' = min(n, f) when `capped` (as
    `CostProfile::critical_path`) else f; a per-n intercept for launch and reduction. Least
    squares weighted by 1/T (relative errors) for each h (steps of 0.01) and f (0, 2-39.5 in
    steps of 0.5); the best by rms, with the best linear-only fit (f = 0) and the assumed
    h = 0.35 beside it."""
    use = [r for r in rows if r["kernel"] == kernel and r["n"] >= min_n]
    ns = sorted({r["n"] for r in use})
    y = np.array([r["ms"] for r in use])
    onehot = np.zeros((len(use), len(ns)))
    for i, r in enumerate(use):
        onehot[i, ns.index(r["n"])] = 1.0
    total = np.array([r["S"] for r in use], dtype=float)
    padding = np.array([r["padding"] for r in use], dtype=float)
    longest = np.array([r["Lmax"] for r in use], dtype=float)
    n = np.array([r["n"] for r in use], dtype=float)

    def solve(h: float, f: float) -> tuple[float, float, float]:
        floor = (np.minimum(n, f) if capped else f) * longest
        x = np.hstack([onehot, (np.maximum(total + h * padding, floor) / 1e6)[:, None]])
        sol = np.linalg.lstsq(x / y[:, None], np.ones(len(y)), rcond=None)[0]
        err = (x @ sol - y) / y
        return float(np.sqrt((err**2).mean())), float(np.abs(err).max()), float(sol[-1])

    floors = [0.0, *np.arange(2.0, 40.0, 0.5)]
    grid = [(solve(h, f), h, f) for h in np.round(np.arange(0.0, 1.001, 0.01), 2) for f in floors]
    (rms, worst, c), h, f = min(grid, key=lambda g: g[0][0])
    (lin_rms, lin_worst, _), lin_h, _ = min((g for g in grid if g[2] == 0.0), key=lambda g: g[0][0])
    assumed_rms, assumed_worst, _ = solve(0.35, 0.0)
    return {
        "h": float(h),
        "f": float(f),
        "c_s_per_token_32_layers": c * 1e-9 * LAYERS,
        "rms_error": rms,
        "max_error": worst,
        "linear_h": float(lin_h),
        "linear_rms_error": lin_rms,
        "linear_max_error": lin_worst,
        "assumed_0.35_rms_error": assumed_rms,
        "assumed_0.35_max_error": assumed_worst,
    }


FITS = (
    ("FA2, n >= 32", "fa2-varlen", 32, True),
    ("FA2, all n", "fa2-varlen", 0, True),
    ("no split, all n (floor not capped at n)", "triton-nosplit", 0, False),
    ("split 512, all n", "triton-split512", 0, True),
)
"""The fits docs/design/cost-model.md tabulates: (label, kernel, least n, floor capped at n)."""


def fit_all(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    fits = {}
    for label, kernel, min_n, capped in FITS:
        if any(r["kernel"] == kernel for r in rows):
            fits[label] = fit(rows, kernel, min_n, capped)
            print(label, json.dumps(fits[label]), flush=True)
    return fits


def gemm_step_ms(n: int, weights: list[torch.Tensor], lm_head: torch.Tensor) -> float:
    x = torch.randn(n, HIDDEN, dtype=torch.bfloat16, device="cuda")

    def step() -> None:
        h = x
        for i in range(LAYERS):
            qkv, o, gate_up, down = weights[4 * i : 4 * i + 4]
            torch.matmul(h, qkv)
            h = torch.matmul(h, o)
            g = torch.matmul(h, gate_up)
            h = torch.matmul(g[:, :INTERMEDIATE], down)
        torch.matmul(h, lm_head)

    return time_ms(step)


def check(device: str) -> None:
    """Triton kernels against the reference on small batches."""
    for lengths in ([5, 70, 513], [1, 1024, 64, 1100]):
        # Triton's CPU interpreter reads bfloat16 as raw bits: check in float16 there.
        batch = Batch(lengths, device, torch.bfloat16 if device == "cuda" else torch.float16)
        want = reference(batch)
        for partition in (64, 512, 4096):
            got = triton_decode(batch, partition).clone()
            err = (got - want).abs().max().item()
            assert err < 2e-2, f"triton partition {partition} lengths {lengths}: max error {err}"
        if device == "cuda":
            got = fa2_varlen(batch, None).float()
            err = (got - want).abs().max().item()
            assert err < 2e-2, f"fa2 lengths {lengths}: max error {err}"
    print("check: kernels agree with the reference", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="decode_heterogeneity.json")
    parser.add_argument("--sizes", default="8,32,128,256")
    parser.add_argument("--check-only", action="store_true")
    parser.add_argument(
        "--family",
        choices=["mix", "critical"],
        default="mix",
        help="mix: uniform and skewed batches; critical: one long request among short ones",
    )
    parser.add_argument("--no-gemm", action="store_true", help="skip the matrix products")
    parser.add_argument(
        "--refit", metavar="JSON", help="fit a saved run again (no GPU needed) and print the fits"
    )
    args = parser.parse_args()
    if args.refit:
        with open(args.refit) as saved:
            fit_all(json.load(saved)["rows"])
        return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check(device)
    if args.check_only:
        return 0
    if device != "cuda":
        print("no CUDA device: only --check-only runs here", file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    info = {
        "gpu": props.name,
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
    print(json.dumps(info), flush=True)
    kernels: dict[str, Any] = {
        "fa2-varlen": lambda b: fa2_varlen(b, None),
        "triton-split512": lambda b: triton_decode(b, 512),
        "triton-nosplit": lambda b: triton_decode(b, 1 << 17),
    }
    try:
        fa2_varlen(Batch([16, 32], "cuda"), 1)
        kernels["fa2-varlen-nosplit"] = lambda b: fa2_varlen(b, 1)
    except (TypeError, RuntimeError) as exc:
        print(f"fa2 num_splits not accepted here: {exc}", flush=True)
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    for n in [int(s) for s in args.sizes.split(",")]:
        family = batches_for(n) if args.family == "mix" else critical_batches_for(n)
        for name, lengths in family:
            batch = Batch(lengths, "cuda")
            for kernel, fn in kernels.items():
                ms = time_ms(lambda fn=fn, batch=batch: fn(batch))
                row = {
                    "n": n,
                    "batch": name,
                    "kernel": kernel,
                    "S": batch.total,
                    "Lmax": max(lengths),
                    "padding": batch.padding,
                    "ms": ms,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
            del batch
            torch.cuda.empty_cache()
    print(f"attention timed in {time.monotonic() - started:.0f} s", flush=True)
    fits = fit_all(rows)
    gemms: dict[int, float] = {} if args.no_gemm else gemm_steps_ms()
    with open(args.out, "w") as out:
        json.dump({"info": info, "rows": rows, "fits": fits, "gemm_step_ms": gemms}, out, indent=1)
    return 0


def gemm_steps_ms() -> dict[int, float]:
    """The step's matrix products (Llama-3-8B's weights) at several batch sizes."""
    weights = []
    for _ in range(LAYERS):
        weights += [
            torch.randn(
                HIDDEN, HIDDEN + 2 * KV_HEADS * HEAD_DIM, dtype=torch.bfloat16, device="cuda"
            ),
            torch.randn(HIDDEN, HIDDEN, dtype=torch.bfloat16, device="cuda"),
            torch.randn(HIDDEN, 2 * INTERMEDIATE, dtype=torch.bfloat16, device="cuda"),
            torch.randn(INTERMEDIATE, HIDDEN, dtype=torch.bfloat16, device="cuda"),
        ]
    lm_head = torch.randn(HIDDEN, VOCAB, dtype=torch.bfloat16, device="cuda")
    gemms = {}
    for n in [1, 8, 32, 128, 256]:
        gemms[n] = gemm_step_ms(n, weights, lm_head)
        print(json.dumps({"gemm_step_n": n, "ms": gemms[n]}), flush=True)
    return gemms


if __name__ == "__main__":
    sys.exit(main())
