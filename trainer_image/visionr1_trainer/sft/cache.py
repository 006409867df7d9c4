"""The encoded cold-start set, kept with the stage's work so a restart does not tokenise again.

Encoding 200K conversations of ~3K tokens takes a while and, done by every rank on every
restart, costs each attempt that much before its first step. Rank 0 encodes once and
commits the ``EncodedSet`` under the stage's output as the artifact
``encoded/<key>``; the other ranks, and every later attempt, fetch it. The key is a
hash of everything the encoding depends on: the examples (ids, turns, image file sizes),
the tokenizer (its vocabulary and merges, chat template), the image processor's settings,
``cutoffLength`` and the image bounds; change any and the set is encoded anew.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from .data import EncodedSet, encode_all
from .images import ImageBounds

log = logging.getLogger("visionr1.sft")

ENCODING_VERSION = 1  # bump when the encoding itself changes
PREFIX = "encoded"


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what turns text into ids: the fast tokenizer's whole definition, or its vocabulary."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(str(tokenizer.chat_template).encode())
    return digest.hexdigest()


def processor_fingerprint(image_processor) -> str:
    try:
        settings = image_processor.to_dict()
    except (AttributeError, TypeError):
        settings = vars(image_processor)
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def encoding_key(examples: Sequence[Any], tokenizer, image_processor, cutoff_length: int,
                 bounds: ImageBounds) -> str:
    """The hex key of an encoding: it changes whenever the encoded set would."""
    digest = hashlib.sha256(json.dumps({
        "version": ENCODING_VERSION, "cutoff": cutoff_length, "max_pixels": bounds.max_pixels,
        "min_pixels": bounds.min_pixels, "tokenizer": tokenizer_fingerprint(tokenizer),
        "processor": processor_fingerprint(image_processor),
    }, sort_keys=True).encode())
    for example in examples:
        sizes = [os.path.getsize(p) for p in example.image_paths]
        digest.update(json.dumps([example.id, example.messages, sizes]).encode())
    return digest.hexdigest()[:32]


def load_or_encode(store, work: Path, examples, tokenizer, image_processor, cutoff_length: int,
                   bounds: ImageBounds, env, barrier) -> tuple[EncodedSet, collections.Counter, bool]:
    """The encoded set of ``examples`` and the skipped counts; whether it came from the cache.

    Rank 0 encodes when no committed encoding has this key, and commits it; ``barrier``
    (a collective) then lets every other rank fetch it.
    """
    key = encoding_key(examples, tokenizer, image_processor, cutoff_length, bounds)
    name = f"{PREFIX}/{key}"
    cached = store.is_committed(name)
    if not cached and env.is_main:
        samples, skipped, index = encode_all(examples, tokenizer, image_processor, cutoff_length, bounds)
        encoded = EncodedSet.from_samples(samples, index)
        staging = work / "staging" / f"encoded-{key}"
        shutil.rmtree(staging, ignore_errors=True)
        encoded.save(staging)
        (staging / "skipped.json").write_text(json.dumps(dict(skipped)))
        store.commit_dir(staging, name, {"samples": len(encoded), "tokens": int(len(encoded.tokens))})
        shutil.rmtree(staging, ignore_errors=True)
        log.info("encoded %d samples (%d tokens); committed as %s/%s", len(encoded), len(encoded.tokens),
                 store.uri, name)
    barrier()
    if not cached and env.is_main:
        return encoded, skipped, False
    local = store.fetch_dir(name, work / "encoded" / key)
    encoded = EncodedSet.load(local, examples)
    skipped = collections.Counter(json.loads((local / "skipped.json").read_text()))
    log.info("loaded the encoded set %s/%s (%d samples)", store.uri, name, len(encoded))
    return encoded, skipped, True
