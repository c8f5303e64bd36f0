#!/usr/bin/env bash
# One Snakemake attempt of a job: attempt.sh LOG ATTEMPT COMMAND [ARGS...]
#
# Snakemake deletes a failed job's log before it retries the job, and tells the retry nothing of why the
# previous attempt ended ("message: None" after a kill). This wrapper keeps every attempt's output in
# LOG.attemptN (besides LOG), records the command's exit status in LOG.exit, and hands the previous
# attempt's status to the command as ROUTELAB_PREVIOUS_EXIT ("unrecorded" when its shell died with it).
set -u
log=$1 attempt=$2
shift 2
previous=none
if [ "$attempt" -gt 1 ]; then
    previous=$(cat "$log.exit" 2>/dev/null || echo unrecorded)
else
    rm -f "$log".attempt* "$log.exit"
fi
rm -f "$log.exit"
mkdir -p "$(dirname "$log")"
ROUTELAB_PREVIOUS_EXIT=$previous "$@" 2>&1 | tee "$log.attempt$attempt" > "$log"
status=${PIPESTATUS[0]}
echo "$status" > "$log.exit"
exit "$status"
