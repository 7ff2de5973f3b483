"""The chunked loss equals the plain one: KD (KL at temperature T), LM, their mix, and their gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gisp.recovery.loss import chunked_loss

B, S, D, V = 2, 11, 8, 50


def case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, D, generator=g, dtype=torch.float64).float()
    t_hidden = torch.randn(B, S, D, generator=g)
    s_head, t_head = torch.randn(V, D, generator=g), torch.randn(V, D, generator=g)
    labels = torch.randint(0, V, (B, S), generator=g)
    return hidden, t_hidden, s_head, t_head, labels


def reference(hidden, t_hidden, s_head, t_head, labels, temperature, lm_weight):
    """The loss written the obvious way: every logit of the batch at once."""
    s, t = hidden @ s_head.T, t_hidden @ t_head.T
    kd = F.kl_div(F.log_softmax(s / temperature, -1).flatten(0, 1), F.log_softmax(t / temperature, -1).flatten(0, 1),
                  log_target=True, reduction="batchmean") * temperature**2
    lm = F.cross_entropy(s.flatten(0, 1), labels.flatten())
    return (1 - lm_weight) * kd + lm_weight * lm, kd, lm


@pytest.mark.parametrize("temperature,lm_weight", [(1.0, 0.0), (2.0, 0.0), (2.0, 0.3)])
@pytest.mark.parametrize("chunk", [1, 4, S, 128])
def test_chunked_kd_equals_unchunked(chunk, temperature, lm_weight):
    hidden, t_hidden, s_head, t_head, labels = case()
    h = hidden.clone().requires_grad_()
    got = chunked_loss(h * 1.0, labels, lambda x: x @ s_head.T, teacher_hidden=t_hidden,
                       teacher_head=lambda x: x @ t_head.T, temperature=temperature, lm_weight=lm_weight, chunk=chunk)
    ref_h = hidden.clone().requires_grad_()
    total, kd, lm = reference(ref_h, t_hidden, s_head, t_head, labels, temperature, lm_weight)
    total.backward()
    assert got.total == pytest.approx(total.item(), rel=1e-6, abs=1e-6)
    assert got.kd == pytest.approx(kd.item(), rel=1e-6, abs=1e-6)
    assert got.lm == pytest.approx(lm.item(), rel=1e-6, abs=1e-6)
    torch.testing.assert_close(h.grad, ref_h.grad, rtol=1e-5, atol=1e-7)


def test_without_a_teacher_it_is_the_lm_loss():
    hidden, _, s_head, _, labels = case(1)
    h = hidden.clone().requires_grad_()
    got = chunked_loss(h * 1.0, labels, lambda x: x @ s_head.T, chunk=3)
    ref_h = hidden.clone().requires_grad_()
    ref = F.cross_entropy((ref_h @ s_head.T).flatten(0, 1), labels.flatten())
    ref.backward()
    assert got.kd is None and got.total == got.lm == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(h.grad, ref_h.grad, rtol=1e-5, atol=1e-7)


def test_kd_is_zero_when_student_is_teacher_and_without_backward_nothing_gets_gradients():
    hidden, _, s_head, _, labels = case(2)
    h = hidden.clone().requires_grad_()
    got = chunked_loss(h * 1.0, labels, lambda x: x @ s_head.T, teacher_hidden=hidden,
                       teacher_head=lambda x: x @ s_head.T, lm_weight=0.0, chunk=5, backward=False)
    assert abs(got.kd) < 1e-6 and got.total == got.kd
    assert h.grad is None


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_final_hidden_and_logits_are_the_forward_of_each_family(family):
    """What the chunked loss applies (the adapter's hidden states, then its LM head) is the model's forward."""
    from tests.architectures.test_gemma3 import tiny_gemma3
    from tests.conftest import tiny_model

    from gisp.architectures import get_architecture

    model = tiny_gemma3(layers=2) if family == "gemma3" else tiny_model(family, layers=2)
    arch = get_architecture(model)
    x = torch.randint(0, 90, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(arch.logits(model, arch.final_hidden(model, x)), model(input_ids=x).logits)
    assert model.config.model_type != "gemma3_text" or model.config.final_logit_softcapping  # the cap is exercised
    assert len(arch.projection_modules()) == 7
