#!/usr/bin/env python3
"""The attention grids' tails, by a model (bench/RESULTS.md, "Attention
grids"): blocks start in index order on the first free slot of a GPU
(multiprocessors x the blocks each holds), each taking time in proportion
to the tiles it visits under the causal mask; prints the time to the last
block over the work spread evenly, for the launch order before
attention::causal_grid and with it. Not a measurement.

    python3 scripts/attention-grid-model.py [SMS] [BATCH] [SEQ] [HEADS] [KV_HEADS]

Defaults: an H100 (132 SMs) and the 1B bench's attention (4 x 1024, 32
heads, 8 KV heads, head_dim 64); blocks per SM from ptxas's registers and
shared memory (tests/cuda_compile.rs prints them).
"""
import heapq
import sys


def makespan(works, slots):
    free = [0.0] * slots
    end = 0.0
    for w in works:
        t = heapq.heappop(free) + w
        end = max(end, t)
        heapq.heappush(free, t)
    return end


def ratio(works, slots):
    return makespan(works, slots) / (sum(works) / slots)


def sequences_per_chunk(sms, tiles, pairs, batch):
    """As src/backend/cuda/attention.rs causal_grid."""
    want = min(max(-(-8 * sms // (pairs * tiles)), 1), batch)
    return max(d for d in range(1, want + 1) if batch % d == 0)


def old_order(tiles, pairs, batch, work):
    # grid (tiles, heads, batch): a (sequence, head)'s tiles in a row
    return [work(x) for _ in range(batch) for _ in range(pairs) for x in range(tiles)]


def new_order(sms, tiles, pairs, batch, work, query_tiles):
    bc = sequences_per_chunk(sms, tiles, pairs, batch)
    out = []
    for _ in range(batch // bc):
        for y in range(tiles):
            t = tiles - 1 - y if query_tiles else y
            out += [work(t)] * (bc * pairs)
    return out


def main():
    a = [int(x) for x in sys.argv[1:]]
    sms, batch, seq, heads, kv = (a + [132, 4, 1024, 32, 8][len(a):])[:5]
    group = heads // kv
    print("| kernel | blocks (tiles x heads x batch) | blocks per SM (slots) | old grid | causal_grid |")
    print("|---|---|---|---|---|")
    # (name, rows per tile, heads, blocks per SM, work of tile t, query tiles?)
    t64, t16 = seq // 64, seq // 16
    for name, rows, pairs, per_sm, work, q in [
        ("tensor-core forward", 64, heads, 3, lambda t: t + 1, True),
        ("tensor-core dq", 64, heads, 3, lambda t: t + 1, True),
        ("tensor-core dkdv", 64, kv, 3, lambda t: group * (t64 - t), False),
        ("fp32 forward", 16, heads, 5, lambda t: (t * 16 + 16 + 31) // 32, True),
        ("fp32 dq", 16, heads, 6, lambda t: (t * 16 + 16 + 31) // 32, True),
        ("fp32 dkdv", 16, kv, 8, lambda t: group * (t16 - t), False),
    ]:
        tiles = seq // rows
        slots = sms * per_sm
        old = ratio(old_order(tiles, pairs, batch, work), slots)
        new = ratio(new_order(sms, tiles, pairs, batch, work, q), slots)
        print(f"| {name} | {tiles} x {pairs} x {batch} = {tiles * pairs * batch} | {per_sm} ({slots}) | {old:.2f}x | {new:.2f}x |")


if __name__ == "__main__":
    main()
