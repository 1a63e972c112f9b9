#!/bin/sh
# systemctl stand-in of gpufleet-scaleway-emulator.
# Runs the units of $GPUFLEET_ROOT/etc/systemd/system in the VM's process group,
# each under a restart loop (like Restart=always, RestartSec=), output to
# $GPUFLEET_VM_DIR/<unit>.log. Absolute paths that exist under $GPUFLEET_ROOT
# are mapped there (the emulator's lightweight chroot).
root=${GPUFLEET_ROOT:?GPUFLEET_ROOT is not set}
vmdir=${GPUFLEET_VM_DIR:-$root/..}
units=$vmdir/units
mkdir -p "$units"

unit_name() { case $1 in *.*) printf '%s' "$1" ;; *) printf '%s.service' "$1" ;; esac; }
unit_key() { gf_n=$(unit_name "$1"); printf '%s' "${gf_n%.service}"; }
map_path() {
  case $1 in /*) if [ -e "$root$1" ]; then printf '%s' "$root$1"; return; fi ;; esac
  printf '%s' "$1"
}
gf_exec() {
  for gf_a do
    shift
    case $gf_a in /*) if [ -e "$root$gf_a" ]; then gf_a=$root$gf_a; fi ;; esac
    set -- "$@" "$gf_a"
  done
  exec "$@"
}
unit_value() { sed -n "s/^[[:space:]]*$2[[:space:]]*=[[:space:]]*//p" "$1" | tail -n 1; }
is_active() {
  gf_k=$(unit_key "$1")
  [ -f "$units/$gf_k.pid" ] || return 1
  gf_p=$(cat "$units/$gf_k.pid")
  kill -0 "$gf_p" 2>/dev/null || return 1
  # A zombie is not running.
  case $(sed 's/.*) //' "/proc/$gf_p/stat" 2>/dev/null | cut -c1) in Z | X) return 1 ;; esac
  return 0
}

start_unit() {
  name=$(unit_name "$1")
  key=$(unit_key "$1")
  file=$root/etc/systemd/system/$name
  if [ ! -f "$file" ]; then
    echo "Failed to start $name: Unit $name not found." >&2
    return 5
  fi
  if is_active "$1"; then return 0; fi
  exec_start=$(unit_value "$file" ExecStart)
  if [ -z "$exec_start" ]; then
    echo "$name has no ExecStart=" >&2
    return 1
  fi
  while :; do case $exec_start in [-@+!:]*) exec_start=${exec_start#?} ;; *) break ;; esac; done
  restart_sec=$(unit_value "$file" RestartSec)
  restart_sec=${restart_sec%s}
  restart_sec=${restart_sec:-1}
  workdir=$(unit_value "$file" WorkingDirectory)
  envsh=$units/$key.env.sh
  : >"$envsh"
  sed -n 's/^[[:space:]]*Environment[[:space:]]*=[[:space:]]*//p' "$file" | while IFS= read -r line; do
    printf 'for gf_kv in %s; do export "$gf_kv"; done\n' "$line" >>"$envsh"
  done
  sed -n 's/^[[:space:]]*EnvironmentFile[[:space:]]*=[[:space:]]*//p' "$file" | while IFS= read -r f; do
    f=${f#-}
    f=$(map_path "$f")
    printf 'if [ -f "%s" ]; then set -a; . "%s"; set +a; fi\n' "$f" "$f" >>"$envsh"
  done
  (
    . "$envsh"
    if [ -n "$workdir" ]; then cd "$(map_path "$workdir")" || exit 1; else cd "$root" || exit 1; fi
    eval "set -- $exec_start"
    child=
    trap 'if [ -n "$child" ]; then kill "$child" 2>/dev/null; wait "$child" 2>/dev/null; fi; exit 0' TERM INT
    while :; do
      echo "[systemctl] starting $name: $exec_start"
      gf_exec "$@" &
      child=$!
      wait "$child"
      echo "[systemctl] $name exited with status $?; restarting in ${restart_sec}s"
      sleep "$restart_sec" &
      child=$!
      wait "$child"
    done
  ) >>"$vmdir/$key.log" 2>&1 </dev/null &
  echo $! >"$units/$key.pid"
}

stop_unit() {
  gf_k=$(unit_key "$1")
  if is_active "$1"; then
    gf_p=$(cat "$units/$gf_k.pid")
    kill "$gf_p" 2>/dev/null
    gf_i=0
    while kill -0 "$gf_p" 2>/dev/null && [ $gf_i -lt 100 ]; do sleep 0.05; gf_i=$((gf_i + 1)); done
  fi
  rm -f "$units/$gf_k.pid"
}

while :; do case ${1:-} in -*) shift ;; *) break ;; esac; done
cmd=${1:-}
[ $# -gt 0 ] && shift
now=0
names=
for a; do
  case $a in
    --now) now=1 ;;
    -*) ;;
    *) names="$names $a" ;;
  esac
done
rc=0
case $cmd in
  daemon-reload | daemon-reexec | reset-failed | mask | unmask) ;;
  enable)
    for n in $names; do
      grep -qx "$n" "$units/enabled" 2>/dev/null || echo "$n" >>"$units/enabled"
      if [ $now = 1 ]; then start_unit "$n" || rc=$?; fi
    done
    ;;
  disable)
    for n in $names; do
      if [ -f "$units/enabled" ]; then grep -vx "$n" "$units/enabled" >"$units/enabled.tmp"; mv "$units/enabled.tmp" "$units/enabled"; fi
      if [ $now = 1 ]; then stop_unit "$n"; fi
    done
    ;;
  start) for n in $names; do start_unit "$n" || rc=$?; done ;;
  stop) for n in $names; do stop_unit "$n"; done ;;
  restart | try-restart | reload-or-restart) for n in $names; do stop_unit "$n"; start_unit "$n" || rc=$?; done ;;
  is-active | status)
    for n in $names; do
      if is_active "$n"; then echo active; else echo inactive; rc=3; fi
    done
    ;;
  is-enabled)
    for n in $names; do
      if grep -qx "$n" "$units/enabled" 2>/dev/null; then echo enabled; else echo disabled; rc=1; fi
    done
    ;;
  *) echo "systemctl stand-in: '$cmd' ignored" >&2 ;;
esac
exit $rc
