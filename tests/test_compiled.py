"""The compiled path (COMPILE=1), proven on CPU: the record run on GPUs is compiled, so a crash, a graph
break or a recompile storm there would cost the run. torch.compile's graph capture (dynamo + AOT
autograd) is the same on CPU; `aot_eager` checks it without inductor's C++ code generation, which is
slow on a 2-core machine, and two small tests run inductor itself (training; chunked-TTT eval). FA3 cannot run here, but its layout
(bucketed cu_seqlens) runs through the `varlen` reference backend, which consumes exactly FA3's inputs."""

import json

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import train_gpt
from tg_helpers import perturb_parameters, random_tokens, tiny_h

# a small model with every record feature (recurrence, parallel lanes, gates, smear, XSA)
SMALL = dict(NUM_LAYERS=4, LOOP_START=1, LOOP_END=1, NUM_LOOPS=2, PARALLEL_START_LAYER=3, MODEL_DIM=32,
             NUM_HEADS=2, NUM_KV_HEADS=1, ROPE_DIMS=8, SMEAR_GATE_DIMS=8, SPARSE_ATTN_GATE_DIMS=8)
# still every feature (one looped layer, one parallel layer), fewest ops: tracing time is the test's cost
MINIMAL = dict(NUM_LAYERS=2, LOOP_START=0, LOOP_END=0, NUM_LOOPS=2, PARALLEL_START_LAYER=1)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def small_model(backend="varlen", seed=0, **overrides):
    h = tiny_h(**dict(SMALL, **overrides))
    torch.manual_seed(seed)
    model = train_gpt.GPT(h.model, backend)
    perturb_parameters(model, seed)
    return h, model


def test_varlen_layout_pads_cu_seqlens_to_a_bucket_and_matches_dense_masking():
    """FA3's inputs: document starts of the flattened batch (every row start is one), padded with B*T to
    a multiple of 64 so the compiled graph sees few shapes; attention through them equals the dense
    document mask. Fails if the padding or a row start is wrong (documents would merge across rows)."""
    h, model = small_model("varlen")
    ids = random_tokens(3, 128, vocab=512, seed=1, bos_every=5)  # 3 * 26 starts -> bucket 128
    layout = train_gpt.DocumentLayout.build(ids, "varlen")
    starts = torch.nonzero(layout.doc_start.flatten()).flatten()
    assert layout.cu_seqlens.numel() == 128 and layout.cu_seqlens.dtype == torch.int32
    assert layout.cu_seqlens[: starts.numel()].tolist() == starts.tolist()
    assert (layout.cu_seqlens[starts.numel():] == 3 * 128).all() and layout.max_seqlen == 128
    assert {0, 128, 256} <= set(layout.cu_seqlens.tolist())
    reference = train_gpt.GPT(h.model, "plain")
    reference.load_state_dict(model.state_dict())
    model.set_recurrence(True)
    reference.set_recurrence(True)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_logits(ids), reference.forward_logits(ids), atol=2e-5, rtol=1e-4)


def plan_ids(step, bos_every, flat):
    """The step's batch [2, 128]; with one document per row and flat packing, the second row does not
    start with a BOS, so that 256-token document is cut 128 tokens from its start inside the compiled step."""
    ids = random_tokens(2, 128, vocab=512, seed=step, bos_every=bos_every)
    if flat and not bos_every:
        ids[1, 0] = 9
    return ids


def train_steps(model, compiled, optimizer, plan, flat=False):
    losses = []
    for step, (bos_every, recurrence) in enumerate(plan):
        model.set_recurrence(recurrence)
        ids = plan_ids(step, bos_every, flat)
        losses.append(train_gpt.forward_backward(compiled, [(ids, ids.roll(-1, 1))], optimizer, model.attn_backend,
                                                 "fp32", flat).item())
        optimizer.step()
    return losses


def attention_segments(ids, flat):
    """Independent count of attention segments: rows start one each, and every BOS does; flat: one row
    in which a document is also cut every 128 tokens from its own start."""
    if not flat:
        return int((ids == train_gpt.BOS_ID).sum()) + int((ids[:, 0] != train_gpt.BOS_ID).sum())
    count, doc_start = 0, 0
    for position, token in enumerate(ids.flatten().tolist()):
        doc_start = position if position == 0 or token == train_gpt.BOS_ID else doc_start
        count += (position - doc_start) % 128 == 0
    return count


@pytest.mark.parametrize("flat", [False, True], ids=["rows", "flat"])
def test_training_compiles_once_per_bucket_and_recurrence_state_with_no_graph_break(flat):
    """Batches with few and many documents (cu_seqlens buckets 64 to 192), recurrence off then on: one
    graph per (bucket, recurrence state), no more (the old in-graph nonzero recompiled on every new document count until dynamo gave up
    and ran eager), no graph break (fullgraph), and the same losses as the eager model. Fails if the
    layout is built inside the compiled graph or if cu_seqlens is not bucketed. Also for TRAIN_PACKING=flat
    (one row [1, 256] per micro-batch, segments cut at 128)."""
    train_gpt.configure_compile("aot_eager")
    plan = [(0, False), (40, False), (3, False), (50, False), (2, False), (0, True), (3, True), (60, True)]
    h, model = small_model("varlen")
    eager_model = train_gpt.GPT(h.model, "varlen")
    eager_model.load_state_dict(model.state_dict())
    compiled = torch.compile(model, dynamic=False, fullgraph=True, backend="aot_eager")
    losses = train_steps(model, compiled, train_gpt.TrainingOptimizer(model, h.optim), plan, flat)
    shapes = set()
    for step, (bos_every, recurrence) in enumerate(plan):  # (cu_seqlens bucket, recurrence) of each step
        starts = attention_segments(plan_ids(step, bos_every, flat), flat)
        shapes.add((-(-(starts + 1) // 64) * 64, recurrence))
    assert len(shapes) == 5  # buckets 64, 128, 192 off; 64, 128 on
    assert counters["stats"]["unique_graphs"] == len(shapes)
    assert not counters["graph_break"]
    eager_losses = train_steps(eager_model, eager_model, train_gpt.TrainingOptimizer(eager_model, h.optim), plan, flat)
    assert losses == pytest.approx(eager_losses, rel=1e-4)


def test_hitting_the_recompile_limit_is_an_error_not_a_silent_eager_fallback():
    """configure_compile makes the recompile limit fatal: a run can never continue eager without a word.
    Fails if fail_on_recompile_limit_hit is not set (dynamo would then fall back to eager quietly)."""
    train_gpt.configure_compile("aot_eager")
    torch._dynamo.config.recompile_limit = 1
    try:
        h, model = small_model("varlen")
        compiled = torch.compile(model, dynamic=False, fullgraph=True, backend="aot_eager")
        optimizer = train_gpt.TrainingOptimizer(model, h.optim)
        train_steps(model, compiled, optimizer, [(0, False)])
        with pytest.raises(Exception, match="(?i)recompile|cache.*limit"):
            train_steps(model, compiled, optimizer, [(3, False)])  # a second bucket: over the limit
    finally:
        torch._dynamo.config.recompile_limit = 64


def test_inductor_compiles_the_forward_and_backward_of_a_small_model():
    """The record run uses inductor: its generated code must agree with eager (forward loss and every
    gradient). Two blocks (one of them parallel), to keep the C++ compile short on CPU."""
    h, model = small_model("sdpa", **dict(MINIMAL, NUM_LOOPS=1))
    ids = random_tokens(2, 32, vocab=512, seed=3, bos_every=11)
    layout = train_gpt.DocumentLayout.build(ids, "sdpa")
    compiled = torch.compile(model, dynamic=False, fullgraph=True, backend="inductor")
    loss = compiled(ids, ids.roll(-1, 1), layout)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    eager_loss = model(ids, ids.roll(-1, 1))
    eager_loss.backward()
    assert loss.item() == pytest.approx(eager_loss.item(), rel=1e-5)
    for name, param in model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(grads[name], param.grad, atol=1e-5, rtol=1e-3, msg=name)


@pytest.mark.parametrize("frontier", [{}, dict(EVAL_SEQ_LEN="192", PHASED_TTT_LORA_SITES="k,o,mlp,head",
                                              PHASED_TTT_LOCAL_LR_MULT="0.75", ASYM_LOGIT_RESCALE="1",
                                              NGRAM_TILT="1", NGRAM_TILT_MAX_ORDER="4", NGRAM_TILT_MIN_ORDER="2")],
                         ids=["pr1855", "pr1953_tilt"])
def test_compiled_run_trains_quantizes_and_evaluates_every_mode(tiny_dataset, tmp_path, frontier):
    """COMPILE=1 end to end (training with warm-up and the recurrence switch, GPTQ, the artifact, then
    pre-quant, quantized, sliding-window and phased TTT evals through the compiled eval forward after a
    warm-up on random tokens). The first record attempt crashed here before its first step. Also with
    PR 1953's eval at a context above TRAIN_SEQ_LEN (192 > 128) and its TTT adapters without Q/V, with
    PR 2130's n-gram tilt (its [B, T, 2] scoring forward) and asymmetric logit rescale."""
    env = dict(PRESET="tiny", VOCAB_SIZE="512", ITERATIONS="4", MAX_WALLCLOCK_SECONDS="0", GPTQ_RESERVE_SECONDS="0",
               TRAIN_BATCH_TOKENS="256", GRAD_ACCUM_STEPS="1", WARMUP_STEPS="2", TRAIN_LOG_EVERY="1", EMA_DECAY="0.9",
               ATTN_BACKEND="varlen", COMPILE="1", COMPILE_BACKEND="aot_eager", DATA_PATH=tiny_dataset.path,
               ARTIFACT_DIR=str(tmp_path / "run"), GPTQ_CALIBRATION_BATCHES="1", VAL_MAX_DOCS="4",
               EVAL_SEQ_LEN="128", EVAL_BATCH_TOKENS="512", SLIDING_WINDOW_ENABLED="1", SLIDING_STRIDE="64",
               PHASED_TTT_PREFIX_DOCS="2", PHASED_TTT_DOCS_PER_BATCH="2", QUANT_SMALL_TENSOR_NUMEL="1024",
               EVAL_MAX_SECONDS="3600", **{key: str(value) for key, value in dict(SMALL, **MINIMAL).items()})
    env.update(frontier)
    summary = train_gpt.main(env)
    for key in ("pre_quant_val_bpb", "quant_val_bpb", "sliding_val_bpb", "ttt_val_bpb"):
        assert summary[key] is not None and 0 < summary[key] < 20, key
    assert summary["steps"] == 4 and summary["eval_warmup_time_s"] > 0
    assert not summary["evals"]["quantized_ttt_phased"]["ttt_stopped_by_budget"]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "compile:aot_eager" in log and "recurrence: on" in log and "eval compile warm-up" in log
    assert not counters["graph_break"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["ttt_mode"] == "phased"


@pytest.mark.parametrize("mode,backend", [("phased", "eager"), ("chunked", "eager"), ("chunked", "inductor")])
def test_eval_warm_up_compiles_every_graph_the_timed_evals_use(mode, backend):
    """After `compile_and_warm_up_eval` (random tokens), the timed evals compile nothing more: a compile
    inside them would be charged to the eval time. The data is built to hit what used to recompile: a
    last plain batch of one row, short SGD steps (global SGD; the last rows of a chunked-TTT chunk),
    document batches shorter than PHASED_TTT_DOCS_PER_BATCH, chunked TTT training only some weights
    (their requires_grad is guarded). Backend eager: dynamo's graphs and guards; inductor adds its own
    guards on sizes it made choices for (a chunk's short last row used to recompile chunked TTT there).
    Fails on copies that stop padding a TTT step's rows (`padded_batch` in `_train_on_targets`) or warm
    chunked TTT up with every weight trainable (the previous code: 6 graphs instead of 4)."""
    h = tiny_h(VOCAB_SIZE=512, EVAL_SEQ_LEN=96, EVAL_BATCH_TOKENS=2 * 96, PHASED_TTT_CHUNK_TOKENS=24,
               PHASED_TTT_DOCS_PER_BATCH=2, PHASED_TTT_PREFIX_DOCS=3, PHASED_TTT_LORA_RANK=4,
               PHASED_TTT_GLOBAL_CHUNK_TOKENS=96, TTT_MODE=mode, TTT_CHUNK_TOKENS=100, TTT_BATCH_SEQS=1,
               TTT_PARAMS="blocks.1,lm_head", **MINIMAL, **{k: v for k, v in SMALL.items() if k not in MINIMAL})
    torch.manual_seed(0)
    model, spare = train_gpt.GPT(h.model, "sdpa"), train_gpt.GPT(h.model, "sdpa")
    model.set_recurrence(True)
    rng = np.random.default_rng(0)
    lengths = np.array([51, 39, 32, 18, 20, 5, 7, 3, 12, 60])  # 247 tokens: 3 rows of 96
    tokens = rng.integers(8, 512, int(lengths.sum()))
    tokens[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = train_gpt.BOS_ID
    val = train_gpt.make_val_data(tokens, np.ones_like(tokens), vocab_size=512)
    assert len(train_gpt.plain_windows(val.num_tokens, 96)) % h.eval.batch_rows(1) == 1  # a one-row last batch
    context = train_gpt.RunContext("", lambda line: None, torch.device("cpu"), compile_backend=backend)
    train_gpt.configure_compile(backend)
    train_gpt.compile_and_warm_up_eval(h, spare, model, context)
    warm = counters["stats"]["unique_graphs"]
    assert warm >= 3
    train_gpt.eval_stream(model, val, 96, h.eval.batch_rows(1))
    if mode == "phased":
        result = train_gpt.eval_ttt_phased(model, val, h.eval)
        assert result["ttt_phases_trained"] == 3
    else:  # chunks of 100 targets: rows of 96 and 4, one per step
        result = train_gpt.eval_ttt_chunked(model, val, h.eval)
        assert result["ttt_chunks_trained"] == 2
    assert result["scored_tokens"] == val.num_tokens - 1
    assert counters["stats"]["unique_graphs"] == warm, "graphs compiled inside the timed evals"
    assert not counters["graph_break"]


def test_padded_batches_score_and_train_as_the_unpadded_ones():
    """The evals pad batches to fixed shapes with empty windows (so a compiled eval sees only the warmed-up
    shapes). Padding must change nothing: the same scores, and chunked TTT's SGD steps land on the same
    weights, as scoring and training the real rows alone (checked against gather_windows' own output).
    Fails if a padding window had a length above 0 (its BOS targets would be scored and trained on) or
    if ttt_step_rows miscounted a rank's rows."""
    h, model = small_model("sdpa")
    model.set_recurrence(True)
    tokens = random_tokens(1, 300, vocab=512, seed=4, bos_every=37).flatten().numpy()
    val = train_gpt.make_val_data(tokens, np.ones_like(tokens), vocab_size=512)
    windows = train_gpt.plain_windows(val.num_tokens, 64)[-2:]  # the last window is short
    padded = train_gpt.padded_batch(windows, 5)
    assert padded.shape == (5, 3) and (padded[2:, 1] == 0).all() and (padded[:2] == windows).all()
    assert (train_gpt.padded_batch(windows, 1) == windows).all()  # never truncates
    with torch.no_grad():
        inputs, targets, positions, _, scored = train_gpt.gather_windows(val, windows)
        p_inputs, p_targets, p_positions, _, p_scored = train_gpt.gather_windows(val, padded, 64)
        assert not p_scored[2:].any() and p_scored[:2, : scored.shape[1]].equal(scored)
        expected = model.per_token_nll(inputs, targets)[scored]
        got = model.per_token_nll(p_inputs, p_targets)[p_scored]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # rows per rank of a training step: ceil(min(rows per step, rows of a full chunk) / ranks)
    assert train_gpt.ttt_step_rows(1000, 64, 32, 1) == 16 and train_gpt.ttt_step_rows(1000, 64, 32, 8) == 2
    assert train_gpt.ttt_step_rows(1000, 64, 4, 8) == 1 and train_gpt.ttt_step_rows(64, 64, 10**9, 3) == 1
    h = tiny_h(**dict(SMALL, TTT_MODE="chunked", TTT_CHUNK_TOKENS=150, TTT_BATCH_SEQS=2, EVAL_SEQ_LEN=64,
                      EVAL_BATCH_TOKENS=4 * 64, TTT_PARAMS="all", TTT_LR=0.05))
    torch.manual_seed(0)
    adapted = train_gpt.GPT(h.model, "sdpa")
    adapted.load_state_dict(model.state_dict())
    adapted.set_recurrence(True)
    # the same SGD steps by hand, each on its real rows only (no padding), into a copy of the weights
    by_hand = train_gpt.GPT(h.model, "sdpa")
    by_hand.load_state_dict(model.state_dict())
    by_hand.set_recurrence(True)
    params = list(by_hand.parameters())
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=h.eval.ttt_momentum)
    window_rows = train_gpt.plain_windows(151, 64)  # targets 1..150: rows of 64, 64, 22
    for begin in range(0, 3, 2):
        step = window_rows[begin: begin + 2]
        inputs, targets, _, _, used = train_gpt.gather_windows(val, step)
        optimizer.zero_grad(set_to_none=True)
        (by_hand.per_token_nll(inputs, targets)[used].sum() / step[:, 1].sum()).backward()
        optimizer.step()
    adapted.train()
    train_gpt._train_on_targets(adapted, val, 1, 151, 64, 2, list(adapted.parameters()),
                                torch.optim.SGD(adapted.parameters(), lr=0.05, momentum=h.eval.ttt_momentum))
    for (name, got), expected in zip(adapted.state_dict().items(), by_hand.state_dict().values()):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4, msg=name)
