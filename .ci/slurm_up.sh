#!/usr/bin/env bash
# Single-node Slurm (munge + slurmctld + slurmd [+ slurmdbd/MariaDB for sacct]) on a fresh
# Debian 12 machine without systemd, as root, for tests/test_slurm.py (.ci/run calls it; .ci/slurm_down.sh stops it).
# Usage: [WITH_DBD=0] [PREEMPT=0] bash .ci/slurm_up.sh   (WITH_DBD=1 adds accounting: sacct, submitit's job.state)
# Known pitfalls and timings: see the comments below and PRETRAIN.md ("SLURM").
set -euo pipefail
WITH_DBD=${WITH_DBD:-0}
PREEMPT=${PREEMPT:-0}
export DEBIAN_FRONTEND=noninteractive
pkgs="munge slurmctld slurmd slurm-client"
[ "$WITH_DBD" = 1 ] && pkgs="$pkgs slurmdbd mariadb-server"
apt-get update -qq
apt-get install -y -qq --no-install-recommends $pkgs >/dev/null

# 0. a run killed mid-way (or an earlier cluster on this machine) leaves daemons and saved state behind: slurmctld
#    would recover its old jobs and the node would stay allocated/completing. Start from a clean state.
bash "$(dirname "$0")/slurm_down.sh" >/dev/null 2>&1 || true
rm -rf /var/lib/slurm/slurmctld /var/lib/slurm/slurmd

# 1. munge (the package's postinst already generated /etc/munge/munge.key)
install -d -o munge -g munge -m 0755 /run/munge
runuser -u munge -- /usr/sbin/munged
munge -n | unmunge >/dev/null

CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 - 1024 ))
install -d -o slurm -g slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm
install -o slurm -g slurm -m 0644 /dev/null /var/log/slurm/jobcomp.log

# 2. optional accounting: MariaDB + slurmdbd (needed for sacct / submitit job states)
if [ "$WITH_DBD" = 1 ]; then
  install -d -o mysql -g root /run/mysqld
  setsid /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid \
      >/var/log/slurm/mariadb.log 2>&1 < /dev/null &
  for _ in $(seq 60); do mysqladmin ping >/dev/null 2>&1 && break; sleep 0.5; done
  mysql -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmdbpass';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  cat > /etc/slurm/slurmdbd.conf <<'CONF'
AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmdbpass
StorageLoc=slurm_acct_db
CONF
  chown slurm:slurm /etc/slurm/slurmdbd.conf; chmod 600 /etc/slurm/slurmdbd.conf
  /usr/sbin/slurmdbd
  for _ in $(seq 60); do (echo > /dev/tcp/127.0.0.1/6819) 2>/dev/null && break; sleep 0.5; done
  ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux"
else
  ACCT="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi

# 3. slurm.conf
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=slurm
AuthType=auth/munge
# requeued jobs wait cred_expire+1 s before they may start again (default 120)
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/lib/slurm/slurmd
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
$ACCT
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
InactiveLimit=0
KillWait=10
MinJobAge=300
Waittime=0
NodeName=localhost CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
CONF
if [ "$PREEMPT" = 1 ]; then   # real preemption: 'high' jobs requeue 'debug' jobs, which get their --signal first
  cat >> /etc/slurm/slurm.conf <<'CONF'
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=30
PartitionName=high Nodes=localhost MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
CONF
else
  echo "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP" >> /etc/slurm/slurm.conf
fi

# 4. daemons (they daemonize themselves; PIDs in /run/*.pid)
/usr/sbin/slurmctld -c            # -c: ignore any saved job state
/usr/sbin/slurmd -N localhost     # -N: node name "localhost" differs from the real hostname
for i in $(seq 120); do
  state=$(sinfo -h -o %T 2>/dev/null || true)
  [ "$state" = idle ] && break
  case "$state" in   # a node remembered as down/drained is put back in service
    down*|drain*) [ $((i % 10)) = 0 ] && scontrol update NodeName=localhost State=RESUME 2>/dev/null || true ;;
  esac
  sleep 0.5
done
if ! sinfo -h -o %T | grep -qx idle; then
  echo "slurm_up.sh: the node did not become idle" >&2
  tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2
  exit 1
fi
sinfo
