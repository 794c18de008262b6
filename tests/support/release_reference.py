"""An independent statement of the released BlackMamba inference code's math, used as a test oracle.

It shares no code with the package: it works from the release's config.json dict and the release
state dict, and follows the release's own structure — nn.Conv1d-style left padding, a conv cache of
width K updated by rolling, the per-expert masked loop of its SwitchMLP, sigmoid-then-max routing,
``mlp_activation`` selecting the expert gating function (the release code computes GELU).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class ReleaseReference:
    def __init__(self, cfg: dict, sd: dict[str, torch.Tensor], activation: str = "silu"):
        self.cfg = cfg
        self.sd = {k: v.float() for k, v in sd.items()}
        self.act = F.silu if activation == "silu" else F.gelu
        H = cfg["hidden_size"]
        self.I = cfg["expansion_factor"] * H
        self.N = cfg["state_size"]
        self.K = cfg["conv_dimension"]
        self.R = math.ceil(H / 16)
        self.eps = 1e-5

    def w(self, name):
        return self.sd[name]

    # ------------------------------------------------------------------ pieces
    def rms(self, x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight

    def mamba_full(self, p, h, cache=None):
        """h (b, l, H); cache: dict to fill with conv (b, I, K) and ssm (b, I, N) states."""
        b, l, _ = h.shape
        xz = h @ self.w(p + "in_proj.weight").T  # (b, l, 2I)
        x, z = xz[..., : self.I].transpose(1, 2), xz[..., self.I:].transpose(1, 2)  # (b, I, l)
        if cache is not None:
            # the release copies the last K pre-conv inputs (it crashes for l < K; we left-pad with zeros)
            padded = F.pad(x, (self.K, 0))
            cache["conv"] = padded[:, :, -self.K:].clone()
        cw = self.w(p + "conv1d.weight")  # (I, 1, K)
        x = F.conv1d(x, cw, self.w(p + "conv1d.bias"), padding=self.K - 1, groups=self.I)[..., :l]
        x = F.silu(x)  # (b, I, l)
        xdbl = x.transpose(1, 2) @ self.w(p + "x_proj.weight").T  # (b, l, R + 2N)
        dt, B, C = xdbl.split([self.R, self.N, self.N], dim=-1)
        delta = F.softplus(dt @ self.w(p + "dt_proj.weight").T + self.w(p + "dt_proj.bias"))  # (b, l, I)
        A = -torch.exp(self.w(p + "A_log"))
        s = torch.zeros(b, self.I, self.N)
        ys = []
        for t in range(l):
            dA = torch.exp(delta[:, t, :, None] * A)
            s = dA * s + delta[:, t, :, None] * B[:, t, None, :] * x[:, :, t, None]
            ys.append(torch.einsum("bdn,bn->bd", s, C[:, t]))
        y = torch.stack(ys, dim=1) + x.transpose(1, 2) * self.w(p + "D")
        y = y * F.silu(z.transpose(1, 2))
        if cache is not None:
            cache["ssm"] = s
        return y @ self.w(p + "out_proj.weight").T

    def mamba_step(self, p, h, cache):
        """h (b, H) with the release's rolling conv cache of width K."""
        xz = h @ self.w(p + "in_proj.weight").T
        x, z = xz[:, : self.I], xz[:, self.I:]
        conv = torch.roll(cache["conv"], shifts=-1, dims=-1)
        conv[:, :, -1] = x
        cache["conv"] = conv
        x = F.silu((conv * self.w(p + "conv1d.weight")[:, 0]).sum(-1) + self.w(p + "conv1d.bias"))
        dt, B, C = (x @ self.w(p + "x_proj.weight").T).split([self.R, self.N, self.N], dim=-1)
        delta = F.softplus(dt @ self.w(p + "dt_proj.weight").T + self.w(p + "dt_proj.bias"))
        A = -torch.exp(self.w(p + "A_log"))
        s = cache["ssm"] * torch.exp(delta[..., None] * A) + (delta * x)[..., None] * B[:, None, :]
        cache["ssm"] = s
        y = torch.einsum("bdn,bn->bd", s, C) + self.w(p + "D") * x
        y = y * F.silu(z)
        return y @ self.w(p + "out_proj.weight").T

    def expert(self, p, x):
        a_b = x @ self.w(p + "linear_fc1.weight").T
        a, bb = a_b.chunk(2, dim=-1)
        return (self.act(a) * bb) @ self.w(p + "linear_fc2.weight").T

    def moe(self, p, h, num_experts):
        shape = h.shape
        x = h.reshape(-1, shape[-1])
        route = torch.sigmoid(x @ self.w(p + "router.weight").T + self.w(p + "router.bias"))
        max_prob, max_ind = torch.max(route, dim=1)
        out = torch.zeros_like(x)
        for e in range(num_experts):
            rows = (max_ind == e).nonzero()[:, 0]
            if rows.numel():
                out[rows] = self.expert(p + f"local_experts.{e}.", x[rows])
        return (out * max_prob[:, None]).reshape(shape)

    # ------------------------------------------------------------------ model
    def forward(self, ids: torch.Tensor, caches: list | None = None, step: bool = False) -> torch.Tensor:
        h = self.w("embedding.word_embeddings.weight")[ids]
        residual = None
        for i, spec in enumerate(self.cfg["mamba_moe_layers"]):
            p = f"decoder.layers.{i}."
            residual = h if residual is None else h + residual
            x = self.rms(residual, self.w(p + "norm.weight"))
            if spec == "r":
                if step:
                    h = self.mamba_step(p + "mixer.", x[:, 0], caches[i]).unsqueeze(1)
                else:
                    h = self.mamba_full(p + "mixer.", x, caches[i] if caches is not None else None)
            elif spec == "1":
                h = self.expert(p + "mixer.", x)
            else:
                h = self.moe(p + "mixer.", x, int(spec))
        residual = h + residual
        out = F.layer_norm(residual, (residual.shape[-1],), self.w("decoder.final_layernorm.weight"),
                           self.w("decoder.final_layernorm.bias"), self.eps)
        return out @ self.w("embedding.word_embeddings.weight").T

    def greedy(self, ids: torch.Tensor, n: int) -> torch.Tensor:
        caches = [dict() for _ in self.cfg["mamba_moe_layers"]]
        logits = self.forward(ids, caches)
        out = ids
        for _ in range(n):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], dim=1)
            logits = self.forward(nxt, caches, step=True)
        return out
