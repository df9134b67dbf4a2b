"""Hunyuan-TurboS, the full 560B / 56B-active model (arXiv 2505.15431, Table 1).

    python -m turbos_jax.summary --config=configs/turbos.py

Every model key is defined and commented here once; `tiny.py` and `small.py` start from this file and
change sizes only. Choices the report leaves open (see docs/architecture.md):
  * layout: every mixer is followed by its own FFN -> 64 (mixer, FFN) pairs, 7 with attention:
    ("AF" + "MF" * 8) * 7 + "MF" = 7 A, 57 M, 64 F = 128 layers.
  * attention head_dim 128 and Mamba2 head_dim 64 (d_inner 4096): the only pair that lands on both
    560B total and 56B active; vocab 128K = 131,072 (the tokenizer is not public).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # --- run
    config.seed = 0  # parameter init and data order both derive from it
    config.total_steps = 1_800_000  # optimizer steps (16T tokens / ~9M tokens per step)
    config.batch_size = 2240  # global sequences per step: 2240 x 4096 = ~9.2M tokens
    # Microbatches per optimizer step (gradients summed in fp32; same update, less activation
    # memory): 2240 = 7 x 320 fits v5p-1024 (turbos_jax.aot, docs/sharding.md).
    config.grad_accum_steps = 7
    config.seq_len = 4096  # packed sequence length (4K pre-training)
    config.log_every_steps = 10  # metrics.jsonl / TensorBoard / console cadence
    config.eval_every_steps = 2000  # held-out loss cadence (0 = never)
    config.eval_batches = 8  # batches per evaluation
    config.checkpoint_every_steps = 1000  # Orbax save cadence (also saved on SIGTERM and at the end)
    config.keep_checkpoints = 3  # newest complete checkpoints kept
    config.on_nonfinite = "stop"  # non-finite loss: "stop" (last good checkpoint kept) or "skip"
    # A workdir whose newest checkpoint starts this run when its own workdir has none (a resume
    # wins): `train` takes parameters, optimizer state and step (the next pre-training stage),
    # `sft` parameters only (docs/training.md). "" = start from scratch.
    config.init_from = ""
    # Persistent XLA compilation cache: reruns load compiled programs instead of compiling them,
    # and on CPU their steps run faster too (turbos_jax/compile_cache.py). "" = off; the
    # JAX_COMPILATION_CACHE_DIR environment variable, when set, takes precedence.
    config.compilation_cache_dir = "~/.cache/turbos_jax/xla"

    # --- device mesh (turbos_jax/sharding.py, docs/sharding.md): axis sizes, product = device count;
    # one axis may be -1 (= the remaining devices). Checked against the model and batch_size.
    # TurboS: model=8 (tensor parallel over 2 v5p hosts of 4 chips; hosts holding the same batch
    # rows load the same data: 8 | 64 heads, 8 KV heads, 16 groups, 17,024 expert width),
    # expert=8 (4 of the 32 experts per shard; the all-to-all stays inside a small group),
    # data=-1 (FSDP over the rest). batch_size needs data*expert*grad_accum_steps | 2240, e.g.
    # 512 chips (v5p-1024): data=8. AOT-compiled there (turbos_jax.aot): 2240 x 4096 in one pass
    # does not fit, 7 microbatches of 320 do (74.7 GiB/chip; docs/sharding.md).
    mesh = config.mesh = ml_collections.ConfigDict()
    mesh.data = -1  # data parallel + FSDP (parameters' d_model dimension)
    mesh.expert = 8  # expert parallel: routed experts split, batch also split over it
    mesh.model = 8  # tensor parallel: heads, KV heads, Mamba2 groups, expert width, vocab
    mesh.context = 1  # context parallelism: each sequence split in this many shards (seq_len % context == 0)

    # --- data (turbos_jax/data): sources, tokenizer, mixture phases
    d = config.data = ml_collections.ConfigDict()
    d.sources = {"embedded": "embedded"}  # name -> file, glob or "embedded" (bundled corpus)
    d.text_key = "text"  # record field holding the text (JSONL, Parquet, ArrayRecord of JSON)
    d.tokenizer = "bytes"  # "bytes", or a path to a SentencePiece .model / HF tokenizer.json
    d.mixture = ((0, {"embedded": 1.0}),)  # (first_step, {source: weight}) phases, by step
    d.eval_fraction = 0.01  # share of each source's documents held out for evaluation
    d.worker_count = 0  # grain worker processes per host (0 = in-process)

    # --- optimizer (turbos_jax/optim.py): AdamW with chained LR phases
    o = config.optim = ml_collections.ConfigDict()
    # (kind, steps, end_lr) phases: warmup (linear from 0), cosine, anneal (fast cosine),
    # constant; each starts where the previous ended.
    o.schedule = (("warmup", 2000, 3e-4), ("cosine", 1_700_000, 3e-5), ("anneal", 98_000, 5e-6))
    o.b1 = 0.9  # AdamW beta1
    o.b2 = 0.95  # AdamW beta2
    o.eps = 1e-8  # AdamW epsilon
    o.weight_decay = 0.1  # decoupled; not applied to norms, biases, A_log, D, dt_bias, embeddings
    o.grad_clip = 1.0  # global-norm clipping threshold

    m = config.model = ml_collections.ConfigDict()
    # --- layout and sizes
    # One symbol per layer: A attention, M Mamba2, F MoE FFN, D dense FFN (imported checkpoints).
    m.layout = ("AF" + "MF" * 8) * 7 + "MF"
    m.vocab_size = 131_072  # token ids the model knows
    # Embedding rows and LM-head columns are vocab_size rounded up to a multiple of this (e.g. 128
    # so the `model` axis divides them); the padding columns' logits are -inf. 1 = no padding.
    m.vocab_multiple = 1
    m.d_model = 5120  # residual stream width
    m.norm_eps = 1e-5  # RMSNorm epsilon (all norms)
    m.init_std = 0.02  # std of the truncated-normal init of projections and embeddings
    m.tie_embeddings = False  # True: the LM head is embedding^T (one parameter; Granite, Mamba2)
    # muP multipliers as explicit scalars (Granite-4.0-H; 1 = off): embeddings x embedding_scale,
    # every layer's output x residual_scale before its residual add, logits x logits_scale (Granite's
    # 1 / logits_scaling).
    m.embedding_scale = 1.0
    m.residual_scale = 1.0
    m.logits_scale = 1.0
    # --- grouped-query attention with QK-norm and RoPE
    m.num_heads = 64  # query heads
    m.num_kv_heads = 8  # key/value heads (GQA groups)
    m.head_dim = 128  # per-head width
    m.position_encoding = "rope"  # "rope", or "none" (NoPE: Granite-4.0-H, Nemotron-H)
    m.rope_theta = 10_000.0  # RoPE base before NTK scaling
    m.rope_alpha = 1.0  # NTK-aware scaling alpha: 1 at 4K, 50 at 32K, 1000 at 256K
    # RMSNorm of each q/k head: "after_rope" (every public Hunyuan model; docs/architecture.md),
    # "before_rope", or "none" (no q_norm/k_norm parameters).
    m.qk_norm = "after_rope"
    m.attn_scale = 0.0  # multiplier of q.k before the softmax; 0 = head_dim ** -0.5
    # --- Mamba2 (mamba_ssm conventions)
    m.mamba_heads = 64  # SSM heads (nheads)
    m.mamba_head_dim = 64  # channels per head (headdim); d_inner = heads * head_dim
    # B/C groups (ngroups); heads per group share B and C. With 1 group, B/C are replicated over
    # the `model` axis, so any tensor-parallel size works (Granite-4.0-H).
    m.mamba_groups = 16
    m.mamba_d_state = 128  # state size per head channel (dstate)
    m.mamba_chunk = 128  # chunk length of the chunked (SSD) scan
    m.mamba_conv = 4  # depthwise causal conv kernel width
    m.mamba_dt_limit = (0.0, float("inf"))  # clamp of softplus(dt + dt_bias)
    # Context parallelism (mesh.context > 1): how each sequence shard gets the SSM state entering it.
    # "parallel": one all-gather of every shard's (final state, total decay), then a local prefix;
    # "sequential": the state is passed rank to rank (context - 1 ppermutes). Same results.
    m.mamba_cp_scheme = "parallel"
    # --- Mixture-of-Experts FFN (SwiGLU experts)
    m.num_experts = 32  # routed experts
    m.top_k = 2  # routed experts per token
    m.num_shared_experts = 1  # always-on experts, same width as routed ones
    m.expert_dim = 17_024  # expert intermediate size
    m.shared_expert_dim = 0  # shared expert width; 0 = num_shared_experts * expert_dim
    m.expert_activation = "swiglu"  # routed and shared experts: "swiglu" or "relu2" (relu(x Wu)^2)
    # Router: gates from softmax(logits) or sigmoid(logits) (Nemotron-3). router_bias adds a
    # per-expert bias to the scores for choosing the top-k only (never to the gates); it is not
    # trained by the gradient. renorm_topk rescales the k chosen gates to sum to 1; the gates are
    # then multiplied by routed_scale.
    m.router_score = "softmax"
    m.router_bias = False
    m.renorm_topk = True
    m.routed_scale = 1.0
    m.capacity_factor = 1.5  # >0: expert capacity per group of tokens, overflow dropped; 0: dropless
    # Capacity groups: 0 = one group per sequence; N > 0 = groups of N consecutive tokens, each
    # with capacity_factor * N * top_k / num_experts slots per expert (N must divide seq_len and,
    # with mesh.context > 1, seq_len / context, so each context shard routes its own groups).
    m.capacity_group = 0
    m.aux_loss_weight = 0.01  # weight of the load-balancing loss
    m.z_loss_weight = 1e-3  # weight of the router z-loss
    # "auto": on a mesh with expert > 1 the routed experts dispatch tokens inside shard_map, by
    # all-to-all (capacity) or ragged all-to-all (dropless) (docs/sharding.md); "none": XLA's
    # GSPMD partitions the einsums.
    m.expert_parallel = "auto"
    # --- dense FFN (layout symbol D; none in TurboS)
    m.mlp_dim = 0  # intermediate size (must be > 0 when the layout has a D)
    m.mlp_activation = "swiglu"  # "swiglu" or "relu2"
    # --- numerics and compilation
    m.dtype = "bfloat16"  # activation/compute dtype
    m.param_dtype = "float32"  # parameter (master weight) dtype
    m.remat_policy = "full"  # none | full | dots | dots_no_batch | save_mixer_outputs
    m.scan_layers = True  # lax.scan over the repeated period (False: unrolled loop, same params)
    # Hot-path ops: "xla" (pure-JAX reference ops), "pallas" (Pallas kernels: Mosaic on TPU, Triton
    # on GPU, interpret mode on CPU -- tests only), "auto" (pallas on TPU and on GPUs of compute
    # capability >= 8.0; xla on older GPUs, with a warning, and on CPU).
    m.kernel_impl = "auto"
    # --- generation caches (turbos_jax/generation, docs/generation.md)
    m.kv_cache_dtype = "bfloat16"  # attention K/V cache entries (B, max_len, K, Dh) per A layer
    m.ssm_state_dtype = "float32"  # Mamba2 SSM state (B, H, P, N): fp32 as the report keeps it
    return config
