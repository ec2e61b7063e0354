"""The data record of a checkpoint and the resume check (`data/resume.py`); through the CLI:
tests/test_resume_data.py."""

import pytest

from lightning_qpeft.data.resume import FreshStartLoader, check_resume, differences, file_digest
from lightning_qpeft.data.samplers import RecordBatchSampler

RECORD = {"data.task": "file", "data.path": "/a/x.jsonl", "data.path content": {"bytes": 10, "sha256": "ab" * 32},
          "data.batch_size": 8, "processes (trainer.devices x trainer.num_nodes)": 1, "training records": 40}


def loader(fresh: bool = False) -> FreshStartLoader:
    sampler = RecordBatchSampler(batch_size=4, lengths=[5] * 40, seed=3)
    return FreshStartLoader(list(range(40)), batch_sampler=sampler, collate_fn=list, fresh_start=fresh)


def test_a_fresh_start_ignores_the_saved_position_once_and_a_plain_resume_continues():
    first = loader()
    it = iter(first)
    head = [next(it) for _ in range(3)]
    state = first.state_dict()
    plan = list(loader())
    continued = loader()
    continued.load_state_dict(state)
    assert head + list(continued) == plan
    fresh = loader(fresh=True)
    fresh.load_state_dict(state)
    assert list(fresh) == plan  # from the plan's first batch
    fresh.load_state_dict(state)  # only once: a later restore is honoured
    assert list(fresh) == plan[3:]


def test_differences_name_each_changed_key_and_compare_files_by_content():
    moved = {**RECORD, "data.path": "/b/y.jsonl"}
    assert differences(RECORD, moved) == []
    assert differences(RECORD, {**RECORD, "processes (trainer.devices x trainer.num_nodes)": 2}) == [
        "processes (trainer.devices x trainer.num_nodes): checkpoint 1 vs this run 2"]
    edited = {**RECORD, "data.path content": {"bytes": 11, "sha256": "cd" * 32}}
    assert differences(RECORD, edited) == [
        "data.path: checkpoint '/a/x.jsonl' (10 bytes, sha256 abababababab) vs this run '/a/x.jsonl' (11 bytes, "
        "sha256 cdcdcdcdcdcd)"]
    assert differences(RECORD, {k: v for k, v in RECORD.items() if k != "training records"}) == [
        "training records: checkpoint 40 vs this run None"]


def test_check_resume_refuses_warns_or_passes():
    same = {"data_record": RECORD}
    other = {"data_record": {**RECORD, "data.batch_size": 4}}
    assert check_resume(same, same, allow_changed=False) is False
    with pytest.raises(ValueError, match=r"data.batch_size: checkpoint 8 vs this run 4\n.*resume_changed_data=true"):
        check_resume(same, other, allow_changed=False)
    with pytest.warns(UserWarning, match=r"resume_changed_data=true: .*data.batch_size: checkpoint 8 vs this run 4"):
        assert check_resume(same, other, allow_changed=True) is True
    with pytest.warns(UserWarning, match="records no training data"):
        assert check_resume({}, other, allow_changed=False) is False


def test_file_digest(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    assert file_digest(str(tmp_path / "f")) == {
        "bytes": 3, "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}
