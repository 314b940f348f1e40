"""The script that reruns every study (experiments/studies/reproduce.py, issue 11)."""

import json
import re
import shlex
from pathlib import Path

import pytest

from experiments.studies import reproduce

RESULTS_PAGE = Path(__file__).parents[2] / "docs" / "results.md"


def documented_commands() -> list[list[str]]:
    """Every study command of the page's bash blocks (``python -m experiments.studies.*`` but
    not the reproduce script itself), comments cut."""
    blocks = re.findall(r"```bash\n(.*?)```", RESULTS_PAGE.read_text(), flags=re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    study_lines = [
        line
        for line in lines
        if line.startswith("python -m experiments.studies.") and ".reproduce" not in line
    ]
    return [shlex.split(line) for line in study_lines]


def test_the_script_runs_exactly_the_commands_the_results_page_lists():
    planned = [c for s in reproduce.STUDIES for c in reproduce.commands(s, "docs/results")]
    assert planned == documented_commands()


def test_only_selects_by_number_or_name_in_page_order_and_rejects_unknown_names():
    assert [s.number for s in reproduce.select("long_context,1")] == [1, 5]
    assert [s.number for s in reproduce.select(None)] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match=r"--only: unknown studies \['mamba'\]"):
        reproduce.select("2,mamba")


def test_dry_run_prints_commands_and_pins_the_cpu_studies_to_the_cpu(capsys):
    assert reproduce.main(["--dry-run", "--only", "4,5", "--out", "results"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "# study 4: ~13 min on 2 CPU cores",
        "python -m experiments.studies.muon_vs_adamw --out results",
        "# study 5: ~4 min on 2 CPU cores",
        "JAX_PLATFORMS=cpu python -m experiments.studies.long_context --out results",
    ]


def test_a_failed_study_is_recorded_the_rest_still_run_and_the_exit_status_says_so(
    tmp_path, monkeypatch
):
    broken = reproduce.Study(0, "no_such_study", (("--out", reproduce.OUT),), cpu_minutes=0)
    monkeypatch.setattr(reproduce, "STUDIES", (broken, reproduce.STUDIES[0]))
    assert reproduce.main(["--out", str(tmp_path)]) == 1
    record = json.loads((tmp_path / "reproduce.json").read_text())
    status = {r["name"]: r["returncode"] for r in record["studies"]}
    assert status["no_such_study"] != 0 and status["kv_cache"] == 0
    assert record["studies"][1]["commands"] == [
        f"python -m experiments.studies.kv_cache --out {tmp_path}"
    ]
    assert record["studies"][1]["device"] == "cpu"
    assert record["backend"].startswith("cpu")
    kv = json.loads((tmp_path / "kv_cache.json").read_text())
    assert kv, "study 1 wrote no results"
