"""Black-box compliance tests: they watch what the evaluation drivers DO, not what they report.

The four evaluation rules, checked without the drivers' own `audit` events:
- causality over many cut points (every chunk start of chunked TTT, the first document of every phase
  group and every LoRA chunk boundary of phased TTT, plain/sliding row and block starts, sampled
  positions): changing the stream from a cut on leaves every earlier score unchanged, and the
  distribution at the cut itself does not depend on the cut's own token (phased TTT scores documents
  longest first, as PR 1855: "earlier" is then in scoring order, with document boundaries kept);
- score before update: a recording wrapper around the model sees every forward (the stream positions
  it read, whether its result can carry a gradient) and every parameter change, and learns which
  forward produced each reported score;
- training and GPTQ calibration never open a validation file (every `open` of a full run, seen through
  a Python audit hook);
- under a wallclock cap, GPTQ calibration stops in time and `train_time_ok` counts it (fake clock).
The causality and score-before-update tests also run at a context above TRAIN_SEQ_LEN (PR 1953's long-context
eval), with the TTT adapter masks (no Q/V, K+O only) and with a LoRA chunk schedule (PR 2014; its form
keyed to the document's length failed the cut test: where a document ends is a later token). Each test's docstring names a planted bug it was
seen to catch."""

import copy
import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
import torch

import train_gpt
from tg_helpers import random_eval_model, tiny_h
from train_gpt import (
    BOS_ID, GPT, EvalSettings, RunContext, _document_batches, eval_stream, eval_ttt_chunked, eval_ttt_phased,
    make_val_data, phase_pauses,
)

VOCAB = 512  # larger than the stream: every non-BOS token of the stream is a different id
TOLERANCE = 1e-5  # float32; the same math in another batch layout agrees to ~1e-6


# --- a tiny model and a stream in which every token says where it is -------------------------------


def tiny_model(seed: int = 0) -> GPT:
    return random_eval_model(VOCAB, seed)


def unique_token_stream(seed: int = 0, num_docs: int = 12) -> np.ndarray:
    """BOS-first documents of 4..36 tokens whose non-BOS ids are all different (a token id names its
    stream position), so the positions a forward read can be recovered from its input and target ids."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 37, num_docs)
    ids = rng.permutation(np.arange(2, VOCAB))[: int(lengths.sum())]
    tokens, used = [], 0
    for length in lengths:
        tokens += [BOS_ID] + ids[used: used + length].tolist()
        used += length
    return np.array(tokens, dtype=np.int64)


def long_token_stream(seed: int = 1) -> np.ndarray:
    """Like unique_token_stream, with two documents (200 and 150 tokens) longer than TRAIN_SEQ_LEN 128."""
    rng = np.random.default_rng(seed)
    lengths = [20, 200, 12, 30, 150, 8, 25, 16]
    ids = rng.permutation(np.arange(2, VOCAB))[: sum(lengths)]
    tokens, used = [], 0
    for length in lengths:
        tokens += [BOS_ID] + ids[used: used + length].tolist()
        used += length
    return np.array(tokens, dtype=np.int64)


def stream_for(mode: str) -> np.ndarray:
    return long_token_stream() if mode.endswith("_long") else unique_token_stream()


def val_from(tokens: np.ndarray):
    return make_val_data(tokens, np.where(tokens == BOS_ID, 0, 1), vocab_size=VOCAB)


# context 24, forward batches of 4 rows; chunked TTT in chunks of 48 targets; phased TTT: 6 prefix
# documents (the first 6 of the longest-first queue) in 3 phases (then the rest), LoRA chunks of 8 tokens, 3 documents per batch,
# LoRA scale 1 (alpha = rank) so float noise is not amplified past the tolerance; global SGD in chunks of 16 so that
# every phase takes steps and its last chunk (never trained) is short: a document leaked into a phase gets trained on
EVAL = EvalSettings(eval_seq_len=24, eval_batch_tokens=96, sliding_stride=8, ttt_chunk_tokens=48, ttt_epochs=2,
                    ttt_lr=0.05, ttt_batch_seqs=2, phased_ttt_lora_rank=4, phased_ttt_lora_alpha=4.0, phased_ttt_lr=0.01,
                    phased_ttt_chunk_tokens=8, phased_ttt_docs_per_batch=3, phased_ttt_prefix_docs=6,
                    phased_ttt_num_phases=3, phased_ttt_global_lr=0.01, phased_ttt_global_chunk_tokens=16)
# Long-context eval (PR 1953): a context of 160, above the TRAIN_SEQ_LEN 128 of the tiny preset the model
# comes from, on a stream with two documents longer than that (phased TTT windows are per document).
# TTT adapter masks: without Q and V (PR 1953, with its local lr x0.75) and K+O only (PR 2119).
LONG_EVAL = dataclasses.replace(EVAL, eval_seq_len=160, phased_ttt_chunk_tokens=16)
NO_QV = dataclasses.replace(EVAL, phased_ttt_lora_sites="k,o,mlp,head", phased_ttt_local_lr_mult=0.75)
K_O = dataclasses.replace(EVAL, phased_ttt_lora_sites="k,o")
# PR 2014's small early chunks, by position in the document (its length-dependent form failed the cut test)
CHUNK_SCHEDULE = dataclasses.replace(EVAL, phased_ttt_chunk_schedule="6:2,16:4")
MODES = {
    "plain": lambda model, val: eval_stream(model, val, EVAL.eval_seq_len, 4, keep_token_scores=True),
    "sliding": lambda model, val: eval_stream(model, val, EVAL.eval_seq_len, 4, EVAL.sliding_stride,
                                              keep_token_scores=True),
    "ttt_chunked": lambda model, val: eval_ttt_chunked(model, val, EVAL, keep_token_scores=True),
    "ttt_phased": lambda model, val: eval_ttt_phased(model, val, EVAL, keep_token_scores=True),
    "sliding_long": lambda model, val: eval_stream(model, val, LONG_EVAL.eval_seq_len, 2, LONG_EVAL.sliding_stride,
                                                   keep_token_scores=True),
    "ttt_chunked_long": lambda model, val: eval_ttt_chunked(model, val, LONG_EVAL, keep_token_scores=True),
    "ttt_phased_long": lambda model, val: eval_ttt_phased(model, val, LONG_EVAL, keep_token_scores=True),
    "ttt_phased_no_qv": lambda model, val: eval_ttt_phased(model, val, NO_QV, keep_token_scores=True),
    "ttt_phased_k_o": lambda model, val: eval_ttt_phased(model, val, K_O, keep_token_scores=True),
    "ttt_phased_chunk_schedule": lambda model, val: eval_ttt_phased(model, val, CHUNK_SCHEDULE, keep_token_scores=True),
}
MODE_CONFIG = {"sliding_long": LONG_EVAL, "ttt_chunked_long": LONG_EVAL, "ttt_phased_long": LONG_EVAL,
               "ttt_phased_no_qv": NO_QV, "ttt_phased_k_o": K_O, "ttt_phased_chunk_schedule": CHUNK_SCHEDULE}
TTT_MODES = ("ttt_chunked", "ttt_phased", "ttt_chunked_long", "ttt_phased_long", "ttt_phased_no_qv", "ttt_phased_k_o",
             "ttt_phased_chunk_schedule")
CUT_MODES = ("plain", "sliding", "ttt_chunked", "ttt_phased", "sliding_long", "ttt_phased_long", "ttt_phased_no_qv",
             "ttt_phased_chunk_schedule")
PHASED_MODES = ("ttt_phased", "ttt_phased_long", "ttt_phased_no_qv", "ttt_phased_k_o", "ttt_phased_chunk_schedule")
# Stream-order causality (the cut tests) holds for phased TTT only without the LoRA warm start: a warm
# A factor carries what it learned from the longer documents scored earlier in the batch queue, which
# may lie later in the stream. That is legal (scored before any update used it, in time order; the
# score-before-update test runs with the warm start on), but not causal in stream order.
STREAM_CAUSAL_MODES = dict(MODES, **{
    mode: (lambda config: lambda model, val: eval_ttt_phased(
        model, val, replace(config, phased_ttt_warm_start_a=False), keep_token_scores=True))(MODE_CONFIG.get(mode, EVAL))
    for mode in PHASED_MODES})


@pytest.fixture(scope="module")
def model():
    return tiny_model()  # conftest.py runs the tests on one intra-op thread


def nll_by_position(result) -> dict:
    return dict(zip(result["token_positions"].tolist(), result["token_nll"].tolist()))


# --- a recording wrapper: every forward, every parameter change, and who scored what ---------------


@dataclass
class Forward:
    index: int
    can_train: bool  # its output carries a gradient (it may feed an update)
    inputs: np.ndarray  # stream positions read as inputs (padding left out)
    targets: np.ndarray  # stream positions read as targets
    row_starts: np.ndarray  # stream positions of the first input of each row
    log_probs: torch.Tensor | None = None  # [B, T, V] float64, per_token_nll calls only
    nll: torch.Tensor | None = None  # [B, T] the true NLLs it returned
    backward_seen: bool = False


@dataclass
class Recording:
    forwards: list = field(default_factory=list)
    updates: list = field(default_factory=list)  # index of the first forward that saw changed weights


class RecordingModel(torch.nn.Module):
    """Wraps a GPT for the evaluation drivers and records, for every forward: the stream positions of its
    inputs and targets, whether its result carries a gradient (and whether a backward reached it), and
    whether any weight (model or the LoRA passed in) changed since that weight was last used. The NLL
    it returns has the true value's gradient but a tag for its value (forward index * TAG_STRIDE + element),
    so the final token_nll of a run says which forward computed each reported score. The weights follow
    exactly the trajectory of an unwrapped run: only gradients feed the updates."""

    TAG_STRIDE = 4096

    def __init__(self, model: GPT, stream: np.ndarray):
        super().__init__()
        self.model, self.stream = model, stream
        self.position_of = {int(token): position for position, token in enumerate(stream) if token != BOS_ID}
        self.recording = Recording()
        self._weights = None
        self._lora_weights = {}  # id -> (adapter, its weights when last used): kept alive, ids stay unique

    def forward_logits(self, input_ids, lora=None):
        logits = self.model.forward_logits(input_ids, lora)
        self._record(input_ids, None, lora, logits)
        return logits

    def per_token_nll(self, input_ids, target_ids, lora=None):
        nll = self.model.per_token_nll(input_ids, target_ids, lora)
        forward = self._record(input_ids, target_ids, lora, nll)
        with torch.no_grad():
            forward.log_probs = self.model.forward_logits(input_ids, lora).double().log_softmax(-1)
            forward.nll = nll.detach().clone()
        assert nll.numel() < self.TAG_STRIDE
        tags = forward.index * self.TAG_STRIDE + torch.arange(nll.numel(), dtype=torch.float32).view_as(nll)
        return tags + (nll - nll.detach())  # value: exactly the tag; gradient: the true NLL's

    def _record(self, input_ids, target_ids, lora, output) -> Forward:
        index = len(self.recording.forwards)
        weights = torch.cat([param.detach().reshape(-1) for param in self.model.parameters()]).clone()
        changed = self._weights is not None and not torch.equal(weights, self._weights)
        self._weights = weights
        if isinstance(lora, torch.nn.Module):
            lora_weights = torch.cat([param.detach().reshape(-1) for param in lora.parameters()]).clone()
            previous = self._lora_weights.get(id(lora))
            changed |= previous is not None and not torch.equal(lora_weights, previous[1])
            self._lora_weights[id(lora)] = (lora, lora_weights)
        if changed:
            self.recording.updates.append(index)
        inputs, targets, row_starts = self.locate(input_ids, target_ids)
        forward = Forward(index, output.requires_grad, inputs, targets, row_starts)
        if output.requires_grad:
            output.register_hook(lambda grad: setattr(forward, "backward_seen", True))
        self.recording.forwards.append(forward)
        return forward

    def locate(self, input_ids, target_ids):
        """Stream positions of the inputs, the targets and the rows' first inputs of a batch [B, T]. A row
        is a stream window when its non-BOS ids agree on one offset; its BOS entries are then stream BOS
        or padding (a pair BOS->BOS never occurs in the stream). Rows that are not windows get each
        non-BOS id's own position."""
        inputs, targets, row_starts = [], [], []
        input_rows = input_ids.detach().cpu().numpy()
        target_rows = None if target_ids is None else target_ids.detach().cpu().numpy()
        for row_index, input_row in enumerate(input_rows):
            target_row = None if target_rows is None else target_rows[row_index]
            offsets = {self.position_of[int(t)] - i for i, t in enumerate(input_row) if int(t) in self.position_of}
            if target_row is not None:
                offsets |= {self.position_of[int(t)] - 1 - i for i, t in enumerate(target_row)
                            if int(t) in self.position_of}
            for i in range(len(input_row)):
                pair = (int(input_row[i]), None if target_row is None else int(target_row[i]))
                if len(offsets) == 1:
                    start = next(iter(offsets)) + i
                    matches_input = 0 <= start < len(self.stream) and self.stream[start] == pair[0]
                    matches_target = pair[1] is None or (
                        start + 1 < len(self.stream) and self.stream[start + 1] == pair[1])
                    if matches_input and matches_target and pair != (BOS_ID, BOS_ID):
                        inputs.append(start)
                        if i == 0:
                            row_starts.append(start)
                        if pair[1] is not None:
                            targets.append(start + 1)
                        continue
                if pair[0] in self.position_of:
                    inputs.append(self.position_of[pair[0]])
                if pair[1] in self.position_of:
                    targets.append(self.position_of[pair[1]])
        return tuple(np.unique(np.array(positions, dtype=np.int64)) for positions in (inputs, targets, row_starts))

    def decode(self, result) -> dict:
        """stream position -> (forward that computed its reported score, element index in that forward)."""
        tags = result["token_nll"].astype(np.int64)
        assert np.array_equal(tags, result["token_nll"]), "a reported score is not a value this wrapper returned"
        return {int(p): divmod(int(tag), self.TAG_STRIDE) for p, tag in zip(result["token_positions"], tags)}

    def true_nll(self, scored: tuple) -> float:
        forward, element = scored
        return float(self.recording.forwards[forward].nll.reshape(-1)[element])

    def log_probs(self, scored: tuple) -> torch.Tensor:
        forward, element = scored
        log_probs = self.recording.forwards[forward].log_probs
        return log_probs.reshape(-1, log_probs.shape[-1])[element]


# --- score before update, watched from outside --------------------------------------------------------


@pytest.mark.parametrize("mode", TTT_MODES)
def test_no_weight_update_uses_a_token_whose_score_was_not_yet_computed(mode, model):
    """Every forward that can feed an update (its output carries a gradient) read only tokens whose
    reported score was computed by a forward BEFORE the first weight change after it. Exempt: a BOS as
    the first input of a row (the stream's first token is never scored, and a document's own LoRA rows
    start at its BOS, which is scored as the previous document's last target, often later: a document
    boundary, and that LoRA scores nothing else). Uses no audit event: an update the driver does not
    report is still seen.
    Fails if: phased TTT takes its LoRA step and then re-scores the chunk with the adapted LoRA;
    chunked TTT trains on a chunk before scoring it; the phase-boundary global SGD also trains on the
    next group's first document. Also run at a context above TRAIN_SEQ_LEN and with the adapter masks."""
    tokens = stream_for(mode)
    val = val_from(tokens)
    wrapper = RecordingModel(model, tokens)
    result = MODES[mode](wrapper, val)
    assert_updates_read_only_scored_tokens(wrapper, result, val, tokens)


class Clocked(torch.nn.Module):
    """A fake clock that every forward advances by its tokens (x3 with a gradient: an adapting step)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.now = model, 0.0

    def clock(self):
        return self.now

    def forward_logits(self, input_ids, lora=None):
        return self.model.forward_logits(input_ids, lora)

    def per_token_nll(self, input_ids, target_ids, lora=None):
        self.now += input_ids.numel() * (3.0 if torch.is_grad_enabled() else 1.0)
        return self.model.per_token_nll(input_ids, target_ids, lora)


def test_phased_ttt_past_its_projected_budget_still_scores_before_every_update(model):
    """The same watch over a phased run whose fake-clock budget runs out halfway: some batches adapt,
    the rest is scored on the fast path (no LoRA, longer chunks), global SGD stops; every target is
    still scored exactly once and no update reads a token scored only after it. (Keeping the budget is
    tested in test_ttt_schedule.py; 4 batches are too coarse for it.)"""
    tokens = unique_token_stream()
    val = val_from(tokens)
    config = EvalSettings(**{**EVAL.__dict__, "phased_ttt_prefix_docs": 3})
    full = Clocked(model)
    eval_ttt_phased(full, val, config, clock=full.clock)
    wrapper = RecordingModel(model, tokens)
    clocked = Clocked(wrapper)
    result = eval_ttt_phased(clocked, val, config, time_budget_s=full.now / 2, clock=clocked.clock,
                             keep_token_scores=True)
    assert result["ttt_stopped_by_budget"] and 0 < result["ttt_batches_adapted"] < result["ttt_batches"]
    assert_updates_read_only_scored_tokens(wrapper, result, val, tokens)


def assert_updates_read_only_scored_tokens(wrapper, result, val, tokens):
    recording = wrapper.recording
    scored_by = {position: scored[0] for position, scored in wrapper.decode(result).items()}
    assert sorted(scored_by) == list(range(1, val.num_tokens))
    assert result["scored_tokens"] == val.num_tokens - 1
    assert len(result["token_positions"]) == val.num_tokens - 1  # and each exactly once
    updates = np.array(recording.updates)
    trainers = [forward for forward in recording.forwards if forward.can_train]
    assert len(updates) > 5 and any(forward.backward_seen for forward in trainers)  # the test has teeth
    violations = []
    for forward in trainers:
        first_update_after = updates[updates > forward.index]
        if first_update_after.size == 0:
            continue
        exempt = forward.row_starts[tokens[forward.row_starts] == BOS_ID]
        read = np.union1d(forward.targets, np.setdiff1d(forward.inputs, exempt))
        late = [int(p) for p in read if scored_by.get(int(p), math.inf) >= first_update_after[0]]
        if late:
            violations.append((forward.index, int(first_update_after[0]), late[:5]))
    assert not violations, f"(forward, next update, positions scored only at/after it): {violations[:5]}"


# --- causality at many cut points, every mode ------------------------------------------------------


def cut_points(val, config: EvalSettings = EVAL) -> list[int]:
    """Where a driver's state changes hands: chunk starts of chunked TTT, the BOS and first target of the
    first document of every phase group (in queue order), each LoRA chunk start of the prefix documents
    and two later ones, starts of plain rows and sliding blocks, and sampled positions."""
    n, context = val.num_tokens, config.eval_seq_len
    cuts = set(range(1, n, config.ttt_chunk_tokens))
    # phased: documents in queue order (longest first); a phase group starts after each pause
    batches = _document_batches(np.arange(val.num_docs), val.doc_lengths, config.phased_ttt_docs_per_batch)
    queue = np.concatenate(batches)
    prefix = min(config.phased_ttt_prefix_docs, val.num_docs)
    pauses = phase_pauses([len(b) for b in batches], prefix, config.phased_ttt_num_phases)
    group_firsts = [int(queue[0])] + [int(batches[after + 1][0]) for after, _ in pauses if after + 1 < len(batches)]
    for doc in group_firsts:
        start = int(val.doc_starts[doc])
        cuts |= {start, start + 1} - {0}
    for doc in queue[:prefix].tolist() + [int(queue[prefix + 1]), int(queue[-2])]:
        start = int(val.doc_starts[doc])
        targets = int(val.target_ends(np.array([doc]))[0]) - start - 1
        cuts |= {start + 1 + k for k in range(config.phased_ttt_chunk_tokens, targets, config.phased_ttt_chunk_tokens)}
    cuts |= set(range(1, n, context)) | set(range(context + 1, n, config.sliding_stride * 4))
    cuts |= set(np.random.default_rng(5).integers(2, n - 2, 4).tolist())
    return sorted(cut for cut in cuts if cut < n - 2)


def stream_changed_from(tokens: np.ndarray, cut: int, seed: int, split: bool) -> np.ndarray:
    """The token at `cut` replaced (a BOS by a non-BOS, merging two documents; with `split`, a non-BOS
    inside a document by a BOS, splitting it) and every later non-BOS token redrawn; later BOS stay."""
    rng = np.random.default_rng(seed)
    changed = tokens.copy()
    split = split and BOS_ID not in tokens[cut - 1: cut + 2]
    while changed[cut] == tokens[cut]:
        changed[cut] = BOS_ID if split else rng.integers(2, VOCAB)
    later = cut + 1 + np.flatnonzero(tokens[cut + 1:] != BOS_ID)
    changed[later] = rng.integers(2, VOCAB, later.size)
    return changed


@dataclass
class CutRuns:
    mode: str
    tokens: np.ndarray  # the unchanged stream
    original: dict  # position -> true NLL of the unchanged stream
    distribution: dict  # position -> log-probabilities [V] behind its reported score
    changed: dict  # cut -> (changed stream, position -> NLL)
    score_forward: dict  # position -> index of the forward that scored it (the order of scoring)


@pytest.fixture(scope="module", params=CUT_MODES)
def cut_runs(request, model) -> CutRuns:
    """One recorded run of each mode on the stream, and one plain run per cut point on a stream changed
    from that cut on. Phased TTT queues documents by length, longest first (PR 1855), so where a later
    document ENDS may change the order of scoring: its cuts keep every BOS where it is (no merging or
    splitting of documents) and replace only a non-BOS token."""
    mode = request.param
    tokens = stream_for(mode)
    val = val_from(tokens)
    run_mode = STREAM_CAUSAL_MODES[mode]
    # float64: a cut changes batch compositions, and Adam's normalized LoRA steps would amplify the
    # float32 rounding of another batch layout to ~1e-5; a leak moves scores by far more
    model = copy.deepcopy(model).double()
    wrapper = RecordingModel(model, tokens)
    scored = wrapper.decode(run_mode(wrapper, val))
    original = {position: wrapper.true_nll(where) for position, where in scored.items()}
    unwrapped = nll_by_position(run_mode(model, val))  # the wrapper did not alter the run
    assert max(abs(unwrapped[p] - original[p]) for p in original) < TOLERANCE
    distribution = {position: wrapper.log_probs(where) for position, where in scored.items()}
    changed = {}
    keep_documents = mode in PHASED_MODES
    cuts = [cut for cut in cut_points(val, MODE_CONFIG.get(mode, EVAL))
            if not (keep_documents and tokens[cut] == BOS_ID)]
    if len(cuts) > 36:  # the long stream has ~60: its document starts and a fixed sample of the rest
        starts = [cut for cut in cuts if tokens[cut] == BOS_ID or tokens[cut - 1] == BOS_ID]
        others = np.random.default_rng(7).choice(sorted(set(cuts) - set(starts)), 36 - len(starts), replace=False)
        cuts = sorted(starts + others.tolist())
    for index, cut in enumerate(cuts):
        stream = stream_changed_from(tokens, cut, seed=cut, split=index % 3 == 2 and not keep_documents)
        changed[cut] = (stream, nll_by_position(run_mode(model, val_from(stream))))
    score_forward = {position: where[0] for position, where in scored.items()}
    return CutRuns(mode, tokens, original, distribution, changed, score_forward)


def test_scores_before_a_cut_do_not_depend_on_any_token_from_the_cut_on(cut_runs):
    """Strict causality of the whole evaluation, TTT included: for every cut point, a stream whose tokens
    from the cut on are all changed gets the same score at every earlier position. Phased TTT scores in
    queue order, not stream order: there, every position before the cut that was scored no later than
    the first scored position from the cut on.
    Fails if: attention is not causal; chunked TTT trains on a chunk before scoring it; phased TTT
    re-scores a chunk after its LoRA step."""
    checked = 0
    for cut, (_, changed) in cut_runs.changed.items():
        earlier = range(1, cut)
        if cut_runs.mode in PHASED_MODES:
            first_seen = min(cut_runs.score_forward[p] for p in range(cut, len(cut_runs.original) + 1))
            earlier = [p for p in earlier if cut_runs.score_forward[p] <= first_seen]
        worst = max((abs(cut_runs.original[p] - changed[p]) for p in earlier), default=0.0)
        assert worst < TOLERANCE, f"{cut_runs.mode}: cut {cut} moved an earlier score by {worst:.3g}"
        later = max(abs(cut_runs.original[p] - changed[p]) for p in range(cut + 1, len(cut_runs.original) + 1))
        assert later > 1e-4  # the change is seen where it may be
        checked += len(earlier)
    assert len(cut_runs.changed) >= 30 and checked > (300 if cut_runs.mode in PHASED_MODES else 1000)


def test_distribution_at_a_cut_does_not_depend_on_the_token_it_predicts(cut_runs):
    """The prediction at a cut comes from one distribution fixed before its token is seen: with the token
    replaced (and everything after it), the new score is -log of the ORIGINAL run's probability of the
    new token, and the distribution is a full normalized softmax. Some cuts turn a BOS into a token
    (merging two documents) and some a token into a BOS (splitting one).
    Fails if: the window gather feeds each target in as its own input; the phase-boundary global SGD
    also trains on the first document of the next phase group."""
    originals = cut_runs.tokens[list(cut_runs.changed)]
    replacements = np.array([stream[cut] for cut, (stream, _) in cut_runs.changed.items()])
    checked = cut_runs.changed
    if cut_runs.mode in PHASED_MODES:  # documents kept (see cut_runs); cuts scored before anything after them
        last = len(cut_runs.original)
        checked = {cut: runs for cut, runs in checked.items() if cut_runs.score_forward[cut] <= min(
            cut_runs.score_forward[p] for p in range(cut + 1, last + 1))}
        assert len(checked) >= 5  # 7 of the 39 cuts here
    else:
        assert (originals == BOS_ID).sum() >= 3 and (replacements == BOS_ID).sum() >= 3
    for cut, (stream, changed) in checked.items():
        log_probs = cut_runs.distribution[cut]
        assert log_probs.shape == (VOCAB,) and abs(float(log_probs.exp().sum()) - 1.0) < 1e-9
        expected = -float(log_probs[int(stream[cut])])
        assert abs(changed[cut] - expected) < TOLERANCE, (
            f"{cut_runs.mode}: cut {cut}: NLL {changed[cut]:.6f} of the new token, but the original "
            f"distribution gives it {expected:.6f}")
        assert abs(changed[cut] - cut_runs.original[cut]) > 1e-4  # the token did change


# --- training never opens validation data ----------------------------------------------------------

OPENED: list = []  # (path or None for the marker) appended by the audit hook while RECORDING is on
RECORDING = [False]
HOOK_ADDED = [False]  # audit hooks cannot be removed: the hook is added once and switched by RECORDING


def _record_opens(event, args):
    if RECORDING[0] and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        OPENED.append(os.path.realpath(os.fsdecode(args[0])))


def test_a_full_run_opens_no_validation_file_before_evaluation_starts(tiny_dataset, tmp_path, monkeypatch):
    """Every file open of a full `main` run (train, checkpoint, GPTQ calibration, artifact, evaluation),
    seen through the interpreter's audit hook, whatever function opens it: no val shard or byte sidecar
    is opened between the preflight checks (which run before the model exists) and the call of
    `evaluate_after_training`, and evaluation does open them.
    Fails if: GPTQ calibration reads a val shard with np.fromfile (not through read_shard)."""
    real_evaluate, real_preflight = train_gpt.evaluate_after_training, train_gpt.preflight

    def evaluate(*args, **kwargs):
        OPENED.append(None)
        return real_evaluate(*args, **kwargs)

    def preflight(*args, **kwargs):  # checks every file's header and hash, before any model exists
        result = real_preflight(*args, **kwargs)
        OPENED.append("<preflight done>")
        return result

    monkeypatch.setattr(train_gpt, "evaluate_after_training", evaluate)
    monkeypatch.setattr(train_gpt, "preflight", preflight)
    if not HOOK_ADDED[0]:
        sys.addaudithook(_record_opens)
        HOOK_ADDED[0] = True
    env = dict(PRESET="tiny", VOCAB_SIZE="512", NUM_LAYERS="2", MODEL_DIM="32", NUM_HEADS="2", NUM_KV_HEADS="1",
               ROPE_DIMS="8", LOOP_START="0", LOOP_END="0", NUM_LOOPS="1", PARALLEL_START_LAYER="1",
               ITERATIONS="2", WARMUP_STEPS="1", MAX_WALLCLOCK_SECONDS="0", TRAIN_BATCH_TOKENS="1024",
               TRAIN_SEQ_LEN="128", ATTN_BACKEND="sdpa", EMA_DECAY="0.9", POST_TRAINING_ENABLED="1",
               GPTQ_CALIBRATION_BATCHES="2", VAL_MAX_DOCS="6", EVAL_SEQ_LEN="64", EVAL_BATCH_TOKENS="512",
               SLIDING_WINDOW_ENABLED="0", TTT_ENABLED="0", QUANT_SMALL_TENSOR_NUMEL="1024",
               DATA_PATH=tiny_dataset.path, ARTIFACT_DIR=str(tmp_path / "run"))
    OPENED.clear()
    RECORDING[0] = True
    try:
        summary = train_gpt.main(env)
    finally:
        RECORDING[0] = False
    val_files = {os.path.realpath(path) for path in tiny_dataset.val_paths + tiny_dataset.val_byte_paths}
    train_files = {os.path.realpath(path) for path in tiny_dataset.train_paths}
    assert OPENED.count(None) == 1 and OPENED.count("<preflight done>") == 1
    marker = OPENED.index(None)
    # preflight may open val files (headers, sizes, manifest hashes) before the model even exists; from
    # then until evaluation, nothing may
    before, after = OPENED[OPENED.index("<preflight done>") + 1:marker], OPENED[marker + 1:]

    def is_val(path):
        return path in val_files or os.path.basename(path).startswith("fineweb_val_")

    assert not [path for path in before if is_val(path)]
    assert train_files <= set(before)  # the hook saw the training reads
    assert val_files <= set(after)  # and evaluation's reads
    assert summary["quant_val_bpb"] is not None


# --- the wallclock cap in GPTQ calibration (fake clock) ----------------------------------------------


class FakeClock:
    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self):
        return self.now


class TimedTrainLoader:
    """A training stream whose every step takes `seconds` of fake time (random token rows)."""

    def __init__(self, clock: FakeClock, seconds: float):
        self.clock, self.seconds, self.steps = clock, seconds, 0
        self.generator = torch.Generator().manual_seed(0)

    def next_step(self):
        self.clock.now += self.seconds
        self.steps += 1
        inputs = torch.randint(2, 512, (1, 16), generator=self.generator)
        return [(inputs, inputs)]


def capped_run(clock: FakeClock, loader: TimedTrainLoader, train_time_s: float, micro_step_seconds: float,
               artifact_dir: str = "", **overrides):
    """A run that trained for `train_time_s` of a 100 s cap and now calibrates on `loader`."""
    settings = dict(MAX_WALLCLOCK_SECONDS=100, GPTQ_RESERVE_SECONDS=10, GPTQ_CALIBRATION_BATCHES=8,
                    NUM_LAYERS=2, MODEL_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1, LOOP_START=0, LOOP_END=0, NUM_LOOPS=1,
                    PARALLEL_START_LAYER=1, QUANT_SMALL_TENSOR_NUMEL=1024,
                    GPTQ_CALIBRATION_SOURCE="train")  # batches from `loader`, whose clock ticks per batch
    settings.update(overrides)
    h = tiny_h(**settings)
    torch.manual_seed(0)
    model = GPT(h.model, "sdpa").eval()
    lines = []
    context = RunContext(artifact_dir, lines.append, torch.device("cpu"), make_train_loader=lambda: loader,
                         clock=clock, training_start=clock.now - train_time_s - 5.0, train_time_s=train_time_s,
                         micro_step_seconds=micro_step_seconds)
    return h, model, context, lines


def test_calibration_under_a_cap_stops_in_time_and_counts_as_training():
    """95 s of a 100 s cap trained, calibration batches of 1 s (as the training micro-step predicts):
    batches are taken while two more fit (4 of 8), and training + calibration = 99 s is within the cap.
    Fails if: calibration_batches ignores the time left (all 8 batches, 103 s)."""
    clock = FakeClock(1000.0)
    loader = TimedTrainLoader(clock, 1.0)
    h, model, context, lines = capped_run(clock, loader, train_time_s=95.0, micro_step_seconds=1.0)
    hessians, fields = train_gpt.calibrate(h, model, context)
    assert loader.steps == 4 and hessians
    assert fields == dict(gptq_calibration_time_s=4.0, train_plus_calibration_s=99.0, train_time_ok=True)
    assert any("calibration stopped after 4 of 8 batches (wallclock cap)" in line for line in lines)


@pytest.mark.parametrize("train_time_s, batch_seconds, total", [(95.0, 10.0, 105.0), (100.5, 1.0, 100.5)])
def test_train_time_ok_is_false_when_training_plus_calibration_exceed_the_cap(train_time_s, batch_seconds, total):
    """A calibration batch that takes 10 s where the training micro-step predicted 1 s overruns the cap
    (95 + 10 > 100); training that already used the cap takes no batch and is still over it: both are
    reported as train_time_ok false with the true total.
    Fails if: train_time_ok compares only the training time with the cap (calibration not counted)."""
    clock = FakeClock(1000.0)
    loader = TimedTrainLoader(clock, batch_seconds)
    h, model, context, _ = capped_run(clock, loader, train_time_s=train_time_s, micro_step_seconds=1.0)
    _, fields = train_gpt.calibrate(h, model, context)
    assert loader.steps == (1 if batch_seconds > 1 else 0)
    assert fields["train_plus_calibration_s"] == total and fields["train_time_ok"] is False


@pytest.mark.parametrize("train_time_s, batch_seconds, steps, ok", [(90.0, 1.0, 3, True), (97.0, 5.0, 1, False)])
def test_written_artifact_reports_the_cap_check_of_its_calibration(tmp_path, train_time_s, batch_seconds, steps, ok):
    """quantize_and_write_artifact under a cap: the summary fields it returns carry the calibration's
    train_time_ok (true at 90 + 3 x 1 s, false at 97 + 5 s) next to the artifact sizes.
    Fails if: train_time_ok ignores the calibration time."""
    clock = FakeClock(1000.0)
    loader = TimedTrainLoader(clock, batch_seconds)
    h, model, context, _ = capped_run(clock, loader, train_time_s, 1.0, str(tmp_path), GPTQ_CALIBRATION_BATCHES=3)
    fields, quantized = train_gpt.quantize_and_write_artifact(h, model, context)
    assert loader.steps == steps
    assert fields["train_time_ok"] is ok
    assert fields["train_plus_calibration_s"] == train_time_s + steps * batch_seconds
    assert fields["model_bytes"] == (tmp_path / "final_model.ptz").stat().st_size and fields["artifact_limit_ok"]
