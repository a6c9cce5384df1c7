"""The optional Triton kernels (FUSED_MLP, FUSED_CE) against their PyTorch references, forward and
backward, on CPU through Triton's interpreter. TRITON_INTERPRET=1 must be set before triton is first
imported (its own helpers such as tl.sigmoid are jitted at import), and a pytest process may already have
imported it for torch.compile; so every test here runs in one child pytest process started with the
variable set, and reports its outcome here. Skipped where triton is not installed (requirements-test.txt
installs it). Shapes are odd on purpose: every block boundary is masked somewhere."""

import functools
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

import pytest
import torch
from torch._dynamo.utils import counters

pytest.importorskip("triton")

import train_gpt  # noqa: E402
from tg_helpers import perturb_parameters, random_tokens, tiny_h  # noqa: E402

IN_CHILD = os.environ.get("TRITON_INTERPRET") == "1"
if IN_CHILD:
    train_gpt.fused_ops()  # registers the kernels' ops (GPT.__init__ does it in a run)


@functools.cache
def child_outcomes() -> dict[str, str]:
    """Run this file with TRITON_INTERPRET=1 from the start; {test case name: failure text ("" = passed)}."""
    report = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"triton_kernels_{os.getpid()}.xml")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                             f"--junitxml={report}"], env=dict(os.environ, TRITON_INTERPRET="1"),
                            capture_output=True, text=True, timeout=600, cwd=os.path.dirname(__file__))
    assert os.path.exists(report), result.stdout[-3000:] + result.stderr[-3000:]
    outcomes = {}
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        problems = [element.get("message", "") + "\n" + (element.text or "") for element in case
                    if element.tag in ("failure", "error", "skipped")]
        outcomes[case.get("name")] = "\n".join(problems)
    os.remove(report)
    return outcomes


def interpreted(test):
    """In the child, the test itself; here, the child's outcome for it (every parametrization)."""
    if IN_CHILD:
        return test

    @functools.wraps(test)
    def outcome_in_child(*args, **kwargs):
        cases = {name: text for name, text in child_outcomes().items() if name.split("[")[0] == test.__name__}
        assert cases, f"{test.__name__} did not run in the TRITON_INTERPRET=1 child"
        failed = {name: text for name, text in cases.items() if text}
        assert not failed, "\n".join(f"{name}: {text}" for name, text in failed.items())
    return outcome_in_child


def leaf(tensor):
    return tensor.detach().clone().requires_grad_(True)


@pytest.mark.parametrize("rows,vocab,cap", [(7, 1500, 30.0), (5, 64, 2.0)])
@interpreted
def test_fused_softcapped_ce_matches_the_reference_forward_and_backward(rows, vocab, cap):
    """Loss per row and the gradient wrt the raw logits equal softcap-then-F.cross_entropy in float32,
    for a vocabulary that spans several kernel blocks (1500 = 1024 + a masked tail) and one that does
    not, with a small cap where the tanh saturates."""
    generator = torch.Generator().manual_seed(rows)
    logits = torch.randn(rows, vocab, generator=generator) * 12
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    weights = torch.rand(rows, generator=generator)  # a non-uniform upstream gradient
    fused_in, reference_in = leaf(logits), leaf(logits)
    fused = train_gpt.fused_softcapped_nll(fused_in, targets, cap)
    reference = train_gpt.softcapped_nll_reference(reference_in, targets, cap)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)
    (fused * weights).sum().backward()
    (reference * weights).sum().backward()
    torch.testing.assert_close(fused_in.grad, reference_in.grad, atol=1e-6, rtol=1e-5)


@interpreted
def test_fused_softcapped_ce_keeps_the_logits_dtype_and_no_float32_copy():
    """bf16 logits in, bf16 gradient out (the reference's float32 [N, V] copy is what the kernel avoids);
    the losses are float32 and agree with the reference computed from the same bf16 values."""
    generator = torch.Generator().manual_seed(3)
    logits = (torch.randn(4, 300, generator=generator) * 5).bfloat16()
    targets = torch.randint(0, 300, (4,), generator=generator)
    fused_in = leaf(logits)
    fused = train_gpt.fused_softcapped_nll(fused_in, targets, 30.0)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, train_gpt.softcapped_nll_reference(logits, targets, 30.0), atol=1e-4, rtol=1e-4)
    fused.sum().backward()
    assert fused_in.grad.dtype == torch.bfloat16
    reference_in = leaf(logits.float())
    train_gpt.softcapped_nll_reference(reference_in, targets, 30.0).sum().backward()
    torch.testing.assert_close(fused_in.grad.float(), reference_in.grad, atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize("rows,dim,hidden", [(37, 24, 80), (64, 32, 128)])
@interpreted
def test_fused_mlp_matches_the_reference_forward_and_backward(rows, dim, hidden):
    """leaky_relu2(x W_up^T) W_down^T and the gradients of x, W_up and W_down equal plain autograd,
    with tile-straddling sizes (37 rows, 80 hidden units, 24 inner) and tile-exact ones. In float32:
    the interpreter does not emulate a bf16 tl.dot (a 16x16 bf16 product came out 2e10 off), so bf16
    is checked on a GPU by benchmarks/gpu_check.py (triton_kernels)."""
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, dim, generator=generator)
    up, down = torch.randn(hidden, dim, generator=generator) / 4, torch.randn(dim, hidden, generator=generator) / 8
    grad_out = torch.randn(rows, dim, generator=generator)
    fused_leaves, reference_leaves = [leaf(t) for t in (x, up, down)], [leaf(t) for t in (x, up, down)]
    fused = train_gpt.FusedLeakyReLU2MLP.apply(*fused_leaves)
    xr, upr, downr = reference_leaves
    reference = train_gpt.leaky_relu2(xr @ upr.T) @ downr.T
    torch.testing.assert_close(fused, reference, atol=1e-4, rtol=1e-4)
    fused.backward(grad_out)
    reference.backward(grad_out)
    for name, a, b in zip(("x", "up", "down"), fused_leaves, reference_leaves):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4, msg=f"grad of {name}")


@interpreted
def test_model_with_both_kernels_matches_the_plain_model_eager_and_compiled():
    """The whole training forward (GPT.forward: every MLP and the head) with FUSED_MLP and FUSED_CE gives
    the plain model's loss and parameter gradients, eager and under torch.compile(fullgraph=True) with
    one graph and no graph break (the kernels are opaque custom ops to dynamo)."""
    h = tiny_h(NUM_LAYERS=2, LOOP_START=0, LOOP_END=0, NUM_LOOPS=2, PARALLEL_START_LAYER=1, MODEL_DIM=32,
               NUM_HEADS=2, NUM_KV_HEADS=1, VOCAB_SIZE=200, SMEAR_GATE_DIMS=8, SPARSE_ATTN_GATE_DIMS=8)
    torch.manual_seed(0)
    plain = train_gpt.GPT(h.model, "sdpa")
    perturb_parameters(plain, seed=1)
    fused = train_gpt.GPT(h.model, "sdpa", fused_mlp=True, fused_ce=True)
    fused.load_state_dict(plain.state_dict())
    ids = random_tokens(2, 48, vocab=200, seed=2, bos_every=13)
    targets = random_tokens(2, 48, vocab=200, seed=3)
    for model in (plain, fused):
        model.set_recurrence(True)
    plain_loss = plain(ids, targets)
    plain_loss.backward()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True, dynamic=False)
    layout = train_gpt.DocumentLayout.build(ids, "sdpa")
    for forward in (fused, compiled):
        fused.zero_grad()
        loss = forward(ids, targets, layout)
        loss.backward()
        torch.testing.assert_close(loss, plain_loss, atol=1e-5, rtol=1e-5)
        for (name, a), (_, b) in zip(fused.named_parameters(), plain.named_parameters()):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert sum(counters["graph_break"].values()) == 0 and counters["stats"]["unique_graphs"] == 1


def test_fused_kernels_are_chosen_only_where_they_can_run(monkeypatch):
    """auto never picks a kernel on CPU; FUSED_*=1 where the op cannot run or does not exist is an error
    naming the variable."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    h = tiny_h()
    cpu = torch.device("cpu")
    assert train_gpt.select_fused_kernels(h.run, h.model, cpu) == (False, False)
    with pytest.raises(ValueError, match="FUSED_CE=1 needs CUDA"):
        train_gpt.select_fused_kernels(tiny_h(FUSED_CE=1).run, h.model, cpu)
    relu2 = tiny_h(MLP_ACT="relu2", FUSED_MLP=1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="FUSED_MLP=1 needs MLP_ACT=leaky_relu2"):
        train_gpt.select_fused_kernels(relu2.run, relu2.model, cpu)
    with pytest.raises(ValueError, match="FUSED_MLP='2'"):
        tiny_h(FUSED_MLP=2)


@interpreted
def test_the_packed_script_defines_the_kernels_from_its_exec_d_source(tmp_path):
    """The counted (packed) script execs its source from a string, where Triton finds no file to read
    a kernel from; it hands Triton the unpacked text, and its CE kernel computes the same losses."""
    import runpy

    source = open(train_gpt.__file__, encoding="utf-8").read()
    packed = tmp_path / "train_gpt_packed.py"
    packed.write_text(train_gpt.pack_code(source))
    assert train_gpt.unpack_code(packed.read_text()) == train_gpt.minify_source(source)
    namespace = runpy.run_path(str(packed), run_name="packed_train_gpt")
    ce_forward = namespace["triton_kernels"]()[0]
    logits, targets = torch.randn(3, 40) * 9, torch.tensor([0, 17, 39])
    loss, lse = torch.empty(3), torch.empty(3)
    ce_forward[(3,)](logits, targets, loss, lse, logits.stride(0), 40, 30.0)
    torch.testing.assert_close(loss, train_gpt.softcapped_nll_reference(logits, targets, 30.0), atol=1e-5, rtol=1e-5)
