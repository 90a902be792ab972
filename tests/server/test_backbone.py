"""Loading backbones from local HF folders, the uniform view, and the store fingerprint."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import tiny_llama, tiny_t5
from server.backbone import Backbone, fingerprint, load_backbone
from server.errors import Incompatible


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_local_folder_round_trip(tmp_path, kind: str) -> None:
    original = tiny_t5() if kind == "t5" else tiny_llama()
    original.model.save_pretrained(tmp_path)
    original.tokenizer.save_pretrained(tmp_path)
    loaded = load_backbone(str(tmp_path))
    assert loaded.kind == ("seq2seq" if kind == "t5" else "decoder")
    assert (loaded.d_model, loaded.n_layers) == (original.d_model, original.n_layers)
    assert loaded.fingerprint == original.fingerprint
    assert not any(p.requires_grad for p in loaded.model.parameters()) and not loaded.model.training
    assert loaded.encode("hello") == original.encode("hello")


def test_fingerprint_ignores_dtype_but_not_weights() -> None:
    backbone = tiny_llama()
    fp32 = fingerprint(backbone.model)
    assert fingerprint(backbone.model.to(torch.bfloat16)) == fp32
    with torch.no_grad():
        backbone.model.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    assert fingerprint(backbone.model) != fp32


def test_unsupported_layout_is_refused() -> None:
    from transformers import BertConfig, BertForMaskedLM, ByT5Tokenizer

    bert = BertForMaskedLM(BertConfig(vocab_size=384, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    with pytest.raises(Incompatible):
        Backbone.from_model(bert, ByT5Tokenizer())


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_labels_are_scored_with_a_leading_space_only_on_decoder_only(kind: str) -> None:
    """A decoder-only label continues the template's cue as a new word (" positive") unless the
    template ends in whitespace; T5's decoder starts the label from scratch (ending in </s>)."""
    b = tiny_t5() if kind == "t5" else tiny_llama()
    words = b.tokenizer("positive", add_special_tokens=False)["input_ids"]
    spaced = b.tokenizer(" positive", add_special_tokens=False)["input_ids"]
    if kind == "t5":
        assert b.label_ids("positive", "Sentiment:") == b.label_ids(" positive ", "x ") == words + [b.eos_id]
    else:
        assert b.label_ids("positive", "Sentiment:") == b.label_ids(" positive", "Sentiment:") == spaced
        assert b.label_ids("positive", "Sentiment: ") == words


@pytest.mark.parametrize("rows", [1, 3])
def test_the_lm_head_gets_a_fresh_input_so_its_matmul_is_one_mm(rows: int) -> None:
    """HF hands the head the last position as a view with the whole sequence's strides; torch's
    matmul then broadcasts the vocabulary weight into a batched matmul (a copy of the embedding per
    row). The backbone gives the head a fresh [b, 1, d] copy instead, with the same logits."""
    backbone = tiny_llama()
    seen = []
    backbone.model.get_output_embeddings().register_forward_pre_hook(lambda _m, args: seen.append(args[0].stride()))
    ids = torch.randint(3, 50, (rows, 7))
    with torch.no_grad():
        kept = backbone.model(input_ids=ids, logits_to_keep=1).logits[:, -1]
        full = backbone.model(input_ids=ids).logits[:, -1]
    d = backbone.d_model
    assert seen[0] == (d, d, 1), seen  # not (7 * d, d, 1): the sliced view
    assert torch.allclose(kept, full, atol=1e-6)


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_a_16_bit_model_computes_its_logits_in_fp32(kind: str) -> None:
    """bf16 serving: the blocks run in bf16 but the head's product is fp32 — the logits are the fp32
    product of the bf16 hidden state and the head's weight (bf16 logits round to 0.06–0.125 at the
    magnitudes labels are ranked at); an fp32 model's head is untouched."""
    backbone = tiny_t5() if kind == "t5" else tiny_llama()
    head = backbone.model.get_output_embeddings()
    inputs = {"input_ids": torch.randint(3, 50, (2, 7))}
    if kind == "t5":
        inputs["decoder_input_ids"] = torch.randint(3, 50, (2, 3))
    seen = []
    head.register_forward_hook(lambda _m, args, out: seen.append((args[0], out)))
    with torch.no_grad():
        fp32 = backbone.model(**inputs).logits
        backbone.model.to(torch.bfloat16)
        bf16 = backbone.model(**inputs).logits
    assert fp32.dtype == bf16.dtype == torch.float32
    hidden, out = seen[-1]
    assert hidden.dtype == torch.bfloat16  # the blocks below the head stayed bf16
    expected = hidden.double() @ head.weight.double().T  # written here from the bf16 state and weight
    assert torch.allclose(out.double(), expected, atol=1e-5)
    rounded = (hidden @ head.weight.T).double()  # what a bf16 head would have returned
    assert (rounded - expected).abs().max() > 1e-4  # so the test can tell the two apart
    assert (bf16 - fp32).abs().max() > 0  # the bf16 blocks still change the answer a little
    twin = copy.deepcopy(backbone.model)  # bench.run hands PEFT a deepcopy: it must compute with its own head
    twin_head = twin.get_output_embeddings()
    with torch.no_grad():
        twin_head.weight.mul_(2)
        twin(**inputs)  # the copied hook records the twin's head too
        hidden, out = seen[-1]
        assert torch.allclose(out.double(), hidden.double() @ twin_head.weight.double().T, atol=1e-5)
        assert torch.equal(backbone.model(**inputs).logits, bf16)
