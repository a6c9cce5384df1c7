# -----------------------------------------------------------------------------
# Evaluation and test-time training (TTT)
#
# The score is bits per byte of the ORIGINAL text, so tokenizers of any vocabulary compare fairly:
# sum of per-token NLL (nats) over scored tokens / ln 2 / sum of those tokens' original UTF-8 bytes
# (SPEC 2). Every document starts with BOS (id 1); every token after it is scored exactly once, BOS
# never is. Four modes share one model forward (`per_token_nll`): plain rows, sliding windows,
# chunked score-first SGD TTT (PR 1493/1812) and phased per-document LoRA TTT (PR 1736). The TTT
# drivers are written so that the order "score a token, then (maybe) train on it" is visible in one
# short loop and can be recorded through an `audit(event, positions)` callback; the tests use it:
# ("score", stream positions whose NLL was just recorded), ("update", every stream position the
# update's forward read).
# Work is split across ranks with torch.distributed (sums all-reduced); no files are shared.
# -----------------------------------------------------------------------------

import contextlib
import glob
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

BOS_ID = 1
SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256
LORA_SITES = ("q", "k", "v", "o", "mlp_in", "mlp_out", "head")


# --- validation data: tokens, byte counts per token, document boundaries ---------------------


def read_uint16_records(path: str) -> np.ndarray:
    """Read a shard or byte sidecar (256 x int32 header, then uint16 entries); validate the header."""
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if header.size != SHARD_HEADER_INTS or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise ValueError(f"{path}: not a shard file (bad magic/version header)")
    count = int(header[2])
    expected_size = 4 * SHARD_HEADER_INTS + 2 * count
    if os.path.getsize(path) != expected_size:
        raise ValueError(f"{path}: header says {count} entries, file size {os.path.getsize(path)} != {expected_size}")
    return np.fromfile(path, dtype="<u2", count=count, offset=4 * SHARD_HEADER_INTS)


def val_sidecar_path(shard_path: str) -> str:
    """fineweb_val_000000.bin -> fineweb_val_bytes_000000.bin (same folder)."""
    folder, name = os.path.split(shard_path)
    if not name.startswith("fineweb_val_"):
        raise ValueError(f"{shard_path}: val shards must be named fineweb_val_%06d.bin")
    return os.path.join(folder, "fineweb_val_bytes_" + name[len("fineweb_val_"):])


def piece_byte_tables(sentencepiece_model, vocab_size: int):
    """Per-token byte tables of the SentencePiece byte rule (SPEC 2), for shards without a sidecar.

    Returns (base_bytes int64[V], has_leading_space bool[V], is_boundary bool[V]): a token counts
    base_bytes (piece UTF-8 length without the leading "\u2581"; byte-fallback pieces 1), plus 1
    if it has a leading space and the previous token is not a boundary (control/unknown/unused,
    which includes BOS). `sentencepiece_model` is a path or a SentencePieceProcessor.
    """
    if isinstance(sentencepiece_model, (str, os.PathLike)):
        import sentencepiece  # lazy: only needed for challenge shards without a byte sidecar

        sentencepiece_model = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_model))
    processor = sentencepiece_model
    if processor.vocab_size() != vocab_size:
        raise ValueError(f"tokenizer has {processor.vocab_size()} pieces but VOCAB_SIZE={vocab_size}")
    base_bytes = np.zeros(vocab_size, dtype=np.int64)
    has_leading_space = np.zeros(vocab_size, dtype=bool)
    is_boundary = np.ones(vocab_size, dtype=bool)
    for token_id in range(vocab_size):
        if processor.is_control(token_id) or processor.is_unknown(token_id) or processor.is_unused(token_id):
            continue  # boundary token, 0 bytes
        is_boundary[token_id] = False
        if processor.is_byte(token_id):
            base_bytes[token_id] = 1
            continue
        piece = processor.id_to_piece(token_id)
        if piece.startswith("\u2581"):
            has_leading_space[token_id] = True
            piece = piece[1:]
        base_bytes[token_id] = len(piece.encode("utf-8"))
    return base_bytes, has_leading_space, is_boundary


def piece_byte_counts(tokens: np.ndarray, tables) -> np.ndarray:
    """Bytes attributed to each token of a stream by the piece rule (the first token's predecessor
    counts as a boundary)."""
    base_bytes, has_leading_space, is_boundary = tables
    tokens = np.asarray(tokens, dtype=np.int64)
    previous_is_boundary = np.ones(tokens.shape, dtype=bool)
    previous_is_boundary[1:] = is_boundary[tokens[:-1]]
    return base_bytes[tokens] + (has_leading_space[tokens] & ~previous_is_boundary)


def find_documents(tokens: np.ndarray):
    """(starts, lengths) of the documents of a stream; each starts at a BOS and includes it."""
    tokens = np.asarray(tokens)
    starts = np.flatnonzero(tokens == BOS_ID)
    if starts.size == 0:
        raise ValueError(
            "validation stream has no BOS (id 1) markers: documents cannot be found. Rebuild the val "
            "shards with a BOS before every document (prepare_caseops_data.py does this).")
    if starts[0] != 0:
        raise ValueError(f"validation stream must start with BOS (id 1); first token is {int(tokens[0])}")
    lengths = np.diff(np.append(starts, tokens.size))
    return starts.astype(np.int64), lengths.astype(np.int64)


@dataclass
class ValData:
    tokens: torch.Tensor  # int64 [N], the concatenated documents
    byte_counts: torch.Tensor  # int64 [N], original UTF-8 bytes attributed to each token (BOS: 0)
    doc_starts: np.ndarray  # int64 [D], stream position of each document's BOS
    doc_lengths: np.ndarray  # int64 [D], tokens per document including its BOS

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())

    @property
    def num_docs(self) -> int:
        return int(self.doc_starts.size)

    def to(self, device) -> "ValData":
        return ValData(self.tokens.to(device), self.byte_counts.to(device), self.doc_starts, self.doc_lengths)


def make_val_data(tokens, byte_counts, vocab_size: int | None = None, max_docs: int | None = None) -> ValData:
    """Validate a token stream and its per-token byte counts; optionally keep only the first max_docs."""
    tokens = np.asarray(tokens, dtype=np.int64)
    byte_counts = np.asarray(byte_counts, dtype=np.int64)
    if tokens.shape != byte_counts.shape:
        raise ValueError(f"{tokens.size} tokens but {byte_counts.size} byte counts")
    if vocab_size is not None and tokens.size and int(tokens.max()) >= vocab_size:
        raise ValueError(f"val token id {int(tokens.max())} >= VOCAB_SIZE={vocab_size}")
    doc_starts, doc_lengths = find_documents(tokens)
    if max_docs is not None and max_docs < doc_starts.size:
        end = int(doc_starts[max_docs])
        tokens, byte_counts = tokens[:end], byte_counts[:end]
        doc_starts, doc_lengths = doc_starts[:max_docs], doc_lengths[:max_docs]
    return ValData(torch.from_numpy(tokens.copy()), torch.from_numpy(byte_counts.copy()), doc_starts, doc_lengths)


def load_val_data(pattern: str, vocab_size: int, tokenizer_path: str | None = None,
                  max_docs: int | None = None) -> ValData:
    """Load val shards (sorted glob) with their byte sidecars, or the piece rule when none exists."""
    shard_paths = sorted(glob.glob(pattern))
    if not shard_paths:
        raise FileNotFoundError(f"no validation shards match {pattern!r} (DATA_PATH)")
    sidecars = [val_sidecar_path(path) for path in shard_paths]
    present = [os.path.exists(path) for path in sidecars]
    if any(present) and not all(present):
        missing = [path for path, ok in zip(sidecars, present) if not ok]
        raise FileNotFoundError(f"byte sidecar missing for some val shards: {missing}")
    token_parts, byte_parts = [], []
    for shard_path, sidecar_path, has_sidecar in zip(shard_paths, sidecars, present):
        shard_tokens = read_uint16_records(shard_path)
        token_parts.append(shard_tokens)
        if has_sidecar:
            shard_bytes = read_uint16_records(sidecar_path)
            if shard_bytes.size != shard_tokens.size:
                raise ValueError(f"{sidecar_path}: {shard_bytes.size} byte entries but its shard "
                                 f"{shard_path} has {shard_tokens.size} tokens")
            byte_parts.append(shard_bytes)
    tokens = np.concatenate(token_parts).astype(np.int64)
    if all(present):
        byte_counts = np.concatenate(byte_parts).astype(np.int64)
    elif tokenizer_path:
        byte_counts = piece_byte_counts(tokens, piece_byte_tables(tokenizer_path, vocab_size))
    else:
        raise FileNotFoundError("val shards have no byte sidecar and no TOKENIZER_PATH was given for the piece rule")
    return make_val_data(tokens, byte_counts, vocab_size=vocab_size, max_docs=max_docs)


# --- score accounting: float64 sums, all-reduced across ranks ---------------------------------


def bits_per_byte(nll_sum_nats: float, byte_sum: float) -> float:
    return float(nll_sum_nats) / math.log(2.0) / float(byte_sum)


def _rank_and_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_(tensor: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


def _all_gather_1d(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor of any length from every rank (rank order)."""
    rank, world = _rank_and_world()
    if world == 1:
        return tensor
    length = torch.tensor([tensor.numel()], device=tensor.device, dtype=torch.int64)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    longest = int(max(int(x) for x in lengths))
    padded = torch.zeros(longest, device=tensor.device, dtype=tensor.dtype)
    padded[: tensor.numel()] = tensor
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(n)] for part, n in zip(parts, lengths)])


class TokenScores:
    """The NLL of every token this rank scored, keyed by stream position (the target's index)."""

    def __init__(self, val: ValData):
        self.val = val
        self.positions: list[torch.Tensor] = []
        self.nlls: list[torch.Tensor] = []

    def add(self, positions: torch.Tensor, nll: torch.Tensor) -> None:
        self.positions.append(positions.detach().reshape(-1))
        self.nlls.append(nll.detach().reshape(-1).float())

    def summarize(self, mode: str, started_at: float, keep_token_scores: bool = False, **extra) -> dict:
        """All-reduce (nll_sum, tokens, bytes) in float64 and return the mode's result dict."""
        device = self.val.tokens.device
        positions = torch.cat(self.positions) if self.positions else torch.zeros(0, dtype=torch.int64, device=device)
        nll = torch.cat(self.nlls) if self.nlls else torch.zeros(0, dtype=torch.float32, device=device)
        sums = torch.stack([
            nll.to(torch.float64).sum(),
            torch.tensor(float(positions.numel()), dtype=torch.float64, device=device),
            self.val.byte_counts[positions].to(torch.float64).sum(),
        ])
        _all_reduce_(sums)
        nll_sum, token_count, byte_sum = (float(x) for x in sums.tolist())
        if token_count == 0 or byte_sum == 0:
            raise ValueError(f"{mode}: nothing was scored ({int(token_count)} tokens, {int(byte_sum)} bytes)")
        result = {
            "mode": mode,
            "val_loss": nll_sum / token_count,
            "val_bpb": bits_per_byte(nll_sum, byte_sum),
            "scored_tokens": int(token_count),
            "scored_bytes": int(byte_sum),
            "eval_time_s": time.perf_counter() - started_at,
            **extra,
        }
        if keep_token_scores:  # every rank receives every rank's tokens (for SAVE_TOKEN_NLL and audits)
            result["token_positions"] = _all_gather_1d(positions).cpu().numpy()
            result["token_nll"] = _all_gather_1d(nll).cpu().numpy()
        return result


def _time_is_up(deadline: float | None, device) -> bool:
    """True once the eval budget is spent; all ranks agree (any rank over -> all stop)."""
    if deadline is None:
        return False
    over = torch.tensor([1.0 if time.perf_counter() > deadline else 0.0], device=device)
    return bool(_all_reduce_(over, dist.ReduceOp.MAX) > 0)


# --- windows: which tokens a forward sees, and which of its targets it scores -----------------
# A window is (input_start, input_length, first_scored): inputs tokens[s : s+n], targets
# tokens[s+1 : s+n+1]; targets at window index >= first_scored are scored (BOS targets never).


def plain_windows(num_tokens: int, seq_len: int) -> np.ndarray:
    """Non-overlapping rows of seq_len inputs; every target scored with the context before it in its row."""
    starts = np.arange(0, num_tokens - 1, seq_len, dtype=np.int64)
    lengths = np.minimum(seq_len, num_tokens - 1 - starts)
    return np.stack([starts, lengths, np.zeros_like(starts)], axis=1)


def sliding_windows(first_target: int, end_target: int, context: int, stride: int) -> np.ndarray:
    """Windows scoring targets [first_target, end_target) in blocks of `stride`, each block seen
    with up to `context` tokens of left context (the first block grows to use all of it)."""
    if end_target <= first_target:
        return np.zeros((0, 3), dtype=np.int64)
    first_end = min(max(first_target + stride, context + 1), end_target)
    block_ends = np.append(np.arange(first_end, end_target, stride, dtype=np.int64), end_target)
    block_ends = np.unique(block_ends)
    block_starts = np.concatenate([[first_target], block_ends[:-1]])
    input_starts = np.maximum(0, block_ends - 1 - context)
    return np.stack([input_starts, block_ends - 1 - input_starts, block_starts - 1 - input_starts], axis=1)


def _window_positions(windows: np.ndarray) -> np.ndarray:
    """All stream positions (inputs and targets) that a set of windows reads."""
    return np.unique(np.concatenate([np.arange(s, s + n + 1) for s, n, _ in windows]))


def _rank_slice(items, rank: int, world: int):
    """Contiguous share of a sequence for one rank."""
    count = len(items)
    return items[count * rank // world: count * (rank + 1) // world]


def _gather_windows(val: ValData, windows: np.ndarray):
    """Batch of windows -> (inputs, targets, positions, scored_mask), padded with BOS; shapes [B, W]."""
    device = val.tokens.device
    windows_t = torch.as_tensor(windows, dtype=torch.int64, device=device)
    starts, lengths, first_scored = windows_t[:, 0:1], windows_t[:, 1:2], windows_t[:, 2:3]
    width = int(lengths.max())
    offsets = torch.arange(width, device=device).unsqueeze(0)  # [1, W]
    inside = offsets < lengths  # [B, W]
    input_positions = (starts + offsets).clamp(max=val.num_tokens - 2)
    inputs = torch.where(inside, val.tokens[input_positions], BOS_ID)
    targets = torch.where(inside, val.tokens[input_positions + 1], BOS_ID)
    scored = inside & (offsets >= first_scored) & (targets != BOS_ID)
    return inputs, targets, input_positions + 1, scored


@torch.no_grad()
def _score_windows(model, val, windows, batch_size, scores: TokenScores, audit=None, lora=None):
    for begin in range(0, len(windows), batch_size):
        inputs, targets, positions, scored = _gather_windows(val, windows[begin: begin + batch_size])
        nll = model.per_token_nll(inputs, targets, lora=lora)  # [B, W] nats
        scores.add(positions[scored], nll[scored])
        if audit is not None:
            audit("score", positions[scored].cpu().numpy())


# --- plain and sliding-window evaluation ------------------------------------------------------


def eval_plain(model, val: ValData, seq_len: int, batch_size: int = 16, audit=None,
               keep_token_scores: bool = False) -> dict:
    """Rows of seq_len tokens (documents packed back to back); each target scored once."""
    started_at = time.perf_counter()
    rank, world = _rank_and_world()
    model.eval()
    scores = TokenScores(val)
    windows = _rank_slice(plain_windows(val.num_tokens, seq_len), rank, world)
    _score_windows(model, val, windows, batch_size, scores, audit)
    return scores.summarize("plain", started_at, keep_token_scores)


def eval_sliding(model, val: ValData, context: int = 2048, stride: int = 64, batch_size: int = 16,
                 audit=None, keep_token_scores: bool = False) -> dict:
    """Overlapping windows of `context` tokens advancing by `stride`; only new targets scored."""
    started_at = time.perf_counter()
    rank, world = _rank_and_world()
    model.eval()
    scores = TokenScores(val)
    windows = _rank_slice(sliding_windows(1, val.num_tokens, context, stride), rank, world)
    _score_windows(model, val, windows, batch_size, scores, audit)
    return scores.summarize("sliding", started_at, keep_token_scores, context=context, stride=stride)


# --- weight training on already-scored tokens (chunked TTT and the phase boundaries) ----------


def select_parameters(model: nn.Module, which: str = "all") -> list:
    """"all", or comma-separated substrings of parameter names (e.g. "blocks.9,blocks.10")."""
    named = list(model.named_parameters())
    if which.strip() == "all":
        return [param for _, param in named]
    patterns = [pattern.strip() for pattern in which.split(",") if pattern.strip()]
    chosen = [param for name, param in named if any(pattern in name for pattern in patterns)]
    if not chosen:
        raise ValueError(f"TTT_PARAMS={which!r} matches no parameter name")
    return chosen


def _cosine(base_lr: float, index: int, count: int) -> float:
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * index / max(count, 1)))


def _train_on_targets(model, val, first_target, end_target, seq_len, rows_per_step, params, optimizer,
                      epochs=1, grad_clip=0.0, audit=None):
    """SGD steps on the targets [first_target, end_target), rows of seq_len. A step's loss is the
    mean over the global batch of rows (each rank's share summed, gradients all-reduced), so any
    number of ranks takes the same steps as one process."""
    rank, world = _rank_and_world()
    windows = plain_windows(end_target - first_target + 1, seq_len)
    windows[:, 0] += first_target - 1
    for _ in range(epochs):
        for begin in range(0, len(windows), rows_per_step):
            step_windows = windows[begin: begin + rows_per_step]
            _, all_targets, _, all_scored = _gather_windows(val, step_windows)
            token_count = max(int(all_scored.sum()), 1)
            my_windows = _rank_slice(step_windows, rank, world)
            optimizer.zero_grad(set_to_none=True)
            if len(my_windows):
                inputs, targets, positions, used = _gather_windows(val, my_windows)
                with torch.enable_grad():
                    nll = model.per_token_nll(inputs, targets)
                    (nll[used].sum() / token_count).backward()
                if audit is not None:  # every stream position this step's forward read
                    audit("update", _window_positions(my_windows))
            _all_reduce_grads(params)
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()


def _all_reduce_grads(params) -> None:
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    if _rank_and_world()[1] == 1:
        return
    flat = torch.cat([param.grad.reshape(-1) for param in params])
    _all_reduce_(flat)
    offset = 0
    for param in params:
        param.grad.copy_(flat[offset: offset + param.numel()].view_as(param))
        offset += param.numel()


class _WeightsRestored:
    """Context: TTT changes weights in place; put them (and requires_grad) back afterwards."""

    def __init__(self, model, enabled=True):
        self.model, self.enabled = model, enabled

    def __enter__(self):
        self.flags = [(param, param.requires_grad) for param in self.model.parameters()]
        if self.enabled:
            self.saved = {name: value.detach().clone() for name, value in self.model.state_dict().items()}
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.model.load_state_dict(self.saved)
        for param, flag in self.flags:
            param.requires_grad_(flag)
            param.grad = None


# --- chunked score-first SGD TTT (PR 1493 / 1812 / 1755) ---------------------------------------


@dataclass
class ChunkedTTTConfig:
    chunk_tokens: int = 32768  # targets per chunk (65536 in PR 1812)
    epochs: int = 3  # passes over each scored chunk (4 in PR 1812)
    lr: float = 0.005
    momentum: float = 0.9
    grad_clip: float = 1.0
    params: str = "all"  # which weights adapt: "all" or name substrings
    seq_len: int = 2048  # training row length
    rows_per_step: int = 32  # rows of seq_len per SGD step (all ranks together)
    context: int = 2048  # sliding-window scoring
    stride: int = 64
    score_batch_size: int = 16


def eval_ttt_chunked(model, val: ValData, cfg: ChunkedTTTConfig, audit=None, time_budget_s=None,
                     keep_token_scores=False, restore_weights=True) -> dict:
    """Score chunk c with sliding windows (no_grad), THEN train on chunk c; the last chunk is
    never trained on. The learning rate follows a cosine across chunks."""
    started_at = time.perf_counter()
    deadline = None if time_budget_s is None else started_at + time_budget_s
    rank, world = _rank_and_world()
    scores = TokenScores(val)
    chunk_starts = list(range(1, val.num_tokens, cfg.chunk_tokens))
    updates, stopped_early = 0, False
    with _WeightsRestored(model, restore_weights):
        model.eval()
        params = select_parameters(model, cfg.params)
        for param in model.parameters():
            param.requires_grad_(False)
        for param in params:
            param.requires_grad_(True)
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
        for chunk_index, first_target in enumerate(chunk_starts):
            end_target = min(first_target + cfg.chunk_tokens, val.num_tokens)
            # 1) score every target of the chunk with the weights trained on earlier chunks only
            windows = sliding_windows(first_target, end_target, cfg.context, cfg.stride)
            _score_windows(model, val, _rank_slice(windows, rank, world), cfg.score_batch_size, scores, audit)
            # 2) then adapt on the chunk just scored (not the last one, and not past the budget)
            if chunk_index == len(chunk_starts) - 1 or cfg.epochs <= 0:
                continue
            if _time_is_up(deadline, val.tokens.device):
                stopped_early = True
                continue
            for group in optimizer.param_groups:
                group["lr"] = _cosine(cfg.lr, chunk_index, len(chunk_starts) - 1)
            _train_on_targets(model, val, first_target, end_target, cfg.seq_len, cfg.rows_per_step,
                              params, optimizer, cfg.epochs, cfg.grad_clip, audit)
            updates += 1
    return scores.summarize("ttt_chunked", started_at, keep_token_scores, ttt_chunks=len(chunk_starts),
                            ttt_chunks_trained=updates, ttt_stopped_by_budget=stopped_early)


# --- phased per-document LoRA TTT (PR 1736) ----------------------------------------------------


def lora_site_dims(model, sites=LORA_SITES) -> dict:
    """{(site, layer_index): (in_dim, out_dim)} of the model's adaptable linears, found by one
    probe forward on a short random row: in_dim from the hook's input, out_dim from the module with
    a 2-D weight that was called on that same input just before (the head: the logits' width)."""
    device = next(model.parameters()).device
    last_output_width = {}

    def remember(module, args, output):
        if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
            last_output_width[id(args[0])] = output.shape[-1]

    handles = [module.register_forward_hook(remember) for module in model.modules()
               if isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2]
    dims = {}

    def probe(site, layer_index, x):
        if site in sites:
            dims[(site, layer_index)] = (x.shape[-1], last_output_width.get(id(x)))
        last_output_width.clear()
        return None

    try:
        with torch.no_grad():
            row = torch.full((1, 8), 2, dtype=torch.int64, device=device)
            row[0, 0] = BOS_ID
            logits = model.forward_logits(row, lora=probe)
    finally:
        for handle in handles:
            handle.remove()
    for key, (in_dim, out_dim) in dims.items():
        if key[0] == "head":
            dims[key] = (in_dim, logits.shape[-1])
        elif out_dim is None:
            raise RuntimeError(f"cannot infer the output width of LoRA site {key}; pass site dims explicitly")
    return dims


class BatchedLoRA(nn.Module):
    """One rank-r adapter per batch element (= per document) at every site: delta = x A_b B_b.
    B starts at zero, so a fresh adapter leaves the model unchanged."""

    def __init__(self, batch_size: int, site_dims: dict, rank: int, alpha: float | None = None, seed: int = 0):
        super().__init__()
        self.scale = (alpha if alpha is not None else rank) / rank
        self.index = {key: str(i) for i, key in enumerate(sorted(site_dims, key=str))}
        # every document starts from the same A (seeded), so a score never depends on which batch,
        # rank or random state a document happened to get
        generator = torch.Generator().manual_seed(seed)
        down_init = {key: (torch.rand(dims[0], rank, generator=generator) * 2 - 1) / math.sqrt(dims[0])
                     for key, dims in sorted(site_dims.items(), key=lambda item: str(item[0]))}
        self.down = nn.ParameterDict({
            self.index[key]: nn.Parameter(init.unsqueeze(0).repeat(batch_size, 1, 1))
            for key, init in down_init.items()})
        self.up = nn.ParameterDict({
            self.index[key]: nn.Parameter(torch.zeros(batch_size, rank, dims[1])) for key, dims in site_dims.items()})

    def forward(self, site, layer_index, x):  # x: [B, T, in] -> [B, T, out] or None
        name = self.index.get((site, layer_index))
        if name is None:
            return None
        return torch.bmm(torch.bmm(x, self.down[name].to(x.dtype)), self.up[name].to(x.dtype)) * self.scale


@dataclass
class PhasedTTTConfig:
    lora_rank: int = 96  # 80 in PR 1855
    lora_alpha: float | None = None  # scale alpha/rank; None -> 1
    lora_sites: str = "q,k,v,o,mlp_in,mlp_out,head"
    lora_lr: float = 1e-4
    beta1: float = 0.0
    beta2: float = 0.999  # 0.99 in PR 1855
    weight_decay: float = 0.5
    chunk_size: int = 48  # targets scored, then trained on, per step of a document
    context: int = 2048  # left context window of each chunk
    docs_per_batch: int = 64
    prefix_docs: int = 2000  # 2500 in PR 1855
    num_phases: int = 3
    global_lr: float = 0.001
    global_momentum: float = 0.9
    global_epochs: int = 1
    global_chunk_tokens: int = 32768
    global_seq_len: int = 2048
    global_grad_clip: float = 1.0


def _document_batches(doc_ids: np.ndarray, doc_lengths: np.ndarray, docs_per_batch: int) -> list:
    """Longest documents first (so a batch's documents have similar lengths), docs_per_batch each."""
    order = doc_ids[np.argsort(-doc_lengths[doc_ids], kind="stable")]
    return [order[i: i + docs_per_batch] for i in range(0, len(order), docs_per_batch)]


def _score_and_adapt_documents(model, val, doc_ids, cfg, site_dims, scores, audit, adapt):
    """Score a batch of documents chunk by chunk, each with its own fresh LoRA; after scoring a
    chunk, take one Adam step per document on that chunk (documents never share an adapter)."""
    device = val.tokens.device
    starts = torch.as_tensor(val.doc_starts[doc_ids], device=device)  # [B]
    target_counts = torch.as_tensor(val.doc_lengths[doc_ids] - 1, device=device)  # [B]
    lora = BatchedLoRA(len(doc_ids), site_dims, cfg.lora_rank, cfg.lora_alpha).to(device) if adapt else None
    if adapt:
        optimizer = torch.optim.AdamW(lora.parameters(), lr=cfg.lora_lr, betas=(cfg.beta1, cfg.beta2),
                                      eps=1e-10, weight_decay=cfg.weight_decay)
    num_chunks = -(-int(target_counts.max()) // cfg.chunk_size)
    for chunk_index in range(num_chunks):
        chunk_end = (chunk_index + 1) * cfg.chunk_size  # targets 1..chunk_end of each document seen
        window_start = max(0, chunk_end - cfg.context)  # document-relative index of the first input
        width = chunk_end - window_start
        target_index = window_start + 1 + torch.arange(width, device=device).unsqueeze(0)  # [1, W]
        inside = target_index <= target_counts.unsqueeze(1)  # [B, W]
        positions = (starts.unsqueeze(1) + target_index).clamp(max=val.num_tokens - 1)
        inputs = torch.where(inside, val.tokens[positions - 1], BOS_ID)
        targets = torch.where(inside, val.tokens[positions], BOS_ID)
        in_chunk = inside & (target_index > chunk_index * cfg.chunk_size)  # [B, W]
        more_chunks_follow = target_counts > chunk_end  # [B]: this document is trained on the chunk
        train_now = adapt and bool(more_chunks_follow.any())
        with torch.set_grad_enabled(train_now):
            nll = model.per_token_nll(inputs, targets, lora=lora)  # [B, W]
        # 1) score: the chunk's NLL is recorded before any update that sees these tokens
        scores.add(positions[in_chunk], nll[in_chunk])
        if audit is not None:
            audit("score", positions[in_chunk].cpu().numpy())
        # 2) update: one step per document on the chunk it just scored
        if train_now:
            chunk_mask = in_chunk.to(nll.dtype)
            per_doc = (nll * chunk_mask).sum(1) / chunk_mask.sum(1).clamp_min(1.0)
            optimizer.zero_grad(set_to_none=True)
            (per_doc * more_chunks_follow.to(nll.dtype)).sum().backward()
            optimizer.step()
            if audit is not None:
                read = inside & more_chunks_follow.unsqueeze(1)
                audit("update", torch.cat([positions[read], positions[read] - 1]).unique().cpu().numpy())


def _global_sgd(model, val, end_target, cfg, audit):
    """All weights, SGD with momentum, over the targets [1, end_target) (the documents scored so
    far) in chunks of global_chunk_tokens, one step per chunk, cosine learning rate over chunks."""
    params = list(model.parameters())
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=cfg.global_lr, momentum=cfg.global_momentum)
    chunk_starts = list(range(1, end_target, cfg.global_chunk_tokens))
    for chunk_index, first_target in enumerate(chunk_starts):
        for group in optimizer.param_groups:
            group["lr"] = _cosine(cfg.global_lr, chunk_index, len(chunk_starts))
        chunk_end = min(first_target + cfg.global_chunk_tokens, end_target)
        _train_on_targets(model, val, first_target, chunk_end, cfg.global_seq_len, rows_per_step=10**9,
                          params=params, optimizer=optimizer, epochs=cfg.global_epochs,
                          grad_clip=cfg.global_grad_clip, audit=audit)


def eval_ttt_phased(model, val: ValData, cfg: PhasedTTTConfig, audit=None, time_budget_s=None,
                    keep_token_scores=False, restore_weights=True, site_dims=None) -> dict:
    """The first prefix_docs documents (stream order) form num_phases groups; the rest is a last
    group. Each group is scored with per-document LoRA TTT; after each prefix group, all weights
    are trained with SGD on every document scored so far. Past the time budget nothing adapts
    any more, but every token is still scored."""
    started_at = time.perf_counter()
    deadline = None if time_budget_s is None else started_at + time_budget_s
    rank, world = _rank_and_world()
    device = val.tokens.device
    scores = TokenScores(val)
    prefix_docs = min(cfg.prefix_docs, val.num_docs)
    num_phases = max(1, cfg.num_phases)
    phase_ends = [prefix_docs * (k + 1) // num_phases for k in range(num_phases)] if prefix_docs else []
    group_bounds = list(zip([0] + phase_ends, phase_ends + [val.num_docs]))
    sites = tuple(site.strip() for site in cfg.lora_sites.split(",") if site.strip())
    global_updates, stopped_early = 0, False
    with _WeightsRestored(model, restore_weights):
        model.eval()
        site_dims = site_dims or lora_site_dims(model, sites=sites)
        for group_index, (first_doc, end_doc) in enumerate(group_bounds):
            # 1) score the group's documents (length-sorted batches, round-robin over ranks)
            for param in model.parameters():
                param.requires_grad_(False)
            batches = _document_batches(np.arange(first_doc, end_doc), val.doc_lengths, cfg.docs_per_batch)
            for doc_ids in batches[rank::world]:
                adapt = deadline is None or time.perf_counter() < deadline
                stopped_early |= not adapt
                _score_and_adapt_documents(model, val, doc_ids, cfg, site_dims, scores, audit, adapt)
            # 2) phase boundary: global SGD over all documents scored so far (prefix phases only)
            if group_index >= len(phase_ends) or end_doc == 0 or cfg.global_epochs <= 0:
                continue
            if _time_is_up(deadline, device):
                stopped_early = True
                continue
            _global_sgd(model, val, int(val.doc_starts[end_doc - 1] + val.doc_lengths[end_doc - 1]), cfg, audit)
            global_updates += 1
    stopped_early = bool(_all_reduce_(torch.tensor([float(stopped_early)], device=device), dist.ReduceOp.MAX) > 0)
    return scores.summarize("ttt_phased", started_at, keep_token_scores, ttt_phases_trained=global_updates,
                            ttt_prefix_docs=prefix_docs, ttt_stopped_by_budget=stopped_early)


# --- settings from Hyperparameters (train_gpt.py field names) ---------------------------------


def eval_batch_rows(h, world_size: int = 1) -> int:
    """Rows of EVAL_SEQ_LEN per forward on one rank (EVAL_BATCH_TOKENS counts all ranks)."""
    return max(1, h.eval_batch_tokens // (world_size * h.eval_seq_len))


def chunked_ttt_config(h, world_size: int = 1) -> ChunkedTTTConfig:
    return ChunkedTTTConfig(
        chunk_tokens=h.ttt_chunk_tokens, epochs=h.ttt_epochs, lr=h.ttt_lr, momentum=h.ttt_momentum,
        grad_clip=h.ttt_grad_clip, seq_len=h.eval_seq_len, context=h.eval_seq_len, stride=h.sliding_stride,
        score_batch_size=eval_batch_rows(h, world_size))


def phased_ttt_config(h) -> PhasedTTTConfig:
    return PhasedTTTConfig(
        lora_rank=h.phased_ttt_lora_rank, lora_lr=h.phased_ttt_lr, beta1=h.phased_ttt_beta1,
        beta2=h.phased_ttt_beta2, weight_decay=h.phased_ttt_weight_decay, chunk_size=h.phased_ttt_chunk_tokens,
        context=h.eval_seq_len, docs_per_batch=h.phased_ttt_docs_per_batch, prefix_docs=h.phased_ttt_prefix_docs,
        num_phases=h.phased_ttt_num_phases, global_lr=h.phased_ttt_global_lr,
        global_momentum=h.phased_ttt_global_momentum, global_epochs=h.phased_ttt_global_epochs,
        global_chunk_tokens=h.phased_ttt_global_chunk_tokens, global_seq_len=h.eval_seq_len)


def eval_ttt(h, model, val: ValData, time_budget_s=None, audit=None, keep_token_scores=False) -> dict:
    """The TTT mode TTT_MODE selects (phased | chunked), configured from h."""
    if h.ttt_mode == "phased":
        return eval_ttt_phased(model, val, phased_ttt_config(h), audit, time_budget_s, keep_token_scores)
    return eval_ttt_chunked(model, val, chunked_ttt_config(h, _rank_and_world()[1]), audit, time_budget_s,
                            keep_token_scores)


# --- compile warm-up, per-token output and audit, log lines and summary -----------------------


def warm_up_on_random_tokens(model, vocab_size: int, seq_len: int, batch_size: int = 1, lora=None,
                             seed: int = 0) -> None:
    """Run the eval forward (and a backward, for TTT kernels) on random tokens, never val data;
    gradients are discarded and no weight changes."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randint(2, vocab_size, (batch_size, seq_len + 1), generator=generator).to(device)
    inputs[:, 0] = BOS_ID
    with torch.no_grad():
        model.per_token_nll(inputs[:, :-1], inputs[:, 1:], lora=lora)
    with torch.enable_grad():
        model.per_token_nll(inputs[:, :-1], inputs[:, 1:], lora=lora).mean().backward()
    model.zero_grad(set_to_none=True)
    if lora is not None:
        lora.zero_grad(set_to_none=True)


def save_token_nll(path: str, result: dict, val: ValData) -> None:
    """Write each scored token of a result (run with keep_token_scores=True) as .npz: stream
    position, token id, NLL (nats), original bytes, document index, position in the document."""
    positions = np.asarray(result["token_positions"], dtype=np.int64)
    order = np.argsort(positions, kind="stable")
    positions = positions[order]
    doc_index = np.searchsorted(val.doc_starts, positions, side="right") - 1
    temporary = path + ".partial.npz"  # next to the target, renamed into place (atomic)
    np.savez_compressed(
        temporary, mode=np.array(result["mode"]), stream_position=positions,
        token_id=val.tokens.cpu().numpy()[positions], nll=np.asarray(result["token_nll"], dtype=np.float32)[order],
        byte_count=val.byte_counts.cpu().numpy()[positions], doc_index=doc_index,
        position_in_doc=positions - val.doc_starts[doc_index],
        reported=np.array([result["val_loss"], result["val_bpb"], result["scored_tokens"], result["scored_bytes"]]))
    os.replace(temporary, path)


def audit_token_nll(path: str) -> dict:
    """Recompute the score of a save_token_nll file; refuses duplicated positions and BOS targets."""
    with np.load(path) as saved:
        positions, nll, byte_count = saved["stream_position"], saved["nll"], saved["byte_count"]
        if np.unique(positions).size != positions.size:
            raise ValueError(f"{path}: a token is scored more than once")
        if np.any(saved["position_in_doc"] <= 0) or np.any(saved["token_id"] == BOS_ID):
            raise ValueError(f"{path}: a BOS is scored")
        nll_sum = float(nll.astype(np.float64).sum())
        byte_sum = float(byte_count.astype(np.float64).sum())
        return {"mode": str(saved["mode"]), "val_loss": nll_sum / positions.size,
                "val_bpb": bits_per_byte(nll_sum, byte_sum), "scored_tokens": int(positions.size),
                "scored_bytes": int(byte_sum), "documents": int(np.unique(saved["doc_index"]).size)}


def format_eval_line(label: str, result: dict) -> str:
    """Upstream-style log line, e.g. `quantized_ttt_phased val_loss:... val_bpb:... eval_time:...ms`."""
    return (f"{label} val_loss:{result['val_loss']:.8f} val_bpb:{result['val_bpb']:.8f} "
            f"scored_tokens:{result['scored_tokens']} scored_bytes:{result['scored_bytes']} "
            f"eval_time:{1000.0 * result['eval_time_s']:.0f}ms")


def eval_summary(results: dict, eval_time_limit_s: float = 600.0) -> dict:
    """summary.json fields from {label: result} with labels pre_quant, quantized,
    quantized_sliding_window, quantized_ttt_chunked / quantized_ttt_phased (any may be absent).
    eval_time_s counts what the challenge times: the quantized evals that produce the final score."""
    def bpb(label):
        return results[label]["val_bpb"] if label in results else None

    ttt_label = next((label for label in ("quantized_ttt_phased", "quantized_ttt_chunked") if label in results), None)
    timed = [label for label in ("quantized", "quantized_sliding_window", ttt_label) if label in results]
    eval_time_s = sum(results[label]["eval_time_s"] for label in timed)
    return {
        "pre_quant_val_bpb": bpb("pre_quant"), "quant_val_bpb": bpb("quantized"),
        "sliding_val_bpb": bpb("quantized_sliding_window"), "ttt_val_bpb": bpb(ttt_label) if ttt_label else None,
        "ttt_mode": ttt_label.removeprefix("quantized_ttt_") if ttt_label else None,
        "eval_time_s": eval_time_s, "eval_time_ok": eval_time_s <= eval_time_limit_s,
        "evals": {label: {key: value for key, value in result.items() if not key.startswith("token_")}
                  for label, result in results.items()},
    }


# --- post-training entry point (train_gpt.post_training calls run after the quantization section) -


def evaluate_after_training(h, model, context, results: dict) -> dict:
    """Report pre-quant, quantized, sliding-window and TTT val_bpb in that order; return the
    summary.json fields. `model` holds the float EMA weights; the quantization section hands over
    the dequantized model as results["quantized_model"] (taken out of results here, so it never
    reaches summary.json). TTT adapts only while EVAL_MAX_SECONDS, minus the quantized evals'
    time, lasts; it scores every token regardless. SAVE_TOKEN_NLL=1 writes the last mode's tokens."""
    log, device, world_size = context.log, context.device, context.world_size
    val = load_val_data(h.val_glob, h.vocab_size, h.tokenizer_path or None, h.val_max_docs).to(device)
    log(f"val: {val.num_docs} documents, {val.num_tokens} tokens, {int(val.byte_counts.sum())} bytes")
    batch_rows = eval_batch_rows(h, world_size)
    quantized = results.pop("quantized_model", None)
    save_tokens = bool(getattr(h, "save_token_nll", False))  # SAVE_TOKEN_NLL knob, once train_gpt defines it
    planned = ["pre_quant"] + ([] if quantized is None else ["quantized"] + (
        ["quantized_sliding_window"] if h.sliding_window_enabled else []) + (
        [f"quantized_ttt_{h.ttt_mode}"] if h.ttt_enabled else []))
    final_label = planned[-1]
    evals = {}
    use_bf16 = context.autocast == "bf16" and device.type == "cuda"
    with torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext():
        for label in planned:
            keep = save_tokens and label == final_label
            if label == "pre_quant":
                result = eval_plain(model, val, h.eval_seq_len, batch_rows, keep_token_scores=keep)
            elif label == "quantized":
                result = eval_plain(quantized, val, h.eval_seq_len, batch_rows, keep_token_scores=keep)
            elif label == "quantized_sliding_window":
                result = eval_sliding(quantized, val, h.eval_seq_len, h.sliding_stride, batch_rows,
                                      keep_token_scores=keep)
            else:
                spent = sum(evals[name]["eval_time_s"] for name in evals if name != "pre_quant")
                result = eval_ttt(h, quantized, val, time_budget_s=h.eval_max_seconds - spent,
                                  keep_token_scores=keep)
            evals[label] = result
            log(format_eval_line(label, result))
    if quantized is None:
        log("evaluation: no results['quantized_model'] from the quantization section; quantized evals skipped")
    if save_tokens and context.rank == 0:
        path = os.path.join(context.artifact_dir, "token_nll.npz")
        save_token_nll(path, evals[final_label], val.to("cpu"))
        log(f"token_nll: {path} ({final_label}; recompute with audit_token_nll)")
    return eval_summary(evals, h.eval_max_seconds)


run = evaluate_after_training  # train_gpt.post_training's section contract, until this file is inlined
