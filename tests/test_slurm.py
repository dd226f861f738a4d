"""submitit_pretrain.py on a real SLURM cluster: a 2-task gloo job equals torchrun bit for bit, and still does after
`scancel --signal=USR2` mid-run; a job that reaches its time limit requeues and completes.

The jobs run tests/micro_submit.py (submitit_pretrain.py with the micro models) with --device cpu. They need a
cluster that runs jobs on this machine: `bash .ci/slurm_up.sh` (root, Debian) starts one, and .ci/run does so in CI.
Without one the tests skip; with CI=true they fail instead.
"""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runs import ENV, ROOT, assert_same_training_state, epoch_log
from util.checkpoint import load_checkpoint
from util.submit import submit

MICRO = ["--model", "lut_vit_micro", "--input_size", "32", "--patch_size", "8", "--warmup_epochs", "1",
         "--head_mlp_dim", "64", "--print_freq", "4", "--seed", "5", "--batch_size", "8"]  # 8 per rank x 2 ranks
STEPS = 16  # optimizer steps per epoch: 256 images / (8 x 2)
EPOCHS = 6
ACTIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING",
          "SIGNALING", "STAGE_OUT", "SUSPENDED")


@pytest.mark.parametrize("entry", ["main_pretrain", "main_finetune", "main_linprobe"])
def test_launchers_take_their_entry_scripts_flags_and_the_cluster_flags(entry, capsys):
    with pytest.raises(SystemExit) as raised:
        submit(entry, ["--help"])
    assert raised.value.code == 0
    usage = capsys.readouterr().out
    for flag in ("--data_path", "--model", "--output_dir", "--nodes", "--ngpus", "--timeout", "--partition",
                 "--account", "--qos", "--constraint", "--comment", "--job_dir", "--cpus_per_task", "--mem_gb"):
        assert flag in usage


def test_launcher_refuses_a_missing_data_path_before_submitting(tmp_path):
    with pytest.raises(SystemExit, match="--data_path .*missing does not exist"):
        submit("main_pretrain", ["--data_path", str(tmp_path / "missing"), "--output_dir", str(tmp_path)])


@pytest.fixture(scope="module")
def cluster():
    """Skip (fail under CI=true) unless SLURM answers and has a node with 2 CPUs for the 2-task jobs."""
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%c %T"], capture_output=True, text=True, timeout=30)
        nodes = [line.split() for line in proc.stdout.splitlines()] if proc.returncode == 0 else []
        problem = "" if nodes else proc.stderr.strip() or "it lists no nodes"
        if nodes and not any(int(cpus) >= 2 and state in ("idle", "mixed", "allocated") for cpus, state in nodes):
            problem = f"no usable node with 2 CPUs: {nodes}"
    except (OSError, subprocess.TimeoutExpired) as e:
        problem = str(e)
    if problem:
        message = f"no SLURM cluster answers `sinfo` ({problem}); `bash .ci/slurm_up.sh` (as root) starts one here"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}. CI must run the SLURM tests.")
        pytest.skip(message)


class Job:
    """A job submitted through tests/micro_submit.py; cancelled at teardown if it still runs."""

    def __init__(self, out, *flags, timeout_min=30):
        cmd = [sys.executable, "-m", "tests.micro_submit", *MICRO, "--device", "cpu", "--ngpus", "2",
               "--cpus_per_task", "1", "--mem_gb", "1", "--timeout", str(timeout_min), "--output_dir", str(out),
               *map(str, flags)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        self.id = re.search(r"Submitted job (\d+)", proc.stdout).group(1)
        self.log = Path(re.search(r"log of task 0: (\S+)", proc.stdout).group(1))
        self.out = Path(re.search(r"checkpoints: +(\S+)", proc.stdout).group(1))

    def output(self):
        return self.log.read_text() if self.log.exists() else ""

    def info(self):
        """scontrol's fields of the job, e.g. {'JobState': 'COMPLETED', 'Restarts': '1', ...}."""
        out = subprocess.run(["scontrol", "show", "job", "-o", self.id], capture_output=True, text=True).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def state(self):
        state = self.info().get("JobState")
        assert state, f"slurmctld does not know job {self.id}"
        return state

    def wait_for_line(self, text, timeout):
        deadline = time.time() + timeout
        while text not in self.output():
            assert self.state() in ACTIVE, f"job {self.id} ended before its log showed {text!r}:\n{self.output()}"
            assert time.time() < deadline, f"no {text!r} in job {self.id}'s log after {timeout} s:\n{self.output()}"
            time.sleep(0.2)

    def wait(self, timeout):
        """Wait until the job has ended for good (a requeued job is PENDING again); returns info()."""
        deadline = time.time() + timeout
        while self.state() in ACTIVE:
            assert time.time() < deadline, f"job {self.id} still {self.state()} after {timeout} s:\n{self.output()}"
            time.sleep(1)
        return self.info()


@pytest.fixture
def submit_job(cluster):
    jobs = []

    def submit_job(*args, **kwargs):
        jobs.append(Job(*args, **kwargs))
        return jobs[-1]

    yield submit_job
    for job in jobs:
        subprocess.run(["scancel", job.id], capture_output=True)


@pytest.fixture(scope="module")
def torchrun_reference(cluster, flat_images, tmp_path_factory):
    """checkpoint-last.pth of the same 2-rank run under torchrun."""
    out = tmp_path_factory.mktemp("torchrun")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "micro_pretrain.py"), *MICRO, "--data_path", str(flat_images),
           "--epochs", str(EPOCHS), "--num_workers", "0", "--device", "cpu", "--output_dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "checkpoint-last.pth"


def stop_and_resume_steps(output):
    """Global optimizer steps at which the runs in a job's log stopped on SIGUSR2, and from which they resumed."""
    stops = [int(s) for s in re.findall(r"SIGUSR2 received: stopping after optimizer step (\d+)", output)]
    resumes = [int(e) * STEPS + int(s) if s else (int(e) + 1) * STEPS
               for e, s in re.findall(r"Resumed from \S+: epoch (\d+)(?:, step (\d+)/\d+| complete)", output)]
    return sorted(set(stops)), resumes  # main_pretrain prints a stop from its step loop and its epoch loop


@pytest.mark.slow
def test_two_task_job_completes_and_equals_torchrun(submit_job, flat_images, tmp_path, torchrun_reference):
    job = submit_job(tmp_path / "%j", "--data_path", flat_images, "--epochs", EPOCHS, "--num_workers", 0)
    assert job.out == tmp_path / job.id and job.log == job.out / "submitit" / f"{job.id}_0_log.out"
    info = job.wait(timeout=300)
    output = job.output()
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "0"), output
    assert "| rank 0: all 2 ranks joined (gloo)" in output
    assert [r["epoch"] for r in epoch_log(job.out)] == list(range(EPOCHS))
    assert_same_training_state(torchrun_reference, job.out / "checkpoint-last.pth")


@pytest.mark.slow
def test_preempted_job_requeues_resumes_where_it_stopped_and_equals_torchrun(submit_job, flat_images, tmp_path,
                                                                            torchrun_reference):
    job = submit_job(tmp_path, "--data_path", flat_images, "--epochs", EPOCHS, "--num_workers", 0)
    job.wait_for_line("Epoch [1] [ 8/16]", timeout=300)
    subprocess.run(["scancel", "--signal=USR2", job.id], check=True)
    info = job.wait(timeout=300)
    output = job.output()
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), output
    stops, resumes = stop_and_resume_steps(output)
    assert len(stops) == 1 and STEPS < stops[0] < EPOCHS * STEPS
    assert resumes == stops
    assert "this job is preempted" in output  # submitit does not count it against --max_num_timeout
    assert [r["epoch"] for r in epoch_log(tmp_path)] == list(range(EPOCHS))
    assert_same_training_state(torchrun_reference, tmp_path / "checkpoint-last.pth")


@pytest.mark.slow
def test_job_at_its_time_limit_checkpoints_requeues_and_completes(submit_job, flat_images, tmp_path):
    # SLURM signals 30 s, and up to 60 s more, before the 2-minute limit, so a run trains for 20 to 80 s. An epoch
    # (16 steps and a data-loading worker started per task) takes 0.85 to 1.5 s on this 2-core machine, depending on
    # the other tests alongside: 120 epochs are 100 to 180 s of compute, more than one run, so at least one requeue.
    epochs = 120
    job = submit_job(tmp_path, "--data_path", flat_images, "--epochs", epochs, "--num_workers", 1,
                     "--signal_delay_s", 30, timeout_min=2)
    info = job.wait(timeout=900)
    output = job.output()
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, output
    assert "this job is timed-out" in output
    stops, resumes = stop_and_resume_steps(output)
    assert stops and resumes == stops
    assert [r["epoch"] for r in epoch_log(tmp_path)] == list(range(epochs))
    assert load_checkpoint(tmp_path / "checkpoint-last.pth")["global_step"] == epochs * STEPS
