"""DeepSight (Rieger et al., NDSS 2022), spec §3.7.

Needs no real server data: the DDif probes are random noise inputs (uniform in [0, 1], drawn
with ``rin.generator``) of the model's input shape (``needs_server_data`` is False).

Per upload, on the final layer (``rin.final_layer``):

- UP_j = |Delta b_j| + sum_k |Delta W_jk| per output neuron j; NEUP_j = UP_j^2 / sum_j UP_j^2;
- TE = #{j : NEUP_j >= max(0.01, 1 / C) * max_j NEUP_j} (threshold exceedings, C = classes);
  the upload is *suspicious* when TE < median(TE) / 2 (homogeneous training data - a backdoor -
  concentrates the update on few labels);
- DDif_c = mean over the noise inputs x of p_local(c | x) / (p_global(c | x) + 1e-30) (softmax,
  eval mode), one vector per noise seed: ``n_seeds`` batches of ``n_noise`` inputs. The paper uses
  3 x 20 000; the default here is 3 x 500 (``n_noise``): on a 20-client DigitsCNN(64, 128, 256)
  round the forward passes cost ~1 s of CPU per 1 000 probes per model, i.e. 3 x 2 000 probes
  take minutes per round on a small machine. Raise ``n_noise`` for closer fidelity.

Three clusterings, each turned into a binary "different cluster" matrix (HDBSCAN noise points are
singletons): HDBSCAN on the cosine distances of the final-layer updates (``cosine_on="update"``,
DeepSight; ``"local"``: final-layer local parameters), HDBSCAN on the NEUP vectors, HDBSCAN on the
DDif vectors (one per seed, averaged). The merged distance (mean of the three) is clustered by a
final HDBSCAN (precomputed). Every cluster (label != -1) whose share of suspicious uploads is
< tau = 1/3 is accepted; final noise points are rejected. HDBSCAN sizes: min_cluster_size = 2,
min_samples = 1, allow_single_cluster (the paper gives no values).

Accepted updates are clipped to min(1, median_i ||Delta_i|| / ||Delta_i||), the median over all
uploads, norms over every float entry. Flagged: not accepted.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mars_native.sim.defenses.base import DefenseOutput, RoundInput
from mars_native.sim.defenses.common import (
    RoundVectors,
    VectorDefense,
    as_list,
    cosine_distance_matrix,
    final_layer_rows,
    hdbscan_labels,
    l2_norms,
)
from mars_native.sim.defenses.flame import clip_factors


def neups(weight_delta: np.ndarray, bias_delta: np.ndarray) -> np.ndarray:
    """Normalised energy updates (n, C) from final-layer deltas (n, C, in) and (n, C)."""
    up = np.abs(weight_delta).sum(axis=2) + np.abs(bias_delta)
    sq = up * up
    tot = sq.sum(axis=1, keepdims=True)
    return np.where(tot > 0, sq / np.where(tot > 0, tot, 1.0), 0.0)


def threshold_exceedings(neup: np.ndarray) -> np.ndarray:
    """TE per row of ``neup`` (n, C): entries >= max(0.01, 1/C) * row maximum."""
    c = neup.shape[1]
    bound = max(0.01, 1.0 / c) * neup.max(axis=1, keepdims=True)
    return (neup >= bound).sum(axis=1)


def cluster_dissimilarity(labels: np.ndarray) -> np.ndarray:
    """(n, n) 0/1: 1 where two points are in different clusters (noise points are singletons)."""
    labels = np.asarray(labels)
    diff = (labels[:, None] != labels[None, :]) | (labels[:, None] == -1)
    diff = diff.astype(np.float64)
    np.fill_diagonal(diff, 0.0)
    return diff


@torch.no_grad()
def division_differences(
    rin: RoundInput, n_noise: int, n_seeds: int, batch: int = 1024
) -> np.ndarray:
    """DDif (n_seeds, n, C) of every upload against the global model on uniform noise inputs."""
    model = rin.make_model()
    model.eval()
    noise = torch.rand((n_seeds * n_noise, *rin.input_shape), generator=rin.generator)

    def probs(state: dict) -> torch.Tensor:
        model.load_state_dict(state)
        logits = torch.cat([model(noise[i : i + batch]) for i in range(0, noise.shape[0], batch)])
        return torch.softmax(logits.double(), dim=1)

    p_glob = probs(rin.global_state)
    out = []
    for state in rin.client_states:
        ratio = probs(state) / (p_glob + 1e-30)
        out.append(ratio.reshape(n_seeds, n_noise, -1).mean(dim=1).numpy())
    return np.stack(out, axis=1)


class DeepSight(VectorDefense):
    """DeepSight: NEUP/TE labelling + ensemble clustering (cosine, NEUP, DDif) + clipping.

    Args:
        n_noise: noise inputs per seed (500; paper 20 000).
        n_seeds: noise seeds (3).
        tau: a cluster is accepted when its suspicious share is < tau (1/3).
        min_cluster_size, min_samples: HDBSCAN sizes of every clustering (2, 1).
        cosine_on: "update" or "local" (final-layer features of the cosine clustering).
    """

    name = "deepsight"
    needs_server_data = False  # random noise only, no real data

    def __init__(
        self,
        n_noise: int = 500,
        n_seeds: int = 3,
        tau: float = 1.0 / 3.0,
        min_cluster_size: int = 2,
        min_samples: int = 1,
        cosine_on: str = "update",
    ) -> None:
        if int(n_noise) < 1 or int(n_seeds) < 1:
            raise ValueError(f"n_noise and n_seeds must be >= 1, got {n_noise!r}, {n_seeds!r}")
        if cosine_on not in ("update", "local"):
            raise ValueError(f"cosine_on must be 'update' or 'local', got {cosine_on!r}")
        self.n_noise = int(n_noise)
        self.n_seeds = int(n_seeds)
        self.tau = float(tau)
        self.min_cluster_size = int(min_cluster_size)
        self.min_samples = int(min_samples)
        self.cosine_on = cosine_on

    def config(self) -> dict[str, Any]:
        return {
            "n_noise": self.n_noise,
            "n_seeds": self.n_seeds,
            "tau": self.tau,
            "min_cluster_size": self.min_cluster_size,
            "min_samples": self.min_samples,
            "cosine_on": self.cosine_on,
        }

    def _hdbscan(self, x: np.ndarray, precomputed: bool = False) -> np.ndarray:
        return hdbscan_labels(
            x,
            precomputed=precomputed,
            min_cluster_size=self.min_cluster_size,
            min_samples=self.min_samples,
            allow_single_cluster=True,
        )

    def aggregate(self, rin: RoundInput, rv: RoundVectors) -> DefenseOutput:
        n = rv.n
        wd, bd = final_layer_rows(rv, rin.final_layer, "delta")
        neup = neups(wd, bd)
        te = threshold_exceedings(neup)
        suspicious = te < np.median(te) / 2.0

        fmask = rv.final_layer_mask(rin.final_layer)
        feats = (rv.deltas if self.cosine_on == "update" else rv.locals_)[:, fmask]
        cos_labels = self._hdbscan(cosine_distance_matrix(feats), precomputed=True)
        neup_labels = self._hdbscan(neup)
        ddif = division_differences(rin, self.n_noise, self.n_seeds)
        ddif_labels = [self._hdbscan(d) for d in ddif]
        merged = (
            cluster_dissimilarity(cos_labels)
            + cluster_dissimilarity(neup_labels)
            + np.mean([cluster_dissimilarity(lab) for lab in ddif_labels], axis=0)
        ) / 3.0
        labels = self._hdbscan(merged, precomputed=True)

        accepted = np.zeros(n, dtype=bool)
        for c in np.unique(labels[labels != -1]):
            members = labels == c
            if suspicious[members].mean() < self.tau:
                accepted |= members
        norms = l2_norms(rv.deltas)
        factors = clip_factors(norms, float(np.median(norms)))
        update = rv.weighted_sum(np.where(accepted, factors, 0.0))
        info = {
            "te": as_list(te),
            "suspicious": as_list(suspicious),
            "labels": as_list(labels),
            "cosine_labels": as_list(cos_labels),
            "neup_labels": as_list(neup_labels),
            "ddif_labels": [as_list(lab) for lab in ddif_labels],
        }
        return self.output(rv, update, int(accepted.sum()), ~accepted, info)
