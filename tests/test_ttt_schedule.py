"""Phased TTT work distribution: the shared batch queue, phase pauses in scored order, the time-budget
projection (fake clocks, several simulated ranks, one of them slow) and the reusable LoRA buffers.

The simulated ranks run the real `ttt_rank_schedule`, `TTTWorkQueue` and `projected_ttt_seconds` on one
shared in-memory store (torch.distributed.HashStore); only the work itself is replaced by a cost per token."""

import math

import numpy as np
import pytest
import torch

import train_gpt
from tg_helpers import random_documents, random_eval_model, spawn_gloo_ranks
from train_gpt import (
    BOS_ID, AdapterSlots, EvalSettings, TokenScores, TTTWorkQueue, _document_batches,
    _score_and_adapt_documents, eval_ttt_phased, lora_site_dims, make_val_data, phase_pauses,
    projected_ttt_seconds, ttt_rank_schedule,
)

VOCAB = 64
EVAL = EvalSettings(eval_seq_len=24, eval_batch_tokens=96, phased_ttt_lora_rank=4, phased_ttt_lora_alpha=4.0,
                    phased_ttt_lr=0.01, phased_ttt_chunk_tokens=8, phased_ttt_docs_per_batch=3,
                    phased_ttt_prefix_docs=6, phased_ttt_num_phases=3, phased_ttt_global_lr=0.01,
                    phased_ttt_global_chunk_tokens=64)


def stream(seed: int = 0, num_docs: int = 14):
    return make_val_data(*random_documents(VOCAB, seed, num_docs), vocab_size=VOCAB)


@pytest.fixture(scope="module")
def model():
    return random_eval_model(VOCAB)


@pytest.fixture(scope="module")
def val():
    return stream()


# --- phase pauses are counted in queue (scored) order ------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_each_pause_follows_the_batch_that_holds_its_boundary_document(seed):
    rng = np.random.default_rng(seed)
    sizes = [int(rng.integers(1, 6))] * int(rng.integers(1, 12))
    sizes[-1] = int(rng.integers(1, sizes[0] + 1))  # a smaller last batch
    prefix, phases = int(rng.integers(0, sum(sizes) + 3)), int(rng.integers(1, 5))
    pauses = phase_pauses(sizes, prefix, phases)
    starts = np.concatenate([[0], np.cumsum(sizes)])  # queue position of each batch's first document
    expected = []
    for phase in range(phases):
        docs = min(prefix * (phase + 1) // phases, sum(sizes))
        if docs > 0:  # the batch holding queued document number `docs` (1-based)
            expected.append((next(b for b in range(len(sizes)) if starts[b] < docs <= starts[b + 1]), docs))
    assert pauses == expected


def test_global_sgd_trains_on_the_first_scored_documents_longest_first(model, val, monkeypatch):
    """The phase boundaries count documents in the order they are scored (the queue: longest first, PR
    1855), not in stream order: phase k trains on the first 6 * k / 3 documents of the queue.
    Fails with the old stream-order prefix (documents 0..5)."""
    trained = []
    original = train_gpt._global_sgd

    def spy(model, val, doc_ids, config, audit):
        trained.append(np.asarray(doc_ids).tolist())
        return original(model, val, doc_ids, config, audit)

    monkeypatch.setattr(train_gpt, "_global_sgd", spy)
    result = eval_ttt_phased(model, val, EVAL)
    queue = np.concatenate(_document_batches(np.arange(val.num_docs), val.doc_lengths, 3)).tolist()
    assert queue[:6] != list(range(6)) and val.doc_lengths[queue[0]] == val.doc_lengths.max()
    assert trained == [queue[:2], queue[:4], queue[:6]] and result["ttt_phases_trained"] == 3


# --- simulated ranks on one shared store, fake clocks ------------------------------------------


def simulate(batch_tokens, pause_after, budget, slowdown, adapt_cost=1e-3, fast_cost=1e-4, pause_seconds=0.5,
             decide=None):
    """Run len(slowdown) ranks through ttt_rank_schedule on one in-memory store (HashStore). A batch costs its tokens
    x (adapt_cost or fast_cost) x the rank's slowdown; a pause is a barrier, then pause_seconds for all.
    decide(elapsed, index, queue, rank) -> adapt (default: the projection rule of eval_ttt_phased).
    Returns (batches [(index, rank, adapted, start, end)], pauses [(phase, release time, ranks)])."""
    world, store = len(slowdown), torch.distributed.HashStore()
    queues = [TTTWorkQueue(store, rank, world) for rank in range(world)]
    tokens_after = np.cumsum(batch_tokens[::-1])[::-1].tolist()[1:] + [0]
    if decide is None:
        def decide(elapsed, index, queue, rank):
            return projected_ttt_seconds(elapsed, batch_tokens[index], tokens_after[index], queue.costs(),
                                         rank) <= budget
    schedules = [ttt_rank_schedule(queue, len(batch_tokens), pause_after) for queue in queues]
    clocks, waiting, done = [0.0] * world, {}, set()
    spent = [{True: [0.0, 0], False: [0.0, 0]} for _ in range(world)]
    batches, pauses = [], []
    while len(done) < world:
        ready = [rank for rank in range(world) if rank not in done and rank not in waiting]
        assert ready, "every rank waits: a pause that not all ranks join"
        rank = min(ready, key=lambda r: (clocks[r], r))
        try:
            event, index = next(schedules[rank])
        except StopIteration:
            done.add(rank)
            continue
        if event == "pause":
            waiting[rank] = index
            if len(waiting) == world:
                assert set(waiting.values()) == {index}, "ranks disagree on the pause"
                release = max(clocks) + pause_seconds
                pauses.append((index, release, sorted(waiting)))
                clocks = [release] * world
                waiting.clear()
            continue
        adapt = decide(clocks[rank], index, queues[rank], rank)
        cost = (adapt_cost if adapt else fast_cost) * slowdown[rank]
        start, clocks[rank] = clocks[rank], clocks[rank] + batch_tokens[index] * cost
        batches.append((index, rank, adapt, start, clocks[rank]))
        spent[rank][adapt][0] += clocks[rank] - start
        spent[rank][adapt][1] += batch_tokens[index]
        queues[rank].publish_costs(*(s / t if t else math.nan for s, t in (spent[rank][True], spent[rank][False])))
    return batches, pauses


def descending_batch_tokens(seed=0, count=160):
    rng = np.random.default_rng(seed)
    return sorted((int(x) for x in rng.integers(500, 20000, count)), reverse=True)


@pytest.mark.parametrize("slow_rank", [None, 0, 5])
def test_simulated_ranks_score_every_batch_once_and_join_every_pause_in_order(slow_rank):
    tokens = descending_batch_tokens()
    slowdown = [3.0 if rank == slow_rank else 1.0 for rank in range(8)]
    pause_after = [3, 9, 17]
    batches, pauses = simulate(tokens, pause_after, budget=math.inf, slowdown=slowdown)
    assert sorted(index for index, *_ in batches) == list(range(len(tokens)))
    assert [(phase, ranks) for phase, _, ranks in pauses] == [(k, list(range(8))) for k in range(3)]
    for phase, release, _ in pauses:  # everything before a pause is scored before it, nothing after it
        assert all(end <= release - 0.5 for index, _, _, _, end in batches if index <= pause_after[phase])
        assert all(start >= release for index, _, _, start, _ in batches if index > pause_after[phase])
    if slow_rank is not None:  # the dynamic queue gives the slow rank fewer batches
        counts = np.bincount([rank for _, rank, *_ in batches], minlength=8)
        assert counts[slow_rank] < min(counts[rank] for rank in range(8) if rank != slow_rank)


def test_projection_keeps_a_slow_rank_run_within_budget_and_still_adapts_part_of_it():
    """8 ranks, one 3x slower; adapting everything would take ~2x the budget. The projection rule stops
    adapting in time, every batch is scored once, the last rank finishes within the budget, and a part
    is still adapted. (Each rank's first batch adapts unmeasured: a budget smaller than that batch on
    the slow rank cannot be kept.) The old rule (adapt while time is left) runs past the budget on the same
    work: the test has teeth."""
    tokens = descending_batch_tokens(seed=1)
    slowdown = [1.0] * 7 + [3.0]
    full = sum(tokens) * 1e-3 / (7 + 1 / 3)  # seconds to adapt everything, perfectly balanced
    budget = full / 2
    batches, pauses = simulate(tokens, [12, 25, 38], budget, slowdown)
    assert sorted(index for index, *_ in batches) == list(range(len(tokens)))
    finish = max(end for *_, end in batches)
    assert finish <= budget
    adapted = sum(tokens[index] for index, _, adapt, _, _ in batches if adapt)
    assert 0.1 * sum(tokens) < adapted < sum(tokens)  # 19% here; a perfect oracle reaches 44%
    naive, _ = simulate(tokens, [12, 25, 38], budget, slowdown, decide=lambda elapsed, *_: elapsed < budget)
    assert max(end for *_, end in naive) > budget


@pytest.mark.parametrize("seed", range(5))
def test_projection_is_an_upper_bound_on_a_balanced_fast_path_finish(seed):
    """Unit check of projected_ttt_seconds against a direct computation: ranks with known costs score
    the remaining tokens at their summed throughput, plus one batch on the slowest rank."""
    rng = np.random.default_rng(seed)
    costs = [(float(a), float(f)) for a, f in zip(rng.uniform(1e-3, 3e-3, 4), rng.uniform(1e-4, 3e-4, 4))]
    elapsed, batch, remaining = float(rng.uniform(0, 10)), int(rng.integers(100, 1000)), int(rng.integers(0, 10**5))
    expected = (elapsed + batch * costs[2][0] + remaining / sum(1 / f for _, f in costs)
                + batch * max(f for _, f in costs))
    assert projected_ttt_seconds(elapsed, batch, remaining, costs, rank=2) == pytest.approx(expected)
    # unmeasured fast paths fall back to the adapted cost (slower, so a later projection)
    unmeasured = [(a, math.nan) for a, _ in costs]
    assert projected_ttt_seconds(elapsed, batch, remaining, unmeasured, rank=2) > expected
    assert projected_ttt_seconds(elapsed, batch, remaining, [(math.nan, math.nan)] * 4, rank=2) == elapsed
    # a rank before its first batch assumes the slowest adapted cost measured
    first = costs[:2] + [(math.nan, math.nan)] + costs[3:]
    slowest = max(a for a, _ in first[:2] + first[3:])
    assert projected_ttt_seconds(elapsed, batch, remaining, first, rank=2) == pytest.approx(
        elapsed + batch * slowest + remaining / (sum(1 / f for _, f in first[:2] + first[3:]) + 1 / slowest)
        + batch * slowest)


class ClockedModel(torch.nn.Module):
    """The model, plus a fake clock that every forward advances by its tokens x a cost (x3 when it
    carries a gradient: an adapting step)."""

    def __init__(self, model, seconds_per_token):
        super().__init__()
        self.model, self.seconds_per_token, self.now = model, seconds_per_token, 0.0

    def clock(self):
        return self.now

    def forward_logits(self, input_ids, lora=None):
        return self.model.forward_logits(input_ids, lora)

    def per_token_nll(self, input_ids, target_ids, lora=None):
        self.now += input_ids.numel() * self.seconds_per_token * (3.0 if torch.is_grad_enabled() else 1.0)
        return self.model.per_token_nll(input_ids, target_ids, lora)


def test_eval_under_a_fake_clock_adapts_then_scores_the_rest_on_the_fast_path_within_budget(model):
    """The real driver with an injected clock: with a budget halfway between scoring only and adapting
    everything, it adapts some batches, scores the rest without adaptation, scores every target exactly
    once, and its fake time stays within the budget."""
    val = stream(seed=1, num_docs=40)
    config = EvalSettings(**{**EVAL.__dict__, "phased_ttt_prefix_docs": 0})
    seconds = {}
    for label, budget in (("adapt everything", None), ("score only", 0.0)):
        clocked = ClockedModel(model, 1e-3)
        seconds[label] = (eval_ttt_phased(clocked, val, config, time_budget_s=budget, clock=clocked.clock),
                          clocked.now)
    budget = (seconds["adapt everything"][1] + seconds["score only"][1]) / 2
    clocked = ClockedModel(model, 1e-3)
    result = eval_ttt_phased(clocked, val, config, time_budget_s=budget, clock=clocked.clock,
                             keep_token_scores=True)
    assert sorted(result["token_positions"].tolist()) == list(range(1, val.num_tokens))
    assert result["ttt_stopped_by_budget"] and clocked.now <= budget
    for label, (other, _) in seconds.items():  # partly adapted: neither of the two extremes
        assert result["val_bpb"] != pytest.approx(other["val_bpb"], abs=1e-6), label


# --- LoRA and optimizer buffers: allocated once, reset per batch -------------------------------


def test_a_reset_adapter_and_optimizer_give_exactly_the_results_of_fresh_ones(model, val):
    for param in model.parameters():
        param.requires_grad_(False)
    try:
        dims = lora_site_dims(model, sites=("q", "v", "mlp", "head"))
        docs_a, docs_b = np.array([0, 4, 7]), np.array([2, 3, 9])

        def score(slots, doc_ids):
            scores = TokenScores(val)
            adapter = slots.fresh(len(doc_ids))
            _score_and_adapt_documents(model, val, doc_ids, EVAL, scores, None, adapter)
            return torch.cat(scores.nlls), adapter

        reused = AdapterSlots(dims, EVAL, "cpu")
        _, first = score(reused, docs_a)  # trains the adapter and fills Adam's state
        trained_up = [up.detach().clone() for up in first[0].up.values()]
        assert any(float(up.abs().max()) > 0 for up in trained_up)
        again, second = score(reused, docs_b)
        assert second[0] is first[0] and second[1] is first[1]  # the same buffers, reset
        fresh, third = score(AdapterSlots(dims, EVAL, "cpu"), docs_b)
        assert torch.equal(again, fresh)
        for (name, value), other in zip(second[0].state_dict().items(), third[0].state_dict().values()):
            assert torch.equal(value, other), name
        for state, other in zip(second[1].state.values(), third[1].state.values()):
            assert all(torch.equal(state[key], other[key]) for key in state)
    finally:
        for param in model.parameters():
            param.requires_grad_(True)


# --- the queue on a real process group (Gloo; the store is the same object under NCCL) ----------


def _queue_worker(rank, world_size, port, results):
    import time

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        queue = TTTWorkQueue.for_process_group()
        claimed = []
        while (index := queue.claim()) < 40:
            claimed.append(index)
            time.sleep(0.03 if rank == 0 else 0.005)  # rank 0 is the slow one
        queue.publish_costs(rank + 0.25, math.nan)
        dist.barrier()
        costs = queue.costs()
        second = TTTWorkQueue.for_process_group()  # the next eval: a fresh counter
        first_of_second = second.claim()
        dist.barrier()
        results.put((rank, claimed, costs, first_of_second))
        dist.barrier()  # rank 0 hosts the store: nobody leaves while another still uses it
    finally:
        dist.destroy_process_group()


def test_ranks_of_a_process_group_share_one_queue_and_a_slow_rank_takes_fewer_batches():
    results = spawn_gloo_ranks(_queue_worker, 2)
    by_rank = dict((rank, rest) for rank, *rest in (results.get(), results.get()))
    slow, fast = by_rank[0][0], by_rank[1][0]
    assert sorted(slow + fast) == list(range(40))  # every batch exactly once
    assert len(slow) < len(fast)
    for rank in (0, 1):
        costs = by_rank[rank][1]
        assert costs[0][0] == 0.25 and costs[1][0] == 1.25 and all(math.isnan(f) for _, f in costs)
    assert sorted(by_rank[rank][2] for rank in (0, 1)) == [0, 1]
