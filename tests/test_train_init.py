"""``segcli train --init BUNDLE`` (issue 34): fine-tuning starts from the bundle's own weights and keeps
what they depend on (method, networks, size, normalisation)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from segcli.bundle import load_bundle
from segcli.errors import UsageError
from segcli.train import train

FIX = Path(__file__).parent / "fixtures"
TINY = {"features": 4, "batch_size": 4, "quiet": True, "threads": 1, "val_full_res": False}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("init") / "base"
    train(FIX / "shared", out, method="direct", epochs=1, size=32, **TINY)
    return out


def test_init_starts_from_the_bundle_weights_and_keeps_its_design(base, tmp_path):
    # lr 0: the fine-tuned weights must be the bundle's exactly, which a random start could never give
    train(FIX / "shared", tmp_path / "ft", init=str(base), epochs=1, lr=0.0, method="stts", size=64, **TINY)
    a, b = load_bundle(base), load_bundle(tmp_path / "ft")
    assert (b.method, b.input_size, b.normalization) == (a.method, a.input_size, a.normalization)
    assert b.network("coarse").config == a.network("coarse").config
    wa, wb = load_file(str(base / "coarse.safetensors")), load_file(str(tmp_path / "ft" / "coarse.safetensors"))
    params = [k for k in wa if "running_" not in k and "num_batches" not in k]  # batch-norm statistics do move
    assert wa.keys() == wb.keys() and len(params) > 4 and all(torch.equal(wa[k], wb[k]) for k in params)
    assert b.training["config"]["init"] == str(base)
    train(FIX / "shared", tmp_path / "ft2", init=str(base), epochs=1, lr=1e-2, **TINY)
    wc = load_file(str(tmp_path / "ft2" / "coarse.safetensors"))
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)  # and it does train


def test_init_refuses_what_cannot_be_fine_tuned(base, tmp_path):
    with pytest.raises(UsageError, match=r"--init .* has 2 classes .* the dataset has 3"):
        train(FIX / "nnunet", tmp_path / "x", init=str(base), epochs=1, channels="rgb", **TINY)
    with pytest.raises(UsageError, match="--init: .*no bundle at"):
        train(FIX / "shared", tmp_path / "y", init=str(tmp_path / "nope"), epochs=1, **TINY)
