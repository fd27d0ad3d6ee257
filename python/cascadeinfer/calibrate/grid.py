"""The batch compositions `cascade calibrate` measures.

Each term of the cost model needs points that move it independently of the others:
- decode batches over batch size `n` and mean context: the overhead, per-request and per-token
  terms;
- at equal `n` and equal total context, a uniform batch (every request at the mean) against a
  skewed one (most requests short, a few at the longest context): only the padding
  `n * Lmax - S` differs, so the heterogeneity term is identifiable;
- prefill chunks of `P` tokens with and without a cached prefix in front: the pairs `Q` grow with
  the prefix while `P` stays, so the prefill-token and prefill-attention terms separate.
"""

from __future__ import annotations

from dataclasses import dataclass

HEADROOM_TOKENS = 128
"""Room left below max_model_len for the decode steps a batch runs while it is measured."""

MIN_SHORT_TOKENS = 16
"""The shortest context a skewed batch's short requests get."""


@dataclass(frozen=True)
class Limits:
    """What the engine allows; every point stays inside it."""

    max_model_len: int
    max_num_seqs: int
    max_batch_tokens: int
    kv_capacity_tokens: int
    block_size: int


@dataclass(frozen=True)
class DecodePoint:
    """A batch of decoding requests; `prompt_lens[i]` is request i's prompt length."""

    label: str
    prompt_lens: tuple[int, ...]
    spread: str
    """'uniform' or 'skewed'."""


@dataclass(frozen=True)
class PrefillPoint:
    """One request whose prompt is `cached` tokens already in the prefix cache (a previous
    request ran them) followed by `tokens` new ones: the timed step prefills the new ones."""

    label: str
    cached: int
    tokens: int


@dataclass(frozen=True)
class Grid:
    decode: tuple[DecodePoint, ...]
    prefill: tuple[PrefillPoint, ...]
    is_quick: bool

    def describe(self) -> str:
        uniform = sum(p.spread == "uniform" for p in self.decode)
        sizes = sorted({len(p.prompt_lens) for p in self.decode})
        tokens = sorted({p.tokens for p in self.prefill})
        cached = sorted({p.cached for p in self.prefill})
        return (
            f"{'quick' if self.is_quick else 'full'} grid: {uniform} uniform and "
            f"{len(self.decode) - uniform} skewed decode batches (n in {sizes}), "
            f"{len(self.prefill)} prefill chunks (P in {tokens}, cached prefix in {cached})"
        )


def skewed_lens(n: int, mean: int, top: int) -> tuple[int, ...] | None:
    """`n` lengths summing to `n * mean`: the long ones at `top` (or as long as the total
    allows), as many as possible, the rest short and (nearly) equal, none below
    MIN_SHORT_TOKENS. None when no split is at least twice as long as the mean."""
    total = n * mean
    longest = min(top, total - (n - 1) * MIN_SHORT_TOKENS)
    if n < 2 or longest < 2 * mean:
        return None
    for num_long in range(n - 1, 0, -1):
        rest = total - num_long * longest
        num_short = n - num_long
        if rest >= num_short * MIN_SHORT_TOKENS:
            base, extra = divmod(rest, num_short)
            short = [base + (1 if i < extra else 0) for i in range(num_short)]
            return tuple(sorted(short) + [longest] * num_long)
    return None


def _align(value: int, block: int) -> int:
    return max(block, value // block * block)


def build_grid(limits: Limits, *, quick: bool = False) -> Grid:
    """The grid for these limits; `quick` is a small one for tests (a dozen points)."""
    top = limits.max_model_len - HEADROOM_TOKENS
    if top < 4 * MIN_SHORT_TOKENS:
        raise ValueError(
            f"max_model_len = {limits.max_model_len}: calibration needs at least "
            f"{HEADROOM_TOKENS + 4 * MIN_SHORT_TOKENS}"
        )
    if quick:
        sizes, means, skew_sizes, skew_means = [1, 8], [top // 16, top // 2], [8], [top // 16]
        chunk_sizes, cached_shares = [64, 256], [0, 4]
    else:
        sizes, means = [1, 4, 16, 64], [top // 32, top // 8, top // 2, top]
        skew_sizes, skew_means = [4, 16, 64], [top // 32, top // 8, top // 2]
        chunk_sizes, cached_shares = [32, 128, 512, 2048], [0, 4, 2]
    sizes = sorted({min(n, limits.max_num_seqs) for n in sizes})
    kv_room = limits.kv_capacity_tokens * 9 // 10

    decode: list[DecodePoint] = []
    for n in sizes:
        for mean in means:
            if mean >= MIN_SHORT_TOKENS and n * (mean + HEADROOM_TOKENS) <= kv_room:
                decode.append(DecodePoint(f"{n}x{mean}", (mean,) * n, "uniform"))
    for n in sorted({min(n, limits.max_num_seqs) for n in skew_sizes}):
        for mean in skew_means:
            lens = skewed_lens(n, mean, top)
            if lens is not None and n * (mean + HEADROOM_TOKENS) <= kv_room:
                num_long = lens.count(lens[-1])
                label = f"{n - num_long}x{lens[0]}+{num_long}x{lens[-1]}"
                decode.append(DecodePoint(label, lens, "skewed"))

    # The engine must prefill each chunk in one step; the simulator (no prefix cache) prefills
    # the prefix again, so both have to fit the step's token budget.
    span = min(top, limits.max_batch_tokens)
    prefill: list[PrefillPoint] = []
    for share in cached_shares:
        cached = _align(span // share, limits.block_size) if share else 0
        for tokens in chunk_sizes:
            if cached + tokens <= span:
                prefill.append(PrefillPoint(f"prefill {tokens} after {cached}", cached, tokens))
    # Capping n at max_num_seqs can repeat a point.
    unique_decode = {p.label: p for p in decode}
    return Grid(tuple(unique_decode.values()), tuple(prefill), quick)
