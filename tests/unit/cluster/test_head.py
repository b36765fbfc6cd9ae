"""`python -m ofe head` (ofe/cluster/head.py) without a cluster: the batch script it writes, and what that
script does when run by bash with stand-ins for snakemake and scontrol; refusing a second live head
and the head's line in `ofe status`, against a fake squeue/sacct/sbatch on PATH."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from ofe.__main__ import main
from ofe.cluster import head
from ofe.cluster.status import survey
from ofe.config import ConfigError


def _sbatch_lines(script: str) -> dict[str, str]:
    """{option: value} of the script's #SBATCH lines ('' for a flag)."""
    found = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            name, _, value = line.removeprefix("#SBATCH ").partition("=")
            found[name] = value
    return found


def test_the_script_asks_for_a_small_long_requeued_job(tmp_path, monkeypatch):
    monkeypatch.setenv("OFE_SLURM_PARTITION", "cpu")
    monkeypatch.setenv("OFE_SLURM_QOS", "long")
    monkeypatch.setenv("OFE_SLURM_CONSTRAINT", "a100")  # a GPU constraint is the training jobs' alone
    settings = head.settings_from_env(account="proj", partition=None)
    log = tmp_path / "results" / "logs" / "head.log"
    script = head.sbatch_script(settings, ["--profile", "slurm"], tmp_path, log)
    assert script.startswith("#!/bin/bash\n")
    assert _sbatch_lines(script) == {
        "--job-name": "ofe-head", "--nodes": "1", "--ntasks": "1", "--cpus-per-task": "1", "--mem": "4G",
        "--time": "7-00:00:00", "--requeue": "", "--open-mode": "append", "--output": str(log),
        "--signal": "B:USR1@300", "--chdir": str(tmp_path), "--partition": "cpu", "--account": "proj",
        "--qos": "long"}
    assert "\ntrap requeue USR1\n" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    # every (re)start removes a killed head's lock first, then runs the same arguments
    unlock = script.index("snakemake --unlock --profile slurm")
    assert script.index("snakemake --profile slurm &") > unlock


def test_options_replace_the_defaults(tmp_path):
    settings = head.HeadSettings(job_name="h", cpus=2, mem_gb=8, time="2-00:00:00", requeue_before_s=600)
    lines = _sbatch_lines(head.sbatch_script(settings, ["-n"], tmp_path, tmp_path / "log"))
    assert (lines["--cpus-per-task"], lines["--mem"], lines["--time"], lines["--signal"]) == (
        "2", "8G", "2-00:00:00", "B:USR1@600")
    assert "--partition" not in lines and "--account" not in lines


@pytest.mark.parametrize("text, seconds", [("90", 5400), ("5:30", 330), ("1:30:00", 5400), ("2-3", 183600),
                                           ("1-00:30", 88200), ("7-00:00:00", 604800)])
def test_slurm_time_limits_are_read(text, seconds):
    assert head.time_limit_s(text) == seconds


@pytest.mark.parametrize("settings, option", [
    (head.HeadSettings(time="a week"), "--time"),
    (head.HeadSettings(time="0"), "--time"),
    (head.HeadSettings(time="5", requeue_before_s=300), "--requeue-before-s"),  # 5 minutes: not before it
    (head.HeadSettings(requeue_before_s=0), "--requeue-before-s"),
    (head.HeadSettings(cpus=0), "--cpus"),
    (head.HeadSettings(mem_gb=0), "--mem-gb"),
    (head.HeadSettings(job_name="a b"), "--job-name"),
])
def test_bad_settings_name_the_option(settings, option):
    with pytest.raises(ConfigError, match=option):
        settings.check()


def _run_script(tmp_path: Path) -> tuple[subprocess.Popen, Path, Path, Path]:
    """The head's script run by bash with stand-ins first on PATH: snakemake logs its call, then (unless
    --unlock) runs until tmp_path/stop exists and exits 3; scontrol logs its call. Returns once snakemake
    runs: (bash, its output file, the calls file, the folder the script was written for)."""
    bin_dir, work, calls, out = tmp_path / "bin", tmp_path / "work", tmp_path / "calls.txt", tmp_path / "out.txt"
    bin_dir.mkdir()
    work.mkdir()
    (bin_dir / "snakemake").write_text(f"""#!/bin/sh
echo "snakemake $* in $PWD" >> {calls}
[ "$1" = "--unlock" ] && exit 0
touch {tmp_path}/started
while [ ! -e {tmp_path}/stop ]; do sleep 0.05; done
exit 3
""")
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"scontrol $*\" >> {calls}\n")
    for tool in ("snakemake", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    script = tmp_path / "head.sbatch"
    script.write_text(head.sbatch_script(head.HeadSettings(), ["--profile", "slurm"], work, tmp_path / "log", bin_dir))
    with out.open("w") as f:
        proc = subprocess.Popen(["bash", str(script)], cwd=tmp_path, env={**os.environ, "SLURM_JOB_ID": "4242"},
                                stdout=f, stderr=subprocess.STDOUT)
    try:
        _until(lambda: (tmp_path / "started").exists())
    except AssertionError:
        (tmp_path / "stop").touch()
        raise
    return proc, out, calls, work


def _until(condition) -> None:
    deadline = time.time() + 60
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_the_script_requeues_on_usr1_and_waits_for_snakemake(tmp_path):
    """USR1 (SLURM's warning before the time limit) is answered with `scontrol requeue JOB`; the script
    keeps waiting for snakemake after the trap and exits with its status. Snakemake runs after an
    unlock, in the folder the script was written for."""
    proc, out, calls, work = _run_script(tmp_path)
    try:
        proc.send_signal(signal.SIGUSR1)
        _until(lambda: "scontrol" in calls.read_text())
    finally:  # the stand-in snakemake never outlives the test
        (tmp_path / "stop").touch()
    assert proc.wait(timeout=60) == 3, out.read_text()  # snakemake's status, not the interrupted wait's (138)
    assert calls.read_text().splitlines() == [f"snakemake --unlock --profile slurm in {work}",
                                              f"snakemake --profile slurm in {work}", "scontrol requeue 4242"]
    assert "requeueing head job 4242" in out.read_text()
    assert "snakemake exited with status 3" in out.read_text()


def test_the_script_outlives_snakemake_on_sigterm(tmp_path):
    """scancel sends SIGTERM to every process of the job: the shell stays until snakemake has gone (an
    orphaned snakemake could outlive the job and run beside a restarted head)."""
    proc, out, calls, _ = _run_script(tmp_path)
    try:
        proc.send_signal(signal.SIGTERM)
        _until(lambda: "SIGTERM" in out.read_text() or proc.poll() is not None)
        assert proc.poll() is None, out.read_text()  # the trap ran, and the shell still waits for snakemake
    finally:  # the stand-in snakemake never outlives the test
        (tmp_path / "stop").touch()
    assert proc.wait(timeout=60) == 3, out.read_text()
    assert "scontrol" not in calls.read_text()


def test_results_dir_follows_the_config_snakemake_reads(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"results_dir": "out/main"}))
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"results_dir": "out/a"}))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"report": "r.html"}))
    (tmp_path / "sub").mkdir()
    assert head.results_dir(["--profile", "slurm"], tmp_path) == tmp_path / "out/main"
    # named config files replace config.yaml (the Snakefile), merged in order
    assert head.results_dir(["--configfile", "a.yaml", "b.yaml", "--profile", "slurm"], tmp_path) == tmp_path / "out/a"
    assert head.results_dir(["--configfile=b.yaml"], tmp_path) == tmp_path / "results"
    assert head.results_dir(["-d", "sub"], tmp_path) == tmp_path / "sub" / "results"
    assert head.results_dir(["--config", "launcher_file=x", "results_dir=elsewhere"], tmp_path) == tmp_path / "elsewhere"


def _fake_slurm(tmp_path: Path, monkeypatch, queue: str, sacct: str = "", squeue_rc: int = 0) -> Path:
    """squeue prints `queue` (exit squeue_rc), sacct `sacct`, sbatch answers job 1234; each logs its call."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir(exist_ok=True)
    tools = {"squeue": f"printf '{queue}'\nexit {squeue_rc}", "sacct": f"printf '{sacct}'",
             "sbatch": "echo \"$*\" >> " + str(tmp_path / "sbatch-args.txt") + "\necho '1234;cluster'"}
    for tool, body in tools.items():
        (bin_dir / tool).write_text(f"#!/bin/sh\necho {tool} >> {calls}\n{body}\n")
        (bin_dir / tool).chmod(0o755)
    calls.unlink(missing_ok=True)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return calls


def _record(results: Path, job_id: str) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / "head.json").write_text(json.dumps({
        "job_id": job_id, "submitted": 1.0, "command": "python -m ofe head", "cwd": str(results.parent),
        "script": str(results / "head.sbatch"), "log": str(results / "logs" / "head.log")}))


def test_a_second_head_is_refused_while_the_first_is_queued(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "results"
    _record(results, "77")
    calls = _fake_slurm(tmp_path, monkeypatch, "76|RUNNING\\n77|PENDING\\n")
    assert main(["head"]) == 1
    err = capsys.readouterr().err
    assert "head job 77 is already pending" in err and "scancel 77" in err
    assert str(results / "logs" / "head.log") in err and "python -m ofe status" in err
    assert calls.read_text().split() == ["squeue"]  # one query, and nothing submitted
    assert json.loads((results / "head.json").read_text())["job_id"] == "77"


def test_a_failing_squeue_refuses_rather_than_guesses(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _record(tmp_path / "results", "77")
    calls = _fake_slurm(tmp_path, monkeypatch, "", squeue_rc=1)
    assert main(["head"]) == 1
    assert "cannot tell whether head job 77" in capsys.readouterr().err
    assert "sbatch" not in calls.read_text()


def test_a_head_that_left_the_queue_is_replaced(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "results"
    _record(results, "77")
    calls = _fake_slurm(tmp_path, monkeypatch, "76|RUNNING\\n")  # 77 has left the queue
    assert main(["head", "--job-name", "myhead", "--", "--profile", "slurm", "--configfile", "g.yaml"]) == 0
    assert "submitted head job 1234" in capsys.readouterr().out
    assert calls.read_text().split() == ["squeue", "sbatch"]
    record = json.loads((results / "head.json").read_text())
    assert record["job_id"] == "1234" and record["log"] == str(results / "logs" / "head.log")
    assert record["snakemake"] == ["--profile", "slurm", "--configfile", "g.yaml"]
    assert record["command"].endswith("-m ofe head --job-name myhead -- --profile slurm --configfile g.yaml")
    assert (tmp_path / "sbatch-args.txt").read_text().split() == ["--parsable", str(results / "head.sbatch")]
    lines = _sbatch_lines((results / "head.sbatch").read_text())
    assert lines["--job-name"] == "myhead" and lines["--chdir"] == str(tmp_path)
    assert (results / "logs").is_dir()  # SLURM would not create the log's folder


def test_the_first_head_needs_no_query_and_defaults_to_the_slurm_profile(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls = _fake_slurm(tmp_path, monkeypatch, "")
    assert main(["head"]) == 0
    assert calls.read_text().split() == ["sbatch"]
    assert json.loads((tmp_path / "results" / "head.json").read_text())["snakemake"] == ["--profile", "slurm"]


def test_status_shows_the_head_job_from_the_same_query(tmp_path, monkeypatch):
    results = tmp_path / "results"
    _record(results, "77")
    run = {"run_id": "tiny/a/seed0", "grid": {}, "studies": ["s"], "config": {"train": {"steps": 10}}}
    (results / "plan.json").write_text(json.dumps({"runs": [run]}))
    (results / "runs" / "tiny" / "a" / "seed0").mkdir(parents=True)
    (results / "runs" / "tiny" / "a" / "seed0" / "job.json").write_text(json.dumps({
        "job_id": "78", "cluster": "slurm", "stdout": str(tmp_path / "none.out"), "folder": str(tmp_path)}))
    calls = _fake_slurm(tmp_path, monkeypatch, "77|RUNNING\\n78|PENDING\\n")
    rows, line = survey(results)
    assert line == f"head: SLURM job 77 RUNNING; log: {results / 'logs' / 'head.log'}"
    assert [r["status"] for r in rows] == ["pending"]
    assert calls.read_text().split() == ["squeue"]  # the head and the run in one query


def test_status_says_plainly_when_the_head_is_gone(tmp_path, monkeypatch, capsys):
    results = tmp_path / "results"
    _record(results, "77")
    calls = _fake_slurm(tmp_path, monkeypatch, "", sacct="77|CANCELLED by 0\\n")
    assert main(["status", "--results", str(results)]) == 0  # no plan yet, but a head to report on
    out = capsys.readouterr()
    assert out.out.startswith("head: SLURM job 77 is not running (it left the queue: CANCELLED)")
    assert f"Restart it with: cd {tmp_path} && python -m ofe head" in out.out
    assert "head job has not planned the grid" in out.err
    assert calls.read_text().split() == ["squeue", "sacct"]
