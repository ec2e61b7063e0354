"""RecordBatchSampler: length grouping, token budgets, one shard per rank, resumable through torchdata and
survives Lightning's distributed-sampler injection."""

import numpy as np
import pytest
from torch.utils.data import BatchSampler, DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_qpeft.data.samplers import RecordBatchSampler

RNG = np.random.default_rng(0)
LENGTHS = RNG.integers(5, 300, size=1000)


def padding(batches, lengths=LENGTHS):
    slots = sum(len(b) * lengths[b].max() for b in batches)
    return 1 - sum(lengths[i] for b in batches for i in b) / slots


def test_every_record_once_per_epoch_and_order_is_a_function_of_seed_and_epoch():
    s = RecordBatchSampler(batch_size=16, lengths=LENGTHS, group_by_length=True, seed=3)
    flat = sorted(i for b in s.plan(0) for i in b)
    assert flat == list(range(len(LENGTHS)))
    assert s.plan(0) == RecordBatchSampler(batch_size=16, lengths=LENGTHS, group_by_length=True, seed=3).plan(0)
    assert s.plan(0) != s.plan(1)
    s.set_epoch(1)
    assert list(s) == s.plan(1) and len(s) == 63


def test_group_by_length_cuts_padding_and_does_not_put_the_longest_first():
    random_order = RecordBatchSampler(batch_size=16, lengths=LENGTHS, seed=0).plan(0)
    grouped = RecordBatchSampler(batch_size=16, lengths=LENGTHS, group_by_length=True, seed=0).plan(0)
    assert padding(grouped) < 0.1 < 0.3 < padding(random_order)
    longest = int(np.argmax(LENGTHS))
    firsts = [longest in RecordBatchSampler(batch_size=16, lengths=LENGTHS, group_by_length=True, seed=s).plan(0)[0]
              for s in range(8)]
    assert not all(firsts)  # transformers' sampler would put it first every time
    first_steps = [LENGTHS[b].mean() for b in grouped[:10]]
    assert np.mean(first_steps) < LENGTHS.max() * 0.9  # the first steps are not the longest records


@pytest.mark.parametrize("packed", [False, True])
def test_token_budget_fills_batches_without_exceeding_it(packed):
    s = RecordBatchSampler(batch_size=1, lengths=LENGTHS, max_tokens=1024, packed=packed, group_by_length=True)
    plan = s.plan(0)
    cost = [LENGTHS[b].sum() if packed else LENGTHS[b].max() * len(b) for b in plan]
    assert max(cost) <= 1024 and np.mean(cost) > 0.8 * 1024
    assert sorted(i for b in plan for i in b) == list(range(len(LENGTHS)))


@pytest.mark.parametrize("group", [False, True])
@pytest.mark.parametrize("world", [2, 4])
def test_n_ranks_of_b_records_take_the_records_of_one_process_of_n_times_b(world, group):
    # what lets a DDP run with micro-batch B train as one GPU with N x B (the loss is the global token mean)
    one = RecordBatchSampler(batch_size=8 * world, lengths=LENGTHS, group_by_length=group, seed=7).plan(0)
    ranks = [RecordBatchSampler(batch_size=8, lengths=LENGTHS, group_by_length=group, seed=7, num_replicas=world,
                                rank=r).plan(0) for r in range(world)]
    assert len(one) == len(ranks[0])
    full = [k for k in range(len(one)) if len(one[k]) == 8 * world]  # the epoch's partial step is padded
    assert len(full) == len(one) - 1
    for k in full:
        assert sorted(i for p in ranks for i in p[k]) == sorted(one[k]), k
    other = RecordBatchSampler(batch_size=8 * world, lengths=LENGTHS, group_by_length=group, seed=8).plan(0)
    assert sorted(other[0]) != sorted(one[0])


def test_ranks_split_each_step_and_run_the_same_number_of_steps():
    lengths = LENGTHS[:997]  # not a multiple of world x batch
    ranks = [RecordBatchSampler(batch_size=8, lengths=lengths, group_by_length=True, num_replicas=3, rank=r)
             for r in range(3)]
    plans = [r.plan(0) for r in ranks]
    assert len({len(p) for p in plans}) == 1
    whole = ranks[0].global_plan(0)
    for k in range(len(plans[0])):
        assert [p[k] for p in plans] == whole[3 * k:3 * k + 3]
    seen = {i for p in plans for b in p for i in b}
    assert seen == set(range(len(lengths)))


def test_stateful_dataloader_resumes_with_the_next_batch():
    def loader():
        s = RecordBatchSampler(batch_size=8, lengths=LENGTHS[:200], group_by_length=True, seed=5)
        s.set_epoch(2)
        return StatefulDataLoader(list(range(200)), batch_sampler=s, collate_fn=list)

    unbroken = [b for b in loader()]
    first = loader()
    it = iter(first)
    head = [next(it) for _ in range(7)]
    state = first.state_dict()
    resumed = loader()
    resumed.batch_sampler.set_epoch(0)  # the epoch comes back from the state, not from this
    resumed.load_state_dict(state)
    assert head + list(resumed) == unbroken


def test_lightning_ddp_injection_keeps_the_sampler_and_its_rank():
    from lightning.pytorch import Trainer
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.fabric.utilities.data import _replace_dunder_methods

    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)  # not launched
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        ours = RecordBatchSampler(None, 8, lengths=LENGTHS[:100], group_by_length=True, num_replicas=2, rank=0)
        loader = StatefulDataLoader(list(range(100)), batch_sampler=ours, collate_fn=list)
    prepared = trainer._data_connector._prepare_dataloader(loader, shuffle=True, mode=RunningStage.TRAINING)
    sampler = prepared.batch_sampler
    assert isinstance(sampler, RecordBatchSampler) and (sampler.num_replicas, sampler.rank) == (2, 0)
    assert sampler.plan(0) == ours.plan(0)
    with pytest.raises(ValueError, match="disagrees"):
        RecordBatchSampler(prepared.batch_sampler.sampler, 8, lengths=LENGTHS[:100], num_replicas=2, rank=1)


def test_lightning_resume_continues_with_the_same_length_grouped_packed_batches(tiny_model_dir, alpaca_file, tmp_path):
    import peft
    from lightning.pytorch import Callback
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_qpeft.data.datamodule import NLGDataModule
    from lightning_qpeft.model.module import QPeftModule
    from tests.conftest import cpu_trainer

    class Seen(Callback):
        def __init__(self):
            self.batches = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.batches.append(batch["input_ids"].tolist())

    def run(max_steps, ckpt_path=None):
        module = QPeftModule(tiny_model_dir, quantization="none", compute_dtype="float32", dtype="float32",
                             adapter=peft.LoraConfig(r=4, target_modules="all-linear"))
        data = NLGDataModule(tiny_model_dir, task="file", path=alpaca_file, val_size=2, batch_size=3,
                             group_by_length=True, packing=True)
        seen = Seen()
        ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
        cpu_trainer(max_steps=max_steps, limit_val_batches=0, enable_checkpointing=True,
                    callbacks=[seen, ckpt]).fit(module, data, ckpt_path=ckpt_path)
        return seen.batches

    unbroken = run(7)  # 5 batches an epoch: the run crosses into the second epoch
    resumed = run(7, ckpt_path=str(tmp_path / "epoch=0-step=2.ckpt"))
    assert resumed == unbroken[2:]
    assert len(unbroken) == 7  # 5 batches an epoch: the resumed run also crossed into epoch 1 (its own order)
