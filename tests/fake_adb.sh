#!/usr/bin/env bash
# A stand-in for adb that treats this machine as the phone (tests of devices/android/bench.sh on x86): push =
# cp, shell = sh -c, forward = nothing (the "phone" listens on this machine's ports), getprop = fixed values.
set -euo pipefail
cmd=$1; shift
case $cmd in
  get-state) echo device ;;
  push) [ "$1" = --sync ] && shift; dest=${*: -1}; n=$(($# - 1)); cp "${@:1:$n}" "$dest" ;;
  shell)
    if [ "$1" = getprop ]; then
      case $2 in ro.product.model) echo "x86 stand-in" ;; ro.soc.model) echo "$(uname -m)" ;; *) echo "test" ;; esac
    else sh -c "$*"; fi ;;
  forward) ;;
  *) echo "fake adb: unknown command $cmd" >&2; exit 1 ;;
esac
