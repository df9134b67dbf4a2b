"""What an install ships: a wheel built from this checkout holds `configs` (importable without the
repository, as a Colab `pip install git+...` gives), the packaged tokenizer of configs/small.py and
the GRPO demonstration's SFT parameters."""

import glob
import os
import shutil
import subprocess
import sys
import zipfile

from helpers import ROOT, subprocess_env

_NOT_SOURCES = shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", ".*_cache", "workdir*")


def _build_wheel(tmp_path) -> str:
    """`pip wheel . --no-deps` of a copy of the checkout (setuptools writes build/ and *.egg-info
    next to the sources, so the worktree itself is left alone); returns the wheel's path."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCES)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path / "dist")],
        check=True,
        capture_output=True,
    )
    (wheel,) = glob.glob(str(tmp_path / "dist" / "*.whl"))
    return wheel


def test_wheel_ships_configs_and_tokenizer_and_they_import_without_the_checkout(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    checkout_configs = glob.glob(os.path.join(ROOT, "configs", "*.py"))
    config_files = {f"configs/{os.path.basename(p)}" for p in checkout_configs}
    assert {"configs/__init__.py", "configs/tiny.py", "configs/small.py"} <= config_files
    assert config_files <= names, sorted(config_files - names)
    assert "turbos_jax/data/embedded_bpe.json" in names
    assert "turbos_jax/posttrain/shipped/sft_tiny_addition.safetensors" in names

    # Import from the unpacked wheel only: PYTHONPATH holds it, and the working directory holds no
    # checkout (dependencies still come from site-packages).
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    script = (
        "import configs, turbos_jax\n"
        "from configs import small, tiny\n"
        "from turbos_jax.data import load_tokenizer\n"
        "tok = load_tokenizer(small.get_config().data.tokenizer)\n"
        "print(configs.__file__, turbos_jax.__file__, tok.vocab_size, tiny.get_config().model.vocab_size)\n"
    )
    env = subprocess_env(share_cache=False, PYTHONPATH=str(site))
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0].startswith(str(site)) and out[1].startswith(str(site)), out
    assert out[2:] == ["8192", "256"]
