"""Collectives of an optimized HLO module (`compiled.as_text()`), counted per executed step.

Each collective instruction is counted with the number of times it runs: XLA's text lists a
while loop's body once, so an instruction in the body of a loop of 8 iterations (the microbatch
scan; the trip count from `known_trip_count` or the loop condition's `i < 8`) counts 8 times,
and so do its bytes. Bytes are the instruction's result (what one device receives), summed over
the tuple elements of combined collectives. Async pairs are counted once, at their `-done`
(or at the synchronous op inside an `async-start`'s computation). A ragged all-to-all's bytes
are its whole output buffer, what it can receive: the rows that travel depend on the routing.
"""
import re
from typing import Dict, List

KINDS = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute",
         "ragged-all-to-all")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s(" + "|".join(KINDS) +
                 r")(-done)?\(")
_CALLS = re.compile(r"\b(body|condition|to_apply|calls|branch_computations|async_computation)"
                    r"=(\{[^}]*\}|%?[\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"([0-9]+)"\}')
_CONST = re.compile(r"%?([\w.\-]+)\s*=\s*s32\[\][^ ]*\s+constant\((-?[0-9]+)\)")
_LT = re.compile(r"compare\(%?[\w.\-]+,\s*%?([\w.\-]+)\),\s*direction=LT")


_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_LIST_GROUPS = re.compile(r"replica_groups=\{\{([0-9,]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[[0-9]+,([0-9]+)\]")


def group_size(line: str) -> int:
  """Devices per replica group of a collective instruction (0 when not stated)."""
  m = _MESH_GROUPS.search(line)
  if m:
    sizes = dict((k.strip("'\" "), int(v)) for k, v in
                 (kv.split("=") for kv in m.group(1).split(",") if "=" in kv))
    size = 1
    for name in re.findall(r"'([^']+)'", m.group(2)):
      size *= sizes.get(name, 1)
    return size
  m = _LIST_GROUPS.search(line) or _IOTA_GROUPS.search(line)
  if m:
    return len(m.group(1).split(",")) if "," in m.group(1) or m.re is _LIST_GROUPS else int(
        m.group(1))
  return 0


def _shape_bytes(shape: str) -> int:
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _BYTES.get(dtype, 1)
  return total


def _computations(hlo: str):
  """{name: [lines]} and the entry computation's name."""
  comps, entry, current = {}, None, None
  for line in hlo.splitlines():
    if not line.startswith((" ", "\t")) and line.rstrip().endswith("{"):
      m = _HEADER.match(line)
      if m:
        current = m.group(1)
        comps[current] = []
        if line.startswith("ENTRY"):
          entry = current
        continue
    if current is not None:
      if line.strip() == "}":
        current = None
      else:
        comps[current].append(line)
  return comps, entry


def _trip_count(line: str, comps) -> int:
  """A while loop's trip count: XLA's known_trip_count, else the `i < constant` of a scan's
  condition (lax.scan and fori_loop count from 0 by 1); 1 when neither is found."""
  m = _TRIP.search(line)
  if m:
    return int(m.group(1))
  cond = re.search(r"condition=%?([\w.\-]+)", line)
  body = comps.get(cond.group(1), []) if cond else []
  consts = dict(c for l in body for c in _CONST.findall(l))
  bounds = [consts.get(n) for l in body for n in _LT.findall(l)]
  return int(bounds[0]) if len(bounds) == 1 and bounds[0] is not None else 1


def collective_ops(hlo: str) -> List[dict]:
  """Every collective instruction: kind, result shape text, bytes, runs per step, devices per
  replica group."""
  comps, entry = _computations(hlo)
  found: List[dict] = []

  def walk(name: str, runs: int, depth: int = 0):
    if name not in comps or depth > 64:
      return
    for line in comps[name]:
      m = _OP.match(line)
      if m and "-start(" not in line:
        found.append({"kind": m.group(2), "shape": m.group(1), "bytes": _shape_bytes(m.group(1)),
                      "runs": runs, "computation": name, "group_size": group_size(line)})
      for key, targets in _CALLS.findall(line):
        if key == "condition":
          continue
        trip = _trip_count(line, comps) if key == "body" else 1
        for target in targets.strip("{}").split(","):
          walk(target.strip().lstrip("%"), runs * trip, depth + 1)

  walk(entry, 1)
  return found


def collectives(hlo: str) -> Dict[str, Dict[str, int]]:
  """{kind: {"count": executions per step, "bytes": result bytes per step}} for KINDS."""
  out = {k: {"count": 0, "bytes": 0} for k in KINDS}
  for op in collective_ops(hlo):
    out[op["kind"]]["count"] += op["runs"]
    out[op["kind"]]["bytes"] += op["bytes"] * op["runs"]
  return out


def estimated_cycles(hlo: str) -> Dict[str, int]:
  """XLA:TPU's per-instruction `estimated_cycles` (backend_config of the optimized HLO), summed:
  {"total": all computations, "loop_body": the body computations of the while loops}. A
  cross-check of where a program's time goes; no overlap is modelled."""
  comps, _ = _computations(hlo)
  cycles = lambda lines: sum(int(c) for l in lines
                             for c in re.findall(r'"estimated_cycles":"(\d+)"', l))
  bodies = {b for lines in comps.values() for l in lines if " while(" in l
            for b in re.findall(r"body=%?([\w.\-]+)", l)}
  return {"total": sum(cycles(v) for v in comps.values()),
          "loop_body": sum(cycles(comps.get(b, [])) for b in bodies)}
