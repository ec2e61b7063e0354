"""QLoRA's MMLU prompt files built from the repository's CSVs (data/mmlu): md5-checked, kept when up to date,
rebuilt when stale, built on demand for `mmlu.path`, refused when the CSVs differ; equal byte for byte to QLoRA's
copies in ../shared/data/mmlu where that is present."""

import hashlib
import re
import shutil
from pathlib import Path

import pytest

from lightning_qpeft.core.data_error import DataError
from lightning_qpeft.evaluation.mmlu_files import PROMPT_FILES, build_on_demand, fetch_mmlu
from lightning_qpeft.evaluation.mmlu_sources import load_items
from lightning_qpeft.fetch import ASSETS
from tests.conftest import SHARED_DATA

CSVS = Path(__file__).resolve().parents[2] / "data" / "mmlu"
QLORA = SHARED_DATA / "mmlu"


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The four files, built once from the repository's CSVs into a temporary folder."""
    dest = tmp_path_factory.mktemp("mmlu")
    assert fetch_mmlu(dest, force=False, source=str(CSVS)) == dest
    return dest


def copy_csvs(dest: Path, splits=("dev", "val")) -> Path:
    for split in splits:
        shutil.copytree(CSVS / split, dest / split)
    return dest


def test_fetch_builds_the_four_files_with_qlora_md5s(built):
    assert sorted(p.name for p in built.glob("*.json")) == sorted(PROMPT_FILES)
    assert {p.name: md5(p) for p in built.glob("*.json")} == {n: f.md5 for n, f in PROMPT_FILES.items()}
    assert ASSETS["mmlu"].default_dest == "data/mmlu" and ASSETS["mmlu"].licence == "MIT"


def test_five_shot_files_hold_the_llama2_k(built):
    # QLoRA's k histograms (the LLaMA-2 tokenizer at 2048 tokens), read back from the built prompts
    for split, hist in (("val", {5: 1475, 4: 19, 3: 31, 2: 6}), ("test", {5: 13520, 4: 194, 3: 261, 2: 67})):
        items = load_items("json", None, str(built / f"five_shot_mmlu_{split}.json"))
        assert {k: sum(it.k == k for it in items) for k in hist} == hist
    assert {it.k for it in load_items("json", None, str(built / "zero_shot_mmlu_test.json"))} == {0}


def test_a_second_fetch_keeps_good_files_and_rebuilds_a_stale_one(tmp_path, capsys):
    dest = copy_csvs(tmp_path / "mmlu", ("dev", "val", "test"))
    fetch_mmlu(dest, force=False, source=None)  # the CSVs in dest itself, as data/mmlu holds them
    capsys.readouterr()
    stale = dest / "five_shot_mmlu_val.json"
    stale.write_bytes(stale.read_bytes()[:-100])
    kept = {n: (dest / n).stat().st_mtime_ns for n in PROMPT_FILES if n != stale.name}
    fetch_mmlu(dest, force=False, source=None)
    assert "built five_shot_mmlu_val.json in" in capsys.readouterr().out
    assert md5(stale) == PROMPT_FILES[stale.name].md5
    assert {n: (dest / n).stat().st_mtime_ns for n in kept} == kept
    fetch_mmlu(dest, force=False, source=None)
    assert "all four files already there" in capsys.readouterr().out


def test_fetch_without_csvs_says_where_they_are(tmp_path):
    with pytest.raises(FileNotFoundError, match="fetch mmlu: .* has no dev/, val/ and test/ .* data/mmlu"):
        fetch_mmlu(tmp_path, force=False, source=None)


def test_csvs_that_are_not_mmlus_are_refused_and_nothing_is_written(tmp_path):
    root = copy_csvs(tmp_path / "mmlu")
    law = root / "val" / "professional_law_val.csv"
    law.write_bytes(law.read_bytes().replace(b"defendant", b"accused", 1))
    with pytest.raises(DataError, match=r"five_shot_mmlu_val.json built from .* has md5 \w+, not QLoRA's "
                                        r"20b3a85a38459e7dbd19cb5c78b9c0e5.*git checkout data/mmlu"):
        build_on_demand(root / "five_shot_mmlu_val.json")
    assert list(root.glob("*.json")) == [] and list(root.glob(".*")) == []


def test_mmlu_path_builds_a_missing_file_from_the_csvs_beside_it(tmp_path):
    root = copy_csvs(tmp_path / "mmlu")
    items = load_items("json", None, str(root / "five_shot_mmlu_val.json"))
    assert len(items) == 1531 and md5(root / "five_shot_mmlu_val.json") == PROMPT_FILES["five_shot_mmlu_val.json"].md5
    assert not build_on_demand(root / "five_shot_mmlu_val.json")  # there now: read, not built again
    assert not build_on_demand(root / "my_questions.json")  # not one of QLoRA's names: left to the reader


def test_a_missing_file_without_csvs_names_the_way_out(tmp_path):
    with pytest.raises(DataError, match=r"mmlu.path: no such file: .*five_shot_mmlu_test.json', and no MMLU CSVs "
                                        r"beside it .* use mmlu.path data/mmlu/five_shot_mmlu_test.json"):
        load_items("json", None, str(tmp_path / "five_shot_mmlu_test.json"))


@pytest.mark.skipif(not QLORA.is_dir(), reason="no ../shared/data/mmlu (QLoRA's files to compare with)")
def test_built_files_equal_qloras_byte_for_byte(built):
    sources = (SHARED_DATA / "SOURCES.mmlu.md").read_text(encoding="utf-8")
    recorded = dict(re.findall(r"^\| mmlu/(\w+\.json) \| [\d,]+ \| [\d,]+ \| ([0-9a-f]{32}) \|", sources, flags=re.M))
    assert recorded == {n: f.md5 for n, f in PROMPT_FILES.items()}
    for name in PROMPT_FILES:
        assert (built / name).read_bytes() == (QLORA / name).read_bytes(), name
