"""Packing: one padding-free row per micro-batch gives exactly the per-record losses of a padded batch, and
attention never crosses a record boundary (transformers detects the packed rows from position_ids)."""

import pytest
import torch

from lightning_qpeft.data.collate import IGNORE_INDEX, PackCollator, PadCollator
from lightning_qpeft.data.datamodule import NLGDataModule
from lightning_qpeft.model.loading import load_base_model


def records(n=4):
    # lengths 5..(4+n)+3, prompts masked, targets of 3 tokens
    return [{"input_ids": list(range(10 + i, 15 + 2 * i)) + [40 + i, 41, 42],
             "labels": [IGNORE_INDEX] * (5 + i) + [40 + i, 41, 42]} for i in range(n)]


def test_pack_collator_restarts_positions_and_masks_every_boundary():
    recs = records(3)
    recs[1]["labels"] = list(recs[1]["input_ids"])  # train_on_source: the whole record is labelled
    batch = PackCollator()(recs)
    lengths = [len(r["input_ids"]) for r in recs]
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: packed
    assert batch["input_ids"].shape == (1, sum(lengths))
    assert batch["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    starts = [0, lengths[0], lengths[0] + lengths[1]]
    assert all(batch["labels"][0, s] == IGNORE_INDEX for s in starts)
    # everything else is the records' own labels
    flat = [x for r in recs for x in r["labels"]]
    for s in starts:
        flat[s] = IGNORE_INDEX
    assert batch["labels"][0].tolist() == flat


@pytest.mark.parametrize("multiple, expected", [(None, 11), (1, 11), (4, 12), (64, 64), (11, 11), (5, 15)])
def test_pad_collator_rounds_the_length_up_with_masked_padding(multiple, expected):
    recs = records(4)  # longest record: 11 tokens
    batch = PadCollator(0, multiple)(recs)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (4, expected)
    for i, r in enumerate(recs):
        n = len(r["input_ids"])
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (expected - n)
        assert batch["labels"][i, n:].eq(IGNORE_INDEX).all() and batch["input_ids"][i, n:].eq(0).all()


def per_token_losses(logits, labels):
    """(rows, T) -> list of per-record summed losses and token counts, from shifted labels."""
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                             ignore_index=IGNORE_INDEX, reduction="none")
    return loss.view(labels.shape[0], -1)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_padded_batches_give_the_same_loss_per_record(tiny_model_dir, alpaca_file, attn):
    dm = NLGDataModule(tiny_model_dir, task="file", path=alpaca_file, val_size=2, train_on_source=True)
    dm.setup("fit")
    recs = [dm.tokenized["train"][i] for i in range(5)]
    assert len({len(r["input_ids"]) for r in recs}) > 1  # really different lengths
    model = load_base_model(tiny_model_dir, "none", dtype="float32", attn_implementation=attn).eval()
    padded, packed = PadCollator(dm.tokenizer.pad_token_id)(recs), PackCollator()(recs)
    with torch.no_grad():
        out_pad = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], labels=padded["labels"])
        out_pack = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], labels=packed["labels"])
    # the batch loss (mean over supervised tokens) is the same ...
    torch.testing.assert_close(out_pack.loss, out_pad.loss, rtol=1e-5, atol=1e-5)
    # ... and so is every record's own loss
    pad_losses = per_token_losses(out_pad.logits, padded["labels"])
    pack_losses = per_token_losses(out_pack.logits, packed["labels"])[0]
    start = 0
    for i, r in enumerate(recs):
        n = len(r["input_ids"])
        mine = pack_losses[start:start + n - 1]  # the record's own n-1 predictions (shifted)
        torch.testing.assert_close(mine, pad_losses[i, :n - 1], rtol=1e-4, atol=1e-5)
        start += n


def test_packed_attention_never_crosses_a_record_boundary(tiny_model_dir):
    model = load_base_model(tiny_model_dir, "none", dtype="float32").eval()
    a = {"input_ids": [1, 50, 51, 52, 53], "labels": [IGNORE_INDEX] * 5}
    b = {"input_ids": [1, 60, 61, 62], "labels": [IGNORE_INDEX] * 4}
    a2 = {"input_ids": [1, 70, 71, 72, 73], "labels": [IGNORE_INDEX] * 5}  # same length, other tokens
    with torch.no_grad():
        first = model(**{k: v for k, v in PackCollator()([a, b]).items() if k != "labels"}).logits
        second = model(**{k: v for k, v in PackCollator()([a2, b]).items() if k != "labels"}).logits
        alone = model(input_ids=torch.tensor([b["input_ids"]])).logits
    assert not torch.allclose(first[0, :5], second[0, :5], atol=1e-3)  # record a's tokens changed ...
    torch.testing.assert_close(first[0, 5:], second[0, 5:], rtol=0, atol=1e-5)  # ... b's logits did not
    torch.testing.assert_close(first[0, 5:], alone[0], rtol=1e-5, atol=1e-5)  # b sees only itself
