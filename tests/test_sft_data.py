"""SFT sequences: chat template, assistant-only labels, cutoff, packing, batches, schedule."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from visionr1_trainer.data.formats import ColdExample
from visionr1_trainer.models.vlm import IMAGE_TOKEN
from visionr1_trainer.sft.batches import collate, epoch_micro_batches, load_group, pack
from visionr1_trainer.sft.data import IGNORE_INDEX, SkipSample, encode_all, encode_example
from visionr1_trainer.sft.schedule import lr_multiplier, micro_batches_of_step, step_plan


@pytest.fixture(scope="module")
def parts():
    from visionr1_trainer.models.tiny import build_image_processor, build_tokenizer

    return build_tokenizer(), build_image_processor()


@pytest.fixture
def image(tmp_path):
    Image.new("RGB", (56, 56), (0, 0, 255)).save(tmp_path / "blue.png")
    Image.new("RGB", (112, 56), (255, 0, 0)).save(tmp_path / "wide.png")
    return tmp_path


REPLY_1 = "<think>It is blue.</think><answer> Final Answer:C </answer>"
REPLY_2 = "Yes, blue."


def example(images, **kw) -> ColdExample:
    return ColdExample(kw.get("id", "x"), [
        {"role": "system", "content": "Answer carefully."},
        {"role": "user", "content": "What color is the shape?"},
        {"role": "assistant", "content": REPLY_1},
        {"role": "user", "content": "Are you sure?"},
        {"role": "assistant", "content": REPLY_2},
    ], [str(p) for p in images])


def test_only_assistant_tokens_carry_loss(parts, image):
    tokenizer, processor = parts
    sample = encode_example(example([image / "blue.png", image / "wide.png"]), tokenizer, processor, 1024)
    sample.input_ids, sample.labels = sample.input_ids.tolist(), sample.labels.tolist()
    labelled = [t for t, l in zip(sample.input_ids, sample.labels) if l != IGNORE_INDEX]
    assert all(l in (IGNORE_INDEX, t) for t, l in zip(sample.input_ids, sample.labels))
    assert tokenizer.decode(labelled) == f"{REPLY_1}<|im_end|>\n{REPLY_2}<|im_end|>\n"
    context = tokenizer.decode([t for t, l in zip(sample.input_ids, sample.labels) if l == IGNORE_INDEX])
    assert context.startswith("<|im_start|>system\nAnswer carefully.<|im_end|>\n<|im_start|>user\n<|vision_start|>")
    assert "What color is the shape?" in context and "Are you sure?" in context and "blue." not in context
    # Image tokens as the processor makes them: 56x56 -> 4, 112x56 resized to the 56x56 area -> 2.
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert sample.image_tokens == [4, 2] and sample.input_ids.count(image_id) == 6
    group = load_group([sample], processor)
    assert group["image_grid_thw"].tolist() == [[1, 4, 4], [1, 2, 4]]


def test_cutoff_truncates_the_reply_or_drops_the_sample(parts, image):
    tokenizer, processor = parts
    full = encode_example(example([image / "blue.png"]), tokenizer, processor, 1024)
    first_label = next(i for i, l in enumerate(full.labels) if l != IGNORE_INDEX)
    cut = encode_example(example([image / "blue.png"]), tokenizer, processor, first_label + 3)
    assert cut.truncated and len(cut) == first_label + 3
    assert (cut.input_ids == full.input_ids[: first_label + 3]).all() and (cut.labels == full.labels[: first_label + 3]).all()
    with pytest.raises(SkipSample, match="too_long"):
        encode_example(example([image / "blue.png"]), tokenizer, processor, first_label)
    samples, counts, _ = encode_all([example([image / "blue.png"], id=str(i)) for i in range(2)],
                                    tokenizer, processor, 12)  # inside the image tokens
    assert samples == [] and counts == {"too_long": 2}


def test_pack_first_fit_decreasing():
    # Longest first: 8 opens bin A, 5 opens B, 4 joins B, 3 opens C, 2 fills A.
    groups = pack([5, 3, 8, 2, 4], capacity=10)
    assert groups == [[0, 4], [1], [2, 3]]
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3, 4]
    assert all(sum([5, 3, 8, 2, 4][i] for i in g) <= 10 for g in groups)
    assert pack([10, 10], capacity=10) == [[0], [1]]


def test_epoch_order_is_deterministic_and_ranks_split_it():
    one = epoch_micro_batches(10, 3, epoch=1, seed=7)
    assert one == epoch_micro_batches(10, 3, epoch=1, seed=7) != epoch_micro_batches(10, 3, epoch=2, seed=7)
    assert sorted(i for b in one for i in b) == list(range(10)) and [len(b) for b in one] == [3, 3, 3, 1]
    ranks = [epoch_micro_batches(5, 2, epoch=0, seed=1, rank=r, world_size=2) for r in range(2)]
    flat = [[i for b in r for i in b] for r in ranks]
    assert len(flat[0]) == len(flat[1]) == 3 and set(flat[0] + flat[1]) == set(range(5))


def test_collate_pads_right_and_marks_image_tokens(parts, image):
    tokenizer, processor = parts
    short = ColdExample("s", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
                        [str(image / "blue.png")])
    samples, _, _ = encode_all([example([image / "blue.png"]), short], tokenizer, processor, 1024)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    batch = collate([load_group([s], processor) for s in samples], tokenizer.pad_token_id, image_id)
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    n = len(samples[1])
    assert mask[1].tolist() == [1] * n + [0] * (ids.shape[1] - n)
    assert (ids[1, n:] == tokenizer.pad_token_id).all() and (batch.labels[1, n:] == IGNORE_INDEX).all()
    assert batch.inputs["mm_token_type_ids"].sum() == 8 and batch.inputs["pixel_values"].shape[0] == 32
    assert batch.tokens == int(mask.sum())
    assert batch.target_tokens == sum(sum(l != IGNORE_INDEX for l in s.labels[1:]) for s in samples)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant", "constant_with_warmup"])
def test_lr_multiplier_matches_transformers(schedule):
    from transformers import get_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    reference = get_scheduler(schedule, optimizer, num_warmup_steps=3, num_training_steps=20)
    for step in range(20):
        assert lr_multiplier(step, 20, 3, schedule) == pytest.approx(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    with pytest.raises(ValueError, match="unknown lr schedule 'step'; valid: cosine"):
        lr_multiplier(0, 1, 0, "step")


def test_step_plan_and_micro_batches_of_step():
    plan = step_plan(num_sequences=21, batch_size=2, accumulation=4, epochs=2.5, warmup_ratio=0.05, world_size=2)
    # 11 sequences per rank -> 6 micro-batches -> 2 steps per epoch (4 + 2) -> 5 steps.
    assert (plan.micro_batches_per_epoch, plan.steps_per_epoch, plan.total_steps, plan.warmup_steps) == (6, 2, 5, 1)
    assert micro_batches_of_step(0, plan, 4) == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert micro_batches_of_step(1, plan, 4) == [(0, 4), (0, 5)]
    assert micro_batches_of_step(4, plan, 4) == [(2, 0), (2, 1), (2, 2), (2, 3)]
    assert step_plan(1, 8, 8, 2.0, 0.0).total_steps == 2
    assert math.isclose(lr_multiplier(5, 5, 1, "cosine"), 0.0, abs_tol=1e-12)
