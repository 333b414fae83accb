"""snip's loss at the head: lm_head and cross-entropy on the response positions only, in chunks,
with the gradient formed as the loss is (imported only by scoring, so torch at the top is fine)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spinctl.scoring.methods import token_loss

CHUNK_BYTES = 64 << 20  # fp32 logits of one chunk of response rows


def head_loss(hidden, labels, head, scale: float = 1.0):
    """scale · response_loss(head(hidden), labels) (methods.py), differentiable in `hidden`.

    The head runs only on the positions that predict a response token, a chunk of them at a
    time: the logits [B, T, V] and their gradient are otherwise the largest tensors of the
    pass (SmolLM2's vocabulary is 49k); here at most CHUNK_BYTES of them exist at once.
    lm_head's weight takes no gradient, so a chunk's dL/dh is known as soon as its logits are:
    (softmax - onehot) · w_row · scale, cast to the model dtype, times the weight; `scale`
    comes before that cast, as in a scaled loss's backward (fp16 needs it). A head with a
    bias, or anything but a Linear, takes the plain autograd path.

    hidden [B, T, D]: the final (normed) hidden states; labels [B, T], -100 off the response.
    """
    target = labels[:, 1:]  # position t predicts token t+1
    sel = target != -100
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return token_loss(head(hidden[:, :-1]), target) * scale
    b, t = sel.nonzero(as_tuple=True)  # row-major: each sample's positions in order
    row_weight = 1.0 / sel.sum(1).clamp(min=1)[b].float()  # 1 / (response tokens of the row's sample)
    return HeadLoss.apply(hidden[b, t], head.weight, target[b, t], row_weight, scale)


class HeadLoss(torch.autograd.Function):
    """Σ_rows w_row · CE(h_row Wᵀ, target_row) · scale for h [N, D]; the gradient is for h only."""

    @staticmethod
    def forward(ctx, h, weight, target, row_weight, scale):
        chunk = max(1, CHUNK_BYTES // (weight.shape[0] * 4))
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad = torch.empty_like(h)
        for lo in range(0, h.shape[0], chunk):
            hi = min(lo + chunk, h.shape[0])
            rows, tgt, w = torch.arange(hi - lo, device=h.device), target[lo:hi], row_weight[lo:hi]
            # log_softmax, as autograd's cross-entropy forms it: subtracting the max first keeps
            # 1 - p_target accurate when p_target is near 1 (logits - logsumexp would lose it).
            logp = torch.log_softmax(F.linear(h[lo:hi], weight).float(), 1)  # [c, V]
            loss -= torch.dot(logp[rows, tgt], w)
            p = logp.exp_()  # softmax, in place
            p[rows, tgt] -= 1
            grad[lo:hi] = p.mul_((w * scale)[:, None]).to(h.dtype) @ weight
        ctx.save_for_backward(grad)
        return loss * scale

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * g.to(grad.dtype), None, None, None, None
