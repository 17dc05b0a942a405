"""The pure APT function against the reference, values and gradients."""

import torch
from reference import reference_apt

from peft_apt import approximated_prompt_output


def tensors(n=6, d=8, p=5, r=2, batch=3, seed=0):
    """float64, so that the library and the reference agree to rounding whatever the matmul order or threads."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(batch, n, d, generator=g, dtype=torch.float64)
    O = torch.randn(batch, n, d, generator=g, dtype=torch.float64)
    P = (torch.randn(p, d, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    W1 = (torch.randn(d, r, generator=g, dtype=torch.float64) / d**0.5).requires_grad_()
    W2 = (torch.randn(r, d, generator=g, dtype=torch.float64) / max(r, 1) ** 0.5).requires_grad_()
    s = torch.tensor([0.2], dtype=torch.float64).requires_grad_()
    return O, X, P, W1, W2, s


def test_values_and_gradients_match_the_reference():
    O, X, *params = tensors()
    got = approximated_prompt_output(O, X, *params)
    want = reference_apt(O, X, *params)
    torch.testing.assert_close(got, want)
    grad = torch.randn_like(got)
    got_grads = torch.autograd.grad(got, params, grad)
    want_grads = torch.autograd.grad(want, params, grad)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


def test_prompt_weight_is_a_constant_for_backprop():
    """With a = max_j A held constant, dO'/dP differs from the gradient through a differentiable max."""
    O, X, P, W1, W2, s = tensors()
    K = P + P @ W1 @ W2
    A = torch.relu(X @ K.T)
    through_max = torch.exp(s) * (O + A.max(-1, keepdim=True).values * (A @ P))
    got = approximated_prompt_output(O, X, P, W1, W2, s)
    torch.testing.assert_close(got, through_max)
    g_detached = torch.autograd.grad(got.sum(), P)[0]
    g_through = torch.autograd.grad(through_max.sum(), P)[0]
    assert not torch.allclose(g_detached, g_through)


def test_scale_multiplies_the_whole_output_and_rank_zero_means_keys_are_prompts():
    O, X, P, W1, W2, s = tensors(r=0)
    with torch.no_grad():
        zero_s = approximated_prompt_output(O, X, P, W1, W2, torch.zeros(1, dtype=torch.float64))
        out = approximated_prompt_output(O, X, P, W1, W2, s)
        torch.testing.assert_close(out, torch.exp(s) * zero_s)
        A = torch.relu(X @ P.T)
        torch.testing.assert_close(zero_s, O + A.amax(-1, keepdim=True) * (A @ P))


def test_dropout_acts_on_scores_in_training_only():
    O, X, *params = tensors()
    with torch.no_grad():
        eval_out = approximated_prompt_output(O, X, *params, dropout=0.5, training=False)
        torch.testing.assert_close(eval_out, approximated_prompt_output(O, X, *params))
        torch.manual_seed(0)
        train_out = approximated_prompt_output(O, X, *params, dropout=0.5, training=True)
        assert not torch.allclose(train_out, eval_out)
