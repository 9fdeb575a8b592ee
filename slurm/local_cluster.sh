#!/usr/bin/env bash
# A real SLURM cluster on this machine, from Debian's packages, for trying Tessera's SLURM path: one node by
# default, or N compute nodes (each its own slurmd) for multi-node jobs.
#
#   sudo slurm/local_cluster.sh start     install what is missing, then start munged, MariaDB, slurmdbd,
#                                         slurmctld and slurmd (each only if it is not already running)
#   sudo slurm/local_cluster.sh start --nodes N
#                                         N compute nodes tessera-n1..N (N = 2 or 3): one slurmd each
#                                         (SLURM's multiple-slurmd mode: `slurmd -N NAME`), each with its own
#                                         address 127.0.77.K, port, spool and log, and, in a UTS namespace of
#                                         its own, its own host name (tasks see `hostname` = their node).
#                                         A running cluster of another size is refused: stop it first.
#   sudo slurm/local_cluster.sh status    one line per daemon (every node's slurmd), then sinfo -N; exit 0
#                                         only when all are up
#   sudo slurm/local_cluster.sh stop      cancel the cluster's jobs, stop the daemons this script started
#                                         (and only those), remove the config links it made
#   sudo slurm/local_cluster.sh stop --wipe   also delete the cluster's state (jobs, accounting database)
#
# Settings (environment):
#   TESSERA_SLURM_DIR   where config, state, logs and PID files live (default /tmp/tessera-slurm)
#   TESSERA_SLURM_CPUS  CPUs each node declares (default: nproc; more than the machine has is allowed)
#   TESSERA_SLURM_GPUS  fake GPUs declared as gres (default 0); slurm then sets CUDA_VISIBLE_DEVICES for jobs
#                       that ask for them, though no CUDA device exists behind them
#   TESSERA_SLURM_DB_PORT  TCP port of the accounting database on 127.0.0.1 (default 3307)
#
# Partition `local` is the default one (the `local` profile in slurm/profiles/ submits to it). Requeued jobs
# restart within seconds (short credential lifetime, 5 s scheduler interval) instead of the default ~2 min.
set -euo pipefail

BASE=${TESSERA_SLURM_DIR:-/tmp/tessera-slurm}
CPUS=${TESSERA_SLURM_CPUS:-$(nproc)}
GPUS=${TESSERA_SLURM_GPUS:-0}
DB_PORT=${TESSERA_SLURM_DB_PORT:-3307}
NODE=$(hostname -s)
NODES=1            # compute nodes (start --nodes N)
NODE_PREFIX=tessera-n  # multi-node names: tessera-n1, tessera-n2, ...
NODE_NET=127.0.77      # multi-node addresses: 127.0.77.K for node K (nothing else on this machine uses them)
NODE_PORT0=6830        # multi-node slurmd ports: 6830 + K
MAX_NODES=3
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
MANIFEST="$BASE/run/created"  # files outside $BASE this script created (removed again by stop)

say() { echo "local_cluster: $*"; }
die() { echo "local_cluster: error: $*" >&2; exit 2; }

# pid_alive FILE: the PID in FILE names a running process
pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# wait_until SECONDS DESCRIPTION COMMAND...: poll every half second, fail with DESCRIPTION after SECONDS
wait_until() {
  local limit=$1 what=$2; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || { echo "local_cluster: error: $what not ready after ${limit}s" >&2; return 1; }
    sleep 0.5
  done
}

require_root() {
  [[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts system daemons); try: sudo $0 $*"
}

install_packages() {
  dpkg -s "${PACKAGES[@]}" >/dev/null 2>&1 && return 0
  command -v apt-get >/dev/null || die "packages ${PACKAGES[*]} are missing and apt-get is not available"
  say "installing ${PACKAGES[*]} (apt-get)"
  apt-get update -qq
  # policy-rc.d 101: package scripts must not start daemons; this script starts them itself.
  local policy=/usr/sbin/policy-rc.d created_policy=0
  if [[ ! -e $policy ]]; then printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 755 "$policy"; created_policy=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null \
    || { ((created_policy)) && rm -f "$policy"; die "apt-get install ${PACKAGES[*]} failed"; }
  ((created_policy)) && rm -f "$policy"
  return 0
}

# link_config NAME: /etc/slurm/NAME -> $BASE/etc/NAME, refusing to replace a configuration that is not ours
link_config() {
  local target="/etc/slurm/$1" ours="$BASE/etc/$1"
  if [[ -L $target && $(readlink "$target") == "$ours" ]]; then return 0; fi
  if [[ -L $target && ! -e $target ]]; then rm -f "$target"; fi  # dangling: left by a cluster since wiped
  [[ -e $target || -L $target ]] && die "$target exists and is not this cluster's; move it away first"
  mkdir -p /etc/slurm
  ln -s "$ours" "$target"
  echo "$target" >> "$MANIFEST"
}

# node_names: the compute nodes of this start (one per line)
node_names() {
  if ((NODES == 1)); then echo "$NODE"; else for ((k = 1; k <= NODES; k++)); do echo "$NODE_PREFIX$k"; done; fi
}

# running_nodes: the nodes of the cluster described by $BASE's config (empty when none was written)
running_nodes() {
  [[ -s $BASE/etc/slurm.conf ]] || return 0
  sed -n 's/^NodeName=\([^ ]*\) .*/\1/p' "$BASE/etc/slurm.conf"
}

# slurmd_pid_file NAME: where the slurmd of node NAME writes its PID
slurmd_pid_file() { if ((NODES == 1)); then echo "$BASE/run/slurmd.pid"; else echo "$BASE/run/slurmd-$1.pid"; fi; }

write_configs() {
  local mem gres_line=""
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)  # MiB, leaving room for the OS
  : > "$BASE/etc/gres.conf"
  if ((GPUS > 0)); then
    # gres File= entries must be character devices: each fake GPU is a link to /dev/null
    for ((i = 0; i < GPUS; i++)); do ln -sfn /dev/null "$BASE/fakedev/gpu$i"; done
    local name
    echo AutoDetect=off > "$BASE/etc/gres.conf"
    for name in $(node_names); do
      printf 'NodeName=%s Name=gpu File=%s/fakedev/gpu[0-%d]\n' "$name" "$BASE" $((GPUS - 1)) >> "$BASE/etc/gres.conf"
    done
    gres_line="Gres=gpu:$GPUS"
  fi
  cat > "$BASE/etc/slurm.conf" <<EOF
# Written by Tessera's slurm/local_cluster.sh: one node, root runs everything.
ClusterName=tessera
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
# Short credentials and a 5 s scheduler pass: a requeued job starts again in ~15 s, not ~2 min.
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=5,bf_interval=5
StateSaveLocation=$BASE/state
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
$(node_daemon_lines)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
# Accounting is required: without it sacct fails and submitit never sees a job finish.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu
GresTypes=gpu
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# The node may declare more CPUs than the machine has (TESSERA_SLURM_CPUS).
SlurmdParameters=config_overrides
KillWait=5
$(node_lines "$mem" "$gres_line")
PartitionName=local Nodes=$(node_names | paste -sd,) Default=YES MaxTime=INFINITE State=UP
EOF
  cat > "$BASE/etc/slurmdbd.conf" <<EOF
DbdHost=localhost
SlurmUser=root
PidFile=$BASE/run/slurmdbd.pid
LogFile=$BASE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
EOF
  chmod 600 "$BASE/etc/slurmdbd.conf"  # slurmdbd refuses a config others can read
}

# node_daemon_lines: slurmd's files (one node: as always; several: one of each per node, %n = node name)
node_daemon_lines() {
  if ((NODES == 1)); then
    printf 'SlurmdSpoolDir=%s\nSlurmdPidFile=%s\nSlurmdLogFile=%s' \
      "$BASE/spool" "$BASE/run/slurmd.pid" "$BASE/log/slurmd.log"
  else
    printf 'SlurmdSpoolDir=%s\nSlurmdPidFile=%s\nSlurmdLogFile=%s' \
      "$BASE/spool/%n" "$BASE/run/slurmd-%n.pid" "$BASE/log/slurmd-%n.log"
  fi
}

# node_lines MEM GRES: one NodeName line per node; several nodes each get an address, a port, and a short
# SlurmdTimeout so a node whose slurmd died is DOWN (and its job requeued) within seconds, not minutes
node_lines() {
  if ((NODES == 1)); then
    echo "NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$1 $2 State=UNKNOWN"
    return 0
  fi
  echo "SlurmdTimeout=10"
  local k
  for ((k = 1; k <= NODES; k++)); do
    echo "NodeName=$NODE_PREFIX$k NodeAddr=$NODE_NET.$k NodeHostname=$NODE_PREFIX$k Port=$((NODE_PORT0 + k))" \
      "CPUs=$CPUS RealMemory=$1 $2 State=UNKNOWN"
  done
}

# start_slurmd NAME: the node's slurmd (several nodes: in a UTS namespace whose host name is NAME, so the
# node's tasks see their own host name, as on separate machines; gloo binds to the address it resolves to)
start_slurmd() {
  pid_alive "$(slurmd_pid_file "$1")" && return 0
  if ((NODES == 1)); then
    slurmd </dev/null >>"$BASE/log/daemons.out" 2>&1
  else
    mkdir -p "$BASE/spool/$1"
    unshare --uts sh -c 'hostname "$1" && exec slurmd -N "$1"' sh "$1" </dev/null >>"$BASE/log/daemons.out" 2>&1
  fi
}

start_munge() {
  install -d -o munge -g munge -m 755 /run/munge
  [[ -s /etc/munge/munge.key ]] || mungekey --create
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi  # a munged is already serving
  install -d -o munge -g munge -m 755 "$BASE/run/munge"  # munged runs as munge and writes its PID file here
  runuser -u munge -- test -w "$BASE/run/munge" \
    || die "user munge cannot reach $BASE/run/munge (a parent directory is private); choose a TESSERA_SLURM_DIR every user can traverse"
  runuser -u munge -- munged --pid-file="$BASE/run/munge/munged.pid" </dev/null
  wait_until 20 munged bash -c 'munge -n | unmunge'
}

start_database() {
  local sock="$BASE/run/mysqld.sock"
  if [[ ! -d $BASE/mysql/mysql ]]; then
    mariadb-install-db --no-defaults --datadir="$BASE/mysql" --user=root --skip-test-db \
      >"$BASE/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed; see $BASE/log/mariadb-install.log"
  fi
  if ! pid_alive "$BASE/run/mysqld.pid"; then
    setsid mariadbd --no-defaults --datadir="$BASE/mysql" --user=root --bind-address=127.0.0.1 \
      --port="$DB_PORT" --socket="$sock" --pid-file="$BASE/run/mysqld.pid" --log-error="$BASE/log/mysqld.log" \
      --skip-name-resolve </dev/null >/dev/null 2>&1 &
  fi
  wait_until 120 "MariaDB on port $DB_PORT" mariadb-admin --no-defaults -S "$sock" ping
  mariadb --no-defaults -S "$sock" -e "CREATE USER IF NOT EXISTS slurm@'127.0.0.1' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO slurm@'127.0.0.1';"
}

node_ready() { [[ $(sinfo -h -N -o %t | grep -Ecx 'idle|mix|alloc|comp') -eq $NODES ]]; }
cluster_registered() { sacctmgr -n -P list cluster tessera format=ControlPort | grep -q '[0-9]'; }

start() {
  require_root start
  while (($#)); do
    case $1 in
      --nodes) NODES=${2:-}; shift 2 || die "--nodes needs a number (1 to $MAX_NODES)" ;;
      --nodes=*) NODES=${1#--nodes=}; shift ;;
      *) die "start: unknown argument $1 (usage: start [--nodes N])" ;;
    esac
  done
  [[ $NODES =~ ^[1-9][0-9]*$ ]] && ((NODES <= MAX_NODES)) || die "--nodes $NODES: give a number of nodes from 1 to $MAX_NODES"
  local running name k
  running=$(running_nodes | paste -sd,)
  if [[ -n $running ]] && pid_alive "$BASE/run/slurmctld.pid" && [[ $running != "$(node_names | paste -sd,)" ]]; then
    die "a cluster of $(running_nodes | wc -l) node(s) ($running) is running from $BASE; stop it first (sudo $0 stop), then start --nodes $NODES"
  fi
  install_packages
  trap 'echo "local_cluster: start failed; undoing it" >&2; stop >&2' EXIT  # a failed start leaves nothing
  if ((NODES == 1)); then
    getent hosts "$NODE" >/dev/null || echo "127.0.0.1 $NODE  # tessera-local-slurm" >> /etc/hosts
  else
    for ((k = 1; k <= NODES; k++)); do
      name=$NODE_PREFIX$k
      getent hosts "$name" >/dev/null && [[ $(getent hosts "$name" | awk '{print $1}') != "$NODE_NET.$k" ]] \
        && die "host name $name resolves to $(getent hosts "$name" | awk '{print $1}'), not $NODE_NET.$k; remove that entry"
      getent hosts "$name" >/dev/null || echo "$NODE_NET.$k $name  # tessera-local-slurm" >> /etc/hosts
    done
  fi
  mkdir -p "$BASE"/{etc,state,spool,log,run,fakedev}
  touch "$MANIFEST"
  write_configs
  for f in slurm.conf gres.conf slurmdbd.conf; do link_config "$f"; done
  start_munge
  start_database
  pid_alive "$BASE/run/slurmdbd.pid" || slurmdbd </dev/null >>"$BASE/log/daemons.out" 2>&1
  wait_until 60 slurmdbd sacctmgr -n list cluster
  pid_alive "$BASE/run/slurmctld.pid" || slurmctld </dev/null >>"$BASE/log/daemons.out" 2>&1
  for name in $(node_names); do start_slurmd "$name"; done
  if ! wait_until 120 "node(s) $(node_names | paste -sd,)" node_ready; then
    sinfo -N -l || true
    tail -n 20 "$BASE"/log/slurm*.log >&2 || true
    exit 1
  fi
  # slurmctld registers the cluster with slurmdbd on its own; jobs finish without accounting until it has.
  wait_until 60 "accounting for cluster tessera" cluster_registered
  trap - EXIT
  say "up: partition local on $(node_names | paste -sd,), $CPUS CPUs and $GPUS fake GPUs each; state and logs in $BASE"
}

status() {
  local down=0 d name file
  for d in munge/munged mysqld slurmdbd slurmctld; do
    if pid_alive "$BASE/run/$d.pid"; then echo "${d#*/}: running (pid $(cat "$BASE/run/$d.pid"))"
    else echo "${d#*/}: not running (from $BASE)"; down=1; fi
  done
  NODES=$(running_nodes | wc -l)
  ((NODES > 0)) || { NODES=1; echo "slurmd: not running (no configuration in $BASE)"; return 3; }
  for name in $(running_nodes); do
    file=$(slurmd_pid_file "$name")
    if pid_alive "$file"; then echo "slurmd $name: running (pid $(cat "$file"))"
    else echo "slurmd $name: not running (from $BASE)"; down=1; fi
  done
  if command -v sinfo >/dev/null && ((down == 0)); then sinfo -N; fi
  return $((down ? 3 : 0))
}

stop_daemon() {  # stop_daemon NAME: TERM the PID in its file, KILL after 10 s
  local file="$BASE/run/$1.pid" pid
  if pid_alive "$file"; then
    pid=$(cat "$file")
    kill "$pid"
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
    say "stopped ${1#*/} (pid $pid)"
  fi
  rm -f "$file"
}

stop() {
  require_root stop
  if pid_alive "$BASE/run/slurmctld.pid"; then  # cancel jobs first so no job step outlives slurmd
    scancel --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 40); do [[ -z $(squeue -h -o %A 2>/dev/null) ]] && break; sleep 0.5; done
  fi
  local file
  for file in "$BASE"/run/slurmd-*.pid; do [[ -e $file ]] && { file=${file##*/}; stop_daemon "${file%.pid}"; }; done
  for d in slurmd slurmctld slurmdbd mysqld munge/munged; do stop_daemon "$d"; done
  if [[ -s $MANIFEST ]]; then
    while read -r made; do [[ -L $made ]] && rm -f "$made"; done < "$MANIFEST"
  fi
  rm -f "$MANIFEST"
  sed -i '/# tessera-local-slurm$/d' /etc/hosts
  if [[ ${1:-} == --wipe ]]; then
    rm -rf "${BASE:?}"/{etc,state,spool,log,run,mysql,fakedev}
    say "wiped $BASE"
  fi
}

case ${1:-} in
  start) shift; start "$@" ;;
  stop) shift; stop "$@" ;;
  status) status ;;
  *) echo "usage: $0 start [--nodes N]|stop [--wipe]|status" >&2; exit 2 ;;
esac
