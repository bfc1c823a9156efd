"""Exports made before the restructure load and compute the same logits with today's model code, both through
effconv and as an export on a machine without effconv (plain transformers, trust_remote_code)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from effconv.io.export import export_model
from helpers_no_effconv import WITHOUT_EFFCONV  # noqa: E402

GOLDEN = Path(__file__).parent / "data" / "pre-restructure-export"

NO_EFFCONV = WITHOUT_EFFCONV + """
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
ids = torch.load(sys.argv[2], weights_only=True)["ids"]
with torch.no_grad():
    torch.save(model(ids, use_cache=False).logits, sys.argv[3])
"""


@pytest.mark.parametrize("layout", ["hybrid", "linear"])
def test_pre_restructure_export_gives_the_same_logits(layout, tmp_path):
    expected = torch.load(GOLDEN / layout / "expected.pt", weights_only=True)
    model = AutoModelForCausalLM.from_pretrained(GOLDEN / layout)  # effconv imported: the registered class
    with torch.no_grad():
        torch.testing.assert_close(model(expected["ids"], use_cache=False).logits, expected["logits"],
                                   rtol=1e-5, atol=1e-5)
    # re-exported today, loaded as remote code without effconv: still the same logits
    export_model(model, None, tmp_path / "export")
    subprocess.run([sys.executable, "-c", NO_EFFCONV, str(tmp_path / "export"), str(GOLDEN / layout / "expected.pt"),
                    str(tmp_path / "logits.pt")], check=True, capture_output=True, cwd=tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt", weights_only=True), expected["logits"],
                               rtol=1e-5, atol=1e-5)
    shutil.rmtree(tmp_path / "export")
