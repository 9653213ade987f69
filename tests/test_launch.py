"""launch/: the commands of --dry-run, one-line parameter errors, and openmoe-train's env rule."""
import argparse
import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

from openmoe_jax.commands import cli as main_lib
from openmoe_jax.gin_utils import UsageError

ROOT = pathlib.Path(__file__).resolve().parent.parent
GIN = ["--gin_file=openmoe/8b_stage1.gin", "--gin.UMT5_SPM_PATH='gs://b/umt5.model'",
       "--gin.TASK_FEATURE_LENGTHS={'inputs': 8, 'targets': 8}"]
TPU = ["--name=openmoe-8b", "--zone=europe-west4-a", "--accelerator_type=v3-256",
       "--model_dir=gs://b/8b"]
SLURM = ["--nodes=2", "--gpus_per_node=8", "--partition=gpu", "--time=48:00:00"]
# Stand-ins for gcloud, sbatch, scontrol and srun: they record their argv (and the launch
# environment) as one JSON line in $FAKE_LOG; gcloud fails when an argument contains $FAKE_FAIL.
FAKE = """#!{python}
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as f:
  f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:] + [
      os.environ.get(k) for k in ("OPENMOE_COORDINATOR_ADDRESS", "OPENMOE_PROCESS_COUNT",
                                  "JAX_LOCAL_DEVICE_IDS")]) + "\\n")
if sys.argv[0].endswith("scontrol"):
  print("gpu001\\ngpu002")
fail = os.environ.get("FAKE_FAIL")
sys.exit(3 if fail and any(fail in a for a in sys.argv) else 0)
"""


@pytest.fixture
def fake(tmp_path):
  """An environment whose PATH starts with the stand-ins; returns (env, read_log)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name in ("gcloud", "sbatch", "scontrol", "srun"):
    (bin_dir / name).write_text(FAKE.format(python=sys.executable))
    (bin_dir / name).chmod(0o755)
  log = tmp_path / "calls.jsonl"
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_LOG=str(log))
  read = lambda: [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []
  return env, read


def _launch(script, *args, env=None, cwd=None):
  return subprocess.run([sys.executable, str(ROOT / "launch" / script), *args], env=env, cwd=cwd,
                        capture_output=True, text=True, timeout=60)


def _between(words, start, end):
  return words[words.index(start) + 1:words.index(end)]


def test_tpu_dry_run_creates_installs_and_runs_one_command_on_all_workers():
  r = _launch("tpu_vm.py", *TPU, "--on_exit=delete", "--dry-run", "--", *GIN)
  assert r.returncode == 0 and r.stderr == "", r.stderr
  cmds = [shlex.split(line) for line in r.stdout.splitlines()]
  gcloud = ["gcloud", "compute", "tpus", "tpu-vm"]
  assert cmds[0][:6] == gcloud + ["create", "openmoe-8b"]
  assert {"--zone=europe-west4-a", "--accelerator-type=v3-256",
          "--version=tpu-ubuntu2204-base"} <= set(cmds[0])
  assert cmds[1][:2] == ["git", "-C"] and cmds[2][:5] == gcloud + ["scp"]
  ssh = [c for c in cmds if c[:5] == gcloud + ["ssh"]]
  assert len(ssh) == 2 and all("--worker=all" in c for c in ssh)
  assert "pip install" in ssh[0][-1] and "jax[tpu]" in ssh[0][-1]
  remote = shlex.split(ssh[1][-1].removeprefix("--command="))
  assert "OPENMOE_COORDINATOR_ADDRESS=auto" in remote
  assert _between(remote, "openmoe_jax.main", "2>&1") == GIN + ["--gin.MODEL_DIR='gs://b/8b'"]
  assert cmds[-1] == gcloud + ["delete", "openmoe-8b", "--zone=europe-west4-a", "--quiet"]


def test_tpu_runs_what_dry_run_prints_and_deletes_the_slice_after_a_failure(fake, tmp_path):
  env, calls = fake
  args = [*TPU, "--reuse", "--install=git", "--repo_url=https://example.com/openmoe_jax",
          "--on_exit=delete", "--project=my-project", "--", *GIN]
  dry = _launch("tpu_vm.py", "--dry-run", *args)
  assert dry.returncode == 0, dry.stderr
  r = _launch("tpu_vm.py", *args, env=dict(env, FAKE_FAIL="openmoe_jax.main"), cwd=tmp_path)
  assert r.returncode == 3
  assert [c[:-3] for c in calls()] == [shlex.split(l) for l in dry.stdout.splitlines()]
  assert "create" not in dry.stdout and "git+https://example.com/openmoe_jax@main" in dry.stdout
  assert calls()[-1][4] == "delete" and "--project=my-project" in calls()[-1]


@pytest.mark.parametrize("processes,tasks,per_node,device_ids", [
    ("per_gpu", 16, 8, None), ("per_node", 2, 1, "0,1,2,3,4,5,6,7")])
def test_slurm_script_starts_the_same_command_with_counts_and_coordinator(
    fake, tmp_path, processes, tasks, per_node, device_ids):
  env, calls = fake
  r = _launch("slurm.py", *SLURM, f"--processes={processes}", "--setup=echo set up", "--dry-run",
              "--", *GIN)
  assert r.returncode == 0 and r.stderr == "", r.stderr
  assert f"#SBATCH --ntasks-per-node={per_node}\n" in r.stdout
  assert {"#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
          "#SBATCH --time=48:00:00"} <= set(r.stdout.splitlines())
  script = tmp_path / "job.sbatch"
  script.write_text(r.stdout)
  job = subprocess.run(["bash", str(script)], env=dict(env, SLURM_JOB_NODELIST="gpu[001-002]"),
                       capture_output=True, text=True, timeout=60)
  assert job.returncode == 0 and job.stdout == "set up\n", job.stderr
  scontrol, srun = calls()
  assert scontrol[:4] == ["scontrol", "show", "hostnames", "gpu[001-002]"]
  assert srun[-3:] == ["gpu001:8476", str(tasks), device_ids]
  assert srun[1:-3] == ["--nodes=2", f"--ntasks={tasks}", f"--ntasks-per-node={per_node}",
                        "--kill-on-bad-exit=1", "openmoe-train", *GIN]


def test_slurm_writes_and_submits_the_script(fake, tmp_path):
  env, calls = fake
  r = _launch("slurm.py", *SLURM, "--script=run.sbatch", "--", *GIN, env=env, cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  assert calls() == [["sbatch", "run.sbatch", None, None, None]]
  assert (tmp_path / "run.sbatch").read_text().startswith("#!/bin/bash\n#SBATCH")


def test_local_dry_run_gives_each_process_its_index():
  r = _launch("local.py", "--num_processes=3", "--num_cpu_devices=2", "--dry-run", "--", *GIN)
  assert r.returncode == 0 and r.stderr == "", r.stderr
  lines = [shlex.split(line) for line in r.stdout.splitlines()]
  assert len(lines) == 3
  envs = [dict(w.split("=", 1) for w in line[:4]) for line in lines]
  assert [e["OPENMOE_PROCESS_INDEX"] for e in envs] == ["0", "1", "2"]
  assert {e["OPENMOE_PROCESS_COUNT"] for e in envs} == {"3"}
  assert len({e["OPENMOE_COORDINATOR_ADDRESS"] for e in envs}) == 1
  assert envs[0]["OPENMOE_COORDINATOR_ADDRESS"].startswith("127.0.0.1:")
  assert all(line[4:] == lines[0][4:] for line in lines)
  assert lines[0][5:] == ["-m", "openmoe_jax.main", *GIN, "--num_cpu_devices=2"]


def test_local_stops_the_others_when_one_process_fails(tmp_path):
  python = tmp_path / "python"  # process 1 fails at once; process 0 would run for a minute
  python.write_text('#!/bin/sh\necho "started $OPENMOE_PROCESS_INDEX"\n'
                    '[ "$OPENMOE_PROCESS_INDEX" = 1 ] && exit 5\nexec sleep 60\n')
  python.chmod(0o755)
  r = _launch("local.py", f"--python={python}", "--", *GIN, cwd=tmp_path)
  assert r.returncode == 5
  assert "[1] started 1" in r.stdout.splitlines()
  assert r.stderr == "local.py: process 1 exited with code 5; the others were stopped\n"


def test_local_names_the_killed_process_and_holds_back_its_peers_traceback(tmp_path):
  """Process 0 is SIGKILLed; process 1 then loses its peer and fails with a traceback of its
  own: the launcher names process 0 and does not print process 1's traceback."""
  python = tmp_path / "python"
  python.write_text(
      '#!/bin/sh\necho "started $OPENMOE_PROCESS_INDEX"\n'
      'if [ "$OPENMOE_PROCESS_INDEX" = 0 ]; then sleep 1; kill -9 $$; fi\n'
      'sleep 0.2\necho "Traceback (most recent call last):"\n'
      'echo "  File x, line 1"\necho "RuntimeError: coordination service: peer 0 is gone"\n'
      'exec sleep 30\n')
  python.chmod(0o755)
  r = _launch("local.py", f"--python={python}", "--", *GIN, cwd=tmp_path)
  assert r.returncode == 1
  assert "[0] started 0" in r.stdout.splitlines()
  assert "Traceback" not in r.stdout and "peer 0 is gone" not in r.stdout
  assert r.stderr == ("local.py: process 0 exited with code -9; the others were stopped (the "
                      "traceback of process 1, which lost its peer, is not shown)\n")


@pytest.mark.parametrize("script,args,needle", [
    ("tpu_vm.py", [a for a in TPU if not a.startswith("--zone")], "--zone"),
    ("tpu_vm.py", [*TPU, "--zone=europe-west4"], "europe-west4"),
    ("tpu_vm.py", [*TPU, "--accelerator_type=v3_256"], "v3_256"),
    ("tpu_vm.py", [*TPU, "--model_dir=/data/8b"], "gs://"),
    ("tpu_vm.py", [*TPU, "--on_exit=stop"], "cannot stop"),
    ("tpu_vm.py", [*TPU, "--install=git"], "--repo_url"),
    ("tpu_vm.py", [*TPU, "--acelerator_type=v3-8"], "--acelerator_type"),
    ("tpu_vm.py", [*TPU, "--", *GIN, "--gin.MODEL_DIR='gs://b/x'"], "--model_dir"),
    ("tpu_vm.py", [*TPU, "--", *GIN, "--process_index=0"], "--process_index"),
    ("tpu_vm.py", TPU, "--gin_file"),
    ("slurm.py", [*SLURM, "--nodes=0"], "--nodes"),
    ("slurm.py", [*SLURM, "--gpus_per_node=eight"], "eight"),
    ("slurm.py", [*SLURM, "--processes=per_core"], "per_core"),
    ("slurm.py", [*SLURM, "--time=forever"], "forever"),
    ("slurm.py", [a for a in SLURM if not a.startswith("--nodes")], "--nodes"),
    ("slurm.py", [*SLURM, "--", *GIN, "--coordinator_address=h:1"], "--coordinator_address"),
    ("local.py", ["--num_processes=0"], "--num_processes"),
    ("local.py", ["--num_cpu_devices=-1"], "--num_cpu_devices"),
    ("local.py", ["--", "--gin_file=quickstart.gin", "--process_count=2"], "--process_count"),
    ("local.py", [], "--gin_file"),
])
def test_bad_parameters_fail_with_one_line_before_anything_runs(fake, tmp_path, script, args,
                                                                needle):
  env, calls = fake
  if "--" not in args and "--gin_file" != needle:
    args = [*args, "--", *GIN]
  r = _launch(script, *args, env=env, cwd=tmp_path)
  assert r.returncode == 2 and r.stdout == "", r.stdout
  assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"{script}: error: "), r.stderr
  assert needle in r.stderr
  assert calls() == [] and sorted(p.name for p in tmp_path.iterdir()) == ["bin"]


def _settings(environ, **flags):
  args = argparse.Namespace(**{"coordinator_address": None, "process_count": None,
                               "process_index": None, **flags})
  return main_lib.distributed_settings(args, environ)


def test_openmoe_train_takes_flags_then_launcher_environment_then_slurm():
  ours = {"OPENMOE_COORDINATOR_ADDRESS": "h:1", "OPENMOE_PROCESS_COUNT": "4",
          "OPENMOE_PROCESS_INDEX": "2"}
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "gpu[001-002]", "SLURM_NTASKS": "16",
           "SLURM_PROCID": "5", "SLURM_LOCALID": "5"}
  assert _settings({}) is None
  assert _settings({}, coordinator_address="a:9", process_count=2, process_index=1) == ("a:9", 2, 1)
  assert _settings(ours) == ("h:1", 4, 2)
  assert _settings(ours, process_index=0) == ("h:1", 4, 0)
  assert _settings(dict(slurm, OPENMOE_COORDINATOR_ADDRESS="gpu001:8476")) == ("gpu001:8476", 16, 5)
  assert _settings(slurm) == "auto"  # jax's SLURM detection, never 16 lone processes
  assert _settings(dict(slurm, SLURM_NTASKS="1")) is None
  assert _settings({"OPENMOE_COORDINATOR_ADDRESS": "auto"}) == "auto"
  assert _settings({"TPU_WORKER_HOSTNAMES": "t0,t1"}) == "auto"
  assert _settings({"TPU_WORKER_HOSTNAMES": "localhost"}) is None  # one worker: one process
  for bad in ({"OPENMOE_COORDINATOR_ADDRESS": "h:1"}, dict(ours, OPENMOE_PROCESS_INDEX="4"),
              dict(ours, OPENMOE_PROCESS_COUNT="four")):
    with pytest.raises(UsageError):
      _settings(bad)
