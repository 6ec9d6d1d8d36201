"""The fused chunked linear + loss gives the unfused numbers and gradients: dense, head and top-k
teachers; closed-form gradients against autograd of the registered losses; bf16; the objective."""

from __future__ import annotations

import pytest
import torch

import potstill.losses as L
from potstill.losses import chunk_grads as cg
from potstill.losses.fused import HeadInputs, default_chunk_size, fused_linear_loss
from potstill.objective import Objective, Term


def problem(dtype=torch.float64, n=(3, 7), h=16, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*n, h, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, dtype=dtype) * 0.3).requires_grad_()
    bias = (torch.randn(v, generator=g, dtype=dtype) * 0.1).requires_grad_()
    t_hidden = torch.randn(*n, 24, generator=g, dtype=dtype)
    t_weight = torch.randn(v, 24, generator=g, dtype=dtype) * 0.3
    labels = torch.randint(0, v, n, generator=g)
    labels[0, :2] = -100
    labels[-1, -1] = -100
    return hidden, weight, bias, t_hidden, t_weight, labels


def unfused(s_logits, target, labels, loss, alpha, reduction="mean", **params):
    """The materialised reference: the registered loss (or sparse_loss) plus CE, and each term."""
    soft = hard = None
    if alpha > 0:
        soft = (L.sparse_loss(s_logits, target, loss=loss, labels=labels, reduction=reduction, **params)
                if isinstance(target, L.SparseTarget)
                else L.get_loss(loss).fn(s_logits, target, labels=labels, reduction=reduction, **params))
    if alpha < 1:
        hard = L.cross_entropy(s_logits, labels, reduction=reduction)
    total = (alpha * soft if soft is not None else 0) + ((1 - alpha) * hard if hard is not None else 0)
    return total, soft, hard


CASES = [
    ("kl", 1.0, {"temperature": 2.0}),
    ("kl", 0.7, {"temperature": 4.0}),
    ("kl", 0.5, {}),
    ("reverse_kl", 0.5, {}),
    ("jsd", 0.9, {"beta": 0.3, "temperature": 1.5}),
    ("jsd", 1.0, {"beta": 0.0}),
    ("jsd", 1.0, {"beta": 1.0}),
    ("skew_kl", 1.0, {"skew": 0.1}),
    ("skew_reverse_kl", 0.6, {"skew": 0.2, "temperature": 2.0}),
    ("tvd", 0.8, {"temperature": 2.0}),
    ("soft_cross_entropy", 1.0, {"temperature": 3.0}),
    ("mse", 0.5, {}),
    ("kl", 0.0, {}),
]


def check(got, want, rtol, scale_factor=1.0):
    for g, w in zip(got, want, strict=True):
        # float32 sums chunk by chunk in another order: compare to the gradient's scale
        scale = scale_factor * w.abs().max().item()
        torch.testing.assert_close(g, scale_factor * w, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize(("loss", "alpha", "params", "chunk_size", "reduction"), [
    *[(*case, 4, "mean") for case in CASES],
    ("kl", 0.7, {"temperature": 4.0}, 1, "sum"),
    ("jsd", 0.9, {"beta": 0.3}, 1000, "sum"),
    ("reverse_kl", 1.0, {}, None, "mean"),
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("closed_form", [True, False])
def test_fused_equals_unfused_values_and_gradients(loss, alpha, params, dtype, chunk_size, reduction, closed_form):
    hidden, weight, bias, t_hidden, t_weight, labels = problem(dtype)
    t_logits = t_hidden @ t_weight.T
    want_total, want_soft, want_hard = unfused(hidden @ weight.T + bias, t_logits, labels, loss, alpha, reduction,
                                               **params)
    want = torch.autograd.grad(want_total, (hidden, weight, bias))
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    for teacher in (t_logits, HeadInputs(t_hidden, t_weight)):
        out = fused_linear_loss(HeadInputs(hidden, weight, bias), teacher, labels=labels, loss=loss, alpha=alpha,
                                chunk_size=chunk_size, reduction=reduction, closed_form=closed_form, **params)
        grads = torch.autograd.grad(out.loss * 2.5, (hidden, weight, bias))  # the upstream gradient is applied
        torch.testing.assert_close(out.loss, want_total.to(out.loss.dtype), **tol)
        # each term's own value, as the unfused objective logs it
        for got_part, want_part in ((out.distillation, want_soft), (out.cross_entropy, want_hard)):
            assert (got_part is None) == (want_part is None)
            if want_part is not None:
                torch.testing.assert_close(got_part, want_part.detach().to(got_part.dtype), **tol)
        check(grads, want, tol["rtol"], 2.5)


@pytest.mark.parametrize(("loss", "params"), [
    ("kl", {}), ("reverse_kl", {}), ("soft_cross_entropy", {}), ("tvd", {}),
    ("skew_kl", {"skew": 0.0}), ("skew_kl", {"skew": 0.3}), ("skew_kl", {"skew": 1.0}),
    ("skew_reverse_kl", {"skew": 0.0}), ("skew_reverse_kl", {"skew": 0.25}), ("skew_reverse_kl", {"skew": 1.0}),
    ("jsd", {"beta": 0.0}), ("jsd", {"beta": 0.2}), ("jsd", {"beta": 0.5}), ("jsd", {"beta": 0.9}),
    ("jsd", {"beta": 1.0}),
])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_each_closed_form_gradient_is_autograds(loss, params, temperature):
    """Each kernel's per-position value and gradient of the logits against autograd of the registered loss,
    on sharp and flat distributions (logits spread over ±40) where rounding is hardest."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(6, 30, generator=g, dtype=torch.float64) * torch.tensor([0.1, 1, 3, 10, 20, 40])[:, None]
    t = torch.randn(6, 30, generator=g, dtype=torch.float64) * torch.tensor([40, 0.1, 3, 1, 20, 10])[:, None]
    leaf = s.clone().requires_grad_()
    want_value = L.get_loss(loss).fn(leaf, t, temperature=temperature, reduction="none", **params)
    (want_grad,) = torch.autograd.grad(want_value.sum(), leaf)
    assert cg.kernel_for(loss, params) is not None  # closed form, not the fallback
    ls, q, lt, p = s.clone(), torch.empty_like(s), t.clone(), torch.empty_like(t)
    cg.log_softmax_(ls, temperature, q)
    cg.log_softmax_(lt, temperature, p)
    q_before = q.clone()
    value, grad, coef = cg.kernel_for(loss, params)(ls, q, lt, p, temperature, **params)
    grad = grad * (coef[:, None] if isinstance(coef, torch.Tensor) else coef)
    torch.testing.assert_close(value, want_value, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-8, atol=1e-11)
    assert torch.equal(q, q_before)  # the CE term may share it


def test_jsd_closed_form_follows_the_registered_convention(monkeypatch):
    """The JSD weights are read off the registered function: a convention with the weights the other way
    round (TRL's / the GKD paper's) is followed, and a form the kernel cannot express falls back to autograd."""
    from potstill.losses import divergences, registry

    def gkd(student_logits, teacher_logits, *, beta=0.5, temperature=1.0, mask=None, labels=None, reduction="mean"):
        log_s, log_t, keep = divergences._prepare("jsd", student_logits, teacher_logits, temperature, mask, labels)
        log_m = divergences._mixture(log_t, log_s, beta)
        value = beta * divergences._kl(log_t, log_m) + (1 - beta) * divergences._kl(log_s, log_m)
        return L.reduce(value * temperature**2, keep, reduction)

    def other(student_logits, teacher_logits, *, beta=0.5, temperature=1.0, mask=None, labels=None,
              reduction="mean"):
        return beta * L.total_variation(student_logits, teacher_logits, temperature=temperature, mask=mask,
                                        labels=labels, reduction=reduction)

    hidden, weight, bias, t_hidden, t_weight, labels = problem()
    for fn, closed in ((gkd, True), (other, False)):
        monkeypatch.setitem(registry.LOSSES, "jsd", registry.LossSpec(fn, "divergence", scaled_by_t2=True))
        cg.jsd_weights.cache_clear()
        assert (cg.kernel_for("jsd", {"beta": 0.3}) is not None) == closed
        s_logits = hidden @ weight.T + bias
        want = fn(s_logits, t_hidden @ t_weight.T, beta=0.3, temperature=2.0, labels=labels)
        want_grads = torch.autograd.grad(want, (hidden, weight, bias))
        got = fused_linear_loss(HeadInputs(hidden, weight, bias), HeadInputs(t_hidden, t_weight), labels=labels,
                                loss="jsd", beta=0.3, temperature=2.0, chunk_size=5).loss
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        check(torch.autograd.grad(got, (hidden, weight, bias)), want_grads, 1e-9)
    cg.jsd_weights.cache_clear()


@pytest.mark.parametrize(("loss", "params"), [("kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.3}),
                                              ("skew_kl", {"skew": 0.1}), ("tvd", {})])
@pytest.mark.parametrize("leftover", ["bucket", "renormalize"])
@pytest.mark.parametrize(("alpha", "temperature", "k"), [(1.0, 1.0, 8), (0.6, 2.0, 8), (0.5, 1.0, 50)])
def test_fused_with_a_cached_top_k_teacher_equals_sparse_loss(loss, params, leftover, alpha, temperature, k):
    hidden, weight, bias, t_hidden, t_weight, labels = problem()
    target = L.top_k(t_hidden @ t_weight.T, k, temperature)
    want_total, want_soft, _ = unfused(hidden @ weight.T + bias, target, labels, loss, alpha, "mean",
                                               temperature=temperature, leftover=leftover, **params)
    want = torch.autograd.grad(want_total, (hidden, weight, bias))
    out = fused_linear_loss(HeadInputs(hidden, weight, bias), target, labels=labels, loss=loss, alpha=alpha,
                            chunk_size=4, sparse_leftover=leftover, temperature=temperature, **params)
    torch.testing.assert_close(out.loss, want_total, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.distillation, want_soft.detach(), rtol=1e-10, atol=1e-12)
    check(torch.autograd.grad(out.loss, (hidden, weight, bias)), want, 1e-9)


def test_sparse_teacher_holding_all_the_mass_and_a_low_precision_cache():
    """top-k holding (rounded) all of the student's mass: the floors keep it finite; bf16 log-probs as cached."""
    hidden, weight, bias, t_hidden, t_weight, labels = problem(v=6)
    exact = L.top_k(t_hidden @ t_weight.T, 6)
    half = L.SparseTarget(exact.ids, exact.logprobs.to(torch.bfloat16), exact.rest.to(torch.bfloat16))
    for target in (exact, half):
        want = L.sparse_loss(hidden @ weight.T + bias, target, labels=labels)
        out = fused_linear_loss(HeadInputs(hidden, weight, bias), target, labels=labels, chunk_size=3)
        torch.testing.assert_close(out.loss, want, rtol=1e-10, atol=1e-12)
        grads = torch.autograd.grad(out.loss, (hidden, weight))
        assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(("loss", "alpha", "params"), [("kl", 0.5, {"temperature": 2.0}), ("jsd", 1.0, {"beta": 0.5}),
                                                       ("reverse_kl", 0.8, {})])
def test_bf16_values_and_gradients_follow_the_unfused_bf16_loss(loss, alpha, params):
    """bf16 hidden states and heads (the GPU case): the logits' matmul in bf16 as unfused, the loss in float32;
    values and gradients within bf16 rounding of the unfused bf16 computation."""
    hidden, weight, bias, t_hidden, t_weight, labels = problem(torch.float64, n=(4, 33), h=64, v=300)
    leaves = [x.detach().to(torch.bfloat16).requires_grad_() for x in (hidden, weight, bias)]
    t_hidden, t_weight = t_hidden.to(torch.bfloat16), t_weight.to(torch.bfloat16)
    want_total, _, _ = unfused(torch.nn.functional.linear(*leaves), t_hidden @ t_weight.T, labels, loss, alpha,
                               **params)
    want = torch.autograd.grad(want_total, leaves)
    out = fused_linear_loss(HeadInputs(*leaves), HeadInputs(t_hidden, t_weight), labels=labels, loss=loss,
                            alpha=alpha, chunk_size=32, **params)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, want_total, rtol=1e-5, atol=1e-6)  # same bf16 logits, float32 loss
    got = torch.autograd.grad(out.loss, leaves)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.bfloat16
        # the head's gradient is summed in float32 over chunks (autograd: one bf16 matmul): within bf16 steps
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-2 * w.abs().max().item())


def test_fused_gradcheck_and_no_bias():
    hidden, weight, _, t_hidden, t_weight, labels = problem(n=(2, 3), h=5, v=7)
    t_logits = (t_hidden @ t_weight.T).detach()
    assert torch.autograd.gradcheck(
        lambda h, w: fused_linear_loss(HeadInputs(h, w), t_logits, labels=labels, alpha=0.6, temperature=2.0,
                                       chunk_size=2).loss, (hidden, weight))
    target = L.top_k(t_logits, 3, 2.0)
    assert torch.autograd.gradcheck(
        lambda h, w: fused_linear_loss(HeadInputs(h, w), target, labels=labels, loss="jsd", beta=0.4, alpha=0.7,
                                       temperature=2.0, chunk_size=4).loss, (hidden, weight))


def test_masked_positions_count_for_nothing_even_when_not_finite():
    hidden, weight, bias, t_hidden, t_weight, labels = problem()
    t_logits = t_hidden @ t_weight.T
    t_logits[0, 0] = float("nan")  # a masked (label -100) position's garbage must not leak
    out = fused_linear_loss(HeadInputs(hidden, weight, bias), t_logits, labels=labels, loss="reverse_kl", alpha=0.5)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
    assert hidden.grad[0, :2].abs().sum() == 0
    value = fused_linear_loss(HeadInputs(hidden, weight, bias), t_logits, mask=torch.zeros(3, 7)).loss
    assert value.item() == 0


def test_default_chunk_size_follows_the_vocabulary_dtype_and_budget():
    # CPU float32: 256 rows (the matmuls' full rate) while 4 blocks of 256 × V fit in the 1 GiB budget
    assert default_chunk_size(4096, 128_000) == 256
    assert default_chunk_size(4096, 256_000) == 256
    assert default_chunk_size(100, 32_000) == 100  # never more than the tokens
    # a tighter budget or a larger vocabulary: fewer rows, the blocks within the budget
    for vocab, budget in ((128_000, 256 << 20), (1_000_000, 1 << 30), (32_000, 10 << 20)):
        rows = default_chunk_size(1 << 20, vocab, memory_budget=budget)
        assert rows * vocab * 4 * 4 <= budget and rows >= 1
    assert default_chunk_size(4096, 128_000, dtype=torch.float64, memory_budget=512 << 20) == 128


def test_fused_errors():
    hidden, weight, _, t_hidden, t_weight, _ = problem()
    t_logits = t_hidden @ t_weight.T
    head = HeadInputs(hidden, weight)
    with pytest.raises(ValueError, match="uld"):
        fused_linear_loss(head, t_logits[..., :40])
    with pytest.raises(ValueError, match="labels are needed"):
        fused_linear_loss(head, t_logits, alpha=0.5)
    with pytest.raises(ValueError, match="needs a teacher"):
        fused_linear_loss(head)
    with pytest.raises(ValueError, match="positions"):
        fused_linear_loss(head, L.top_k(t_logits[:2], 4))
    with pytest.raises(ValueError, match="divergences"):
        fused_linear_loss(head, L.top_k(t_logits, 4), loss="mse")
    with pytest.raises(TypeError, match="SparseTarget"):
        fused_linear_loss(head, {"logits": t_logits})


def test_objective_fused_with_a_cached_teacher_equals_the_materialised_cached_path():
    """The engine's cached + fused step: same loss, same gradients, and the kl / cross_entropy columns."""
    hidden, weight, bias, t_hidden, t_weight, labels = problem(v=60)
    target = L.top_k((t_hidden @ t_weight.T)[..., :50], 8, 2.0)  # a teacher over the shared 50 tokens
    objective = Objective.hinton(alpha=0.7, temperature=2.0, vocab_size=50)  # padding rows 50..59 never count
    labels = labels.clamp(max=49)
    plain = objective({"logits": hidden @ weight.T + bias}, {"logits": target}, labels=labels)
    want = torch.autograd.grad(plain.loss, (hidden, weight, bias))
    fused = objective({"logits": HeadInputs(hidden, weight, bias)}, {"logits": target}, labels=labels)
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-10, atol=1e-12)
    assert fused.parts.keys() == plain.parts.keys() == {"kl", "cross_entropy"}
    for key in plain.parts:
        torch.testing.assert_close(fused.parts[key], plain.parts[key], rtol=1e-10, atol=1e-12)
    check(torch.autograd.grad(fused.loss, (hidden, weight, bias)), want, 1e-9)
    # reduction="sum" (the engine's token-count normalisation) too
    plain = objective({"logits": hidden @ weight.T + bias}, {"logits": target}, labels=labels, reduction="sum")
    fused = objective({"logits": HeadInputs(hidden, weight, bias)}, {"logits": target}, labels=labels,
                      reduction="sum")
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-10, atol=1e-12)


def test_objective_fusable_terms():
    assert Objective.hinton(alpha=0.5).fusable
    assert not Objective([Term("kl"), Term("cross_entropy", params={"label_smoothing": 0.1})]).fusable
    assert not Objective([Term("kl"), Term("reverse_kl")]).fusable


def test_training_from_a_cache_with_the_fused_head_follows_the_materialised_one(tmp_path):
    """The engine fuses with a cached teacher now (fused_loss: true used to be refused with a cache): same run,
    fused or not, ends in the same place, and the log keeps the kl and cross_entropy columns."""
    from potstill.distill import distill
    from potstill.recipes import load_recipe
    from tests.test_teacher_cache import TINY_LM

    base = [*TINY_LM, "train.epochs=2", "train.learning_rate=1e-2", "distillation.temperature=2.0",
            "distillation.alpha=0.7", "teacher_cache={top_k: 16, dtype: float32}"]
    plain = distill(load_recipe("tiny-lm", [*base, "train.fused_loss=false"]), tmp_path / "plain", progress=False)
    fused = distill(load_recipe("tiny-lm", [*base, "train.fused_loss=true"]), tmp_path / "fused", progress=False)
    a, b = plain.metrics["models"]["student"], fused.metrics["models"]["student"]
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-4)
    assert b["kl_to_teacher"] == pytest.approx(a["kl_to_teacher"], rel=1e-3)
    log = (tmp_path / "fused" / "log.csv").read_text().splitlines()[0].split(",")
    assert {"kl", "cross_entropy"} <= set(log) and "fused" not in log


def test_no_tokens_gives_zero_loss_and_zero_gradients():
    _, weight, bias, _, t_weight, _ = problem()
    hidden = torch.zeros(0, 16, dtype=torch.float64, requires_grad=True)
    out = fused_linear_loss(HeadInputs(hidden, weight, bias), HeadInputs(torch.zeros(0, 24, dtype=torch.float64),
                                                                         t_weight))
    out.loss.backward()
    assert out.loss.item() == 0 and weight.grad.abs().sum() == 0 and bias.grad.abs().sum() == 0
