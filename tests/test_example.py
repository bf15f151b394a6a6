"""examples/gsm8k_distill.py --tiny: the GSM8K example runs end to end offline on CPU (toy lab stand-ins), writes the
callback's records for `current` and both self-distillation contexts, and an offline wandb run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import opd_callback as oc

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "gsm8k_distill.py"

pytestmark = pytest.mark.filterwarnings("ignore")


def test_gsm8k_example_tiny_runs_offline(tmp_path):
    out = tmp_path / "run"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(out),
    }
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--output-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,  # a hang guard only: never a race with a loaded machine
    )
    log = proc.stdout[-4000:] + "\n" + proc.stderr[-4000:]
    assert proc.returncode == 0, log
    assert "cost per diagnostic: at most" in proc.stdout, log

    rec = out / "opd_alignment"
    steps = sorted(p.name for p in rec.glob("step-*"))
    assert steps == ["step-0000002", "step-0000004"], (steps, log)  # every 2 steps, 4 steps
    rep = oc.AlignmentReport.load(rec)
    assert set(rep.records["config"]) == {"current", "self+answer", "self+solution"}
    assert sorted(set(rep.records["step"])) == [2, 4]
    assert len(rep.rollouts) == 2 * 4 * 2  # diagnostics x probe prompts x num_rollouts

    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, log
    assert list(runs[0].glob("run-*.wandb")), "the offline run has no transaction log"


def test_gsm8k_row_and_reward_columns():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gsm8k_distill as ex
    finally:
        sys.path.remove(str(SCRIPT.parent))
    row = ex.gsm8k_row(
        {"question": "How many? ", "answer": "2*3=<<2*3=6>>6 apples.\nThen 6+1,000=<<6+1000=1006>>1006\n#### 1,006"}
    )
    assert row["answer"] == "1006"
    assert row["solution"] == "2*3=6 apples.\nThen 6+1,000=1006"
    assert row["prompt"][0]["role"] == "user" and row["prompt"][0]["content"].startswith("How many?\n")
    assert "\\boxed{}" in row["prompt"][0]["content"]
    # the privileged contexts only use columns the rows have
    for tpl in (ex.ANSWER_CONTEXT, ex.SOLUTION_CONTEXT):
        assert set(oc.ContextTeacher(tpl).fields) <= set(row)
