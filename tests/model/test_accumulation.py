"""Gradient accumulation (`model/accumulation.py`): an optimizer step follows the mean loss over all of its answer
tokens, so 2 micro-batches of 4 records take the step 1 batch of 8 takes, though the halves hold different numbers
of answer tokens (Lightning alone would average the two halves' means)."""

from __future__ import annotations

import json

import peft
import pytest
import torch

from lightning_qpeft.data.datamodule import NLGDataModule
from lightning_qpeft.model.accumulation import TokenMeanAccumulator
from lightning_qpeft.model.checkpoint import trainable_state
from lightning_qpeft.model.module import QPeftModule
from tests.conftest import cpu_trainer


def test_the_accumulated_gradient_is_that_of_the_mean_over_every_token():
    torch.manual_seed(0)
    w = torch.randn(3, requires_grad=True)
    parts = [torch.randn(n, 3) for n in (2, 9, 5)]  # micro-batches of 2, 9 and 5 tokens

    def mean_loss(x):
        return ((x @ w) ** 2).mean()

    acc, k = TokenMeanAccumulator(), len(parts)
    for x in parts:  # as Lightning runs them: loss / K, gradients summed
        (acc.add(mean_loss(x), torch.tensor(len(x))) / k).backward()
    step_mean = acc.finish(torch.optim.SGD([w], lr=1.0), k)
    accumulated = w.grad.clone()
    w.grad = None
    whole = mean_loss(torch.cat(parts))
    whole.backward()
    torch.testing.assert_close(accumulated, w.grad)
    torch.testing.assert_close(step_mean, whole.detach())
    assert acc.n_first is None  # ready for the next step


@pytest.fixture(scope="module")
def uneven_file(tmp_path_factory) -> str:
    """Records whose answers run from one word to sixty: micro-batches hold very different token counts."""
    records = [{"instruction": f"Repeat the word {i} times.", "output": " ".join(["word"] * (1 + (i * 7) % 60))}
               for i in range(18)]
    path = tmp_path_factory.mktemp("accumulation") / "uneven.json"
    path.write_text(json.dumps(records))
    return str(path)


def one_step(tiny_model_dir: str, path: str, batch_size: int, accumulate: int, token_mean: bool = True):
    """Trainable tensors after one SGD step (lr 1: the update is the gradient), the logged loss, the step's batches."""
    torch.manual_seed(0)
    module = QPeftModule(tiny_model_dir, quantization="none", compute_dtype="float32", dtype="float32",
                         adapter=peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
                         optimizer=lambda params: torch.optim.SGD(params, lr=1.0))
    if not token_mean:  # Lightning's own accumulation: the mean of the micro-batches' means
        module._accumulates = lambda: False
    data = NLGDataModule(tiny_model_dir, task="file", path=path, val_size=2, batch_size=batch_size, seed=3)
    trainer = cpu_trainer(max_steps=1, accumulate_grad_batches=accumulate, limit_val_batches=0)
    trainer.fit(module, data)
    plan = data.train_sampler().plan(0)[:accumulate]
    tokens = [int(sum(data.tokenized["train"][i]["n_supervised"] for i in b)) for b in plan]
    return trainable_state(module), trainer.callback_metrics["train/loss"], tokens


def test_two_micro_batches_of_four_take_the_step_of_one_batch_of_eight(tiny_model_dir, uneven_file):
    whole, whole_loss, (n8,) = one_step(tiny_model_dir, uneven_file, 8, 1)
    halves, halves_loss, (n4a, n4b) = one_step(tiny_model_dir, uneven_file, 4, 2)
    assert n4a + n4b == n8 and max(n4a, n4b) > 1.1 * min(n4a, n4b)  # the halves weigh differently
    for name in whole:
        torch.testing.assert_close(halves[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(halves_loss, whole_loss, rtol=1e-5, atol=1e-6)
    # and the test can fail: the mean of the two means takes another step
    means, _, _ = one_step(tiny_model_dir, uneven_file, 4, 2, token_mean=False)
    moved = {k: (whole[k] - means[k]).abs().max().item() for k in whole}
    assert max(moved.values()) > 1e-3, moved
