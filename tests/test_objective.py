"""The Objective: weighted terms over signals, the Hinton mix, and its errors."""

from __future__ import annotations

import pytest
import torch

import potstill.losses as L
from potstill import Objective, Term


def test_hinton_objective_is_alpha_kl_plus_one_minus_alpha_ce():
    s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    out = Objective.hinton(alpha=0.8, temperature=3.0)({"logits": s}, {"logits": t}, labels=y)
    expected = L.hinton_loss(s, t, y, alpha=0.8, temperature=3.0)
    torch.testing.assert_close(out.loss, expected)
    assert set(out.parts) == {"kl", "cross_entropy"}
    torch.testing.assert_close(out.parts["kl"], L.kl_divergence(s, t, temperature=3.0))


def test_alpha_zero_is_plain_training_and_needs_no_teacher():
    objective = Objective.hinton(alpha=0.0)
    assert not objective.needs_teacher
    s, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    torch.testing.assert_close(objective({"logits": s}, None, labels=y).loss, L.cross_entropy(s, y))


def test_terms_on_named_signals_with_labels_masking_teacher_terms():
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    hs, ht = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    labels = torch.tensor([[1, 2, -100, 3, -100], [-100, 1, 1, 1, 1]])
    objective = Objective([Term("jsd", 0.5, params={"beta": 0.2}), Term("cosine", 2.0, student="h", teacher="h")])
    out = objective({"logits": s, "h": hs}, {"logits": t, "h": ht}, labels=labels)
    expected = 0.5 * L.jsd(s, t, beta=0.2, labels=labels) + 2.0 * L.cosine_loss(hs, ht, labels=labels)
    torch.testing.assert_close(out.loss, expected)
    assert objective.student_signals == {"logits", "h"} and objective.teacher_signals == {"logits", "h"}


def test_objective_errors():
    with pytest.raises(ValueError, match="no parameter 'beta'"):
        Term("kl", params={"beta": 0.1})
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        Objective.hinton(alpha=2.0)
    with pytest.raises(ValueError, match="needs labels"):
        Objective.supervised()({"logits": torch.randn(2, 3)}, None)
    with pytest.raises(ValueError, match="needs teacher signals"):
        Objective.hinton()({"logits": torch.randn(2, 3)}, None, labels=torch.tensor([0, 1]))


def test_a_term_that_ignores_labels_counts_the_masks_positions():
    """DistilBERT: labels mark the masked tokens, yet its KL and cosine cover every real token."""
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.tensor([[3, -100, -100, 1, -100], [-100, 2, -100, -100, -100]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    objective = Objective([Term("kl", 1.0, params={"temperature": 2.0}, ignore_labels=True),
                           Term("kl", 1.0, params={"temperature": 2.0})])
    out = objective({"logits": s}, {"logits": t}, labels=labels, mask=mask)
    every, masked = out.values[0][1], out.values[1][1]
    torch.testing.assert_close(every, L.kl_divergence(s, t, temperature=2.0, mask=mask))
    torch.testing.assert_close(masked, L.kl_divergence(s, t, temperature=2.0, mask=labels != -100))
    # the engine normalises each by its own count: real tokens (7), labelled ones (3)
    from potstill.batch import Batch

    counts = objective.counts(Batch(None, None, labels=labels, mask=mask))
    assert [c.item() for c in counts] == [7, 3]
    with pytest.raises(ValueError, match="cannot ignore them"):
        Term("cross_entropy", ignore_labels=True)
    assert not objective.fusable
