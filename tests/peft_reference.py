"""What HF PEFT itself computes for a prompt-tuned model: the reference our soft-prompt tasks are
held to (invariant 4). Rank classification by the labels' log-likelihoods through PEFT's forward."""

from __future__ import annotations

import torch

from server.backbone import Backbone
from server.data.spec import TaskSpec


def label_ids(backbone: Backbone, spec: TaskSpec, label: str) -> list[int]:
    """A label's tokens as taskserve scores it, written out independently: a decoder-only label is a
    new word after the template's cue unless the template ends in whitespace."""
    new_word = not backbone.is_encoder_decoder and not spec.template[-1:].isspace()
    return backbone.encode_target(f" {label}" if new_word else label)


@torch.no_grad()
def peft_label_probs(model, backbone: Backbone, spec: TaskSpec, text: str, n_virtual: int) -> torch.Tensor:
    """softmax over the labels of their summed log-likelihood under `model` (a PeftModel)."""
    ids = backbone.encode(spec.render(text))
    scores = []
    for label in spec.labels:
        target = label_ids(backbone, spec, label)
        if backbone.is_encoder_decoder:
            prompt = torch.tensor([ids])
            dec_in = torch.tensor([[backbone.model.config.decoder_start_token_id] + target[:-1]])
            logits = model(input_ids=prompt, attention_mask=torch.ones_like(prompt), decoder_input_ids=dec_in).logits[0]
            logp = logits.log_softmax(-1)[torch.arange(len(target)), target]
        else:
            full = torch.tensor([ids + target])
            logits = model(input_ids=full, attention_mask=torch.ones_like(full)).logits[0]  # [m + n, vocab]
            start = n_virtual + len(ids) - 1
            logp = logits.log_softmax(-1)[torch.arange(start, start + len(target)), target]
        scores.append(logp.sum() if spec.scoring == "sum" else logp[0] if spec.scoring == "first" else logp.mean())
    return torch.stack(scores).softmax(-1)
