"""What the hyper-connection sites of a trained model do: their mean coefficients, and how far apart
the n parallel streams are after each site writes them.

For the streams y (..., n, C) a site writes, with m = mean_i y_i:

    spread = sqrt(mean_i |y_i - m|^2) / sqrt(|m|^2)     (per token, then averaged over tokens)

The streams start as n copies of one residual stream (spread 0); while they are copies, the
per-stream parameters of a site get nearly equal gradients, and the streams only become different
through the input-dependent terms a * (W z), which start small (a = 0.01). A spread that stays near
0 after training means the n streams never separated: the model then computes what a single stream
with learned scalar gates would.

`SiteStats` wraps each site's `write` while it is active (a context manager), so the model's code is
untouched; run plain forwards inside it (not the layer-by-layer read-out of `LayerStats`, which
writes the Hyperloop streams once more per middle layer to show the stream "as if the loop ended").
"""

from __future__ import annotations

import torch

from hyperloop.model.hyper import HyperConnection, write_result


class SiteStats:
    def __init__(self, model: torch.nn.Module):
        self.sites: list[HyperConnection] = list(getattr(model, "hc", []))
        self.tokens = [0] * len(self.sites)
        self.sums: list[dict[str, torch.Tensor]] = [{} for _ in self.sites]

    def __enter__(self) -> SiteStats:
        for index, site in enumerate(self.sites):
            site.write = self._recording(index, site.write)  # an instance attribute shadows the method
        return self

    def __exit__(self, *exc) -> None:
        for site in self.sites:
            del site.write

    def _recording(self, index: int, write):
        def recorded(y: torch.Tensor, out: torch.Tensor, coeffs, merge=None, next_site=None):
            new = write(y, out, coeffs)  # the streams themselves, also where `write` returns more or less
            streams = new.double()
            mean = streams.mean(-2)
            spread = (streams - mean.unsqueeze(-2)).square().mean((-2, -1)).sqrt() / mean.square().mean(-1).sqrt()
            h_pre, h_post, h_res = coeffs
            per_token = {"spread": spread, "h_pre": h_pre, "h_post": h_post}
            if h_res is not None:
                per_token["h_res"] = h_res
            sums, tokens = self.sums[index], spread.numel()
            for name, value in per_token.items():
                total = value.double().reshape(tokens, *value.shape[spread.dim():]).sum(0)
                sums[name] = sums[name] + total if name in sums else total
            self.tokens[index] += tokens
            return write_result(new, merge, next_site)

        return recorded

    def summary(self) -> list[dict]:
        """Per site: the token means of spread, H_pre, H_post, H_res ((n) diagonal, (n, n) Sinkhorn,
        absent for identity) and the learned scalars a_pre, a_post (, a_res)."""
        rows = []
        for index, (site, sums, tokens) in enumerate(zip(self.sites, self.sums, self.tokens)):
            if tokens:
                means = {name: (value / tokens).tolist() for name, value in sums.items()}
                rows.append({"site": index, **means, "alpha": site.alpha.detach().float().tolist()})
        return rows
