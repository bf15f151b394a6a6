"""``opd-diagnose`` (opd_callback/cli/): run / report / compare / demo, config files, errors, Ctrl-C and resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import base_args, build_cli_lab

from opd_callback import cli
from opd_callback.core.engine import AlignmentEngine
from opd_callback.report import AlignmentReport


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Path:
    return build_cli_lab(tmp_path_factory.mktemp("cli_lab"))


@pytest.fixture(scope="module")
def full_run(lab, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "full"
    assert cli.main(base_args(lab, out)) == 0
    return out


def test_run_writes_a_complete_run(full_run, capsys):
    for f in ("records.parquet", "rollouts.parquet", "summary.json", "meta.json", "report.html"):
        assert (full_run / f).exists(), f
    rep = AlignmentReport.load(full_run)
    assert rep.configs == ["big", "self+ans"]
    assert sorted(rep.rollouts["prompt_index"].unique()) == [0, 1, 2, 3, 4]
    meta = rep.meta
    assert meta["interrupted"] is False and meta["completed_prompts"] == 5 == meta["total_prompts"]
    assert meta["settings"]["num_rollouts"] == 2 and meta["configs"][1]["divergence"] == "jsd"
    assert meta["configs"][1]["beta"] == 0.5
    # token strings travel with the run, so `report` needs no tokenizer
    assert all(len(t) == len(i) for t, i in zip(rep.rollouts["completion_tokens"], rep.rollouts["completion_ids"]))
    assert all(len(t) == len(i) for t, i in zip(rep.records["candidate_tokens"], rep.records["candidate_ids"]))
    assert {"g_norm", "d_norm"} <= set(rep.records.columns)


def test_report_and_compare_commands(full_run, tmp_path, capsys):
    (full_run / "report.html").unlink()
    assert cli.main(["report", str(full_run)]) == 0
    page = (full_run / "report.html").read_text()
    assert 'id="questions"' in page and 'class="tok node"' in page
    assert "big" in capsys.readouterr().out
    out = tmp_path / "cmp.html"
    assert cli.main(["compare", str(full_run), str(full_run), "--names", "ckpt1", "ckpt2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ckpt1" in text and "+0.000" in text
    assert 'id="compare"' in out.read_text()


def test_config_files_match_flags(lab, full_run, tmp_path):
    yaml_cfg = tmp_path / "run.yaml"
    yaml_cfg.write_text(
        f"student: {lab / 'student'}\n"
        f"data: {lab / 'data.parquet'}\n"
        f"reward: {lab / 'rw.py'}:reward\n"
        f"out: {tmp_path / 'from_yaml'}\n"
        "teachers:\n"
        f"  big: {lab / 'teacher'}\n"
        "contexts:\n"
        "  self+ans: {template: 'ans {answer} {prompt}', divergence: jsd, beta: 0.5}\n"
        "settings: {num_rollouts: 2, max_new_tokens: 5, rollouts_per_branch: 2, bootstrap_samples: 50}\n"
    )
    assert cli.main(["run", "--config", str(yaml_cfg), "--no-progress", "--no-html"]) == 0
    a = AlignmentReport.load(full_run).records
    b = AlignmentReport.load(tmp_path / "from_yaml").records
    np.testing.assert_allclose(a["alignment"].to_numpy(float), b["alignment"].to_numpy(float), equal_nan=True)
    # TOML holds the same keys; flags override the file
    toml_cfg = tmp_path / "run.toml"
    toml_cfg.write_text(
        f'student = "{lab / "student"}"\ndata = "{lab / "data.jsonl"}"\nreward = "{lab / "rw.py"}:reward"\n'
        f'out = "{tmp_path / "from_toml"}"\nlimit = 2\nnum_rollouts = 3\n'
        f'[teachers.big]\nmodel = "{lab / "teacher"}"\ndivergence = "forward_kl"\n'
    )
    assert cli.main(["run", "--config", str(toml_cfg), "--num-rollouts", "2", "--max-new-tokens", "4",
                     "--rollouts-per-branch", "1", "--no-progress", "--no-html"]) == 0
    rep = AlignmentReport.load(tmp_path / "from_toml")
    assert rep.meta["settings"]["num_rollouts"] == 2 and rep.meta["settings"]["max_new_tokens"] == 4
    assert rep.meta["configs"][0]["divergence"] == "forward_kl" and rep.meta["total_prompts"] == 2


def test_params_space_flags(lab, tmp_path):
    out = tmp_path / "params"
    args = base_args(lab, out) + ["--space", "params", "--param-filter", "lm_head", "--limit", "2", "--no-html"]
    assert cli.main(args) == 0
    rec = AlignmentReport.load(out).records
    ok = ~rec["degenerate"].astype(bool)
    np.testing.assert_allclose(rec.loc[ok, "alignment"], rec.loc[ok, "alignment_logits"], atol=1e-5)


@pytest.mark.parametrize(
    "replace, extra, message",
    [
        ({}, ["--teacher", "big"], "use NAME=VALUE"),
        ({"--num-rollouts": "0"}, [], "num_rollouts must be >= 1"),
        ({"--reward": "{lab}/rw_missing.py:reward"}, [], "does not exist"),
        ({"--reward": "json"}, [], "give MODULE:FUNCTION"),
        ({"--reward": "{lab}/rw.py:nope"}, [], "has no attribute 'nope'"),
        ({"--data": "{lab}/nope.jsonl"}, [], "no such file"),
        ({"--data": "{lab}/rw.py"}, [], "use a .jsonl, .json, .parquet or .csv file"),
        ({}, ["--divergence", "big=kl"], "unknown divergence 'kl'"),
        ({}, ["--divergence", "big=jsd,gamma=1"], "unknown option"),
        ({}, ["--divergence", "nobody=jsd"], "no configuration named 'nobody'"),
        ({}, ["--context", "x={missing} {prompt}"], "names field 'missing'"),
        ({}, ["--context", "big=again {prompt}"], "must be unique"),
        ({}, ["--space", "params", "--param-filter", "lora"], "not a peft LoRA model"),
        ({}, ["--param-filter", "lm_head"], "apply to space='params'"),
        ({}, ["--tail", "drop"], "invalid choice"),
        ({"--student": "no/such/dir"}, [], "no such directory"),
    ],
)
def test_bad_arguments_give_one_line_errors(lab, tmp_path, capsys, replace, extra, message):
    args = base_args(lab, tmp_path / "bad")
    for flag, val in replace.items():
        args[args.index(flag) + 1] = val.format(lab=lab)
    with pytest.raises(SystemExit) as exc:
        cli.main(args + extra)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    lines = [ln for ln in err.splitlines() if ln.strip() and "Loading weights" not in ln]
    assert len(lines) == 1, err
    assert lines[0].startswith("opd-diagnose run: error: ") and lines[0].endswith("(see opd-diagnose run --help)")
    assert message in lines[0]


def test_missing_required_and_existing_out(lab, full_run, capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--student", str(lab / "student")])
    assert "--data is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["run", "--student", str(lab / "student"), "--data", str(lab / "data.jsonl"),
                  "--reward", f"{lab / 'rw.py'}:reward", "--out", "x"])
    assert "no teacher configuration" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(base_args(lab, full_run))
    assert "already holds a run: pass --resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["report", str(lab / "nowhere")])
    with pytest.raises(SystemExit):
        cli.main(["frobnicate"])


def test_ctrl_c_leaves_a_consistent_partial_report_and_resume_completes_it(lab, full_run, tmp_path, monkeypatch):
    out = tmp_path / "interrupted"
    calls = {"n": 0}
    real = AlignmentEngine.run_prompt

    def flaky(self, prep):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the third prompt
        return real(self, prep)

    monkeypatch.setattr(AlignmentEngine, "run_prompt", flaky)
    assert cli.main(base_args(lab, out)) == 130
    part = AlignmentReport.load(out)
    assert part.meta["interrupted"] is True and part.meta["completed_prompts"] == 2
    assert sorted(part.rollouts["prompt_index"].unique()) == [0, 1]
    assert set(part.records["prompt_index"]) <= {0, 1}
    assert "This run was interrupted" in (out / "report.html").read_text()
    monkeypatch.setattr(AlignmentEngine, "run_prompt", real)
    assert cli.main(base_args(lab, out) + ["--resume"]) == 0
    done = AlignmentReport.load(out)
    assert done.meta["interrupted"] is False and done.meta["completed_prompts"] == 5
    full = AlignmentReport.load(full_run)
    key = ["prompt_index", "rollout_index", "position", "config"]
    a = full.records.sort_values(key).reset_index(drop=True)
    b = done.records.sort_values(key).reset_index(drop=True)
    np.testing.assert_allclose(a["alignment"].to_numpy(float), b["alignment"].to_numpy(float), equal_nan=True)
    # resuming with other settings is refused
    with pytest.raises(SystemExit):
        cli.main(base_args(lab, out) + ["--resume", "--seed", "7"])


def test_demo_command_forwards_flags_and_builds_html(tmp_path, monkeypatch, full_run):
    from opd_callback import demo

    seen = {}

    def fake_main(argv):
        seen["argv"] = argv
        out = Path(argv[argv.index("--out") + 1])
        AlignmentReport.load(full_run).save(out)
        return 0

    monkeypatch.setattr(demo, "main", fake_main)
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--quick", "--prompts", "3"]) == 0
    assert seen["argv"] == ["--out", str(out), "--quick", "--prompts", "3"]
    assert (out / "report.html").exists()


def test_real_sigint_with_python_m(lab, tmp_path):
    """A real Ctrl-C (SIGINT) to ``python -m opd_callback run``: exit status 130 and a loadable partial report.

    No race with the clock: the reward function blocks (until the signal) as soon as the first snapshot is on disk,
    after saying so through a marker file; the test sends SIGINT only once the marker exists. The child gets SIGINT's
    default disposition back (a shell that runs pytest in the background ignores SIGINT, and children inherit that)."""
    out = tmp_path / "sigint"
    ready = tmp_path / "ready"
    gated = tmp_path / "gated_rw.py"
    gated.write_text(
        "import time\n"
        "from pathlib import Path\n"
        f"OUT, READY = Path({str(out)!r}), Path({str(ready)!r})\n"
        "def reward(prompts, completions, answer, **kw):\n"
        "    if (OUT / 'records.parquet').exists():  # the first prompt is saved: wait here for Ctrl-C\n"
        "        READY.touch()\n"
        "        for _ in range(60000):  # a hang guard only: the signal comes long before\n"
        "            time.sleep(0.01)\n"
        "        raise SystemExit(3)\n"
        "    return [float(a in c) for c, a in zip(completions, answer)]\n"
    )
    args = base_args(lab, out)
    args[args.index("--reward") + 1] = f"{gated}:reward"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "opd_callback", *args, "--save-every", "1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        while not ready.exists():
            if proc.poll() is not None:
                pytest.fail(f"the run ended (status {proc.returncode}) before blocking: {proc.stderr.read()[-2000:]}")
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr and "--resume" in stderr
    part = AlignmentReport.load(out)
    assert part.meta["interrupted"] is True
    done = set(part.rollouts["prompt_index"])
    assert done == {0} and part.meta["completed_prompts"] == 1
    assert set(part.records["prompt_index"]) <= done
