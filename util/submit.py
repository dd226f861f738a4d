"""Submit a training script to SLURM with submitit: one task per GPU, requeued after a time limit or preemption.

SLURM sends SIGUSR2 `--signal_delay_s` seconds before the time limit (and at preemption): the training scripts save
their last checkpoint in output_dir (util/preemption.py), then submitit calls Trainer.checkpoint() and requeues the
job under the same job id with the same arguments, so it auto-resumes from that file."""
import argparse
import copy
import importlib
import os
import re
import shlex
import subprocess

import submitit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_cluster_parser():
    parser = argparse.ArgumentParser("SLURM options", add_help=False)
    group = parser.add_argument_group("SLURM (submitit)")
    group.add_argument("--nodes", default=1, type=int)
    group.add_argument("--ngpus", default=8, type=int,
                       help="GPUs per node, one task each (with --device cpu: CPU processes per node, gloo)")
    group.add_argument("--timeout", default=4320, type=int,
                       help="time limit of each run of the job, in minutes; at the limit it checkpoints and requeues")
    group.add_argument("--partition", default=None)
    group.add_argument("--account", default=None)
    group.add_argument("--qos", default=None)
    group.add_argument("--constraint", default=None, help="node features, e.g. volta32gb")
    group.add_argument("--comment", default=None)
    group.add_argument("--job_dir", default="",
                       help="folder for submitit's logs and pickles (default: output_dir/submitit); %%j = job id")
    group.add_argument("--cpus_per_task", default=None, type=int,
                       help="CPU cores per task, for its data-loading workers (default: the cores of the partition's "
                            "smallest node over --ngpus, from sinfo; 10 where sinfo cannot tell)")
    group.add_argument("--mem_gb", default=None, type=int, help="memory per node (default: 40 GB per task)")
    group.add_argument("--signal_delay_s", default=120, type=int,
                       help="SIGUSR2 comes this long before the time limit (SLURM may send it up to 60 s earlier): "
                            "time to finish the current steps and write the checkpoint")
    group.add_argument("--max_num_timeout", default=100, type=int,
                       help="how often the job may requeue at its time limit; submitit counts a signal as the time "
                            "limit once a run has lasted min(0.8 x timeout, timeout - 10 min); earlier signals "
                            "(preemptions) requeue without limit")
    return parser


class Trainer:
    """The picklable job: `entry`.main(args) on one task. submitit calls checkpoint() on rank 0 at SIGUSR2."""

    def __init__(self, entry, args):
        self.entry, self.args = entry, args

    def __call__(self):
        job_id = submitit.JobEnvironment().job_id
        # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR (first node), MASTER_PORT (from the job id) for env://;
        # CUDA_VISIBLE_DEVICES is left as SLURM set it: a task that sees its node's GPUs takes cuda:LOCAL_RANK, one
        # that sees a single GPU (--gpus-per-task=1) cuda:0 (util.dist.cuda_index).
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        # main() annotates its args (rank, lr, ...): keep the submitted ones pristine for the requeued job.
        args = copy.deepcopy(self.args)
        args.output_dir = args.output_dir.replace("%j", job_id)
        if args.log_dir:
            args.log_dir = args.log_dir.replace("%j", job_id)
        importlib.import_module(self.entry).main(args)  # returns nothing: submitit would pickle the models

    def checkpoint(self):  # the training state is already in output_dir's last checkpoint
        return submitit.helpers.DelayedSubmission(Trainer(self.entry, self.args))


def partition_cpus_per_task(partition, ngpus):
    """The cores of the partition's smallest node (sinfo's %c; SLURM's default partition for None) over `ngpus`
    tasks, or None where sinfo cannot tell."""
    try:
        out = subprocess.run(["sinfo", "--noheader", "--format=%c %P"] + (["--partition", partition] if partition
                                                                           else []),
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [line.split() for line in out.splitlines() if len(line.split()) == 2]
    if partition is None:  # the default partition is the one marked with a *
        rows = [row for row in rows if row[1].endswith("*")]
    cpus = [int(re.match(r"\d+", row[0]).group()) for row in rows if re.match(r"\d+", row[0])]  # "64" or "64+"
    return max(1, min(cpus) // ngpus) if cpus else None


def submit(entry, argv=None):
    """Parse `entry`'s flags plus the SLURM flags from argv (default sys.argv) and submit `entry`.main(args)."""
    entry_parser, cluster_parser = importlib.import_module(entry).get_args_parser(), get_cluster_parser()
    parser = argparse.ArgumentParser(description=f"{entry_parser.prog}, submitted to SLURM",
                                     parents=[entry_parser, cluster_parser])
    parser.set_defaults(device="cuda")  # for the compute nodes, whatever the machine that submits has
    args = parser.parse_args(argv)
    cluster = argparse.Namespace()
    for name in vars(cluster_parser.parse_args([])):  # the SLURM flags go to the executor, not to the entry script
        setattr(cluster, name, getattr(args, name))
        delattr(args, name)
    if not args.data_path.startswith("hf:") and not os.path.exists(args.data_path):
        raise SystemExit(f"--data_path {args.data_path} does not exist here (the compute nodes need the same path)")
    on_gpu = args.device.startswith("cuda")
    if cluster.cpus_per_task is None:
        cpus = partition_cpus_per_task(cluster.partition, cluster.ngpus)
        cluster.cpus_per_task = cpus or 10
        print(f"--cpus_per_task {cluster.cpus_per_task}: " + (
            f"the cores of partition {cluster.partition or '(default)'}'s smallest node over {cluster.ngpus} tasks"
            if cpus else "sinfo did not tell the cores of a node"))
    executor = submitit.SlurmExecutor(folder=cluster.job_dir or os.path.join(args.output_dir, "submitit"),
                                      max_num_timeout=cluster.max_num_timeout)
    executor.update_parameters(
        job_name=f"{entry}:{args.model}", time=cluster.timeout, nodes=cluster.nodes,
        ntasks_per_node=cluster.ngpus, gpus_per_node=cluster.ngpus if on_gpu else None,
        cpus_per_task=cluster.cpus_per_task, mem=f"{cluster.mem_gb or 40 * cluster.ngpus}GB",
        partition=cluster.partition, account=cluster.account, qos=cluster.qos, constraint=cluster.constraint,
        comment=cluster.comment, signal_delay_s=cluster.signal_delay_s,
        setup=[
            # the job unpickles util.submit.Trainer and imports the entry script from this checkout
            f"export PYTHONPATH={shlex.quote(REPO)}${{PYTHONPATH:+:$PYTHONPATH}}",
            # one OpenMP pool per task sized to its cores, not to the whole node
            f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{cluster.cpus_per_task}}}",
        ])
    job = executor.submit(Trainer(entry, args))
    print(f"Submitted job {job.job_id}: {entry}.py on {cluster.nodes} node(s) x {cluster.ngpus} "
          f"{'GPUs' if on_gpu else 'CPU processes'} = {cluster.nodes * cluster.ngpus} tasks, "
          f"{cluster.timeout} min per run")
    print(f"  log of task 0: {job.paths.stdout} (stderr: {job.paths.stderr.name}; task t: {job.job_id}_<t>_log.*)")
    print(f"  checkpoints:   {args.output_dir.replace('%j', job.job_id)}")
    return job
