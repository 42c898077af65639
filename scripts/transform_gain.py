"""Bits per value a transform fitted per (layer, K/V, head) could save before quantizing: a KLT's coding gain.

At a fixed step, an orthogonal transform leaves the squared error unchanged and changes the rate by
half the log-ratio of the channels' variances before and after it (high-rate theory, with an entropy
coder that adapts per channel): ``0.5 * mean(log2 var(x_c)) - 0.5 * mean(log2 var(y_c))``. The KLT (the
eigenvectors of the channels' covariance) is the transform that maximizes it. Rows are first divided by
their RMS over the plane, as the codec's row scale does, and keys lose their channel means (the key
offsets). The transform is fitted on one seed's bench quality documents and measured on another's, so
the figure is what a table fitted offline (like the channel steps) would give.

    python scripts/transform_gain.py --fit-seed 5 --test-seed 6 --documents 3
"""

from __future__ import annotations

import argparse
import json

import torch

from shadowserve.bench.common.quality_tasks import TaskBuilder, TaskSpec
from shadowserve.bench.suites.codec import _load, _prefill
from shadowserve.model.loader import load_model


def _kv(model, tokenizer, seed: int, documents: int) -> torch.Tensor:
    """Exact KV of ``documents`` needle documents of ``seed``, concatenated along the tokens."""
    spec = TaskSpec(needle_documents=documents, chain_documents=0, seed=seed)
    docs = TaskBuilder(tokenizer, spec).documents()
    return torch.cat([_prefill(model, torch.tensor([list(d.prefix_ids)])) for d in docs], dim=2)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[tokens, heads, head_dim] divided by each token's RMS over the plane."""
    return x / x.square().mean(dim=(-1, -2), keepdim=True).sqrt()


def gains(fit: torch.Tensor, test: torch.Tensor) -> list[list[float]]:
    """Coding gain in bits per value, per layer and K/V (mean over heads), of a KLT fitted on ``fit``."""
    layers, _, _, heads, _ = fit.shape
    out = []
    for layer in range(layers):
        row = []
        for kv in range(2):
            f, t = _rows(fit[layer, kv]).double(), _rows(test[layer, kv]).double()
            if kv == 0:  # keys are coded relative to their channel's centre
                mean = f.mean(0, keepdim=True)
                f, t = f - mean, t - mean
            g = 0.0
            for h in range(heads):
                basis = torch.linalg.eigh(f[:, h].T @ f[:, h] / f.shape[0]).eigenvectors
                before = t[:, h].var(0).clamp_min(1e-12).log2().mean()
                after = (t[:, h] @ basis).var(0).clamp_min(1e-12).log2().mean()
                g += 0.5 * float(before - after) / heads
            row.append(g)
        out.append(row)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fit-seed", type=int, default=5)
    p.add_argument("--test-seed", type=int, default=6)
    p.add_argument("--documents", type=int, default=3)
    p.add_argument("--json", help="write the per-layer gains here")
    args = p.parse_args()
    torch.set_num_threads(2)
    tokenizer = load_model("smollm2-135m", "float32").tokenizer
    _, model = _load("smollm2-135m")
    fit = _kv(model, tokenizer, args.fit_seed, args.documents)
    test = _kv(model, tokenizer, args.test_seed, args.documents)
    per_layer = gains(fit, test)
    keys, values = (sum(r[kv] for r in per_layer) / len(per_layer) for kv in (0, 1))
    print(f"KLT coding gain, bits per value: keys {keys:.3f}, values {values:.3f} "
          f"({fit.shape[2]} tokens fitted, {test.shape[2]} measured)")
    print("per layer (keys / values): " + ", ".join(f"{k:.2f}/{v:.2f}" for k, v in per_layer))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"fit_seed": args.fit_seed, "test_seed": args.test_seed, "documents": args.documents,
                       "keys_bits": keys, "values_bits": values, "per_layer": per_layer}, f, indent=1)


if __name__ == "__main__":
    main()
