"""launch/gcloud.sh: the commands a dry run prints for a full create -> install -> train -> delete
flow, one-line errors for missing flags, and shellcheck (when installed)."""

import os
import shlex
import shutil
import subprocess

import pytest
from helpers import ROOT

SCRIPT = os.path.join(ROOT, "launch", "gcloud.sh")
BASE = ["--name=tjax", "--zone=us-east5-a", "--project=proj"]
TPU = "gcloud compute tpus tpu-vm"
WHERE = "--zone=us-east5-a --project=proj"


FAKE_GCLOUD = """#!/usr/bin/env bash
# Records its arguments; fails the trainer's ssh (exit 3) to test what happens after a failure.
printf '%s\\n' "$*" >> "$GCLOUD_LOG"
[[ $* == *turbos_jax.train* ]] && exit 3
exit 0
"""


@pytest.fixture(autouse=True)
def fake_gcloud(tmp_path, monkeypatch):
    """A recording `gcloud` first on PATH: dry runs must never call it (its log stays empty)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    log = tmp_path / "gcloud.log"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("GCLOUD_LOG", str(log))
    monkeypatch.setenv("TMPDIR", "/tmp")
    yield log
    if "--dry-run" in _launch.last:
        assert not log.exists(), log.read_text()


def _launch(*args, check=True):
    _launch.last = args
    out = subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    if check:
        assert out.returncode == 0, out.stderr
    return out


_launch.last = ()


def test_dry_run_prints_the_whole_flow():
    out = _launch(
        *BASE,
        "--dry-run",
        "--accelerator-type=v5p-16",
        "--spot",
        "--config=configs/small.py",
        "--workdir=/mnt/runs/r1",
        "all",
        "--",
        "--config.total_steps=2000",
        "--config.seed=7",
    )
    lines = out.stdout.strip().splitlines()
    assert lines[0] == (
        f"{TPU} create tjax --accelerator-type=v5p-16 --version=v2-alpha-tpuv5 --spot {WHERE}"
    )
    assert (
        lines[1].startswith(f"git -C {ROOT} ls-files") and "tar -czf /tmp/turbos-jax-tjax.tar.gz" in lines[1]
    )
    assert lines[2] == (f"{TPU} scp /tmp/turbos-jax-tjax.tar.gz tjax:turbos-jax.tar.gz --worker=all {WHERE}")
    install = shlex.split(lines[3])
    assert install[:7] == [*TPU.split(), "ssh", "tjax", "--worker=all"]
    assert install[7] == "--command" and install[-2:] == WHERE.split()
    assert "tar -xzf ~/turbos-jax.tar.gz -C ~/turbos-jax" in install[8]
    assert "uv venv --allow-existing --python 3.11 ~/turbos-venv" in install[8]
    assert 'pip install --python ~/turbos-venv/bin/python -e "$HOME/turbos-jax[tpu]"' in install[8]

    train = shlex.split(lines[4])
    assert train[:8] == [*TPU.split(), "ssh", "tjax", "--worker=all", "--command"]
    assert train[8] == (
        "set -o pipefail; mkdir -p ~/turbos-logs && cd ~/turbos-jax && "
        "~/turbos-venv/bin/python -m turbos_jax.train --config=configs/small.py "
        "--workdir=/mnt/runs/r1 --config.total_steps=2000 --config.seed=7 2>&1 | "
        "tee ~/turbos-logs/train-$(hostname).log"
    )
    assert lines[5:] == [
        "mkdir -p logs/tjax",
        f"{TPU} scp 'tjax:turbos-logs/*' logs/tjax/ --worker=all {WHERE}",
        f"{TPU} delete tjax --quiet {WHERE}",
    ]
    assert not os.path.exists(os.path.join(ROOT, "logs", "tjax"))  # printed, not run


def test_dry_run_git_install_detached_train_and_stop():
    out = _launch(
        *BASE,
        "--dry-run",
        "--git-url=https://example.com/o/turbos-jax.git@v1.2",
        "--python-version=3.12",
        "--config=configs/turbos.py",
        "--workdir=/mnt/x",
        "--detach",
        "install",
        "train",
        "stop",
        "--",
        "--config.batch_size=64",
    )
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3
    install = shlex.split(lines[0])[8]
    assert install.startswith(
        "set -e; rm -rf ~/turbos-jax && git clone --quiet "
        "https://example.com/o/turbos-jax.git ~/turbos-jax && "
        "git -C ~/turbos-jax checkout --quiet v1.2;"
    )
    assert "--python 3.12" in install
    train = shlex.split(lines[1])[8]
    assert (
        "nohup ~/turbos-venv/bin/python -m turbos_jax.train --config=configs/turbos.py "
        "--workdir=/mnt/x --config.batch_size=64 > ~/turbos-logs/train-$(hostname).log "
        "2>&1 < /dev/null &" in train
    )
    assert lines[2] == f"{TPU} stop tjax {WHERE}"


def test_trainer_arguments_survive_the_remote_shell():
    """An argument with spaces and quotes reaches the trainer intact through `ssh --command`."""
    odd = "--config.data.sources={'web': '/data/my files/*.jsonl'}"
    out = _launch(*BASE, "--dry-run", "--config=c.py", "--workdir=w", "train", "--", odd)
    remote = shlex.split(out.stdout.splitlines()[0])[8]
    trainer = remote.split(" && ")[-1].split(" 2>&1 |")[0]
    assert shlex.split(trainer)[-1] == odd


@pytest.mark.parametrize(
    "args, message",
    [
        (["--zone=z", "delete"], "error: --name is required"),
        (["--name=n", "delete"], "error: --zone is required"),
        (["--name=n", "--zone=z", "create"], "error: create needs --accelerator-type"),
        (["--name=n", "--zone=z", "--config=c", "train"], "error: train needs --workdir"),
        (
            ["--name=n", "--zone=z", "--workdir=w", "all", "--accelerator-type=v5p-8"],
            "error: train needs --config",
        ),
        (["--name=n", "--zone=z"], "error: no command given"),
        (["--name=n", "--zone=z", "launch"], "error: unknown command 'launch'"),
        (["--name=n", "--zone=z", "--colour=red", "delete"], "error: unknown flag --colour"),
        (["--name=n", "--zone"], "error: --zone needs a value"),
        (
            ["--name=n", "--zone=z", "--accelerator-type=tpu7-8", "create"],
            "error: --version is required for accelerator type tpu7-8",
        ),
    ],
)
def test_missing_or_bad_flags_give_one_line_errors(args, message):
    out = _launch("--dry-run", *args, check=False)
    assert out.returncode == 2
    assert out.stdout == ""  # nothing runs before the flags are checked
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith(message), out.stderr


def test_help():
    out = _launch("--help")
    assert out.stdout.startswith("Usage: launch/gcloud.sh")
    for word in ("create", "install", "train", "logs", "delete", "--dry-run", "--spot", "--git-url"):
        assert word in out.stdout


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck():
    out = subprocess.run(["shellcheck", SCRIPT], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout


def test_failed_training_still_fetches_logs_and_deletes_the_slice(tmp_path, fake_gcloud):
    """A real (non-dry) run against the recording gcloud: training fails on the workers, yet the logs
    are fetched and the slice deleted, and the script exits with the trainer's status."""
    logs = tmp_path / "logs"
    out = _launch(
        *BASE,
        "--accelerator-type=v4-16",
        f"--logs-dir={logs}",
        "--config=c.py",
        "--workdir=/w",
        "all",
        check=False,
    )
    assert out.returncode == 3, out.stderr
    calls = fake_gcloud.read_text().splitlines()
    assert [c.split()[3] for c in calls] == ["create", "scp", "ssh", "ssh", "scp", "delete"]
    assert "--version=tpu-ubuntu2204-base" in calls[0]
    tarball = calls[1].split()[4]
    listing = subprocess.run(["tar", "-tzf", tarball], capture_output=True, text=True).stdout.split()
    assert {"pyproject.toml", "turbos_jax/train.py", "launch/gcloud.sh"} <= set(listing)
    assert logs.is_dir()
