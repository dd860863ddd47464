"""Every key of a training run, with its default and meaning. Config files start from `default_config()`.

Configs are `ml_collections.ConfigDict`s loaded by `config_flags` with the config locked, so an override of a key
that does not exist (`--config.lora.rnak=8`) is an error naming the key, not a silently ignored typo.
"""

from __future__ import annotations

import ml_collections


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # HF checkpoint: local directory or Hub id; "jaxtok:demo-base" builds the offline demo base
    c.model.dtype = "bfloat16"  # dtype of the frozen base weights: float32 or bfloat16
    c.model.compute_dtype = ml_collections.FieldReference(None, field_type=str)  # activations; None: as model.dtype
    c.model.allow_pickle = False  # read pytorch_model.bin (pickle can run code); safetensors need no opt-in
    c.model.remat = "none"  # gradient checkpointing per layer: none, full (keep only layer inputs), dots (keep matmuls)
    c.model.loss_chunk = 0  # positions per chunk of the fused head + loss; 0 chooses from batch and vocabulary size
    c.model.attention = ""  # attention kernel: "" (JAX chooses), "xla" or "cudnn"
    c.model.adapter = ""  # a PEFT adapter (directory or Hub id) to continue training; it sets lora.* and tokens

    c.data = ml_collections.ConfigDict()
    c.data.train = ""  # .jsonl/.json/.parquet/.csv file, local dataset directory, or dataset name
    c.data.train_split = "train"  # split of a named dataset
    c.data.eval = ""  # same kinds as data.train; "" skips evaluation
    c.data.eval_split = "test"
    c.data.format = "auto"  # auto, text, prompt_completion or messages (TRL's row formats)
    c.data.packing = True  # several rows per sequence (attention stays within each row); False pads each row
    c.data.chat_template = ""  # Jinja chat template for `messages` rows when the tokenizer has none

    c.tokens = ml_collections.ConfigDict()
    c.tokens.add = ()  # new special tokens (strings) added to the tokenizer and trained as token rows
    c.tokens.descriptions = ()  # optional, one per added token: its row starts as the mean of this text's rows
    c.tokens.train = ()  # existing tokens (strings or ids) whose rows train, e.g. Llama 3's untrained chat tokens
    c.tokens.train_head = "added"  # untied heads: which head rows train: added (+ untrained), all or none
    c.tokens.train_untrained = False  # also train the base's untrained rows (zero or tiny norm) the data use

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 16  # LoRA rank r
    c.lora.alpha = 32.0  # scaling = alpha / r (alpha / sqrt(r) with rslora)
    c.lora.dropout = 0.0  # dropout on the LoRA input only
    c.lora.targets = "all-linear"  # "all-linear" or a tuple of q_proj, k_proj, v_proj, o_proj, gate_proj, ...
    c.lora.rslora = False  # rank-stabilised scaling

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 2e-4  # peak learning rate of LoRA
    c.optim.token_lr = ml_collections.FieldReference(None, field_type=float)  # token rows; None: optim.lr
    c.optim.weight_decay = 0.0  # decoupled weight decay of LoRA
    c.optim.token_weight_decay = 0.0  # of token rows: keep 0, decay pulls rows to zero, not to their start
    c.optim.warmup_steps = 0  # linear warmup from 0
    c.optim.schedule = "cosine"  # after warmup: cosine, linear or constant
    c.optim.min_lr_ratio = 0.0  # where the decay ends, as a fraction of the peak
    c.optim.max_grad_norm = 1.0  # clip the global gradient norm; 0 turns clipping off

    c.train = ml_collections.ConfigDict()
    c.train.method = "lora+rows"  # what trains: lora, lora+rows, lora+full (whole embedding and head) or rows (no LoRA)
    c.train.steps = 1000  # optimizer steps
    c.train.batch_size = 8  # sequences per micro-batch (global, over all devices and hosts)
    c.train.grad_accum = 1  # micro-batches per optimizer step
    c.train.seq_len = 1024  # tokens per sequence
    c.train.seed = 0  # data order, LoRA init, dropout
    c.train.eval_every = 0  # evaluate every N steps; 0: only before the first and after the last step
    c.train.save_every = 200  # checkpoint every N steps (and always at the end); 0: only at the end
    c.train.keep_checkpoints = 3  # how many recent checkpoints to keep
    c.train.log_every = 10  # write metrics every N steps
    c.train.tensorboard = True  # also write TensorBoard event files under output_dir/tensorboard

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (1, -1, 1)  # devices as (data, fsdp, tensor); -1: the rest. Default: FSDP over all devices

    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator = ""  # "host:port" of process 0 to run several processes; "" runs one
    c.distributed.num_processes = 1  # processes in the job (with coordinator)
    c.distributed.process_id = 0  # this process's index (with coordinator)
    c.distributed.auto = False  # let jax.distributed.initialize() read SLURM / TPU pod / MPI settings instead

    c.sample = ml_collections.ConfigDict()
    c.sample.prompt = ""  # after training, print a greedy continuation of this prompt ("" skips)
    c.sample.max_new_tokens = 48
    c.sample.stop = ""  # token that ends the sample; "": the tokenizer's EOS
    c.sample.calculator = False  # run a reply's <|calc|>A op B<|/calc|> call, give the result back as a tool turn
    c.sample.heldout = ""  # messages file: ask each row's question, print "held-out questions: N/M right", heldout.json
    c.sample.heldout_rows = 10  # how many rows of sample.heldout to ask (its first ones)

    c.export = ml_collections.ConfigDict()
    c.export.peft = True  # write output_dir/adapter in PEFT's format
    c.export.merged = True  # write output_dir/merged, the base with the adapter merged in
    c.export.merged_dtype = ""  # dtype of the merged weights; "": as model.dtype

    c.output_dir = ""  # run_config.json, tokenizer/, checkpoints/, metrics.jsonl, tensorboard/, adapter/, merged/
    return c


def load_run_config(path) -> ml_collections.ConfigDict:
    """The config a run saved (`output_dir/run_config.json`), over today's defaults, with JSON lists as tuples."""
    import json

    saved = json.loads(open(path).read())
    remat = saved.get("model", {}).get("remat")
    if isinstance(remat, bool):  # saved before model.remat named a policy
        saved["model"]["remat"] = "full" if remat else "none"
    if saved.get("train", {}).pop("full_embeddings", False):  # saved before train.method
        saved["train"]["method"] = "lora+full"
    config = default_config()

    def fill(node, values, prefix):
        for key, value in values.items():
            if key not in node:
                continue  # a key a later version removed
            if isinstance(value, dict):
                fill(node[key], value, f"{prefix}{key}.")
            else:
                node[key] = tuple(value) if isinstance(value, list) else value

    fill(config, saved, "")
    return config
