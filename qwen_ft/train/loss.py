"""Causal-LM loss that projects only the positions whose next token is learned.

The output layer is the largest matmul of a Qwen model (151,936 rows); most positions of a
ChatML example are masked (system/user turns), so the model is asked for logits only at
positions whose next-token label is learned (`logits_to_keep` with explicit indices), through
the model's own forward so DDP/DeepSpeed hooks still run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwen_ft.data.chatml import IGNORE_INDEX
from qwen_ft.data.collate import GATHER, GROUPS, SCATTER, learned_indices


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Forward kwargs of a collated batch (position_ids when packed, attention_mask when padded; the looked-up
    embeddings instead of the ids where the host embedding made them, model/host_embedding.py)."""
    keys = (
        "inputs_embeds" if "inputs_embeds" in batch else "input_ids",
        "position_ids",
        "attention_mask",
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
        GATHER,
        SCATTER,
        GROUPS,
    )
    return {k: batch[k] for k in keys if k in batch}


def with_learned_indices(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch with collate's learned indices: made on the host by collate (no device sync), or
    here, from the labels, for a batch built elsewhere (one sync)."""
    if "learned_index" in batch:
        return batch
    return {**batch, **learned_indices(batch["labels"])}


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over learned labels, and how many labels that is.

    Position t predicts labels[:, t + 1]; only positions where some row learns that label are
    projected through the output layer.
    """
    batch = with_learned_indices(batch)
    target = batch["labels"][:, 1:]
    keep = batch["learned_columns"]
    if keep.numel() == 0:  # still run the forward so every process takes part in the same collectives
        keep = torch.zeros(1, dtype=torch.long, device=target.device)
    out = model(**model_inputs(batch), use_cache=False, logits_to_keep=keep)
    logits = out.logits.float()
    wanted = target[:, keep]
    loss = F.cross_entropy(logits.flatten(0, 1), wanted.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int(batch["learned_index"].numel())


class ChunkedLoss:
    """The same loss as `causal_lm_loss` (both are `LossFn`s, train/protocols.py), with the output
    layer and cross-entropy run in chunks.

    A forward hook captures the decoder's final hidden states; the model's own forward (so DDP
    and DeepSpeed hooks still run) is asked for the logits of one position only. The learned
    positions are gathered (by the host-made index, so the device is never waited on) and the
    output layer and cross-entropy run over them `chunk` at a time, fused: each chunk's gradient
    with respect to the hidden states (and a trained output layer's weight) is computed in the
    forward pass, so backward recomputes nothing and no chunk's logits outlive its own step
    (`fused_linear_cross_entropy`; Liger's Triton kernel instead, `kernel` says when). An
    output layer that is not a plain bias-free Linear (a LoRA
    adapter on it) runs the same chunks under activation checkpointing instead. Not for ZeRO-3,
    whose output-layer weights are partitioned outside the forward.
    """

    def __init__(self, unwrapped, chunk: int, fused: bool = True, kernel: str = "auto"):
        base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        self.head = base.get_output_embeddings()  # peft wrappers (LoRA, modules_to_save) included
        self.chunk = chunk
        weight = head_weight(self.head) if fused else None
        self.fused = weight is not None
        self.liger = _use_liger(kernel, weight.device if weight is not None else None)
        self._hidden: torch.Tensor | None = None
        self._hook = base.get_decoder().register_forward_hook(self._capture)

    def _capture(self, module, args, output) -> None:
        self._hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    def _chunk_loss(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.head(hidden).float(), target, reduction="sum")

    def _gather(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states and targets of the learned positions (batch["learned_index"]), flattened."""
        target, index = batch["labels"][:, 1:], batch["learned_index"]
        if self._hidden is None:
            raise RuntimeError("the decoder's forward hook captured no hidden states")
        hidden, self._hidden = self._hidden[:, :-1], None
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, index), target.reshape(-1).index_select(0, index)

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Summed next-token cross-entropy over learned labels, and how many labels that is."""
        from torch.utils.checkpoint import checkpoint

        batch = with_learned_indices(batch)
        model(**model_inputs(batch), use_cache=False, logits_to_keep=1)
        hidden, target = self._gather(batch)
        n = int(target.numel())
        if n == 0:  # keep the graph connected so every process joins the same collectives
            return hidden.sum().float() * 0.0, 0
        weight = head_weight(self.head) if self.fused else None
        if weight is not None and self.liger and hidden.is_cuda:
            return liger_linear_cross_entropy(hidden, weight, target), n
        if weight is not None:
            return fused_linear_cross_entropy(hidden, weight, target, self.chunk), n
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, n, self.chunk):
            end = start + self.chunk
            total = total + checkpoint(self._chunk_loss, hidden[start:end], target[start:end], use_reentrant=False)
        return total, n


def _use_liger(kernel: str, head_device: torch.device | None) -> bool:
    """Whether Liger's kernel replaces the fused chunks (train.loss_kernel): `auto` where it runs
    (a plain Linear head, `head_device`, on CUDA; liger-kernel importable), `liger` there or an error.

    Raises:
        QwenFtError: `liger` where it cannot run; MissingDependency: liger-kernel is not installed.
    """
    from qwen_ft import deps
    from qwen_ft.errors import QwenFtError

    if kernel == "qwen-ft":
        return False
    runs = head_device is not None and head_device.type == "cuda"
    if kernel == "auto":
        return runs and deps.usable("liger")
    deps.require("liger", "train.loss_kernel=liger")
    if not deps.usable("liger"):
        raise QwenFtError(
            "train.loss_kernel: liger, but liger-kernel's Triton kernels do not import here (a wheel "
            "for another torch?); reinstall it: pip install 'qwen-ft[liger]', or set loss_kernel: auto"
        )
    if not runs:
        why = "the output layer is not a plain Linear" if head_device is None else "the model is not on a CUDA GPU"
        raise QwenFtError(
            f"train.loss_kernel: liger, but {why} (Liger's kernel runs on CUDA tensors through a "
            "bias-free Linear head); set train.loss_kernel: auto"
        )
    return True


def head_weight(head) -> torch.Tensor | None:
    """The weight the output layer multiplies by now, when it is a plain bias-free Linear (also inside
    peft's modules_to_save wrapper: the trained copy, or the original while adapters are disabled); None
    for anything else (a LoRA adapter on the head)."""
    if hasattr(head, "modules_to_save") and hasattr(head, "active_adapters"):
        # under peft's disable_adapter (a preference reference) the wrapper runs its original module
        active = [] if head.disable_adapters else [a for a in head.active_adapters if a in head.modules_to_save]
        head = head.modules_to_save[active[0]] if active else head.original_module
    if type(head) is torch.nn.Linear and head.bias is None:
        return head.weight
    return None


def fused_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int
) -> torch.Tensor:
    """sum(cross_entropy(hidden @ weight.T, target)), with gradients made chunk by chunk in the forward.

    Under autocast the matmuls run in the autocast dtype, as `nn.Linear` would; the softmax and
    the sum are fp32.
    """
    dtype = matmul_dtype(hidden)
    if not torch.is_grad_enabled():  # evaluation: needs_input_grad would still follow requires_grad
        hidden, weight = hidden.detach(), weight.detach()
    return _FusedLinearCE.apply(hidden, weight, target, chunk, dtype)


def liger_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The same sum through Liger's Triton kernel (GPU only), in the autocast dtype like the rest.
    (Liger 0.8.5 makes the host wait for the device 3 times per call; measured on an H100.)"""
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    dtype = matmul_dtype(hidden)
    with torch.autocast("cuda", enabled=False):
        loss = LigerFusedLinearCrossEntropyLoss(reduction="sum", accum_dtype=torch.float32)  # weight grad in fp32
        return loss(weight.to(dtype), hidden.to(dtype), target).float()


def matmul_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype `nn.Linear` would multiply in here: autocast's when it is on, else the input's."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


def exp_shifted_(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Overwrite a chunk's fp32 logits with exp(logits - row max), in place (one chunk-sized buffer, no
    temporary beside it); returns the row maxima and the row sums ([rows, 1] each): log-sum-exp is
    max + log(sum), and the softmax is the buffer divided by the sums."""
    top = logits.amax(dim=-1, keepdim=True)
    return top, logits.sub_(top).exp_().sum(dim=-1, keepdim=True)


class _FusedLinearCE(torch.autograd.Function):
    """Forward: the loss plus d loss / d hidden (and d loss / d weight when trained), chunk by chunk.
    Backward: the saved gradients times the incoming scale; nothing is recomputed."""

    @staticmethod
    def forward(ctx, hidden, weight, target, chunk: int, dtype: torch.dtype):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            for start in range(0, target.numel(), chunk):
                h, t = hidden[start : start + chunk].to(dtype), target[start : start + chunk]
                logits = (h @ w.T).float()
                # log-sum-exp and softmax in place: one chunk-sized buffer, no temporary beside it
                picked = logits.gather(1, t[:, None]).squeeze(1)
                top, sums = exp_shifted_(logits)
                total += (top + sums.log()).squeeze(1).sub_(picked).sum()
                if not (need_h or need_w):
                    continue
                g = logits.div_(sums)  # softmax, written over the logits
                g[torch.arange(t.numel(), device=t.device), t] -= 1.0
                g = g.to(dtype)
                if grad_h is not None:  # need_h
                    grad_h[start : start + chunk] = g @ w
                if grad_w is not None and dtype == torch.float16:  # fp16's range: a chunk's unscaled sum can overflow
                    grad_w.addmm_(g.T.float(), h.float())
                elif grad_w is not None:  # need_w
                    grad_w += g.T @ h  # per chunk in the compute dtype (bf16: fp32's range), summed in fp32
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_out  # a 0-dim fp32 scale: multiplied in fp32, kept in grad_h's dtype
        if grad_w is not None:
            grad_w = (grad_w * grad_out).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None
