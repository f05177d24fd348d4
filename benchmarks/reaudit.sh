#!/bin/bash
# The demo, cleaned with each rule, audited again: the share flagged mislabeled in the
# cleaned data (issue 20's target: at most 1%). Usage: bash benchmarks/reaudit.sh
# (with minnorm-audit and python on PATH, e.g. an activated .venv).
set -e
D=$(mktemp -d)
minnorm-audit demo --out "$D" > /dev/null
for rule in relabel-mislabeled drop-flagged; do
  minnorm-audit clean "$D/run" --rule $rule --out "$D/clean-$rule.csv" > /dev/null
  minnorm-audit run "$D/clean-$rule.csv" --data-root "$D/data" --out "$D/re-$rule" --json > "$D/re-$rule.json" 2>/dev/null || true
  python - "$D" "$rule" <<'PY'
import sys, json
d, rule = sys.argv[1], sys.argv[2]
s = json.load(open(f"{d}/re-{rule}/summary.json")); n = s["num_examples"]; m = s["counts"]["mislabeled"]
print(f"re-audit after clean --rule {rule}: {n} rows, {m} flagged mislabeled ({m/n:.2%}), hard {s['counts']['hard']}, outlier {s['counts']['outlier']}")
PY
done
