"""Two real processes (``torchrun --nproc_per_node 2``, gloo on CPU) running a DistillationTrainer with the callback:
probe prompts split across ranks, records gathered and saved once, identical to a 1-process run; the early-stopping
decision is taken on every rank at the same step (no hang)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _dist_worker import build_model, build_tokenizer, run_worker

import opd_callback as oc

pytestmark = pytest.mark.filterwarnings("ignore")

HERE = Path(__file__).parent


def _sorted(df, keys):
    return df.sort_values(keys, kind="stable").reset_index(drop=True)


def test_two_processes_match_one_process(tmp_path):
    tok = build_tokenizer()
    models = tmp_path / "models"
    build_model(tok, 0).save_pretrained(models / "student")
    build_model(tok, 1).save_pretrained(models / "teacher")

    out2 = tmp_path / "two"
    out2.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "_dist_worker.py"), str(out2), str(models)]
    proc = subprocess.Popen(cmd, env={**env, "CUDA_VISIBLE_DEVICES": ""}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=1800)  # a hang guard only: never a race with a loaded machine
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers: a hang must not outlive the test
        stdout, stderr = proc.communicate()
        pytest.fail("the 2-process run hung (killed after 240 s):\n" + stderr[-5000:])
    assert proc.returncode == 0, stdout[-3000:] + stderr[-5000:]
    ranks = [json.loads((out2 / f"rank{r}.json").read_text()) for r in (0, 1)]
    for info in ranks:
        assert info["world"] == 2
        # the decision is identical on every rank: both stop after the diagnostic at step 1
        assert info["global_step"] == 1 and info["stopped_step"] == 1 and info["bad_count"] == 2
        assert info["errors"] == 0 and info["opd_steps"] == [0, 1]

    # the same run in this process (one process, one thread like the torchrun workers)
    out1 = tmp_path / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        info1 = run_worker(str(out1), str(models))
    finally:
        torch.set_num_threads(threads)
    assert info1["world"] == 1 and info1["global_step"] == 1 and info1["stopped_step"] == 1

    r1 = oc.AlignmentReport.load(out1 / "opd_alignment")
    r2 = oc.AlignmentReport.load(out2 / "opd_alignment")
    assert sorted(r2.records["prompt_index"].unique().tolist()) == [0, 1, 2, 3, 4]  # both ranks' prompts gathered
    assert sorted(r2.records["step"].unique().tolist()) == [0, 1]
    keys = ["step", "prompt_index", "rollout_index", "position", "config"]
    a, b = _sorted(r1.records, keys), _sorted(r2.records, keys)
    assert len(a) == len(b) and len(a) > 0
    for col in ["step", "prompt_index", "rollout_index", "position", "config", "token_id", "degenerate",
                "rollout_correct"]:
        assert a[col].tolist() == b[col].tolist(), col
    for col in ["candidate_ids", "candidate_rollouts"]:
        assert [list(x) for x in a[col]] == [list(x) for x in b[col]], col
    for col in ["alignment", "value", "teacher_advantage", "kl_reverse", "covered_mass"]:
        np.testing.assert_allclose(a[col].to_numpy(float), b[col].to_numpy(float), rtol=1e-6, atol=1e-9, err_msg=col)
    ra = _sorted(r1.rollouts, ["step", "prompt_index", "rollout_index"])
    rb = _sorted(r2.rollouts, ["step", "prompt_index", "rollout_index"])
    assert [list(x) for x in ra["completion_ids"]] == [list(x) for x in rb["completion_ids"]]
    assert ra["reward"].tolist() == rb["reward"].tolist()
    # the gathered records are saved once, in the one-process order
    assert r2.records[keys[1:4]].values.tolist() == r1.records[keys[1:4]].values.tolist()
