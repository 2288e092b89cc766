#!/usr/bin/env bash
# On the GPU machine: the bf16 matrix rate in bursts (ceilings.py) and back to back
# (ceiling_sustain.py), with nvidia-smi logging the SM clock, power and throttle reasons every 100 ms
# into $OUT/sustain-smi.csv. Output: $OUT/sustain.txt.
source "$(dirname "$0")/device-env.sh"
smi_pid=$(device_smi_log "$OUT/sustain-smi.csv")
python3 scripts/ceiling_sustain.py ${SUSTAIN_ARGS:-} 2>&1 | tee "$OUT/sustain.txt" || status=1
kill $smi_pid 2>/dev/null
exit $status
