"""`all_finite`: one flag for many tensors, any dtype, values untouched."""

import torch

from lightning_qpeft.core.tensors import all_finite


def test_all_finite_flags_any_nan_or_inf_and_leaves_values_alone():
    fp32, bf16 = torch.randn(7), torch.randn(3, 5).to(torch.bfloat16)
    big = torch.full((4,), 3e38)  # finite, near fp32's limit: a norm-based check would overflow to inf here
    before = [t.clone() for t in (fp32, bf16, big)]
    assert bool(all_finite([fp32, bf16, big]))
    assert all(torch.equal(a, b) for a, b in zip((fp32, bf16, big), before))  # the check unscales by exactly 1
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = bf16.clone()
        broken[2, 3] = bad
        assert not bool(all_finite([fp32, broken, big]))
    assert bool(all_finite([]))
