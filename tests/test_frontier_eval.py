"""Compliance proofs of the eval-time mechanisms of the post-PR-1855 candidates (PR 2130 / 2135):
the causal token n-gram tilt (NGRAM_TILT) and the asymmetric logit rescale (ASYM_LOGIT_RESCALE).

- the tilted distribution is a distribution over the whole vocabulary (property test), and the eval's
  closed form equals an explicit softmax of the tilted logits;
- the n-gram hints equal those of a slow dictionary counter fed the same scored tokens, and a whole
  plain eval with the tilt equals an independent recomputation (model logits, dictionary counter over
  the targets of earlier scoring calls, explicit float64 softmax);
- replayed events: every count update holds only targets whose scores were already recorded;
- every target is scored exactly once with the tilt on, in every mode;
- perturbation: changing the stream from a cut on leaves every earlier score unchanged, tilt and
  rescale on, TTT included;
- with two Gloo ranks every rank ends with the counts of exactly the scored targets."""

import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import train_gpt
from tg_helpers import spawn_gloo_ranks, tiny_h
from train_gpt import (
    BOS_ID, GPT, EvalSettings, Hyperparameters, NgramTilt, eval_stream, eval_ttt_chunked, eval_ttt_phased,
    make_val_data, ngram_tilt, tilted_nll,
)

VOCAB = 64
TOLERANCE = 1e-5
# the compliance tests' tiny eval (context 24, 4 rows per forward, LoRA chunks of 8, 3 documents per
# batch, 6 prefix documents in 3 phases) with the tilt on: orders 4 and 2 so that hints fire on a short stream
EVAL = EvalSettings(eval_seq_len=24, eval_batch_tokens=96, sliding_stride=8, ttt_chunk_tokens=48, ttt_epochs=2,
                    ttt_lr=0.05, ttt_batch_seqs=2, phased_ttt_lora_rank=4, phased_ttt_lora_alpha=4.0,
                    phased_ttt_lr=0.01, phased_ttt_chunk_tokens=8, phased_ttt_docs_per_batch=3,
                    phased_ttt_prefix_docs=6, phased_ttt_num_phases=3, phased_ttt_global_lr=0.01,
                    phased_ttt_global_chunk_tokens=64, ngram_tilt=True, ngram_tilt_max_order=4,
                    ngram_tilt_min_order=2, ngram_tilt_beta=2.0)
ROWS = 4  # rows per forward of plain and sliding eval


def run(mode: str, model, val, config=EVAL, audit=None):
    if mode == "plain":
        return eval_stream(model, val, config.eval_seq_len, ROWS, audit=audit, keep_token_scores=True, config=config)
    if mode == "sliding":
        return eval_stream(model, val, config.eval_seq_len, ROWS, config.sliding_stride, audit=audit,
                           keep_token_scores=True, config=config)
    driver = eval_ttt_chunked if mode == "ttt_chunked" else eval_ttt_phased
    return driver(model, val, config, audit=audit, keep_token_scores=True)


MODES = ("plain", "sliding", "ttt_chunked", "ttt_phased")


def eval_model(seed: int = 0, asym: bool = False) -> GPT:
    """A 3-layer, 32-wide model with random weights everywhere; with `asym`, the two softcaps differ."""
    h = Hyperparameters.from_env({
        "PRESET": "tiny", "VOCAB_SIZE": str(VOCAB), "NUM_LAYERS": "3", "MODEL_DIM": "32", "NUM_HEADS": "2",
        "NUM_KV_HEADS": "1", "ROPE_DIMS": "8", "LOOP_START": "1", "LOOP_END": "1", "NUM_LOOPS": "2",
        "PARALLEL_START_LAYER": "2", "SMEAR_GATE_DIMS": "8", "SPARSE_ATTN_GATE_DIMS": "8",
        "ASYM_LOGIT_RESCALE": "1" if asym else "0"})
    torch.manual_seed(seed)
    model = GPT(h.model)
    model.set_recurrence(True)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.2)
        if asym:  # small caps so that the rescale matters for these logits
            model.softcap_pos.fill_(2.0)
            model.softcap_neg.fill_(5.0)
    return model.eval()


def repetitive_stream(seed: int = 0, num_docs: int = 12) -> np.ndarray:
    """BOS-first documents that repeat a short random phrase with some noise, so n-gram hints fire."""
    rng = np.random.default_rng(seed)
    phrases = [rng.integers(2, VOCAB, size=rng.integers(3, 7)) for _ in range(3)]
    tokens = []
    for _ in range(num_docs):
        doc = np.tile(phrases[rng.integers(3)], rng.integers(3, 7))
        noise = rng.random(doc.size) < 0.15
        doc[noise] = rng.integers(2, VOCAB, int(noise.sum()))
        tokens += [BOS_ID] + doc.tolist()
    return np.array(tokens, dtype=np.int64)


def val_from(tokens: np.ndarray):
    return make_val_data(tokens, np.where(tokens == BOS_ID, 0, 1), vocab_size=VOCAB)


def nll_by_position(result: dict) -> dict:
    return dict(zip(result["token_positions"].tolist(), result["token_nll"].tolist()))


@pytest.fixture(scope="module")
def model():
    return eval_model()


@pytest.fixture(scope="module")
def tokens():
    return repetitive_stream()


# --- the tilt's math --------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 40), st.integers(1, 6), st.floats(0.1, 20.0), st.integers(0, 10**6))
def test_tilted_distribution_sums_to_one_over_the_whole_vocabulary(vocab, rows, logit_scale, seed):
    """For random model distributions, hints (or none) and strengths, the tilt is a distribution over
    all V entries, and the eval's closed-form NLL is -log of it at every target."""
    generator = torch.Generator().manual_seed(seed)
    log_probs = torch.log_softmax(torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * logit_scale, -1)
    hints = torch.randint(-1, vocab, (rows,), generator=generator)
    betas = torch.where(hints >= 0, torch.rand(rows, generator=generator, dtype=torch.float64) * 6, 0.0)
    tilted = ngram_tilt(log_probs, hints, betas)
    assert torch.allclose(tilted.exp().sum(-1), torch.ones(rows, dtype=torch.float64), atol=1e-12)
    assert torch.all(tilted <= 0)
    for target in range(vocab):
        targets = torch.full((rows,), target)
        closed = tilted_nll(-log_probs[:, target], -log_probs.gather(1, hints.clamp_min(0)[:, None])[:, 0],
                            hints == targets, betas)
        assert torch.allclose(closed, -tilted[:, target], atol=1e-10)


def test_tilt_equals_an_explicit_reweighting_of_probabilities():
    """p'(a) = p(a) e^beta / Z at the hint, p(a) / Z elsewhere, Z summed in plain Python over all V."""
    probs = [0.5, 0.2, 0.2, 0.1]
    beta, hint = 1.3, 2
    weights = [p * (np.exp(beta) if a == hint else 1.0) for a, p in enumerate(probs)]
    expected = [w / sum(weights) for w in weights]
    tilted = ngram_tilt(torch.tensor([probs], dtype=torch.float64).log(), torch.tensor([hint]),
                        torch.tensor([beta], dtype=torch.float64))
    assert tilted.exp()[0].tolist() == pytest.approx(expected, abs=1e-12)
    no_hint = ngram_tilt(torch.tensor([probs], dtype=torch.float64).log(), torch.tensor([-1]),
                         torch.tensor([0.0], dtype=torch.float64))
    assert no_hint.exp()[0].tolist() == pytest.approx(probs, abs=1e-12)


# --- the n-gram state against a dictionary counter -------------------------------------------------


PR1514_RULE = {order: (0.70, 3) if order <= 10 else (0.60, 2) if order <= 13 else (0.50, 2) for order in range(1, 33)}


def dictionary_hint(tokens: np.ndarray, doc_starts: np.ndarray, shared: list, position: int, orders, beta,
                    own: list = ()):
    """The hint at `position` from plain Counters over the counted targets (`shared`, and `own`: the
    document's own): longest order first; a context never reaches before the BOS of the document that
    holds the previous token; the candidates are each counter's best next token (most counts, then the
    smallest id), judged by their summed counts."""
    def context_start(p):
        return int(doc_starts[np.searchsorted(doc_starts, p - 1, side="right") - 1])

    def following(counted, context, order):
        return Counter(int(tokens[q]) for q in counted
                       if q - order >= context_start(q) and tuple(tokens[q - order: q]) == context)

    for order in orders:
        if position - order < context_start(position):
            continue
        context = tuple(tokens[position - order: position])
        counters = [following(shared, context, order), following(own, context, order)]
        total = sum(sum(counter.values()) for counter in counters)
        min_confidence, min_count = PR1514_RULE[order]
        candidates = [min(counter, key=lambda token: (-counter[token], token)) for counter in counters if counter]
        if total < min_count or not candidates:
            continue
        best = min(candidates, key=lambda token: (-sum(counter[token] for counter in counters), token))
        count = sum(counter[best] for counter in counters)
        if count / total >= min_confidence:
            return best, beta * count / total
    return -1, 0.0


def test_hints_equal_a_dictionary_counter_whatever_the_order_of_additions(tokens):
    """After each of several barriers (targets in shuffled order), every position's hint and strength
    equal the dictionary counter's over the same counted targets; the tables do not depend on the
    order of additions (so all ranks, which add in different orders, hold the same state)."""
    val = val_from(tokens)
    order = np.random.default_rng(1).permutation(np.arange(1, val.num_tokens))
    state = NgramTilt(val, 5, 1, 2.0, table_bits=20)  # orders 5, 3, 1
    counted = []
    everywhere = torch.arange(1, val.num_tokens)
    for part in np.array_split(order, 5):
        state.scored(torch.as_tensor(part))
        state.barrier()
        counted += part.tolist()
        hints, betas = state.hints(everywhere, torch.zeros_like(everywhere))
        for position in range(1, val.num_tokens):
            expected = dictionary_hint(tokens, val.doc_starts, counted, position, state.orders, 2.0)
            assert (int(hints[position - 1]), float(betas[position - 1])) == pytest.approx(expected, abs=1e-6)
    assert int((hints >= 0).sum()) > 20  # the check saw many hints
    other = NgramTilt(val, 5, 1, 2.0, table_bits=20)
    for part in np.array_split(order[::-1].copy(), 3):
        other.scored(torch.as_tensor(part))
        other.barrier()
    for name in ("context_count", "pair_count", "best_key"):
        assert torch.equal(getattr(state.shared, name), getattr(other.shared, name))


def test_own_document_counts_combine_with_the_shared_ones_and_stay_private(tokens):
    """A batch of two documents: shared counts from the first documents, each document's own counts from
    its first half; every hint equals the dictionary rule over shared + THAT document's own targets."""
    val = val_from(tokens)
    state = NgramTilt(val, 4, 2, 2.0, table_bits=20)
    shared = list(range(1, int(val.doc_starts[4])))
    state.scored(torch.as_tensor(shared))
    state.barrier()
    docs = [6, 9]
    starts = [int(val.doc_starts[d]) for d in docs]
    lengths = [int(val.doc_lengths[d]) for d in docs]
    state.begin_documents(2, max(lengths))
    width = max(lengths) - 1
    positions = torch.stack([torch.arange(start + 1, start + 1 + width) for start in starts]).clamp(max=val.num_tokens - 1)
    in_doc = torch.stack([torch.arange(width) < length - 1 for length in lengths])
    first_half = in_doc & (torch.arange(width) < width // 2)[None]
    state.add_own(positions, first_half)
    rows = torch.arange(2)[:, None].expand_as(positions)
    flat_hints, flat_betas = state.hints(positions.reshape(-1), rows.reshape(-1))
    hints, betas = flat_hints.view_as(positions), flat_betas.view_as(positions)
    checked = 0
    for row in range(2):
        own = positions[row][first_half[row]].tolist()
        for column in range(width // 2, lengths[row] - 1):
            position = int(positions[row, column])
            expected = dictionary_hint(tokens, val.doc_starts, shared, position, state.orders, 2.0, own)
            assert (int(hints[row, column]), float(betas[row, column])) == pytest.approx(expected, abs=1e-6)
            checked += expected[0] >= 0
    assert checked > 5


def test_plain_eval_with_the_tilt_equals_an_independent_recomputation(model, tokens):
    """Plain eval, tilt on: each row batch is scored with model logits tilted (explicit float64 softmax
    over all V) by the dictionary hint over the targets of EARLIER batches only."""
    val = val_from(tokens)
    result = run("plain", model, val)
    reported = nll_by_position(result)
    windows = train_gpt.plain_windows(val.num_tokens, EVAL.eval_seq_len)
    orders = list(range(EVAL.ngram_tilt_max_order, EVAL.ngram_tilt_min_order - 1, -2))
    counted, hinted = [], 0
    for begin in range(0, len(windows), ROWS):
        inputs, targets, positions, _, scored = train_gpt.gather_windows(val, windows[begin: begin + ROWS])
        with torch.no_grad():
            log_probs = torch.log_softmax(model.forward_logits(inputs).double(), -1)
        for p, row, column in zip(positions[scored].tolist(), *torch.nonzero(scored, as_tuple=True)):
            hint, beta = dictionary_hint(tokens, val.doc_starts, counted, p, orders, EVAL.ngram_tilt_beta)
            weights = log_probs[row, column].exp().tolist()
            if hint >= 0:
                weights[hint] *= np.exp(beta)
                hinted += 1
            expected = -np.log(weights[int(tokens[p])] / sum(weights))
            assert reported[p] == pytest.approx(expected, abs=1e-4)
        counted += positions[scored].tolist()
    assert hinted == result["ngram_tilt_hinted"] > 10
    untilted = run("plain", model, val, dataclasses.replace(EVAL, ngram_tilt=False))
    assert result["val_bpb"] < untilted["val_bpb"]  # on a repetitive stream the tilt helps


# --- replayed events, exactly once, perturbation -----------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_every_count_update_holds_only_targets_already_scored(mode, model, tokens):
    """Replay of the audit events in order: each count update ("ngram_update": shared counts,
    "ngram_own_update": a document's own) holds only positions that an earlier "score" event recorded,
    and each scored target enters each kind of counts at most once.
    Fails if: the counts are updated before the scores of a call are recorded."""
    scored, counted, events = set(), {"ngram_update": [], "ngram_own_update": []}, []
    run(mode, model, val_from(tokens), audit=lambda event, positions: events.append((event, positions.tolist())))
    for event, positions in events:
        if event == "score":
            scored |= set(positions)
        elif event in counted:
            assert set(positions) <= scored, f"{mode}: counted before scored: {sorted(set(positions) - scored)[:5]}"
            counted[event] += positions
    for positions in counted.values():
        assert len(positions) == len(set(positions))
    assert len(counted["ngram_update"]) > 0 and (mode != "ttt_phased" or len(counted["ngram_own_update"]) > 0)


@pytest.mark.parametrize("mode", MODES)
def test_every_target_is_scored_exactly_once_with_the_tilt(mode, model, tokens):
    val = val_from(tokens)
    result = run(mode, model, val)
    assert sorted(result["token_positions"].tolist()) == list(range(1, val.num_tokens))
    assert result["scored_tokens"] == val.num_tokens - 1 and result["ngram_tilt_hinted"] > 0


@pytest.fixture(scope="module")
def asym_model():
    return eval_model(seed=1, asym=True)


@pytest.mark.parametrize("mode", MODES)
def test_scores_before_a_cut_do_not_depend_on_later_tokens_with_tilt_and_rescale(mode, asym_model, tokens):
    """Perturbation: with the tilt and the asymmetric rescale on, a stream changed from a cut on (every
    later non-BOS token redrawn) gets the same score at every earlier position, in every mode; cuts at
    document starts, LoRA chunk and row boundaries and inside documents.
    Phased TTT scores documents in its longest-first queue, not in stream order, and its counts and
    warm-started adapters carry what earlier batches scored: there, "earlier" means every position
    before the cut whose document's batch comes no later in the queue than the first batch holding a
    changed target (redrawing only non-BOS tokens keeps every document's length, so the queue).
    Fails if: hints read counts of unscored targets; the rescale is fitted on unscored tokens."""
    val = val_from(tokens)
    batch_of_doc = np.empty(val.num_docs, dtype=np.int64)
    for index, doc_ids in enumerate(train_gpt._document_batches(np.arange(val.num_docs), val.doc_lengths,
                                                                 EVAL.phased_ttt_docs_per_batch)):
        batch_of_doc[doc_ids] = index
    # the document a target belongs to: the one holding the token before it (a BOS target ends a document)
    target_batch = {p: int(batch_of_doc[np.searchsorted(val.doc_starts, p - 1, side="right") - 1])
                    for p in range(1, val.num_tokens)}
    original = nll_by_position(run(mode, asym_model, val))
    starts = val.doc_starts.tolist()
    cuts = sorted({starts[2], starts[5] + 1, starts[7], starts[9] + 9, EVAL.eval_seq_len * 3 + 1, 57, 101})
    rng = np.random.default_rng(7)
    for cut in cuts:
        changed = tokens.copy()
        later = cut + np.flatnonzero(tokens[cut:] != BOS_ID)
        changed[later] = rng.integers(2, VOCAB, later.size)
        moved = nll_by_position(run(mode, asym_model, val_from(changed)))
        earlier = range(1, cut)
        if mode == "ttt_phased":
            first_changed = min(target_batch[p] for p in range(cut, val.num_tokens))
            earlier = [p for p in earlier if target_batch[p] <= first_changed]
            assert len(earlier) > 0 or cut < 10
        worst = max((abs(original[p] - moved[p]) for p in earlier), default=0.0)
        assert worst < TOLERANCE, f"{mode}: cut {cut} moved an earlier score by {worst:.3g}"
        assert max(abs(original[p] - moved[p]) for p in range(cut, val.num_tokens)) > 1e-4


# --- asymmetric logit rescale --------------------------------------------------------------------------


def test_asymmetric_softcap_uses_its_own_cap_on_each_side():
    logits = torch.tensor([-50.0, -3.0, 0.0, 2.0, 40.0])
    out = train_gpt.asymmetric_softcap(logits, torch.tensor(10.0), torch.tensor(20.0))
    expected = [20 * np.tanh(-50 / 20), 20 * np.tanh(-3 / 20), 0.0, 10 * np.tanh(2 / 10), 10 * np.tanh(40 / 10)]
    assert out.tolist() == pytest.approx(expected, abs=1e-5)


def test_rescale_starts_as_the_symmetric_cap_is_frozen_in_training_and_fitted_by_ttt():
    """At init the model equals the symmetric-cap model; training leaves the caps alone (no gradient);
    the phased TTT weight update (global SGD on scored documents) moves them."""
    h_off, h_on = tiny_h(), tiny_h(ASYM_LOGIT_RESCALE=1)
    torch.manual_seed(0)
    plain = GPT(h_off.model)
    torch.manual_seed(0)
    rescaled = GPT(h_on.model)
    rescaled.load_state_dict(plain.state_dict(), strict=False)
    ids = torch.randint(2, 512, (2, 16))
    ids[:, 0] = BOS_ID
    assert torch.equal(plain.forward_logits(ids), rescaled.forward_logits(ids))
    optimizer = train_gpt.TrainingOptimizer(rescaled, h_on.optim)
    rescaled(ids, torch.roll(ids, -1, 1)).backward()
    optimizer.step()
    assert rescaled.softcap_pos.item() == rescaled.softcap_neg.item() == h_on.model.logit_softcap
    tokens = repetitive_stream(3)
    tokens[tokens >= VOCAB] = 2
    val = make_val_data(tokens, np.where(tokens == BOS_ID, 0, 1), vocab_size=512)
    config = dataclasses.replace(EVAL, phased_ttt_global_lr=1.0, eval_seq_len=32)
    train_gpt._global_sgd(rescaled, val, np.arange(val.num_docs), config, None)
    assert rescaled.softcap_pos.item() != h_on.model.logit_softcap


# --- settings and presets ----------------------------------------------------------------------------


def test_tilt_settings_parse_and_bad_values_name_the_variable():
    h = tiny_h(NGRAM_TILT=1, NGRAM_TILT_MAX_ORDER=6, NGRAM_TILT_MIN_ORDER=2, NGRAM_TILT_BETA=1.5)
    assert (h.eval.ngram_tilt, h.eval.ngram_tilt_max_order, h.eval.ngram_tilt_min_order) == (True, 6, 2)
    with pytest.raises(ValueError, match="NGRAM_TILT_MIN_ORDER"):
        tiny_h(NGRAM_TILT_MAX_ORDER=4, NGRAM_TILT_MIN_ORDER=5)
    with pytest.raises(ValueError, match="ASYM_LOGIT_RESCALE"):
        tiny_h(ASYM_LOGIT_RESCALE=1, LOGIT_SOFTCAP=0)


def test_frontier_presets_switch_on_what_pr1855_leaves_off():
    base = Hyperparameters.from_env({"PRESET": "pr1855"})
    assert not base.eval.ngram_tilt and not base.model.asym_logit_rescale
    pr2130 = Hyperparameters.from_env({"PRESET": "pr2130"})
    assert pr2130.eval.ngram_tilt and pr2130.model.asym_logit_rescale and pr2130.eval.phased_ttt_num_phases == 1
    pr2135 = Hyperparameters.from_env({"PRESET": "pr2135"})
    assert pr2135.quant.gptq_calibration_batches == 32
    assert dataclasses.replace(pr2135.quant, gptq_calibration_batches=16) == pr2130.quant


# --- two Gloo ranks ----------------------------------------------------------------------------------------


def _distributed_worker(rank, world_size, port, queue):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        model, val = eval_model(), val_from(repetitive_stream())
        out = {}
        for mode in ("plain", "ttt_phased"):
            updates = []
            result = run(mode, model, val, audit=lambda event, positions: updates.extend(
                positions.tolist() if event == "ngram_update" else []))
            out[mode] = (sorted(result["token_positions"].tolist()), sorted(updates), result["val_bpb"])
        queue.put((rank, out))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def shared_targets_of_phased_ttt(val, config=EVAL) -> list:
    """The targets phased TTT's shared counts hold at the end: those of every document queued before its
    last phase pause (the last barrier), recomputed from the queue and the pause rule."""
    batches = train_gpt._document_batches(np.arange(val.num_docs), val.doc_lengths, config.phased_ttt_docs_per_batch)
    pauses = train_gpt.phase_pauses([len(ids) for ids in batches], config.phased_ttt_prefix_docs,
                                    config.phased_ttt_num_phases)
    docs = np.concatenate(batches[: pauses[-1][0] + 1])
    ends = val.target_ends(docs)
    return sorted(p for doc, end in zip(docs, ends) for p in range(int(val.doc_starts[doc]) + 1, int(end)))


def test_two_gloo_ranks_each_count_exactly_the_scored_targets():
    """With two ranks every target is scored once and each rank's shared counts hold every target scored
    before the last barrier exactly once (its own after scoring, the other rank's at the barrier), so
    both ranks tilt with the same state; both report the same val_bpb. Plain eval: every target (a
    barrier ends each round); phased TTT: the documents queued before the last phase pause."""
    queue = spawn_gloo_ranks(_distributed_worker, 2)
    by_rank = dict(queue.get() for _ in range(2))
    val = val_from(repetitive_stream())
    num_tokens = val.num_tokens
    for mode in ("plain", "ttt_phased"):
        for rank in (0, 1):
            positions, updates, bpb = by_rank[rank][mode]
            assert positions == list(range(1, num_tokens)), mode
            expected = list(range(1, num_tokens)) if mode == "plain" else shared_targets_of_phased_ttt(val)
            assert 0 < len(expected) and updates == expected, (mode, rank)
        assert by_rank[0][mode][2] == by_rank[1][mode][2]
