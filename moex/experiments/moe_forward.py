"""Forward tokens/s of a Mixtral-shaped decoder LM on CPU: moex (compute 'auto' / 'dense') vs
transformers' MixtralForCausalLM (torch), same shapes, same weights, same tokens, one run.

    python experiments/bench_moe_forward.py          # = moex bench forward
    python experiments/bench_moe_forward.py --batch 1 --seq 128 --repeats 3 --out results/quick

Model: d 512, 8 layers, 8 heads / 4 KV heads (head_dim 64), 8 experts top-2 (renormalised),
expert FFN 1024, vocabulary 512, fp32, full causal forward (no KV cache), logits for all tokens.

The torch model is built first (seed 0) and its weights are copied into the moex param tree, so
all three implementations run identical weights and therefore identical routing. moex: one
jax.jit forward per expert compute, compiled ahead of the timing (compile time recorded apart),
timed with moex.measure.measure. torch: eval mode, torch.inference_mode, default threads
and default attention / experts implementations of transformers (recorded). A parity check
(max |logit difference| against transformers on the first batch size) is printed, not asserted.
The kernel table: both implementations spend most of their time in one GEMM per expert,
(rows, 512) @ (512, 1024) fp32 with rows = B*T*top_k/E on average (128 at B=1, T=512). It times
that GEMM alone, jax (a jitted loop of GEMMs) against torch.mm on the same arrays, so the forward
ratios can be read against the ratio of the kernels underneath them.
Results: markdown tables on stdout; results.csv, kernel.csv, results.json (with environment) and
report.md under --out, written to a temp dir and renamed into place.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import statistics
import time
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from moex.measure import md_table, write_csv, write_outputs
from moex.measure import Timing, measure
from moex.config import DecoderConfig, MoEConfig, VLMConfig
from moex.model import build, forward, init_params
from moex.nn.experts import experts_routed
from moex.nn.routing import route

SHAPE = dict(vocab=512, d=512, layers=8, heads=8, kv_heads=4, head_dim=64, experts=8, top_k=2,
             expert_dim=1024)
EPS, THETA = 1e-6, 10000.0
MOEX_COMPUTE = ("auto", "dense")      # MoEConfig.compute values timed


@dataclasses.dataclass(frozen=True)
class ForwardConfig:
    batch_sizes: tuple[int, ...] = (1, 8)
    seq: int = 512
    warmup: int = 1
    repeats: int = 5
    attn: Literal["sdpa", "eager"] = "sdpa"     # transformers attention implementation
    out: str = "results/bench_moe_forward"


def moex_config(compute: str) -> VLMConfig:
    s = SHAPE
    moe = MoEConfig(kind="hard", num_experts=s["experts"], top_k=s["top_k"],
                    expert_dim=s["expert_dim"], compute=compute)
    dec = DecoderConfig(vocab_size=s["vocab"], d_model=s["d"], num_layers=s["layers"],
                        num_heads=s["heads"], num_kv_heads=s["kv_heads"], head_dim=s["head_dim"],
                        ffn_dim=s["expert_dim"], norm_eps=EPS, rope_theta=THETA, moe=moe,
                        max_seq_len=4096)
    return VLMConfig(f"bench-mixtral-{compute}", dec).validate()


def hf_model(attn: str):
    import torch                  # optional dependencies (moex[convert]): torch and
    from transformers import MixtralConfig, MixtralForCausalLM    # transformers
    s = SHAPE
    cfg = MixtralConfig(vocab_size=s["vocab"], hidden_size=s["d"], intermediate_size=s["expert_dim"],
                        num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                        num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"],
                        num_local_experts=s["experts"], num_experts_per_tok=s["top_k"],
                        rms_norm_eps=EPS, rope_theta=THETA, router_jitter_noise=0.0,
                        attention_dropout=0.0, tie_word_embeddings=False,
                        max_position_embeddings=4096, attn_implementation=attn)
    torch.manual_seed(0)
    return MixtralForCausalLM(cfg).eval()


def params_from_hf(model, params) -> dict:
    """The moex param tree (same structure as `params`) filled with the torch model's weights."""
    s, sd = SHAPE, {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    d, h, kv, dh, f = s["d"], s["heads"], s["kv_heads"], s["head_dim"], s["expert_dim"]
    dec = {"embed": sd["model.embed_tokens.weight"], "final_norm": {"scale": sd["model.norm.weight"]},
           "lm_head": {"kernel": sd["lm_head.weight"].T}}
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        if p + "mlp.experts.gate_up_proj" in sd:           # transformers 5: fused (E, 2F, D)
            gate_up = sd[p + "mlp.experts.gate_up_proj"]
            w_gate, w_up = gate_up[:, :f].transpose(0, 2, 1), gate_up[:, f:].transpose(0, 2, 1)
            w_down = sd[p + "mlp.experts.down_proj"].transpose(0, 2, 1)
            router = sd[p + "mlp.gate.weight"]
        else:                                                # transformers 4: per-expert w1/w2/w3
            e = f"{p}block_sparse_moe.experts."
            n = s["experts"]
            w_gate = np.stack([sd[f"{e}{j}.w1.weight"].T for j in range(n)])
            w_up = np.stack([sd[f"{e}{j}.w3.weight"].T for j in range(n)])
            w_down = np.stack([sd[f"{e}{j}.w2.weight"].T for j in range(n)])
            router = sd[p + "block_sparse_moe.gate.weight"]
        a = p + "self_attn."
        dec[f"layer_{i}"] = {
            "attn": {"q": sd[a + "q_proj.weight"].T.reshape(d, h, dh),
                     "k": sd[a + "k_proj.weight"].T.reshape(d, kv, dh),
                     "v": sd[a + "v_proj.weight"].T.reshape(d, kv, dh),
                     "o": sd[a + "o_proj.weight"].T.reshape(h, dh, d)},
            "attn_norm": {"scale": sd[p + "input_layernorm.weight"]},
            "ffn_norm": {"scale": sd[p + "post_attention_layernorm.weight"]},
            "ffn": {"router": {"kernel": router.T},
                    "experts": {"w_gate": w_gate, "w_up": w_up, "w_down": w_down}}}
    new = {"decoder": dec}
    ref = jax.tree_util.tree_structure(params)
    if jax.tree_util.tree_structure(new) != ref:
        raise ValueError(f"converted tree {jax.tree_util.tree_structure(new)} != moex tree {ref}")
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params)):
        if a.shape != b.shape:
            raise ValueError(f"converted shape {a.shape} != moex shape {b.shape}")
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), new)


def torch_measure(fn, *, warmup: int, repeats: int) -> Timing:
    """moex.measure.measure for torch on CPU (synchronous, nothing to block on)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), min(times), max(times), repeats)


def row(impl: str, b: int, t: int, timing: Timing, compile_s: float | None) -> dict:
    n = b * t
    return {"implementation": impl, "batch": b, "seq": t,
            "tokens_per_s_median": n / timing.median, "tokens_per_s_min": n / timing.max,
            "tokens_per_s_max": n / timing.min, "s_median": timing.median, "s_min": timing.min,
            "s_max": timing.max, "repeats": timing.repeats, "compile_s": compile_s}


def expert_rows(b: int, t: int) -> int:
    """Mean rows of one expert's GEMM in a forward of B x T tokens."""
    return b * t * SHAPE["top_k"] // SHAPE["experts"]


KERNEL_REPS = 16   # GEMMs per timed call, so jax's per-call dispatch is not charged to the kernel


def kernel_rows(batches: list[int], seq: int, warmup: int, repeats: int) -> list[dict]:
    """GFLOP/s of the per-expert GEMM (rows, d) @ (d, expert_dim), fp32: jax (KERNEL_REPS GEMMs
    in one jitted loop; each adds its step number to x first, so none can be hoisted) vs
    torch.mm (KERNEL_REPS calls)."""
    import torch
    d, f = SHAPE["d"], SHAPE["expert_dim"]
    rng = np.random.default_rng(1)

    @jax.jit
    def jax_reps(x, w):
        body = lambda i, acc: acc + jnp.dot(x + i.astype(x.dtype), w)
        return jax.lax.fori_loop(0, KERNEL_REPS, body, jnp.zeros((x.shape[0], w.shape[1]), x.dtype))

    def torch_reps(x, w):
        for _ in range(KERNEL_REPS):
            y = torch.mm(x, w)
        return y

    out = []
    for b in batches:
        m = expert_rows(b, seq)
        x = rng.standard_normal((m, d), dtype=np.float32)
        w = rng.standard_normal((d, f), dtype=np.float32)
        xj, wj, xt, wt = jnp.asarray(x), jnp.asarray(w), torch.from_numpy(x), torch.from_numpy(w)
        t_jax = measure(lambda: jax_reps(xj, wj), warmup=warmup + 2, repeats=repeats)
        with torch.inference_mode():
            t_torch = torch_measure(lambda: torch_reps(xt, wt), warmup=warmup + 2, repeats=repeats)
        flops = 2 * m * d * f * KERNEL_REPS
        out.append({"batch": b, "seq": seq, "rows": m, "k": d, "n": f,
                    "jax_gflops": flops / t_jax.median / 1e9,
                    "torch_gflops": flops / t_torch.median / 1e9,
                    "jax_over_torch": t_torch.median / t_jax.median, "repeats": repeats})
    return out


def expert_block_rows(hf, params, batches: list[int], seq: int, warmup: int,
                      repeats: int) -> list[dict]:
    """Seconds per expert block (layer 0's weights, random hidden states), three ways:
    moex (router, sorted pairs, the blocked loop: what the forward runs), an exact-rows loop
    (each expert's SwiGLU on exactly its own rows, as static shapes, on separate weight arrays;
    no routing or sorting counted: a bound, since real routing is only known at run time) and
    transformers' MixtralSparseMoeBlock (router and experts)."""
    import torch
    s = SHAPE
    ffn = params["decoder"]["layer_0"]["ffn"]

    @jax.jit
    def moex_block(p, x):
        logits = jnp.einsum("gsd,de->gse", x, p["router"]["kernel"])
        return experts_routed(p["experts"], x, route(logits, top_k=s["top_k"], renormalize=True),
                              "swiglu")

    swiglu = lambda w, x: (jax.nn.silu(x @ w["w_gate"]) * (x @ w["w_up"])) @ w["w_down"]
    exact = jax.jit(lambda ws, xs: [swiglu(w, x) for w, x in zip(ws, xs)])
    weights = [{n: v[e] for n, v in ffn["experts"].items()} for e in range(s["experts"])]
    rng = np.random.default_rng(2)
    out = []
    for b in batches:
        x = rng.standard_normal((b, seq, s["d"]), dtype=np.float32)
        xj, flat = jnp.asarray(x), x.reshape(-1, s["d"])
        ids = np.asarray(route(jnp.einsum("gsd,de->gse", xj, ffn["router"]["kernel"]),
                               top_k=s["top_k"], renormalize=True).expert_ids).reshape(-1)
        token = np.arange(ids.size) // s["top_k"]
        rows = [jnp.asarray(flat[token[ids == e]]) for e in range(s["experts"])]
        loads = [int(r.shape[0]) for r in rows]
        t_moex = measure(lambda: moex_block(ffn, xj), warmup=warmup + 1, repeats=repeats)
        t_exact = measure(lambda: exact(weights, rows), warmup=warmup + 1, repeats=repeats)
        block, xt = hf.model.layers[0].mlp, torch.from_numpy(x)
        with torch.inference_mode():
            t_hf = torch_measure(lambda: block(xt), warmup=warmup + 1, repeats=repeats)
        out.append({"batch": b, "seq": seq, "rows_min": min(loads), "rows_max": max(loads),
                    "moex_ms": 1e3 * t_moex.median, "exact_rows_ms": 1e3 * t_exact.median,
                    "transformers_ms": 1e3 * t_hf.median, "repeats": repeats})
    return out


def expert_block_markdown(rows: list[dict]) -> str:
    header = ["batch", "rows per expert", "moex block", "exact-rows loop (bound)",
              "transformers block", "moex vs transformers", "bound vs transformers"]
    return md_table(header, [
        [str(r["batch"]), f"{r['rows_min']}-{r['rows_max']}", f"{r['moex_ms']:.1f} ms",
         f"{r['exact_rows_ms']:.1f} ms", f"{r['transformers_ms']:.1f} ms",
         f"{r['transformers_ms'] / r['moex_ms']:.2f}x",
         f"{r['transformers_ms'] / r['exact_rows_ms']:.2f}x"] for r in rows])


def kernel_markdown(rows: list[dict]) -> str:
    header = ["batch", "GEMM (rows x k x n)", "jax GFLOP/s", "torch GFLOP/s", "jax / torch"]
    return md_table(header, [
        [str(r["batch"]), f"{r['rows']} x {r['k']} x {r['n']}", f"{r['jax_gflops']:.0f}",
         f"{r['torch_gflops']:.0f}", f"{r['jax_over_torch']:.2f}x"] for r in rows])


def markdown(rows: list[dict]) -> str:
    header = ["implementation", "batch", "seq", "median tok/s", "min / max tok/s",
              "vs transformers"]
    return md_table(header, [
        [r["implementation"], str(r["batch"]), str(r["seq"]), f"{r['tokens_per_s_median']:.0f}",
         f"{r['tokens_per_s_min']:.0f} / {r['tokens_per_s_max']:.0f}",
         f"{r['ratio_vs_transformers']:.2f}x"] for r in rows])


def forward_rows(hf, params, fwds, args: ForwardConfig) -> tuple[list[dict], dict]:
    """Timed forwards of transformers and each moex compute per batch size (rows), and the
    logit parity on the first batch size."""
    import torch
    rng = np.random.default_rng(0)
    rows, parity = [], {}
    bar = tqdm(total=len(args.batch_sizes) * (len(MOEX_COMPUTE) + 1), desc="bench", unit="point")
    for bi, b in enumerate(args.batch_sizes):
        tokens = rng.integers(0, SHAPE["vocab"], size=(b, args.seq), dtype=np.int32)
        tok_j, mask_j = jnp.asarray(tokens), jnp.ones((b, args.seq), jnp.int32)
        tok_t = torch.from_numpy(tokens.astype(np.int64))

        def run_torch():
            with torch.inference_mode():
                return hf(input_ids=tok_t, use_cache=False).logits

        bar.set_postfix_str(f"transformers B={b}")
        t_hf = torch_measure(run_torch, warmup=args.warmup, repeats=args.repeats)
        ref = row("transformers", b, args.seq, t_hf, None)
        bar.update()
        logits = {"transformers": run_torch().numpy()} if bi == 0 else {}
        for c in MOEX_COMPUTE:
            bar.set_postfix_str(f"moex-{c} B={b}")
            t0 = time.perf_counter()
            compiled = fwds[c].lower(params, tok_j, mask_j).compile()
            compile_s = time.perf_counter() - t0
            timing = measure(lambda: compiled(params, tok_j, mask_j), warmup=args.warmup,
                             repeats=args.repeats)
            rows.append(row(f"moex-{c}", b, args.seq, timing, compile_s))
            if bi == 0:
                logits[f"moex-{c}"] = np.asarray(compiled(params, tok_j, mask_j))
            bar.update()
        rows.append(ref)
        if bi == 0:
            parity = {f"{c} vs transformers": float(np.max(np.abs(logits[c] - logits["transformers"])))
                      for c in logits if c != "transformers"}
            parity["moex-auto vs moex-dense"] = float(np.max(np.abs(
                logits["moex-auto"] - logits["moex-dense"])))
            parity["batch"], parity["max |logit| transformers"] = b, float(
                np.max(np.abs(logits["transformers"])))
    bar.close()
    return rows, parity


def main(args: ForwardConfig) -> int:
    import torch
    import transformers
    start, load_before = time.perf_counter(), os.getloadavg()
    hf = hf_model(args.attn)
    cfgs = {c: moex_config(c) for c in MOEX_COMPUTE}
    models = {c: build(cfg) for c, cfg in cfgs.items()}
    params = params_from_hf(hf, init_params(cfgs["auto"], seed=0))   # one tree for both paths
    fwds = {c: jax.jit(lambda p, t, m, model=m_: forward(model, p, t, m)[0])
            for c, m_ in models.items()}
    torch_info = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                  "transformers": transformers.__version__,
                  "attn_implementation": hf.config._attn_implementation,
                  "experts_implementation": getattr(hf.config, "_experts_implementation", None)}
    print(f"torch {torch_info}", flush=True)
    rows, parity = forward_rows(hf, params, fwds, args)
    kernels = kernel_rows(args.batch_sizes, args.seq, args.warmup, 2 * args.repeats + 1)
    blocks = expert_block_rows(hf, params, args.batch_sizes, args.seq, args.warmup, 2 * args.repeats + 1)
    for r in rows:
        base = next(x for x in rows if x["implementation"] == "transformers"
                    and x["batch"] == r["batch"])
        r["ratio_vs_transformers"] = r["tokens_per_s_median"] / base["tokens_per_s_median"]

    print(markdown(rows))
    print("\nper-expert GEMM alone (mean rows per expert; median of "
          f"{kernels[0]['repeats']}):")
    print(kernel_markdown(kernels))
    print("\none expert block alone (layer 0, router included except in the bound):")
    print(expert_block_markdown(blocks))
    print(f"\nparity (max abs logit diff, batch {parity['batch']}, seq {args.seq}):")
    for k, v in parity.items():
        if k != "batch":
            print(f"  {k}: {v:.3e}")
    total = time.perf_counter() - start
    load = {"before": load_before, "after": os.getloadavg()}   # other CPU users skew timings
    print(f"\nload average (1/5/15 min) before {load['before']}, after {load['after']}")
    print(f"total {total:.1f} s; torch threads {torch_info['torch_threads']}, attention "
          f"{torch_info['attn_implementation']}, experts {torch_info['experts_implementation']}")

    report = (f"# Mixtral-shaped forward: moex vs transformers (CPU)\n\n{markdown(rows)}\n\n"
              f"Per-expert GEMM alone:\n\n{kernel_markdown(kernels)}\n\n"
              f"One expert block alone:\n\n{expert_block_markdown(blocks)}\n\nParity: `{parity}`")

    def tables(tmp: pathlib.Path) -> None:
        for name, table in (("kernel.csv", kernels), ("expert_block.csv", blocks)):
            write_csv(tmp / name, table)

    config = {"args": dataclasses.asdict(args), "shape": SHAPE, "norm_eps": EPS, "rope_theta": THETA,
              "torch": torch_info, "parity": parity, "load_average": load, "total_s": total,
              "kernel": kernels, "expert_block": blocks}
    out = write_outputs(args.out, rows, config, report, extra=tables)
    print(f"wrote results.csv, kernel.csv, expert_block.csv, results.json and report.md to {out}")
    return 0

