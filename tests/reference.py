"""A plain reference forward written straight from the spec equations (paper.md sections 1-2).

Deliberately naive and independent of hyperloop.model: float64, one sequence at a time, explicit
loops over tokens, heads, streams and loops, hand-written RMSNorm / RoPE / softmax / Sinkhorn.
It reads only the model's config and state dict (the weight layout: q|k|v rows stacked in
`wqkv`, gate|up rows in `w_gate_up`, [W_pre; W_post; W_res] rows in a site's `weight`).
"""

from __future__ import annotations

import math

import torch

from hyperloop.config import ModelConfig


def rmsnorm(x, weight, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def rope(x, base):
    """x: (T, D) for one head; rotate-half convention."""
    T, D = x.shape
    out = torch.empty_like(x)
    half = D // 2
    for t in range(T):
        for i in range(half):
            theta = t * base ** (-2 * i / D)
            a, b = x[t, i], x[t, i + half]
            out[t, i] = a * math.cos(theta) - b * math.sin(theta)
            out[t, i + half] = b * math.cos(theta) + a * math.sin(theta)
    return out


def lora_delta(sd, prefix, x, loop):
    key = prefix + ".A"
    if loop is None or key not in sd:
        return 0.0
    loop = min(loop, sd[key].shape[0] - 1)
    return (x @ sd[key][loop].T) @ sd[prefix + ".B"][loop].T


def proj(sd, module, name, x, loop):
    return x @ sd[f"{module}.{name}.weight"].T + lora_delta(sd, f"{module}.lora.{name}", x, loop)


def attn_branch(sd, li, x, cfg, loop):
    p = f"layers.{li}"
    h = rmsnorm(x, sd[f"{p}.attn_norm.weight"], cfg.norm_eps)
    T, C = h.shape
    H, D = cfg.n_heads, cfg.head_dim
    qkv = proj(sd, f"{p}.attn", "wqkv", h, loop)
    q, k, v = qkv[:, :C], qkv[:, C : 2 * C], qkv[:, 2 * C :]
    out = torch.zeros(T, C, dtype=h.dtype)
    for head in range(H):
        sl = slice(head * D, (head + 1) * D)
        qh, kh, vh = rope(q[:, sl], cfg.rope_base), rope(k[:, sl], cfg.rope_base), v[:, sl]
        for t in range(T):
            scores = torch.stack([qh[t] @ kh[s] / math.sqrt(D) for s in range(t + 1)])
            weights = torch.exp(scores - scores.max())
            weights = weights / weights.sum()
            out[t, sl] = sum(weights[s] * vh[s] for s in range(t + 1))
    return proj(sd, f"{p}.attn", "wo", out, loop)


def mlp_branch(sd, li, x, cfg, loop):
    p = f"layers.{li}"
    h = rmsnorm(x, sd[f"{p}.mlp_norm.weight"], cfg.norm_eps)
    gu = proj(sd, f"{p}.mlp", "w_gate_up", h, loop)
    gate, up = gu[:, : cfg.ffn_dim], gu[:, cfg.ffn_dim :]
    return proj(sd, f"{p}.mlp", "w_down", gate * torch.sigmoid(gate) * up, loop)


def layer(sd, li, x, cfg, loop):
    x = x + attn_branch(sd, li, x, cfg, loop)
    return x + mlp_branch(sd, li, x, cfg, loop)


def sinkhorn_plain(logits, iters):
    m = torch.exp(logits)
    for _ in range(iters):
        m = m / m.sum(dim=1, keepdim=True)
        m = m / m.sum(dim=0, keepdim=True)
    return m


def sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


def hyper_connection(sd, site, y, branch, cfg):
    """y: (T, n, C). y'_t = H_res y_t + H_post (branch(H_pre y)_t + e), token by token."""
    T, n, C = y.shape
    W, b, a = sd[f"hc.{site}.weight"], sd[f"hc.{site}.bias"], sd[f"hc.{site}.alpha"]
    e = sd.get(f"hc.{site}.embedding")
    h_pre, h_post, h_res = [], [], []
    for t in range(T):
        z = y[t].reshape(n * C)
        z = z / torch.sqrt((z * z).mean() + torch.finfo(torch.float32).eps)
        rows = W @ z
        pre = [sigmoid(float(a[0] * rows[i] + b[i])) for i in range(n)]
        post = [2 * sigmoid(float(a[1] * rows[n + i] + b[n + i])) for i in range(n)]
        if cfg.h_res == "diagonal":
            res = torch.diag(torch.tensor([sigmoid(float(a[2] * rows[2 * n + i] + b[2 * n + i])) for i in range(n)],
                                          dtype=y.dtype))
        elif cfg.h_res == "sinkhorn":
            logits = (a[2] * rows[2 * n :] + b[2 * n :]).reshape(n, n)
            res = sinkhorn_plain(logits, cfg.sinkhorn_iters)
        else:
            res = torch.eye(n, dtype=y.dtype)
        h_pre.append(pre), h_post.append(post), h_res.append(res)
    x = torch.stack([sum(h_pre[t][i] * y[t, i] for i in range(n)) for t in range(T)])
    out = branch(x)
    if e is not None:
        out = out + e
    new = torch.empty_like(y)
    for t in range(T):
        for i in range(n):
            new[t, i] = sum(h_res[t][i, j] * y[t, j] for j in range(n)) + h_post[t][i] * out[t]
    return new


def reference_logits(cfg: ModelConfig, state_dict: dict, tokens: torch.Tensor) -> torch.Tensor:
    """tokens: (T,) -> logits (T, V) in float64."""
    sd = {k: v.double() for k, v in state_dict.items()}
    x = sd["embed.weight"][tokens]
    B, M, K, E = cfg.begin_layers, cfg.middle_layers, cfg.num_loops, cfg.end_layers
    n = cfg.n_streams
    # the unrolled plan: (layer index, loop)
    plan = [(i, None) for i in range(B)] + [(B + i, k) for k in range(K) for i in range(M)]
    plan += [(B + M + i, None) for i in range(E)]

    if cfg.hc_placement == "sublayer":
        y = torch.stack([x] * n, dim=1)
        for u, (li, loop) in enumerate(plan):
            y = hyper_connection(sd, 2 * u, y, lambda h, li=li, loop=loop: attn_branch(sd, li, h, cfg, loop), cfg)
            y = hyper_connection(sd, 2 * u + 1, y, lambda h, li=li, loop=loop: mlp_branch(sd, li, h, cfg, loop), cfg)
        x = y.mean(dim=1)
    else:
        for li, loop in plan[:B]:
            x = layer(sd, li, x, cfg, loop)
        middle = plan[B : B + K * M]
        if cfg.hc_placement == "span":
            y = torch.stack([x] * n, dim=1)
            span = cfg.hc_span or M
            for site, start in enumerate(range(0, len(middle), span)):
                def run_span(h, steps=middle[start : start + span]):
                    for li, loop in steps:
                        h = layer(sd, li, h, cfg, loop)
                    return h

                y = hyper_connection(sd, site, y, run_span, cfg)
            x = y.mean(dim=1)
        else:
            for li, loop in middle:
                x = layer(sd, li, x, cfg, loop)
        for li, loop in plan[B + K * M :]:
            x = layer(sd, li, x, cfg, loop)
    x = rmsnorm(x, sd["norm.weight"], cfg.norm_eps)
    return x @ sd["lm_head.weight"].T
