#!/usr/bin/env python3
"""Record a reference for `tensor-diff-analyzer --reference REF.safetensors --map MAP.toml`
from a Hugging Face transformers model of the llama family, with forward hooks.

    python3 python/record_reference.py --model meta-llama/Llama-3.2-1B \
        --trace base.gguf --steps 4 --out ref.safetensors --map-out map.toml
    tensor-diff-analyzer -m llama-3.2-1b-f16.gguf --reference ref.safetensors \
        --map map.toml --tolerance-abs 1e-2 --tolerance-rel 1e-2

What it records, per decode step S (step 0: the whole prompt in one forward; then one
token per forward, with the model's KV cache, as llama.cpp decodes) and layer L, under
`step{S}/<module>:<input|output>`:

- `model.layers.{L}.input_layernorm:output`          -> node `attn_norm-{L}`
- `model.layers.{L}.self_attn.q_proj:output`         -> node `Qcur-{L}` (head dims
  un-interleaved: llama.cpp's converter permutes Q and K rows for its RoPE)
- `model.layers.{L}.self_attn.k_proj:output`         -> node `Kcur-{L}` (likewise)
- `model.layers.{L}.self_attn.v_proj:output`         -> node `Vcur-{L}`
- `model.layers.{L}.self_attn.o_proj:input`          -> role `kqv_out`
- `model.layers.{L}.post_attention_layernorm:output` -> node `ffn_norm-{L}`
- `model.layers.{L}.mlp:output`                      -> node `ffn_out-{L}`
- `model.layers.{L}:output`                          -> node `l_out-{L}`

The token ids come from a llama.cpp trace (`--trace`, the prompt and the tokens it decoded:
so both engines see exactly the same ids) or from `--tokens 1,2,3` (and `--steps` greedy
tokens); they are written as metadata `kcm.steps` so that a live analyzer run replays them.
Tensors are written in float32 (the model runs in `--dtype`, float32 by default).

`--write-map-only` writes only the map (from `--n-layer --n-head --n-head-kv --head-dim`),
without torch: the tests use it to check this map against the analyzer's import.
docs/reference-import.md.
"""

import argparse
import json
import os
import sys


def llama_map(n_layer, n_head, n_head_kv, head_dim):
    """The map (TOML text) from this script's names to a llama-family llama.cpp trace."""
    del n_layer  # every layer: {L}

    def unpermute(heads):
        # HF rows of a head: [2, D/2] (rotate_half); llama.cpp's: [D/2, 2].
        return (
            "transform = [ { reshape = [-1, %d, 2, %d] }, { permute = [0, 1, 3, 2] }, "
            "{ reshape = [-1, %d] } ]" % (heads, head_dim // 2, heads * head_dim)
        )

    entries = [
        ("model.layers.{L}.input_layernorm:output", 'node = "attn_norm-{L}"', None),
        ("model.layers.{L}.self_attn.q_proj:output", 'node = "Qcur-{L}"', unpermute(n_head)),
        ("model.layers.{L}.self_attn.k_proj:output", 'node = "Kcur-{L}"', unpermute(n_head_kv)),
        ("model.layers.{L}.self_attn.v_proj:output", 'node = "Vcur-{L}"', None),
        ("model.layers.{L}.self_attn.o_proj:input", 'role = "kqv_out"', None),
        ("model.layers.{L}.post_attention_layernorm:output", 'node = "ffn_norm-{L}"', None),
        ("model.layers.{L}.mlp:output", 'node = "ffn_out-{L}"', None),
        ("model.layers.{L}:output", 'node = "l_out-{L}"', None),
    ]
    out = [
        "# tensor-diff-analyzer --map: a transformers llama-family reference "
        "(python/record_reference.py)",
        "format = 1",
        "",
    ]
    for ref, target, transform in entries:
        out.append("[[tensor]]")
        out.append('reference = "step{S}/%s"' % ref)
        out.append(target)
        if transform:
            out.append(transform)
        out.append("")
    return "\n".join(out)


def tokens_from_trace(path):
    """The token ids each step of a kqv-trace-monitor trace decoded (kqv_trace.py)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import kqv_trace  # noqa: E402 (this directory's reader; needs gguf-py)

    t = kqv_trace.open(path)
    return [[int(x) for x in s.tokens] for s in t.steps]


def record(args):
    import numpy as np
    import torch
    from safetensors.numpy import save_file
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=dtype)
    model.eval()
    cfg = model.config
    n_layer, n_head = cfg.num_hidden_layers, cfg.num_attention_heads
    n_head_kv = getattr(cfg, "num_key_value_heads", n_head)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head

    if args.trace:
        steps = tokens_from_trace(args.trace)
    else:
        steps = [[int(x) for x in args.tokens.split(",")]]
    tensors, step = {}, [0]

    def keep(name, x):
        if isinstance(x, tuple):
            x = x[0]
        tensors["step%d/%s" % (step[0], name)] = x.detach().to(torch.float32).cpu().numpy()

    hooks = []
    for L, layer in enumerate(model.model.layers):
        att = layer.self_attn
        for mod, name in [
            (layer.input_layernorm, "model.layers.%d.input_layernorm:output" % L),
            (att.q_proj, "model.layers.%d.self_attn.q_proj:output" % L),
            (att.k_proj, "model.layers.%d.self_attn.k_proj:output" % L),
            (att.v_proj, "model.layers.%d.self_attn.v_proj:output" % L),
            (layer.post_attention_layernorm, "model.layers.%d.post_attention_layernorm:output" % L),
            (layer.mlp, "model.layers.%d.mlp:output" % L),
            (layer, "model.layers.%d:output" % L),
        ]:
            hooks.append(mod.register_forward_hook(lambda m, i, o, name=name: keep(name, o)))
        hooks.append(
            att.o_proj.register_forward_pre_hook(
                lambda m, i, name="model.layers.%d.self_attn.o_proj:input" % L: keep(name, i[0])
            )
        )

    meta_steps, pos = [], 0
    past = None
    with torch.no_grad():
        ids = steps[0]
        n_steps = len(steps) if args.trace else 1 + args.steps
        for s in range(n_steps):
            step[0] = s
            x = torch.tensor([ids], dtype=torch.long)
            out = model(input_ids=x, past_key_values=past, use_cache=True)
            past = out.past_key_values
            meta_steps.append(
                {"step": s, "tokens": list(ids), "positions": list(range(pos, pos + len(ids)))}
            )
            pos += len(ids)
            if s + 1 < n_steps:
                ids = steps[s + 1] if args.trace else [int(out.logits[0, -1].argmax())]
    for h in hooks:
        h.remove()
    meta = {
        "kcm.steps": json.dumps(meta_steps),
        "kcm.prompt_tokens": json.dumps(meta_steps[0]["tokens"]),
        "kcm.source": "transformers %s %s (%s)" % (
            __import__("transformers").__version__,
            args.model,
            args.dtype,
        ),
    }
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, args.out, metadata=meta)
    with open(args.map_out, "w") as f:
        f.write(llama_map(n_layer, n_head, n_head_kv, head_dim))
    print("wrote %d tensors of %d steps to %s, map %s" % (len(tensors), n_steps, args.out, args.map_out))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="transformers model id or directory")
    p.add_argument("--trace", help="take the token ids from this kqv-trace-monitor trace")
    p.add_argument("--tokens", help="prompt token ids, comma-separated (without --trace)")
    p.add_argument("--steps", type=int, default=0, help="greedy tokens after the prompt (--tokens)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16, float16")
    p.add_argument("--out", help="the reference .safetensors to write")
    p.add_argument("--map-out", required=True, help="the map .toml to write")
    p.add_argument("--write-map-only", action="store_true", help="no model: write the map only")
    p.add_argument("--n-layer", type=int)
    p.add_argument("--n-head", type=int)
    p.add_argument("--n-head-kv", type=int)
    p.add_argument("--head-dim", type=int)
    a = p.parse_args()
    if a.write_map_only:
        need = [a.n_layer, a.n_head, a.n_head_kv, a.head_dim]
        if any(x is None for x in need):
            p.error("--write-map-only needs --n-layer --n-head --n-head-kv --head-dim")
        with open(a.map_out, "w") as f:
            f.write(llama_map(a.n_layer, a.n_head, a.n_head_kv, a.head_dim))
        return
    if not a.model or not a.out or not (a.trace or a.tokens):
        p.error("give --model, --out and --trace or --tokens")
    record(a)


if __name__ == "__main__":
    main()
