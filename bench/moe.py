"""MoE dispatch/combine kernels on one device: GB/s of the layout, the send-buffer pack (bf16 gather and
fused fp8 quant), the whole wire buffer's fused pack / unpack (moe_pack_rows / moe_unpack_rows vs the
torch-copies path that DEEPKERNELS_MOE_PACK=torch selects; bytes: source rows read + buffer written),
and the un-permute + reduce (combine, and the expert-side weighted reduce), each vs a
plain PyTorch index_select / index_add implementation in the same run, plus a same-size copy as the
bandwidth ceiling (extra["copy_GB/s"], extra["frac_of_copy"]).

Low-latency mode (DeepEP's decode case: 128 tokens, hidden 7168, top-8 of 256 experts, fp8 dispatch,
bf16 combine with the weights applied in the combine) on one process: ``Buffer.low_latency_dispatch`` /
``low_latency_combine`` end to end (pack into the one byte buffer, the exchange (a copy with one rank),
unpack into the expert-major masked layout; the combine's gather, exchange and weighted reduce) vs a
plain PyTorch implementation (quantise, index_copy into [E, T, H]; index_select + index_add back).
Bytes counted as DeepEP reports low-latency bandwidth: per (token, expert) pair, the fp8 row + scales
(dispatch) or the bf16 row (combine); extra["wire_MB"] is what our fixed-capacity buffer moves.

With >= 2 GPUs (and not --quick) it also runs the end-to-end expert-parallel step over NCCL, one
process per GPU, in both modes: dispatch (fp8) and combine (bf16) algorithm bandwidth (bytes of the
received / returned rows per second, as DeepEP reports it) vs all_to_all_single alone on the same bytes
and splits.

Shapes follow DeepEP's benchmarks: 4096 tokens, hidden 7168, top-8 of 256 experts over 8 ranks
(normal mode: fp8 dispatch, bf16 combine) and 128 tokens (low-latency). Bytes counted: every byte read
from the source rows plus every byte written (fp8 values + fp32 scales for the quantised pack).
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch

from deepkernels import moe
from deepkernels.compat.deep_ep import Buffer
from deepkernels.fp8 import per_token_cast_to_fp8_ref
from deepkernels.moe import wire

from .common import Context, Row, copy_gbps, time_ms

FAMILY = "moe"

# (tokens, hidden, top-k, experts, ranks)
GPU_CASES = [(4096, 7168, 8, 256, 8), (128, 7168, 8, 256, 8)]
CPU_CASES = [(64, 256, 4, 16, 4)]
# low-latency mode, one process: (tokens, hidden, top-k, experts)
LL_GPU_CASE = (128, 7168, 8, 256)
LL_CPU_CASE = (16, 256, 4, 16)


def _routing(t: int, k: int, e: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.rand(t, e, generator=g).topk(k, dim=1).indices
    return ids.to(device), torch.rand(t, k, generator=g).to(device)


def _row(case: dict, ctx: Context, nbytes: int, ours, peer, peer_name: str, copy: float | None) -> Row:
    t_ours, t_peer = time_ms(ours, ctx), time_ms(peer, ctx)
    gb = nbytes / 1e9
    extra = {}
    if copy is not None:
        extra = {"copy_GB/s": round(copy, 1), "frac_of_copy": round(gb / (t_ours / 1e3) / copy, 3)}
    return Row(FAMILY, case, "GB/s", gb / (t_ours / 1e3), peer_name, gb / (t_peer / 1e3), t_ours, extra)


def _run_single(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    dev = ctx.device
    for t, h, k, e, r in (GPU_CASES if ctx.is_cuda and not ctx.quick else
                          GPU_CASES[1:] if ctx.is_cuda else CPU_CASES):
        base = {"tokens": t, "hidden": h, "topk": k, "experts": e, "ranks": r}
        ids, w = _routing(t, k, e, dev)
        x = torch.randn(t, h, dtype=torch.bfloat16, device=dev)

        # layout
        lay_bytes = ids.numel() * 8 + t * r + (e + r) * 4
        rows.append(_row({**base, "op": "layout"}, ctx, lay_bytes,
                         lambda: torch.ops.deepkernels.moe_get_dispatch_layout(ids, e, r),
                         lambda: moe.moe_get_dispatch_layout_ref(ids, e, r), "torch reference", None))

        _, _, in_rank = moe.get_dispatch_layout(ids, e, r)
        pos = moe.dispatch_positions(in_rank)
        n = int(in_rank.sum())
        src = moe.positions_to_src_idx(pos, n)
        src_l = src.long()
        copy = copy_gbps(n * h * 2 * 2, ctx) if ctx.is_cuda else None

        # dispatch pack, bf16: gather N rows
        rows.append(_row({**base, "op": "permute", "rows": n, "dtype": "bf16"}, ctx, 2 * n * h * 2,
                         lambda: torch.ops.deepkernels.moe_permute(x, src),
                         lambda: x.index_select(0, src_l), "torch index_select", copy))
        # dispatch pack with fused fp8 quantisation
        q_bytes = n * h * 2 + n * h + n * (h // 128) * 4
        rows.append(_row({**base, "op": "permute_fp8", "rows": n}, ctx, q_bytes,
                         lambda: torch.ops.deepkernels.moe_permute_fp8(x, src),
                         lambda: per_token_cast_to_fp8_ref(x.index_select(0, src_l)),
                         "torch index_select + quant", copy))

        # the whole wire buffer of a dispatch (fp8 quantised payload + scales + src + local ids + weights):
        # the fused kernel (DEEPKERNELS_MOE_PACK=fused) vs the torch-copies path (=torch) -- on the CPU
        # both run the torch path (the op's CPU kernel is the reference)
        per_rank = in_rank.sum(0, dtype=torch.int32)
        buf = torch.ops.deepkernels.moe_pack_rows(x, None, src, ids, w, per_rank, e // r, -1, True)
        p_bytes = n * h * 2 + buf.numel() + n * k * 12
        rows.append(_row({**base, "op": "pack_rows_fp8", "rows": n, "row_bytes": buf.size(1)}, ctx, p_bytes,
                         lambda: torch.ops.deepkernels.moe_pack_rows(x, None, src, ids, w, per_rank, e // r, -1, True),
                         lambda: wire._pack_rows_torch(x, src, ids, w, per_rank, e // r, None, True),
                         "torch copies (DEEPKERNELS_MOE_PACK=torch)", copy))
        fmt = wire._pack_format(x, None, ids, w, True)
        rows.append(_row({**base, "op": "unpack_rows_fp8", "rows": n}, ctx, 2 * buf.numel(),
                         lambda: torch.ops.deepkernels.moe_unpack_rows(buf, n, h, k, moe.FP8_DTYPE, True, True, -1),
                         lambda: wire._unpack_rows_torch(buf, fmt, n), "torch copies (DEEPKERNELS_MOE_PACK=torch)",
                         copy))

        # combine: N rows back, summed per token over its ranks (bf16 in/out, fp32 accumulation)
        y = torch.randn(n, h, dtype=torch.bfloat16, device=dev)
        tok = src_l.clamp(min=0)

        def index_add_combine(y=y, tok=tok):
            acc = torch.zeros(t, h, dtype=torch.float32, device=dev)
            acc.index_add_(0, tok, y.float())
            return acc.to(torch.bfloat16)

        c_bytes = n * h * 2 + t * h * 2
        rows.append(_row({**base, "op": "unpermute_reduce", "rows": n}, ctx, c_bytes,
                         lambda: torch.ops.deepkernels.moe_unpermute_reduce(y, pos, None),
                         index_add_combine, "torch index_add", copy))

        # expert-side weighted reduce: T*k expert outputs -> T rows with the top-k weights
        ye = torch.randn(t * k, h, dtype=torch.bfloat16, device=dev)
        epos = torch.randperm(t * k, device=dev).to(torch.int32).view(t, k)
        etok = torch.empty(t * k, dtype=torch.long, device=dev)
        etok[epos.view(-1).long()] = torch.arange(t, device=dev).repeat_interleave(k)
        wflat = torch.empty(t * k, device=dev)
        wflat[epos.view(-1).long()] = w.reshape(-1)

        def index_add_weighted():
            acc = torch.zeros(t, h, dtype=torch.float32, device=dev)
            acc.index_add_(0, etok, ye.float() * wflat[:, None])
            return acc.to(torch.bfloat16)

        rows.append(_row({**base, "op": "unpermute_reduce_weighted", "rows": t * k}, ctx,
                         t * k * h * 2 + t * h * 2,
                         lambda: torch.ops.deepkernels.moe_unpermute_reduce(ye, epos, w),
                         index_add_weighted, "torch index_add", copy))
    return rows


def _ll_wire_bytes(hd, k: int, h: int) -> tuple[int, int]:
    """Bytes our low-latency dispatch / combine buffers move per rank (fp8 rows, no weights; bf16 back)."""
    fmt = moe.EPDispatcher.row_format(moe.FP8_DTYPE, h, k, fp8_scales=True, weights=False)
    r, c = hd.num_ranks, hd.capacity
    return r * (moe.SLOT_HEADER_BYTES + c * fmt.row_bytes), r * c * min(k, hd.num_local_experts) * h * 2


def _run_low_latency(ctx: Context) -> list[Row]:
    t, h, k, e = LL_GPU_CASE if ctx.is_cuda else LL_CPU_CASE
    dev = ctx.device
    base = {"tokens": t, "hidden": h, "topk": k, "experts": e, "ranks": 1, "mode": "low_latency"}
    ids, w = _routing(t, k, e, dev)
    x = torch.randn(t, h, dtype=torch.bfloat16, device=dev)
    buf = Buffer(None)
    (q, _), _, handle, _, _ = buf.low_latency_dispatch(x, ids, t, e, use_fp8=True)
    y = torch.randn(q.shape, dtype=torch.bfloat16, device=dev)
    pairs = int((ids >= 0).sum())
    wire_d, wire_c = _ll_wire_bytes(handle[1], k, h)

    # the plain PyTorch peer: the same routing maths, quantisation, and expert-major placement
    flat = ids.reshape(-1)
    key = torch.where(flat >= 0, flat, e)
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]

    def peer_positions():
        counts = torch.bincount(key, minlength=e + 1)
        start = torch.cumsum(counts, 0) - counts
        rank_in = torch.arange(flat.numel(), device=dev) - start[sorted_key]
        keep = sorted_key < e
        return (sorted_key * t + rank_in)[keep], (order // k)[keep], order[keep], counts[:e]

    def peer_dispatch():
        dst, tok, _, counts = peer_positions()
        xq, xs = per_token_cast_to_fp8_ref(x)
        out_q = torch.zeros(e * t, h, dtype=torch.uint8, device=dev)
        out_s = torch.zeros(e * t, xs.size(1), dtype=torch.float32, device=dev)
        out_q.index_copy_(0, dst, xq.view(torch.uint8).index_select(0, tok))
        out_s.index_copy_(0, dst, xs.index_select(0, tok))
        return out_q, out_s, counts

    dst, tok, slot, _ = peer_positions()

    def peer_combine():
        rows = y.view(e * t, h).index_select(0, dst).float() * w.reshape(-1)[slot].unsqueeze(1)
        acc = torch.zeros(t, h, dtype=torch.float32, device=dev)
        acc.index_add_(0, tok, rows)
        return acc.to(torch.bfloat16)

    rows = []
    for op, nbytes, wire, ours, peer in (
            ("ll_dispatch_fp8", pairs * (h + h // 128 * 4), wire_d,
             lambda: buf.low_latency_dispatch(x, ids, t, e, use_fp8=True), peer_dispatch),
            ("ll_combine_bf16", pairs * h * 2, wire_c, lambda: buf.low_latency_combine(y, ids, w, handle),
             peer_combine)):
        row = _row({**base, "op": op}, ctx, nbytes, ours, peer, "torch index_copy/index_add", None)
        row.extra.update({"wire_MB": round(wire / 1e6, 3), "collectives": 1})
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# multi-GPU end-to-end (one process per device; also runs with gloo on CPU for a smoke test)

def _ep_worker(rank: int, world: int, store_path: str, backend: str, cfg: tuple, repeats: int, queue,
               mode: str = "normal") -> None:
    try:
        _ep_step(rank, world, store_path, backend, cfg, repeats, queue, mode)
    except BaseException:  # noqa: BLE001  (the parent raises it instead of waiting for its timeout)
        import traceback

        queue.put(f"rank {rank}:\n{traceback.format_exc()}")


def _ep_step(rank: int, world: int, store_path: str, backend: str, cfg: tuple, repeats: int, queue,
             mode: str) -> None:
    import torch.distributed as dist

    if backend == "gloo":
        # a forked child must not enter the parent's OpenMP pool (it can hang); gloo over loopback
        torch.set_num_threads(1)
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    t, h, k, e = cfg
    dev = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(rank)
        ids = torch.rand(t, e, generator=g).topk(k, dim=1).indices.to(dev)
        w = torch.rand(t, k, generator=g).to(dev)
        x = torch.randn(t, h, generator=g).to(dev, torch.bfloat16)
        disp = moe.EPDispatcher(dist.group.WORLD, num_experts=e)

        def timed(fn):
            samples = []
            for i in range(repeats + 2):
                dist.barrier()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                if i >= 2:
                    samples.append(time.perf_counter() - t0)
            return statistics.median(samples)

        a2a = lambda o, i_, os_=None, is_=None: dist.all_to_all_single(o, i_, os_, is_)  # noqa: E731
        if mode == "low_latency":
            buf = Buffer(dist.group.WORLD)
            (q, _), count, handle, _, _ = buf.low_latency_dispatch(x, ids, t, e, use_fp8=True)
            y = torch.randn(q.shape, device=dev).to(torch.bfloat16)
            t_disp = timed(lambda: buf.low_latency_dispatch(x, ids, t, e, use_fp8=True))
            t_comb = timed(lambda: buf.low_latency_combine(y, ids, w, handle))
            # all_to_all_single alone on the same (fixed-size) buffers
            wire_d, wire_c = _ll_wire_bytes(handle[1], k, h)
            sd, sc = (torch.empty(n, dtype=torch.uint8, device=dev) for n in (wire_d, wire_c))
            rd, rc = torch.empty_like(sd), torch.empty_like(sc)
            t_a2a_d = timed(lambda: a2a(rd, sd))
            t_a2a_c = timed(lambda: a2a(rc, sc))
            pairs = int(count.sum())  # (token, expert) pairs received, as DeepEP counts low-latency bytes
            disp_bytes = pairs * (h + h // 128 * 4)
            comb_bytes = pairs * h * 2
        else:
            recv, hd = disp.dispatch(x, ids, w, use_fp8=True)
            y = torch.randn(hd.num_recv, h, device=dev).to(torch.bfloat16)
            t_disp = timed(lambda: disp.dispatch(x, ids, w, use_fp8=True))
            t_comb = timed(lambda: disp.combine(y, hd))
            # all_to_all alone on the same rows and splits (fp8 rows + scales; bf16 rows back)
            send8 = torch.empty(sum(hd.send_counts), h + h // 128 * 4, dtype=torch.uint8, device=dev)
            recv8 = torch.empty(hd.num_recv, send8.size(1), dtype=torch.uint8, device=dev)
            back = torch.empty(sum(hd.send_counts), h, dtype=torch.bfloat16, device=dev)
            t_a2a_d = timed(lambda: a2a(recv8, send8, hd.recv_counts, hd.send_counts))
            t_a2a_c = timed(lambda: a2a(back.view(torch.uint8), y.view(torch.uint8), hd.send_counts,
                                        hd.recv_counts))
            disp_bytes = hd.num_recv * (h + h // 128 * 4)
            comb_bytes = hd.num_recv * h * 2
        res = torch.tensor([disp_bytes / t_disp, disp_bytes / t_a2a_d, comb_bytes / t_comb, comb_bytes / t_a2a_c,
                            t_disp * 1e3, t_comb * 1e3], dtype=torch.float64)
        gathered = [torch.zeros_like(res) for _ in range(world)]
        dist.all_gather(gathered, res.to(dev) if backend == "nccl" else res)
        if rank == 0:
            queue.put(torch.stack([r.cpu() for r in gathered]).mean(0).tolist())
    finally:
        dist.destroy_process_group()


def run_multi_device(world: int, backend: str, cfg: tuple, repeats: int = 10, timeout: float = 300,
                     mode: str = "normal") -> list[Row]:
    """End-to-end dispatch/combine over ``world`` processes (NCCL: one per GPU; gloo: CPU smoke run);
    mode "normal" (EPDispatcher) or "low_latency" (Buffer.low_latency_*, capacity = tokens)."""
    ctx = torch.multiprocessing.get_context("spawn" if backend == "nccl" else "fork")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        procs = [ctx.Process(target=_ep_worker, args=(r, world, os.path.join(d, "store"), backend, cfg, repeats,
                                                       queue, mode), daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        try:
            got = queue.get(timeout=timeout)
            if isinstance(got, str):
                raise RuntimeError(f"multi-process MoE benchmark failed on {got}")
            d_alg, d_a2a, c_alg, c_a2a, d_ms, c_ms = got
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    t, h, k, e = cfg
    case = {"tokens": t, "hidden": h, "topk": k, "experts": e, "ranks": world, "backend": backend}
    prefix = "ep_ll" if mode == "low_latency" else "ep"
    return [Row(FAMILY, {**case, "op": f"{prefix}_dispatch_fp8"}, "GB/s", d_alg / 1e9, "all_to_all_single alone",
                d_a2a / 1e9, d_ms),
            Row(FAMILY, {**case, "op": f"{prefix}_combine_bf16"}, "GB/s", c_alg / 1e9, "all_to_all_single alone",
                c_a2a / 1e9, c_ms)]


def run(ctx: Context) -> list[Row]:
    rows = _run_single(ctx) + _run_low_latency(ctx)
    if ctx.is_cuda and not ctx.quick and torch.cuda.device_count() >= 2:
        rows += run_multi_device(torch.cuda.device_count(), "nccl", GPU_CASES[0][:4])
        rows += run_multi_device(torch.cuda.device_count(), "nccl", LL_GPU_CASE, mode="low_latency")
    return rows
