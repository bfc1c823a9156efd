#!/usr/bin/env bash
# A GPU job that outlives the device call that starts it: the device tool ends a call's processes when it
# returns, except those in a new process session (setsid), which run until the machine goes back; the machine
# stays held while calls follow each other within its warm period. So one call starts the job, and the next
# calls wait for it and bring its records back. The job runs from a snapshot of the repository (/root/bg/NAME/repo),
# so the next call's fresh copy of the working tree cannot change code under it.
#
#   bash bench/gpu_background.sh start NAME CMD...        # CMD runs in the snapshot; log /root/bg/NAME/log
#   bash bench/gpu_background.sh wait NAME SECONDS DIR    # until the job ends or SECONDS pass (progress every
#                                                         # 60 s), then DIR's small files -> $OUT/NAME.tar.gz
# `wait` exits 0 when the job has ended (its exit status is in /root/bg/NAME/rc), 3 while it still runs.
set -u
cmd=${1:?start|wait}
name=${2:?name}
bg=/root/bg/$name
case $cmd in
  start)
    shift 2
    mkdir -p "$bg"
    rm -rf "$bg/repo" "$bg/rc"
    # the working tree without the big carried parts (model pieces, wheels)
    tar --exclude=./.git --exclude=./.devmodel-a --exclude=./.devmodel-b --exclude=./.whl -cf - . \
      | (mkdir -p "$bg/repo" && tar -xf - -C "$bg/repo")
    date +%s > "$bg/started"
    (cd "$bg/repo" && setsid nohup bash -c '"$@"; echo $? > '"$bg/rc" _ "$@" > "$bg/log" 2>&1 < /dev/null &)
    sleep 2
    echo "started $name: $*"
    ;;
  wait)
    secs=${3:?seconds}
    dir=${4:?results dir}
    t0=$(date +%s)
    last=0
    while [ ! -f "$bg/rc" ] && [ $(( $(date +%s) - t0 )) -lt "$secs" ]; do
      sleep 5
      now=$(date +%s)
      if [ $(( now - last )) -ge 60 ]; then
        last=$now
        echo "-- $(( now - $(cat "$bg/started") ))s since start: $(nvidia-smi --query-gpu=utilization.gpu,memory.used \
          --format=csv,noheader 2>/dev/null | tr '\n' ' ')"
        grep -E '^== ' "$bg/log" | tail -4
      fi
    done
    echo "== log tail"
    tail -n 40 "$bg/log"
    if [ -n "${OUT:-}" ] && [ -d "$dir" ]; then
      # records only: files under 4 MB (no model weights), at most 2 levels down
      (cd "$dir" && find . -maxdepth 3 -type f -size -4M -print0 | tar --null -czf "$OUT/$name.tar.gz" -T -)
      cp "$bg/log" "$OUT/$name.log" 2>/dev/null
      echo "packed $(tar -tzf "$OUT/$name.tar.gz" | wc -l) files of $dir into \$OUT/$name.tar.gz"
    fi
    if [ -f "$bg/rc" ]; then
      echo "job $name ended, exit $(cat "$bg/rc")"
      exit 0
    fi
    echo "job $name still running"
    exit 3
    ;;
  *) echo "usage: $0 start|wait NAME ..." >&2; exit 2 ;;
esac
