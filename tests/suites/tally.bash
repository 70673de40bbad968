# Sourced by suites (not a suite itself: tests/run runs *.sh). tally_cargo FILE RC adds the
# `test result:` counts of a cargo test log to $passed and $failed; an exit code other than 0
# with no failed test (a build error, a crash, a test binary that never ran) counts as one failure.
tally_cargo() {
  local p f
  p=$(grep -E '^test result:' "$1" | sed -E 's/.* ([0-9]+) passed.*/\1/' | awk '{s+=$1} END {print s+0}')
  f=$(grep -E '^test result:' "$1" | sed -E 's/.* ([0-9]+) failed.*/\1/' | awk '{s+=$1} END {print s+0}')
  [ "$2" != 0 ] && [ "$f" = 0 ] && f=1
  passed=$((passed + p)); failed=$((failed + f))
}
