"""Per-op time of a jax.profiler trace (the perfetto JSON written by `edm_cifar10.py --profile_dir DIR`).

  python benchmarks/edm_cifar10.py --size tiny --batch 32 --steps 4 --skip_sampler --profile_dir /tmp/prof
  python benchmarks/profile_ops.py /tmp/prof [--top 30] [--hlo step.hlo.txt]

Sums the durations of the XLA CPU thunks (events on the XLA worker threads) by op name and by kind
(convolution, fusion kind, copy/transpose, ...), as a share of all op time. With --hlo (an HLO text dump of the
compiled program, `compiled.as_text()`), fusions are classified by their root instruction.
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re


def load_events(path):
  files = sorted(glob.glob(os.path.join(path, "**", "perfetto_trace.json.gz"), recursive=True))
  if not files:
    raise SystemExit(f"no perfetto_trace.json.gz under {path}")
  d = json.load(gzip.open(files[-1]))
  return d["traceEvents"] if isinstance(d, dict) else d


def kind_of(name: str, hlo_kinds: dict) -> str:
  base = re.sub(r"[.:]\d+$", "", name)
  if name in hlo_kinds:
    return hlo_kinds[name]
  for key, k in (("convolution", "convolution"), ("conv", "convolution"), ("dot", "dot"),
                 ("transpose", "transpose/copy"), ("copy", "transpose/copy"), ("reduce", "reduction"),
                 ("fusion", "fusion"), ("broadcast", "broadcast"), ("concatenate", "concatenate"),
                 ("slice", "slice"), ("pad", "pad"), ("rng", "rng"), ("while", "while"), ("sort", "sort")):
    if key in base:
      return k
  return "other"


def hlo_phases(text: str) -> dict:
  """instruction name -> phase, from the op_name metadata of an HLO text dump: 'backward' (transpose(...)),
  'forward' (jvp(...)), 'reference' (the network outside jvp), 'optimizer/other'."""
  phases = {}
  for line in text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
    if not m:
      continue
    op = re.search(r'op_name="([^"]*)"', line)
    op = op.group(1) if op else ""
    if "transpose(" in op:
      ph = "backward"
    elif "jvp(" in op and ("Precond" in op or "model" in op):
      ph = "forward (trained net)"
    elif "Precond" in op or "/model/" in op:
      ph = "reference net"
    elif op:
      ph = "optimizer/loss/other"
    else:
      ph = "no metadata"
    phases.setdefault(m.group(1), ph)
  return phases


def hlo_fusion_kinds(text: str) -> dict:
  """fusion name -> 'fusion:<root opcode>' from an HLO text dump."""
  comps, kinds = {}, {}
  cur = None
  for line in text.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if m:
      cur = m.group(1)
      continue
    if cur and "ROOT" in line:
      m = re.search(r"= \S+ (\w[\w\-]*)\(", line)
      if m:
        comps[cur] = m.group(1)
  for line in text.splitlines():
    m = re.search(r"%?([\w.\-]+) = .* fusion\(.*calls=%?([\w.\-]+)", line)
    if m:
      kinds[m.group(1)] = "fusion:" + comps.get(m.group(2), "?")
  return kinds


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("trace_dir")
  ap.add_argument("--top", type=int, default=25)
  ap.add_argument("--hlo", default="")
  a = ap.parse_args()
  ev = load_events(a.trace_dir)
  threads = {e["tid"]: e["args"]["name"] for e in ev if e.get("ph") == "M" and e.get("name") == "thread_name"}
  hlo_text = open(a.hlo).read() if a.hlo else ""
  hlo_kinds = hlo_fusion_kinds(hlo_text) if a.hlo else {}
  phases = hlo_phases(hlo_text) if a.hlo else {}
  by_name, by_kind, count = collections.Counter(), collections.Counter(), collections.Counter()
  by_phase, phase_count = collections.Counter(), collections.Counter()
  skip = re.compile(r"^\$|ThunkExecutor|Execute|PjRt|ThreadpoolListener|Handle |Allocate|CreateOutputs|"
                    r"ParseArguments|PjitFunction|CollectGarbage|TaskRunner|ExecuteThunks")
  for e in ev:
    if e.get("ph") != "X" or "XLA" not in threads.get(e.get("tid"), "") and "Eigen" not in threads.get(
        e.get("tid"), ""):
      continue
    name = e["name"]
    if skip.search(name):
      continue
    by_name[name] += e["dur"]
    count[name] += 1
    by_kind[kind_of(name, hlo_kinds)] += e["dur"]
    ph = phases.get(name, "?")
    by_phase[ph] += e["dur"]
    phase_count[ph] += 1
  total = sum(by_name.values()) or 1.0
  print(f"op time on XLA threads: {total / 1e3:.1f} ms in {sum(count.values())} op events")
  print("by kind:")
  for k, t in by_kind.most_common():
    print(f"  {k:28s} {t / 1e3:9.1f} ms  {100 * t / total:5.1f} %")
  if phases:
    print("by phase (from the HLO's op_name metadata):")
    for k, t in by_phase.most_common():
      print(f"  {k:28s} {t / 1e3:9.1f} ms  {100 * t / total:5.1f} %  {phase_count[k]} op events")
  print(f"top {a.top} ops:")
  for n, t in by_name.most_common(a.top):
    print(f"  {n[:60]:60s} {t / 1e3:9.1f} ms  {100 * t / total:5.1f} %  x{count[n]}")


if __name__ == "__main__":
  main()
