"""The model: every switch runs forward/backward, gradients reach every parameter group, depth
recurrence and parallel lanes behave as specified, documents are isolated, backends agree."""

import math
import sys

import pytest
import torch

import train_gpt
from tg_helpers import perturb_parameters, random_tokens, tiny_h

ALL_OFF = dict(XSA=0, UNET_SKIPS=0, SKIP_GATES=0, RESID_MIX=0, NUM_LOOPS=1, PARALLEL_START_LAYER=-1, GATED_ATTN=0,
               SPARSE_ATTN_GATE=0, SMEAR_GATE=0, LN_SCALE=0, ROPE_DIMS=0, LOGIT_SOFTCAP=0)


def build(h, backend="plain", seed=0, perturb=True, recurrence=True):
    torch.manual_seed(seed)
    model = train_gpt.GPT(h.model, backend)
    if perturb:
        perturb_parameters(model, seed)
    model.set_recurrence(recurrence)
    return model


def test_interface_shapes_and_dtypes():
    model = build(tiny_h())
    ids = random_tokens(2, 128, bos_every=50)
    logits = model.forward_logits(ids)
    nll = model.per_token_nll(ids, ids)
    loss = model(ids, ids)
    assert logits.shape == (2, 128, 512) and logits.dtype == torch.float32
    assert nll.shape == (2, 128) and nll.dtype == torch.float32
    assert torch.allclose(loss, nll.mean())
    assert logits.abs().max() <= 30.0  # softcap
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none")
    assert torch.allclose(nll.flatten(), expected)


@pytest.mark.parametrize("switch, value", [
    ("XSA", 0), ("UNET_SKIPS", 0), ("SKIP_GATES", 0), ("RESID_MIX", 0), ("NUM_LOOPS", 1),
    ("PARALLEL_START_LAYER", -1), ("GATED_ATTN", 0), ("SPARSE_ATTN_GATE", 0), ("SMEAR_GATE", 0), ("LN_SCALE", 0),
    ("ROPE_DIMS", 0), ("ROPE_DIMS", 16), ("LOGIT_SOFTCAP", 0), ("MLP_ACT", "relu2"), ("QK_GAIN_INIT", 1.5),
    ("ORTHOGONAL_INIT", 0),
    ("MLP_LEAKY_SLOPE", 0.3),
])
def test_each_switch_changes_the_function_and_trains(switch, value):
    overrides = {switch: value}
    if switch == "GATED_ATTN":
        overrides["SPARSE_ATTN_GATE"] = 0
    ids = random_tokens(2, 128, bos_every=40)
    reference = build(tiny_h())(ids, ids)
    model = build(tiny_h(**overrides))
    loss = model(ids, ids)
    loss.backward()
    assert torch.isfinite(loss)
    assert not torch.allclose(loss, reference), f"{switch}={value} did not change the model"
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_everything_off_still_trains():
    model = build(tiny_h(**ALL_OFF), recurrence=False)
    ids = random_tokens(2, 128)
    model(ids, ids).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("recurrence", [True, False])
def test_gradient_reaches_every_parameter_and_every_optimizer_group(recurrence):
    h = tiny_h()
    model = build(h, recurrence=recurrence)
    ids = random_tokens(2, 128, bos_every=50)
    model(ids, ids).backward()
    optimizer = train_gpt.TrainingOptimizer(model, h.optim)
    grouped = [p for g in optimizer.muon.param_groups for p in g["params"]] + optimizer.adam_params
    assert sorted(map(id, grouped)) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    unused_skips = 0
    for name, param in model.named_parameters():
        nonzero_rows = (param.grad.reshape(param.shape[0], -1).abs().sum(-1) > 0) if param.dim() else param.grad != 0
        if name in ("skip_weights", "skip_gates") and not recurrence:
            # fewer U-Net pairs without recurrence: only the first rows are used
            encoder, _ = model.layer_order()
            assert nonzero_rows[: len(encoder)].all() and not nonzero_rows[len(encoder):].any()
            unused_skips += 1
            continue
        assert nonzero_rows.all(), f"{name} has rows without gradient"
    assert unused_skips == (0 if recurrence else 2)
    for group in optimizer.muon.param_groups + optimizer.adam.param_groups:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in group["params"])


def test_parameter_routing_matrices_to_muon_rest_to_adam():
    h = tiny_h()
    model = build(h)
    optimizer = train_gpt.TrainingOptimizer(model, h.optim)
    muon = {id(p) for g in optimizer.muon.param_groups for p in g["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in muon}
    assert names == {n for n, _ in model.named_parameters()
                     if n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight",
                                    "fc.weight", "proj.weight")) and "gate" not in n}
    assert optimizer.adam.param_groups[0]["params"][0] is model.tok_emb.weight


def test_layer_order_with_and_without_recurrence():
    model = train_gpt.GPT(train_gpt.Hyperparameters.from_env({"PRESET": "pr1493", "NUM_LAYERS": "11"}).model)
    assert model.layer_order(looping=True) == ([0, 1, 2, 3, 4, 5, 3, 4], [5, 3, 4, 5, 6, 7, 8, 9, 10])
    assert model.layer_order(looping=False) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10])
    assert model.skip_weights.shape[0] == 8


def test_recurrence_switch_changes_output_and_reuses_weights():
    h = tiny_h()
    model = build(h, recurrence=False)
    ids = random_tokens(1, 64)
    off = model.forward_logits(ids)
    model.set_recurrence(True)
    on = model.forward_logits(ids)
    assert not torch.allclose(off, on)
    calls = []
    model.blocks[2].register_forward_hook(lambda *args: calls.append(2))
    model.forward_logits(ids)
    assert len(calls) == h.model.num_loops  # the looped block runs once per pass with the same weights
    no_loop = build(tiny_h(NUM_LOOPS=1))
    no_loop.set_recurrence(True)
    assert no_loop.recurrence_active is False


def test_parallel_lanes_start_equal_and_split_when_mixes_differ():
    h = tiny_h(NUM_LOOPS=1, UNET_SKIPS=0)  # a skip would enter lane 0 only
    model = build(h)
    assert [block.parallel for block in model.blocks] == [False] * 4 + [True] * 2
    lanes = {}
    model.blocks[4].register_forward_hook(lambda module, args, output: lanes.setdefault("out", output))
    ids = random_tokens(1, 32)
    with torch.no_grad():
        model.blocks[4].lane_mix.fill_(1.0)  # both lanes get the same updates: they stay equal
        model.blocks[4].lane_resid.fill_(1.0)
        model.forward_logits(ids)
        assert lanes["out"].shape[0] == 2 and torch.allclose(lanes["out"][0], lanes["out"][1])
        model.blocks[4].lane_mix[1, 0] = 0.0  # lane 1 stops receiving attention output
        lanes.clear()
        model.forward_logits(ids)
        assert not torch.allclose(lanes["out"][0], lanes["out"][1])


def test_parallel_block_matches_its_definition():
    h = tiny_h(NUM_LOOPS=1, RESID_MIX=0)
    model = build(h)
    block = model.blocks[5]
    layout = train_gpt.DocumentLayout.build(random_tokens(1, 16), "plain")
    x = torch.randn(2, 1, 16, h.model.model_dim)
    with torch.no_grad():
        out = block(x, x[0], layout)
        attn = block.attn_scale * block.attn(train_gpt.rms_norm(x[0]) * block.ln_scale, layout)
        mlp = block.mlp_scale * block.mlp(train_gpt.rms_norm(x[1]) * block.ln_scale)
        for lane in range(2):
            expected = block.lane_resid[lane] * x[lane] + block.lane_mix[lane, 0] * attn + block.lane_mix[lane, 1] * mlp
            assert torch.allclose(out[lane], expected, atol=1e-5)
    assert block.ln_scale == pytest.approx(1 / math.sqrt(6))


def _pr1855_hidden_states(model, ids, layout):
    """PR 1855's _forward_hidden written out from its source, on our modules' parameters: SmearGate on
    the raw embedding (masked where the current token is BOS), then RMSNorm = x0; serial blocks
    x_in = m0 x + m1 x0, x_in + a_s attn(n(x_in)), + m_s mlp(n(.)); in the decoder the gated skip is
    lerp(w skip, x, sigmoid(g)); at the first parallel layer lane0 = lane1 = x, the skip then enters
    lane0 only; a parallel block's attention reads n(m0 lane0 + m1 x0), its MLP reads n(lane1), and
    lane_k <- resid_k lane_k + post(attn->k) attn + post(mlp->k) mlp; output n((lane0 + lane1) / 2)."""
    norm = lambda t: torch.nn.functional.rms_norm(t, (t.size(-1),))  # noqa: E731
    x = model.tok_emb(ids)
    smear = model.smear
    gate = smear.smear_lambda * torch.sigmoid(x[:, 1:, : smear.dims] @ smear.gate.weight.T)
    not_bos = (ids[:, 1:] != train_gpt.BOS_ID).to(x.dtype)[..., None]
    x = norm(torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1] * not_bos], dim=1))
    x0 = x
    encoder, decoder = model.layer_order()

    def serial(block, x):
        x_in = block.resid_mix[0] * x + block.resid_mix[1] * x0
        out = x_in + block.attn_scale * block.attn(norm(x_in) * block.ln_scale, layout)
        return out + block.mlp_scale * block.mlp(norm(out) * block.ln_scale)

    skips = []
    for index in encoder:
        x = serial(model.blocks[index], x)
        skips.append(x)
    lane0 = lane1 = None
    for position, index in enumerate(decoder):
        block = model.blocks[index]
        weight, gate = model.skip_weights[position], torch.sigmoid(model.skip_gates[position])
        if block.parallel:
            if lane0 is None:
                lane0 = lane1 = x
            if skips:
                lane0 = torch.lerp(weight * skips.pop(), lane0, gate)
            attn = block.attn_scale * block.attn(
                norm(block.resid_mix[0] * lane0 + block.resid_mix[1] * x0) * block.ln_scale, layout)
            mlp = block.mlp_scale * block.mlp(norm(lane1) * block.ln_scale)
            post, resid = block.lane_mix, block.lane_resid  # post[target lane, (attn, mlp)]
            lane0, lane1 = (resid[0] * lane0 + post[0, 0] * attn + post[0, 1] * mlp,
                            resid[1] * lane1 + post[1, 0] * attn + post[1, 1] * mlp)
        else:
            if skips:
                x = torch.lerp(weight * skips.pop(), x, gate)
            x = serial(block, x)
    return norm(0.5 * (lane0 + lane1))


@pytest.mark.parametrize("recurrence", [False, True])
def test_hidden_states_match_pr1855_forward(recurrence):
    """Parallel lanes, where the U-Net skip enters them, and SmearGate placement, against PR 1855's
    forward written out independently (random weights everywhere, so every path matters)."""
    h = tiny_h()  # 6 layers, loop 2-3, parallel from 4: skips reach the parallel layers
    model = build(h, recurrence=recurrence)
    ids = random_tokens(2, 48, bos_every=17)
    layout = train_gpt.DocumentLayout.build(ids, "plain")
    with torch.no_grad():
        torch.testing.assert_close(model.hidden_states(ids, layout=layout), _pr1855_hidden_states(model, ids, layout),
                                   atol=2e-5, rtol=2e-5)


def test_init_as_pr1855_orthogonal_matrices_lane_residual_and_zero_sparse_gate():
    """PR 1855 _init_weights: q, k, v and MLP-up matrices orthogonal (all singular values 1), output
    projections zero; parallel residual scales 1.1; the sparse attention gate starts at zero."""
    h = tiny_h()
    model = train_gpt.GPT(h.model)
    block = model.blocks[4]
    for linear in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj, block.mlp.fc):
        singular = torch.linalg.svdvals(linear.weight.detach())
        torch.testing.assert_close(singular, torch.ones_like(singular), atol=1e-5, rtol=0)
    assert not block.attn.out_proj.weight.any() and not block.mlp.proj.weight.any()
    assert torch.equal(block.lane_resid.detach(), torch.full((2,), 1.1)) and not block.attn.gate.weight.any()
    plain = train_gpt.GPT(tiny_h(ORTHOGONAL_INIT=0).model).blocks[4].attn.q_proj.weight.detach()
    assert torch.linalg.svdvals(plain).std() > 0.1  # nn.Linear's uniform init is not orthogonal
    assert not train_gpt.Hyperparameters.from_env({"PRESET": "baseline"}).model.orthogonal_init


def _doc(length, seed):
    ids = random_tokens(1, length, seed=seed)[0]
    ids[0] = train_gpt.BOS_ID
    return ids


@pytest.mark.parametrize("backend", ["plain", "sdpa"])
@pytest.mark.parametrize("smear", [0, 1])
def test_token_output_unchanged_by_a_different_preceding_document(backend, smear):
    model = build(tiny_h(SMEAR_GATE=smear), backend)
    target_doc = _doc(40, seed=1)
    first = torch.cat([_doc(30, seed=2), target_doc])[None]
    second = torch.cat([_doc(55, seed=3), target_doc])[None]
    with torch.no_grad():
        a = model.forward_logits(first)[0, 30:]
        b = model.forward_logits(second)[0, 55:]
        alone = model.forward_logits(target_doc[None])[0]
    assert torch.allclose(a, b, atol=1e-4) and torch.allclose(a, alone, atol=1e-4)


def test_isolation_depends_on_bos_not_on_luck():
    """Sanity check of the test above: without the BOS the preceding text does change the output."""
    model = build(tiny_h())
    target_doc = _doc(40, seed=1)
    target_doc[0] = 9  # not a BOS: the two segments are one document
    first = torch.cat([_doc(30, seed=2), target_doc])[None]
    second = torch.cat([_doc(30, seed=3), target_doc])[None]
    with torch.no_grad():
        assert not torch.allclose(model.forward_logits(first)[0, 30:], model.forward_logits(second)[0, 30:], atol=1e-3)


def test_outputs_are_causal():
    model = build(tiny_h())
    ids = random_tokens(1, 64, bos_every=20)
    changed = ids.clone()
    changed[0, 50:] = 9
    with torch.no_grad():
        assert torch.allclose(model.forward_logits(ids)[0, :50], model.forward_logits(changed)[0, :50], atol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_cpu_backends_agree():
    h = tiny_h()
    ids = random_tokens(2, 128, bos_every=37)
    with torch.no_grad():
        reference = build(h, "plain").forward_logits(ids)
        for backend in ("sdpa", "flex"):
            if backend == "flex":
                pytest.importorskip("torch.nn.attention.flex_attention")
            other = build(h, backend).forward_logits(ids)
            assert torch.allclose(reference, other, atol=1e-4), backend


def test_backend_selection_on_cpu():
    cpu = torch.device("cpu")
    assert train_gpt.select_attention_backend("auto", cpu) == "sdpa"
    assert train_gpt.select_attention_backend("plain", cpu) == "plain"
    with pytest.raises(ValueError, match="ATTN_BACKEND=fa3"):
        train_gpt.select_attention_backend("fa3", cpu)


def test_fa3_check_says_why_it_falls_back(monkeypatch):
    """FA3 is decided by a real import and call; the reason it is not used goes into the log line."""
    assert train_gpt.fa3_problem(torch.device("cpu")) == "not a Hopper GPU"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)  # importing it raises ImportError
    problem = train_gpt.fa3_problem(torch.device("cuda", 0))
    assert "ImportError" in problem or "ModuleNotFoundError" in problem
    assert "flash_attn_interface" in problem
    assert train_gpt.fa3_available(torch.device("cuda", 0)) is False


def test_xsa_removes_the_own_value_component():
    h = tiny_h(GATED_ATTN=0, SPARSE_ATTN_GATE=0)
    attn = build(h).blocks[0].attn
    captured = {}
    original = train_gpt.attention

    def spy(q, k, v, layout):
        out = original(q, k, v, layout)
        captured["v"] = v
        return out

    x = torch.randn(1, 16, h.model.model_dim)
    layout = train_gpt.DocumentLayout.build(random_tokens(1, 16), "plain")
    outputs = {}
    attn.out_proj.register_forward_hook(lambda module, args, output: outputs.setdefault("y", args[0]))
    train_gpt.attention = spy
    try:
        with torch.no_grad():
            attn(x, layout)
    finally:
        train_gpt.attention = original
    y = outputs["y"].view(1, 16, h.model.num_heads, h.model.head_dim)
    v = captured["v"].repeat_interleave(h.model.num_heads // h.model.num_kv_heads, dim=2)
    assert (y * v).sum(-1).abs().max() < 1e-4  # orthogonal to the own value vector


def test_lora_hook_sees_every_site_and_its_delta_is_added():
    h = tiny_h(NUM_LOOPS=1)
    model = build(h)
    seen = []

    def adapter(site, layer_index, x):
        seen.append((site, layer_index))
        return torch.ones(1) * 0.01 if site == "head" else None

    ids = random_tokens(1, 32)
    with torch.no_grad():
        plain = model.forward_logits(ids)
        adapted = model.forward_logits(ids, lora=adapter)
    sites = {site for site, _ in seen}
    assert sites == {"q", "k", "v", "o", "mlp", "head"}
    assert ("head", -1) in seen and {layer for _, layer in seen if layer >= 0} == set(range(h.model.num_layers))
    cap = h.model.logit_softcap
    expected = cap * torch.tanh((cap * torch.atanh(plain / cap) + 0.01) / cap)
    assert torch.allclose(adapted, expected, atol=1e-3)
    nll = model.per_token_nll(ids, ids, lora=adapter)
    assert nll.shape == (1, 32)


def test_o_and_mlp_adapters_read_the_normed_block_inputs_as_in_pr1855():
    """PR 1855 (_block_with_lora): the O adapter reads the normed attention input n and is added to the
    output projection's output; the MLP adapter is a model_dim -> model_dim bypass from the normed MLP
    input, added to the MLP's output. Both outputs are then scaled by attn_scale / mlp_scale."""
    h = tiny_h(NUM_LOOPS=1)
    model = build(h)
    dim = h.model.model_dim
    dims = train_gpt.lora_site_dims(model, sites=("o", "mlp"))
    assert set(dims.values()) == {(dim, dim)} and len(dims) == 2 * h.model.num_layers
    block = model.blocks[1]  # a serial block
    generator = torch.Generator().manual_seed(3)
    weights = {site: torch.randn(dim, dim, generator=generator) * 0.1 for site in ("o", "mlp")}

    def adapter(site, layer_index, x):
        return x @ weights[site] if site in weights and layer_index == 7 else None

    x, x0 = torch.randn(1, 2, 16, dim, generator=generator), torch.randn(2, 16, dim, generator=generator)
    layout = train_gpt.DocumentLayout.build(random_tokens(2, 16, bos_every=6), "plain")
    with torch.no_grad():
        out = block(x, x0, layout, adapter, 7)[0]
        mix = block.resid_mix
        x_in = mix[0] * x[0] + mix[1] * x0
        n = torch.nn.functional.rms_norm(x_in, (dim,)) * block.ln_scale
        middle = x_in + block.attn_scale * (block.attn(n, layout) + n @ weights["o"])
        m = torch.nn.functional.rms_norm(middle, (dim,)) * block.ln_scale
        expected = middle + block.mlp_scale * (block.mlp(m) + m @ weights["mlp"])
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(block(x, x0, layout, adapter, 6)[0], out)  # another pass: no adapter


def test_gated_attention_init_std_and_sparse_gate_width():
    model = train_gpt.GPT(train_gpt.Hyperparameters.from_env({"PRESET": "pr1855", "NUM_LAYERS": "2",
                                                              "LOOP_START": "0", "LOOP_END": "0",
                                                              "PARALLEL_START_LAYER": "1"}).model)
    gate = model.blocks[0].attn.gate.weight
    assert gate.shape == (8, 12)
    dense = train_gpt.GPT(train_gpt.Hyperparameters.from_env({"PRESET": "pr1736", "NUM_LAYERS": "2", "LOOP_START": "0",
                                                              "LOOP_END": "0", "PARALLEL_START_LAYER": "1"}).model)
    weight = dense.blocks[0].attn.gate.weight
    assert weight.shape == (8, 512) and abs(weight.std().item() - 0.005) < 0.0005
    assert abs(model.tok_emb.weight.std().item() - 0.005) < 0.0002


def test_bf16_autocast_on_cpu_runs_and_stays_close_to_fp32():
    """AUTOCAST=bf16 is allowed on CPU: same loss to bf16 precision, finite gradients everywhere."""
    model = build(tiny_h())
    ids = random_tokens(2, 64, bos_every=30)
    reference = model(ids, ids)
    with train_gpt.compute_context(torch.device("cpu"), "bf16"):
        loss = model(ids, ids)
    loss.backward()
    assert abs(loss.item() - reference.item()) < 0.05
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_varlen_layout_marks_every_document_and_row_start():
    """The FA3 layout (built on CPU here) splits at each BOS and at every row start."""
    ids = torch.full((2, 8), 9)
    ids[0, 3] = train_gpt.BOS_ID
    ids[1, 0] = train_gpt.BOS_ID
    ids[1, 6] = train_gpt.BOS_ID
    layout = train_gpt.DocumentLayout.build(ids, "fa3")
    assert layout.cu_seqlens.tolist() == [0, 3, 8, 14] + [16] * 60 and layout.cu_seqlens.dtype == torch.int32
    dense = train_gpt.DocumentLayout.build(ids, "plain").dense_mask
    assert dense[0, 0, 4, 2].item() is False and dense[0, 0, 4, 3].item() is True
    assert dense[1, 0, 7, 5].item() is False and dense[1, 0, 5, 0].item() is True


def test_mlp_leaky_slope_is_the_negative_slope_of_the_squared_activation():
    """MLP_LEAKY_SLOPE (PR 1945/1967: 0.3): hidden = (x if x > 0 else slope * x)^2, written out by hand."""
    h = tiny_h(MLP_LEAKY_SLOPE=0.3)
    mlp = train_gpt.MLP(h.model, 0)
    torch.manual_seed(0)
    torch.nn.init.normal_(mlp.proj.weight, std=0.1)
    x = torch.randn(2, 5, h.model.model_dim)
    pre = x @ mlp.fc.weight.t()
    hidden = torch.where(pre > 0, pre, 0.3 * pre) ** 2
    assert (pre < 0).any() and torch.allclose(mlp(x), hidden @ mlp.proj.weight.t(), atol=1e-6)


def test_rotary_angles_past_the_training_length_follow_the_rope_formula():
    """Long-context eval (PR 1953: EVAL_SEQ_LEN 2560 > TRAIN_SEQ_LEN 2048) extrapolates RoPE: position p
    rotates the pair (x_i, x_{i+d/2}) of the first ROPE_DIMS dims by p * base^(-2i/d), for p past the
    training length too, and leaves the other dims alone. Reference: complex multiplication."""
    train_len, eval_len, rope_dims, base, head_dim = 64, 160, 8, 10000.0, 16
    rotary = train_gpt.Rotary(rope_dims, base)
    x = torch.randn(2, eval_len, 3, head_dim, dtype=torch.float64)
    out = rotary(x.float()).double()
    half = rope_dims // 2
    for p in [0, 1, train_len - 1, train_len, train_len + 7, eval_len - 1]:
        for i in range(half):
            angle = p * base ** (-2 * i / rope_dims)
            pair = torch.complex(x[:, p, :, i], x[:, p, :, i + half]) * complex(math.cos(angle), math.sin(angle))
            assert torch.allclose(out[:, p, :, i], pair.real, atol=1e-5)
            assert torch.allclose(out[:, p, :, i + half], pair.imag, atol=1e-5)
    assert torch.equal(out[..., rope_dims:], x.float().double()[..., rope_dims:])


def test_a_document_scores_the_same_at_any_row_offset_even_past_the_training_length():
    """Within a document, attention sees only offsets, so a document placed after a long filler
    document (its positions run past TRAIN_SEQ_LEN=128) gets the logits it gets at row start."""
    h = tiny_h()
    model = build(h)
    target_doc = _doc(60, seed=1)
    filler = _doc(h.data.train_seq_len + 20, seed=2)
    shifted = torch.cat([filler, target_doc])[None]
    assert shifted.shape[1] > h.data.train_seq_len + 60 - 1
    with torch.no_grad():
        late = model.forward_logits(shifted)[0, filler.numel():]
        alone = model.forward_logits(target_doc[None])[0]
    assert torch.allclose(late, alone, atol=1e-4)


def _segment_starts_reference(stream: list[int], max_seqlen: int) -> list[int]:
    """PR 1855's `_build_cu_seqlens` rule written as a loop: a segment starts at position 0, at every BOS,
    and every max_seqlen tokens after the start of the document it lies in."""
    starts, doc_start = [], 0
    for position, token in enumerate(stream):
        if position == 0 or token == train_gpt.BOS_ID:
            doc_start = position
        if (position - doc_start) % max_seqlen == 0:
            starts.append(position)
    return starts


def _random_stream(seed: int, seq_len: int, rows: int) -> torch.Tensor:
    """A micro-batch span [1, rows * seq_len] of random documents (lengths 1..3*seq_len, so some run past
    2*seq_len) that starts inside a document, as a span after a micro-batch boundary does."""
    generator = torch.Generator().manual_seed(seed)
    parts = [torch.randint(8, 512, (int(torch.randint(1, 3 * seq_len, (1,), generator=generator)),),
                           generator=generator)]  # the tail of a document cut by the previous span
    while sum(map(len, parts)) < rows * seq_len:
        length = int(torch.randint(1, 3 * seq_len + 1, (1,), generator=generator))
        parts.append(torch.cat([torch.tensor([train_gpt.BOS_ID]), torch.randint(8, 512, (length - 1,),
                                                                                 generator=generator)]))
    return torch.cat(parts)[: rows * seq_len][None]


@pytest.mark.parametrize("seed", range(6))
def test_flat_row_segments_start_at_every_bos_and_every_seq_len_into_a_document(seed):
    """TRAIN_PACKING=flat (PR 1855): over a random span, the cu_seqlens of the flat row are exactly the
    reference loop's segment starts (bucketed, padded with the row length), no segment is longer than
    TRAIN_SEQ_LEN, and the dense mask of the other backends cuts at the same places."""
    seq_len, rows = 16, 6
    ids = _random_stream(seed, seq_len, rows)
    expected = _segment_starts_reference(ids[0].tolist(), seq_len)
    assert len(expected) > ids.eq(train_gpt.BOS_ID).sum() + 1  # some document was cut at seq_len
    layout = train_gpt.DocumentLayout.build(ids, "varlen", max_seqlen=seq_len)
    cu = layout.cu_seqlens.tolist()
    assert len(cu) % 64 == 0 and cu[: len(expected)] == expected and set(cu[len(expected):]) == {rows * seq_len}
    assert layout.max_seqlen == seq_len and max(b - a for a, b in zip(cu, cu[1:])) <= seq_len
    segment = torch.tensor([sum(start <= p for start in expected) for p in range(rows * seq_len)])
    reference_mask = (segment[:, None] == segment[None, :]) & torch.ones(rows * seq_len, rows * seq_len).bool().tril()
    assert torch.equal(train_gpt.DocumentLayout.build(ids, "plain", max_seqlen=seq_len).dense_mask[0, 0], reference_mask)
    # the SmearGate still sees only real document starts: a cut inside a document keeps its predecessor
    assert torch.equal(layout.doc_start[0], (ids[0] == train_gpt.BOS_ID) | (torch.arange(rows * seq_len) == 0))


def test_varlen_attention_over_a_flat_row_equals_dense_attention_per_segment():
    """The varlen reference on one flat row (GQA, segments from documents longer than 2*seq_len cut every
    seq_len) equals softmax attention computed segment by segment on its own slice, by hand."""
    seq_len, rows, heads, kv_heads, head_dim = 16, 6, 4, 2, 8
    ids = _random_stream(3, seq_len, rows)
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, rows * seq_len, heads, head_dim, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(1, rows * seq_len, kv_heads, head_dim, generator=generator, dtype=torch.float64)
            for _ in range(2))
    out = train_gpt.attention(q, k, v, train_gpt.DocumentLayout.build(ids, "varlen", max_seqlen=seq_len))
    starts = _segment_starts_reference(ids[0].tolist(), seq_len) + [rows * seq_len]
    for start, end in zip(starts, starts[1:]):
        for head in range(heads):
            q_s, k_s, v_s = q[0, start:end, head], k[0, start:end, head // 2], v[0, start:end, head // 2]
            scores = q_s @ k_s.T / math.sqrt(head_dim)
            scores = scores.masked_fill(torch.ones_like(scores).bool().triu(1), float("-inf"))
            assert torch.allclose(out[0, start:end, head], torch.softmax(scores, -1) @ v_s, atol=1e-10)


@pytest.mark.parametrize("seed", range(3))
def test_a_document_of_at_most_seq_len_is_attended_whole_in_a_flat_row(seed):
    """In a flat row every document of <= TRAIN_SEQ_LEN tokens gets the logits it gets alone, wherever it
    lies (after a document longer than 2*TRAIN_SEQ_LEN, across a row boundary of the rows layout), with
    RoPE positions running over the whole row; the rows layout cuts the one across a row boundary."""
    h = tiny_h(TRAIN_SEQ_LEN=32)
    seq_len = h.data.train_seq_len
    model = build(h, "varlen")
    generator = torch.Generator().manual_seed(seed)
    filler = _doc(2 * seq_len + 11 + int(torch.randint(0, seq_len, (1,), generator=generator)), seed=seed + 10)
    target = _doc(seq_len - int(torch.randint(0, 8, (1,), generator=generator)), seed=seed + 20)
    tail = _doc(4 * seq_len, seed=seed + 30)
    stream = torch.cat([filler, target, tail])[: 4 * seq_len]
    begin, end = filler.numel(), filler.numel() + target.numel()
    assert begin // seq_len != (end - 1) // seq_len  # the target crosses a row boundary of the rows layout
    flat = stream[None]
    with torch.no_grad():
        alone = model.forward_logits(target[None])[0]
        in_flat = model.forward_logits(flat, layout=train_gpt.DocumentLayout.build(flat, "varlen", seq_len))[0]
        in_rows = model.forward_logits(stream.view(4, seq_len)).flatten(0, 1)
    assert torch.allclose(in_flat[begin:end], alone, atol=1e-4)
    assert not torch.allclose(in_rows[begin:end], alone, atol=1e-3)
