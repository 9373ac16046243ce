"""Rehearse a multi-host (TPU pod / multi-node GPU) launch on one machine: N processes of the same command.

  python -m launch.local_multiprocess -n 2 -d 2 -- python -m launch.train --config configs/edm_cifar10.py:tiny --workdir W
  python -m launch.local_multiprocess -n 2 -d 2 -- python -m launch.sample --model W/round_002 --seeds 0-63 --outdir S

Each process is started with the variables a pod or cluster launcher would give it, read by
`ddo_jax.parallel.maybe_initialize_distributed` (the same path as on a TPU pod slice or under SLURM):

  JAX_COORDINATOR_ADDRESS=localhost:PORT  JAX_NUM_PROCESSES=N  JAX_PROCESS_ID=i
  and, on CPU (the default):  JAX_PLATFORMS=cpu  XLA_FLAGS=--xla_force_host_platform_device_count=D
  or, with --platform=gpu:    JAX_LOCAL_DEVICE_IDS=i*D,...,i*D+D-1 (D GPUs of this machine per process)

so every process sees D local devices and N*D global devices, and CPU collectives go through gloo (TCP).
Each line a process prints is shown with its id (`[p1] ...`, stderr to stderr). The exit code is 0 when
every process exits 0, otherwise the first failing process's code (128+N for a signal N; of processes
seen failing at the same moment, one killed by a signal counts first: its death is the likely cause).

A process that dies (a crash, a kill, an out-of-memory) would leave the others waiting on a collective or a
barrier; the launcher therefore watches them: once one exits with a non-zero code, the others get
`--grace` seconds to end on their own (they usually fail with it), then SIGTERM, then SIGKILL 5 s later,
with a message naming the process that failed. Rerunning the same command resumes (launch.train).
"""
import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

_KILL_AFTER_TERM_S = 5.0


def free_port() -> int:
  """A TCP port free at this moment on localhost (the coordinator binds it a moment later)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def process_env(base: dict, *, process_id: int, num_processes: int, devices: int, port: int,
                platform: str = "cpu", heartbeat_s: int = 0) -> dict:
  """The environment of process `process_id`: what a pod or cluster launcher would set."""
  env = dict(base)
  env["JAX_COORDINATOR_ADDRESS"] = f"localhost:{port}"
  env["JAX_NUM_PROCESSES"] = str(num_processes)
  env["JAX_PROCESS_ID"] = str(process_id)
  env["PYTHONUNBUFFERED"] = "1"
  if heartbeat_s:
    env["DDO_JAX_HEARTBEAT_TIMEOUT"] = str(heartbeat_s)
  if platform == "cpu":
    env["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  else:
    env["JAX_LOCAL_DEVICE_IDS"] = ",".join(str(process_id * devices + k) for k in range(devices))
  return env


def _pump(stream, out, prefix: str, lock: threading.Lock) -> None:
  for raw in iter(stream.readline, b""):
    line = raw.decode(errors="replace")
    with lock:
      out.write(prefix + line if line.endswith("\n") else prefix + line + "\n")
      out.flush()
  stream.close()


def _code(rc: int) -> int:
  return 128 - rc if rc < 0 else rc   # a signal N (Popen's -N) as a shell shows it: 128 + N


def _say(msg: str) -> None:
  print(f"[launcher] {msg}", file=sys.stderr, flush=True)


def launch(command, *, num_processes: int, devices: int, port: int = 0, platform: str = "cpu",
           grace: float = 20.0, heartbeat_s: int = 0, env=None, timeout: float = 0) -> int:
  """Run `command` (a list) as `num_processes` processes; returns the exit code described above."""
  port = port or free_port()
  base = dict(os.environ if env is None else env)
  lock = threading.Lock()
  procs, pumps = [], []
  for i in range(num_processes):
    p = subprocess.Popen(command, env=process_env(base, process_id=i, num_processes=num_processes, devices=devices,
                                                  port=port, platform=platform, heartbeat_s=heartbeat_s),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    procs.append(p)
    for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
      t = threading.Thread(target=_pump, args=(stream, out, f"[p{i}] ", lock), daemon=True)
      t.start()
      pumps.append(t)
  _say(f"{num_processes} processes x {devices} {platform} devices, coordinator localhost:{port}, "
       f"pids {[p.pid for p in procs]}")

  stopped = set()   # processes the launcher itself ended (their codes are consequences, not causes)
  reported = set()  # processes whose failure was reported
  first_failure = None
  failed_at = None
  interrupted = []

  def on_signal(signum, _frame):
    interrupted.append(signum)

  old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

  def stop(sig, why: str):
    for i, p in enumerate(procs):
      if p.poll() is None:
        _say(f"{why}: sending {signal.Signals(sig).name} to process {i} (pid {p.pid})")
        stopped.add(i)
        try:
          os.killpg(p.pid, sig)   # its own session: the process and anything it started
        except ProcessLookupError:
          pass

  t0 = time.time()
  term_sent_at = None
  try:
    while True:
      running = any(p.poll() is None for p in procs)
      now = time.time()
      if interrupted and term_sent_at is None:
        stop(signal.SIGTERM, f"launcher got {signal.Signals(interrupted[0]).name}")
        term_sent_at = now
      if timeout and now - t0 > timeout and term_sent_at is None:
        _say(f"timeout: {timeout:.0f} s passed")
        first_failure = first_failure or (None, 124)
        stop(signal.SIGTERM, "timeout")
        term_sent_at = now
      # Failures seen in this pass, a process killed by a signal first: when a peer dies, the survivor can
      # fail (its collective sees the closed connection) before the next pass, and the death is the cause.
      new = [(i, p.returncode) for i, p in enumerate(procs)
             if p.poll() not in (None, 0) and i not in stopped and i not in reported]
      for i, rc in sorted(new, key=lambda item: item[1] >= 0):
        reported.add(i)
        how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
        if first_failure is None:
          first_failure, failed_at = (i, _code(rc)), now
          alive = [j for j, q in enumerate(procs) if q.poll() is None]
          _say(f"process {i} failed ({how}); the other processes {alive} get {grace:.0f} s to end, then are "
               "stopped (a peer that died leaves them waiting on a collective)")
        else:
          _say(f"process {i} failed ({how}) too")
      if failed_at is not None and term_sent_at is None and now - failed_at > grace:
        stop(signal.SIGTERM, f"process {first_failure[0]} failed")
        term_sent_at = now
      if term_sent_at is not None and now - term_sent_at > _KILL_AFTER_TERM_S:
        stop(signal.SIGKILL, "still running after SIGTERM")
        term_sent_at = float("inf")
      if not running:
        break
      time.sleep(0.05)
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    for t in pumps:
      t.join(timeout=5)
    for s, h in old.items():
      signal.signal(s, h)

  codes = [_code(p.returncode) for p in procs]
  if interrupted:
    worst = 128 + interrupted[0]
  elif first_failure is not None:
    worst = first_failure[1]
  else:
    own = [c for i, c in enumerate(codes) if i not in stopped and c != 0]
    worst = own[0] if own else 0
  _say(f"exit codes {codes} after {time.time() - t0:.1f} s; returning {worst}")
  return worst


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m launch.local_multiprocess", description=__doc__.split("\n\n")[0],
      epilog="Everything after -- is the command each process runs.", formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("-n", "--num_processes", type=int, default=2, help="processes to start (default 2)")
  parser.add_argument("-d", "--devices_per_process", type=int, default=2,
                      help="devices each process drives (virtual CPU devices, or GPUs with --platform=gpu)")
  parser.add_argument("--platform", choices=("cpu", "gpu"), default="cpu")
  parser.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
  parser.add_argument("--grace", type=float, default=20.0,
                      help="seconds the others get to end after one process fails, before they are stopped")
  parser.add_argument("--heartbeat_timeout", type=int, default=0,
                      help="jax.distributed heartbeat timeout in seconds (DDO_JAX_HEARTBEAT_TIMEOUT; "
                           "default: ddo_jax's)")
  parser.add_argument("--timeout", type=float, default=0, help="stop everything after this many seconds (0: never)")
  parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("no command given: put it after --, e.g. -- python -m launch.train --config ... --workdir ...")
  if args.num_processes < 1 or args.devices_per_process < 1:
    parser.error("--num_processes and --devices_per_process must be >= 1")
  if command[0] in ("python", "python3"):
    command = [sys.executable] + command[1:]   # the launcher's interpreter (its virtual environment)
  return launch(command, num_processes=args.num_processes, devices=args.devices_per_process, port=args.port,
                platform=args.platform, grace=args.grace, heartbeat_s=args.heartbeat_timeout, timeout=args.timeout)


if __name__ == "__main__":
  sys.exit(main())
