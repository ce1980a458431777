# The step runner of the prepared device checks (gpu_check.sh, tpu_check.sh), sourced by them.
# step NAME SECONDS COMMAND...: run COMMAND under a time limit (SECONDS x LIMIT_FACTOR, default 1) when
# ONLY is empty or names it; log to OUT/NAME.log, append "NAME rc=.. ..s" to OUT/steps.txt, print the
# log's last TAIL_LINES lines (default 5), then refresh the one archive ARCHIVE (a run cut short still
# returns what it measured).
step() {
  local name=$1 limit=$(( $2 * ${LIMIT_FACTOR:-1} )); shift 2
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  local start=$(date +%s)
  echo "=== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - start ))s" | tee -a "$OUT/steps.txt"
  tail -n "${TAIL_LINES:-5}" "$OUT/$name.log"
  tar czf "$ARCHIVE.part" -C "$OUT" . 2>/dev/null && mv "$ARCHIVE.part" "$ARCHIVE"
}
