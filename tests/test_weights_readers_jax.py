"""The original BYOL JAX checkpoint (Acceptance 2, 6): a pickle ``{experiment_state, step, rng}`` whose state is
the experiment's own NamedTuple holding haiku trees. It must load through the restricted unpickler (inert stubs,
no code from the file runs) and match a functional forward written here over the raw haiku arrays."""

from __future__ import annotations

import json
import pickle
import sys
import types
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medssl.cli import main as cli_main
from medssl.errors import MedsslError
from medssl.weights import build_from_checkpoint, build_heads, load_checkpoint
from medssl.weights.safe_unpickle import StubObject, safe_load_pickle

TOL = 1e-5
ENC = "res_net50"
UNITS = (3, 4, 6, 3)


def haiku_trees(base: int = 8, seed: int = 0) -> tuple[dict, dict]:
    """(params, state) of a narrow BYOL ResNet-50 + projector/predictor in haiku's layout."""
    rng = np.random.default_rng(seed)
    params: dict[str, dict[str, np.ndarray]] = {}
    state: dict[str, dict[str, np.ndarray]] = {}

    def conv(name, kh, cin, cout):
        params[name] = {"w": (rng.standard_normal((kh, kh, cin, cout)) * (2 / (kh * kh * cin)) ** 0.5)
                        .astype(np.float32)}

    def bn(name, c, shape=(1, 1, 1)):
        params[name] = {"scale": (1 + 0.2 * rng.standard_normal((*shape, c))).astype(np.float32),
                        "offset": (0.1 * rng.standard_normal((*shape, c))).astype(np.float32)}
        for ema, value in (("mean_ema", 0.1 * rng.standard_normal((*shape, c))),
                           ("var_ema", 0.5 + rng.random((*shape, c)))):
            state[f"{name}/~/{ema}"] = {"average": value.astype(np.float32), "counter": np.array(5, np.int32),
                                        "hidden": value.astype(np.float32)}

    conv(f"{ENC}/~/initial_conv", 7, 3, base)
    bn(f"{ENC}/~/initial_batchnorm", base)
    cin = base
    for g, n in enumerate(UNITS):
        width = base * 2 ** g
        for b in range(n):
            p = f"{ENC}/~/block_group_{g}/~/block_{b}/~"
            for i, (kh, ci, co) in enumerate([(1, cin, width), (3, width, width), (1, width, 4 * width)]):
                conv(f"{p}/conv_{i}", kh, ci, co)
                bn(f"{p}/batchnorm_{i}", co)
            if b == 0:
                conv(f"{p}/shortcut_conv", 1, cin, 4 * width)
                bn(f"{p}/shortcut_batchnorm", 4 * width)
            cin = 4 * width
    for head, dims in (("projector", (cin, 32, 16)), ("predictor", (16, 32, 16))):
        params[f"{head}/~/linear"] = {"w": (0.1 * rng.standard_normal(dims[:2])).astype(np.float32),
                                      "b": (0.1 * rng.standard_normal(dims[1])).astype(np.float32)}
        bn(f"{head}/~/batch_norm", dims[1], shape=(1,))
        params[f"{head}/~/linear_1"] = {"w": (0.1 * rng.standard_normal(dims[1:])).astype(np.float32)}
    params["classifier"] = {"w": np.zeros((cin, 10), np.float32), "b": np.zeros(10, np.float32)}
    return params, state


def reference_byol(params: dict, state: dict, x: torch.Tensor) -> torch.Tensor:
    """ResNet-50 forward over the haiku arrays (HWIO kernels, (1,1,1,C) BN params), PyTorch padding."""
    def conv(t, name, stride=1, padding=0):
        return F.conv2d(t, torch.from_numpy(params[name]["w"]).permute(3, 2, 0, 1), stride=stride, padding=padding)

    def bn(t, name):
        flat = lambda a: torch.from_numpy(a).reshape(-1)  # noqa: E731
        return F.batch_norm(t, flat(state[f"{name}/~/mean_ema"]["average"]),
                            flat(state[f"{name}/~/var_ema"]["average"]), flat(params[name]["scale"]),
                            flat(params[name]["offset"]), False, 0.0, 1e-5)

    x = F.relu(bn(conv(x, f"{ENC}/~/initial_conv", 2, 3), f"{ENC}/~/initial_batchnorm"))
    x = F.max_pool2d(x, 3, 2, 1)
    for g, n in enumerate(UNITS):
        for b in range(n):
            p = f"{ENC}/~/block_group_{g}/~/block_{b}/~"
            stride = 2 if g > 0 and b == 0 else 1
            out = F.relu(bn(conv(x, f"{p}/conv_0"), f"{p}/batchnorm_0"))
            out = F.relu(bn(conv(out, f"{p}/conv_1", stride, 1), f"{p}/batchnorm_1"))
            out = bn(conv(out, f"{p}/conv_2"), f"{p}/batchnorm_2")
            short = bn(conv(x, f"{p}/shortcut_conv", stride), f"{p}/shortcut_batchnorm") if b == 0 else x
            x = F.relu(out + short)
    return x.mean(dim=(2, 3))


def reference_mlp(params: dict, state: dict, head: str, z: torch.Tensor) -> torch.Tensor:
    """haiku MLP: linear -> batch_norm -> relu -> linear_1 (dense kernels (in, out))."""
    lin = params[f"{head}/~/linear"]
    z = z @ torch.from_numpy(lin["w"]) + torch.from_numpy(lin["b"])
    name = f"{head}/~/batch_norm"
    z = F.batch_norm(z, torch.from_numpy(state[f"{name}/~/mean_ema"]["average"]).reshape(-1),
                     torch.from_numpy(state[f"{name}/~/var_ema"]["average"]).reshape(-1),
                     torch.from_numpy(params[name]["scale"]).reshape(-1),
                     torch.from_numpy(params[name]["offset"]).reshape(-1), False, 0.0, 1e-5)
    return F.relu(z) @ torch.from_numpy(params[f"{head}/~/linear_1"]["w"])


class _FakeModules:
    """Temporarily provide ``byol.byol_experiment`` and ``haiku._src.data_structures`` so that the pickle refers
    to the experiment's own classes exactly as the published file does; they are removed before loading."""

    def __enter__(self):
        exp = types.ModuleType("byol.byol_experiment")
        hk = types.ModuleType("haiku._src.data_structures")

        class _ByolExperimentState(NamedTuple):
            online_params: object
            target_params: object
            online_state: object
            target_state: object
            opt_state: object

        class FlatMapping(Mapping):
            def __init__(self, data):
                self._data = dict(data)

            def __getitem__(self, k):
                return self._data[k]

            def __iter__(self):
                return iter(self._data)

            def __len__(self):
                return len(self._data)

            def __reduce__(self):
                return (FlatMapping, (self._data,))

        for cls, mod in ((_ByolExperimentState, exp), (FlatMapping, hk)):
            cls.__module__, cls.__qualname__ = mod.__name__, cls.__name__
            setattr(mod, cls.__name__, cls)
        self.names = ["byol", "byol.byol_experiment", "haiku", "haiku._src", "haiku._src.data_structures"]
        for name in self.names:
            sys.modules[name] = {"byol.byol_experiment": exp, "haiku._src.data_structures": hk}.get(
                name, types.ModuleType(name))
        self.State, self.FlatMapping = _ByolExperimentState, FlatMapping
        return self

    def __exit__(self, *exc):
        for name in self.names:
            sys.modules.pop(name, None)


def write_byol_pickle(path, params, state) -> None:
    target_params, target_state = haiku_trees(seed=7)
    with _FakeModules() as fake:
        es = fake.State(online_params=fake.FlatMapping(params), target_params=fake.FlatMapping(target_params),
                        online_state=fake.FlatMapping(state), target_state=fake.FlatMapping(target_state),
                        opt_state=({"trace": fake.FlatMapping(target_params)},))
        data = pickle.dumps({"experiment_state": es, "step": np.int64(1000),
                             "rng": np.array([1, 2], np.uint32)}, protocol=4)
    path.write_bytes(data)


@pytest.mark.parametrize("suffix", ["", "_1"])
def test_byol_jax_pickle(tmp_path, capsys, suffix):
    params, state = haiku_trees()
    path = tmp_path / "pretrain_res50x1.pkl"
    # some exports name the stem modules initial_conv_1 / initial_batchnorm_1 (statistics keep the plain name)
    stored = {k.replace("initial_conv", f"initial_conv{suffix}").replace("initial_batchnorm",
                                                                         f"initial_batchnorm{suffix}"): v
              for k, v in params.items()}
    write_byol_pickle(path, stored, state)
    capsys.readouterr()
    assert cli_main(["weights", "inspect", str(path), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["format"] == "byol_jax" and record["arch"] == "resnet50"
    assert record["missing"] == [] and record["unexpected"] == [] and "classifier" in record["skipped"]
    assert record["input_normalization"]["mean"] == [0.485, 0.456, 0.406]
    model, loaded = build_from_checkpoint(path)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), reference_byol(params, state, x), atol=TOL, rtol=TOL)
        heads = build_heads(loaded)
        z = torch.randn(4, 256, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(heads["projector"].eval()(z), reference_mlp(params, state, "projector", z),
                                   atol=TOL, rtol=TOL)
    assert heads["projector"].config["last_bias"] is False


def test_restricted_unpickler_runs_no_code(tmp_path):
    marker = tmp_path / "owned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"experiment_state": Evil()}))
    obj, stubbed = safe_load_pickle(path)
    assert not marker.exists()
    assert "posix.system" in stubbed or "os.system" in stubbed
    assert isinstance(obj["experiment_state"], StubObject)
    with pytest.raises(MedsslError, match="evil.pkl.*no haiku parameter tree"):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_pickle(tmp_path):
    params, state = haiku_trees(base=4)
    full = tmp_path / "full.pkl"
    write_byol_pickle(full, params, state)
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(MedsslError, match=r"cut\.pkl: truncated pickle"):
        load_checkpoint(cut)
