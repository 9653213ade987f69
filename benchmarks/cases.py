"""The case loop shared by the compile benchmarks (tpu_plan.py, decode_tpu.py): one JSON line
per case on stdout (and appended to --out), a failed case recorded as {"case", "error"}."""
import json


def run_cases(cases, run_case, out=None) -> None:
  for case in cases:
    try:
      row = run_case(case)
    except Exception as e:  # pylint: disable=broad-except  (one failed case is a row, not the end)
      row = {"case": case, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    line = json.dumps(row)
    print(line, flush=True)
    if out:
      with open(out, "a") as f:
        f.write(line + "\n")
