"""Small helpers shared by the train_gpt tests (tiny configurations, parameter perturbation)."""

import socket

import numpy as np
import torch

import train_gpt

TINY_ENV = dict(PRESET="tiny", VOCAB_SIZE="512", NUM_LAYERS="6", MODEL_DIM="64", NUM_HEADS="4",
                NUM_KV_HEADS="2", TRAIN_SEQ_LEN="128", ROPE_DIMS="8", LOOP_START="2", LOOP_END="3",
                NUM_LOOPS="3", PARALLEL_START_LAYER="4", WARMUP_STEPS="0", MAX_WALLCLOCK_SECONDS="0",
                GPTQ_RESERVE_SECONDS="0", TRAIN_LOG_EVERY="1", POST_TRAINING_ENABLED="0")


def tiny_h(**overrides) -> train_gpt.Hyperparameters:
    """A tiny Hyperparameters (vocab 512, width 64, 6 layers, seq 128) with env-style overrides."""
    env = dict(TINY_ENV)
    env.update({key: str(value) for key, value in overrides.items()})
    return train_gpt.Hyperparameters.from_env(env)


def perturb_parameters(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Add noise to every parameter so zero-initialized paths (output projections, smear lambda)
    become live; tests of gradient flow and masking need every path active."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)


def random_tokens(batch: int, seq_len: int, vocab: int = 512, seed: int = 0, bos_every: int = 0) -> torch.Tensor:
    """Random ids in [8, vocab) with a BOS at position 0 and every `bos_every` tokens (0: only at 0)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, vocab, (batch, seq_len), generator=generator)
    ids[:, 0] = train_gpt.BOS_ID
    if bos_every:
        ids[:, ::bos_every] = train_gpt.BOS_ID
    return ids


def random_eval_model(vocab_size: int, seed: int = 0) -> "train_gpt.GPT":
    """A 3-layer, 32-wide GPT with every record feature (a looped layer, a parallel layer, gates, smear)
    and random weights everywhere, so every path matters; recurrence on, eval mode. The eval and
    compliance tests score with it."""
    h = train_gpt.Hyperparameters.from_env({
        "PRESET": "tiny", "VOCAB_SIZE": str(vocab_size), "NUM_LAYERS": "3", "MODEL_DIM": "32", "NUM_HEADS": "2",
        "NUM_KV_HEADS": "1", "ROPE_DIMS": "8", "LOOP_START": "1", "LOOP_END": "1", "NUM_LOOPS": "2",
        "PARALLEL_START_LAYER": "2", "SMEAR_GATE_DIMS": "8", "SPARSE_ATTN_GATE_DIMS": "8"})
    torch.manual_seed(seed)
    model = train_gpt.GPT(h.model)
    model.set_recurrence(True)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.2)
    return model.eval()


def random_documents(vocab_size: int, seed: int = 0, num_docs: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, byte_counts) of BOS-first documents of 3..60 random tokens; 1..3 bytes per token (BOS 0)."""
    rng = np.random.default_rng(seed)
    tokens, byte_counts = [], []
    for _ in range(num_docs):
        length = int(rng.integers(3, 61))
        tokens += [train_gpt.BOS_ID] + rng.integers(2, vocab_size, length).tolist()
        byte_counts += [0] + rng.integers(1, 4, length).tolist()
    return np.array(tokens), np.array(byte_counts)


def spawn_gloo_ranks(worker, world_size: int, *extra):
    """Run worker(rank, world_size, port, *extra, queue) in world_size spawned processes, with a free local
    TCP port for the Gloo rendezvous; returns the queue the workers put their results on."""
    context = torch.multiprocessing.get_context("spawn")
    queue = context.SimpleQueue()
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    torch.multiprocessing.spawn(worker, args=(world_size, port, *extra, queue), nprocs=world_size, join=True)
    return queue
