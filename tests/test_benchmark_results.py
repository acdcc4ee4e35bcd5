"""Recorded benchmark results name files, never the folders of the machine that measured them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.measure import without_local_paths

RESULTS = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "results").glob("*.json"))


def test_local_folders_are_replaced_and_urls_and_relative_paths_kept():
    assert without_local_paths({"w": ["/scratch/crm/CRM.pth", 3]}) == {"w": ["<local>/CRM.pth", 3]}
    text = "not in /root/.cache/hub (https://huggingface.co/Zhengyi/CRM), see pipeline/samples/a.png"
    expected = "not in <local>/hub (https://huggingface.co/Zhengyi/CRM), see pipeline/samples/a.png"
    assert without_local_paths(text) == expected


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.name)
def test_recorded_results_carry_no_local_folder(path):
    data = json.loads(path.read_text())
    assert without_local_paths(data) == data
