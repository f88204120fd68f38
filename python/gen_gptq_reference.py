"""Reference fixture for the Rust GPTQ (crates/search/src/gptq.rs): a line-by-line transcription of
`GPTQ.add_batch` and `GPTQ.fasterquant` from the reference implementation
https://github.com/IST-DASLab/gptq/blob/9f2abd32533c83079847435a7c971bb4420285c8/gptq.py#L38-L150
run on a small layer with correlated inputs and one dead input column.

Two deliberate differences from upstream, both shared with the Rust code:
  - the updates run in float64 (upstream: float32), so both sides agree to the last bit;
  - each column is rounded by this project's uniform quantizer (crates/core/src/quant/uniform.rs:
    range widened to include 0, f32, x * (1/scale), round half to even, signed grid when
    symmetric) instead of upstream's `quant.Quantizer`, which differs only in x / scale and in an
    unsigned grid with zero = (maxq + 1) / 2 for the symmetric case (the same points).

Run from the repository root:
    .venv/bin/python python/gen_gptq_reference.py
Writes crates/search/tests/fixtures/gptq/reference.safetensors (committed): `w` [24, 64] f32,
`x` [256, 64] f32, `hessian` [64, 64] f64, and per case `<case>.codes` (u8, code − qmin),
`<case>.scale`, `<case>.zero_point` ([24, groups] f32) and `<case>.loss` (the proxy loss
tr((W − Q) H (W − Q)^T), f64, one element).
"""

import pathlib

import torch
from safetensors.torch import save_file

OUT = pathlib.Path("crates/search/tests/fixtures/gptq/reference.safetensors")
EPS = torch.finfo(torch.float32).eps

# name: (bits, symmetric, group (-1: per channel), act_order, static_groups, block_size)
CASES = {
    "g16_asym4": (4, False, 16, False, False, 32),
    "channel_sym3_act_order": (3, True, -1, True, False, 128),
    "g16_asym4_act_order_static": (4, False, 16, True, True, 32),
    "g8_sym4_block5": (4, True, 8, False, False, 5),
}


def grid_range(bits, sym):
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)


def find_params(w, bits, sym):
    """QParams::from_range on each row of w (the group's columns)."""
    qmin, qmax = grid_range(bits, sym)
    mn = w.amin(-1).float().clamp(max=0.0)
    mx = w.amax(-1).float().clamp(min=0.0)
    if sym:
        amax = torch.maximum(mn.abs(), mx)
        scale = (amax / ((qmax - qmin) / 2.0)).clamp(min=EPS)
        zero = torch.zeros_like(scale)
    else:
        width = mx.double() - mn.double()
        scale = (width / (qmax - qmin)).clamp(min=EPS).float()
        zero = (qmin - (mn / scale).round()).clamp(qmin, qmax)
    return scale, zero


def hessian(x):
    """add_batch over all rows at once: H = 2/N X^T X."""
    x = x.double()
    return x.t().matmul(x) * (2.0 / x.shape[0])


def fasterquant(W, H, bits, sym, groupsize, actorder, static_groups, blocksize, percdamp=0.01):
    qmin, qmax = grid_range(bits, sym)
    W = W.double().clone()
    H = H.clone()
    rows, columns = W.shape
    group = columns if groupsize == -1 else groupsize
    scales = torch.zeros(rows, columns // group)
    zeros = torch.zeros(rows, columns // group)

    fixed = []
    if groupsize == -1:
        # `if not self.quantizer.ready(): self.quantizer.find_params(W, weight=True)`: before
        # dead columns are zeroed.
        fixed.append(find_params(W, bits, sym))

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    if groupsize != -1 and static_groups:
        for i in range(0, columns, group):
            fixed.append(find_params(W[:, i : i + group], bits, sym))
    for g, (s, z) in enumerate(fixed):
        scales[:, g], zeros[:, g] = s, z

    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = torch.argsort(perm)

    codes = torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H

    current = None
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if not fixed:
                if (i1 + i) % group == 0:
                    current = find_params(W[:, (i1 + i) : (i1 + i + group)], bits, sym)
                    scales[:, (i1 + i) // group], zeros[:, (i1 + i) // group] = current
                scale, zero = current
            else:
                idx = i1 + i
                if actorder:
                    idx = perm[idx]
                scale, zero = fixed[idx // group]
            code = ((w.float() * scale.reciprocal()).round() + zero).clamp(qmin, qmax)
            q = ((code - zero) * scale).double()
            codes[:, i1 + i] = code.double() - qmin
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    if actorder:
        codes = codes[:, invperm]
    return codes.to(torch.uint8), scales, zeros


def dequantize(codes, scale, zero, bits, sym):
    qmin, _ = grid_range(bits, sym)
    rows, columns = codes.shape
    group = columns // scale.shape[1]
    q = codes.float().reshape(rows, -1, group) + qmin
    return ((q - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(rows, columns)


def main():
    torch.manual_seed(0)
    mix = torch.randn(64, 64)
    x = torch.randn(256, 64).matmul(mix) + 0.5 * torch.randn(256, 64)
    x[:, 5] = 0.0  # a dead input
    w = torch.randn(24, 64)
    w[:, 9] *= 6.0  # a large column, so act-order and group ranges matter
    w[:, 5] *= 10.0  # the dead input's weights set the per-channel ranges (taken before zeroing)
    h = hessian(x)
    tensors = {"w": w.contiguous(), "x": x.contiguous(), "hessian": h.contiguous()}
    for name, (bits, sym, group, actorder, static, block) in CASES.items():
        codes, scale, zero = fasterquant(w, h, bits, sym, group, actorder, static, block)
        q = dequantize(codes, scale, zero, bits, sym).double()
        d = w.double() - q
        loss = (d.matmul(h) * d).sum()
        tensors[f"{name}.codes"] = codes.contiguous()
        tensors[f"{name}.scale"] = scale.contiguous()
        tensors[f"{name}.zero_point"] = zero.contiguous()
        tensors[f"{name}.loss"] = loss.reshape(1)
        print(f"{name}: proxy loss {loss.item():.6g}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
