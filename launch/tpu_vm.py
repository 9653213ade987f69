"""Trains on a Cloud TPU VM slice with gcloud: create (or reuse) the slice, install openmoe_jax on
every worker, run the same openmoe-train command on all workers (logs stream back), then keep,
stop or delete the slice. Every command is echoed before it runs; --dry-run only prints them.

  python launch/tpu_vm.py --name=openmoe-8b --zone=europe-west4-a --accelerator_type=v3-256 \\
      --model_dir=gs://my-bucket/openmoe-8b --on_exit=delete \\
      -- --gin_file=openmoe/8b_stage1.gin --gin.UMT5_SPM_PATH="'gs://my-bucket/umt5.model'"

The workers call jax.distributed.initialize() with jax's Cloud TPU detection
(OPENMOE_COORDINATOR_ADDRESS=auto); see docs/launch.md.
"""
import re
import shutil
import sys
import tempfile

import common

# Runtime (--version) per TPU generation, from the Cloud TPU "runtime versions" page.
RUNTIMES = {"v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base",
            "v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite",
            "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
TRAIN = ["python3", "-m", "openmoe_jax.main"]  # = openmoe-train, whether or not it is on PATH


def num_workers(accelerator_type: str) -> int:
  """TPU VM hosts of a slice: 8 TensorCores (v2-v5p) or 4 chips (v5e, v6e) per host of a pod."""
  generation, size = accelerator_type.split("-")
  if int(size) <= 8:
    return 1
  return int(size) // (4 if generation in ("v5litepod", "v6e") else 8)


def build_parser() -> common.Parser:
  p = common.Parser("tpu_vm.py", __doc__)
  p.add_argument("--name", required=True, help="TPU VM name, e.g. openmoe-8b")
  p.add_argument("--zone", required=True, help="GCP zone, e.g. europe-west4-a")
  p.add_argument("--accelerator_type", required=True,
                 help="slice type, e.g. v3-256, v4-64, v5litepod-16, v6e-8")
  p.add_argument("--version", help="TPU runtime version (default: " + ", ".join(
      f"{k}: {v}" for k, v in RUNTIMES.items()) + ")")
  p.add_argument("--project", help="GCP project (default: gcloud's configured project)")
  p.add_argument("--model_dir", required=True,
                 help="MODEL_DIR given to openmoe-train; a gs:// path on multi-worker slices, "
                      "whose workers share no disk")
  p.add_argument("--reuse", action="store_true", help="use an existing slice; skip the create")
  p.add_argument("--spot", action="store_true", help="create a Spot (preemptible) slice")
  p.add_argument("--install", choices=("copy", "git", "none"), default="copy",
                 help="copy: ship this checkout's HEAD (git archive) and pip install -e it; "
                      "git: pip install --repo_url@--git_ref; none: already installed")
  p.add_argument("--repo_url", help="with --install=git: the repository, e.g. "
                                    "https://github.com/ORG/openmoe_jax")
  p.add_argument("--git_ref", default="main", help="with --install=git: branch, tag or commit")
  p.add_argument("--worker_log", default="openmoe-train.log",
                 help="each worker also appends its output to this file in its home folder "
                      "('' to skip)")
  p.add_argument("--on_exit", choices=("keep", "stop", "delete"), default="keep",
                 help="what to do with the slice when training ends, failed or not")
  return p


def check(p: common.Parser, args, train_args) -> None:
  """Every parameter error, before any command runs."""
  if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", args.name):
    p.error(f"--name={args.name!r}: lowercase letters, digits and '-', starting with a letter")
  if not re.fullmatch(r"[a-z]+-[a-z]+[0-9]+-[a-z]", args.zone):
    p.error(f"--zone={args.zone!r} is not a zone such as europe-west4-a")
  if not re.fullmatch(r"v[0-9]+[a-z]*-[0-9]+", args.accelerator_type):
    p.error(f"--accelerator_type={args.accelerator_type!r} is not a type such as v3-256")
  generation = args.accelerator_type.split("-")[0]
  if not args.version and generation not in RUNTIMES:
    p.error(f"no default runtime for {generation}: pass --version")
  if "'" in args.model_dir:
    p.error(f"--model_dir={args.model_dir!r} contains a quote")
  workers = num_workers(args.accelerator_type)
  if workers > 1 and not args.model_dir.startswith("gs://"):
    p.error(f"--model_dir={args.model_dir!r}: {args.accelerator_type} has {workers} workers "
            "that share no disk; use a gs:// bucket path")
  if args.on_exit == "stop" and workers > 1:
    p.error(f"gcloud cannot stop a multi-worker slice ({args.accelerator_type}); "
            "use --on_exit=delete or keep")
  if args.install == "git" and not args.repo_url:
    p.error("--install=git needs --repo_url")
  if args.install == "copy" and not (common.ROOT / ".git").exists():
    p.error(f"--install=copy ships a git checkout, and {common.ROOT} is not one; use --install=git")
  if any(a.startswith("--gin.MODEL_DIR=") for a in train_args):
    p.error("give the model dir as --model_dir, not --gin.MODEL_DIR")
  if not args.dry_run and not shutil.which("gcloud"):
    p.error("gcloud not found on PATH (install the Google Cloud SDK)")


def commands(args, train_args):
  """(setup commands, the training command, the on-exit command or None)."""
  gcloud = ["gcloud", "compute", "tpus", "tpu-vm"]
  where = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])
  ssh = gcloud + ["ssh", args.name] + where + ["--worker=all"]
  setup = []
  if not args.reuse:
    version = args.version or RUNTIMES[args.accelerator_type.split("-")[0]]
    setup.append(gcloud + ["create", args.name] + where + [
        f"--accelerator-type={args.accelerator_type}", f"--version={version}"]
        + (["--spot"] if args.spot else []))
  pip = ["python3", "-m", "pip", "install", "-q"]
  if args.install == "copy":
    tarball = f"{tempfile.gettempdir()}/openmoe_jax-{args.name}.tar.gz"
    setup.append(["git", "-C", str(common.ROOT), "archive", "--format=tar.gz",
                  "--prefix=openmoe_jax/", f"--output={tarball}", "HEAD"])
    setup.append(gcloud + ["scp", tarball, f"{args.name}:openmoe_jax.tar.gz"] + where
                 + ["--worker=all"])
    remote = ("rm -rf openmoe_jax && tar xzf openmoe_jax.tar.gz && "
              + common.join(pip + ["-r", "openmoe_jax/requirements.txt", "jax[tpu]"]) + " && "
              + common.join(pip + ["--no-deps", "-e", "./openmoe_jax"]))
    setup.append(ssh + [f"--command={remote}"])
  elif args.install == "git":
    source = f"openmoe_jax @ git+{args.repo_url}@{args.git_ref}"
    setup.append(ssh + ["--command=" + common.join(pip + [source, "jax[tpu]"])])
  remote = "OPENMOE_COORDINATOR_ADDRESS=auto " + common.join(
      TRAIN + train_args + [f"--gin.MODEL_DIR='{args.model_dir}'"])
  if args.worker_log:
    remote = f"set -o pipefail; {remote} 2>&1 | tee -a {common.quote(args.worker_log)}"
  train = ssh + [f"--command={remote}"]
  on_exit = None
  if args.on_exit == "stop":
    on_exit = gcloud + ["stop", args.name] + where
  elif args.on_exit == "delete":
    on_exit = gcloud + ["delete", args.name] + where + ["--quiet"]
  return setup, train, on_exit


def main(argv=None) -> int:
  p = build_parser()
  args, train_args = common.parse(p, argv)
  check(p, args, train_args)
  setup, train, on_exit = commands(args, train_args)
  if args.dry_run:
    for cmd in setup + [train] + ([on_exit] if on_exit else []):
      print(common.join(cmd))
    return 0
  created = False  # the on-exit command runs once a slice exists, whatever happens next
  try:
    for cmd in setup:
      rc = common.run(cmd)
      if rc:
        print(f"tpu_vm.py: exit code {rc} from: {common.join(cmd)}", file=sys.stderr)
        return rc
      created = True
    return common.run(train)
  finally:
    if on_exit and (created or args.reuse):
      common.run(on_exit)


if __name__ == "__main__":
  sys.exit(main())
