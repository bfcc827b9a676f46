"""MoE family: layout / permute / un-permute ops vs plain Python, EPDispatcher round trips on 1 process and
on real multi-process gloo groups (2, 3, 4 ranks), the MoE layer vs HF transformers and EP vs 1 process,
the DeepEP-style Buffer, argument validation, opcheck, and CUDA kernels vs references."""
from __future__ import annotations

import os
import tempfile
import traceback
from datetime import timedelta

import pytest
import torch

import deepkernels as dk
from deepkernels import moe
from deepkernels.moe import wire
from deepkernels.fp8 import FP8_DTYPE, per_token_cast_from_fp8, per_token_cast_to_fp8
from deepkernels.testing import calc_diff, opcheck, poison_, reference, synchronize
from torch.utils._python_dispatch import TorchDispatchMode

# ----------------------------------------------------------------------------------------------
# helpers shared by the single- and multi-process checks


def make_routing(t: int, k: int, e: int, seed: int, p_unused: float = 0.2, empty_rank: tuple | None = None):
    """Random top-k ids without repeats per row, -1 with probability p_unused, every 5th row all -1.
    empty_rank=(r, experts_per_rank): no token routes to rank r."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]) if t else torch.empty(0, k, dtype=torch.int64)
    if empty_rank is not None:
        r, per = empty_rank
        ids = torch.where((ids // per) == r, -1, ids)
    drop = torch.rand(t, k, generator=g) < p_unused
    ids = torch.where(drop, -1, ids)
    ids[::5] = -1
    w = torch.rand(t, k, generator=g)
    return ids.to(torch.int64), w


def make_tokens(rank: int, t: int, h: int, seed: int, dtype=torch.bfloat16):
    """Rank-encoded rows: column 0 = source rank, column 1 = token index (exact in bf16), rest random."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(dtype)
    if t:
        x[:, 0] = rank
        x[:, 1] = torch.arange(t, dtype=dtype)
    return x


def expected_recv(all_x, all_ids, all_w, rank: int, num_ranks: int, e: int):
    """Plain-Python model of dispatch: rows for `rank`, by source rank then token; local ids and weights."""
    per = e // num_ranks
    rows, lids, ws = [], [], []
    for s in range(num_ranks):
        for t in range(all_ids[s].size(0)):
            ids = all_ids[s][t].tolist()
            if any(i >= 0 and i // per == rank for i in ids):
                rows.append(all_x[s][t])
                lids.append([i - rank * per if i >= 0 and i // per == rank else -1 for i in ids])
                ws.append([float(all_w[s][t][j]) if lids[-1][j] >= 0 else 0.0 for j in range(len(ids))])
    h = all_x[0].size(1)
    k = all_ids[0].size(1)
    x = torch.stack(rows) if rows else torch.empty(0, h, dtype=all_x[0].dtype)
    return x, torch.tensor(lids, dtype=torch.int32).view(-1, k), torch.tensor(ws, dtype=torch.float32).view(-1, k)


def reference_moe_out(x, ids, w, expert_fn):
    """sum_j w_j * f_{e_j}(x) in fp32, the routed part of an MoE layer."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.size(0)):
        for j in range(ids.size(1)):
            e = int(ids[t, j])
            if e >= 0:
                out[t] += float(w[t, j]) * expert_fn(e, x[t:t + 1].float())[0]
    return out


def expert_fn(e, x):  # a distinct, exactly representable map per expert
    return x * (e + 1) + 0.5 * e


def run_experts_contiguous(handle, recv_x, num_local, offset, alignment=1):
    xc, m_idx = handle.to_contiguous(recv_x, alignment)
    y = torch.zeros(xc.shape, dtype=torch.float32)
    for r in range(xc.size(0)):
        if int(m_idx[r]) >= 0:
            y[r] = expert_fn(offset + int(m_idx[r]), xc[r:r + 1].float())[0]
    return handle.expert_reduce(y, "contiguous", alignment)


def run_experts_masked(handle, recv_x, num_local, offset):
    xm, masked_m = handle.to_masked(recv_x)
    y = torch.zeros(xm.shape, dtype=torch.float32)
    for l in range(num_local):
        m = int(masked_m[l])
        y[l, :m] = expert_fn(offset + l, xm[l, :m].float())
    return handle.expert_reduce(y, "masked")


def check_dispatch_combine(group, rank: int, num_ranks: int, seed: int, ts: list[int], e: int, k: int, h: int,
                           capacity: int | None = None, empty_rank: int | None = None):
    """Everything one rank checks for one routing scenario (all ranks regenerate all inputs from seeds)."""
    per = e // num_ranks
    er = (empty_rank, per) if empty_rank is not None else None
    all_x = [make_tokens(s, ts[s], h, seed * 100 + s) for s in range(num_ranks)]
    routing = [make_routing(ts[s], k, e, seed * 100 + 50 + s, empty_rank=er) for s in range(num_ranks)]
    all_ids, all_w = [r[0] for r in routing], [r[1] for r in routing]
    x, ids, w = all_x[rank], all_ids[rank], all_w[rank]
    disp = moe.EPDispatcher(group, num_experts=e, capacity=capacity)
    exp_x, exp_lid, exp_w = expected_recv(all_x, all_ids, all_w, rank, num_ranks, e)

    # bf16 dispatch: rows, order, local ids, weights, counts
    recv_x, hd = disp.dispatch(x, ids, w)
    valid = torch.ones(recv_x.size(0), dtype=torch.bool) if capacity is None else (hd.recv_local_idx >= 0).any(1)
    assert torch.equal(recv_x[valid], exp_x), f"rank {rank}: received rows differ (misrouted or misordered)"
    assert torch.equal(hd.recv_local_idx[valid], exp_lid)
    assert torch.equal(hd.recv_weights[valid], exp_w)
    assert not (hd.recv_local_idx[~valid] >= 0).any() and bool((recv_x[~valid] == 0).all())
    want_cnt = torch.bincount(exp_lid[exp_lid >= 0].long(), minlength=per)
    assert torch.equal(hd.num_recv_tokens_per_expert.long(), want_cnt)

    # exact bf16 round trip: combine sums the received rows back -> x * (number of ranks the token visited)
    back = disp.combine(recv_x, hd)
    visits = torch.zeros(ts[rank], dtype=torch.float32)
    for t in range(ts[rank]):
        visits[t] = len({int(i) // per for i in ids[t] if i >= 0})
    assert torch.equal(back, (x.float() * visits[:, None]).to(x.dtype)), f"rank {rank}: bf16 round trip not exact"

    # the full routed computation with weights applied on the expert side
    want = reference_moe_out(x, ids, w, expert_fn)
    if capacity is None:
        got = disp.combine(run_experts_contiguous(hd, recv_x, per, rank * per, alignment=4), hd)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    got = disp.combine(run_experts_masked(hd, recv_x, per, rank * per), hd)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)

    # fp8 dispatch (fused quant) == quantising the expected rows; and an (fp8, scale) pair passes through
    (rq, rs), hq = disp.dispatch(x, ids, w, use_fp8=True)
    eq, es = per_token_cast_to_fp8(exp_x)
    vq = valid if capacity is None else (hq.recv_local_idx >= 0).any(1)
    assert torch.equal(rq[vq].view(torch.uint8), eq.view(torch.uint8)) and torch.equal(rs[vq], es)
    deq = per_token_cast_from_fp8(rq, rs, torch.float32)
    back = disp.combine(deq, hq)
    assert calc_diff(back, x.float() * visits[:, None]) < 1e-3
    xq, xs = per_token_cast_to_fp8(x)
    (pq, ps), _ = disp.dispatch((xq, xs), ids, w)
    assert torch.equal(pq[vq].view(torch.uint8), eq.view(torch.uint8)) and torch.equal(ps[vq], es)


SCENARIOS = [  # (seed, tokens per rank as a function of R, E per rank, k, H, capacity, empty rank)
    (1, lambda r: [13 + 7 * i for i in range(r)], 4, 3, 256, None, None),
    (2, lambda r: [9] * (r - 1) + [0], 2, 2, 128, None, None),            # T = 0 on the last rank
    (3, lambda r: [11, 5, 8, 3][:r], 3, 4, 136, None, -1),                # no token to the last rank; H % 128 != 0
    (4, lambda r: [6, 16, 1, 9][:r], 2, 2, 128, 16, None),                # fixed capacity (no host sync)
]


def _scenarios(group, rank, world):
    for seed, tsf, per, k, h, cap, er in SCENARIOS:
        if world == 1:
            per, er = per * 4, None  # enough experts for k on one rank
        check_dispatch_combine(group, rank, world, seed, tsf(world), per * world, k, h, capacity=cap,
                               empty_rank=None if er is None else world + er)


# ----------------------------------------------------------------------------------------------
# multi-process harness (gloo over localhost, a FileStore: no port needed; bounded in time)

def _worker(rank, world, store_path, fn_name, queue):
    try:
        import torch.distributed as dist

        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        torch.set_num_threads(1)
        store = dist.FileStore(store_path, world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=60))
        try:
            globals()[fn_name](dist.group.WORLD, rank, world)
        finally:
            dist.destroy_process_group()
        queue.put((rank, None))
    except BaseException:  # noqa: BLE001  (report any failure to the parent)
        queue.put((rank, traceback.format_exc()))


def run_group(world: int, fn_name: str, timeout: float = 90.0) -> None:
    ctx = torch.multiprocessing.get_context("fork")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        procs = [ctx.Process(target=_worker, args=(r, world, os.path.join(d, "store"), fn_name, queue), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        results = {}
        try:
            for _ in range(world):
                r, err = queue.get(timeout=timeout)
                results[r] = err
        except Exception:  # noqa: BLE001
            pass
        finally:
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
    missing = [r for r in range(world) if r not in results]
    assert not missing, f"ranks {missing} did not finish within {timeout}s"
    errors = {r: e for r, e in results.items() if e}
    assert not errors, "\n".join(f"--- rank {r} ---\n{e}" for r, e in errors.items())


def _mp_scenarios(group, rank, world):
    _scenarios(group, rank, world)


def _mp_moe_layer(group, rank, world):
    """MoE over the group == the same layer (same seed, all experts) on one process, per rank's tokens."""
    from deepkernels.nn import MoE

    cfg = dict(hidden_size=64, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=3,
               n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    torch.manual_seed(123)
    full = MoE(**cfg)
    with torch.no_grad():
        full.gate.e_score_correction_bias.normal_(0, 0.1)
    ep = MoE(**cfg, group=group)
    missing, unexpected = ep.load_state_dict(full.state_dict(), strict=False)
    assert not missing, missing
    assert all(n.startswith("experts.") for n in unexpected)
    assert sorted(ep.experts.keys(), key=int) == [str(e) for e in range(rank * 8 // world, (rank + 1) * 8 // world)]
    x = torch.randn(5 + 4 * rank, 64, generator=torch.Generator().manual_seed(rank))
    torch.testing.assert_close(ep(x), full(x), rtol=1e-5, atol=1e-5)
    if rank == world - 1:  # T = 0 on one rank still takes part in the collectives
        x = x[:0]
    torch.testing.assert_close(ep(x), full(x), rtol=1e-5, atol=1e-5)
    ep_fixed = MoE(**cfg, group=group, capacity=16)
    ep_fixed.load_state_dict(full.state_dict(), strict=False)
    torch.testing.assert_close(ep_fixed(x), full(x), rtol=1e-5, atol=1e-5)


def _mp_deep_ep(group, rank, world):
    _check_deep_ep_buffer(group, rank, world)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_dispatch_combine_multiprocess(world):
    run_group(world, "_mp_scenarios")


def test_moe_layer_expert_parallel_matches_single_process():
    run_group(2, "_mp_moe_layer")


def test_deep_ep_buffer_multiprocess():
    run_group(2, "_mp_deep_ep")


def _mp_bad_ids_raise_on_every_rank(group, rank, world):
    """Normal mode, an out-of-range expert id on rank 0 only: EVERY rank's dispatch raises (the id-check flag
    travels with the counts exchange), so no rank waits forever in the rows' all_to_all; the reference path
    (ids masked for the layout) and the emulated layout kernel (its poisoned counts) alike."""
    for emulated in (False, True):
        if emulated and not dk.build_info()["emulator"]:
            continue
        with dk.emulate(emulated):
            d = moe.EPDispatcher(group, num_experts=2 * world)
            ids = torch.tensor([[0, 1], [world, -1]])
            if rank == 0:
                ids[1, 1] = 2 * world + 3
            match = rf"got {2 * world + 3} at index \[1, 1\]" if rank == 0 else \
                r"on every rank, got out-of-range ids on rank\(s\) \[0\]"
            with pytest.raises(ValueError, match=match):
                d.dispatch(torch.randn(2, 128), ids, torch.rand(2, 2))
            recv, hd = d.dispatch(torch.randn(2, 128), torch.tensor([[0, 1], [world, -1]]), torch.rand(2, 2))
            assert hd.num_recv == sum(hd.recv_counts)  # the group still works after the error


def test_bad_expert_ids_raise_on_every_rank():
    run_group(2, "_mp_bad_ids_raise_on_every_rank")


def _mp_bad_ids_fixed_capacity(group, rank, world):
    """Fixed capacity (no sync), an out-of-range id on rank 0 only (several kinds): the reference path and
    DEEPKERNELS_CHECK=1 make EVERY rank's dispatch raise after the one collective (the poisoned counts travel in
    the slot headers; before, rank 0 raised alone before it and its peers waited there until the timeout); the
    trusted emulated kernels finish on every rank: rank 0's bad tokens combine to NaN rows, every other token of
    every rank is exact, and the receivers' header count from rank 0 is negative."""
    e, cap = 2 * world, 8
    good = torch.tensor([[0, 1], [world, -1], [1, 2 * world - 1]])
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(rank))
    w = torch.rand(3, 2, generator=torch.Generator().manual_seed(10 + rank))

    def run(ids):
        d = moe.EPDispatcher(group, num_experts=e, capacity=cap)
        recv, hd = d.dispatch(x, ids, w)
        y = hd.to_masked(recv)[0] * 2 + 1
        return d.combine(hd.expert_reduce(y, "masked"), hd), d.combine_experts(y, hd), hd

    for bad in (e, e + 5, -2, 2**31 - 1, -2**31, 2**32 + 1):
        ids = good.clone()
        if rank == 0:
            ids[1, 1] = bad
        match = rf"got {bad} at index \[1, 1\]" if rank == 0 else \
            r"on every rank, got out-of-range ids on rank\(s\) \[0\]"
        for mode in ("reference", "check"):
            os.environ["DEEPKERNELS_CHECK"] = "1" if mode == "check" else ""
            try:
                with dk.emulate(mode == "check" and dk.build_info()["emulator"]):
                    with pytest.raises(ValueError, match=match):
                        run(ids)
            finally:
                os.environ.pop("DEEPKERNELS_CHECK", None)
        if not dk.build_info()["emulator"]:
            continue
        with dk.emulate():
            want_e, want_s, _ = run(good)
            got_e, got_s, hd = run(ids)
        for name, got, want in (("combine", got_e, want_e), ("combine_experts", got_s, want_s)):
            if rank == 0:
                assert got[1].isnan().all(), f"{name}: bad id {bad}: its token must combine to a NaN row"
                assert torch.equal(got[[0, 2]], want[[0, 2]]), f"{name}: bad id {bad}: rank 0's other tokens"
            else:
                assert torch.equal(got, want), f"{name}: bad id {bad} on rank 0 changed rank {rank}'s tokens"
        hdr = hd.num_recv_tokens_per_rank
        assert bool(hdr[0] < 0) and bool((hdr[1:] >= 0).all()), f"slot headers {hdr.tolist()}"


def test_bad_expert_ids_fixed_capacity_every_rank():
    run_group(2, "_mp_bad_ids_fixed_capacity")


def _mp_bad_combine_ids_one_rank(group, rank, world):
    """low_latency_combine with a topk_idx slot that is neither the dispatch's id nor -1 on rank 0 only: the
    check (reference path, DEEPKERNELS_CHECK=1) runs AFTER the combine's collective, so rank 0 raises and
    rank 1 finishes with its exact result (no rank waits); trusted emulated kernels: rank 0's token is NaN."""
    from deepkernels.compat.deep_ep import Buffer

    e = 2 * world
    ids = torch.tensor([[0, 1], [world, -1], [1, e - 1]])
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(rank)).bfloat16()
    w = torch.rand(3, 2, generator=torch.Generator().manual_seed(10 + rank))
    ids_c = ids.clone()
    if rank == 0:
        ids_c[1, 0] = e + 5
    for mode in ("reference", "check", "trusted"):
        if mode != "reference" and not dk.build_info()["emulator"]:
            continue
        os.environ["DEEPKERNELS_CHECK"] = "1" if mode == "check" else ""
        try:
            with dk.emulate(mode != "reference"):
                buf = Buffer(group)
                packed, _, handle, _, _ = buf.low_latency_dispatch(x, ids, 4, e, use_fp8=False)
                want = buf.low_latency_combine(packed, ids, w, handle)[0]
                if rank == 0 and mode != "trusted":
                    with pytest.raises(ValueError, match=rf"topk_idx: expected the expert ids given to low_latency_"
                                                         rf"dispatch \(or -1 to skip a slot\), got {e + 5} at index "
                                                         rf"\[1, 0\] where dispatch had {world}"):
                        buf.low_latency_combine(packed, ids_c, w, handle)
                    continue
                got = buf.low_latency_combine(packed, ids_c, w, handle)[0]
                if rank == 0:
                    assert got[1].float().isnan().all() and torch.equal(got[[0, 2]], want[[0, 2]]), mode
                else:
                    assert torch.equal(got, want), f"{mode}: rank 0's bad combine ids changed rank {rank}'s result"
        finally:
            os.environ.pop("DEEPKERNELS_CHECK", None)


def test_bad_combine_ids_on_one_rank_leave_no_rank_waiting():
    run_group(2, "_mp_bad_combine_ids_one_rank")


def test_dispatch_combine_single_process():
    _scenarios(None, 0, 1)


# ----------------------------------------------------------------------------------------------
# ops vs plain Python


LAYOUT_CASES = [(0, 2, 8, 2), (1, 4, 8, 4), (37, 8, 32, 4), (64, 3, 12, 3), (5, 1, 6, 1)]


def python_layout(ids, e, r):
    per = e // r
    per_rank, per_expert = [0] * r, [0] * e
    in_rank = [[False] * r for _ in ids]
    for t, row in enumerate(ids):
        for i in row:
            if i >= 0:
                per_expert[i] += 1
                in_rank[t][i // per] = True
        for rr in range(r):
            per_rank[rr] += in_rank[t][rr]
    return per_rank, per_expert, in_rank


@pytest.mark.parametrize("t,k,e,r", LAYOUT_CASES)
def test_layout_vs_python(t, k, e, r):
    ids, _ = make_routing(t, k, e, seed=t)
    pr, pe, inr = moe.get_dispatch_layout(ids, e, r)
    assert pr.dtype == torch.int32 and pe.dtype == torch.int32 and inr.dtype == torch.bool
    wr, we, wi = python_layout(ids.tolist(), e, r)
    assert pr.tolist() == wr and pe.tolist() == we and inr.tolist() == (wi if t else [])


def test_permute_and_unpermute_vs_python():
    x = torch.randn(7, 40)
    src = torch.tensor([3, -1, 0, 6, 6, -1], dtype=torch.int32)
    out = moe.permute(x, src)
    for i, s in enumerate(src.tolist()):
        assert torch.equal(out[i], x[s] if s >= 0 else torch.zeros(40))
    q, s = moe.permute_fp8(x.bfloat16(), src)
    wq, ws = per_token_cast_to_fp8(moe.permute(x.bfloat16(), src))
    assert torch.equal(q.view(torch.uint8), wq.view(torch.uint8)) and torch.equal(s, ws)
    pos = torch.tensor([[0, 3, -1], [-1, -1, -1], [5, 5, 1]], dtype=torch.int32)
    w = torch.rand(3, 3)
    y = torch.randn(6, 40)
    got = moe.unpermute_reduce(y, pos, w)
    for t in range(3):
        want = sum((w[t, j] * y[pos[t, j]] for j in range(3) if pos[t, j] >= 0), torch.zeros(40))
        torch.testing.assert_close(got[t], want)
    torch.testing.assert_close(moe.unpermute_reduce(y, pos), moe.unpermute_reduce(y, pos, torch.ones(3, 3)))


def test_positions_helpers():
    inr = torch.tensor([[True, False], [True, True], [False, False], [False, True]])
    pos = moe.dispatch_positions(inr)
    assert pos.tolist() == [[0, -1], [1, 2], [-1, -1], [-1, 3]]
    assert moe.positions_to_src_idx(pos, 4).tolist() == [0, 1, 1, 3]
    assert moe.dispatch_positions(inr, capacity=5).tolist() == [[0, -1], [1, 5], [-1, -1], [-1, 6]]
    lid = torch.tensor([[1, -1], [0, 1], [-1, -1]], dtype=torch.int32)
    assert moe.expert_positions(lid, 2, torch.tensor([0, 4])).tolist() == [[4, -1], [0, 5], [-1, -1]]


def test_opcheck():
    ids, _ = make_routing(9, 3, 8, seed=0)
    opcheck(torch.ops.deepkernels.moe_get_dispatch_layout, (ids, 8, 2))
    x = torch.randn(9, 130, dtype=torch.bfloat16)
    src = torch.tensor([2, -1, 8, 0], dtype=torch.int32)
    opcheck(torch.ops.deepkernels.moe_permute, (x, src))
    opcheck(torch.ops.deepkernels.moe_permute, (per_token_cast_to_fp8(x)[0], src))
    opcheck(torch.ops.deepkernels.moe_permute_no_fill, (x, src))
    opcheck(torch.ops.deepkernels.moe_permute_fp8, (x, src))
    pos = torch.tensor([[0, 3], [-1, -1], [1, 1]], dtype=torch.int32)
    opcheck(torch.ops.deepkernels.moe_unpermute_reduce, (x[:4], pos, torch.rand(3, 2)))
    opcheck(torch.ops.deepkernels.moe_unpermute_reduce, (x[:4], pos, None))


def test_torch_compile_fixed_capacity():
    disp = moe.EPDispatcher(None, num_experts=8, capacity=8)

    def step(x, ids, w):
        recv, hd = disp.dispatch(x, ids, w)
        return disp.combine(recv, hd)

    ids, w = make_routing(6, 2, 8, seed=3)
    x = torch.randn(6, 128)
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, ids, w), step(x, ids, w))
    # an out-of-range id: a traced graph reads nothing on the host, so the reference path cannot check the ids
    # after the collective; the token is poisoned as on the kernels and the reference reduce names it
    # (eager: the dispatch's own check). Either way after the collectives: no peer is left waiting.
    ids[1, 1] = 9
    with pytest.raises(ValueError, match=r"pos: expected row indices of y in \[-1, 8\), got POISON_POS "
                                         r"\(-2147483648\) at index \[1, 0\]: token 1 was poisoned upstream"):
        compiled(x, ids, w)
    with pytest.raises(ValueError, match=r"topk_idx: expected expert ids in \[0, 8\) or -1 \(unused\), got 9"):
        step(x, ids, w)


# ----------------------------------------------------------------------------------------------
# the MoE layer vs HF transformers


def _hf_moe_pair(dtype, fp8=False):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    from deepkernels.nn import MoE

    cfg = DeepseekV3Config(hidden_size=64, moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=4,
                           n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                           norm_topk_prob=True)
    hf = DeepseekV3MoE(cfg).to(dtype)
    m = MoE(64, 32, 16, 4, 1, 4, 2, 2.5, dtype=dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
        m.gate.e_score_correction_bias.normal_(0, 0.1)
        hf.gate.weight.copy_(m.gate.weight)
        hf.gate.e_score_correction_bias.copy_(m.gate.e_score_correction_bias)
        for e in range(16):
            ex = m.experts[str(e)]
            hf.experts.gate_up_proj[e].copy_(torch.cat([ex.gate_proj.weight, ex.up_proj.weight]))
            hf.experts.down_proj[e].copy_(ex.down_proj.weight)
        for n in ("gate_proj", "up_proj", "down_proj"):
            getattr(hf.shared_experts, n).weight.copy_(getattr(m.shared_experts, n).weight)
    return m, hf


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_matches_hf(dtype):
    m, hf = _hf_moe_pair(dtype)
    x = torch.randn(3, 7, 64).to(dtype)
    with torch.no_grad():
        a, b = m(x), hf(x)
    assert a.dtype == dtype and a.shape == x.shape
    if dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    else:  # HF rounds every expert's weighted output to bf16 before summing; we accumulate in fp32
        assert calc_diff(a, b) < 1e-4
    assert "gate.e_score_correction_bias" in m.state_dict()
    assert "experts.15.down_proj.weight" in m.state_dict() and "shared_experts.up_proj.weight" in m.state_dict()


def test_moe_fp8_state_dict_and_fp8_dispatch():
    from deepkernels.nn import MoE

    m = MoE(128, 128, 4, 2, 1, 2, 1, 1.0, fp8=True, fp8_dispatch=True)
    keys = m.state_dict().keys()
    assert {"experts.3.gate_proj.weight", "experts.3.gate_proj.weight_scale_inv",
            "shared_experts.down_proj.weight_scale_inv"} <= set(keys)
    for mod in m.modules():
        if isinstance(mod, dk.nn.Fp8Linear):
            w = torch.randn(mod.out_features, mod.in_features) * 0.05
            mod.weight.data, mod.weight_scale_inv.data = dk.per_block_cast_to_fp8(w)
    x = torch.randn(9, 128, dtype=torch.bfloat16)
    y = m(x)
    m.fp8_dispatch = False
    assert calc_diff(y.float(), m(x).float()) < 1e-3


# ----------------------------------------------------------------------------------------------
# validation


def test_bad_inputs():
    ids = torch.tensor([[0, 9]])
    with pytest.raises(ValueError, match=r"topk_idx: expected expert ids in \[0, 8\)"):
        moe.get_dispatch_layout(ids, 8, 2)
    with pytest.raises(ValueError, match="topk_idx: expected expert ids"):
        moe.get_dispatch_layout(torch.tensor([[-2, 1]]), 8, 2)
    with pytest.raises(ValueError, match="num_experts: expected a multiple of num_ranks=3"):
        moe.get_dispatch_layout(torch.tensor([[0, 1]]), 8, 3)
    with pytest.raises(ValueError, match="topk_idx: expected dtype int64, got int32"):
        moe.get_dispatch_layout(torch.tensor([[0, 1]], dtype=torch.int32), 8, 2)
    disp = moe.EPDispatcher(None, num_experts=8)
    x, w = torch.randn(1, 128), torch.rand(1, 2)
    with pytest.raises(ValueError, match=r"topk_idx: expected expert ids in \[0, 8\)"):
        disp.dispatch(x, ids, w)
    with pytest.raises(ValueError, match="x: expected dtype float32 or bfloat16 or float16, got int32"):
        disp.dispatch(x.int(), torch.tensor([[0, 1]]), w)
    with pytest.raises(ValueError, match="topk_idx: expected 1 rows"):
        disp.dispatch(x, torch.tensor([[0, 1], [1, 2]]), w)
    with pytest.raises(ValueError, match=r"topk_weights: expected shape \[1, 2\]"):
        disp.dispatch(x, torch.tensor([[0, 1]]), torch.rand(1, 3))
    with pytest.raises(ValueError, match=r"x: expected at most capacity=0 tokens \(fixed-capacity mode\), got 1"):
        moe.EPDispatcher(None, num_experts=8, capacity=0).dispatch(x, torch.tensor([[0, 1]]), w)
    recv, hd = disp.dispatch(x, torch.tensor([[0, 1]]), w)
    with pytest.raises(ValueError, match=r"y: expected shape \[1, \*\]"):
        disp.combine(torch.randn(2, 128), hd)
    with pytest.raises(ValueError, match="src_idx: expected dtype int32"):
        moe.permute(x, torch.tensor([0]))
    with pytest.raises(ValueError, match="x: expected dtype float32 or bfloat16 or float16"):
        moe.permute_fp8(per_token_cast_to_fp8(x)[0], torch.tensor([0], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"weights: expected shape \[1, 1\]"):
        moe.unpermute_reduce(x, torch.tensor([[0]], dtype=torch.int32), torch.rand(1, 2))
    with pytest.raises(ValueError, match="num_experts: expected an int >= 1, got 0"):
        moe.EPDispatcher(None, num_experts=0)


# ----------------------------------------------------------------------------------------------
# DeepEP-style Buffer


def _check_deep_ep_buffer(group, rank, world):
    from deepkernels.compat.deep_ep import Buffer

    e, k, h = 4 * world, 3, 256
    ts = [10 + 3 * s for s in range(world)]
    all_x = [make_tokens(s, ts[s], h, 900 + s) for s in range(world)]
    routing = [make_routing(ts[s], k, e, 950 + s) for s in range(world)]
    x, (ids, w) = all_x[rank], routing[rank]
    buf = Buffer(group)
    pr, _, pe, inr, _ = buf.get_dispatch_layout(ids, e)
    wr, we, wi = python_layout(ids.tolist(), e, world)
    assert pr.tolist() == wr and pe.tolist() == we and inr.tolist() == wi
    recv_x, recv_ids, recv_w, counts, handle, _ = buf.dispatch(
        x, topk_idx=ids, topk_weights=w, num_tokens_per_rank=pr, is_token_in_rank=inr, num_tokens_per_expert=pe)
    exp_x, exp_lid, exp_w = expected_recv(all_x, [r[0] for r in routing], [r[1] for r in routing], rank, world, e)
    assert torch.equal(recv_x, exp_x) and torch.equal(recv_ids, exp_lid.long()) and torch.equal(recv_w, exp_w)
    assert counts == torch.bincount(exp_lid[exp_lid >= 0].long(), minlength=e // world).tolist()
    combined, combined_w, _ = buf.combine(recv_x, handle, topk_weights=recv_w)
    visits = torch.tensor([len({int(i) // (e // world) for i in row if i >= 0}) for row in ids], dtype=torch.float32)
    assert torch.equal(combined, (x.float() * visits[:, None]).to(x.dtype))
    torch.testing.assert_close(combined_w, torch.where(ids >= 0, w, 0.0))
    # low-latency mode: expert-major buffers, weights applied in the combine
    cap = max(ts)
    packed, count, ll_handle, _, hook = buf.low_latency_dispatch(x, ids, cap, e, use_fp8=False,
                                                                  return_recv_hook=True)
    hook()
    per = e // world
    assert packed.shape == (per, world * cap, h)
    assert count.tolist() == torch.bincount(exp_lid[exp_lid >= 0].long(), minlength=per).tolist()
    for l in range(per):  # each local expert's rows: its tokens, by source rank then token
        want_rows = exp_x[(exp_lid == l).any(1)]
        assert torch.equal(packed[l, :int(count[l])], want_rows)
    y = packed.float() * (torch.arange(per).view(per, 1, 1) + rank * per + 1)  # expert e scales by e + 1
    combined, _, _ = buf.low_latency_combine(y, ids, w, ll_handle)
    want = reference_moe_out(x, ids, w, lambda ex, v: v * (ex + 1))
    torch.testing.assert_close(combined, want, rtol=1e-5, atol=1e-4)
    (pq, ps), count8, _, _, _ = buf.low_latency_dispatch(x, ids, cap, e, use_fp8=True)
    assert ps.shape == (per, world * cap, h // 128) and torch.equal(count8, count)
    (rq, rs), *_ = buf.dispatch((per_token_cast_to_fp8(x)), handle=handle)
    eq, es = per_token_cast_to_fp8(exp_x)
    assert torch.equal(rq.view(torch.uint8), eq.view(torch.uint8)) and torch.equal(rs, es)


def test_deep_ep_buffer_single_process():
    _check_deep_ep_buffer(None, 0, 1)


# ----------------------------------------------------------------------------------------------
# CUDA kernels vs references (same cases): on the GPU (`-m cuda`) and on CPU tensors through the SIMT
# emulator (`-m emu`, the unchanged kernels). The oracle is the *_ref function or the op run under
# deepkernels.testing.reference() (emulation off), never the emulated op itself.

# H = 135: odd rows (permute copies 1 byte at a time for bf16 and fp8, 4 bytes for fp32; scalar quant /
# reduce paths); H = 130: 4-byte bf16 permute rows.
CUDA_CASES = [(0, 1, 8, 7168), (1, 8, 256, 7168), (37, 8, 32, 256), (4096, 8, 256, 7168), (128, 8, 256, 7168),
              (300, 6, 64, 200), (19, 4, 16, 135), (23, 3, 24, 130)]
# small enough to emulate: every row width / vector path of the CUDA cases, fewer rows
EMU_CASES = [(0, 1, 8, 7168), (1, 8, 256, 7168), (37, 8, 32, 256), (40, 6, 64, 200), (19, 4, 16, 135),
             (23, 3, 24, 130)]


def _device_cases(argnames: str, cuda_cases: list, emu_cases: list) -> pytest.MarkDecorator:
    """Parametrize ``kernel_device`` (indirectly, with the fixture's marks) together with ``argnames``:
    ``cuda_cases`` on "cuda", ``emu_cases`` (sized for the emulator) on "emu"."""
    params = [pytest.param("cuda", *c, marks=pytest.mark.cuda) for c in cuda_cases]
    params += [pytest.param("emu", *c, marks=pytest.mark.emu) for c in emu_cases]
    return pytest.mark.parametrize("kernel_device," + argnames, params, indirect=["kernel_device"])


def _with_ranks(cases: list) -> list:
    return [(t, k, e, h, r) for t, k, e, h in cases for r in (1, 8, 16) if e % r == 0]


# T = 0 launches nothing (layout, un-permute): not an emulated case
@_device_cases("t,k,e,h,r", _with_ranks(CUDA_CASES), _with_ranks([c for c in EMU_CASES if c[0]]))
def test_cuda_layout(kernel_device, t, k, e, h, r):
    ids, _ = make_routing(t, k, e, seed=t)
    ids = ids.to(kernel_device)
    got = torch.ops.deepkernels.moe_get_dispatch_layout(ids, e, r)
    want = moe.moe_get_dispatch_layout_ref(ids.cpu(), e, r)
    for g, w_ in zip(got, want):
        assert g.dtype == w_.dtype and torch.equal(g.cpu(), w_)


@_device_cases("t,k,e,h", CUDA_CASES, EMU_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, FP8_DTYPE])
def test_cuda_permute(kernel_device, t, k, e, h, dtype):
    x = torch.randn(t, h, device=kernel_device).to(dtype)
    ids, _ = make_routing(t, k, e, seed=t)
    with reference():
        _, _, inr = moe.get_dispatch_layout(ids, e, 8 if e % 8 == 0 else 1)
        pos = moe.dispatch_positions(inr)
        src = moe.positions_to_src_idx(pos, int(inr.sum()) + 3).to(kernel_device)  # + 3 zero rows
    got = torch.ops.deepkernels.moe_permute(x, src)
    want = moe.moe_permute_ref(x.cpu(), src.cpu())
    assert torch.equal(got.cpu().view(torch.uint8), want.view(torch.uint8))
    if dtype != FP8_DTYPE:
        q, s = torch.ops.deepkernels.moe_permute_fp8(x, src)
        wq, ws = moe.moe_permute_fp8_ref(x.cpu(), src.cpu())
        assert torch.equal(s.cpu(), ws)
        assert (q.cpu().view(torch.uint8) != wq.view(torch.uint8)).float().mean() < 1e-4  # rare 1-ulp ties


@_device_cases("t,k,e,h", CUDA_CASES, [c for c in EMU_CASES if c[0]])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("weighted", [False, True])
def test_cuda_unpermute_reduce(kernel_device, t, k, e, h, dtype, weighted):
    n = max(1, t * k // 2)
    y = torch.randn(n, h, device=kernel_device).to(dtype)
    pos = torch.randint(-1, n, (t, k), dtype=torch.int32, device=kernel_device)
    w = torch.rand(t, k, device=kernel_device) if weighted else None
    got = torch.ops.deepkernels.moe_unpermute_reduce(y, pos, w)
    want = moe.moe_unpermute_reduce_ref(y.cpu(), pos.cpu(), None if w is None else w.cpu())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5 if dtype == torch.float32 else 8e-3, atol=1e-5)


def test_cuda_dispatch_combine_and_moe(kernel_device):
    disp = moe.EPDispatcher(None, num_experts=16)
    ids, w = make_routing(64, 4, 16, seed=7)
    x = torch.randn(64, 512, dtype=torch.bfloat16)
    with reference():
        recv_c, hd_c = disp.dispatch(x, ids, w)
        back_c = disp.combine(recv_c, hd_c)
    recv, hd = disp.dispatch(x.to(kernel_device), ids.to(kernel_device), w.to(kernel_device))
    assert torch.equal(recv.cpu(), recv_c)
    back = disp.combine(poison_(torch.empty_like(recv)).copy_(recv), hd)
    assert torch.equal(back.cpu(), back_c)
    m, _ = _hf_moe_pair(torch.float32)
    xx = torch.randn(2, 5, 64)
    got = m.to(kernel_device)(xx.to(kernel_device)).cpu()
    with reference():
        want = m.cpu()(xx)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_cuda_fixed_capacity_graph_capture(kernel_device):
    """Fixed-capacity dispatch -> masked layout -> weighted expert reduce -> combine has no host sync:
    it captures into a CUDA graph and replays to the eager result (on the GPU), and the eager result is the
    reference's (on the GPU and emulated)."""
    disp = moe.EPDispatcher(None, num_experts=16, capacity=64)
    ids, w = make_routing(64, 4, 16, seed=11)
    x = torch.randn(64, 256, dtype=torch.bfloat16)

    def step(x, ids, w):
        recv, hd = disp.dispatch(x, ids, w)
        xm, masked_m = hd.to_masked(recv)
        y = xm.float() * (torch.arange(16, device=x.device).view(16, 1, 1) + 1)
        return disp.combine(hd.expert_reduce(y, "masked").to(torch.bfloat16), hd)

    with reference():
        want_ref = step(x, ids, w)
    x, ids, w = x.to(kernel_device), ids.to(kernel_device), w.to(kernel_device)
    want = step(x, ids, w)
    synchronize(kernel_device)
    assert torch.equal(want.cpu(), want_ref)
    if kernel_device != "cuda":
        with HostSyncDetector() as hs:
            step(x, ids, w)
        assert hs.syncs == [], f"host syncs on the fixed-capacity path: {hs.syncs}"
        return
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step(x, ids, w)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = step(x, ids, w)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------------------------
# grouped FP8 GEMM expert path, against a reference implementation of the GEMM family's contract


class _FakeGroupedGemm:
    """torch implementation of deepkernels.gemm's grouped contract (DeepGEMM conventions)."""

    @staticmethod
    def get_m_alignment_for_contiguous_layout():
        return 8

    @staticmethod
    def _dq(q, s, rows_per_scale):
        return dk.per_block_cast_from_fp8(q, s, torch.float32) if rows_per_scale == 128 else \
            per_token_cast_from_fp8(q, s, torch.float32)

    @classmethod
    def m_grouped_fp8_gemm_nt_contiguous(cls, a, a_scale, b, b_scale, out, m_indices):
        x = cls._dq(a, a_scale, 1)
        for r in range(a.size(0)):
            g = int(m_indices[r])
            if g >= 0:
                out[r] = (x[r:r + 1] @ cls._dq(b[g], b_scale[g], 128).t())[0].to(out.dtype)

    @classmethod
    def m_grouped_fp8_gemm_nt_masked(cls, a, a_scale, b, b_scale, out, masked_m, expected_m):
        for g in range(a.size(0)):
            m = int(masked_m[g])
            x = cls._dq(a[g, :m].contiguous(), a_scale[g, :m].contiguous(), 1)
            out[g, :m] = (x @ cls._dq(b[g], b_scale[g], 128).t()).to(out.dtype)


@pytest.mark.parametrize("capacity", [None, 32])
def test_moe_grouped_gemm_path(monkeypatch, capacity):
    import sys

    from deepkernels.nn import MoE

    monkeypatch.setitem(sys.modules, "deepkernels.gemm", _FakeGroupedGemm)
    monkeypatch.setattr(dk, "gemm", _FakeGroupedGemm, raising=False)
    m = MoE(128, 128, 4, 2, 1, 2, 1, 1.5, fp8=True, capacity=capacity, dtype=torch.bfloat16)
    for mod in m.modules():
        if isinstance(mod, dk.nn.Fp8Linear):
            w = torch.randn(mod.out_features, mod.in_features) * 0.05
            mod.weight.data, mod.weight_scale_inv.data = dk.per_block_cast_to_fp8(w)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(9, 128, dtype=torch.bfloat16)
    m.use_grouped_gemm = False
    want = m(x)
    m.use_grouped_gemm = True
    got = m(x)
    assert calc_diff(got.float(), want.float()) < 1e-4
    # the experts' parameters now view the stacked storage; state_dict keys and values unchanged
    w13 = m.stacked_expert_weights()[0]
    assert m.experts["1"].up_proj.weight.data_ptr() == w13[1, 128:].data_ptr()
    sd2 = m.state_dict()
    assert sd2.keys() == sd.keys() and all(torch.equal(sd2[k].view(torch.uint8) if sd2[k].dtype == FP8_DTYPE
                                                       else sd2[k], sd[k].view(torch.uint8)
                                                       if sd[k].dtype == FP8_DTYPE else sd[k]) for k in sd)
    # loading new weights (in-place copy) reaches the stacked tensors
    new_w, new_s = dk.per_block_cast_to_fp8(torch.randn(128, 128) * 0.05)
    m.load_state_dict({"experts.0.down_proj.weight": new_w, "experts.0.down_proj.weight_scale_inv": new_s},
                      strict=False)
    assert torch.equal(m.stacked_expert_weights()[2][0].view(torch.uint8), new_w.view(torch.uint8))


def test_cuda_host_syncs(kernel_device):
    """Normal mode: exactly one host sync (the counts) per dispatch, none in layouts/reduce/combine;
    fixed-capacity mode: none at all. On the GPU counted by the sync debug mode; emulated (CPU tensors,
    where nothing blocks) by HostSyncDetector, which records every read of tensor data on the host."""
    import warnings

    ids, w = make_routing(64, 4, 16, seed=5)
    ids, w = ids.to(kernel_device), w.to(kernel_device)
    x = torch.randn(64, 256, device=kernel_device, dtype=torch.bfloat16)

    def count_syncs(fn):
        if kernel_device != "cuda":
            with HostSyncDetector() as hs:
                result = fn()
            return result, len(hs.syncs)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                result = fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return result, sum("synchroniz" in str(c.message) for c in caught)

    disp = moe.EPDispatcher(None, num_experts=16)
    (recv, hd), n = count_syncs(lambda: disp.dispatch(x, ids, w))
    # on CPU tensors the one .cpu() copies nothing and each read of its result counts as a data read
    assert n == 1 if kernel_device == "cuda" else n >= 1
    _, n = count_syncs(lambda: disp.combine(hd.expert_reduce(hd.to_contiguous(recv, 8)[0].float(),
                                                             "contiguous", 8).bfloat16(), hd))
    assert n == 0
    fixed = moe.EPDispatcher(None, num_experts=16, capacity=64)

    def fixed_step():
        r, h = fixed.dispatch(x, ids, w, use_fp8=True)
        xm, _ = h.to_masked(r)
        q, s = xm
        deq = per_token_cast_from_fp8(q.view(-1, 256), s.view(-1, 2), torch.float32).view(q.shape)
        return fixed.combine(h.expert_reduce(deq, "masked").bfloat16(), h)

    _, n = count_syncs(fixed_step)
    assert n == 0


# ----------------------------------------------------------------------------------------------
# low-latency mode: ONE fused all_to_all_single per dispatch and per combine, no host sync


class HostSyncDetector(TorchDispatchMode):
    """Records every op on the path that needs tensor DATA on the host. On CUDA these are exactly the
    calls that block the host (a sync); here they are caught on CPU tensors, where nothing would block:
    a Python scalar read (item / int() / bool() / float() all end in aten::_local_scalar_dense), ops
    whose output SHAPE depends on tensor values (nonzero, masked_select, unique, bincount,
    repeat_interleave without output_size, equal/allclose), and copies to another device (a D2H copy).
    tolist() / numpy() read memory without dispatching an op, so they are wrapped as well."""

    DATA_READS = {"_local_scalar_dense", "item", "nonzero", "nonzero_static", "masked_select", "unique_dim",
                  "_unique", "_unique2", "unique_consecutive", "bincount", "equal", "allclose", "is_nonzero"}

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []
        self._saved = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if name in self.DATA_READS:
            self.syncs.append(str(func))
        elif name == "repeat_interleave" and func._overloadname in ("Tensor", "self_Tensor") \
                and kwargs.get("output_size") is None and (len(args) < 4 or args[3] is None):
            self.syncs.append(str(func))
        elif name in ("_to_copy", "to") and kwargs.get("device") is not None and args and \
                isinstance(args[0], torch.Tensor) and torch.device(kwargs["device"]) != args[0].device:
            self.syncs.append(str(func))
        return func(*args, **kwargs)

    def __enter__(self):
        for meth in ("tolist", "numpy"):
            orig = getattr(torch.Tensor, meth)
            self._saved[meth] = orig

            def wrapped(t, *a, _orig=orig, _name=meth, **kw):
                self.syncs.append(f"Tensor.{_name}")
                return _orig(t, *a, **kw)
            setattr(torch.Tensor, meth, wrapped)
        return super().__enter__()

    def __exit__(self, *exc):
        for meth, orig in self._saved.items():
            setattr(torch.Tensor, meth, orig)
        return super().__exit__(*exc)


class CollectiveCounter:
    """Counts the collectives a block issues: every torch.distributed collective by name, and the
    dispatcher's wire calls (EPDispatcher._a2a: the one place bytes leave a rank, also with group=None)."""

    NAMES = ("all_to_all_single", "all_to_all", "all_reduce", "all_gather", "all_gather_into_tensor", "broadcast",
             "reduce_scatter_tensor", "barrier", "send", "recv", "isend", "irecv", "gather", "scatter")

    def __enter__(self):
        import torch.distributed as dist

        self.calls, self.wire, self._saved = [], 0, {}
        for n in self.NAMES:
            if hasattr(dist, n):
                orig = getattr(dist, n)
                self._saved[(dist, n)] = orig

                def wrapped(*a, _orig=orig, _n=n, **kw):
                    self.calls.append(_n)
                    return _orig(*a, **kw)
                setattr(dist, n, wrapped)
        orig_a2a = moe.EPDispatcher._a2a
        self._saved[(moe.EPDispatcher, "_a2a")] = orig_a2a

        def a2a(disp, *a, **kw):
            self.wire += 1
            return orig_a2a(disp, *a, **kw)
        moe.EPDispatcher._a2a = a2a
        return self

    def __exit__(self, *exc):
        for (owner, n), orig in self._saved.items():
            setattr(owner, n, orig)

    def expect(self, group, n: int, what: str) -> None:
        assert self.wire == n, f"{what}: expected {n} wire exchange(s), got {self.wire}"
        want = ["all_to_all_single"] * n if group is not None else []
        assert self.calls == want, f"{what}: expected collectives {want}, got {self.calls}"


def step_checks(group, what: str, n_collectives: int, fn):
    """Run fn() counting collectives and host data reads; expect n_collectives all_to_all_single, no sync."""
    with CollectiveCounter() as cc, HostSyncDetector() as hs:
        result = fn()
    cc.expect(group, n_collectives, what)
    assert hs.syncs == [], f"{what}: host syncs on the path: {hs.syncs}"
    return result


def pow2_weights(w):
    """Weights rounded down to powers of two in [1/16, 1/2]: every product and sum below is exact in fp32."""
    return torch.exp2(torch.floor(torch.log2(w.clamp(1 / 16, 0.5))))


def kept_slots(all_ids, src_rank: int, num_ranks: int, e: int, max_m: int):
    """[T, k] bool for source rank `src_rank`: the (token, slot) entries each destination's masked layout
    keeps with max_m rows per expert (an expert's first max_m entries by source rank, token, slot)."""
    seen = [0] * e  # entries per (global) expert so far
    keep = None
    for s in range(num_ranks):  # destinations see sources in rank order, each in (token, slot) order
        mask = torch.zeros(all_ids[s].shape, dtype=torch.bool)
        for t in range(all_ids[s].size(0)):
            for j in range(all_ids[s].size(1)):
                ex = int(all_ids[s][t, j])
                if ex >= 0:
                    mask[t, j] = seen[ex] < max_m
                    seen[ex] += 1
        if s == src_rank:
            keep = mask
    return keep


def routed_sum(x, ids, w, scale_of_expert, keep=None):
    """sum_j w_j * x * scale(e_j) over used (and kept) slots, in float64 (exact for the test data)."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.size(0)):
        for j in range(ids.size(1)):
            ex = int(ids[t, j])
            if ex >= 0 and (keep is None or keep[t, j]):
                out[t] += float(w[t, j]) * scale_of_expert(ex) * x[t].double()
    return out


def check_low_latency(group, rank: int, num_ranks: int, seed: int, ts: list[int], e: int, k: int, h: int, cap: int):
    from deepkernels.compat.deep_ep import Buffer

    per = e // num_ranks
    all_x = [make_tokens(s, ts[s], h, seed * 100 + s) for s in range(num_ranks)]
    routing = [make_routing(ts[s], k, e, seed * 100 + 50 + s) for s in range(num_ranks)]
    all_ids, all_w = [r[0] for r in routing], [pow2_weights(r[1]) for r in routing]
    x, ids, w = all_x[rank], all_ids[rank], all_w[rank]
    exp_x, exp_lid, _ = expected_recv(all_x, all_ids, all_w, rank, num_ranks, e)
    want_count = torch.bincount(exp_lid[exp_lid >= 0].long(), minlength=per)
    gid_scale = lambda ex: ex + 1  # noqa: E731  (expert ex multiplies by ex + 1: exact in fp32)
    expert_scale = (torch.arange(per) + rank * per + 1).view(per, 1, 1)

    # --- DeepEP-style Buffer, bf16: rows per local expert by source rank then token, exact round trip
    buf = Buffer(group)
    packed, count, handle, _, hook = step_checks(
        group, "low_latency_dispatch bf16", 1,
        lambda: buf.low_latency_dispatch(x, ids, cap, e, use_fp8=False, return_recv_hook=True))
    hook()
    assert packed.shape == (per, num_ranks * cap, h) and packed.dtype == x.dtype
    assert count.dtype == torch.int32 and torch.equal(count.long(), want_count), (count, want_count)
    for l in range(per):
        rows = exp_x[(exp_lid == l).any(1)]
        assert torch.equal(packed[l, :rows.size(0)], rows), f"rank {rank}: expert {l} rows misrouted or misordered"
        assert bool((packed[l, rows.size(0):] == 0).all())
    y = packed.float() * expert_scale
    combined, _, _ = step_checks(group, "low_latency_combine", 1, lambda: buf.low_latency_combine(y, ids, w, handle))
    assert combined.dtype == torch.float32
    assert torch.equal(combined, routed_sum(x, ids, w, gid_scale).float()), f"rank {rank}: combine not exact"
    # bf16 expert outputs: one rounding at the end, exact otherwise
    out = torch.empty(ts[rank], h, dtype=torch.bfloat16)
    combined16, _, _ = buf.low_latency_combine(packed, ids, w, handle, out=out)
    assert combined16 is out and torch.equal(out, routed_sum(x, ids, w, lambda ex: 1).to(torch.bfloat16))
    # slots set to -1 at combine time are skipped
    ids_c = ids.clone()
    ids_c[:, 0] = -1
    combined, _, _ = buf.low_latency_combine(y, ids_c, w, handle)
    assert torch.equal(combined, routed_sum(x, ids_c, w, gid_scale).float())

    # --- fp8: e4m3 + column-major per-128 scales, bit-identical to quantising the expected rows
    stats = torch.zeros(per, dtype=torch.int32)
    (q, s), count8, handle8, _, _ = step_checks(group, "low_latency_dispatch fp8", 1, lambda: buf.low_latency_dispatch(
        x, ids, cap, e, cumulative_local_expert_recv_stats=stats, use_fp8=True))
    assert q.dtype == FP8_DTYPE and s.shape == (per, num_ranks * cap, h // 128) and s.stride(1) == 1
    assert torch.equal(count8, count) and torch.equal(stats, count)
    for l in range(per):
        n = int(count[l])
        eq, es = per_token_cast_to_fp8(exp_x[(exp_lid == l).any(1)])
        assert torch.equal(q[l, :n].view(torch.uint8), eq.view(torch.uint8)) and torch.equal(s[l, :n], es)
    deq = per_token_cast_from_fp8(q.reshape(-1, h), s.reshape(-1, h // 128), torch.float32).view(q.shape)
    combined8, _, _ = step_checks(group, "low_latency_combine fp8", 1, lambda: buf.low_latency_combine(
        deq * expert_scale, ids, w, handle8))
    exact = routed_sum(x, ids, w, gid_scale).float()
    assert calc_diff(combined8, exact) < 1e-3 if ts[rank] else combined8.shape == (0, h)

    # --- native fixed-capacity dispatcher: header counts, source indices, both combines, 1 collective each
    disp = moe.EPDispatcher(group, num_experts=e, capacity=cap)
    recv, hd = step_checks(group, "EPDispatcher.dispatch (fixed)", 1, lambda: disp.dispatch(x, ids, w))
    sent_here = [sum(1 for row in all_ids[src] if any(int(i) >= 0 and int(i) // per == rank for i in row))
                 for src in range(num_ranks)]
    assert hd.num_recv_tokens_per_rank.tolist() == sent_here
    valid = hd.recv_src_token >= 0
    assert torch.equal(recv[valid], exp_x) and torch.equal(recv[valid][:, 1].long(), hd.recv_src_token[valid].long())
    xm, _ = hd.to_masked(recv)
    y_rows = hd.expert_reduce(xm.float() * expert_scale, "masked")
    got = step_checks(group, "EPDispatcher.combine (fixed)", 1, lambda: disp.combine(y_rows, hd))
    assert torch.equal(got, routed_sum(x, ids, w, gid_scale).float())
    got = step_checks(group, "EPDispatcher.combine_experts (fixed)", 1,
                      lambda: disp.combine_experts(xm.float() * expert_scale, hd))
    assert torch.equal(got, routed_sum(x, ids, w, gid_scale).float())

    # --- overflow: a masked layout smaller than an expert's entries drops the excess and counts it
    max_m = 2
    xs, masked_m = hd.to_masked(recv, max_m=max_m)
    cnt = hd.num_recv_tokens_per_expert
    assert xs.shape == (per, max_m, h) and torch.equal(masked_m, cnt.clamp(max=max_m).to(torch.int32))
    assert torch.equal(hd.num_dropped(max_m), (cnt - cnt.clamp(max=max_m)).to(torch.int32))
    for l in range(per):  # the kept rows are each expert's first ones
        rows = exp_x[(exp_lid == l).any(1)][:max_m]
        assert torch.equal(xs[l, :rows.size(0)], rows)
    keep = kept_slots(all_ids, rank, num_ranks, e, max_m)
    got = step_checks(group, "combine_experts after overflow", 1,
                      lambda: disp.combine_experts(xs.float() * expert_scale, hd))
    assert torch.equal(got, routed_sum(x, ids, w, gid_scale, keep).float()), f"rank {rank}: overflow combine"
    if bool(hd.num_dropped(max_m).any()):
        with pytest.raises(RuntimeError, match="max_m: expected room for every entry"):
            hd.check_overflow(max_m)
    hd.check_overflow()  # the default max_m = R * capacity always has room without repeated ids

    # --- normal mode: 2 collectives in dispatch (counts, fused rows), 1 in either combine
    dn = moe.EPDispatcher(group, num_experts=e)
    with CollectiveCounter() as cc:
        recv_n, hn = dn.dispatch(x, ids, w)
    cc.expect(group, 2, "EPDispatcher.dispatch (normal)")
    xc, _ = hn.to_contiguous(recv_n, 4)
    m_idx = hn.contiguous_layout(4)[1]
    yc = xc.float() * torch.where(m_idx >= 0, m_idx + rank * per + 1, 0).view(-1, 1)
    got = step_checks(group, "combine_experts (normal, contiguous)", 1,
                      lambda: dn.combine_experts(yc, hn, layout="contiguous", alignment_or_max_m=4))
    assert torch.equal(got, routed_sum(x, ids, w, gid_scale).float())


LL_SCENARIOS = [  # (seed, tokens per rank as a function of R, E per rank, k, H, capacity)
    (5, lambda r: [13 + 5 * i for i in range(r)], 4, 3, 256, 32),
    (6, lambda r: [7] * (r - 1) + [0], 2, 2, 256, 8),               # T = 0 on the last rank
]


def _ll_scenarios(group, rank, world):
    for seed, tsf, per, k, h, cap in LL_SCENARIOS:
        if world == 1:
            per = per * 4
        check_low_latency(group, rank, world, seed, tsf(world), per * world, k, h, cap)


def _mp_low_latency(group, rank, world):
    _ll_scenarios(group, rank, world)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_low_latency_multiprocess(world):
    import torch._dynamo  # noqa: F401  (custom ops under a dispatch mode import it: once here, not per fork)

    run_group(world, "_mp_low_latency")


def test_low_latency_single_process():
    _ll_scenarios(None, 0, 1)


def test_low_latency_overflow_and_bad_inputs():
    from deepkernels.compat.deep_ep import Buffer

    buf = Buffer(None)
    x = make_tokens(0, 3, 128, 0)
    ids = torch.tensor([[0, 0], [0, 1], [1, -1]])  # a repeated expert id: two entries of expert 0 for token 0
    w = torch.tensor([[0.5, 0.25], [1.0, 0.5], [2.0, 0.0]])
    with pytest.raises(ValueError, match="x: expected at most num_max_dispatch_tokens_per_rank=2 tokens, got 3"):
        buf.low_latency_dispatch(x, ids, 2, 2, use_fp8=False)
    with pytest.raises(ValueError, match=r"x: expected at most capacity=2 tokens \(fixed-capacity mode\), got 3"):
        moe.EPDispatcher(None, num_experts=2, capacity=2).dispatch(x, ids, w)
    with pytest.raises(ValueError, match="round_scale/use_ue8m0: expected False"):
        buf.low_latency_dispatch(x, ids, 4, 2, use_ue8m0=True)
    # expert 0 has 3 entries (token 0 twice, token 1) but only R * capacity = 3 rows: all fit
    packed, count, handle, _, _ = buf.low_latency_dispatch(x, ids, 3, 2, use_fp8=False)
    assert count.tolist() == [3, 2] and torch.equal(packed[0], x[[0, 0, 1]])
    combined, _, _ = buf.low_latency_combine(packed, ids, w, handle)
    assert torch.equal(combined, routed_sum(x, ids, w, lambda ex: 1).to(x.dtype))
    # with a 2-row masked layout, expert 0's third entry (token 1) is dropped and counted; no write past
    d, hd = handle
    recv, hd = d.dispatch(x, ids, None)
    xs, masked_m = hd.to_masked(recv, max_m=2)
    assert masked_m.tolist() == [2, 2] and hd.num_dropped(2).tolist() == [1, 0]
    assert torch.equal(xs[0], x[[0, 0]]) and torch.equal(xs[1], x[[1, 2]])
    with pytest.raises(RuntimeError, match=r"max_m: expected room for every entry, got 1 dropped entries"):
        hd.check_overflow(2)
    keep = torch.tensor([[True, True], [False, True], [True, False]])
    got = d.combine_experts(xs, hd, w)
    assert torch.equal(got, routed_sum(x, ids, w, lambda ex: 1, keep).to(x.dtype))
    with pytest.raises(ValueError, match=r"topk_weights: expected shape \[3, 2\]"):
        buf.low_latency_combine(packed, ids, w[:, :1], handle)
    with pytest.raises(ValueError, match=r"expert_out: expected shape \[2, \*, \*\]"):
        buf.low_latency_combine(packed[:1], ids, w, handle)
    with pytest.raises(ValueError, match="max_m: expected an int >= 0, got -1"):
        hd.masked_layout(-1)


def test_low_latency_torch_compile_fullgraph():
    """The whole low-latency step (pack, exchange, masked layout, combine) traces into one graph: no
    data-dependent shape or Python scalar read anywhere on it."""
    from deepkernels.compat.deep_ep import Buffer

    buf = Buffer(None)
    ids, w = make_routing(6, 3, 8, seed=3)
    x = make_tokens(0, 6, 256, 1)

    def step(x, ids, w):
        (q, s), count, handle, _, _ = buf.low_latency_dispatch(x, ids, 8, 8, use_fp8=True)
        y = per_token_cast_from_fp8(q.reshape(-1, 256), s.reshape(-1, 2), torch.float32).view(q.shape)
        combined, _, _ = buf.low_latency_combine(y, ids, w, handle)
        return combined, count

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    got, want = compiled(x, ids, w), step(x, ids, w)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_row_format():
    fmt = moe.EPDispatcher.row_format(FP8_DTYPE, 130, 3, fp8_scales=True, weights=True)
    off = {n: f[0] for n, f in fmt.fields.items()}
    # 4-byte aligned fields: e4m3 [130] -> 132, scales 2 x 4, src 4, lid 3 x 4, w 3 x 4 = 168 -> 176 (16 B)
    assert off == {"x": 0, "scale": 132, "src": 140, "lid": 144, "w": 156} and fmt.row_bytes == 176
    assert fmt.gaps == [(130, 132), (168, 176)]
    rows = torch.full((2, 3, fmt.row_bytes), 255, dtype=torch.uint8)
    x = torch.randn(6, 130).to(FP8_DTYPE)
    s, src = torch.rand(6, 2), torch.arange(6, dtype=torch.int32).view(6, 1)
    lid, w = torch.randint(-1, 4, (6, 3), dtype=torch.int32), torch.rand(6, 3)
    fmt.pack(rows, x=x, scale=s, src=src, lid=lid, w=w)
    assert not rows[..., 130:132].any() and not rows[..., 168:].any()
    for name, t in dict(x=x, scale=s, src=src, lid=lid, w=w).items():
        got = fmt.unpack(rows, name, 6)
        assert torch.equal(got.view(torch.uint8), t.view(torch.uint8)), name


def test_host_sync_detector_and_counter_catch_what_they_claim():
    t = torch.tensor([1, 0, 2])
    for read in (lambda: t.sum().item(), lambda: t.tolist(), lambda: t.nonzero(), lambda: bool(t[0]),
                 lambda: int(t.max()), lambda: t.repeat_interleave(t), lambda: torch.bincount(t)):
        with HostSyncDetector() as hs:
            read()
        assert hs.syncs, "a host data read went unnoticed"
    with HostSyncDetector() as hs:
        t.repeat_interleave(t, output_size=3)
        t.repeat_interleave(2)
    assert hs.syncs == []
    # normal mode syncs once for the counts; the detector sees it, and the counter sees 2 wire exchanges
    ids, w = make_routing(5, 2, 8, seed=1)
    with CollectiveCounter() as cc, HostSyncDetector() as hs:
        moe.EPDispatcher(None, num_experts=8).dispatch(torch.randn(5, 128), ids, w)
    assert hs.syncs and cc.wire == 2 and cc.calls == []


@pytest.mark.parametrize("use_fp8", [False, True])
def test_cuda_low_latency_graph_capture(kernel_device, use_fp8):
    """Buffer.low_latency_dispatch -> expert maths -> low_latency_combine: no host sync (sync debug
    mode on the GPU, HostSyncDetector emulated), matches the CPU reference run, and (on the GPU)
    captures into a CUDA graph and replays to the eager result."""
    import warnings

    from deepkernels.compat.deep_ep import Buffer

    buf = Buffer(None)
    ids, w = make_routing(64, 8, 64, seed=13)
    x = make_tokens(0, 64, 512, 2)
    scale = (torch.arange(64) + 1).view(64, 1, 1).float()

    def step(x, ids, w, scale):
        recv, count, handle, _, _ = buf.low_latency_dispatch(x, ids, 64, 64, use_fp8=use_fp8)
        if use_fp8:
            q, s = recv
            recv = per_token_cast_from_fp8(q.reshape(-1, 512), s.reshape(-1, 4), torch.float32).view(q.shape)
        y = (recv.float() * scale).to(torch.bfloat16)
        return buf.low_latency_combine(y, ids, w, handle)[0], count

    with reference():
        want_cpu = step(x, ids, w, scale)
    xc, idc, wc, sc = x.to(kernel_device), ids.to(kernel_device), w.to(kernel_device), scale.to(kernel_device)
    step(xc, idc, wc, sc)
    synchronize(kernel_device)
    if kernel_device != "cuda":
        with HostSyncDetector() as hs:
            eager = step(xc, idc, wc, sc)
        assert hs.syncs == [], f"host syncs on the low-latency path: {hs.syncs}"
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                eager = step(xc, idc, wc, sc)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert not [c for c in caught if "synchroniz" in str(c.message)]
    assert torch.equal(eager[1].cpu(), want_cpu[1])
    assert calc_diff(eager[0].cpu().float(), want_cpu[0].float()) < 1e-4
    if kernel_device != "cuda":
        return
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step(xc, idc, wc, sc)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = step(xc, idc, wc, sc)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got[0], eager[0]) and torch.equal(got[1], eager[1])


# ----------------------------------------------------------------------------------------------
# DeepSeek-V2 routing (softmax scores, greedy / group-limited greedy, no correction bias)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("topk_method", ["greedy", "group_limited_greedy"])
def test_moe_v2_routing_matches_hf(topk_method):
    import torch.nn.functional as F
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

    from deepkernels.nn import MoE

    n_group, topk_group = (1, 1) if topk_method == "greedy" else (4, 2)
    cfg = DeepseekV2Config(hidden_size=64, moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=4,
                           n_shared_experts=2, n_group=n_group, topk_group=topk_group, routed_scaling_factor=3.0,
                           topk_method=topk_method, norm_topk_prob=False)
    hf = DeepseekV2Moe(cfg)
    m = MoE(64, 32, 16, 4, 2, n_group, topk_group, 3.0, norm_topk_prob=False, scoring_func="softmax",
            topk_method=topk_method)
    assert "gate.e_score_correction_bias" not in m.state_dict() and m.gate.e_score_correction_bias is None
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
        m.gate.weight.normal_(0, 1.0)  # spread-out scores: the group restriction changes some choices
        hf.gate.weight.copy_(m.gate.weight)
        for e in range(16):
            ex = m.experts[str(e)]
            hf.experts.gate_up_proj[e].copy_(torch.cat([ex.gate_proj.weight, ex.up_proj.weight]))
            hf.experts.down_proj[e].copy_(ex.down_proj.weight)
        for n in ("gate_proj", "up_proj", "down_proj"):
            getattr(hf.shared_experts, n).weight.copy_(getattr(m.shared_experts, n).weight)
        x = torch.randn(3, 7, 64)
        idx, w = m.gate(x.view(-1, 64))
        _, hf_w, hf_idx = hf.gate(x)
        a, b = m(x), hf(x)
    if topk_method == "group_limited_greedy":  # the group limit changed some token's experts
        from deepkernels.nn.moe import route
        greedy = route(F.linear(x.view(-1, 64), m.gate.weight), 4, scoring_func="softmax", topk_method="greedy")[0]
        assert not torch.equal(idx.sort(-1)[0], greedy.sort(-1)[0])
    order, hf_order = idx.argsort(-1), hf_idx.argsort(-1)
    assert torch.equal(idx.gather(1, order), hf_idx.gather(1, hf_order))
    torch.testing.assert_close(w.gather(1, order), hf_w.gather(1, hf_order), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _brute_force_route(logits, k, scoring_func, topk_method, n_group, topk_group, bias, norm, scale):
    """One token at a time, by sorting: which experts and weights each routing rule gives."""
    scores = logits.sigmoid() if scoring_func == "sigmoid" else logits.softmax(-1)
    out_idx, out_w = [], []
    for s in scores:
        choice = s + bias if topk_method == "noaux_tc" else s.clone()
        size = s.numel() // n_group
        if topk_method != "greedy":
            groups = choice.view(n_group, size)
            if topk_method == "noaux_tc":
                rank = groups.sort(-1, descending=True)[0][:, :2].sum(-1)
            else:
                rank = groups.max(-1)[0]
            allowed = set(rank.argsort(descending=True)[:topk_group].tolist())
            choice = torch.tensor([c if e // size in allowed else -float("inf") for e, c in enumerate(choice.tolist())])
        idx = sorted(choice.argsort(descending=True)[:k].tolist())
        w = s[idx]
        if topk_method == "noaux_tc":
            w = (w / w.sum() if norm else w) * scale
        else:
            w = w / w.sum() if norm and k > 1 else w * scale
        out_idx.append(idx)
        out_w.append(w)
    return torch.tensor(out_idx), torch.stack(out_w)


@pytest.mark.parametrize("topk_method", ["greedy", "group_limited_greedy", "noaux_tc"])
@pytest.mark.parametrize("scoring_func", ["sigmoid", "softmax"])
@pytest.mark.parametrize("norm", [False, True])
def test_route_rules(topk_method, scoring_func, norm):
    """route() against a per-token brute force of each rule: V3 normalises then scales, V2 does one or the other."""
    from deepkernels.nn.moe import route

    g = torch.Generator().manual_seed(7)
    logits = torch.randn(9, 16, generator=g) * 2
    bias = torch.randn(16, generator=g) * 0.3
    n_group, topk_group = (1, 1) if topk_method == "greedy" else (4, 2)
    idx, w = route(logits, 3, scoring_func=scoring_func, topk_method=topk_method, n_group=n_group,
                   topk_group=topk_group, correction_bias=bias if topk_method == "noaux_tc" else None,
                   norm_topk_prob=norm, routed_scaling_factor=2.5)
    ref_idx, ref_w = _brute_force_route(logits, 3, scoring_func, topk_method, n_group, topk_group, bias, norm, 2.5)
    order = idx.argsort(-1)
    assert torch.equal(idx.gather(1, order), ref_idx)
    torch.testing.assert_close(w.gather(1, order), ref_w, rtol=1e-6, atol=1e-7)
    if topk_method != "greedy":  # the group limit (and bias) changed some token's experts
        plain, _ = route(logits, 3, scoring_func=scoring_func, topk_method="greedy")
        assert not torch.equal(idx.sort(-1)[0], plain.sort(-1)[0])


def test_routing_config_errors():
    from deepkernels.nn import MoEGate

    with pytest.raises(ValueError, match="scoring_func: expected one of .* got 'tanh'"):
        MoEGate(64, 16, 4, 4, 2, 1.0, scoring_func="tanh")
    with pytest.raises(ValueError, match="topk_method: expected one of .* got 'top_p'"):
        MoEGate(64, 16, 4, 4, 2, 1.0, topk_method="top_p")
    with pytest.raises(ValueError, match="num_experts_per_tok: expected <= topk_group"):
        MoEGate(64, 16, 9, 4, 2, 1.0, topk_method="group_limited_greedy")
    assert MoEGate(64, 16, 9, 4, 2, 1.0, topk_method="greedy").top_k == 9  # greedy ignores the groups
    from deepkernels.nn.moe import route
    with pytest.raises(ValueError, match="correction_bias"):
        route(torch.randn(2, 16), 2, topk_method="noaux_tc", n_group=4, topk_group=2)


# ----------------------------------------------------------------------------------------------
# fused wire pack / unpack (moe_pack_rows / moe_unpack_rows) vs the torch-copies reference

def _pack_inputs(t, k, e, h, r, kind, weighted, capacity, device, seed=0):
    """Inputs of moe_pack_rows built as the dispatcher builds them (via the reference helpers)."""
    ids, w = make_routing(t, k, e, seed=seed + t)
    if t and not (ids >= 0).any():  # make_routing empties every 5th row: send at least one row
        ids[0, 0] = e - 1
    g = torch.Generator().manual_seed(seed)
    xf = torch.randn(t, h, generator=g) * 3
    x, x_scale, use_fp8 = xf.to(torch.bfloat16), None, False
    if kind == "fp32":
        x = xf
    elif kind == "quant":
        use_fp8 = True
    elif kind == "pair":
        x, x_scale = per_token_cast_to_fp8(xf)
    with reference():
        per_rank, _, inr = moe.get_dispatch_layout(ids, e, r)
        pos = moe.dispatch_positions(inr, capacity)
        n = r * capacity if capacity is not None else int(per_rank.sum())
        src = moe.positions_to_src_idx(pos, n)
    to = lambda v: None if v is None else v.to(device)  # noqa: E731
    return dict(x=to(x), x_scale=to(x_scale), src_idx=to(src), topk_idx=to(ids), topk_weights=to(w if weighted else None),
                per_rank=to(per_rank), num_local_experts=e // r, capacity=-1 if capacity is None else capacity,
                use_fp8=use_fp8)


def _poison_allocator(nbytes: int, device) -> None:
    """Leave freed 0xFF blocks of the output's size behind, so an unwritten byte shows."""
    for _ in range(2):
        torch.full((max(nbytes, 1),), 255, dtype=torch.uint8, device=device)


def _assert_pack_equal(got: torch.Tensor, want: torch.Tensor, args: dict) -> None:
    """Byte-exact; only quantised e4m3 payload bytes may differ at rare 1-ulp rounding ties (the kernel's
    quantisation is moe_permute_fp8's, see test_cuda_permute)."""
    assert got.shape == want.shape and got.dtype == torch.uint8
    got = got.cpu()
    if not args["use_fp8"]:
        assert torch.equal(got, want)
        return
    x, src, k = args["x"], args["src_idx"], 0 if args["topk_idx"] is None else args["topk_idx"].size(1)
    fmt = moe.row_format(FP8_DTYPE, x.size(1), k, True, args["topk_weights"] is not None)
    rows_g, rows_w = got.view(-1, got.size(-1)), want.view(-1, want.size(-1))
    if args["capacity"] >= 0:
        hb = moe.SLOT_HEADER_BYTES
        assert torch.equal(got[:, :hb], want[:, :hb])
        rows_g = got[:, hb:].reshape(-1, fmt.row_bytes)
        rows_w = want[:, hb:].reshape(-1, fmt.row_bytes)
    h = x.size(1)
    assert torch.equal(rows_g[:, h:], rows_w[:, h:])  # scales, metadata, gaps, padding
    assert (rows_g[:, :h] != rows_w[:, :h]).sum() <= 1e-4 * rows_g[:, :h].numel()


PACK_EMU_CASES = [(0, 1, 8, 7168, 1), (1, 8, 256, 7168, 8), (37, 8, 32, 256, 8), (19, 4, 16, 135, 4),
                  (23, 3, 24, 130, 3), (9, 2, 8, 7, 2), (11, 6, 160, 64, 80)]  # 80 ranks: a 3-chunk rank scan
PACK_CUDA_CASES = PACK_EMU_CASES + [(4096, 8, 256, 7168, 8), (300, 6, 64, 200, 16)]


@_device_cases("t,k,e,h,r", PACK_CUDA_CASES, PACK_EMU_CASES)
@pytest.mark.parametrize("kind", ["bf16", "fp32", "quant", "pair"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("capacity", [None, 40])
def test_cuda_pack_rows(kernel_device, t, k, e, h, r, kind, weighted, capacity):
    if t == 0 and capacity is None:
        capacity = 0  # normal mode with T = 0 launches nothing: the header-only slot buffer instead
    if capacity is not None and t > capacity:
        capacity = t
    args = _pack_inputs(t, k, e, h, r, kind, weighted, capacity, kernel_device)
    want = wire.moe_pack_rows_ref(**{n: v.cpu() if isinstance(v, torch.Tensor) else v for n, v in args.items()})
    _poison_allocator(want.numel(), kernel_device)
    got = torch.ops.deepkernels.moe_pack_rows(**args)
    _assert_pack_equal(got, want, args)
    # the torch-copies path on the same device (its permute_fp8 is the kernel's quantisation): exact
    xx = args["x"] if args["x_scale"] is None else (args["x"], args["x_scale"])
    torch_buf = wire._pack_rows_torch(xx, args["src_idx"], args["topk_idx"], args["topk_weights"], args["per_rank"],
                                      args["num_local_experts"], capacity, args["use_fp8"])[0]
    assert torch.equal(got.cpu(), torch_buf.cpu())
    # unpack: every field back, byte-exact vs the reference unpack
    fmt = wire._pack_format(args["x"], args["x_scale"], args["topk_idx"], args["topk_weights"], args["use_fp8"])
    f = fmt.fields
    n = args["src_idx"].size(0)
    uargs = (n, h, k, f["x"][2], "scale" in f, "w" in f, args["capacity"])
    _poison_allocator(n * max(h, 1) * 4, kernel_device)
    got_u = torch.ops.deepkernels.moe_unpack_rows(got, *uargs)
    want_u = wire.moe_unpack_rows_ref(got.cpu(), *uargs)
    for name, a, b in zip(("x", "scale", "src", "lid", "w"), got_u, want_u):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.equal(a.cpu().view(torch.uint8), b.view(torch.uint8)), name
    # what the fields hold: src, empty rows, local ids relative to the destination rank
    src = want_u[2].view(-1)
    assert torch.equal(src, args["src_idx"].cpu())
    empty = src < 0
    assert (want_u[3][empty] == -1).all() and (want_u[4][empty] == 0).all()
    assert ((want_u[3] >= -1) & (want_u[3] < e // r)).all()


@pytest.mark.parametrize("bad", [-2, 10**6])
def test_emu_pack_rows_trusted_index_poisons_row(bad):
    """src_idx outside [-1, T): the reference raises naming src_idx; the emulated kernel reads nothing and
    writes a 0xFF row (the other rows stay exact); DEEPKERNELS_CHECK=1 makes the wrapper raise instead."""
    if not deepkernels_emulator_built():
        pytest.fail("the emulator is not built")
    args = _pack_inputs(6, 2, 8, 130, 2, "quant", True, None, "cpu")
    src = args["src_idx"].clone()
    src[1] = bad
    args["src_idx"] = src
    with pytest.raises(ValueError, match="^src_idx: expected"):
        wire.moe_pack_rows_ref(**args)
    with dk.emulate():
        got = torch.ops.deepkernels.moe_pack_rows(**args)
    assert (got[1] == 255).all()
    ok = src.clone()
    ok[1] = -1
    want = wire.moe_pack_rows_ref(**{**args, "src_idx": ok})
    assert torch.equal(got[0], want[0]) and torch.equal(got[2:], want[2:])
    os.environ["DEEPKERNELS_CHECK"] = "1"
    try:
        with dk.emulate(), pytest.raises(ValueError, match="^src_idx: expected"):
            moe.pack_rows((args["x"]), src, args["topk_idx"], args["topk_weights"], args["per_rank"], 4, None, True)
    finally:
        del os.environ["DEEPKERNELS_CHECK"]


def deepkernels_emulator_built() -> bool:
    return bool(dk.build_info()["emulator"])


def test_pack_rows_bad_inputs():
    args = _pack_inputs(5, 2, 8, 64, 2, "bf16", True, None, "cpu")
    cases = [
        (dict(x=args["x"].int()), ValueError, "^x: expected"),
        (dict(x_scale=torch.ones(5, 1)), ValueError, "^x_scale: expected"),
        (dict(src_idx=args["src_idx"].long()), ValueError, "^src_idx: expected"),
        (dict(topk_idx=args["topk_idx"][:3]), ValueError, "^topk_idx: expected"),
        (dict(topk_weights=args["topk_weights"].double()), ValueError, "^topk_weights: expected"),
        (dict(per_rank=args["per_rank"] + 1), ValueError, "^per_rank: expected counts summing"),
        (dict(num_local_experts=0), ValueError, "^num_local_experts: expected"),
        (dict(capacity=3), ValueError, "^src_idx: expected R \\* capacity"),
        (dict(x=per_token_cast_to_fp8(args["x"])[0], use_fp8=True), ValueError, "^use_fp8: expected False"),
        (dict(topk_idx=None), ValueError, "^topk_weights: expected None without topk_idx"),
    ]
    for change, exc, msg in cases:
        with pytest.raises(exc, match=msg):  # the op (its CPU kernel checks) ...
            torch.ops.deepkernels.moe_pack_rows(**{**args, **change})
    cases += [(dict(num_local_experts=2.0), TypeError, "^num_local_experts: expected"),
              (dict(use_fp8=1), TypeError, "^use_fp8: expected"), (dict(capacity="4"), TypeError, "^capacity: expected")]
    for change, exc, msg in cases:  # ... and the checked wrapper, which also types the scalars
        a = {**args, **change}
        if "x_scale" in change or "per_rank" in change:
            continue  # scales come as the pair (x, scale); counts are values (checked by the op / DEEPKERNELS_CHECK)
        cap = None if a["capacity"] == -1 else a["capacity"]
        with pytest.raises(exc, match=msg):
            moe.pack_rows(a["x"], a["src_idx"], a["topk_idx"], a["topk_weights"], a["per_rank"],
                          a["num_local_experts"], cap, a["use_fp8"])
    buf = torch.ops.deepkernels.moe_pack_rows(**args)
    with pytest.raises(ValueError, match="^buf: expected shape"):
        torch.ops.deepkernels.moe_unpack_rows(buf[:, :-16], buf.size(0), 64, 2, torch.bfloat16, False, True, -1)
    with pytest.raises(ValueError, match="^num_rows: expected slots"):
        torch.ops.deepkernels.moe_unpack_rows(buf, 3, 64, 2, torch.bfloat16, False, True, 2)
    with pytest.raises(TypeError, match="^payload_dtype: expected a torch.dtype"):
        wire.moe_unpack_rows_ref(buf, buf.size(0), 64, 2, "bf16", False, True, -1)
    os.environ["DEEPKERNELS_MOE_PACK"] = "fast"
    try:
        with pytest.raises(ValueError, match="^DEEPKERNELS_MOE_PACK: expected"):
            moe.EPDispatcher(None, num_experts=8).dispatch(args["x"], args["topk_idx"], args["topk_weights"])
    finally:
        del os.environ["DEEPKERNELS_MOE_PACK"]


def test_pack_rows_opcheck():
    for kind, capacity in (("bf16", None), ("quant", 8), ("pair", None)):
        args = _pack_inputs(6, 3, 8, 130, 2, kind, True, capacity, "cpu")
        opcheck(torch.ops.deepkernels.moe_pack_rows, tuple(args.values()))
        buf = torch.ops.deepkernels.moe_pack_rows(**args)
        fmt = wire._pack_format(args["x"], args["x_scale"], args["topk_idx"], args["topk_weights"], args["use_fp8"])
        f = fmt.fields
        opcheck(torch.ops.deepkernels.moe_unpack_rows, (buf, args["src_idx"].size(0), 130, 3, f["x"][2], "scale" in f,
                                                        True, args["capacity"]))


@pytest.mark.parametrize("capacity", [None, 16])
@pytest.mark.parametrize("use_fp8", [False, True])
@pytest.mark.parametrize("variant", ["fused", "torch"])
def test_emu_dispatcher_pack_variants_agree(monkeypatch, capacity, use_fp8, variant):
    """The dispatcher under the emulator with each DEEPKERNELS_MOE_PACK variant gives exactly the
    plain-CPU result (the torch path), and the fused variant launches the pack / unpack kernels."""
    if not deepkernels_emulator_built():
        pytest.fail("the emulator is not built")
    ids, w = make_routing(12, 4, 16, seed=5)
    x = make_tokens(0, 12, 256, 3)
    disp = moe.EPDispatcher(None, num_experts=16, capacity=capacity)
    want_x, want_h = disp.dispatch(x, ids, w, use_fp8=use_fp8)
    monkeypatch.setenv("DEEPKERNELS_MOE_PACK", variant)
    before = dict(dk.emulator_stats()["kernels"])
    with dk.emulate():
        got_x, got_h = disp.dispatch(x, ids, w, use_fp8=use_fp8)
        cached = disp.dispatch_cached(x, got_h, use_fp8=use_fp8)
        wts = disp.exchange_weights(w, got_h)
    after = dk.emulator_stats()["kernels"]
    packs = sum(v - before.get(n, 0) for n, v in after.items() if "pack_rows" in n)
    assert (packs >= 4) if variant == "fused" else (packs == 0)
    flat = lambda v: [v] if isinstance(v, torch.Tensor) else list(v)  # noqa: E731
    for a, b in zip(flat(got_x) + flat(cached), flat(want_x) + flat(want_x)):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if not use_fp8 or a.dtype != FP8_DTYPE else \
            (a.view(torch.uint8) != b.view(torch.uint8)).float().mean() < 1e-4
    for name in ("recv_local_idx", "recv_weights", "recv_src_token", "num_recv_tokens_per_expert",
                 "num_recv_tokens_per_rank"):
        assert torch.equal(getattr(got_h, name), getattr(want_h, name)), name
    assert torch.equal(wts, want_h.recv_weights)


@pytest.mark.parametrize("use_fp8", [False, True])
def test_cuda_masked_layout_writes_only_real_rows(kernel_device, use_fp8):
    """to_masked writes expert l's first masked_m[l] rows only (moe_permute_no_fill): they equal the
    reference's; the padding rows keep whatever the fresh buffer held (0xFF blocks left in the allocator
    here), and the expert-side reduce / combine never read them."""
    disp = moe.EPDispatcher(None, num_experts=16, capacity=24)
    ids, w = make_routing(20, 4, 16, seed=11)
    x = make_tokens(0, 20, 256, 5)
    with reference():
        recv_ref, hd_ref = disp.dispatch(x, ids, w, use_fp8=use_fp8)
        xm_ref, mm_ref = hd_ref.to_masked(recv_ref)
    recv, hd = disp.dispatch(x.to(kernel_device), ids.to(kernel_device), w.to(kernel_device), use_fp8=use_fp8)
    pair = lambda v: list(v) if isinstance(v, tuple) else [v]  # noqa: E731
    payload = pair(recv)[0]
    nbytes = hd.num_local_experts * hd.num_recv * payload.size(1) * payload.element_size()
    _poison_allocator(nbytes, kernel_device)
    probe = torch.empty(nbytes, dtype=torch.uint8, device=kernel_device)  # does this allocator hand it back?
    reused = bool((probe[64:] == 0xFF).all())  # (malloc keeps its free-list pointers in the first bytes)
    poisoned_ptr = probe.data_ptr()
    del probe
    xm, mm = hd.to_masked(recv)
    # only meaningful when the output landed on that very block (another allocation inside to_masked may take it)
    reused = reused and pair(xm)[0].untyped_storage().data_ptr() == poisoned_ptr
    assert torch.equal(mm.cpu(), mm_ref)
    real = torch.arange(hd.num_recv).view(1, -1) < mm_ref.view(-1, 1)  # [L, max_m]
    for i, (got, want) in enumerate(zip(pair(xm), pair(xm_ref))):
        g, wnt = got.cpu().view(torch.uint8), want.view(torch.uint8)
        assert torch.equal(g[real], wnt[real])
        if i == 0 and reused:  # the padding is left as the allocator had it (an allocator that does not hand
            # freed blocks back, e.g. ASan's, cannot show this)
            beyond = torch.arange(g.numel()).view(g.shape) >= 64
            assert (g[~real & beyond.all(-1)] == 0xFF).all() and (~real).any()
    out = disp.combine(hd.expert_reduce(xm[1].float() if use_fp8 else xm.float(), "masked"), hd)
    out_ref = disp.combine(hd_ref.expert_reduce(xm_ref[1].float() if use_fp8 else xm_ref.float(), "masked"), hd_ref)
    assert torch.equal(out.cpu(), out_ref)
