"""Text generators for the post-training data tools: `prompts -> responses`, one call per batch.

A generator is any callable `(list[str]) -> list[str]` (one response per prompt, in order), so a
tool accepts a checkpoint, an API client or a scripted fake alike. `CheckpointGenerator` wraps a
trained workdir through the generation API:

    gen = CheckpointGenerator(config, "/tmp/turbos-sft", max_new_tokens=40, batch_size=64)
    gen(["478+256="])  # ["8+6=14 7+5+1=13 4+2+1=7 #### 734"]

1. `config.model` gives the architecture; the newest checkpoint's parameters are restored
   (`turbos_jax.generate.restore_params`, one device).
2. A prompt is rendered as SFT renders a user turn (`config.sft.role_prefixes`, then the assistant
   prefix), so a model decodes in the format it was fine-tuned on; a `continuation` (text the
   assistant already wrote, e.g. failed attempts) is appended after the assistant prefix.
3. Greedy (or sampled, `temperature` > 0) decoding until `config.sft.stop_text` / EOS or
   `max_new_tokens`; the stop token is removed from the text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np

Generator = Callable[[list[str]], list[str]]


class CheckpointGenerator:
    """A generator backed by a workdir's newest checkpoint (module docstring)."""

    def __init__(
        self,
        config,
        workdir: str,
        *,
        max_new_tokens: int,
        batch_size: int = 64,
        temperature: float = 0.0,
        seed=0,
    ):
        from turbos_jax.config import ModelConfig
        from turbos_jax.data.sft import make_format
        from turbos_jax.generate import restore_params

        self.fmt = make_format(config)
        self.graphdef, self.params, self.step = restore_params(
            ModelConfig.from_config(config.model), workdir, config
        )
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.temperature, self.rng = temperature, jax.random.key(seed)

    def encode_prompt(self, prompt: str, continuation: str = "") -> np.ndarray:
        """The user turn, then the assistant turn opened with `continuation` (no stop token)."""
        from turbos_jax.data.sft import encode_turns

        ids, _, _ = encode_turns([("user", prompt), ("assistant", continuation)], self.fmt, open_last=True)
        return np.asarray(ids, np.int32)

    def __call__(self, prompts: Sequence[str], continuations: Sequence[str] | None = None) -> list[str]:
        from turbos_jax.generation.sampling import SamplingParams
        from turbos_jax.posttrain.evaluation import decode, decode_text

        continuations = continuations or [""] * len(prompts)
        encoded = [self.encode_prompt(p, c) for p, c in zip(prompts, continuations, strict=True)]
        self.rng, rng = jax.random.split(self.rng)
        outs = decode(
            self.graphdef,
            self.params,
            encoded,
            stop_id=self.fmt.stop_id,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            sampling=SamplingParams(temperature=self.temperature),
            rng=rng,
        )
        return [decode_text(self.fmt.tokenizer, o, self.fmt.stop_id) for o in outs]


def load_config_file(flag: str, path: str):
    """`get_config()` of the ml_collections config file `path` (a data tool's --FLAG); one-line
    UserError when it is not a readable .py file."""
    import importlib.util

    from turbos_jax.cli import UserError

    spec = importlib.util.spec_from_file_location("turbos_tool_config", path)
    if spec is None or not path.endswith(".py"):
        raise UserError(f"--{flag}={path!r}: not a Python config file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except FileNotFoundError:
        raise UserError(f"--{flag}={path!r}: no such file") from None
    return module.get_config()
