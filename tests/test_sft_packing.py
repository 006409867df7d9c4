"""Packed SFT sequences keep their samples apart (issue 19, finding 3), as LLaMA-Factory's
neat_packing: positions, M-RoPE included, restart per sample; attention is block-diagonal."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from visionr1_trainer.data.formats import ColdExample
from visionr1_trainer.models.loading import load_vlm
from visionr1_trainer.models.vlm import IMAGE_TOKEN
from visionr1_trainer.sft.batches import collate, load_group, mrope_positions
from visionr1_trainer.sft.data import encode_example


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from visionr1_trainer.models.tiny import build_tiny_vlm

    path = build_tiny_vlm(tmp_path_factory.mktemp("tiny") / "model")
    model, tokenizer, processor = load_vlm(str(path), "float32", "sdpa", "cpu")
    return model.eval(), tokenizer, processor


@pytest.fixture(scope="module")
def samples(tiny, tmp_path_factory):
    _, tokenizer, processor = tiny
    root = tmp_path_factory.mktemp("images")
    Image.new("RGB", (56, 56), (0, 0, 255)).save(root / "a.png")
    Image.new("RGB", (112, 56), (255, 0, 0)).save(root / "b.png")

    def sample(i, images, question, reply):
        return encode_example(ColdExample(str(i), [{"role": "user", "content": question},
                                                   {"role": "assistant", "content": reply}],
                                          [str(root / p) for p in images]), tokenizer, processor, 4096)

    return [sample(0, ["a.png", "b.png"], "What color is the shape?", "<think>blue</think> 3"),
            sample(1, ["b.png"], "How many?", "<think>Wait, 2.</think> 2"),
            sample(2, [], "What is 1 + 1?", "2")]


def alone(model, tokenizer, processor, sample) -> torch.Tensor:
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    batch = collate([load_group([sample], processor)], tokenizer.pad_token_id, image_id)
    with torch.no_grad():
        return model(**batch.inputs).logits[0]


def test_mrope_positions_are_the_models_own(tiny, samples):
    model, tokenizer, processor = tiny
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    for sample in samples:
        group = load_group([sample], processor)
        ids = torch.as_tensor(group["input_ids"], dtype=torch.long)[None]
        expected, _ = model.model.get_rope_index(ids, mm_token_type_ids=(ids == image_id).int(),
                                                 image_grid_thw=group["image_grid_thw"])
        grids = group["image_grid_thw"].tolist() if group["image_grid_thw"] is not None else []
        ours = mrope_positions(sample.input_ids, image_id, grids, processor.merge_size)
        assert ours.tolist() == expected[:, 0].tolist()


def test_a_packed_row_gives_each_sample_its_own_logits(tiny, samples):
    """Before: packed samples attended to each other and their positions ran on, so the
    second and third samples' logits differed from their logits alone."""
    model, tokenizer, processor = tiny
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    packed = load_group(samples, processor, packed=True, image_token_id=image_id)
    short = load_group(samples[1:], processor, packed=True, image_token_id=image_id)  # padded row
    batch = collate([packed, short], tokenizer.pad_token_id, image_id)
    assert "attention_mask" not in batch.inputs and batch.inputs["position_ids"].shape[0] == 4
    with torch.no_grad():
        logits = model(**batch.inputs).logits
    starts = [0]
    for s in samples:
        starts.append(starts[-1] + len(s))
    for i, sample in enumerate(samples):
        ref = alone(model, tokenizer, processor, sample)
        torch.testing.assert_close(logits[0, starts[i]:starts[i + 1]], ref, atol=1e-5, rtol=1e-4)
    offset = 0
    for sample in samples[1:]:
        ref = alone(model, tokenizer, processor, sample)
        torch.testing.assert_close(logits[1, offset:offset + len(sample)], ref, atol=1e-5, rtol=1e-4)
        offset += len(sample)
    assert batch.target_tokens == sum(int((s.labels[1:] != -100).sum()) for s in samples + samples[1:])
