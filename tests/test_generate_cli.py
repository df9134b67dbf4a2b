"""`python -m turbos_jax.generate` on the quickstart config: sampling from a trained checkpoint and
the one-line errors. (The production settings' train -> generate run is test_production_path.py.)"""

import re
import subprocess
import sys

from helpers import ROOT, subprocess_env


def _generate_cli(workdir, *extra):
    cmd = [
        sys.executable,
        "-m",
        "turbos_jax.generate",
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        *extra,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)


def test_cli_generates_from_trained_checkpoint(tmp_path):
    """The quickstart config; the production settings' run is tests/test_production_path.py."""
    train = [sys.executable, "-m", "turbos_jax.train", "--config=configs/tiny.py", f"--workdir={tmp_path}"]
    sizes = ["--config.total_steps=2", "--config.batch_size=4", "--config.seq_len=32"]
    out = subprocess.run(
        [*train, *sizes, "--config.eval_every_steps=0"],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    sampling = ["--max_new_tokens=12", "--temperature=0.8", "--top_k=20", "--seed=1"]
    out = _generate_cli(tmp_path, "--prompt=Hello", *sampling, "--prefill_chunk=2")  # 3 chunks
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("[checkpoint step 2] Hello") and len(out.stdout.strip()) > 25


def test_cli_errors(tmp_path):
    out = _generate_cli(tmp_path, "--prompt=Hi")
    assert out.returncode == 1
    assert out.stderr.strip().startswith("error:") and "no checkpoint" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    out = _generate_cli(tmp_path, "--prompt=Hi", "--top_p=1.5")
    assert out.returncode == 1 and "top_p" in out.stderr.strip().splitlines()[-1]
    out = _generate_cli(tmp_path, "--prompt=Hi", "--prefill_chunk=-1")
    assert out.returncode == 1 and "--prefill_chunk=-1" in out.stderr.strip().splitlines()[-1]
    out = _generate_cli(tmp_path, "--prompt=Hi", "--stop_text=ab")  # two byte tokens
    assert out.returncode == 1
    want = "error: --stop_text='ab': must be one token of the tokenizer, is 2"
    assert out.stderr.strip().splitlines()[-1] == want


def test_cli_stops_at_the_sft_stop_text():
    """configs/sft_tiny.py's stop_text "\\n" ends the answer of the shipped SFT parameters (the
    bytes tokenizer has no EOS); `--stop_text=` (the EOS: none) lets it run on past the newline."""
    from turbos_jax.posttrain.arithmetic import SFT_PARAMS

    def generate(*extra):
        cmd = [sys.executable, "-m", "turbos_jax.generate", "--config=configs/sft_tiny.py"]
        cmd += [f"--workdir={SFT_PARAMS}", "--prompt=478+256=", "--max_new_tokens=12", *extra]
        out = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    stopped = generate()
    assert re.fullmatch(r"\[checkpoint step 1800\] 478\+256=\d+\n", stopped), stopped
    unstopped = generate("--stop_text=")
    assert unstopped.startswith(stopped) and len(unstopped) > len(stopped)  # same answer, then more
