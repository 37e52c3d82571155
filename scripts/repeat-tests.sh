#!/bin/sh
# Run the README's test command (its second line) N times in a row and print
# how many runs were green: a verdict that is red one run in ten is a defect.
#
#     scripts/repeat-tests.sh 10
#
# Each run's output goes to reports/repeat/run-K.log; the exit status is 0
# only when every run passed.
set -u
here=$(cd "$(dirname "$0")/.." && pwd)
n=${1:-10}
case $n in ''|*[!0-9]*) echo "repeat-tests.sh: N must be a number, not '$n'" >&2; exit 2;; esac
cmd=$(sed -n 2p "$here/README.md" | sed 's/^    //')
mkdir -p "$here/reports/repeat"
green=0
k=1
while [ "$k" -le "$n" ]; do
    start=$(date +%s)
    if (cd "$here" && sh -c "$cmd") > "$here/reports/repeat/run-$k.log" 2>&1; then
        green=$((green + 1))
        verdict=green
    else
        verdict="RED (reports/repeat/run-$k.log)"
    fi
    echo "run $k/$n: $verdict in $(( $(date +%s) - start )) s"
    k=$((k + 1))
done
echo "repeat-tests.sh: $green of $n runs green: $cmd"
[ "$green" -eq "$n" ]
