"""Task identification: which learned task does an image belong to, if any?

Following method.md ("Routing"):

* the router feature ``f`` (256-d) is an attention pooling of the FROZEN embedding Z
  (``a(h, w) = softmax_hw(||Z[:, h, w]|| / 256)``);
* one small ``TaskVAE`` per task (256 -> 128 -> 64, 90,752 parameters) is trained on the
  features of that task's training images; its score is the ELBO-style
  ``mean_d (f^ - f)^2 + beta * KL`` with beta = 16.5, computed with the posterior mean
  so that the same image always gets the same score;
* the task's threshold tau is the 97th percentile of 5-fold cross-validated held-out
  scores (permutation seed 2025); our change: the folds hold out whole files (patients),
  and slabs of a single volume (``fit_threshold``), so that tau holds for the next patient;
* route = argmin over tasks; above that task's tau the image is out of distribution and
  goes to the frozen model.

``Router`` stacks every task's VAE weights so that scoring N images against T tasks is a
handful of batched matrix products, not a Python loop over tasks.

Volumes get ONE decision from their slice scores: each task's volume score is the median
of its slice scores; the volume goes to the task with the lowest median, or to the frozen
model when that median is above the task's tau. The median ignores a minority of odd
slices (the empty ends of a scan) that would dominate a mean or a max.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .progress import CancelFn, check_cancel

FEATURE_DIM = 256
HIDDEN_DIM = 128
LATENT_DIM = 64
BETA = 16.5
VAE_LR = 5e-4
VAE_EPOCHS = 10
VAE_BATCH = 6
TAU_PERCENTILE = 97.0
TAU_FOLDS = 5
TAU_SEED = 2025


def router_feature(z: torch.Tensor) -> torch.Tensor:
    """Attention-pooled router feature: (256, H, W) or (B, 256, H, W) -> (256,) or (B, 256)."""
    single = z.ndim == 3
    if single:
        z = z[None]
    flat = z.float().flatten(2)  # (B, C, HW)
    attn = torch.softmax(flat.square().sum(1).sqrt() / flat.shape[1], dim=-1)  # (B, HW)
    f = torch.bmm(flat, attn[..., None])[..., 0]
    return f[0] if single else f


class TaskVAE(nn.Module):
    """256 -> 128 (GELU) -> mu, logvar (64); 64 -> 128 (GELU) -> 256. Xavier weights, zero bias."""

    def __init__(self, dim: int = FEATURE_DIM, hidden: int = HIDDEN_DIM, latent: int = LATENT_DIM) -> None:
        super().__init__()
        self.enc = nn.Linear(dim, hidden)
        self.mu = nn.Linear(hidden, latent)
        self.logvar = nn.Linear(hidden, latent)
        self.dec1 = nn.Linear(latent, hidden)
        self.dec2 = nn.Linear(hidden, dim)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def encode(self, f: torch.Tensor):
        h = F.gelu(self.enc(f))
        return self.mu(h), self.logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.dec2(F.gelu(self.dec1(z)))

    def forward(self, f: torch.Tensor, sample: bool = True):
        mu, logvar = self.encode(f)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
        return self.decode(z), mu, logvar


def elbo_score(recon: torch.Tensor, f: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
               beta: float = BETA) -> torch.Tensor:
    """Per-sample score: mean squared reconstruction error + beta * KL(q(z|f) || N(0, I))."""
    rec = ((recon - f) ** 2).mean(-1)
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)
    return rec + beta * kl


@torch.no_grad()
def vae_scores(vae: TaskVAE, features: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    """Deterministic scores (posterior mean) of features (N, 256) under one VAE."""
    vae.eval()
    recon, mu, logvar = vae(features.float(), sample=False)
    return elbo_score(recon, features.float(), mu, logvar, beta)


def train_vae(features: torch.Tensor, epochs: int = VAE_EPOCHS, batch: int = VAE_BATCH, lr: float = VAE_LR,
              beta: float = BETA, seed: int = 0, cancel: Optional[CancelFn] = None) -> TaskVAE:
    """Train a TaskVAE on features (N, 256) with the ELBO loss (reparameterised samples)."""
    features = features.detach().float().cpu()
    if features.ndim != 2 or features.shape[1] != FEATURE_DIM or features.shape[0] < 1:
        raise ValueError(f"router features must be (N>=1, {FEATURE_DIM}); got {tuple(features.shape)}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vae = TaskVAE()
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    vae.train()
    n = features.shape[0]
    for _ in range(epochs):
        check_cancel(cancel)
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch):
            f = features[order[start:start + batch]]
            recon, mu, logvar = vae(f, sample=True)
            loss = elbo_score(recon, f, mu, logvar, beta).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return vae.eval()


def fit_threshold(features: torch.Tensor, folds: int = TAU_FOLDS, percentile: float = TAU_PERCENTILE,
                  seed: int = TAU_SEED, cancel: Optional[CancelFn] = None, groups: Optional[Sequence[str]] = None,
                  **train_kwargs) -> float:
    """tau = the given percentile of k-fold cross-validated held-out scores.

    Folds never split a patient: with ``groups`` (the file each feature came from, e.g. the
    volume of a slice), whole files are held out (k = the number of files, at most ``folds``).
    The neighbouring slices of one volume are nearly the same image, so holding out single
    slices measures how well the VAE remembers that patient, and the next patient's volume
    scored far above such a tau (issue 31: a task learned from one hippocampus volume sent
    every other patient to the frozen model). From ONE volume, its slices are held out as
    ``SLABS`` contiguous slabs (unseen levels of the anatomy), features in slice order.
    Without groups, or with one image per file, the folds are random (permutation ``seed``);
    with fewer features than folds, leave-one-out.
    """
    features = features.detach().float().cpu()
    n = features.shape[0]
    if n < 2:
        raise ValueError("the router needs at least 2 images of the task to set its threshold")
    parts = _folds(n, folds, seed, groups)
    held_out = []
    for i, part in enumerate(parts):
        check_cancel(cancel)
        train_idx = torch.cat([p for j, p in enumerate(parts) if j != i])
        vae = train_vae(features[train_idx], seed=seed + i + 1, cancel=cancel, **train_kwargs)
        held_out.append(vae_scores(vae, features[part]))
    return float(np.percentile(torch.cat(held_out).numpy(), percentile))


SLABS = 3  # one volume's folds: chosen on hippocampus training volumes (benchmarks/route_patients.py)


def _folds(n: int, folds: int, seed: int, groups: Optional[Sequence[str]]) -> List[torch.Tensor]:
    """The held-out index sets of ``fit_threshold``."""
    if groups is not None:
        if len(groups) != n:
            raise ValueError(f"{len(groups)} groups for {n} router features")
        names = list(dict.fromkeys(groups))  # in order of appearance
        if len(names) == 1 and n >= 2 * SLABS:
            return [torch.arange(k * n // SLABS, (k + 1) * n // SLABS) for k in range(SLABS)]
        if 2 <= len(names) < n:
            k = min(folds, len(names))
            fold_of = {g: j % k for j, g in enumerate(names)}
            return [torch.tensor([i for i, g in enumerate(groups) if fold_of[g] == f]) for f in range(k)]
    k = min(folds, n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return list(torch.tensor_split(perm, k))


@dataclass
class RouteDecision:
    """``decision``: the chosen task, or None for the frozen model."""

    decision: Optional[str]
    scores: Dict[str, float]
    tau: Dict[str, float]
    best: Optional[str] = None  # the argmin task, even when it was rejected as out of distribution
    slice_scores: Optional[Dict[str, List[float]]] = None  # volumes only

    def to_json(self) -> dict:
        out = {"decision": self.decision, "scores": self.scores, "tau": self.tau}
        if self.slice_scores is not None:
            out["slice_scores"] = self.slice_scores
        return out


class Router:
    """All tasks' VAEs, stacked for one batched scoring pass."""

    def __init__(self) -> None:
        self.names: List[str] = []
        self.vaes: Dict[str, TaskVAE] = {}
        self.taus: Dict[str, float] = {}
        self._stack: Optional[Dict[str, torch.Tensor]] = None

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self.vaes

    def add(self, name: str, vae: TaskVAE, tau: float) -> None:
        if not np.isfinite(tau):
            raise ValueError(f"task {name!r}: tau must be a finite number, got {tau}")
        if name not in self.vaes:
            self.names.append(name)
        self.vaes[name] = vae.cpu().eval()
        self.taus[name] = float(tau)
        self._stack = None

    def remove(self, name: str) -> None:
        if name in self.vaes:
            self.names.remove(name)
            del self.vaes[name], self.taus[name]
            self._stack = None

    def _stacked(self) -> Dict[str, torch.Tensor]:
        """Every task's weights stacked along a task axis, pre-transposed for ``baddbmm``;
        the mu and logvar heads are fused into one (T, 128, 128) product."""
        if self._stack is None:
            def weight(layer: str) -> torch.Tensor:  # (T, in, out)
                return torch.stack([getattr(self.vaes[n], layer).weight.detach().T for n in self.names]).contiguous()

            def bias(layer: str) -> torch.Tensor:  # (T, 1, out)
                return torch.stack([getattr(self.vaes[n], layer).bias.detach()[None] for n in self.names]).contiguous()

            self._stack = {
                "enc.w": weight("enc"), "enc.b": bias("enc"),
                "head.w": torch.cat([weight("mu"), weight("logvar")], 2).contiguous(),
                "head.b": torch.cat([bias("mu"), bias("logvar")], 2).contiguous(),
                "dec1.w": weight("dec1"), "dec1.b": bias("dec1"),
                "dec2.w": weight("dec2"), "dec2.b": bias("dec2"),
                "tau": torch.tensor([self.taus[n] for n in self.names]),
            }
        return self._stack

    @torch.no_grad()
    def score(self, features: torch.Tensor, beta: float = BETA) -> torch.Tensor:
        """Scores (N, T) of features (N, 256) under every task's VAE, in one batched pass."""
        if not self.names:
            return torch.zeros(features.shape[0], 0)
        s = self._stacked()
        f = features.detach().float().cpu().reshape(-1, FEATURE_DIM)
        x = f[None].expand(len(self.names), -1, -1).contiguous()  # (T, N, 256)
        h = F.gelu(torch.baddbmm(s["enc.b"], x, s["enc.w"]))
        head = torch.baddbmm(s["head.b"], h, s["head.w"])
        mu, logvar = head[..., :LATENT_DIM].contiguous(), head[..., LATENT_DIM:]
        recon = torch.baddbmm(s["dec2.b"], F.gelu(torch.baddbmm(s["dec1.b"], mu, s["dec1.w"])), s["dec2.w"])
        return elbo_score(recon, x, mu, logvar, beta).T.contiguous()

    def route(self, feature: torch.Tensor) -> RouteDecision:
        """Route one image from its router feature (256,)."""
        scores = self.score(feature.reshape(1, -1))
        return self._decision(scores[0])

    def route_volume(self, features: torch.Tensor) -> RouteDecision:
        """One decision for a volume from its slice features (S, 256): median slice score per task."""
        scores = self.score(features)
        volume_scores = scores.median(0).values if scores.shape[0] else torch.zeros(len(self.names))
        decision = self._decision(volume_scores)
        decision.slice_scores = {n: [float(v) for v in scores[:, i]] for i, n in enumerate(self.names)}
        return decision

    def _decision(self, scores: torch.Tensor) -> RouteDecision:
        named = {n: float(scores[i]) for i, n in enumerate(self.names)}
        if not self.names:
            return RouteDecision(None, {}, {}, None)
        best = self.names[int(scores.argmin())]
        decision = best if named[best] <= self.taus[best] else None
        return RouteDecision(decision, named, dict(self.taus), best)
