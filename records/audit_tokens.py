"""Recompute a run's score from its per-token file, independently of train_gpt.py.

    python records/audit_tokens.py runs/<id>/token_nll.npz

`SAVE_TOKEN_NLL=1 python train_gpt.py` writes token_nll.npz: every target its final eval mode scored,
with its stream position, token id, NLL in nats, original UTF-8 bytes, document and position in the
document, plus the (val_loss, val_bpb, scored_tokens, scored_bytes) the run reported. This checks the
challenge's scoring rule on it (every target of the stream after its first token scored exactly once,
with no gap; a BOS target, which ends the document before it, counts 0 bytes) and recomputes
val_bpb = sum(NLL) / ln 2 / sum(bytes) in float64. A reviewer needs nothing else from the run.
"""

import argparse
import json
import math
import sys

import numpy as np

BOS_ID = 1


def audit_token_nll(path: str) -> dict:
    """The recomputed score of a token_nll.npz file; ValueError naming the file if a rule is broken."""
    with np.load(path) as saved:
        positions, nll, byte_count = saved["stream_position"], saved["nll"], saved["byte_count"]
        token_id, doc_index, reported = saved["token_id"], saved["doc_index"], saved["reported"]
        mode = str(saved["mode"])
    if positions.size == 0:
        raise ValueError(f"{path}: no token is scored")
    if np.unique(positions).size != positions.size:
        raise ValueError(f"{path}: a token is scored more than once")
    if positions.min() <= 0:
        raise ValueError(f"{path}: the stream's first token is scored (it is never a target)")
    if positions.max() != positions.size:
        raise ValueError(f"{path}: targets 1..{int(positions.max())} are not all scored "
                         f"({positions.size} positions)")
    if np.any(byte_count[token_id == BOS_ID] != 0):
        raise ValueError(f"{path}: a BOS target counts bytes")
    if not np.all(np.isfinite(nll)) or np.any(nll < 0):
        raise ValueError(f"{path}: an NLL is negative or not finite")
    nll_sum = float(nll.astype(np.float64).sum())
    byte_sum = float(byte_count.astype(np.float64).sum())
    return {"mode": mode, "val_loss": nll_sum / positions.size, "val_bpb": nll_sum / math.log(2.0) / byte_sum,
            "scored_tokens": int(positions.size), "scored_bytes": int(byte_sum),
            "bos_targets": int((token_id == BOS_ID).sum()), "documents": int(np.unique(doc_index).size),
            "reported_val_loss": float(reported[0]), "reported_val_bpb": float(reported[1])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="token_nll.npz written by SAVE_TOKEN_NLL=1")
    args = parser.parse_args(argv)
    try:
        audit = audit_token_nll(args.path)
    except (OSError, KeyError, ValueError) as error:
        print(f"FAIL: {error}", file=sys.stderr)
        return 1
    print(json.dumps(audit, indent=2))
    agrees = math.isclose(audit["val_bpb"], audit["reported_val_bpb"], rel_tol=1e-6)
    print(("OK" if agrees else "FAIL") + f": recomputed val_bpb {audit['val_bpb']:.8f}, reported "
          f"{audit['reported_val_bpb']:.8f}")
    return 0 if agrees else 1


if __name__ == "__main__":
    sys.exit(main())
