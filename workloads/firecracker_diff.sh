#!/usr/bin/env bash
# A real Firecracker diff snapshot with its byte-exact reference (tests/test_store_firecracker.py):
#   workloads/firecracker_diff.sh WORKDIR
# boots ../shared/firecracker's counter guest with dirty-page tracking, pauses it and takes a Full
# snapshot (WORKDIR/base.mem), resumes it for a moment, pauses it again and takes a Diff snapshot
# (WORKDIR/diff.mem: a sparse file holding only the pages dirtied since base.mem), then a Full
# snapshot of the same paused VM (WORKDIR/full.mem): parent + diff must equal full.mem byte for byte.
# Needs: /dev/kvm, gcc, ld, curl; FIRECRACKER=path (default ../shared/firecracker/firecracker).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
kit=${FIRECRACKER_KIT:-$here/../../shared/firecracker}
fc=${FIRECRACKER:-$kit/firecracker}
work=$(mkdir -p "$1" && cd "$1" && pwd)
api() { local s=$1; shift; curl -sS --fail --unix-socket "$s" -X "$1" "http://localhost$2" \
          -H 'Content-Type: application/json' ${3:+-d "$3"}; }
wait_for() { for _ in $(seq 1 1000); do eval "$1" && return 0; sleep 0.01; done; echo "timeout: $1" >&2; return 1; }
gcc -c "$kit/counter.S" -o "$work/counter.o"
ld -static -nostdlib -Ttext=0x1000000 -e _start "$work/counter.o" -o "$work/counter.elf"
rm -f "$work/fc.sock" "$work"/*.snap "$work"/*.mem
"$fc" --api-sock "$work/fc.sock" --level Warning >"$work/serial.log" 2>&1 & pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
wait_for "[ -S '$work/fc.sock' ]"
api "$work/fc.sock" PUT /machine-config '{"vcpu_count":1,"mem_size_mib":128,"track_dirty_pages":true}'
api "$work/fc.sock" PUT /boot-source "{\"kernel_image_path\":\"$work/counter.elf\",\"boot_args\":\"console=ttyS0\"}"
api "$work/fc.sock" PUT /actions '{"action_type":"InstanceStart"}'
wait_for "grep -q COUNTER_BOOT_OK '$work/serial.log'"
sleep 0.5
api "$work/fc.sock" PATCH /vm '{"state":"Paused"}'
api "$work/fc.sock" PUT /snapshot/create "{\"snapshot_type\":\"Full\",\"snapshot_path\":\"$work/base.snap\",\"mem_file_path\":\"$work/base.mem\"}"
api "$work/fc.sock" PATCH /vm '{"state":"Resumed"}'
sleep 0.5
api "$work/fc.sock" PATCH /vm '{"state":"Paused"}'
api "$work/fc.sock" PUT /snapshot/create "{\"snapshot_type\":\"Diff\",\"snapshot_path\":\"$work/diff.snap\",\"mem_file_path\":\"$work/diff.mem\"}"
api "$work/fc.sock" PUT /snapshot/create "{\"snapshot_type\":\"Full\",\"snapshot_path\":\"$work/full.snap\",\"mem_file_path\":\"$work/full.mem\"}"
echo "base.mem $(stat -c %s "$work/base.mem") bytes; diff.mem $(stat -c %s "$work/diff.mem") bytes, $(du -k "$work/diff.mem" | cut -f1) KiB allocated; full.mem $(stat -c %s "$work/full.mem") bytes"
