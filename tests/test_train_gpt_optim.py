"""Muon's Newton-Schulz, the schedules and the optimizer step."""

import numpy as np
import pytest
import torch

import train_gpt
from tg_helpers import random_tokens, spawn_gloo_ranks, tiny_h


@pytest.mark.parametrize("shape", [(32, 64), (64, 32), (48, 48)])
@pytest.mark.parametrize("polar_express", [False, True])
def test_newton_schulz_approximates_the_polar_factor(shape, polar_express):
    torch.manual_seed(0)
    grad = torch.randn(*shape)
    out = train_gpt.newton_schulz(grad, steps=5, polar_express=polar_express)
    singular_values = torch.linalg.svdvals(out)
    # the quintic iteration is tuned for speed, not exactness: singular values land near 1
    low, high = (0.6, 1.2) if not polar_express else (0.8, 1.2)
    assert singular_values.min() > low and singular_values.max() < high
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    polar = u @ vh  # the exact orthogonal polar factor
    cosine = (out * polar).sum() / (out.norm() * polar.norm())
    assert cosine > 0.97
    assert out.shape == grad.shape


def test_polar_express_is_closer_to_orthogonal_than_standard():
    torch.manual_seed(1)
    grad = torch.randn(64, 128)
    error = {pe: (torch.linalg.svdvals(train_gpt.newton_schulz(grad, 5, pe)) - 1).abs().max() for pe in (False, True)}
    assert error[True] < 0.2
    assert error[True] < error[False]


def test_newton_schulz_is_batched_and_pure():
    torch.manual_seed(2)
    grads = torch.randn(3, 16, 24)
    before = grads.clone()
    batched = train_gpt.newton_schulz(grads)
    assert torch.equal(grads, before)
    for index in range(3):
        assert torch.allclose(batched[index], train_gpt.newton_schulz(grads[index]), atol=1e-5)


def test_lr_schedule_is_flat_then_linear_to_the_floor():
    f = train_gpt.lr_multiplier
    assert f(0.0, 0.75, 0.1) == 1.0 and f(0.25, 0.75, 0.1) == 1.0
    assert f(1.0, 0.75, 0.1) == pytest.approx(0.1)
    assert f(0.625, 0.75, 0.0) == pytest.approx(0.5)
    assert f(1.7, 0.75, 0.0) == 0.0 and f(-1, 0.75, 0.0) == 1.0
    values = [f(p / 100, 0.85, 0.1) for p in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    # PR 1855's shape: linear (1 - f) / 0.85 until it meets the 0.1 floor at f = 0.915, then flat
    assert f(0.9, 0.85, 0.1) == pytest.approx(0.1 / 0.85) and f(0.915, 0.85, 0.1) == pytest.approx(0.1)
    assert f(0.95, 0.85, 0.1) == 0.1 and f(0.5, 0.85, 0.1) == pytest.approx(0.5 / 0.85)


@pytest.mark.parametrize("points", [(0.4, 0.85, 0.5, 1.75), (0.4, 0.85, 0.65, 1.5), (0.0, 0.9, 0.2, 3.0),
                                    (0.3, 0.31, 1.0, 0.0)])
def test_weight_decay_schedule_is_the_piecewise_linear_curve_through_its_four_points(points):
    """WEIGHT_DECAY_SCHEDULE (PR 2020): the factor equals numpy's interpolation through (0, 1), (hold, 1),
    (ramp, low), (1, high) at the knots and at random progress values, and is clamped outside [0, 1]."""
    hold, ramp, low, high = points
    xs, ys = [0.0, hold, ramp, 1.0], [1.0, 1.0, low, high]
    progress = np.concatenate([xs, np.random.default_rng(0).uniform(0, 1, 200)])
    for value in progress:
        expected = float(np.interp(value, xs, ys))
        assert train_gpt.weight_decay_multiplier(float(value), points) == pytest.approx(expected, abs=1e-12)
    assert train_gpt.weight_decay_multiplier(-0.5, points) == 1.0
    assert train_gpt.weight_decay_multiplier(1.5, points) == pytest.approx(high)
    assert all(train_gpt.weight_decay_multiplier(float(value), None) == 1.0 for value in progress)
    # ramp = 1: no rising part, the factor ends at `low`
    assert train_gpt.weight_decay_multiplier(1.0, (hold, 1.0, low, high)) == pytest.approx(low)


def test_pr2020_weight_decay_schedule_by_hand():
    """PR 2020's wd_strong at hand-computed points: x1 to 40%, x0.75 halfway down, x0.5 at 85%, x1.75 at the end."""
    points = tiny_h(PRESET="pr2020").optim.weight_decay_points()
    assert points == (0.4, 0.85, 0.5, 1.75)
    f = train_gpt.weight_decay_multiplier
    assert f(0.2, points) == 1.0 and f(0.4, points) == 1.0
    assert f(0.625, points) == pytest.approx(0.75) and f(0.85, points) == pytest.approx(0.5)
    assert f(0.925, points) == pytest.approx(1.125) and f(1.0, points) == pytest.approx(1.75)
    assert train_gpt.Hyperparameters.from_env({}).optim.weight_decay_points() is None  # pr1855: constant


def test_set_schedule_scales_the_weight_decay_of_every_group_from_its_base():
    h = tiny_h(MUON_WEIGHT_DECAY=0.1, MUON_WEIGHT_DECAY_MLP=0.2, EMBED_WEIGHT_DECAY=0.05, SCALAR_WEIGHT_DECAY=0.02)
    model = train_gpt.GPT(h.model, "sdpa")
    optimizer = train_gpt.TrainingOptimizer(model, h.optim)
    groups = optimizer.muon.param_groups + optimizer.adam.param_groups
    bases = [group["weight_decay"] for group in groups]
    assert sorted(set(bases)) == [0.02, 0.05, 0.1, 0.2]
    for scale in (0.5, 1.75, 0.5, 1.0):  # repeated calls scale the base, never compound
        optimizer.set_schedule(0.3, 0.9, scale)
        assert [group["weight_decay"] for group in groups] == pytest.approx([base * scale for base in bases])
    # the decayed step uses it: with a zero gradient, Muon's update is wd only, 1 - lr * wd per step
    optimizer.set_schedule(1.0, 0.9, 1.75)
    matrix = optimizer.muon.param_groups[0]["params"][0]
    before = matrix.detach().clone()
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    group = optimizer.muon.param_groups[0]
    assert torch.allclose(matrix.detach(), before * (1 - group["lr"] * group["base_weight_decay"] * 1.75), atol=1e-6)


def test_momentum_warmup():
    h = tiny_h(MUON_MOMENTUM_WARMUP_STEPS=100, MUON_MOMENTUM_WARMUP_START=0.92, MUON_MOMENTUM=0.97)
    assert train_gpt.muon_momentum_at(0, 0.0, h.optim) == pytest.approx(0.92)
    assert train_gpt.muon_momentum_at(50, 0.0, h.optim) == pytest.approx(0.945)
    assert train_gpt.muon_momentum_at(1000, 0.0, h.optim) == pytest.approx(0.97)


@pytest.mark.parametrize("steps", [100, 4900])
def test_relative_momentum_warmup_has_the_same_shape_at_any_run_length(steps):
    """MUON_MOMENTUM_WARMUP_FRAC: momentum is a function of the training fraction only, linear from the
    start value to the final one at the fraction, flat after, whatever the number of steps."""
    h = tiny_h(MUON_MOMENTUM_WARMUP_FRAC=0.3, MUON_MOMENTUM_WARMUP_STEPS=1500, MUON_MOMENTUM_WARMUP_START=0.92,
               MUON_MOMENTUM=0.97, ITERATIONS=steps)
    for step in range(0, steps + 1, steps // 20):
        progress = step / steps
        expected = 0.92 + (0.97 - 0.92) * min(progress / 0.3, 1.0)  # the record's warm-up, rescaled
        assert train_gpt.muon_momentum_at(step, progress, h.optim) == pytest.approx(expected)


def _ema_weights_by_step(steps: int, horizon_frac: float) -> list[float]:
    """Weight of each step's live value (index 0: the initial weights) in the final EMA, by running the
    model's EMA on a module whose weight at step s is the one-hot vector e_s (the EMA is linear)."""
    module = torch.nn.Linear(steps + 1, 1, bias=False)
    with torch.no_grad():
        module.weight.copy_(torch.nn.functional.one_hot(torch.tensor([0]), steps + 1).float())
    ema = train_gpt.ExponentialMovingAverage(module, 0.0)
    for step in range(steps):
        ema.decay = train_gpt.relative_ema_decay(horizon_frac, step, step / steps, steps)
        with torch.no_grad():
            module.weight.zero_()
            module.weight[0, step + 1] = 1.0
        ema.update(module)
    return ema.shadow["weight"][0].double().tolist()


def test_relative_ema_horizon_averages_the_same_share_of_training_at_any_run_length():
    """EMA_HORIZON_FRAC: a 100-step and a 4,900-step run average the same part of their training, and
    at 4,900 steps the decay is the record's 0.9965 (horizon 286 steps); a fixed 0.9965 would keep
    0.9965^100 = 70% of the random initial weights in a 100-step run's EMA."""
    assert train_gpt.relative_ema_decay(0.058, 10, 10 / 4900, 4900) == pytest.approx(0.9965, abs=2e-5)
    short, long = _ema_weights_by_step(100, 0.058), _ema_weights_by_step(4900, 0.058)
    assert sum(short) == pytest.approx(1.0) and sum(long) == pytest.approx(1.0)
    assert short[0] < 1e-6 and 0.9965 ** 100 > 0.7
    # share of the EMA from the last 10% and 20% of training: 1 - (1 - 1/(f N))^(q N) ~ 1 - exp(-q/f)
    for share in (0.1, 0.2):
        tail_short, tail_long = sum(short[-int(share * 100):]), sum(long[-int(share * 4900):])
        assert tail_short == pytest.approx(1 - (1 - 1 / 5.8) ** (share * 100), rel=1e-6)
        assert abs(tail_short - tail_long) < 0.04


def test_relative_ema_horizon_under_a_wallclock_cap_follows_the_pace_so_far():
    """Without a step limit the expected length is step / progress (capped by ITERATIONS)."""
    assert train_gpt.relative_ema_decay(0.1, 50, 0.25, 20000) == pytest.approx(1 - 1 / 20)  # 200 steps expected
    assert train_gpt.relative_ema_decay(0.1, 0, 0.0, 300) == pytest.approx(1 - 1 / 30)  # start: ITERATIONS
    assert train_gpt.relative_ema_decay(0.01, 5, 0.5, 20000) == 0.0  # horizon under one step: the live weights


def test_muon_update_matches_a_hand_computed_step():
    """One Muon step on one matrix equals: momentum, Nesterov, row norm, NS, shape scale, decoupled wd."""
    torch.manual_seed(3)
    weight = torch.nn.Parameter(torch.randn(64, 32))
    start = weight.detach().clone()
    grad = torch.randn(64, 32)
    weight.grad = grad.clone()
    muon = train_gpt.Muon([dict(params=[weight], weight_decay=0.1)], lr=0.02, momentum=0.9, nesterov=True,
                          backend_steps=5, polar_express=False, row_normalize=True)
    muon.apply_updates(muon.reduce_gradients())
    update = grad + 0.9 * grad  # buffer = grad after one step; Nesterov adds momentum * buffer
    update = update / update.norm(dim=-1, keepdim=True)
    update = train_gpt.newton_schulz(update) * (64 / 32) ** 0.5
    expected = start * (1 - 0.02 * 0.1) - 0.02 * update
    assert torch.allclose(weight.detach(), expected, atol=1e-5)


def test_muon_group_update_is_one_batched_newton_schulz_equal_to_per_matrix_steps(monkeypatch):
    """Three same-shape matrices, two steps (momentum carries over): one Newton-Schulz call per group
    and step, and every matrix moves exactly as the per-matrix formula says."""
    torch.manual_seed(4)
    weights = [torch.nn.Parameter(torch.randn(48, 16)) for _ in range(3)]
    starts = [w.detach().clone() for w in weights]
    grads = [[torch.randn(48, 16) for _ in weights] for _ in range(2)]
    muon = train_gpt.Muon([dict(params=weights, weight_decay=0.0)], lr=0.05, momentum=0.8, nesterov=True,
                          backend_steps=5, polar_express=True, row_normalize=True)
    calls = []
    original = train_gpt.newton_schulz
    monkeypatch.setattr(train_gpt, "newton_schulz", lambda x, *args: calls.append(x.shape) or original(x, *args))
    for step_grads in grads:
        for weight, grad in zip(weights, step_grads):
            weight.grad = grad.clone()
        muon.apply_updates(muon.reduce_gradients())
    assert calls == [torch.Size([3, 48, 16])] * 2
    for index, start in enumerate(starts):
        expected, buffer = start.clone(), torch.zeros(48, 16)
        for step_grads in grads:
            buffer = 0.8 * buffer + step_grads[index]
            update = step_grads[index] + 0.8 * buffer
            update = update / update.norm(dim=-1, keepdim=True)
            expected -= 0.05 * original(update, 5, True) * (48 / 16) ** 0.5
        torch.testing.assert_close(weights[index].detach(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scope", ["global", "local"])
def test_gradient_clipping_scales_by_the_global_norm(scope):
    """On one rank both scopes scale every gradient by clip / (norm + 1e-6); the returned norm is that of
    the gradient the global clip sees (after the local clip, under local)."""
    h = tiny_h(GRAD_CLIP_NORM=1e-3, GRAD_CLIP_SCOPE=scope)
    torch.manual_seed(0)
    model = train_gpt.GPT(h.model)
    optimizer = train_gpt.TrainingOptimizer(model, h.optim)
    ids = random_tokens(2, 64)
    model(ids, ids).backward()
    expected_norm = torch.sqrt(sum(p.grad.square().sum() for p in model.parameters())).item()
    embed_grad = model.tok_emb.weight.grad.clone()
    norm = optimizer.step()
    assert norm.item() == pytest.approx(expected_norm if scope == "global" else 1e-3, rel=1e-4)
    # Adam grads were scaled in place before the update
    assert torch.allclose(model.tok_emb.weight.grad, embed_grad * (1e-3 / (expected_norm + 1e-6)), rtol=1e-4)


def _clip_worker(rank, world_size, port, scope, queue):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        h = tiny_h(GRAD_CLIP_NORM=0.05, GRAD_CLIP_SCOPE=scope)
        torch.manual_seed(0)
        model = train_gpt.GPT(h.model)
        optimizer = train_gpt.TrainingOptimizer(model, h.optim)
        ids = random_tokens(2, 64, seed=rank)  # each rank its own batch: different gradients
        model(ids, ids).backward()
        local = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        grads = [None] * world_size
        dist.all_gather_object(grads, local)
        optimizer.step()
        used = model.tok_emb.weight.grad  # what AdamW received on this rank
        clip, embed = 0.05, "tok_emb.weight"

        def factor(tensors):
            norm = torch.sqrt(sum(t.square().sum() for t in tensors.values()))
            return min(1.0, clip / (float(norm) + 1e-6))

        if scope == "local":
            expected = sum(g[embed] * factor(g) for g in grads) / world_size
        else:
            mean = {name: sum(g[name] for g in grads) / world_size for name in grads[0]}
            expected = mean[embed] * factor(mean)
        if rank == 0:  # plain floats through the queue
            queue.put((float((used - expected).abs().max()), float(expected.abs().max()),
                       [factor(g) for g in grads]))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("scope", ["global", "local"])
def test_gradient_clip_scope_across_two_ranks(scope):
    """PR 1855 clips each rank's own gradient (its all-reduce comes later): the averaged gradient is
    mean_r(g_r * min(1, c / (|g_r| + 1e-6))). Global: mean_r(g_r) * min(1, c / (|mean_r g_r| + 1e-6)).
    Checked on the embedding gradient that AdamW receives on rank 0."""
    queue = spawn_gloo_ranks(_clip_worker, 2, scope)
    difference, magnitude, factors = queue.get()
    assert max(factors) < 1  # both ranks clip, so the two scopes give different gradients
    assert difference <= 1e-4 * magnitude


def test_optimizer_state_round_trips_exactly():
    h = tiny_h()
    torch.manual_seed(0)
    model = train_gpt.GPT(h.model)
    optimizer = train_gpt.TrainingOptimizer(model, h.optim)
    ids = random_tokens(2, 64)
    model(ids, ids).backward()
    optimizer.step()
    saved = optimizer.state_dict()
    assert len(saved["muon"]["state"]) == sum(len(g["params"]) for g in optimizer.muon.param_groups)
    assert len(saved["adam"]["state"]) == len(optimizer.adam_params)
    fresh = train_gpt.TrainingOptimizer(model, h.optim)
    fresh.load_state_dict(saved)
    for param, state in optimizer.muon.state.items():
        assert torch.equal(fresh.muon.state[param]["momentum_buffer"], state["momentum_buffer"])
