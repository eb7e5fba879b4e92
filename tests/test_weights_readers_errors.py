"""Bad input and the download registry (Acceptance 6, Build 3): malformed, truncated, unknown and untrusted
files give one MedsslError line naming the file and the reason; fetch() verifies SHA-256 and never touches the
network in tests (file:// URLs and a patched urlopen)."""

from __future__ import annotations

import hashlib
import pickle
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from medssl.cli import main as cli_main
from medssl.errors import MedsslError, OfflineError, UntrustedPickleError
from medssl.weights import load_checkpoint
from medssl.weights.registry import WeightsEntry, fetch, registry


class Custom:
    """A class that weights_only=True refuses (stands for an experiment's own config object)."""

    def __init__(self):
        self.lr = 0.1


def _tiny_state() -> dict[str, torch.Tensor]:
    from tests.test_weights_readers_resnet import torchvision_state

    return torchvision_state(bottleneck=False, layers=(2, 2, 2, 2), base=4)


def _cli_error(path, capsys, *extra: str) -> str:
    """Run inspect on a bad file: exit code 2, exactly one stderr line, no traceback."""
    capsys.readouterr()
    assert cli_main(["weights", "inspect", str(path), *extra]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("medssl: error: ") and str(path) in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""
    return lines[0]


def test_truncated_torch_file(tmp_path, capsys):
    good = tmp_path / "good.pth"
    torch.save(_tiny_state(), good)
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "truncated or corrupt" in _cli_error(bad, capsys)


def test_truncated_npz_and_safetensors(tmp_path, capsys):
    npz = tmp_path / "cut.npz"
    full = tmp_path / "full.npz"
    np.savez(full, **{"resnet/root_block/standardized_conv2d/kernel": np.zeros((7, 7, 3, 8), np.float32)})
    npz.write_bytes(full.read_bytes()[:-40])
    assert "truncated or corrupt" in _cli_error(npz, capsys)
    from safetensors.torch import save_file

    st = tmp_path / "model.safetensors"
    save_file({"stem.conv.weight": torch.zeros(8, 3, 7, 7)}, str(st))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(st.read_bytes()[:-100])
    assert "truncated or corrupt safetensors" in _cli_error(cut, capsys)


@pytest.mark.parametrize("content,reason", [
    (b"", "empty file"),
    (b"hello, this is not a checkpoint at all", "unknown file type"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "unknown file type"),
])
def test_unknown_bytes(tmp_path, capsys, content, reason):
    path = tmp_path / "weights.bin"
    path.write_bytes(content)
    assert reason in _cli_error(path, capsys)


def test_unknown_layout_names_what_was_seen(tmp_path, capsys):
    path = tmp_path / "other.pth"
    torch.save({"encoder.blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, path)
    line = _cli_error(path, capsys)
    assert "unknown checkpoint layout" in line and "encoder.blocks.0.attn.qkv.weight" in line


def test_missing_file(tmp_path, capsys):
    assert "no such file" in _cli_error(tmp_path / "absent.pth", capsys)


def test_debug_shows_traceback(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    with pytest.raises(MedsslError, match="empty file"):
        cli_main(["--debug", "weights", "inspect", str(path)])


def test_untrusted_pickle_refused_then_loaded_with_trust(tmp_path, capsys):
    path = tmp_path / "with_config.pth"
    torch.save({"state_dict": _tiny_state(), "config": Custom()}, path)
    with pytest.raises(UntrustedPickleError, match=r"Custom.*--trust"):
        load_checkpoint(path)
    assert "--trust" in _cli_error(path, capsys)
    loaded = load_checkpoint(path, trust=True)
    assert loaded.format == "simclr_v1" and loaded.missing == []


def test_legacy_torch_serialization_detected(tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save(_tiny_state(), path, _use_new_zipfile_serialization=False)
    loaded = load_checkpoint(path)
    assert (loaded.file_kind, loaded.format, loaded.arch) == ("torch", "torchvision", "resnet18")


def test_plain_pickle_without_byol_layout(tmp_path, capsys):
    path = tmp_path / "arrays.pkl"
    path.write_bytes(pickle.dumps({"a": np.zeros(3)}))
    assert "unknown checkpoint layout" in _cli_error(path, capsys)


def test_forced_wrong_format(tmp_path, capsys):
    path = tmp_path / "tv.pth"
    torch.save(_tiny_state(), path)
    assert "does not match the simclr_v2 layout" in _cli_error(path, capsys, "--format", "simclr_v2")


# ---------------------------------------------------------------- registry
def _entry(tmp_path, payload: bytes, sha256: str | None, prefix: str | None = None) -> WeightsEntry:
    src = tmp_path / "src" / "official.pth"
    src.parent.mkdir(exist_ok=True)
    src.write_bytes(payload)
    return WeightsEntry(name="t", url=src.as_uri(), filename="official.pth", format="torchvision",
                        arch="resnet18", sha256=sha256, sha256_prefix=prefix)


def test_registry_entries_are_complete():
    entries = registry()
    assert {"torchvision_resnet50_v1", "bit_m_r50x1", "swav_800ep", "byol_jax_res50x1"} <= set(entries)
    for e in entries.values():
        assert e.url.startswith("https://") and e.filename and e.format
        assert e.sha256 is None or len(e.sha256) == 64
    assert entries["torchvision_resnet50_v1"].sha256_prefix == "0676ba61"


def test_fetch_file_url_verifies_checksum(tmp_path, monkeypatch):
    payload = b"weights" * 100
    digest = hashlib.sha256(payload).hexdigest()
    cache = tmp_path / "cache"
    monkeypatch.setenv("MEDSSL_CACHE", str(cache))
    path = fetch("t", entry=_entry(tmp_path, payload, digest, digest[:8]))
    assert path == cache / "official.pth" and path.read_bytes() == payload
    # second call: served from the cache, no network
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("network used"))
    assert fetch("t", entry=_entry(tmp_path, payload, digest)) == path


def test_fetch_checksum_mismatch_keeps_nothing(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(MedsslError, match="failed verification"):
        fetch("t", directory=cache, entry=_entry(tmp_path, b"tampered", "0" * 64))
    assert not any(cache.iterdir())
    with pytest.raises(MedsslError, match="does not start with"):
        fetch("t", directory=cache, entry=_entry(tmp_path, b"tampered", None, "deadbeef"))


def test_fetch_offline_says_what_to_put_where(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(OfflineError) as info:
        fetch("bit_m_r50x1", directory=tmp_path)
    msg = str(info.value)
    assert "BiT-M-R50x1.npz" in msg and str(tmp_path / "BiT-M-R50x1.npz") in msg
    assert "https://storage.googleapis.com/bit_models/BiT-M-R50x1.npz" in msg
    monkeypatch.setenv("MEDSSL_OFFLINE", "1")
    with pytest.raises(OfflineError, match="offline"):
        fetch("swav_800ep", directory=tmp_path)


def test_missing_keys_reported_and_refused_by_build(tmp_path, capsys):
    from medssl.weights import build_from_checkpoint

    state = _tiny_state()
    del state["layer3.1.conv2.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    loaded = load_checkpoint(path)
    assert loaded.missing == ["layer3.1.conv2.weight"] and loaded.unexpected == []
    with pytest.raises(MedsslError, match=r"partial\.pth: checkpoint lacks weights.*layer3\.1\.conv2\.weight"):
        build_from_checkpoint(loaded)
    model, _ = build_from_checkpoint(loaded, allow_missing=True)
    assert torch.equal(model.state_dict()["layer3.1.bn2.running_var"], state["layer3.1.bn2.running_var"])
    capsys.readouterr()
    assert cli_main(["weights", "inspect", str(path)]) == 0
    summary = capsys.readouterr().out
    assert "format:      torchvision" in summary and "missing:     1: layer3.1.conv2.weight" in summary
